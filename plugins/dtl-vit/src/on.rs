//! A ViT's frozen weights on a device, and its embedding, blocks and final norm written once
//! over the kernel set: what both the CPU and a GPU run.

use dtl_core::{BackboneSpec, DtlError, Result};
use dtl_kernels::{AttnShape, DropScales, KernelBackbone, Kernels};

use crate::weights::{BlockWeights, VitWeights};

/// One block's weights on a device, timm layouts (see [`BlockWeights`]).
struct BlockOn<K: Kernels> {
    norm1_w: K::Buf,
    norm1_b: K::Buf,
    qkv_w: K::Buf,
    qkv_b: K::Buf,
    proj_w: K::Buf,
    proj_b: K::Buf,
    norm2_w: K::Buf,
    norm2_b: K::Buf,
    fc1_w: K::Buf,
    fc1_b: K::Buf,
    fc2_w: K::Buf,
    fc2_b: K::Buf,
}

impl<K: Kernels> BlockOn<K> {
    fn upload(k: &K, b: &BlockWeights) -> Result<Self> {
        Ok(BlockOn {
            norm1_w: k.upload_frozen(&b.norm1_w)?,
            norm1_b: k.upload_frozen(&b.norm1_b)?,
            qkv_w: k.upload_frozen(&b.qkv_w)?,
            qkv_b: k.upload_frozen(&b.qkv_b)?,
            proj_w: k.upload_frozen(&b.proj_w)?,
            proj_b: k.upload_frozen(&b.proj_b)?,
            norm2_w: k.upload_frozen(&b.norm2_w)?,
            norm2_b: k.upload_frozen(&b.norm2_b)?,
            fc1_w: k.upload_frozen(&b.fc1_w)?,
            fc1_b: k.upload_frozen(&b.fc1_b)?,
            fc2_w: k.upload_frozen(&b.fc2_w)?,
            fc2_b: k.upload_frozen(&b.fc2_b)?,
        })
    }

    fn download(&self, k: &K, spec: &BackboneSpec) -> Result<BlockWeights> {
        let (d, h) = (spec.width, spec.mlp_hidden);
        Ok(BlockWeights {
            norm1_w: k.download(&self.norm1_w, d)?,
            norm1_b: k.download(&self.norm1_b, d)?,
            qkv_w: k.download(&self.qkv_w, 3 * d * d)?,
            qkv_b: k.download(&self.qkv_b, 3 * d)?,
            proj_w: k.download(&self.proj_w, d * d)?,
            proj_b: k.download(&self.proj_b, d)?,
            norm2_w: k.download(&self.norm2_w, d)?,
            norm2_b: k.download(&self.norm2_b, d)?,
            fc1_w: k.download(&self.fc1_w, h * d)?,
            fc1_b: k.download(&self.fc1_b, h)?,
            fc2_w: k.download(&self.fc2_w, d * h)?,
            fc2_b: k.download(&self.fc2_b, d)?,
        })
    }
}

/// A timm ViT's frozen weights on the device `K`, with its patch embedding, blocks and final
/// norm written once over the kernel set ([`KernelBackbone`]).
///
/// Each block is timm's pre-norm block: `x1 = x + s_attn * proj(attn(LN1(x)))`,
/// `out = x1 + s_mlp * fc2(gelu(fc1(LN2(x1))))`, with the per-sample stochastic-depth scales
/// `s` in training. Its VJP recomputes the block's internals from its input and forms no
/// weight gradient; `block_forward_saving` keeps `x1`, `qkv` and the MLP pre-activation so
/// that `block_vjp_saved` recomputes nothing; given only the first two of those buffers (`x1`
/// and `qkv`), it keeps those and the VJP recomputes only LN2 and fc1. Every intermediate lives in a [`VitWorkspace`] planned once for the
/// largest batch, so that no call allocates on the device.
///
/// ```
/// use dtl_core::BackboneSpec;
/// use dtl_kernels::{CpuKernels, KernelBackbone, Kernels};
/// use dtl_vit::{VitOn, VitWeights};
/// let spec = BackboneSpec::vit("toy", 16, 8, 8, 1, 2); // 5 tokens of width 8
/// let k = CpuKernels::new();
/// let vit = VitOn::upload(&k, &spec, &VitWeights::random(&spec, 0)).unwrap();
/// let mut ws = vit.workspace(&k, 2).unwrap();
/// let images = k.upload_new(&vec![0.5; 2 * 3 * 16 * 16]).unwrap();
/// let (mut x, mut y) = (k.alloc(2 * 5 * 8).unwrap(), k.alloc(2 * 5 * 8).unwrap());
/// vit.embed(&k, &mut ws, &images, 2, &mut x).unwrap();
/// vit.block_forward(&k, &mut ws, 0, &x, 2, None, &mut y).unwrap();
/// assert!(k.download(&y, 80).unwrap().iter().all(|v| v.is_finite()));
/// ```
pub struct VitOn<K: Kernels> {
    spec: BackboneSpec,
    patch_w: K::Buf,
    patch_b: K::Buf,
    prefix_tokens: K::Buf,
    pos_embed: K::Buf,
    blocks: Vec<BlockOn<K>>,
    norm_w: K::Buf,
    norm_b: K::Buf,
}

