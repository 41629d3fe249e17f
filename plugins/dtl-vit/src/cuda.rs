//! The frozen ViT on a CUDA GPU (feature `cuda`): patch embedding, per-block forward and
//! input-only VJP, final LayerNorm, in f32 with cuBLAS GEMMs and the kernels of `dtl-cuda`.
//!
//! [`GpuVit`] holds a copy of the weights in GPU memory and works on activations that live
//! there ([`GpuVec`]); the `*_host` methods take and return host buffers in the same flat
//! layouts as the CPU model's `*_flat` methods, which makes parity checks one call each.
//! Internals of a block are recomputed from its input in the VJP, exactly as on the CPU:
//! no weight gradient is ever formed.

use dtl_core::{Backbone, BackboneSpec, DropPath, DtlError, Result};
use dtl_cuda::{Gpu, GpuVec, MatMul};

use crate::model::Vit;
use crate::weights::{BlockWeights, VitWeights};

/// One block's weights in GPU memory, timm layouts (see [`BlockWeights`]).
struct GpuBlock {
    norm1_w: GpuVec,
    norm1_b: GpuVec,
    qkv_w: GpuVec,
    qkv_b: GpuVec,
    proj_w: GpuVec,
    proj_b: GpuVec,
    norm2_w: GpuVec,
    norm2_b: GpuVec,
    fc1_w: GpuVec,
    fc1_b: GpuVec,
    fc2_w: GpuVec,
    fc2_b: GpuVec,
}

impl GpuBlock {
    fn upload(gpu: &Gpu, b: &BlockWeights) -> Result<Self> {
        Ok(GpuBlock {
            norm1_w: gpu.upload(&b.norm1_w)?,
            norm1_b: gpu.upload(&b.norm1_b)?,
            qkv_w: gpu.upload(&b.qkv_w)?,
            qkv_b: gpu.upload(&b.qkv_b)?,
            proj_w: gpu.upload(&b.proj_w)?,
            proj_b: gpu.upload(&b.proj_b)?,
            norm2_w: gpu.upload(&b.norm2_w)?,
            norm2_b: gpu.upload(&b.norm2_b)?,
            fc1_w: gpu.upload(&b.fc1_w)?,
            fc1_b: gpu.upload(&b.fc1_b)?,
            fc2_w: gpu.upload(&b.fc2_w)?,
            fc2_b: gpu.upload(&b.fc2_b)?,
        })
    }
}

/// What the attention half of a block leaves for the rest of the forward and for the VJP.
struct AttnHalf {
    /// Queries, keys, values: (batch, heads, tokens, head_dim) each.
    q: GpuVec,
    k: GpuVec,
    v: GpuVec,
    /// Attention probabilities (batch, heads, tokens, tokens).
    p: GpuVec,
    /// Block input plus the (scaled) attention branch.
    x1: GpuVec,
}

/// A timm ViT's frozen weights on a GPU, with the forward and input-only VJP of its parts.
///
/// Activations are flat row-major f32: tokens `(batch, tokens, width)`, images
/// `(batch, channels, height, width)`, already normalised.
///
/// ```no_run
/// use dtl_core::BackboneSpec;
/// use dtl_vit::{cuda::GpuVit, VitWeights};
/// let spec = BackboneSpec::vit("toy", 16, 8, 8, 1, 2);
/// let gpu = dtl_cuda::Gpu::new(0).unwrap();
/// let vit = GpuVit::new(&gpu, &spec, &VitWeights::random(&spec, 0)).unwrap();
/// let tokens = vit.embed_host(&vec![0.5; 2 * 3 * 16 * 16], 2).unwrap();
/// let y = vit.block_forward_host(0, &tokens, 2, None).unwrap();
/// assert_eq!(y.len(), 2 * 5 * 8);
/// ```
pub struct GpuVit {
    gpu: Gpu,
    spec: BackboneSpec,
    patch_w: GpuVec,
    patch_b: GpuVec,
    prefix_tokens: GpuVec,
    pos_embed: GpuVec,
    blocks: Vec<GpuBlock>,
    norm_w: GpuVec,
    norm_b: GpuVec,
}

