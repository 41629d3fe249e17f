//! Swin Transformer backbones for dtl: timm's `SwinTransformer` (timm 1.0 layout) as a
//! frozen, hierarchical backbone, with its patch embedding, shifted-window blocks, patch
//! merging stage transitions and final norm written once over the kernel set of
//! `dtl-kernels`, and timm safetensors weight loading.
//!
//! - [`SwinConfig`]: a variant's hyper-parameters and the geometry derived from them (the
//!   per-stage [`BackboneSpec`](dtl_core::BackboneSpec), windows and shifts).
//! - [`SwinWeights`]: the frozen weights on the host; [`load_weights`] reads a timm
//!   `model.safetensors`, [`SwinWeights::from_tensors`] any parsed table of tensors (timm 1.0
//!   or the original release's layout).
//! - [`SwinOn`]: the weights on a device `K: Kernels` and the backbone over its kernels
//!   ([`KernelBackbone`](dtl_kernels::KernelBackbone)).
//!
//! Registered variants (timm names): `swin_tiny_patch4_window7_224`,
//! `swin_small_patch4_window7_224`, `swin_base_patch4_window7_224`,
//! `swin_base_patch4_window12_384`, `swin_large_patch4_window7_224`, the test geometry
//! `swin_test_patch2_window4_32` and the small `swin_mini_patch2_window7_28`. A binary or
//! test that wants them must link this crate with `use dtl_swin as _;`.
//!
//! Swin trains through the kernel-set step only (a built-in side network: `dtl`, `dtl+` or
//! `linear`), on the CPU in f32 or on a CUDA GPU in a build with the `cuda` feature.
//!
//! ```
//! use dtl_swin as _;
//! let reg = dtl_core::registry().unwrap();
//! let spec = reg.backbone("swin_tiny_patch4_window7_224").unwrap().spec();
//! assert_eq!((spec.width, spec.depth, spec.stages.len()), (768, 12, 4));
//! ```

#![warn(missing_docs)]
#![deny(unsafe_code)]

#[cfg(feature = "runner")]
use dtl_core::{BuildContext, Job, PipelineConfig};
use dtl_core::{DtlError, Result};

mod config;
mod load;
mod on;
mod weights;

pub use config::SwinConfig;
pub use load::{load_weights, read_pth, read_safetensors, HostTensor, SwinLayout};
pub use on::{score_bias, SwinOn, SwinWorkspace};
pub use weights::{MergeWeights, SwinBlockWeights, SwinWeights};

/// A registered variant: timm name, image, patch, embedding width, depths, heads, window.
type Variant = (
    &'static str,
    usize,
    usize,
    usize,
    [usize; 4],
    [usize; 4],
    usize,
);

/// The registered variants with four stages.
const VARIANTS: &[Variant] = &[
    (
        "swin_tiny_patch4_window7_224",
        224,
        4,
        96,
        [2, 2, 6, 2],
        [3, 6, 12, 24],
        7,
    ),
    (
        "swin_small_patch4_window7_224",
        224,
        4,
        96,
        [2, 2, 18, 2],
        [3, 6, 12, 24],
        7,
    ),
    (
        "swin_base_patch4_window7_224",
        224,
        4,
        128,
        [2, 2, 18, 2],
        [4, 8, 16, 32],
        7,
    ),
    (
        "swin_base_patch4_window12_384",
        384,
        4,
        128,
        [2, 2, 18, 2],
        [4, 8, 16, 32],
        12,
    ),
    (
        "swin_large_patch4_window7_224",
        224,
        4,
        192,
        [2, 2, 18, 2],
        [6, 12, 24, 48],
        7,
    ),
    (
        "swin_test_patch2_window4_32",
        32,
        2,
        16,
        [2, 2, 2, 2],
        [1, 2, 2, 4],
        4,
    ),
];

/// The config of a registered variant, by name.
///
/// ```
/// let c = dtl_swin::variant("swin_test_patch2_window4_32").unwrap();
/// assert_eq!((c.embed_dim, c.window, c.depths.len()), (16, 4, 4));
/// assert_eq!(dtl_swin::variant("swin_mini_patch2_window7_28").unwrap().stages(), 2);
/// assert!(dtl_swin::variant("swin_huge").unwrap_err().to_string().contains("swin_tiny"));
/// ```
pub fn variant(name: &str) -> Result<SwinConfig> {
    if name == "swin_mini_patch2_window7_28" {
        return Ok(SwinConfig::new(name, 28, 2, 32, &[2, 2], &[2, 4], 7));
    }
    VARIANTS
        .iter()
        .find(|v| v.0 == name)
        .map(|&(n, img, p, c, d, h, w)| SwinConfig::new(n, img, p, c, &d, &h, w))
        .ok_or_else(|| {
            let names: Vec<&str> = VARIANTS.iter().map(|v| v.0).collect();
            DtlError::invalid(format!(
                "`{name}` is not a Swin variant; known: {}, swin_mini_patch2_window7_28",
                names.join(", ")
            ))
        })
}