impl<K: Kernels> std::fmt::Debug for VitOn<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "VitOn({}, {} blocks)", self.spec.name, self.blocks.len())
    }
}

/// Checks the numbers of a ViT spec that the blocks rely on.
pub(crate) fn check_spec(spec: &BackboneSpec) -> Result<()> {
    if spec.heads == 0 || spec.width % spec.heads != 0 {
        return Err(DtlError::invalid(format!(
            "{}: width {} is not divisible by {} heads",
            spec.name, spec.width, spec.heads
        )));
    }
    if spec.patch_size == 0
        || spec.grid.0 * spec.patch_size != spec.image_size
        || spec.grid.1 * spec.patch_size != spec.image_size
    {
        return Err(DtlError::invalid(format!(
            "{}: image size {} is not a whole number of {}-pixel patches",
            spec.name, spec.image_size, spec.patch_size
        )));
    }
    Ok(())
}

/// The error for a saved state of the wrong number of buffers.
fn saved_count(spec: &BackboneSpec, got: usize) -> DtlError {
    DtlError::invalid(format!(
        "{}: a block's saved internals are 3 buffers (x1, qkv, u) or 2 (x1, qkv), {got} given",
        spec.name
    ))
}

impl<K: Kernels> VitOn<K> {
    /// Uploads `weights` (checked against `spec`) to the device of `k`, every tensor as a
    /// frozen weight ([`Kernels::upload_frozen`]: rounded once to bf16 on a device opened for
    /// bf16, f32 elsewhere). The workspaces it plans hold activations
    /// ([`Kernels::alloc_act`]), stored at the same precision.
    ///
    /// ```
    /// use dtl_core::BackboneSpec;
    /// let spec = BackboneSpec::vit("toy", 16, 8, 8, 1, 2);
    /// let mut w = dtl_vit::VitWeights::random(&spec, 0);
    /// let k = dtl_kernels::CpuKernels::new();
    /// assert!(dtl_vit::VitOn::upload(&k, &spec, &w).is_ok());
    /// w.blocks[0].qkv_w.pop();
    /// let e = dtl_vit::VitOn::upload(&k, &spec, &w).unwrap_err().to_string();
    /// assert!(e.contains("blocks.0.attn.qkv.weight"), "{e}");
    /// ```
    pub fn upload(k: &K, spec: &BackboneSpec, weights: &VitWeights) -> Result<Self> {
        check_spec(spec)?;
        weights.check(spec)?;
        let blocks = weights
            .blocks
            .iter()
            .map(|b| BlockOn::upload(k, b))
            .collect::<Result<Vec<_>>>()?;
        Ok(VitOn {
            spec: spec.clone(),
            patch_w: k.upload_frozen(&weights.patch_w)?,
            patch_b: k.upload_frozen(&weights.patch_b)?,
            prefix_tokens: k.upload_frozen(&weights.cls_token)?,
            pos_embed: k.upload_frozen(&weights.pos_embed)?,
            blocks,
            norm_w: k.upload_frozen(&weights.norm_w)?,
            norm_b: k.upload_frozen(&weights.norm_b)?,
        })
    }

    /// The variant's numbers.
    ///
    /// ```
    /// use dtl_core::BackboneSpec;
    /// let spec = BackboneSpec::vit("toy", 16, 8, 8, 1, 2);
    /// let k = dtl_kernels::CpuKernels::new();
    /// let vit = dtl_vit::VitOn::upload(&k, &spec, &dtl_vit::VitWeights::random(&spec, 0)).unwrap();
    /// assert_eq!(vit.spec().tokens(), 5);
    /// ```
    pub fn spec(&self) -> &BackboneSpec {
        &self.spec
    }

