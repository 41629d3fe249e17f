//! A Swin backbone's frozen weights on the host, in timm's layouts.

use dtl_core::{DtlError, Result};
use dtl_kernels::block::{check_tensor_len, PreNorm};
use rand::{Rng, SeedableRng};

use crate::SwinConfig;

/// One Swin block's weights (timm `SwinTransformerBlock`), PyTorch layouts: linear weights
/// `(out, in)`, the relative-position bias table `((2 w - 1)^2, heads)` for the block's
/// window `w`.
///
/// ```
/// let c = dtl_swin::SwinConfig::new("t", 32, 2, 16, &[2, 2, 2, 2], &[1, 2, 2, 4], 4);
/// let b = &dtl_swin::SwinWeights::random(&c, 0).blocks[0];
/// assert_eq!((b.qkv_w.len(), b.rel_table.len()), (3 * 16 * 16, 49));
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct SwinBlockWeights {
    /// `norm1.weight`.
    pub norm1_w: Vec<f32>,
    /// `norm1.bias`.
    pub norm1_b: Vec<f32>,
    /// `attn.qkv.weight` `(3 C, C)`.
    pub qkv_w: Vec<f32>,
    /// `attn.qkv.bias`.
    pub qkv_b: Vec<f32>,
    /// `attn.proj.weight` `(C, C)`.
    pub proj_w: Vec<f32>,
    /// `attn.proj.bias`.
    pub proj_b: Vec<f32>,
    /// `attn.relative_position_bias_table` `((2 w - 1)^2, heads)`.
    pub rel_table: Vec<f32>,
    /// `norm2.weight`.
    pub norm2_w: Vec<f32>,
    /// `norm2.bias`.
    pub norm2_b: Vec<f32>,
    /// `mlp.fc1.weight` `(hidden, C)`.
    pub fc1_w: Vec<f32>,
    /// `mlp.fc1.bias`.
    pub fc1_b: Vec<f32>,
    /// `mlp.fc2.weight` `(C, hidden)`.
    pub fc2_w: Vec<f32>,
    /// `mlp.fc2.bias`.
    pub fc2_b: Vec<f32>,
}

impl SwinBlockWeights {
    /// The norm/linear pairs, borrowed.
    pub(crate) fn pre_norm(&self) -> PreNorm<&[f32]> {
        PreNorm {
            norm1_w: &self.norm1_w,
            norm1_b: &self.norm1_b,
            qkv_w: &self.qkv_w,
            qkv_b: &self.qkv_b,
            proj_w: &self.proj_w,
            proj_b: &self.proj_b,
            norm2_w: &self.norm2_w,
            norm2_b: &self.norm2_b,
            fc1_w: &self.fc1_w,
            fc1_b: &self.fc1_b,
            fc2_w: &self.fc2_w,
            fc2_b: &self.fc2_b,
        }
    }

    /// The norm/linear pairs and the relative-position bias table.
    pub(crate) fn into_parts(self) -> (PreNorm<Vec<f32>>, Vec<f32>) {
        let SwinBlockWeights {
            norm1_w,
            norm1_b,
            qkv_w,
            qkv_b,
            proj_w,
            proj_b,
            rel_table,
            norm2_w,
            norm2_b,
            fc1_w,
            fc1_b,
            fc2_w,
            fc2_b,
        } = self;
        let pairs = PreNorm {
            norm1_w,
            norm1_b,
            qkv_w,
            qkv_b,
            proj_w,
            proj_b,
            norm2_w,
            norm2_b,
            fc1_w,
            fc1_b,
            fc2_w,
            fc2_b,
        };
        (pairs, rel_table)
    }

    /// The block from its norm/linear pairs and its relative-position bias table.
    pub(crate) fn from_parts(pairs: PreNorm<Vec<f32>>, rel_table: Vec<f32>) -> Self {
        let PreNorm {
            norm1_w,
            norm1_b,
            qkv_w,
            qkv_b,
            proj_w,
            proj_b,
            norm2_w,
            norm2_b,
            fc1_w,
            fc1_b,
            fc2_w,
            fc2_b,
        } = pairs;
        SwinBlockWeights {
            norm1_w,
            norm1_b,
            qkv_w,
            qkv_b,
            proj_w,
            proj_b,
            rel_table,
            norm2_w,
            norm2_b,
            fc1_w,
            fc1_b,
            fc2_w,
            fc2_b,
        }
    }
}

