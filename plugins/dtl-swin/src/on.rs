//! A Swin backbone's frozen weights on a device, and its patch embedding, shifted-window
//! blocks, stage transitions and final norm written once over the kernel set.

use dtl_core::{BackboneSpec, DtlError, Result};
use dtl_kernels::block::{
    check_batch, saved_mut, saved_ref, BlockCall, BlockScratch, Branch, NormOn, PreNorm, Residual,
};
use dtl_kernels::{AttnShape, DropScales, KernelBackbone, Kernels, MergeShape, WindowShape};

use crate::weights::{MergeWeights, SwinBlockWeights, SwinWeights};
use crate::SwinConfig;

/// The score bias of one block, dense: `groups x heads x T x T` for `T = window^2` tokens:
/// the relative-position bias gathered from the table, plus, for a shifted block, the -100
/// mask between tokens that come from different regions of the rolled grid (one group per
/// window); a block without a shift has one group.
///
/// `table` is `((2 w - 1)^2, heads)` (timm's layout); `res` is the stage's grid side, `w` its
/// window side and `shift` the block's shift. Returns the bias and its group count.
///
/// ```
/// // a 4x4 grid in 2x2 windows, shifted by 1: four windows, the last one masked
/// let (bias, groups) = dtl_swin::score_bias(&[0.0; 9], 1, 4, 2, 1);
/// assert_eq!((bias.len(), groups), (4 * 16, 4));
/// assert!(bias[..16].iter().all(|&v| v == 0.0));
/// assert_eq!(bias[3 * 16 + 1], -100.0);
/// ```
pub fn score_bias(
    table: &[f32],
    heads: usize,
    res: usize,
    w: usize,
    shift: usize,
) -> (Vec<f32>, usize) {
    let t = w * w;
    let side = 2 * w - 1;
    // relative-position bias, heads x T x T
    let mut rel = vec![0.0f32; heads * t * t];
    for i in 0..t {
        let (ir, ic) = (i / w, i % w);
        for j in 0..t {
            let (jr, jc) = (j / w, j % w);
            let idx = (ir + w - 1 - jr) * side + (ic + w - 1 - jc);
            for h in 0..heads {
                rel[(h * t + i) * t + j] = table[idx * heads + h];
            }
        }
    }
    if shift == 0 {
        return (rel, 1);
    }
    // the region of each rolled-grid coordinate: [0, res - w), [res - w, res - shift), rest
    let region = |x: usize| {
        if x < res - w {
            0
        } else if x < res - shift {
            1
        } else {
            2
        }
    };
    let per_row = res / w;
    let nw = per_row * per_row;
    let mut out = Vec::with_capacity(nw * rel.len());
    for win in 0..nw {
        let (wr, wc) = (win / per_row, win % per_row);
        let id = |i: usize| region(wr * w + i / w) * 3 + region(wc * w + i % w);
        for h in 0..heads {
            for i in 0..t {
                for j in 0..t {
                    let m = if id(i) == id(j) { 0.0 } else { -100.0 };
                    out.push(rel[(h * t + i) * t + j] + m);
                }
            }
        }
    }
    (out, nw)
}

/// One block's weights on a device, with its dense score bias.
struct BlockOn<K: Kernels> {
    /// The norm/linear pairs, timm layouts.
    w: PreNorm<K::Buf>,
    /// `groups x heads x T x T`.
    bias: K::Buf,
    groups: usize,
    /// The table the bias came from, kept for [`SwinOn::download`].
    table: Vec<f32>,
}

/// A transition's weights on a device.
struct MergeOn<K: Kernels> {
    norm_w: K::Buf,
    norm_b: K::Buf,
    reduction_w: K::Buf,
}

/// Where a block sits: its stage's numbers and its window geometry.
#[derive(Clone, Copy, Debug)]
struct Geo {
    width: usize,
    heads: usize,
    hidden: usize,
    res: usize,
    window: usize,
    shift: usize,
}

impl Geo {
    fn tokens(&self) -> usize {
        self.res * self.res
    }

    fn windows(&self, batch: usize) -> WindowShape {
        WindowShape {
            batch,
            grid: (self.res, self.res),
            width: self.width,
            window: (self.window, self.window),
            shift: (self.shift, self.shift),
        }
    }

    fn attn(&self, batch: usize) -> AttnShape {
        let nw = (self.res / self.window) * (self.res / self.window);
        AttnShape {
            batch: batch * nw,
            tokens: self.window * self.window,
            heads: self.heads,
            head_dim: self.width / self.heads,
        }
    }
}

/// The geometry of the transition into a stage: patch merging of the previous stage's grid,
/// LayerNorm(4C) and Linear(4C -> 2C) on the merged rows.
#[derive(Clone, Copy, Debug)]
struct Merge {
    /// The previous stage's grid, merged 2 x 2.
    shape: MergeShape,
    /// Merged tokens of the batch (rows of the norm and the reduction).
    rows: usize,
    /// The previous stage's width `C`.
    cin: usize,
}