    /// The weights, copied back to the host.
    ///
    /// ```
    /// use dtl_core::BackboneSpec;
    /// let spec = BackboneSpec::vit("toy", 16, 8, 8, 1, 2);
    /// let w = dtl_vit::VitWeights::random(&spec, 0);
    /// let k = dtl_kernels::CpuKernels::new();
    /// let vit = dtl_vit::VitOn::upload(&k, &spec, &w).unwrap();
    /// assert_eq!(vit.download(&k).unwrap(), w);
    /// ```
    pub fn download(&self, k: &K) -> Result<VitWeights> {
        let s = &self.spec;
        let d = s.width;
        let patch = s.in_chans * s.patch_size * s.patch_size;
        Ok(VitWeights {
            patch_w: k.download(&self.patch_w, d * patch)?,
            patch_b: k.download(&self.patch_b, d)?,
            cls_token: k.download(&self.prefix_tokens, s.prefix_tokens * d)?,
            pos_embed: k.download(&self.pos_embed, s.tokens() * d)?,
            blocks: self
                .blocks
                .iter()
                .map(|b| b.download(k, s))
                .collect::<Result<Vec<_>>>()?,
            norm_w: k.download(&self.norm_w, d)?,
            norm_b: k.download(&self.norm_b, d)?,
        })
    }

    fn block(&self, i: usize) -> Result<&BlockOn<K>> {
        self.blocks.get(i).ok_or_else(|| {
            DtlError::invalid(format!(
                "{}: block {i} does not exist (the variant has {} blocks)",
                self.spec.name,
                self.blocks.len()
            ))
        })
    }

    fn attn_shape(&self, batch: usize) -> AttnShape {
        AttnShape {
            batch,
            tokens: self.spec.tokens(),
            heads: self.spec.heads,
            head_dim: self.spec.width / self.spec.heads,
        }
    }

    fn check_batch(&self, ws: &VitWorkspace<K>, batch: usize) -> Result<()> {
        if batch > ws.batch {
            return Err(DtlError::invalid(format!(
                "{}: a batch of {batch} given to a workspace planned for {}",
                self.spec.name, ws.batch
            )));
        }
        Ok(())
    }

    /// The attention half of a block: `x1 = x + s_attn * proj(attn(LN1(x)))`, leaving the
    /// fused `qkv` in `s.qkv`.
    #[allow(clippy::too_many_arguments)]
    fn attn_half(
        &self,
        k: &K,
        s: &mut Scratch<K>,
        blk: &BlockOn<K>,
        x: &K::Buf,
        batch: usize,
        drop: Option<&DropScales<K>>,
        x1: &mut K::Buf,
    ) -> Result<()> {
        let t = Bufs {
            h: &mut s.h,
            a: &mut s.a,
            scratch: &mut s.u,
        };
        self.attn_half_into(k, t, &mut s.qkv, None, blk, x, batch, drop, x1)
    }

    /// [`Self::attn_half`] with the fused `qkv` written to `qkv`, and the attention
    /// probabilities to `keep` (a buffer and the value they start at), when given.
    #[allow(clippy::too_many_arguments)]
    fn attn_half_into(
        &self,
        k: &K,
        t: Bufs<'_, K>,
        qkv: &mut K::Buf,
        keep: Option<(&mut K::Buf, usize)>,
        blk: &BlockOn<K>,
        x: &K::Buf,
        batch: usize,
        drop: Option<&DropScales<K>>,
        x1: &mut K::Buf,
    ) -> Result<()> {
        let (n, d) = (self.spec.tokens(), self.spec.width);
        let rows = batch * n;
        let eps = self.spec.norm_eps as f32;
        k.layer_norm(x, &blk.norm1_w, &blk.norm1_b, rows, d, eps, t.h)?;
        k.linear(
            t.h,
            &blk.qkv_w,
            Some(&blk.qkv_b),
            rows,
            d,
            3 * d,
            qkv,
            false,
        )?;
        match keep {
            Some((probs, at)) => {
                k.attention_keeping(qkv, self.attn_shape(batch), t.h, t.scratch, probs, at)?
            }
            None => k.attention(qkv, self.attn_shape(batch), t.h, t.scratch)?,
        }
        k.copy(x, x1, rows * d)?;
        match drop {
            // no drop path: the projection accumulates straight onto the residual
            None => k.linear(t.h, &blk.proj_w, Some(&blk.proj_b), rows, d, d, x1, true),
            Some(dp) => {
                k.linear(t.h, &blk.proj_w, Some(&blk.proj_b), rows, d, d, t.a, false)?;
                k.add_scaled(x1, t.a, batch, n * d, Some(&dp.attn))
            }
        }
    }

    /// The MLP pre-activation `u = fc1(LN2(x1))` into `u` (`h`: scratch).
    fn mlp_pre(
        &self,
        k: &K,
        h: &mut K::Buf,
        u: &mut K::Buf,
        blk: &BlockOn<K>,
        x1: &K::Buf,
        rows: usize,
    ) -> Result<()> {
        let d = self.spec.width;
        let eps = self.spec.norm_eps as f32;
        k.layer_norm(x1, &blk.norm2_w, &blk.norm2_b, rows, d, eps, h)?;
        let hidden = self.spec.mlp_hidden;
        k.linear(h, &blk.fc1_w, Some(&blk.fc1_b), rows, d, hidden, u, false)
    }