/// A variant as a type, for registration.
///
/// ```
/// use dtl_swin::SwinVariant;
/// assert_eq!(dtl_swin::variants::SwinTiny::config().window, 7);
/// ```
pub trait SwinVariant: 'static {
    /// The registered name.
    const NAME: &'static str;
    /// The variant's hyper-parameters.
    fn config() -> SwinConfig {
        // every NAME is one of `variant`'s
        variant(Self::NAME).unwrap_or_else(|_| SwinConfig::new(Self::NAME, 0, 0, 0, &[], &[], 0))
    }
    /// The variant's numbers (what `dtl list` and validation see).
    fn spec() -> dtl_core::BackboneSpec {
        Self::config().spec()
    }
}

/// The registered constructor of variant `V`: loads `backbone.weights` (random weights seeded
/// by `run.seed` when absent) and hands a [`SwinOn`] to the kernel-set training step: on the
/// CPU kernels in f32 (`run.precision = "bf16"` is refused there), or, for
/// `run.device = "cuda:N"` in a build with the `cuda` feature, uploaded to that GPU opened at
/// the resolved `run.precision` (`auto`: bf16). The side network and head must have kernel-set descriptions (the
/// built-in `dtl`, `dtl+`, `linear` sides): the dfdx tape path's compile-time dims fit a
/// single-stage backbone only.
///
/// ```
/// use dtl_core::{BuildContext, Job, PipelineConfig, Result};
/// let build: fn(&PipelineConfig, &BuildContext) -> Result<Box<dyn Job>> =
///     dtl_swin::build::<dtl_swin::variants::SwinTest>;
/// ```
#[cfg(feature = "runner")]
pub fn build<V: SwinVariant>(cfg: &PipelineConfig, cx: &BuildContext) -> Result<Box<dyn Job>> {
    let sc = V::config();
    sc.check()?;
    let reg = dtl_core::registry()?;
    if reg.side(&cfg.side.kind)?.kernels.is_none() {
        return Err(DtlError::config(
            "pipeline",
            "side.kind",
            None,
            format!(
                "the side network `{}` has no kernel-set description; Swin (`{}`) needs a built-in side network (`dtl`, `dtl+` or `linear`), because the tape path's compile-time dims fit a single-stage backbone only",
                cfg.side.kind, sc.name
            ),
        ));
    }
    if reg.head(&cfg.head.kind)?.kernels.is_none() {
        return Err(DtlError::config(
            "pipeline",
            "head.kind",
            None,
            format!(
                "the head `{}` has no kernel-set description; Swin (`{}`) needs a built-in head",
                cfg.head.kind, sc.name
            ),
        ));
    }
    let weights = match &cfg.backbone.weights {
        Some(w) => {
            let path = dtl_core::registry::resolve_path(&cx.pipeline_file, w);
            load_weights(&sc, &path, cfg.backbone.format)?
        }
        None => SwinWeights::random(&sc, cfg.run.seed),
    };
    if let dtl_core::config::DeviceSpec::Cuda(_n) = cfg.device()? {
        #[cfg(feature = "cuda")]
        {
            // `auto` is bf16 on a GPU
            let gpu = dtl_cuda::Gpu::open_with(_n, cfg.run.precision.on_device(true))?;
            let on = SwinOn::upload(&gpu, &sc, &weights)?;
            return dtl_runner::build_resident_job(cfg, cx, on, gpu);
        }
        #[cfg(not(feature = "cuda"))]
        return Err(DtlError::config(
            "pipeline",
            "run.device",
            None,
            format!(
                "{} runs on a CUDA device only in a build with the `cuda` feature; use run.device = \"cpu\" or rebuild with `--features cuda`",
                sc.name
            ),
        ));
    }
    let on = SwinOn::from_weights(&sc, weights)?;
    dtl_runner::build_resident_job(cfg, cx, on, dtl_kernels::CpuKernels::new())
}

/// The registered variants as types.
///
/// ```
/// use dtl_swin::SwinVariant;
/// assert_eq!(dtl_swin::variants::SwinBase384::spec().image_size, 384);
/// ```
pub mod variants {
    use super::SwinVariant;