impl std::fmt::Debug for GpuVit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GpuVit({} on {:?})", self.spec.name, self.gpu)
    }
}

impl<T: dfdx::prelude::ConstDim, W: dfdx::prelude::ConstDim> Vit<T, W> {
    /// Copies this model's weights to `gpu`.
    ///
    /// ```no_run
    /// let vit = dtl_vit::random::<dtl_vit::variants::VitTestPatch8_32>(0).unwrap();
    /// let gpu_vit = vit.to_gpu(&dtl_cuda::Gpu::new(0).unwrap()).unwrap();
    /// ```
    pub fn to_gpu(&self, gpu: &Gpu) -> Result<GpuVit> {
        let spec = Backbone::<dfdx::prelude::Cpu>::spec(self);
        GpuVit::new(gpu, spec, self.weights())
    }
}

impl GpuVit {
    /// Uploads `weights` (checked against `spec`) to `gpu`.
    pub fn new(gpu: &Gpu, spec: &BackboneSpec, weights: &VitWeights) -> Result<Self> {
        if spec.heads == 0 || spec.width % spec.heads != 0 {
            return Err(DtlError::invalid(format!(
                "{}: width {} is not divisible by {} heads",
                spec.name, spec.width, spec.heads
            )));
        }
        weights.check(spec)?;
        let blocks = weights
            .blocks
            .iter()
            .map(|b| GpuBlock::upload(gpu, b))
            .collect::<Result<Vec<_>>>()?;
        Ok(GpuVit {
            gpu: gpu.clone(),
            spec: spec.clone(),
            patch_w: gpu.upload(&weights.patch_w)?,
            patch_b: gpu.upload(&weights.patch_b)?,
            prefix_tokens: gpu.upload(&weights.cls_token)?,
            pos_embed: gpu.upload(&weights.pos_embed)?,
            blocks,
            norm_w: gpu.upload(&weights.norm_w)?,
            norm_b: gpu.upload(&weights.norm_b)?,
        })
    }

    /// The device the weights live on.
    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    /// The variant's numbers.
    pub fn spec(&self) -> &BackboneSpec {
        &self.spec
    }

    fn eps(&self) -> f32 {
        self.spec.norm_eps as f32
    }

    fn block(&self, i: usize) -> Result<&GpuBlock> {
        self.blocks.get(i).ok_or_else(|| {
            DtlError::invalid(format!(
                "{}: block {i} does not exist (blocks 0..{})",
                self.spec.name,
                self.blocks.len()
            ))
        })
    }

    fn check_tokens(&self, what: &str, len: usize, batch: usize) -> Result<()> {
        let per = self.spec.tokens() * self.spec.width;
        if len != batch * per {
            return Err(DtlError::invalid(format!(
                "{}: {what} holds {len} values, expected batch {batch} x {} tokens x width {}",
                self.spec.name,
                self.spec.tokens(),
                self.spec.width
            )));
        }
        Ok(())
    }

    /// Per-sample scales of the two residual branches (ones without drop path).
    fn scales(&self, drop: Option<&DropPath>, batch: usize) -> Result<(GpuVec, GpuVec)> {
        match drop {
            None => {
                let ones = self.gpu.upload(&vec![1.0; batch])?;
                let ones2 = self.gpu.duplicate(&ones)?;
                Ok((ones, ones2))
            }
            Some(d) => {
                if d.attn.len() != batch || d.mlp.len() != batch {
                    return Err(DtlError::invalid(format!(
                        "{}: drop-path scales for {} / {} samples, the batch has {batch}",
                        self.spec.name,
                        d.attn.len(),
                        d.mlp.len()
                    )));
                }
                Ok((self.gpu.upload(&d.attn)?, self.gpu.upload(&d.mlp)?))
            }
        }
    }