    /// The MLP half of a block: `out = x1 + s_mlp * fc2(gelu(u))`, `g` and `a` scratch.
    #[allow(clippy::too_many_arguments)]
    fn mlp_out(
        &self,
        k: &K,
        g: &mut K::Buf,
        a: &mut K::Buf,
        blk: &BlockOn<K>,
        u: &K::Buf,
        batch: usize,
        drop: Option<&DropScales<K>>,
        out: &mut K::Buf,
    ) -> Result<()> {
        let (n, d, hidden) = (self.spec.tokens(), self.spec.width, self.spec.mlp_hidden);
        let rows = batch * n;
        k.gelu(u, rows * hidden, g)?;
        match drop {
            None => k.linear(g, &blk.fc2_w, Some(&blk.fc2_b), rows, hidden, d, out, true),
            Some(dp) => {
                k.linear(g, &blk.fc2_w, Some(&blk.fc2_b), rows, hidden, d, a, false)?;
                k.add_scaled(out, a, batch, n * d, Some(&dp.mlp))
            }
        }
    }

    /// The MLP branch of a block's VJP: `dx = dy + LN2'(x1)^T (fc1^T (gelu'(u) (fc2^T s_mlp dy)))`.
    #[allow(clippy::too_many_arguments)]
    fn mlp_vjp(
        &self,
        k: &K,
        t: Bufs<'_, K>,
        g: &mut K::Buf,
        blk: &BlockOn<K>,
        x1: &K::Buf,
        u: &K::Buf,
        dy: &K::Buf,
        batch: usize,
        drop: Option<&DropScales<K>>,
        dx: &mut K::Buf,
    ) -> Result<()> {
        let (n, d, hidden) = (self.spec.tokens(), self.spec.width, self.spec.mlp_hidden);
        let rows = batch * n;
        let eps = self.spec.norm_eps as f32;
        // dm = s_mlp * dy; du = gelu'(u) * (dm fc2); dh2 = du fc1
        let dm = match drop {
            None => dy,
            Some(dp) => {
                k.scaled(dy, batch, n * d, Some(&dp.mlp), t.a)?;
                &*t.a
            }
        };
        k.linear_vjp(dm, &blk.fc2_w, rows, hidden, d, g, false)?;
        k.gelu_vjp(u, rows * hidden, g)?;
        k.linear_vjp(g, &blk.fc1_w, rows, d, hidden, t.h, false)?;
        // dx1 = dy + LN2'(x1)^T dh2
        k.copy(dy, dx, rows * d)?;
        k.layer_norm_vjp(x1, &blk.norm2_w, t.h, rows, d, eps, dx, true)
    }

    /// The attention branch of a block's VJP, `dx` holding `dx1` on entry and the input's
    /// gradient on return; `t.scratch` is the attention's scratch, `g` that of `dqkv`.
    #[allow(clippy::too_many_arguments)]
    fn attn_vjp(
        &self,
        k: &K,
        t: Bufs<'_, K>,
        g: &mut K::Buf,
        blk: &BlockOn<K>,
        x: &K::Buf,
        qkv: &K::Buf,
        kept: Option<(&K::Buf, usize)>,
        batch: usize,
        drop: Option<&DropScales<K>>,
        dx: &mut K::Buf,
    ) -> Result<()> {
        let (n, d) = (self.spec.tokens(), self.spec.width);
        let rows = batch * n;
        let eps = self.spec.norm_eps as f32;
        // da = s_attn * dx1; d(attention output) = da proj
        let da = match drop {
            None => &*dx,
            Some(dp) => {
                k.scaled(dx, batch, n * d, Some(&dp.attn), t.a)?;
                &*t.a
            }
        };
        k.linear_vjp(da, &blk.proj_w, rows, d, d, t.h, false)?;
        match kept {
            Some((probs, at)) => {
                k.attention_vjp_kept(qkv, probs, at, t.h, self.attn_shape(batch), g, t.scratch)?
            }
            None => k.attention_vjp(qkv, t.h, self.attn_shape(batch), g, t.scratch)?,
        }
        // dh1 = dqkv qkv_w; dx = dx1 + LN1'(x)^T dh1
        k.linear_vjp(g, &blk.qkv_w, rows, d, 3 * d, t.a, false)?;
        k.layer_norm_vjp(x, &blk.norm1_w, t.a, rows, d, eps, dx, true)
    }
}

/// Borrowed scratch buffers of one half of a block.
struct Bufs<'a, K: Kernels> {
    /// rows x width.
    h: &'a mut K::Buf,
    /// rows x width.
    a: &'a mut K::Buf,
    /// The attention kernels' scratch.
    scratch: &'a mut K::Buf,
}

