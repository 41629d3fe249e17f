//! The ViT as a [`Backbone`] on the CPU.

use std::marker::PhantomData;
use std::path::Path;

use dfdx::prelude::*;
use dtl_core::{Backbone, BackboneSpec, DropPath, DtlError, Images, Result};

use crate::flat;
use crate::kernels::{self, recycle, scratch, AttnShape};
use crate::load::{load_weights, LoadReport};
use crate::weights::{BlockWeights, VitWeights};

/// A timm Vision Transformer with compile-time token count `T` and width `W`.
///
/// Depth, heads, patch and image size are runtime values of its [`BackboneSpec`]; the spec
/// must agree with `T` and `W`. Each block is timm's pre-norm block (LayerNorm eps from
/// the spec, fused qkv with bias, scale `1/sqrt(head_dim)`, erf GELU MLP). Activations cross
/// the [`Backbone`] interface as dfdx tensors; inside, everything is flat `f32` buffers on
/// the heap, products run on `gemm` and row-wise work on rayon.
///
/// Research code instantiates its own geometry without touching this crate:
///
/// ```
/// use dfdx::prelude::*;
/// use dtl_core::{Backbone, BackboneSpec};
/// use dtl_vit::Vit;
/// // image 16, patch 8 -> 4 patches + class token; width 8, 1 block, 2 heads
/// let spec = BackboneSpec::vit("my_vit", 16, 8, 8, 1, 2);
/// let vit = Vit::<Const<5>, Const<8>>::random(spec, 0).unwrap();
/// let dev = Cpu::default();
/// let x = vit.embed(&dev.sample_normal_like(&(2, Const::<3>, 16, 16))).unwrap();
/// let y = vit.block_forward(0, &x, None).unwrap();
/// assert_eq!(y.shape().1, Const::<5>);
/// ```
#[derive(Debug, Clone)]
pub struct Vit<T: ConstDim, W: ConstDim> {
    spec: BackboneSpec,
    weights: VitWeights,
    _dims: PhantomData<fn() -> (T, W)>,
}

/// A ViT whose dims come from a [`Geometry`](crate::Geometry).
pub type VitOf<G> = Vit<<G as crate::Geometry>::Tokens, <G as crate::Geometry>::Width>;

impl<T: ConstDim, W: ConstDim> Vit<T, W> {
    /// Wraps weights for `spec`, checking the spec against `T`/`W` and every tensor length.
    pub fn new(spec: BackboneSpec, weights: VitWeights) -> Result<Self> {
        if spec.tokens() != T::SIZE || spec.width != W::SIZE {
            return Err(DtlError::invalid(format!(
                "{}: the spec has {} tokens of width {}, but the type is Vit<Const<{}>, Const<{}>>",
                spec.name,
                spec.tokens(),
                spec.width,
                T::SIZE,
                W::SIZE
            )));
        }
        if spec.heads == 0 || spec.width % spec.heads != 0 {
            return Err(DtlError::invalid(format!(
                "{}: width {} is not divisible by {} heads",
                spec.name, spec.width, spec.heads
            )));
        }
        if spec.patch_size == 0 || spec.grid.0 * spec.patch_size != spec.image_size {
            return Err(DtlError::invalid(format!(
                "{}: image size {} is not a whole number of {}-pixel patches",
                spec.name, spec.image_size, spec.patch_size
            )));
        }
        weights.check(&spec)?;
        Ok(Vit {
            spec,
            weights,
            _dims: PhantomData,
        })
    }

    /// Random timm-style weights from `seed`, for benchmarks and tests.
    pub fn random(spec: BackboneSpec, seed: u64) -> Result<Self> {
        let w = VitWeights::random(&spec, seed);
        Self::new(spec, w)
    }

    /// Loads a checkpoint (`format`: `auto`, `safetensors` or `npz`) for `spec`.
    pub fn load(spec: BackboneSpec, path: &Path, format: &str) -> Result<Self> {
        Ok(Self::load_with_report(spec, path, format)?.0)
    }

    /// Like [`Vit::load`], also returning what the loader did.
    pub fn load_with_report(
        spec: BackboneSpec,
        path: &Path,
        format: &str,
    ) -> Result<(Self, LoadReport)> {
        let (w, report) = load_weights(&spec, path, format)?;
        Ok((Self::new(spec, w)?, report))
    }