/// The largest buffers a block of a variant needs for one batch (values).
struct Largest {
    /// Tokens x width.
    act: usize,
    /// Tokens x 3 x width (the fused q, k, v).
    qkv: usize,
    /// Tokens x MLP hidden width.
    u: usize,
    /// Tokens x the larger of the hidden width and 3 x width.
    g: usize,
    /// The attention's scratch.
    scratch: usize,
}

/// One call of a block: the call of its norm/linear pairs (the device, the batch and its
/// drop-path scales), the block's score bias and its window geometry; the block's halves are
/// its methods.
struct At<'a, K: Kernels> {
    c: BlockCall<'a, K>,
    blk: &'a BlockOn<K>,
    g: Geo,
}

impl<K: Kernels> Clone for At<'_, K> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<K: Kernels> Copy for At<'_, K> {}

/// A timm Swin Transformer's frozen weights on the device `K`, with its patch embedding,
/// shifted-window blocks, patch-merging stage transitions and final norm written once over
/// the kernel set ([`KernelBackbone`]).
///
/// Each block is timm 1.0's `SwinTransformerBlock`:
/// `x1 = x + s_attn * merge(proj(attn_bias(qkv(partition(LN1(x))))))`,
/// `out = x1 + s_mlp * fc2(gelu(fc1(LN2(x1))))`, the partition rolling the grid for the odd
/// blocks of a stage, the bias (relative position plus the shifted-window mask) made dense
/// once at upload. Its VJP recomputes the internals from the input and forms no weight
/// gradient; the saving forward keeps `x1`, `qkv` and the MLP pre-activation (or, given two
/// buffers, `x1` and `qkv` alone, the VJP then recomputing LN2 and fc1). The transition into stage `s >= 1` is patch merging, LayerNorm(4C) and a
/// bias-free Linear(4C -> 2C). Intermediates live in a [`SwinWorkspace`] planned once.
///
/// ```
/// use dtl_kernels::{CpuKernels, KernelBackbone, Kernels};
/// use dtl_swin::{SwinConfig, SwinOn, SwinWeights};
/// let cfg = SwinConfig::new("toy", 16, 2, 8, &[2, 2], &[1, 2], 4); // 8x8 then 4x4 tokens
/// let k = CpuKernels::new();
/// let swin = SwinOn::upload(&k, &cfg, &SwinWeights::random(&cfg, 0)).unwrap();
/// let mut ws = swin.workspace(&k, 2).unwrap();
/// let images = k.upload_new(&vec![0.5; 2 * 3 * 16 * 16]).unwrap();
/// let (mut x, mut y) = (k.alloc(2 * 64 * 8).unwrap(), k.alloc(2 * 64 * 8).unwrap());
/// swin.embed(&k, &mut ws, &images, 2, &mut x).unwrap();
/// swin.block_forward(&k, &mut ws, 1, &x, 2, None, &mut y).unwrap();
/// swin.stage_forward(&k, &mut ws, 1, &y, 2, &mut x).unwrap(); // 2 x 16 x 16 values
/// assert!(k.download(&x, 2 * 16 * 16).unwrap().iter().all(|v| v.is_finite()));
/// ```
pub struct SwinOn<K: Kernels> {
    cfg: SwinConfig,
    spec: BackboneSpec,
    patch_w: K::Buf,
    patch_b: K::Buf,
    patch_norm: NormOn<K>,
    blocks: Vec<BlockOn<K>>,
    merges: Vec<MergeOn<K>>,
    norm: NormOn<K>,
}

impl<K: Kernels> std::fmt::Debug for SwinOn<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "SwinOn({}, {} blocks, {} stages)",
            self.cfg.name,
            self.blocks.len(),
            self.cfg.stages()
        )
    }
}

/// Every intermediate of [`SwinOn`]'s embedding, blocks, transitions and VJPs, planned for
/// batches of up to [`SwinWorkspace::batch`] samples (sized for the largest stage).
///
/// ```
/// use dtl_kernels::{CpuKernels, KernelBackbone};
/// let cfg = dtl_swin::SwinConfig::new("toy", 16, 2, 8, &[2, 2], &[1, 2], 4);
/// let k = CpuKernels::new();
/// let swin = dtl_swin::SwinOn::upload(&k, &cfg, &dtl_swin::SwinWeights::random(&cfg, 0)).unwrap();
/// assert_eq!(swin.workspace(&k, 3).unwrap().batch(), 3);
/// ```
pub struct SwinWorkspace<K: Kernels> {
    batch: usize,
    /// rows x C: the block's `x1`, kept for the VJP.
    x1: K::Buf,
    /// rows x 3C: the block's fused q, k, v, kept for the VJP.
    qkv: K::Buf,
    /// rows x hidden: the MLP pre-activation, kept for the VJP.
    u: K::Buf,
    s: Scratch<K>,
}