/// The scratch buffers of a block, the embedding and the attention.
///
/// `u` and `g` double as the scratch of the attention kernels and the im2col of the images,
/// when neither holds anything that is still needed.
struct Scratch<K: Kernels> {
    /// rows x width: LayerNorm outputs, the attention output, patch embeddings, gradients.
    h: K::Buf,
    /// rows x 3 width: the fused q, k, v.
    qkv: K::Buf,
    /// rows x width: a branch's output or its gradient.
    a: K::Buf,
    /// rows x hidden: the MLP pre-activation; before it, the attention kernels' scratch.
    u: K::Buf,
    /// rows x max(hidden, 3 width): the GELU output, its gradient, then that of qkv; in the
    /// embedding, the im2col of the images.
    g: K::Buf,
}

/// Every intermediate of [`VitOn`]'s embedding, block forward and block VJP, planned for
/// batches of up to [`VitWorkspace::batch`] samples.
///
/// ```
/// use dtl_core::BackboneSpec;
/// use dtl_kernels::{CpuKernels, KernelBackbone};
/// let spec = BackboneSpec::vit("toy", 16, 8, 8, 1, 2);
/// let k = CpuKernels::new();
/// let vit = dtl_vit::VitOn::upload(&k, &spec, &dtl_vit::VitWeights::random(&spec, 0)).unwrap();
/// let ws = vit.workspace(&k, 4).unwrap();
/// assert_eq!(ws.batch(), 4);
/// ```
pub struct VitWorkspace<K: Kernels> {
    batch: usize,
    /// The block's `x1` (input plus attention branch), kept for the VJP.
    x1: K::Buf,
    s: Scratch<K>,
}

impl<K: Kernels> VitWorkspace<K> {
    /// The largest batch the workspace serves.
    ///
    /// ```
    /// use dtl_core::BackboneSpec;
    /// use dtl_kernels::{CpuKernels, KernelBackbone};
    /// let spec = BackboneSpec::vit("toy", 16, 8, 8, 1, 2);
    /// let k = CpuKernels::new();
    /// let vit = dtl_vit::VitOn::upload(&k, &spec, &dtl_vit::VitWeights::random(&spec, 0)).unwrap();
    /// assert_eq!(vit.workspace(&k, 3).unwrap().batch(), 3);
    /// ```
    pub fn batch(&self) -> usize {
        self.batch
    }
}

impl<K: Kernels> std::fmt::Debug for VitWorkspace<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "VitWorkspace(batch {})", self.batch)
    }
}

impl<K: Kernels> KernelBackbone<K> for VitOn<K> {
    type Workspace = VitWorkspace<K>;

    fn spec(&self) -> &BackboneSpec {
        &self.spec
    }

    fn workspace(&self, k: &K, batch: usize) -> Result<VitWorkspace<K>> {
        let s = &self.spec;
        let p = |dims: &[usize]| dtl_kernels::checked_product(&s.name, dims);
        let (d, hidden) = (s.width, s.mlp_hidden);
        let rows = p(&[batch, s.tokens()])?;
        let patch = s.in_chans * s.patch_size * s.patch_size;
        let attn = k.attention_scratch(self.attn_shape(batch));
        let cols = p(&[batch, s.patches(), patch])?;
        Ok(VitWorkspace {
            batch,
            x1: k.alloc_act(p(&[rows, d])?)?,
            s: Scratch {
                h: k.alloc_act(p(&[rows, d])?)?,
                qkv: k.alloc_act(p(&[rows, 3, d])?)?,
                a: k.alloc_act(p(&[rows, d])?)?,
                u: k.alloc_act(p(&[rows, hidden])?.max(attn))?,
                g: k.alloc_act(p(&[rows, hidden.max(3 * d)])?.max(cols))?,
            },
        })
    }

    fn embed(
        &self,
        k: &K,
        ws: &mut VitWorkspace<K>,
        images: &K::Buf,
        batch: usize,
        out: &mut K::Buf,
    ) -> Result<()> {
        self.check_batch(ws, batch)?;
        let s = &self.spec;
        let (c, p, d) = (s.in_chans, s.patch_size, s.width);
        let np = s.patches();
        k.patchify(images, batch, c, s.image_size, p, &mut ws.s.g)?;
        k.linear(
            &ws.s.g,
            &self.patch_w,
            Some(&self.patch_b),
            batch * np,
            c * p * p,
            d,
            &mut ws.s.h,
            false,
        )?;
        k.assemble_tokens(
            &ws.s.h,
            &self.prefix_tokens,
            &self.pos_embed,
            batch,
            s.prefix_tokens,
            np,
            d,
            out,
        )
    }