    /// The attention half: `x1 = x + s_attn * proj(attn(norm1(x)))`, keeping q, k, v and the
    /// attention probabilities.
    fn attn_half(
        &self,
        blk: &GpuBlock,
        x: &GpuVec,
        batch: usize,
        s_attn: &GpuVec,
    ) -> Result<AttnHalf> {
        let g = &self.gpu;
        let (n, d, h) = (self.spec.tokens(), self.spec.width, self.spec.heads);
        let hd = d / h;
        let rows = batch * n;
        let mut hbuf = g.zeros(rows * d)?;
        g.layer_norm(x, &blk.norm1_w, &blk.norm1_b, d, self.eps(), &mut hbuf)?;
        let mut qkv = g.zeros(rows * 3 * d)?;
        g.linear(&hbuf, &blk.qkv_w, Some(&blk.qkv_b), d, 3 * d, &mut qkv)?;
        let heads_len = batch * h * n * hd;
        let mut q = g.zeros(heads_len)?;
        let mut k = g.zeros(heads_len)?;
        let mut v = g.zeros(heads_len)?;
        g.split_heads(&qkv, &mut q, batch, n, h, hd, 3 * d, 0)?;
        g.split_heads(&qkv, &mut k, batch, n, h, hd, 3 * d, d)?;
        g.split_heads(&qkv, &mut v, batch, n, h, hd, 3 * d, 2 * d)?;
        drop(qkv);
        let bh = batch * h;
        let mut p = g.zeros(bh * n * n)?;
        g.matmul(&MatMul::new(n, n, hd).trans_b().batched(bh), &q, &k, &mut p)?;
        g.softmax_rows(&mut p, n, attn_scale(hd))?;
        let mut o = g.zeros(heads_len)?;
        g.matmul(&MatMul::new(n, hd, n).batched(bh), &p, &v, &mut o)?;
        // merge heads into hbuf, project into a fresh buffer
        g.merge_heads(&o, &mut hbuf, batch, n, h, hd, d, 0)?;
        drop(o);
        let mut a = g.zeros(rows * d)?;
        g.linear(&hbuf, &blk.proj_w, Some(&blk.proj_b), d, d, &mut a)?;
        let mut x1 = g.zeros(rows * d)?;
        g.residual(x, &a, s_attn, &mut x1)?;
        Ok(AttnHalf { q, k, v, p, x1 })
    }

    /// The MLP's pre-activation `u = fc1(norm2(x1))` (bias included) and `gelu(u)`.
    fn mlp_pre(&self, blk: &GpuBlock, x1: &GpuVec, rows: usize) -> Result<(GpuVec, GpuVec)> {
        let g = &self.gpu;
        let (d, hidden) = (self.spec.width, self.spec.mlp_hidden);
        let mut h2 = g.zeros(rows * d)?;
        g.layer_norm(x1, &blk.norm2_w, &blk.norm2_b, d, self.eps(), &mut h2)?;
        let mut u = g.zeros(rows * hidden)?;
        g.linear(&h2, &blk.fc1_w, None, d, hidden, &mut u)?;
        let mut act = g.zeros(rows * hidden)?;
        g.bias_gelu(&mut u, &blk.fc1_b, hidden, &mut act)?;
        Ok((u, act))
    }