    /// The weights.
    pub fn weights(&self) -> &VitWeights {
        &self.weights
    }

    fn rows_ok(&self, what: &str, len: usize, batch: usize, per: usize) -> Result<()> {
        if len != batch * per {
            return Err(DtlError::invalid(format!(
                "{}: {what} holds {len} values, expected {batch} x {per}",
                self.spec.name
            )));
        }
        Ok(())
    }

    fn block(&self, i: usize) -> Result<&BlockWeights> {
        self.weights.blocks.get(i).ok_or_else(|| {
            DtlError::invalid(format!(
                "{}: block {i} does not exist (the variant has {} blocks)",
                self.spec.name, self.spec.depth
            ))
        })
    }

    fn drop_scales<'a>(&self, drop: Option<&'a DropPath>, batch: usize) -> Result<DropScales<'a>> {
        match drop {
            None => Ok((None, None)),
            Some(d) => {
                if d.attn.len() != batch || d.mlp.len() != batch {
                    return Err(DtlError::invalid(format!(
                        "drop path scales for {} / {} samples given to a batch of {batch}",
                        d.attn.len(),
                        d.mlp.len()
                    )));
                }
                Ok((Some(&d.attn[..]), Some(&d.mlp[..])))
            }
        }
    }

    fn attn_shape(&self, batch: usize) -> AttnShape {
        AttnShape {
            batch,
            tokens: T::SIZE,
            heads: self.spec.heads,
            head_dim: self.spec.width / self.spec.heads,
        }
    }

    /// The attention half of block `i` on flat `x`: returns `(qkv, x1)` where
    /// `x1 = x + s_attn * proj(attn(LN1(x)))`.
    fn attn_half(
        &self,
        blk: &BlockWeights,
        x: &[f32],
        batch: usize,
        s_attn: Option<&[f32]>,
    ) -> (Vec<f32>, Vec<f32>) {
        let (n, d) = (T::SIZE, W::SIZE);
        let eps = self.spec.norm_eps as f32;
        let rows = batch * n;
        let mut h = scratch(rows * d);
        kernels::layer_norm(x, &blk.norm1_w, &blk.norm1_b, d, eps, &mut h);
        let mut qkv = scratch(rows * 3 * d);
        kernels::linear(&h, &blk.qkv_w, &blk.qkv_b, rows, d, 3 * d, &mut qkv);
        // reuse `h` for the attention output
        kernels::attention(&qkv, self.attn_shape(batch), &mut h);
        let mut a = scratch(rows * d);
        kernels::linear(&h, &blk.proj_w, &blk.proj_b, rows, d, d, &mut a);
        recycle(h);
        let mut x1 = x.to_vec();
        kernels::add_scaled_rows(&mut x1, &a, d, n, s_attn);
        recycle(a);
        (qkv, x1)
    }

    /// The MLP pre-activation of block `i`: `u = fc1(LN2(x1))`.
    fn mlp_pre(&self, blk: &BlockWeights, x1: &[f32], rows: usize) -> Vec<f32> {
        let d = W::SIZE;
        let hidden = self.spec.mlp_hidden;
        let mut h = scratch(rows * d);
        kernels::layer_norm(
            x1,
            &blk.norm2_w,
            &blk.norm2_b,
            d,
            self.spec.norm_eps as f32,
            &mut h,
        );
        let mut u = scratch(rows * hidden);
        kernels::linear(&h, &blk.fc1_w, &blk.fc1_b, rows, d, hidden, &mut u);
        recycle(h);
        u
    }

    /// Block `i` on flat activations (batch * tokens * width).
    pub fn block_forward_flat(
        &self,
        i: usize,
        x: &[f32],
        batch: usize,
        drop: Option<&DropPath>,
    ) -> Result<Vec<f32>> {
        let (n, d) = (T::SIZE, W::SIZE);
        self.rows_ok("the block input", x.len(), batch, n * d)?;
        let blk = self.block(i)?;
        let (s_attn, s_mlp) = self.drop_scales(drop, batch)?;
        let rows = batch * n;
        let hidden = self.spec.mlp_hidden;
        let (qkv, mut x1) = self.attn_half(blk, x, batch, s_attn);
        recycle(qkv);
        let mut u = self.mlp_pre(blk, &x1, rows);
        let mut g = scratch(rows * hidden);
        kernels::gelu(&u, &mut g);
        // reuse `u` for the MLP output
        kernels::linear(&g, &blk.fc2_w, &blk.fc2_b, rows, hidden, d, &mut u);
        kernels::add_scaled_rows(&mut x1, &u[..rows * d], d, n, s_mlp);
        recycle(g);
        recycle(u);
        Ok(x1)
    }

    /// Input-only VJP of block `i` on flat buffers; internals are recomputed from `x`.
    pub fn block_vjp_flat(
        &self,
        i: usize,
        x: &[f32],
        grad_out: &[f32],
        batch: usize,
        drop_path: Option<&DropPath>,
    ) -> Result<Vec<f32>> {
        let (n, d) = (T::SIZE, W::SIZE);
        self.rows_ok("the block input", x.len(), batch, n * d)?;
        self.rows_ok("the output gradient", grad_out.len(), batch, n * d)?;
        let blk = self.block(i)?;
        let (s_attn, s_mlp) = self.drop_scales(drop_path, batch)?;
        let rows = batch * n;
        let hidden = self.spec.mlp_hidden;
        let eps = self.spec.norm_eps as f32;
        // recompute
        let (qkv, x1) = self.attn_half(blk, x, batch, s_attn);
        let u = self.mlp_pre(blk, &x1, rows);
        // MLP branch: dm = s_mlp * dy
        let mut dm = scratch(rows * d);
        kernels::scaled_rows(grad_out, d, n, s_mlp, &mut dm);
        let mut du = scratch(rows * hidden);
        kernels::linear_vjp(&dm, &blk.fc2_w, rows, hidden, d, &mut du);
        kernels::gelu_backward_inplace(&u, &mut du);
        recycle(u);
        // dh2 = du fc1 (reuse dm)
        kernels::linear_vjp(&du, &blk.fc1_w, rows, d, hidden, &mut dm);
        recycle(du);
        let mut dx1 = grad_out.to_vec();
        kernels::layer_norm_vjp(&x1, &blk.norm2_w, &dm, d, eps, &mut dx1, true);
        drop(x1);
        // attention branch: da = s_attn * dx1
        let mut da = scratch(rows * d);
        kernels::scaled_rows(&dx1, d, n, s_attn, &mut da);
        // d(attn output) = da proj (reuse dm)
        kernels::linear_vjp(&da, &blk.proj_w, rows, d, d, &mut dm);
        let mut dqkv = scratch(rows * 3 * d);
        kernels::attention_vjp(&qkv, &dm, self.attn_shape(batch), &mut dqkv);
        recycle(qkv);
        recycle(dm);
        // dh1 = dqkv qkv_w (reuse da)
        kernels::linear_vjp(&dqkv, &blk.qkv_w, rows, d, 3 * d, &mut da);
        recycle(dqkv);
        kernels::layer_norm_vjp(x, &blk.norm1_w, &da, d, eps, &mut dx1, true);
        recycle(da);
        Ok(dx1)
    }

    /// Patch embedding, class token and position embedding on flat NCHW images.
    pub fn embed_flat(&self, images: &[f32], batch: usize) -> Result<Vec<f32>> {
        let s = &self.spec;
        let (c, p, img) = (s.in_chans, s.patch_size, s.image_size);
        let (n, d) = (T::SIZE, W::SIZE);
        self.rows_ok("the image batch", images.len(), batch, c * img * img)?;
        let (gh, gw) = s.grid;
        let k = c * p * p;
        let npatch = gh * gw;
        // im2col: one row per patch, (channel, row, column) order as the conv weight
        let mut cols = scratch(batch * npatch * k);
        for b in 0..batch {
            for py in 0..gh {
                for px in 0..gw {
                    let row = &mut cols[((b * npatch) + py * gw + px) * k..][..k];
                    for ci in 0..c {
                        for y in 0..p {
                            let src = ((b * c + ci) * img + py * p + y) * img + px * p;
                            row[(ci * p + y) * p..][..p].copy_from_slice(&images[src..src + p]);
                        }
                    }
                }
            }
        }
        let mut patches = scratch(batch * npatch * d);
        kernels::linear(
            &cols,
            &self.weights.patch_w,
            &self.weights.patch_b,
            batch * npatch,
            k,
            d,
            &mut patches,
        );
        recycle(cols);
        let prefix = s.prefix_tokens;
        let pos = &self.weights.pos_embed;
        let mut out = vec![0.0f32; batch * n * d];
        for b in 0..batch {
            let xb = &mut out[b * n * d..(b + 1) * n * d];
            for t in 0..prefix {
                for j in 0..d {
                    xb[t * d + j] = self.weights.cls_token[t * d + j] + pos[t * d + j];
                }
            }
            let pb = &patches[b * npatch * d..(b + 1) * npatch * d];
            for (j, v) in xb[prefix * d..].iter_mut().enumerate() {
                *v = pb[j] + pos[prefix * d + j];
            }
        }
        recycle(patches);
        Ok(out)
    }

    /// The final LayerNorm on flat rows of width `W`.
    pub fn norm_forward_flat(&self, x: &[f32]) -> Result<Vec<f32>> {
        let d = W::SIZE;
        if x.len() % d != 0 {
            return Err(DtlError::invalid(format!(
                "{}: {} values are not whole rows of width {d}",
                self.spec.name,
                x.len()
            )));
        }
        let mut out = vec![0.0f32; x.len()];
        kernels::layer_norm(
            x,
            &self.weights.norm_w,
            &self.weights.norm_b,
            d,
            self.spec.norm_eps as f32,
            &mut out,
        );
        Ok(out)
    }

    /// Input-only VJP of the final LayerNorm on flat rows.
    pub fn norm_vjp_flat(&self, x: &[f32], grad_out: &[f32]) -> Result<Vec<f32>> {
        let d = W::SIZE;
        if x.len() % d != 0 || x.len() != grad_out.len() {
            return Err(DtlError::invalid(format!(
                "{}: norm VJP got {} inputs and {} gradients, expected equal whole rows of width {d}",
                self.spec.name,
                x.len(),
                grad_out.len()
            )));
        }
        let mut dx = vec![0.0f32; x.len()];
        kernels::layer_norm_vjp(
            x,
            &self.weights.norm_w,
            grad_out,
            d,
            self.spec.norm_eps as f32,
            &mut dx,
            false,
        );
        Ok(dx)
    }

    /// The whole frozen forward: embedding, every block, final norm on all tokens (timm's
    /// `forward_features`). Returns flat (batch, tokens, width).
    pub fn forward_features_flat(&self, images: &[f32], batch: usize) -> Result<Vec<f32>> {
        let mut x = self.embed_flat(images, batch)?;
        for i in 0..self.spec.depth {
            x = self.block_forward_flat(i, &x, batch, None)?;
        }
        self.norm_forward_flat(&x)
    }
}