    fn block_forward(
        &self,
        k: &K,
        ws: &mut VitWorkspace<K>,
        block: usize,
        x: &K::Buf,
        batch: usize,
        drop: Option<&DropScales<K>>,
        out: &mut K::Buf,
    ) -> Result<()> {
        self.check_batch(ws, batch)?;
        let blk = self.block(block)?;
        let rows = batch * self.spec.tokens();
        let s = &mut ws.s;
        self.attn_half(k, s, blk, x, batch, drop, out)?;
        self.mlp_pre(k, &mut s.h, &mut s.u, blk, out, rows)?;
        self.mlp_out(k, &mut s.g, &mut s.a, blk, &s.u, batch, drop, out)
    }

    fn block_vjp(
        &self,
        k: &K,
        ws: &mut VitWorkspace<K>,
        block: usize,
        x: &K::Buf,
        dy: &K::Buf,
        batch: usize,
        drop: Option<&DropScales<K>>,
        dx: &mut K::Buf,
    ) -> Result<()> {
        self.check_batch(ws, batch)?;
        let blk = self.block(block)?;
        let rows = batch * self.spec.tokens();
        let (s, x1) = (&mut ws.s, &mut ws.x1);
        // recompute
        self.attn_half(k, s, blk, x, batch, drop, x1)?;
        self.mlp_pre(k, &mut s.h, &mut s.u, blk, x1, rows)?;
        let t = Bufs {
            h: &mut s.h,
            a: &mut s.a,
            scratch: &mut s.qkv,
        };
        // `scratch` is unused by the MLP branch
        self.mlp_vjp(k, t, &mut s.g, blk, x1, &s.u, dy, batch, drop, dx)?;
        // `u` is no longer needed: it serves as the attention's scratch
        let t = Bufs {
            h: &mut s.h,
            a: &mut s.a,
            scratch: &mut s.u,
        };
        self.attn_vjp(k, t, &mut s.g, blk, x, &s.qkv, None, batch, drop, dx)
    }

    /// `x1` (rows x width), `qkv` (rows x 3 width), `u` (rows x hidden) followed by the
    /// attention probabilities where the device keeps them
    /// ([`Kernels::attention_probs_len`]: the VJP then reads them instead of recomputing them);
    /// the saving forward and VJP also take the first two alone.
    fn saved_lens(&self, batch: usize) -> Result<Vec<usize>> {
        let s = &self.spec;
        let p = |dims: &[usize]| dtl_kernels::checked_product(&s.name, dims);
        let rows = p(&[batch, s.tokens()])?;
        // after `u`, the attention probabilities where the device keeps them
        let probs = K::attention_probs_len(self.attn_shape(batch));
        let u = p(&[rows, s.mlp_hidden])?
            .checked_add(probs)
            .ok_or_else(|| DtlError::invalid(format!("{}: batch {batch} is too large", s.name)))?;
        Ok(vec![p(&[rows, s.width])?, p(&[rows, 3, s.width])?, u])
    }

    fn block_forward_saving(
        &self,
        k: &K,
        ws: &mut VitWorkspace<K>,
        block: usize,
        x: &K::Buf,
        batch: usize,
        drop: Option<&DropScales<K>>,
        out: &mut K::Buf,
        saved: &mut [K::Buf],
    ) -> Result<()> {
        self.check_batch(ws, batch)?;
        let blk = self.block(block)?;
        let (n, d) = (self.spec.tokens(), self.spec.width);
        let rows = batch * n;
        let s = &mut ws.s;
        let (x1, qkv, mut u) = match saved {
            [x1, qkv, u] => (x1, qkv, Some(u)),
            [x1, qkv] => (x1, qkv, None),
            _ => return Err(saved_count(&self.spec, saved.len())),
        };
        let t = Bufs {
            h: &mut s.h,
            a: &mut s.a,
            scratch: &mut s.u,
        };
        // with a kept `u`, the attention probabilities go after it (see `saved_lens`)
        let at = rows * self.spec.mlp_hidden;
        let keep = u.as_mut().map(|b| (&mut **b, at));
        self.attn_half_into(k, t, qkv, keep, blk, x, batch, drop, x1)?;
        // without a kept `u`, the MLP pre-activation lives in the scratch
        let u = u.unwrap_or(&mut s.u);
        self.mlp_pre(k, &mut s.h, u, blk, x1, rows)?;
        k.copy(x1, out, rows * d)?;
        self.mlp_out(k, &mut s.g, &mut s.a, blk, u, batch, drop, out)
    }