/// The scratch buffers of a block, a transition and the embedding.
struct Scratch<K: Kernels> {
    /// rows x C: LayerNorm outputs and gradients.
    h: K::Buf,
    /// rows x C: windows, branch outputs.
    a: K::Buf,
    /// rows x C: windowed gradients.
    t: K::Buf,
    /// rows x max(hidden, 3C), and the im2col of the images.
    g: K::Buf,
    /// The attention kernels' scratch.
    scratch: K::Buf,
}

impl<K: Kernels> SwinWorkspace<K> {
    /// The largest batch the workspace serves.
    ///
    /// ```
    /// use dtl_kernels::{CpuKernels, KernelBackbone};
    /// let cfg = dtl_swin::SwinConfig::new("toy", 16, 2, 8, &[2, 2], &[1, 2], 4);
    /// let k = CpuKernels::new();
    /// let swin = dtl_swin::SwinOn::upload(&k, &cfg, &dtl_swin::SwinWeights::random(&cfg, 0)).unwrap();
    /// assert_eq!(swin.workspace(&k, 1).unwrap().batch(), 1);
    /// ```
    pub fn batch(&self) -> usize {
        self.batch
    }
}

impl<K: Kernels> std::fmt::Debug for SwinWorkspace<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SwinWorkspace(batch {})", self.batch)
    }
}

/// Host-side blocks with their dense biases: what both upload paths start from.
struct Prepared {
    blocks: Vec<(SwinBlockWeights, Vec<f32>, usize)>,
}

fn prepare(cfg: &SwinConfig, weights: SwinWeights) -> Result<(Prepared, SwinWeights)> {
    weights.check(cfg)?;
    let mut w = weights;
    let blocks = std::mem::take(&mut w.blocks)
        .into_iter()
        .enumerate()
        .map(|(i, b)| {
            let (s, _) = cfg.locate(i).unwrap_or((0, 0));
            let (bias, groups) = score_bias(
                &b.rel_table,
                cfg.heads[s],
                cfg.resolution(s),
                cfg.stage_window(s),
                cfg.shift_of(i),
            );
            (b, bias, groups)
        })
        .collect();
    Ok((Prepared { blocks }, w))
}