/// Per-sample stochastic-depth scales of the attention and MLP branches.
type DropScales<'a> = (Option<&'a [f32]>, Option<&'a [f32]>);

type Tok<T, W> = flat::Tokens<T, W, Cpu>;
type Rows<W> = flat::Rows<W, Cpu>;

impl<T: ConstDim, W: ConstDim> Backbone<Cpu> for Vit<T, W> {
    type Tokens = T;
    type Width = W;

    fn spec(&self) -> &BackboneSpec {
        &self.spec
    }

    fn embed(&self, images: &Images<Cpu>) -> Result<Tok<T, W>> {
        flat::embed(&self.spec, images, |v, b| self.embed_flat(v, b))
    }

    fn block_forward(
        &self,
        block: usize,
        x: &Tok<T, W>,
        drop: Option<&DropPath>,
    ) -> Result<Tok<T, W>> {
        flat::block(x, |v, b| self.block_forward_flat(block, v, b, drop))
    }

    fn block_vjp(
        &self,
        block: usize,
        x: &Tok<T, W>,
        grad_out: &Tok<T, W>,
        drop: Option<&DropPath>,
    ) -> Result<Tok<T, W>> {
        flat::block_vjp(&self.spec, x, grad_out, |v, g, b| {
            self.block_vjp_flat(block, v, g, b, drop)
        })
    }

    fn norm_forward(&self, x: &Rows<W>) -> Result<Rows<W>> {
        flat::rows(x, |v| self.norm_forward_flat(v))
    }

    fn norm_vjp(&self, x: &Rows<W>, grad_out: &Rows<W>) -> Result<Rows<W>> {
        flat::rows_vjp(x, grad_out, |v, g| self.norm_vjp_flat(v, g))
    }
}