    fn block_vjp_saved(
        &self,
        k: &K,
        ws: &mut VitWorkspace<K>,
        block: usize,
        x: &K::Buf,
        dy: &K::Buf,
        batch: usize,
        drop: Option<&DropScales<K>>,
        saved: &[K::Buf],
        dx: &mut K::Buf,
    ) -> Result<()> {
        self.check_batch(ws, batch)?;
        let blk = self.block(block)?;
        let s = &mut ws.s;
        match saved {
            [x1, _, u] => {
                let t = Bufs {
                    h: &mut s.h,
                    a: &mut s.a,
                    scratch: &mut s.u,
                };
                self.mlp_vjp(k, t, &mut s.g, blk, x1, u, dy, batch, drop, dx)?;
            }
            [x1, _] => {
                // recompute the MLP pre-activation only
                let rows = batch * self.spec.tokens();
                self.mlp_pre(k, &mut s.h, &mut s.u, blk, x1, rows)?;
                let t = Bufs {
                    h: &mut s.h,
                    a: &mut s.a,
                    scratch: &mut s.qkv,
                };
                // `scratch` is unused by the MLP branch
                self.mlp_vjp(k, t, &mut s.g, blk, x1, &s.u, dy, batch, drop, dx)?;
            }
            _ => return Err(saved_count(&self.spec, saved.len())),
        }
        let qkv = &saved[1];
        let t = Bufs {
            h: &mut s.h,
            a: &mut s.a,
            scratch: &mut s.u,
        };
        let kept = match saved {
            [_, _, u] => Some((u, batch * self.spec.tokens() * self.spec.mlp_hidden)),
            _ => None,
        };
        self.attn_vjp(k, t, &mut s.g, blk, x, qkv, kept, batch, drop, dx)
    }

    fn norm_forward(&self, k: &K, x: &K::Buf, rows: usize, out: &mut K::Buf) -> Result<()> {
        let (d, eps) = (self.spec.width, self.spec.norm_eps as f32);
        k.layer_norm(x, &self.norm_w, &self.norm_b, rows, d, eps, out)
    }

    fn norm_vjp(&self, k: &K, x: &K::Buf, dy: &K::Buf, rows: usize, dx: &mut K::Buf) -> Result<()> {
        let (d, eps) = (self.spec.width, self.spec.norm_eps as f32);
        k.layer_norm_vjp(x, &self.norm_w, dy, rows, d, eps, dx, false)
    }
}

impl VitOn<dtl_kernels::CpuKernels> {
    /// The weights as CPU buffers, taking over their allocations (no copy).
    ///
    /// ```
    /// use dtl_core::BackboneSpec;
    /// let spec = BackboneSpec::vit("toy", 16, 8, 8, 1, 2);
    /// let vit = dtl_vit::VitOn::from_weights(&spec, dtl_vit::VitWeights::random(&spec, 0)).unwrap();
    /// assert_eq!(vit.spec().name, "toy");
    /// ```
    pub fn from_weights(spec: &BackboneSpec, weights: VitWeights) -> Result<Self> {
        use dtl_kernels::CpuBuf;
        check_spec(spec)?;
        weights.check(spec)?;
        let own = |v: Vec<f32>| CpuBuf::from_vec(v);
        let blocks = weights
            .blocks
            .into_iter()
            .map(|b| BlockOn {
                norm1_w: own(b.norm1_w),
                norm1_b: own(b.norm1_b),
                qkv_w: own(b.qkv_w),
                qkv_b: own(b.qkv_b),
                proj_w: own(b.proj_w),
                proj_b: own(b.proj_b),
                norm2_w: own(b.norm2_w),
                norm2_b: own(b.norm2_b),
                fc1_w: own(b.fc1_w),
                fc1_b: own(b.fc1_b),
                fc2_w: own(b.fc2_w),
                fc2_b: own(b.fc2_b),
            })
            .collect();
        Ok(VitOn {
            spec: spec.clone(),
            patch_w: own(weights.patch_w),
            patch_b: own(weights.patch_b),
            prefix_tokens: own(weights.cls_token),
            pos_embed: own(weights.pos_embed),
            blocks,
            norm_w: own(weights.norm_w),
            norm_b: own(weights.norm_b),
        })
    }
}

impl<K: Kernels> Clone for BlockOn<K>
where
    K::Buf: Clone,
{
    fn clone(&self) -> Self {
        BlockOn {
            norm1_w: self.norm1_w.clone(),
            norm1_b: self.norm1_b.clone(),
            qkv_w: self.qkv_w.clone(),
            qkv_b: self.qkv_b.clone(),
            proj_w: self.proj_w.clone(),
            proj_b: self.proj_b.clone(),
            norm2_w: self.norm2_w.clone(),
            norm2_b: self.norm2_b.clone(),
            fc1_w: self.fc1_w.clone(),
            fc1_b: self.fc1_b.clone(),
            fc2_w: self.fc2_w.clone(),
            fc2_b: self.fc2_b.clone(),
        }
    }
}