    /// `x_0` from images `(batch, channels, image, image)`: patch embedding, prefix tokens,
    /// position embedding.
    pub fn embed(&self, images: &GpuVec, batch: usize) -> Result<GpuVec> {
        let s = &self.spec;
        let (c, p, img, d) = (s.in_chans, s.patch_size, s.image_size, s.width);
        if images.len() != batch * c * img * img {
            return Err(DtlError::invalid(format!(
                "{}: the image batch holds {} values, expected {batch} x {c} x {img} x {img}",
                s.name,
                images.len()
            )));
        }
        let g = &self.gpu;
        let npatch = s.patches();
        let k = c * p * p;
        let mut cols = g.zeros(batch * npatch * k)?;
        g.patchify(images, &mut cols, batch, c, img, img, p)?;
        let mut patches = g.zeros(batch * npatch * d)?;
        g.linear(&cols, &self.patch_w, None, k, d, &mut patches)?;
        drop(cols);
        let mut out = g.zeros(batch * s.tokens() * d)?;
        g.assemble_tokens(
            &patches,
            &self.patch_b,
            &self.prefix_tokens,
            &self.pos_embed,
            &mut out,
            batch,
            npatch,
            s.prefix_tokens,
            d,
        )?;
        Ok(out)
    }

    /// `x_{i+1} = Block_i(x_i)` on tokens in GPU memory; `drop` holds the stochastic-depth
    /// scales of a training step.
    pub fn block_forward(
        &self,
        i: usize,
        x: &GpuVec,
        batch: usize,
        drop_path: Option<&DropPath>,
    ) -> Result<GpuVec> {
        self.check_tokens("the block input", x.len(), batch)?;
        let blk = self.block(i)?;
        let (s_attn, s_mlp) = self.scales(drop_path, batch)?;
        let g = &self.gpu;
        let rows = batch * self.spec.tokens();
        let (d, hidden) = (self.spec.width, self.spec.mlp_hidden);
        let AttnHalf { x1, .. } = self.attn_half(blk, x, batch, &s_attn)?;
        let (u, act) = self.mlp_pre(blk, &x1, rows)?;
        drop(u);
        let mut m = g.zeros(rows * d)?;
        g.linear(&act, &blk.fc2_w, Some(&blk.fc2_b), hidden, d, &mut m)?;
        let mut y = g.zeros(rows * d)?;
        g.residual(&x1, &m, &s_mlp, &mut y)?;
        Ok(y)
    }

    /// The gradient with respect to the input of block `i`, given the gradient of its
    /// output; internals are recomputed from `x`, weights get no gradient.
    pub fn block_vjp(
        &self,
        i: usize,
        x: &GpuVec,
        grad_out: &GpuVec,
        batch: usize,
        drop_path: Option<&DropPath>,
    ) -> Result<GpuVec> {
        self.check_tokens("the block input", x.len(), batch)?;
        self.check_tokens("the output gradient", grad_out.len(), batch)?;
        let blk = self.block(i)?;
        let (s_attn, s_mlp) = self.scales(drop_path, batch)?;
        let g = &self.gpu;
        let (n, d, h) = (self.spec.tokens(), self.spec.width, self.spec.heads);
        let (hd, hidden) = (d / h, self.spec.mlp_hidden);
        let rows = batch * n;
        let bh = batch * h;
        let eps = self.eps();

        // recompute
        let AttnHalf { q, k, v, p, x1 } = self.attn_half(blk, x, batch, &s_attn)?;
        let (u, act) = self.mlp_pre(blk, &x1, rows)?;
        drop(act);

        // MLP branch
        let mut gm = g.zeros(rows * d)?;
        g.scale_samples(grad_out, &s_mlp, &mut gm)?;
        let mut gact = g.zeros(rows * hidden)?;
        g.linear_vjp(&gm, &blk.fc2_w, hidden, d, &mut gact, false)?;
        let mut gu = g.zeros(rows * hidden)?;
        g.gelu_vjp(&u, &gact, &mut gu)?;
        drop((u, gact));
        // gm now holds the gradient of norm2's output
        g.linear_vjp(&gu, &blk.fc1_w, d, hidden, &mut gm, false)?;
        drop(gu);
        let mut gx = g.duplicate(grad_out)?;
        g.layer_norm_vjp(&x1, &blk.norm2_w, &gm, d, eps, &mut gx, true)?;
        drop(x1);

        // attention branch: gm <- s_attn * gx, then through proj
        g.scale_samples(&gx, &s_attn, &mut gm)?;
        let mut gattn = g.zeros(rows * d)?;
        g.linear_vjp(&gm, &blk.proj_w, d, d, &mut gattn, false)?;
        let heads_len = bh * n * hd;
        let mut go = g.zeros(heads_len)?;
        g.split_heads(&gattn, &mut go, batch, n, h, hd, d, 0)?;
        let mut gp = g.zeros(bh * n * n)?;
        g.matmul(
            &MatMul::new(n, n, hd).trans_b().batched(bh),
            &go,
            &v,
            &mut gp,
        )?;
        let mut gv = g.zeros(heads_len)?;
        g.matmul(
            &MatMul::new(n, hd, n).trans_a().batched(bh),
            &p,
            &go,
            &mut gv,
        )?;
        drop((go, v));
        g.softmax_rows_vjp(&p, &mut gp, n, attn_scale(hd))?;
        drop(p);
        let mut gq = g.zeros(heads_len)?;
        g.matmul(&MatMul::new(n, hd, n).batched(bh), &gp, &k, &mut gq)?;
        let mut gk = g.zeros(heads_len)?;
        g.matmul(
            &MatMul::new(n, hd, n).trans_a().batched(bh),
            &gp,
            &q,
            &mut gk,
        )?;
        drop((gp, q, k));
        let mut gqkv = g.zeros(rows * 3 * d)?;
        g.merge_heads(&gq, &mut gqkv, batch, n, h, hd, 3 * d, 0)?;
        g.merge_heads(&gk, &mut gqkv, batch, n, h, hd, 3 * d, d)?;
        g.merge_heads(&gv, &mut gqkv, batch, n, h, hd, 3 * d, 2 * d)?;
        drop((gq, gk, gv));
        // gattn now holds the gradient of norm1's output
        g.linear_vjp(&gqkv, &blk.qkv_w, d, 3 * d, &mut gattn, false)?;
        g.layer_norm_vjp(x, &blk.norm1_w, &gattn, d, eps, &mut gx, true)?;
        Ok(gx)
    }

