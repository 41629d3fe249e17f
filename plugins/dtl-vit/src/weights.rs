//! The frozen parameters of a ViT, stored flat in PyTorch's layouts.

use dtl_core::{BackboneSpec, DtlError, Result};
use dtl_kernels::block::{check_tensor_len, PreNorm};
use rand::{Rng, SeedableRng};

/// Parameters of one transformer block, flat, in timm's (PyTorch) layouts: the block's
/// norm/linear pairs as host vectors ([`PreNorm`], whose fields name the tensors).
///
/// Linear weights are `(out, in)` row-major; `qkv_w` is timm's fused `(3 D, D)` matrix whose
/// output rows are `[q | k | v]`, each split into heads.
///
/// ```
/// let spec = dtl_core::BackboneSpec::vit("toy", 16, 8, 8, 1, 2);
/// let b = &dtl_vit::VitWeights::random(&spec, 0).blocks[0];
/// assert_eq!((b.qkv_w.len(), b.fc1_w.len()), (3 * 8 * 8, 32 * 8));
/// ```
pub type BlockWeights = PreNorm<Vec<f32>>;

/// Every frozen parameter of a ViT (no classifier head).
///
/// Build one with [`VitWeights::random`], [`load_weights`](crate::load_weights) or by
/// filling the fields yourself; [`VitWeights::check`] verifies every length against a spec.
///
/// ```
/// use dtl_core::BackboneSpec;
/// use dtl_vit::VitWeights;
/// let spec = BackboneSpec::vit("toy", 16, 8, 8, 1, 2);
/// let w = VitWeights::random(&spec, 0);
/// assert_eq!(w.pos_embed.len(), 5 * 8);
/// assert!(w.check(&spec).is_ok());
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct VitWeights {
    /// `patch_embed.proj.weight` flattened to (D, C * P * P), inner order (channel, row, column).
    pub patch_w: Vec<f32>,
    /// `patch_embed.proj.bias` (D).
    pub patch_b: Vec<f32>,
    /// `cls_token` (prefix tokens * D); empty without a class token.
    pub cls_token: Vec<f32>,
    /// `pos_embed` (tokens, D), prefix tokens first.
    pub pos_embed: Vec<f32>,
    /// The blocks in order.
    pub blocks: Vec<BlockWeights>,
    /// `norm.weight` (D).
    pub norm_w: Vec<f32>,
    /// `norm.bias` (D).
    pub norm_b: Vec<f32>,
}

/// Draws from N(0, std^2) truncated to two standard deviations.
fn trunc_normal(rng: &mut impl Rng, n: usize, std: f32) -> Vec<f32> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        // Box-Muller
        let u1: f32 = rng.gen::<f32>().max(f32::MIN_POSITIVE);
        let u2: f32 = rng.gen();
        let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos();
        if z.abs() <= 2.0 {
            out.push(z * std);
        }
    }
    out
}

impl VitWeights {
    /// Random weights in timm's style (truncated normal, std 0.02; LayerNorm ones and
    /// zeros; zero biases), reproducible from `seed`. For benchmarks and tests only.
    ///
    /// ```
    /// let spec = dtl_core::BackboneSpec::vit("toy", 16, 8, 8, 1, 2);
    /// assert_eq!(dtl_vit::VitWeights::random(&spec, 3), dtl_vit::VitWeights::random(&spec, 3));
    /// ```
    pub fn random(spec: &BackboneSpec, seed: u64) -> Self {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let d = spec.width;
        let hidden = spec.mlp_hidden;
        let patch = spec.in_chans * spec.patch_size * spec.patch_size;
        let mut tn = |n: usize| trunc_normal(&mut rng, n, 0.02);
        let patch_w = tn(d * patch);
        let cls_token = tn(spec.prefix_tokens * d);
        let pos_embed = tn(spec.tokens() * d);
        let blocks = (0..spec.depth)
            .map(|_| BlockWeights {
                norm1_w: vec![1.0; d],
                norm1_b: vec![0.0; d],
                qkv_w: tn(3 * d * d),
                qkv_b: vec![0.0; 3 * d],
                proj_w: tn(d * d),
                proj_b: vec![0.0; d],
                norm2_w: vec![1.0; d],
                norm2_b: vec![0.0; d],
                fc1_w: tn(hidden * d),
                fc1_b: vec![0.0; hidden],
                fc2_w: tn(d * hidden),
                fc2_b: vec![0.0; d],
            })
            .collect();
        VitWeights {
            patch_w,
            patch_b: vec![0.0; d],
            cls_token,
            pos_embed,
            blocks,
            norm_w: vec![1.0; d],
            norm_b: vec![0.0; d],
        }
    }

    /// Checks every tensor's length against `spec`; the error names the tensor (timm name).
    ///
    /// ```
    /// let spec = dtl_core::BackboneSpec::vit("toy", 16, 8, 8, 1, 2);
    /// let mut w = dtl_vit::VitWeights::random(&spec, 0);
    /// w.norm_b.pop();
    /// assert!(w.check(&spec).unwrap_err().to_string().contains("norm.bias"));
    /// ```
    pub fn check(&self, spec: &BackboneSpec) -> Result<()> {
        let d = spec.width;
        let hidden = spec.mlp_hidden;
        let patch = spec.in_chans * spec.patch_size * spec.patch_size;
        let checks = [
            ("patch_embed.proj.weight", self.patch_w.len(), d * patch),
            ("patch_embed.proj.bias", self.patch_b.len(), d),
            ("cls_token", self.cls_token.len(), spec.prefix_tokens * d),
            ("pos_embed", self.pos_embed.len(), spec.tokens() * d),
            ("norm.weight", self.norm_w.len(), d),
            ("norm.bias", self.norm_b.len(), d),
        ];
        if self.blocks.len() != spec.depth {
            return Err(DtlError::shape(format!(
                "{}: weights hold {} blocks, the variant has {}",
                spec.name,
                self.blocks.len(),
                spec.depth
            )));
        }
        for (name, len, want) in checks {
            check_tensor_len(&spec.name, name, len, want)?;
        }
        for (i, b) in self.blocks.iter().enumerate() {
            b.check(&spec.name, &format!("blocks.{i}."), d, hidden)?;
        }
        Ok(())
    }
}

/// Refuses a weights tensor of `file` holding a NaN or an Inf, naming the tensor and the first
/// bad entry (the same message as the runner's check of a checkpoint).
pub(crate) fn finite_tensor(file: &std::path::Path, name: &str, values: &[f32]) -> Result<()> {
    match values.iter().position(|v| !v.is_finite()) {
        None => Ok(()),
        Some(i) => Err(DtlError::file(
            file,
            format!(
                "weights tensor `{name}` holds {} at index {i}; the file is damaged or was saved \
                 from a diverged model: use an intact copy",
                values[i]
            ),
        )),
    }
}