/// A copy of the weights on the same device (for devices whose buffers can be cloned, such
/// as the CPU's).
///
/// ```
/// use dtl_core::BackboneSpec;
/// let spec = BackboneSpec::vit("toy", 16, 8, 8, 1, 2);
/// let vit = dtl_vit::VitOn::from_weights(&spec, dtl_vit::VitWeights::random(&spec, 0)).unwrap();
/// let k = dtl_kernels::CpuKernels::new();
/// assert_eq!(vit.clone().download(&k).unwrap(), vit.download(&k).unwrap());
/// ```
impl<K: Kernels> Clone for VitOn<K>
where
    K::Buf: Clone,
{
    fn clone(&self) -> Self {
        VitOn {
            spec: self.spec.clone(),
            patch_w: self.patch_w.clone(),
            patch_b: self.patch_b.clone(),
            prefix_tokens: self.prefix_tokens.clone(),
            pos_embed: self.pos_embed.clone(),
            blocks: self.blocks.clone(),
            norm_w: self.norm_w.clone(),
            norm_b: self.norm_b.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dtl_kernels::CpuKernels;

    /// Keeping a block's internals changes neither its output nor its input gradient.
    #[test]
    fn saved_internals_give_the_recomputed_vjp() {
        let spec = BackboneSpec::vit("toy", 16, 8, 8, 2, 2); // 5 tokens of width 8
        let k = CpuKernels::new();
        let vit = VitOn::upload(&k, &spec, &VitWeights::random(&spec, 3)).unwrap();
        let (batch, act) = (3, 3 * 5 * 8);
        let mut ws = vit.workspace(&k, batch).unwrap();
        let x: Vec<f32> = (0..act)
            .map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0)
            .collect();
        let dy: Vec<f32> = (0..act)
            .map(|i| ((i * 13 % 29) as f32 / 14.0) - 1.0)
            .collect();
        let (x, dy) = (k.upload_new(&x).unwrap(), k.upload_new(&dy).unwrap());
        let mut drop = DropScales::alloc(&k, batch).unwrap();
        let dp = dtl_core::DropPath {
            attn: vec![0.0, 2.0, 2.0],
            mlp: vec![2.0, 0.0, 2.0],
        };
        drop.set(&k, &dp).unwrap();
        for d in [None, Some(&drop)] {
            let (mut y1, mut y2) = (k.alloc(act).unwrap(), k.alloc(act).unwrap());
            let (mut dx1, mut dx2) = (k.alloc(act).unwrap(), k.alloc(act).unwrap());
            vit.block_forward(&k, &mut ws, 1, &x, batch, d, &mut y1)
                .unwrap();
            vit.block_vjp(&k, &mut ws, 1, &x, &dy, batch, d, &mut dx1)
                .unwrap();
            let lens = KernelBackbone::<CpuKernels>::saved_lens(&vit, batch).unwrap();
            assert_eq!(lens.len(), 3);
            let mut saved: Vec<_> = lens.iter().map(|&n| k.alloc(n).unwrap()).collect();
            vit.block_forward_saving(&k, &mut ws, 1, &x, batch, d, &mut y2, &mut saved)
                .unwrap();
            // the workspace is overwritten in between, as in a training step
            vit.block_forward(&k, &mut ws, 0, &dy, batch, None, &mut dx2)
                .unwrap();
            vit.block_vjp_saved(&k, &mut ws, 1, &x, &dy, batch, d, &saved, &mut dx2)
                .unwrap();
            assert_eq!(k.download(&y1, act).unwrap(), k.download(&y2, act).unwrap());
            assert_eq!(
                k.download(&dx1, act).unwrap(),
                k.download(&dx2, act).unwrap()
            );
            // keeping x1 and qkv alone gives the same values
            let (mut y3, mut dx3) = (k.alloc(act).unwrap(), k.alloc(act).unwrap());
            vit.block_forward_saving(&k, &mut ws, 1, &x, batch, d, &mut y3, &mut saved[..2])
                .unwrap();
            vit.block_forward(&k, &mut ws, 0, &dy, batch, None, &mut dx3)
                .unwrap();
            vit.block_vjp_saved(&k, &mut ws, 1, &x, &dy, batch, d, &saved[..2], &mut dx3)
                .unwrap();
            assert_eq!(k.download(&y1, act).unwrap(), k.download(&y3, act).unwrap());
            assert_eq!(
                k.download(&dx1, act).unwrap(),
                k.download(&dx3, act).unwrap()
            );
            let e = vit
                .block_vjp_saved(&k, &mut ws, 1, &x, &dy, batch, d, &saved[..1], &mut dx2)
                .unwrap_err()
                .to_string();
            assert!(e.contains("3 buffers"), "{e}");
        }
    }
}
