//! A ViT's frozen weights on a device, and its embedding, blocks and final norm written once
//! over the kernel set: what both the CPU and a GPU run.

use dtl_core::{BackboneSpec, DtlError, Result};
use dtl_kernels::block::{
    check_batch, saved_mut, saved_ref, BlockCall, BlockScratch, Branch, NormOn, PreNorm, Residual,
};
use dtl_kernels::{AttnShape, DropScales, KernelBackbone, Kernels};

use crate::weights::VitWeights;

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
    /// One block's weights, timm layouts (see [`BlockWeights`](crate::BlockWeights)).
    blocks: Vec<PreNorm<K::Buf>>,
    norm: NormOn<K>,
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
            .map(|b| b.upload(k))
            .collect::<Result<Vec<_>>>()?;
        Ok(VitOn {
            spec: spec.clone(),
            patch_w: k.upload_frozen(&weights.patch_w)?,
            patch_b: k.upload_frozen(&weights.patch_b)?,
            prefix_tokens: k.upload_frozen(&weights.cls_token)?,
            pos_embed: k.upload_frozen(&weights.pos_embed)?,
            blocks,
            norm: NormOn::upload(k, &weights.norm_w, &weights.norm_b, spec.norm_eps as f32)?,
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
        let patch_w = k.download(&self.patch_w, d * patch)?;
        let patch_b = k.download(&self.patch_b, d)?;
        let cls_token = k.download(&self.prefix_tokens, s.prefix_tokens * d)?;
        let pos_embed = k.download(&self.pos_embed, s.tokens() * d)?;
        let blocks = self
            .blocks
            .iter()
            .map(|b| b.download(k, d, s.mlp_hidden))
            .collect::<Result<Vec<_>>>()?;
        let (norm_w, norm_b) = self.norm.download(k)?;
        Ok(VitWeights {
            patch_w,
            patch_b,
            cls_token,
            pos_embed,
            blocks,
            norm_w,
            norm_b,
        })
    }

    /// A call of block `block` on `k` for a batch of `batch` on `ws` with drop-path scales
    /// `drop`.
    fn call<'a>(
        &'a self,
        k: &'a K,
        ws: &VitWorkspace<K>,
        block: usize,
        batch: usize,
        drop: Option<&'a DropScales<K>>,
    ) -> Result<BlockCall<'a, K>> {
        check_batch(&self.spec.name, ws.batch, batch)?;
        let w = self.blocks.get(block).ok_or_else(|| {
            DtlError::argument(format!(
                "{}: block {block} does not exist (the variant has {} blocks)",
                self.spec.name,
                self.blocks.len()
            ))
        })?;
        let s = &self.spec;
        let eps = s.norm_eps as f32;
        // no drop path: each branch's last product accumulates straight onto the residual
        let joins = Residual::Fused;
        Ok(BlockCall::new(
            k,
            w,
            batch,
            s.tokens(),
            s.width,
            s.mlp_hidden,
            eps,
            drop,
            joins,
        ))
    }

    fn attn_shape(&self, batch: usize) -> AttnShape {
        AttnShape {
            batch,
            tokens: self.spec.tokens(),
            heads: self.spec.heads,
            head_dim: self.spec.width / self.spec.heads,
        }
    }

    /// The attention half of a block: `x1 = x + s_attn * proj(attn(LN1(x)))`, leaving the
    /// fused `qkv` in `s.qkv`.
    fn attn_half(
        &self,
        c: &BlockCall<'_, K>,
        s: &mut Scratch<K>,
        x: &K::Buf,
        x1: &mut K::Buf,
    ) -> Result<()> {
        let t = Bufs {
            h: &mut s.h,
            a: &mut s.a,
            scratch: &mut s.u,
        };
        self.attn_half_into(c, t, &mut s.qkv, None, x, x1)
    }

    /// [`Self::attn_half`] with the fused `qkv` written to `qkv`, and the attention
    /// probabilities to `keep` (a buffer and the value they start at), when given.
    fn attn_half_into(
        &self,
        c: &BlockCall<'_, K>,
        t: Bufs<'_, K>,
        qkv: &mut K::Buf,
        keep: Option<(&mut K::Buf, usize)>,
        x: &K::Buf,
        x1: &mut K::Buf,
    ) -> Result<()> {
        let (k, blk) = (c.k, c.w);
        let (rows, d) = (c.rows(), c.width);
        k.layer_norm(x, &blk.norm1_w, &blk.norm1_b, rows, d, c.eps, t.h)?;
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
                k.attention_keeping(qkv, self.attn_shape(c.batch), t.h, t.scratch, probs, at)?
            }
            None => k.attention(qkv, self.attn_shape(c.batch), t.h, t.scratch)?,
        }
        k.copy(x, x1, rows * d)?;
        c.add_branch(t.h, &blk.proj_w, &blk.proj_b, d, Branch::Attn, t.a, x1)
    }

    /// The attention branch of a block's VJP, `dx` holding `dx1` on entry and the input's
    /// gradient on return; `t.scratch` is the attention's scratch, `g` that of `dqkv`.
    #[allow(clippy::too_many_arguments)]
    fn attn_vjp(
        &self,
        c: &BlockCall<'_, K>,
        t: Bufs<'_, K>,
        g: &mut K::Buf,
        x: &K::Buf,
        qkv: &K::Buf,
        kept: Option<(&K::Buf, usize)>,
        dx: &mut K::Buf,
    ) -> Result<()> {
        let (k, blk) = (c.k, c.w);
        let (rows, d) = (c.rows(), c.width);
        // da = s_attn * dx1; d(attention output) = da proj
        let da = c.branch_grad(dx, Branch::Attn, t.a)?;
        k.linear_vjp(da, &blk.proj_w, rows, d, d, t.h, false)?;
        let shape = self.attn_shape(c.batch);
        match kept {
            Some((probs, at)) => k.attention_vjp_kept(qkv, probs, at, t.h, shape, g, t.scratch)?,
            None => k.attention_vjp(qkv, t.h, shape, g, t.scratch)?,
        }
        // dh1 = dqkv qkv_w; dx = dx1 + LN1'(x)^T dh1
        k.linear_vjp(g, &blk.qkv_w, rows, d, 3 * d, t.a, false)?;
        k.layer_norm_vjp(x, &blk.norm1_w, t.a, rows, d, c.eps, dx, true)
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
        check_batch(&self.spec.name, ws.batch, batch)?;
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
        let c = self.call(k, ws, block, batch, drop)?;
        let s = &mut ws.s;
        self.attn_half(&c, s, x, out)?;
        c.mlp_half(
            BlockScratch {
                h: &mut s.h,
                a: &mut s.a,
                g: &mut s.g,
            },
            &mut s.u,
            out,
        )
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
        let c = self.call(k, ws, block, batch, drop)?;
        let (s, x1) = (&mut ws.s, &mut ws.x1);
        // recompute x1 and qkv here, the MLP pre-activation in the MLP branch
        self.attn_half(&c, s, x, x1)?;
        let mlp = BlockScratch {
            h: &mut s.h,
            a: &mut s.a,
            g: &mut s.g,
        };
        c.mlp_vjp_saved(mlp, x1, None, &mut s.u, dy, dx)?;
        // `u` is no longer needed: it serves as the attention's scratch
        let t = Bufs {
            h: &mut s.h,
            a: &mut s.a,
            scratch: &mut s.u,
        };
        self.attn_vjp(&c, t, &mut s.g, x, &s.qkv, None, dx)
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
            .ok_or_else(|| DtlError::argument(format!("{}: batch {batch} is too large", s.name)))?;
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
        let c = self.call(k, ws, block, batch, drop)?;
        let s = &mut ws.s;
        let (x1, qkv, mut u) = saved_mut(&self.spec.name, saved)?;
        let t = Bufs {
            h: &mut s.h,
            a: &mut s.a,
            scratch: &mut s.u,
        };
        // with a kept `u`, the attention probabilities go after it (see `saved_lens`)
        let at = c.rows() * c.hidden;
        let keep = u.as_mut().map(|b| (&mut **b, at));
        self.attn_half_into(&c, t, qkv, keep, x, x1)?;
        // without a kept `u`, the MLP pre-activation lives in the scratch
        let u = u.unwrap_or(&mut s.u);
        let mlp = BlockScratch {
            h: &mut s.h,
            a: &mut s.a,
            g: &mut s.g,
        };
        c.mlp_half_from(mlp, x1, u, out)
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
        let c = self.call(k, ws, block, batch, drop)?;
        let s = &mut ws.s;
        let (x1, qkv, u) = saved_ref(&self.spec.name, saved)?;
        // without a kept `u`, the MLP pre-activation is recomputed into the scratch
        let mlp = BlockScratch {
            h: &mut s.h,
            a: &mut s.a,
            g: &mut s.g,
        };
        c.mlp_vjp_saved(mlp, x1, u, &mut s.u, dy, dx)?;
        let t = Bufs {
            h: &mut s.h,
            a: &mut s.a,
            scratch: &mut s.u,
        };
        // the attention probabilities, kept after `u`
        let kept = u.map(|u| (u, c.rows() * c.hidden));
        self.attn_vjp(&c, t, &mut s.g, x, qkv, kept, dx)
    }

    fn norm_forward(&self, k: &K, x: &K::Buf, rows: usize, out: &mut K::Buf) -> Result<()> {
        self.norm.forward(k, x, rows, out)
    }

    fn norm_vjp(&self, k: &K, x: &K::Buf, dy: &K::Buf, rows: usize, dx: &mut K::Buf) -> Result<()> {
        self.norm.vjp(k, x, dy, rows, dx)
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
        let blocks = weights.blocks.into_iter().map(|b| b.map(own)).collect();
        Ok(VitOn {
            spec: spec.clone(),
            patch_w: own(weights.patch_w),
            patch_b: own(weights.patch_b),
            prefix_tokens: own(weights.cls_token),
            pos_embed: own(weights.pos_embed),
            blocks,
            norm: NormOn {
                w: own(weights.norm_w),
                b: own(weights.norm_b),
                width: spec.width,
                eps: spec.norm_eps as f32,
            },
        })
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
            norm: self.norm.clone(),
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