impl<K: Kernels> SwinOn<K> {
    /// Uploads `weights` (checked against `cfg`) to the device of `k`, building each block's
    /// dense score bias. Every weight is frozen ([`Kernels::upload_frozen`]: rounded once to
    /// bf16 on a device opened for bf16) but the score bias, which stays f32; the workspaces
    /// hold activations ([`Kernels::alloc_act`]).
    ///
    /// [`Kernels::upload_frozen`]: dtl_kernels::Kernels::upload_frozen
    /// [`Kernels::alloc_act`]: dtl_kernels::Kernels::alloc_act
    ///
    /// ```
    /// let cfg = dtl_swin::SwinConfig::new("toy", 16, 2, 8, &[2, 2], &[1, 2], 4);
    /// let mut w = dtl_swin::SwinWeights::random(&cfg, 0);
    /// let k = dtl_kernels::CpuKernels::new();
    /// assert!(dtl_swin::SwinOn::upload(&k, &cfg, &w).is_ok());
    /// w.merges[0].reduction_w.pop();
    /// let e = dtl_swin::SwinOn::upload(&k, &cfg, &w).unwrap_err().to_string();
    /// assert!(e.contains("layers.1.downsample.reduction.weight"), "{e}");
    /// ```
    pub fn upload(k: &K, cfg: &SwinConfig, weights: &SwinWeights) -> Result<Self> {
        let (prep, w) = prepare(cfg, weights.clone())?;
        let eps = cfg.spec().norm_eps as f32;
        // Frozen weights at the device's precision; the dense score bias stays f32 (below).
        let up = |v: &[f32]| k.upload_frozen(v);
        let blocks = prep
            .blocks
            .into_iter()
            .map(|(b, bias, groups)| {
                let (pairs, table) = b.into_parts();
                Ok(BlockOn {
                    w: pairs.upload(k)?,
                    // f32 whatever the precision: the bias is added to the scores before the
                    // softmax, as PyTorch's autocast adds timm's f32 relative-position table to
                    // the bf16 scores in f32; a bf16 bias would round the table to 3 digits.
                    bias: k.upload_new(&bias)?,
                    groups,
                    table,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let merges = w
            .merges
            .iter()
            .map(|m| {
                Ok(MergeOn {
                    norm_w: up(&m.norm_w)?,
                    norm_b: up(&m.norm_b)?,
                    reduction_w: up(&m.reduction_w)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(SwinOn {
            cfg: cfg.clone(),
            spec: cfg.spec(),
            patch_w: up(&w.patch_w)?,
            patch_b: up(&w.patch_b)?,
            patch_norm: NormOn::upload(k, &w.patch_norm_w, &w.patch_norm_b, eps)?,
            blocks,
            merges,
            norm: NormOn::upload(k, &w.norm_w, &w.norm_b, eps)?,
        })
    }

    /// The variant's hyper-parameters.
    ///
    /// ```
    /// let cfg = dtl_swin::SwinConfig::new("toy", 16, 2, 8, &[2, 2], &[1, 2], 4);
    /// let swin = dtl_swin::SwinOn::from_weights(&cfg, dtl_swin::SwinWeights::random(&cfg, 0)).unwrap();
    /// assert_eq!(swin.config().window, 4);
    /// ```
    pub fn config(&self) -> &SwinConfig {
        &self.cfg
    }

    /// The variant's numbers.
    ///
    /// ```
    /// let cfg = dtl_swin::SwinConfig::new("toy", 16, 2, 8, &[2, 2], &[1, 2], 4);
    /// let swin = dtl_swin::SwinOn::from_weights(&cfg, dtl_swin::SwinWeights::random(&cfg, 0)).unwrap();
    /// assert_eq!(swin.spec().stages.len(), 2);
    /// ```
    pub fn spec(&self) -> &BackboneSpec {
        &self.spec
    }

    /// The weights, copied back to the host.
    ///
    /// ```
    /// let cfg = dtl_swin::SwinConfig::new("toy", 16, 2, 8, &[2, 2], &[1, 2], 4);
    /// let w = dtl_swin::SwinWeights::random(&cfg, 0);
    /// let k = dtl_kernels::CpuKernels::new();
    /// let swin = dtl_swin::SwinOn::upload(&k, &cfg, &w).unwrap();
    /// assert_eq!(swin.download(&k).unwrap(), w);
    /// ```
    pub fn download(&self, k: &K) -> Result<SwinWeights> {
        let c = &self.cfg;
        let (c0, p) = (c.embed_dim, c.patch_size);
        let mut blocks = Vec::new();
        for (i, b) in self.blocks.iter().enumerate() {
            let g = self.geo(i)?;
            let (d, h) = (g.width, g.hidden);
            let pairs = b.w.download(k, d, h)?;
            blocks.push(SwinBlockWeights::from_parts(pairs, b.table.clone()));
        }
        let merges = self
            .merges
            .iter()
            .enumerate()
            .map(|(s, m)| {
                let cin = c.width(s);
                Ok(MergeWeights {
                    norm_w: k.download(&m.norm_w, 4 * cin)?,
                    norm_b: k.download(&m.norm_b, 4 * cin)?,
                    reduction_w: k.download(&m.reduction_w, 8 * cin * cin)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let patch_w = k.download(&self.patch_w, c0 * c.in_chans * p * p)?;
        let patch_b = k.download(&self.patch_b, c0)?;
        let (patch_norm_w, patch_norm_b) = self.patch_norm.download(k)?;
        let (norm_w, norm_b) = self.norm.download(k)?;
        Ok(SwinWeights {
            patch_w,
            patch_b,
            patch_norm_w,
            patch_norm_b,
            blocks,
            merges,
            norm_w,
            norm_b,
        })
    }

    /// Replaces the dense score bias of block `block` with `bias` of `groups` groups (see
    /// [`score_bias`]): for ablations and alternative position biases. The bias must hold
    /// `groups x heads x T x T` values for the block's window of `T` tokens, and `groups` must
    /// be 1 or the number of windows of the block's stage.
    ///
    /// ```
    /// use dtl_kernels::CpuKernels;
    /// let cfg = dtl_swin::SwinConfig::new("toy", 16, 2, 8, &[2, 2], &[1, 2], 4);
    /// let k = CpuKernels::new();
    /// let mut swin = dtl_swin::SwinOn::upload(&k, &cfg, &dtl_swin::SwinWeights::random(&cfg, 0)).unwrap();
    /// // block 1 (shifted) without its mask: the relative-position bias alone, one group
    /// let (bias, groups) = dtl_swin::score_bias(&[0.0; 49], 1, 8, 4, 0);
    /// swin.with_block_bias(&k, 1, &bias, groups).unwrap();
    /// assert!(swin.with_block_bias(&k, 1, &bias[1..], groups).is_err());
    /// ```
    pub fn with_block_bias(
        &mut self,
        k: &K,
        block: usize,
        bias: &[f32],
        groups: usize,
    ) -> Result<()> {
        let g = self.geo(block)?;
        let nw = (g.res / g.window) * (g.res / g.window);
        let t = g.window * g.window;
        if (groups != 1 && groups != nw) || bias.len() != groups * g.heads * t * t {
            return Err(DtlError::shape(format!(
                "{}: block {block} takes a score bias of 1 or {nw} groups of {} heads x {t} x {t} values; {} values in {groups} groups given",
                self.cfg.name,
                g.heads,
                bias.len()
            )));
        }
        let blk = &mut self.blocks[block];
        blk.bias = k.upload_new(bias)?;
        blk.groups = groups;
        Ok(())
    }

    fn geo(&self, block: usize) -> Result<Geo> {
        let (s, _) = self.cfg.locate(block).ok_or_else(|| {
            DtlError::argument(format!(
                "{}: block {block} does not exist (the variant has {} blocks)",
                self.cfg.name,
                self.blocks.len()
            ))
        })?;
        let width = self.cfg.width(s);
        Ok(Geo {
            width,
            heads: self.cfg.heads[s],
            hidden: self.cfg.mlp_ratio * width,
            res: self.cfg.resolution(s),
            window: self.cfg.stage_window(s),
            shift: self.cfg.shift_of(block),
        })
    }

    fn check_batch(&self, ws: &SwinWorkspace<K>, batch: usize) -> Result<()> {
        check_batch(&self.cfg.name, ws.batch, batch)
    }

    fn merge(&self, stage: usize) -> Result<&MergeOn<K>> {
        if stage == 0 {
            return Err(DtlError::argument(format!(
                "{}: stage 0 has no transition into it (it starts from the patch embedding)",
                self.cfg.name
            )));
        }
        self.merges.get(stage - 1).ok_or_else(|| {
            DtlError::argument(format!(
                "{}: stage {stage} does not exist (the variant has {} stages)",
                self.cfg.name,
                self.cfg.stages()
            ))
        })
    }

    /// A call of block `block` on `k` for a batch of `batch` on `ws` with drop-path scales
    /// `drop`.
    fn placed<'a>(
        &'a self,
        k: &'a K,
        ws: &SwinWorkspace<K>,
        block: usize,
        batch: usize,
        drop: Option<&'a DropScales<K>>,
    ) -> Result<At<'a, K>> {
        self.check_batch(ws, batch)?;
        let g = self.geo(block)?;
        let blk = &self.blocks[block];
        let eps = self.spec.norm_eps as f32;
        // every branch joins through `add_scaled`, with or without drop path
        let joins = Residual::Scaled;
        let (tokens, width, hidden) = (g.tokens(), g.width, g.hidden);
        let c = BlockCall::new(k, &blk.w, batch, tokens, width, hidden, eps, drop, joins);
        Ok(At { c, blk, g })
    }

    /// The transition into stage `stage` for a batch of `batch` on `ws`: its weights and its
    /// geometry.
    fn transition(
        &self,
        ws: &SwinWorkspace<K>,
        stage: usize,
        batch: usize,
    ) -> Result<(&MergeOn<K>, Merge)> {
        self.check_batch(ws, batch)?;
        let m = self.merge(stage)?;
        let (cin, r) = (self.cfg.width(stage - 1), self.cfg.resolution(stage - 1));
        let shape = MergeShape {
            batch,
            grid: (r, r),
            width: cin,
        };
        let rows = batch * (r / 2) * (r / 2);
        Ok((m, Merge { shape, rows, cin }))
    }

    /// The largest buffers of every block for batches of `batch`, the attention's scratch
    /// measured by `scratch`.
    fn largest(&self, batch: usize, scratch: impl Fn(AttnShape) -> usize) -> Result<Largest> {
        let p = |dims: &[usize]| dtl_kernels::checked_product(&self.cfg.name, dims);
        let mut l = Largest {
            act: 0,
            qkv: 0,
            u: 0,
            g: 0,
            scratch: 0,
        };
        for i in 0..self.blocks.len() {
            let geo = self.geo(i)?;
            let rows = p(&[batch, geo.tokens()])?;
            l.act = l.act.max(p(&[rows, geo.width])?);
            l.qkv = l.qkv.max(p(&[rows, 3 * geo.width])?);
            l.u = l.u.max(p(&[rows, geo.hidden])?);
            l.g = l.g.max(p(&[rows, geo.hidden.max(3 * geo.width)])?);
            l.scratch = l.scratch.max(scratch(geo.attn(batch)));
        }
        Ok(l)
    }
}

impl<K: Kernels> At<'_, K> {
    /// `x1 = x + s_attn * attention branch(x)` into `x1`, the fused q, k, v into `qkv`.
    fn attn_half(
        &self,
        ws: &mut Scratch<K>,
        qkv: &mut K::Buf,
        x: &K::Buf,
        x1: &mut K::Buf,
    ) -> Result<()> {
        let At { c, blk, g } = *self;
        let (k, w) = (c.k, c.w);
        let (batch, rows, eps) = (c.batch, c.rows(), c.eps);
        let (n, d) = (g.tokens(), g.width);
        k.layer_norm(x, &w.norm1_w, &w.norm1_b, rows, d, eps, &mut ws.h)?;
        k.window_partition(&ws.h, g.windows(batch), &mut ws.a)?;
        k.linear(&ws.a, &w.qkv_w, Some(&w.qkv_b), rows, d, 3 * d, qkv, false)?;
        k.attention_bias(
            qkv,
            g.attn(batch),
            &blk.bias,
            blk.groups,
            &mut ws.h,
            &mut ws.scratch,
        )?;
        k.linear(
            &ws.h,
            &w.proj_w,
            Some(&w.proj_b),
            rows,
            d,
            d,
            &mut ws.a,
            false,
        )?;
        k.window_merge(&ws.a, g.windows(batch), &mut ws.h)?;
        k.copy(x, x1, rows * d)?;
        k.add_scaled(x1, &ws.h, batch, n * d, c.scales(Branch::Attn))
    }

    /// The block's VJP from its internals `x1`, `qkv` and `u`; without `u`, the MLP
    /// pre-activation is recomputed into `spare`.
    #[allow(clippy::too_many_arguments)]
    fn vjp_from(
        &self,
        s: &mut Scratch<K>,
        spare: &mut K::Buf,
        x: &K::Buf,
        (x1, qkv, u): (&K::Buf, &K::Buf, Option<&K::Buf>),
        dy: &K::Buf,
        dx: &mut K::Buf,
    ) -> Result<()> {
        let At { c, blk, g } = *self;
        let (k, w) = (c.k, c.w);
        let (batch, rows, eps) = (c.batch, c.rows(), c.eps);
        let d = g.width;
        // MLP branch: dx1 = dy + LN2'(x1)^T fc1^T (gelu'(u) fc2^T (s_mlp dy))
        c.mlp_vjp_saved(s.mlp(), x1, u, spare, dy, dx)?;
        // attention branch: windows of s_attn dx1, back through proj, attention, qkv
        let da = c.branch_grad(dx, Branch::Attn, &mut s.a)?;
        k.window_partition(da, g.windows(batch), &mut s.t)?;
        k.linear_vjp(&s.t, &w.proj_w, rows, d, d, &mut s.h, false)?;
        k.attention_bias_vjp(
            qkv,
            &s.h,
            g.attn(batch),
            &blk.bias,
            blk.groups,
            &mut s.g,
            &mut s.scratch,
        )?;
        k.linear_vjp(&s.g, &w.qkv_w, rows, d, 3 * d, &mut s.t, false)?;
        k.window_merge(&s.t, g.windows(batch), &mut s.h)?;
        k.layer_norm_vjp(x, &w.norm1_w, &s.h, rows, d, eps, dx, true)
    }
}

impl<K: Kernels> Scratch<K> {
    /// The scratch of a block's MLP half.
    fn mlp(&mut self) -> BlockScratch<'_, K> {
        BlockScratch {
            h: &mut self.h,
            a: &mut self.a,
            g: &mut self.g,
        }
    }
}

impl SwinOn<dtl_kernels::CpuKernels> {
    /// The weights as CPU buffers, taking over their allocations.
    ///
    /// ```
    /// let cfg = dtl_swin::SwinConfig::new("toy", 16, 2, 8, &[2, 2], &[1, 2], 4);
    /// let swin = dtl_swin::SwinOn::from_weights(&cfg, dtl_swin::SwinWeights::random(&cfg, 0)).unwrap();
    /// assert_eq!(swin.spec().name, "toy");
    /// ```
    pub fn from_weights(cfg: &SwinConfig, weights: SwinWeights) -> Result<Self> {
        use dtl_kernels::CpuBuf;
        let (prep, w) = prepare(cfg, weights)?;
        let eps = cfg.spec().norm_eps as f32;
        let own = CpuBuf::from_vec;
        let blocks = prep
            .blocks
            .into_iter()
            .map(|(b, bias, groups)| {
                let (pairs, table) = b.into_parts();
                BlockOn {
                    w: pairs.map(own),
                    bias: own(bias),
                    groups,
                    table,
                }
            })
            .collect();
        let merges = w
            .merges
            .into_iter()
            .map(|m| MergeOn {
                norm_w: own(m.norm_w),
                norm_b: own(m.norm_b),
                reduction_w: own(m.reduction_w),
            })
            .collect();
        Ok(SwinOn {
            cfg: cfg.clone(),
            spec: cfg.spec(),
            patch_w: own(w.patch_w),
            patch_b: own(w.patch_b),
            patch_norm: NormOn {
                w: own(w.patch_norm_w),
                b: own(w.patch_norm_b),
                width: cfg.embed_dim,
                eps,
            },
            blocks,
            merges,
            norm: NormOn {
                w: own(w.norm_w),
                b: own(w.norm_b),
                width: cfg.width(cfg.stages() - 1),
                eps,
            },
        })
    }
}

#[allow(clippy::too_many_arguments)]
impl<K: Kernels> KernelBackbone<K> for SwinOn<K> {
    type Workspace = SwinWorkspace<K>;

    fn spec(&self) -> &BackboneSpec {
        &self.spec
    }

    fn workspace(&self, k: &K, batch: usize) -> Result<SwinWorkspace<K>> {
        let Largest {
            act,
            qkv,
            u,
            g,
            scratch,
        } = self.largest(batch, |a| k.attention_scratch(a))?;
        let c = &self.cfg;
        let patches = c.resolution(0) * c.resolution(0);
        let cols = dtl_kernels::checked_product(
            &c.name,
            &[batch, patches, c.in_chans * c.patch_size * c.patch_size],
        )?;
        Ok(SwinWorkspace {
            batch,
            x1: k.alloc_act(act)?,
            qkv: k.alloc_act(qkv)?,
            u: k.alloc_act(u)?,
            s: Scratch {
                h: k.alloc_act(act)?,
                a: k.alloc_act(act)?,
                t: k.alloc_act(act)?,
                g: k.alloc_act(g.max(cols))?,
                scratch: k.alloc_act(scratch)?,
            },
        })
    }

    fn embed(
        &self,
        k: &K,
        ws: &mut SwinWorkspace<K>,
        images: &K::Buf,
        batch: usize,
        out: &mut K::Buf,
    ) -> Result<()> {
        self.check_batch(ws, batch)?;
        let c = &self.cfg;
        let (ci, p, d) = (c.in_chans, c.patch_size, c.embed_dim);
        let np = c.resolution(0) * c.resolution(0);
        k.patchify(images, batch, ci, c.image_size, p, &mut ws.s.g)?;
        k.linear(
            &ws.s.g,
            &self.patch_w,
            Some(&self.patch_b),
            batch * np,
            ci * p * p,
            d,
            &mut ws.s.h,
            false,
        )?;
        self.patch_norm.forward(k, &ws.s.h, batch * np, out)
    }

    fn block_forward(
        &self,
        k: &K,
        ws: &mut SwinWorkspace<K>,
        block: usize,
        x: &K::Buf,
        batch: usize,
        drop: Option<&DropScales<K>>,
        out: &mut K::Buf,
    ) -> Result<()> {
        let at = self.placed(k, ws, block, batch, drop)?;
        let s = &mut ws.s;
        at.attn_half(s, &mut ws.qkv, x, out)?;
        at.c.mlp_half(s.mlp(), &mut ws.u, out)
    }

    fn block_vjp(
        &self,
        k: &K,
        ws: &mut SwinWorkspace<K>,
        block: usize,
        x: &K::Buf,
        dy: &K::Buf,
        batch: usize,
        drop: Option<&DropScales<K>>,
        dx: &mut K::Buf,
    ) -> Result<()> {
        let at = self.placed(k, ws, block, batch, drop)?;
        // recompute x1 and qkv here, the MLP pre-activation in the VJP
        let s = &mut ws.s;
        at.attn_half(s, &mut ws.qkv, x, &mut ws.x1)?;
        at.vjp_from(s, &mut ws.u, x, (&ws.x1, &ws.qkv, None), dy, dx)
    }

    /// `x1` (rows x C), `qkv` (rows x 3C), `u` (rows x hidden), each for the largest stage.
    fn saved_lens(&self, batch: usize) -> Result<Vec<usize>> {
        let l = self.largest(batch, |_| 0)?;
        Ok(vec![l.act, l.qkv, l.u])
    }

    fn block_forward_saving(
        &self,
        k: &K,
        ws: &mut SwinWorkspace<K>,
        block: usize,
        x: &K::Buf,
        batch: usize,
        drop: Option<&DropScales<K>>,
        out: &mut K::Buf,
        saved: &mut [K::Buf],
    ) -> Result<()> {
        let at = self.placed(k, ws, block, batch, drop)?;
        let (x1, qkv, u) = saved_mut(&self.cfg.name, saved)?;
        let s = &mut ws.s;
        at.attn_half(s, qkv, x, x1)?;
        // without a kept `u`, the MLP pre-activation lives in the workspace
        let u = u.unwrap_or(&mut ws.u);
        at.c.mlp_half_from(s.mlp(), x1, u, out)
    }

    fn block_vjp_saved(
        &self,
        k: &K,
        ws: &mut SwinWorkspace<K>,
        block: usize,
        x: &K::Buf,
        dy: &K::Buf,
        batch: usize,
        drop: Option<&DropScales<K>>,
        saved: &[K::Buf],
        dx: &mut K::Buf,
    ) -> Result<()> {
        let at = self.placed(k, ws, block, batch, drop)?;
        // without a kept `u`, the MLP pre-activation alone is recomputed
        let internals = saved_ref(&self.cfg.name, saved)?;
        at.vjp_from(&mut ws.s, &mut ws.u, x, internals, dy, dx)
    }

    fn stage_forward(
        &self,
        k: &K,
        ws: &mut SwinWorkspace<K>,
        stage: usize,
        x: &K::Buf,
        batch: usize,
        out: &mut K::Buf,
    ) -> Result<()> {
        let (m, Merge { shape, rows, cin }) = self.transition(ws, stage, batch)?;
        let eps = self.spec.norm_eps as f32;
        k.patch_merge(x, shape, &mut ws.s.h)?;
        k.layer_norm(
            &ws.s.h,
            &m.norm_w,
            &m.norm_b,
            rows,
            4 * cin,
            eps,
            &mut ws.s.a,
        )?;
        k.linear(
            &ws.s.a,
            &m.reduction_w,
            None,
            rows,
            4 * cin,
            2 * cin,
            out,
            false,
        )
    }

    fn stage_vjp(
        &self,
        k: &K,
        ws: &mut SwinWorkspace<K>,
        stage: usize,
        x: &K::Buf,
        dy: &K::Buf,
        batch: usize,
        dx: &mut K::Buf,
    ) -> Result<()> {
        let (m, Merge { shape, rows, cin }) = self.transition(ws, stage, batch)?;
        let eps = self.spec.norm_eps as f32;
        k.linear_vjp(
            dy,
            &m.reduction_w,
            rows,
            4 * cin,
            2 * cin,
            &mut ws.s.a,
            false,
        )?;
        k.patch_merge(x, shape, &mut ws.s.h)?;
        k.layer_norm_vjp(
            &ws.s.h,
            &m.norm_w,
            &ws.s.a,
            rows,
            4 * cin,
            eps,
            &mut ws.s.t,
            false,
        )?;
        k.patch_merge_vjp(&ws.s.t, shape, dx)
    }

    fn norm_forward(&self, k: &K, x: &K::Buf, rows: usize, out: &mut K::Buf) -> Result<()> {
        self.norm.forward(k, x, rows, out)
    }

    fn norm_vjp(&self, k: &K, x: &K::Buf, dy: &K::Buf, rows: usize, dx: &mut K::Buf) -> Result<()> {
        self.norm.vjp(k, x, dy, rows, dx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dtl_kernels::CpuKernels;

    /// Keeping a block's internals changes neither its output nor its input gradient.
    #[test]
    fn saved_internals_give_the_recomputed_vjp() {
        let cfg = SwinConfig::new("toy", 16, 2, 8, &[2, 2], &[1, 2], 4);
        let k = CpuKernels::new();
        let swin = SwinOn::upload(&k, &cfg, &SwinWeights::random(&cfg, 3)).unwrap();
        let batch = 3;
        let mut ws = swin.workspace(&k, batch).unwrap();
        let mut drop = DropScales::alloc(&k, batch).unwrap();
        let dp = dtl_core::DropPath {
            attn: vec![0.0, 2.0, 2.0],
            mlp: vec![2.0, 0.0, 2.0],
        };
        drop.set(&k, &dp).unwrap();
        let lens = KernelBackbone::<CpuKernels>::saved_lens(&swin, batch).unwrap();
        assert_eq!(lens.len(), 3);
        for (block, act) in [(1, batch * 64 * 8), (2, batch * 16 * 16)] {
            let x: Vec<f32> = (0..act)
                .map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0)
                .collect();
            let dy: Vec<f32> = (0..act)
                .map(|i| ((i * 13 % 29) as f32 / 14.0) - 1.0)
                .collect();
            let (x, dy) = (k.upload_new(&x).unwrap(), k.upload_new(&dy).unwrap());
            for d in [None, Some(&drop)] {
                let (mut y1, mut y2) = (k.alloc(act).unwrap(), k.alloc(act).unwrap());
                let (mut dx1, mut dx2) = (k.alloc(act).unwrap(), k.alloc(act).unwrap());
                swin.block_forward(&k, &mut ws, block, &x, batch, d, &mut y1)
                    .unwrap();
                swin.block_vjp(&k, &mut ws, block, &x, &dy, batch, d, &mut dx1)
                    .unwrap();
                let mut saved: Vec<_> = lens.iter().map(|&n| k.alloc(n).unwrap()).collect();
                swin.block_forward_saving(&k, &mut ws, block, &x, batch, d, &mut y2, &mut saved)
                    .unwrap();
                // the workspace is overwritten in between, as in a training step
                swin.block_forward(&k, &mut ws, block, &dy, batch, None, &mut dx2)
                    .unwrap();
                swin.block_vjp_saved(&k, &mut ws, block, &x, &dy, batch, d, &saved, &mut dx2)
                    .unwrap();
                assert_eq!(k.download(&y1, act).unwrap(), k.download(&y2, act).unwrap());
                assert_eq!(
                    k.download(&dx1, act).unwrap(),
                    k.download(&dx2, act).unwrap()
                );
                // keeping x1 and qkv alone gives the same values
                let (mut y3, mut dx3) = (k.alloc(act).unwrap(), k.alloc(act).unwrap());
                let part = &mut saved[..2];
                swin.block_forward_saving(&k, &mut ws, block, &x, batch, d, &mut y3, part)
                    .unwrap();
                swin.block_forward(&k, &mut ws, block, &dy, batch, None, &mut dx3)
                    .unwrap();
                swin.block_vjp_saved(&k, &mut ws, block, &x, &dy, batch, d, &saved[..2], &mut dx3)
                    .unwrap();
                assert_eq!(k.download(&y1, act).unwrap(), k.download(&y3, act).unwrap());
                assert_eq!(
                    k.download(&dx1, act).unwrap(),
                    k.download(&dx3, act).unwrap()
                );
                let e = swin
                    .block_vjp_saved(&k, &mut ws, block, &x, &dy, batch, d, &saved[..1], &mut dx2)
                    .unwrap_err()
                    .to_string();
                assert!(e.contains("3 buffers"), "{e}");
            }
        }
    }
}