/// The patch merging of the transition into a stage (timm 1.0's `layers.<s>.downsample`):
/// LayerNorm over `4 C` then a bias-free `Linear(4 C -> 2 C)`, `C` the previous stage's width.
///
/// ```
/// let c = dtl_swin::SwinConfig::new("t", 32, 2, 16, &[2, 2, 2, 2], &[1, 2, 2, 4], 4);
/// let m = &dtl_swin::SwinWeights::random(&c, 0).merges[0];
/// assert_eq!((m.norm_w.len(), m.reduction_w.len()), (64, 32 * 64));
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct MergeWeights {
    /// `downsample.norm.weight` `(4 C)`.
    pub norm_w: Vec<f32>,
    /// `downsample.norm.bias` `(4 C)`.
    pub norm_b: Vec<f32>,
    /// `downsample.reduction.weight` `(2 C, 4 C)`.
    pub reduction_w: Vec<f32>,
}

/// A Swin backbone's frozen weights on the host: patch embedding (a stride-`patch` conv and
/// its LayerNorm), the blocks in global order, the patch mergings (`merges[s - 1]` is the
/// transition into stage `s`) and the final LayerNorm.
///
/// Build one with [`SwinWeights::random`], [`load_weights`](crate::load_weights) or
/// [`SwinWeights::from_tensors`].
///
/// ```
/// let c = dtl_swin::SwinConfig::new("t", 32, 2, 16, &[2, 2, 2, 2], &[1, 2, 2, 4], 4);
/// let w = dtl_swin::SwinWeights::random(&c, 0);
/// assert_eq!((w.blocks.len(), w.merges.len(), w.norm_w.len()), (8, 3, 128));
/// assert!(w.check(&c).is_ok());
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct SwinWeights {
    /// `patch_embed.proj.weight` `(C0, in_chans, p, p)`.
    pub patch_w: Vec<f32>,
    /// `patch_embed.proj.bias`.
    pub patch_b: Vec<f32>,
    /// `patch_embed.norm.weight`.
    pub patch_norm_w: Vec<f32>,
    /// `patch_embed.norm.bias`.
    pub patch_norm_b: Vec<f32>,
    /// The blocks, globally numbered.
    pub blocks: Vec<SwinBlockWeights>,
    /// The transitions into stages 1.. (one fewer than the stages).
    pub merges: Vec<MergeWeights>,
    /// `norm.weight` (last width).
    pub norm_w: Vec<f32>,
    /// `norm.bias`.
    pub norm_b: Vec<f32>,
}