    macro_rules! swin_type {
        ($(#[$m:meta])* $ty:ident, $name:literal, $desc:literal) => {
            $(#[$m])*
            #[derive(Debug, Clone, Copy, Default)]
            pub struct $ty;
            impl SwinVariant for $ty {
                const NAME: &'static str = $name;
            }
            #[cfg(feature = "runner")]
            inventory::submit! {
                dtl_core::BackboneEntry {
                    name: $name,
                    description: $desc,
                    spec: <$ty as SwinVariant>::spec,
                    build: super::build::<$ty>,
                    origin: module_path!(),
                }
            }
        };
    }

    swin_type!(
        /// Swin-T (timm `swin_tiny_patch4_window7_224`).
        SwinTiny, "swin_tiny_patch4_window7_224", "Swin-T, 224x224, window 7"
    );
    swin_type!(
        /// Swin-S (timm `swin_small_patch4_window7_224`).
        SwinSmall, "swin_small_patch4_window7_224", "Swin-S, 224x224, window 7"
    );
    swin_type!(
        /// Swin-B (timm `swin_base_patch4_window7_224`).
        SwinBase, "swin_base_patch4_window7_224", "Swin-B, 224x224, window 7"
    );
    swin_type!(
        /// Swin-B at 384 (timm `swin_base_patch4_window12_384`).
        SwinBase384, "swin_base_patch4_window12_384", "Swin-B, 384x384, window 12 (window-7 tables are resampled)"
    );
    swin_type!(
        /// Swin-L (timm `swin_large_patch4_window7_224`).
        SwinLarge, "swin_large_patch4_window7_224", "Swin-L, 224x224, window 7"
    );
    swin_type!(
        /// The test fixtures' geometry: image 32, patch 2, width 16, depths 2-2-2-2, window 4.
        SwinTest, "swin_test_patch2_window4_32", "test geometry, 32x32, patch 2, width 16, window 4"
    );
    swin_type!(
        /// A small two-stage Swin for 28x28 inputs: patch 2, width 32, depths 2-2, window 7.
        SwinMini, "swin_mini_patch2_window7_28", "mini Swin for 28x28 inputs, patch 2, width 32, 2 stages, window 7"
    );
}

#[cfg(test)]
mod tests {
    use super::variants::*;
    use super::*;

    fn check<V: SwinVariant>() {
        let c = V::config();
        assert_eq!(c.name, V::NAME);
        c.check().unwrap();
        let s = V::spec();
        assert_eq!(s.depth, c.depths.iter().sum::<usize>());
        assert_eq!(s.stages.last().unwrap().blocks.1, s.depth);
    }

    #[test]
    fn every_variant_is_consistent() {
        check::<SwinTiny>();
        check::<SwinSmall>();
        check::<SwinBase>();
        check::<SwinBase384>();
        check::<SwinLarge>();
        check::<SwinTest>();
        check::<SwinMini>();
        // timm's counts (with their 1000-class heads): S 49.61M, B 87.77M, L 196.53M
        let with_head = |c: SwinConfig| {
            let d = c.width(c.stages() - 1);
            c.parameter_count() + d * 1000 + 1000
        };
        assert_eq!(with_head(SwinSmall::config()), 49_606_258);
        assert_eq!(with_head(SwinBase::config()), 87_768_224);
        assert_eq!(with_head(SwinLarge::config()), 196_532_476);
    }

    #[test]
    fn the_shift_mask_separates_the_rolled_regions() {
        // 8x8 grid, window 4, shift 2: window 3 (bottom right) holds four regions
        let table = vec![0.0f32; 49];
        let (bias, groups) = score_bias(&table, 1, 8, 4, 2);
        assert_eq!(groups, 4);
        let w0 = &bias[..256];
        assert!(w0.iter().all(|&v| v == 0.0));
        let w3 = &bias[3 * 256..];
        // token 0 (row 0, col 0) and token 3 (row 0, col 3) lie in different column regions
        assert_eq!(w3[3], -100.0);
        // tokens 0 and 1 (cols 0, 1) share a region
        assert_eq!(w3[1], 0.0);
        // relative positions: the table entry of offset (0, 0) is the centre, index 24
        let mut t = vec![0.0f32; 49];
        t[24] = 1.0;
        let (b, g) = score_bias(&t, 1, 8, 4, 0);
        assert_eq!(g, 1);
        assert!((0..16).all(|i| b[i * 16 + i] == 1.0));
        assert_eq!(b.iter().sum::<f32>(), 16.0);
    }
}