    fn check_rows(&self, what: &str, len: usize) -> Result<()> {
        if len % self.spec.width != 0 {
            return Err(DtlError::invalid(format!(
                "{}: {what} holds {len} values, not whole rows of width {}",
                self.spec.name, self.spec.width
            )));
        }
        Ok(())
    }

    /// The final LayerNorm on rows of width D.
    pub fn norm_forward(&self, x: &GpuVec) -> Result<GpuVec> {
        self.check_rows("the norm input", x.len())?;
        let mut y = self.gpu.zeros(x.len())?;
        self.gpu.layer_norm(
            x,
            &self.norm_w,
            &self.norm_b,
            self.spec.width,
            self.eps(),
            &mut y,
        )?;
        Ok(y)
    }

    /// Input-only VJP of the final LayerNorm.
    pub fn norm_vjp(&self, x: &GpuVec, grad_out: &GpuVec) -> Result<GpuVec> {
        self.check_rows("the norm input", x.len())?;
        if grad_out.len() != x.len() {
            return Err(DtlError::invalid(format!(
                "{}: norm VJP got {} inputs and {} gradients",
                self.spec.name,
                x.len(),
                grad_out.len()
            )));
        }
        let mut gx = self.gpu.zeros(x.len())?;
        self.gpu.layer_norm_vjp(
            x,
            &self.norm_w,
            grad_out,
            self.spec.width,
            self.eps(),
            &mut gx,
            false,
        )?;
        Ok(gx)
    }

    /// timm's `forward_features`: embedding, every block, final norm on all tokens.
    pub fn forward_features(&self, images: &GpuVec, batch: usize) -> Result<GpuVec> {
        let mut x = self.embed(images, batch)?;
        for i in 0..self.blocks.len() {
            x = self.block_forward(i, &x, batch, None)?;
        }
        self.norm_forward(&x)
    }