/// `n` values of a normal of standard deviation `std` truncated to two deviations.
fn trunc_normal(rng: &mut impl Rng, n: usize, std: f32) -> Vec<f32> {
    (0..n)
        .map(|_| loop {
            // Box-Muller
            let (u, v): (f32, f32) = (rng.gen_range(1e-7..1.0), rng.gen());
            let z = (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos();
            if z.abs() <= 2.0 {
                break z * std;
            }
        })
        .collect()
}

impl SwinWeights {
    /// timm-like random weights from `seed` (truncated normal 0.02 for the linear layers and
    /// the bias tables, unit LayerNorms, zero biases): for tests and benchmarks.
    ///
    /// ```
    /// let c = dtl_swin::SwinConfig::new("t", 32, 2, 16, &[2, 2], &[1, 2], 4);
    /// assert_eq!(dtl_swin::SwinWeights::random(&c, 1), dtl_swin::SwinWeights::random(&c, 1));
    /// ```
    pub fn random(cfg: &SwinConfig, seed: u64) -> Self {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut tn = |n: usize| trunc_normal(&mut rng, n, 0.02);
        let c0 = cfg.embed_dim;
        let p = cfg.patch_size;
        let patch_w = tn(c0 * cfg.in_chans * p * p);
        let mut blocks = Vec::new();
        let mut merges = Vec::new();
        for s in 0..cfg.stages() {
            let c = cfg.width(s);
            let h = cfg.mlp_ratio * c;
            if s > 0 {
                let cin = cfg.width(s - 1);
                merges.push(MergeWeights {
                    norm_w: vec![1.0; 4 * cin],
                    norm_b: vec![0.0; 4 * cin],
                    reduction_w: tn(2 * cin * 4 * cin),
                });
            }
            for _ in 0..cfg.depths[s] {
                blocks.push(SwinBlockWeights {
                    norm1_w: vec![1.0; c],
                    norm1_b: vec![0.0; c],
                    qkv_w: tn(3 * c * c),
                    qkv_b: vec![0.0; 3 * c],
                    proj_w: tn(c * c),
                    proj_b: vec![0.0; c],
                    rel_table: tn(cfg.table_len(s) * cfg.heads[s]),
                    norm2_w: vec![1.0; c],
                    norm2_b: vec![0.0; c],
                    fc1_w: tn(h * c),
                    fc1_b: vec![0.0; h],
                    fc2_w: tn(c * h),
                    fc2_b: vec![0.0; c],
                });
            }
        }
        let cl = cfg.width(cfg.stages().saturating_sub(1));
        SwinWeights {
            patch_w,
            patch_b: vec![0.0; c0],
            patch_norm_w: vec![1.0; c0],
            patch_norm_b: vec![0.0; c0],
            blocks,
            merges,
            norm_w: vec![1.0; cl],
            norm_b: vec![0.0; cl],
        }
    }

    /// Checks every tensor's length against `cfg`; an error names the tensor (timm's name),
    /// the length found and the one expected.
    ///
    /// ```
    /// let c = dtl_swin::SwinConfig::new("t", 32, 2, 16, &[2, 2], &[1, 2], 4);
    /// let mut w = dtl_swin::SwinWeights::random(&c, 0);
    /// w.blocks[3].rel_table.pop();
    /// let e = w.check(&c).unwrap_err().to_string();
    /// assert!(e.contains("layers.1.blocks.1.attn.relative_position_bias_table"), "{e}");
    /// ```
    pub fn check(&self, cfg: &SwinConfig) -> Result<()> {
        cfg.check()?;
        let name = &cfg.name;
        let want = |key: &str, got: usize, n: usize| check_tensor_len(name, key, got, n);
        let (c0, p) = (cfg.embed_dim, cfg.patch_size);
        want(
            "patch_embed.proj.weight",
            self.patch_w.len(),
            c0 * cfg.in_chans * p * p,
        )?;
        want("patch_embed.proj.bias", self.patch_b.len(), c0)?;
        want("patch_embed.norm.weight", self.patch_norm_w.len(), c0)?;
        want("patch_embed.norm.bias", self.patch_norm_b.len(), c0)?;
        let depth: usize = cfg.depths.iter().sum();
        if self.blocks.len() != depth || self.merges.len() + 1 != cfg.stages() {
            return Err(DtlError::shape(format!(
                "{name}: {} blocks and {} patch mergings given, the variant has {depth} blocks and {} mergings",
                self.blocks.len(),
                self.merges.len(),
                cfg.stages() - 1
            )));
        }
        let mut g = 0;
        for s in 0..cfg.stages() {
            let c = cfg.width(s);
            let h = cfg.mlp_ratio * c;
            if s > 0 {
                let m = &self.merges[s - 1];
                let cin = cfg.width(s - 1);
                let k = |t: &str| format!("layers.{s}.downsample.{t}");
                want(&k("norm.weight"), m.norm_w.len(), 4 * cin)?;
                want(&k("norm.bias"), m.norm_b.len(), 4 * cin)?;
                want(&k("reduction.weight"), m.reduction_w.len(), 8 * cin * cin)?;
            }
            for j in 0..cfg.depths[s] {
                let b = &self.blocks[g];
                g += 1;
                let prefix = format!("layers.{s}.blocks.{j}.");
                b.pre_norm().check(name, &prefix, c, h)?;
                want(
                    &format!("{prefix}attn.relative_position_bias_table"),
                    b.rel_table.len(),
                    cfg.table_len(s) * cfg.heads[s],
                )?;
            }
        }
        let cl = cfg.width(cfg.stages() - 1);
        want("norm.weight", self.norm_w.len(), cl)?;
        want("norm.bias", self.norm_b.len(), cl)
    }
}
