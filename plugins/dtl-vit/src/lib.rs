//! ViT backbones for dtl: timm's Vision Transformer as a frozen [`Backbone`], with timm
//! safetensors and Google/Flax npz weight loading and a CPU implementation of the
//! per-block forward and input-only VJP.
//!
//! - [`Vit`]: the model, generic over its compile-time token count and width.
//! - [`Geometry`]: a variant's dims and numbers as a type; [`vit_variant!`] declares one and
//!   registers it by name.
//! - [`load`], [`random`], [`check_weights`], [`load_weights`]: weights.
//!
//! Registered variants (timm names): `vit_tiny_patch16_224`, `vit_small_patch16_224`,
//! `vit_base_patch16_224`, `vit_large_patch16_224`, `vit_base_patch32_224`,
//! `vit_base_patch16_384`, `vit_test_patch8_32` and `vit_mini_patch4_28`. A binary or test
//! that wants them must link this crate with `use dtl_vit as _;`.
//!
//! ```
//! use dtl_vit as _;
//! let reg = dtl_core::registry().unwrap();
//! let spec = reg.backbone("vit_base_patch16_224").unwrap().spec();
//! assert_eq!((spec.tokens(), spec.width, spec.depth), (197, 768, 12));
//! ```

#![warn(missing_docs)]
// Unsafe code lives in `strided` (the gemm calls) and the SIMD dispatch of `kernels` only.
#![deny(unsafe_code)]

use std::path::Path;

use dfdx::prelude::ConstDim;
use dtl_core::{BackboneSpec, BuildContext, Job, PipelineConfig, Result};

#[cfg(feature = "cuda")]
pub mod cuda;
mod flat;
pub mod kernels;
mod load;
mod model;
#[allow(unsafe_code)]
pub mod strided;
pub mod variants;
mod weights;

pub use load::{load_weights, resample_pos_embed, LoadReport, WeightFormat};
pub use model::{Vit, VitOf};
pub use weights::{BlockWeights, VitWeights};

#[doc(hidden)]
pub use dfdx as __dfdx;
#[doc(hidden)]
pub use dtl_core as __core;
#[doc(hidden)]
pub use inventory as __inventory;

/// A ViT variant as a type: its compile-time dims and its numbers.
///
/// Implement it (or use [`vit_variant!`]) to give a geometry a name; [`load`], [`random`]
/// and [`build`] are generic over it.
///
/// ```
/// use dfdx::prelude::Const;
/// use dtl_core::BackboneSpec;
/// struct Tiny8;
/// impl dtl_vit::Geometry for Tiny8 {
///     type Tokens = Const<5>;
///     type Width = Const<8>;
///     const NAME: &'static str = "tiny8";
///     fn spec() -> BackboneSpec { BackboneSpec::vit("tiny8", 16, 8, 8, 2, 2) }
/// }
/// let vit = dtl_vit::random::<Tiny8>(0).unwrap();
/// assert_eq!(dtl_core::Backbone::<dfdx::prelude::Cpu>::depth(&vit), 2);
/// ```
pub trait Geometry: 'static {
    /// Token count (prefix + patches).
    type Tokens: ConstDim;
    /// Token width.
    type Width: ConstDim;
    /// Registered name.
    const NAME: &'static str;
    /// The variant's numbers; `tokens()` and `width` must equal the two dims.
    fn spec() -> BackboneSpec;
}

/// Loads a checkpoint into the variant `G` (`format`: `auto`, `safetensors` or `npz`).
///
/// ```no_run
/// let vit = dtl_vit::load::<dtl_vit::variants::VitBasePatch16_224>("ViT-B_16.npz".as_ref(), "auto").unwrap();
/// ```
pub fn load<G: Geometry>(path: &Path, format: &str) -> Result<VitOf<G>> {
    Vit::load(G::spec(), path, format)
}

/// The variant `G` with random weights from `seed` (benchmarks only).
pub fn random<G: Geometry>(seed: u64) -> Result<VitOf<G>> {
    Vit::random(G::spec(), seed)
}

/// Checks that a checkpoint loads into a registered variant, without building anything else.
///
/// Errors name the file and the tensor; the report says which layout was read, what was
/// skipped and whether the position embedding was resampled.
///
/// ```no_run
/// let report = dtl_vit::check_weights("vit_tiny_patch16_224", "model.safetensors".as_ref(), "auto").unwrap();
/// assert_eq!(report.layout, "timm");
/// ```
pub fn check_weights(variant: &str, path: &Path, format: &str) -> Result<LoadReport> {
    let spec = dtl_core::registry()?.backbone(variant)?.spec();
    Ok(load_weights(&spec, path, format)?.1)
}

/// The registered constructor of variant `G`: loads `backbone.weights` (random weights
/// seeded by `run.seed` when absent) and hands the model to the runner, on the CPU or, for
/// `run.device = "cuda:N"` in a build with the `cuda` feature, on that GPU.
pub fn build<G: Geometry>(cfg: &PipelineConfig, cx: &BuildContext) -> Result<Box<dyn Job>> {
    let spec = G::spec();
    let vit: VitOf<G> = match &cfg.backbone.weights {
        Some(w) => {
            let path = dtl_core::registry::resolve_path(&cx.pipeline_file, w);
            Vit::load(spec, &path, &cfg.backbone.format)?
        }
        None => Vit::random(spec, cfg.run.seed)?,
    };
    #[cfg(feature = "cuda")]
    if let dtl_core::config::DeviceSpec::Cuda(n) = cfg.device()? {
        return cuda::build_job(cfg, cx, &vit, n);
    }
    dtl_runner::build_job::<VitOf<G>>(cfg, cx, vit)
}

/// Declares a ViT geometry type and registers it by name.
///
/// `tokens` must equal `(image / patch)^2 + 1` (the class token); a unit test per variant
/// (or [`Vit::new`] at run time) checks it.
///
/// ```
/// dtl_vit::vit_variant!(
///     /// My geometry.
///     MyVit, "my_vit_patch8_64", "ViT for 64x64 inputs",
///     image: 64, patch: 8, width: 96, depth: 6, heads: 3, tokens: 65
/// );
/// let reg = dtl_core::registry().unwrap();
/// assert_eq!(reg.backbone("my_vit_patch8_64").unwrap().spec().tokens(), 65);
/// let vit = dtl_vit::random::<MyVit>(0).unwrap();
/// ```
#[macro_export]
macro_rules! vit_variant {
    ($(#[$m:meta])* $ty:ident, $name:literal, $desc:literal,
     image: $img:literal, patch: $patch:literal, width: $width:literal,
     depth: $depth:literal, heads: $heads:literal, tokens: $tokens:literal) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, Default)]
        pub struct $ty;
        impl $crate::Geometry for $ty {
            type Tokens = $crate::__dfdx::prelude::Const<$tokens>;
            type Width = $crate::__dfdx::prelude::Const<$width>;
            const NAME: &'static str = $name;
            fn spec() -> $crate::__core::BackboneSpec {
                $crate::__core::BackboneSpec::vit($name, $img, $patch, $width, $depth, $heads)
            }
        }
        $crate::__inventory::submit! {
            $crate::__core::BackboneEntry {
                name: $name,
                description: $desc,
                spec: <$ty as $crate::Geometry>::spec,
                build: $crate::build::<$ty>,
                origin: module_path!(),
            }
        }
    };
}