    /// [`GpuVit::embed`] on host buffers.
    pub fn embed_host(&self, images: &[f32], batch: usize) -> Result<Vec<f32>> {
        let x = self.gpu.upload(images)?;
        self.gpu.download(&self.embed(&x, batch)?)
    }

    /// [`GpuVit::block_forward`] on host buffers.
    pub fn block_forward_host(
        &self,
        i: usize,
        x: &[f32],
        batch: usize,
        drop: Option<&DropPath>,
    ) -> Result<Vec<f32>> {
        let x = self.gpu.upload(x)?;
        self.gpu.download(&self.block_forward(i, &x, batch, drop)?)
    }

    /// [`GpuVit::block_vjp`] on host buffers.
    pub fn block_vjp_host(
        &self,
        i: usize,
        x: &[f32],
        grad_out: &[f32],
        batch: usize,
        drop: Option<&DropPath>,
    ) -> Result<Vec<f32>> {
        let x = self.gpu.upload(x)?;
        let gy = self.gpu.upload(grad_out)?;
        self.gpu.download(&self.block_vjp(i, &x, &gy, batch, drop)?)
    }

    /// [`GpuVit::norm_forward`] on host buffers.
    pub fn norm_forward_host(&self, x: &[f32]) -> Result<Vec<f32>> {
        let x = self.gpu.upload(x)?;
        self.gpu.download(&self.norm_forward(&x)?)
    }

    /// [`GpuVit::norm_vjp`] on host buffers.
    pub fn norm_vjp_host(&self, x: &[f32], grad_out: &[f32]) -> Result<Vec<f32>> {
        let x = self.gpu.upload(x)?;
        let gy = self.gpu.upload(grad_out)?;
        self.gpu.download(&self.norm_vjp(&x, &gy)?)
    }

    /// [`GpuVit::forward_features`] on host buffers.
    pub fn forward_features_host(&self, images: &[f32], batch: usize) -> Result<Vec<f32>> {
        let x = self.gpu.upload(images)?;
        self.gpu.download(&self.forward_features(&x, batch)?)
    }
}

/// A [`GpuVit`] as a [`Backbone`] on dfdx's `Cuda` device, with the same compile-time dims
/// as the CPU model it was made from.
///
/// dfdx 0.13 does not expose the device memory of its tensors, so each call copies its
/// tensors to the host and into [`GpuVit`]'s buffers and back; the work itself runs on the
/// GPU.
///
/// ```no_run
/// use dfdx::prelude::*;
/// use dtl_core::Backbone;
/// let vit = dtl_vit::random::<dtl_vit::variants::VitTestPatch8_32>(0).unwrap();
/// let cuda_vit = dtl_vit::cuda::CudaVit::from_cpu(&vit, &dtl_cuda::Gpu::new(0).unwrap()).unwrap();
/// let dev = Cuda::default();
/// let x = cuda_vit.embed(&dev.sample_normal_like(&(2, Const::<3>, 32, 32))).unwrap();
/// let y = cuda_vit.block_forward(0, &x, None).unwrap();
/// ```
pub struct CudaVit<T: dfdx::prelude::ConstDim, W: dfdx::prelude::ConstDim> {
    inner: GpuVit,
    _dims: std::marker::PhantomData<fn() -> (T, W)>,
}

impl<T: dfdx::prelude::ConstDim, W: dfdx::prelude::ConstDim> std::fmt::Debug for CudaVit<T, W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CudaVit({:?})", self.inner)
    }
}

impl<T: dfdx::prelude::ConstDim, W: dfdx::prelude::ConstDim> CudaVit<T, W> {
    /// Copies the weights of a CPU model to `gpu`.
    pub fn from_cpu(vit: &Vit<T, W>, gpu: &Gpu) -> Result<Self> {
        Ok(CudaVit {
            inner: vit.to_gpu(gpu)?,
            _dims: std::marker::PhantomData,
        })
    }

    /// The model on GPU buffers.
    pub fn gpu_vit(&self) -> &GpuVit {
        &self.inner
    }
}

type CudaTok<T, W> = crate::flat::Tokens<T, W, dfdx::prelude::Cuda>;
type CudaRows<W> = crate::flat::Rows<W, dfdx::prelude::Cuda>;

impl<T: dfdx::prelude::ConstDim, W: dfdx::prelude::ConstDim> Backbone<dfdx::prelude::Cuda>
    for CudaVit<T, W>
{
    type Tokens = T;
    type Width = W;

    fn spec(&self) -> &BackboneSpec {
        self.inner.spec()
    }

    fn embed(&self, images: &dtl_core::Images<dfdx::prelude::Cuda>) -> Result<CudaTok<T, W>> {
        crate::flat::embed(&self.inner.spec, images, |v, b| self.inner.embed_host(v, b))
    }

    fn block_forward(
        &self,
        block: usize,
        x: &CudaTok<T, W>,
        drop: Option<&DropPath>,
    ) -> Result<CudaTok<T, W>> {
        crate::flat::block(x, |v, b| self.inner.block_forward_host(block, v, b, drop))
    }

    fn block_vjp(
        &self,
        block: usize,
        x: &CudaTok<T, W>,
        grad_out: &CudaTok<T, W>,
        drop: Option<&DropPath>,
    ) -> Result<CudaTok<T, W>> {
        crate::flat::block_vjp(&self.inner.spec, x, grad_out, |v, g, b| {
            self.inner.block_vjp_host(block, v, g, b, drop)
        })
    }

    fn norm_forward(&self, x: &CudaRows<W>) -> Result<CudaRows<W>> {
        crate::flat::rows(x, |v| self.inner.norm_forward_host(v))
    }

    fn norm_vjp(&self, x: &CudaRows<W>, grad_out: &CudaRows<W>) -> Result<CudaRows<W>> {
        crate::flat::rows_vjp(x, grad_out, |v, g| self.inner.norm_vjp_host(v, g))
    }
}

/// The training job of `vit` on GPU `ordinal`: the frozen backbone as a [`CudaVit`], the
/// side network, head and optimizer on dfdx's `Cuda` device of the same GPU.
///
/// GPU memory in reports and benchmarks is the device's used memory minus what it was once
/// the CUDA context existed, before the weights were uploaded: weights, activations and the
/// buffers dfdx keeps cached.
pub fn build_job<T: dfdx::prelude::ConstDim, W: dfdx::prelude::ConstDim>(
    cfg: &dtl_core::PipelineConfig,
    cx: &dtl_core::BuildContext,
    vit: &Vit<T, W>,
    ordinal: usize,
) -> Result<Box<dyn dtl_core::Job>> {
    dtl_cuda::check_device(ordinal).map_err(DtlError::Unavailable)?;
    let gpu = Gpu::new(ordinal)?;
    let dev = dfdx::prelude::Cuda::try_build(ordinal, cfg.run.seed)
        .map_err(|e| DtlError::Device(format!("cuda:{ordinal}: {e:?}")))?;
    let (free, total) = gpu.memory_info()?;
    let base = total.saturating_sub(free);
    let backbone = CudaVit::from_cpu(vit, &gpu)?;
    let probe_gpu = gpu.clone();
    let probe: dtl_runner::MemoryProbe = std::sync::Arc::new(move || {
        let (free, total) = probe_gpu.memory_info().ok()?;
        Some(total.saturating_sub(free).saturating_sub(base) as f64 / (1024.0 * 1024.0))
    });
    dtl_runner::build_job_cuda(cfg, cx, backbone, dev, Some(probe))
}

/// timm's attention scale, `1 / sqrt(head_dim)`.
fn attn_scale(head_dim: usize) -> f32 {
    (1.0 / (head_dim as f64).sqrt()) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attention_scale_is_inverse_sqrt_head_dim() {
        assert_eq!(attn_scale(64), 0.125);
        assert_eq!(attn_scale(16), 0.25);
    }
}
