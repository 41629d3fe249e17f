//! ViT backbones for dtl: timm's Vision Transformer as a frozen backbone, with timm
//! safetensors and Google/Flax npz weight loading, and its patch embedding, per-block
//! forward and input-only VJP written once over the kernel set of `dtl-kernels`.
//!
//! - [`VitOn`]: the frozen weights on a device `K: Kernels` and the blocks over its
//!   kernels ([`KernelBackbone`](dtl_kernels::KernelBackbone)); what both the CPU and a GPU
//!   run.
//! - [`Vit`]: the model as a dfdx [`Backbone`](dtl_core::Backbone) on the CPU, generic over
//!   its compile-time token count and width; it runs a [`VitOn`] on the CPU kernels.
//! - [`Geometry`]: a variant's dims and numbers as a type; [`vit_geometry!`] declares one
//!   (token count computed, optional MLP ratio, class token and LayerNorm eps) and
//!   `vit_variant!` also registers it by name.
//! - [`load`], [`random`], [`check_weights`], [`load_weights`]: weights.
//!
//! Registered variants (timm names): `vit_tiny_patch16_224`, `vit_small_patch16_224`,
//! `vit_base_patch16_224`, `vit_large_patch16_224`, `vit_base_patch32_224`,
//! `vit_base_patch16_384`, `vit_test_patch8_32` and `vit_mini_patch4_28`. A binary or test
//! that wants them must link this crate with `use dtl_vit as _;`.
//!
//! With the default `runner` feature the crate also brings the training runner (`build`,
//! `vit_variant!`) and registers the variants by name; with `default-features = false` it
//! gives the geometries, weight loading and the models only (no data loader, image decoders,
//! plots or progress bars). `docs/library.md` shows the programmatic path end to end.
//!
//! ```
//! use dtl_vit::{variants::VitBasePatch16_224, Geometry};
//! let spec = VitBasePatch16_224::spec();
//! assert_eq!((spec.tokens(), spec.width, spec.depth), (197, 768, 12));
//! ```

#![warn(missing_docs)]
#![deny(unsafe_code)]

use std::path::Path;

use dfdx::prelude::ConstDim;
use dtl_core::{BackboneSpec, Result};
#[cfg(feature = "runner")]
use dtl_core::{BuildContext, Job, PipelineConfig};

mod flat;
mod load;
mod model;
mod on;
pub mod variants;
mod weights;

pub use load::{load_weights, resample_pos_embed, LoadReport, WeightFormat};
pub use model::{Vit, VitOf};
pub use on::{VitOn, VitWorkspace};
pub use weights::{BlockWeights, VitWeights};

/// The CPU loops the CPU model runs on (`dtl_kernels::cpu::ops`), under their former path.
///
/// ```
/// assert!((dtl_vit::kernels::gelu_scalar(1.0) - 0.841_344_7).abs() < 1e-6);
/// ```
pub use dtl_kernels::cpu::ops as kernels;

#[doc(hidden)]
pub use dfdx as __dfdx;
#[doc(hidden)]
pub use dtl_core as __core;
#[cfg(feature = "runner")]
#[doc(hidden)]
pub use inventory as __inventory;

/// A ViT variant as a type: its compile-time dims and its numbers.
///
/// Implement it (or use [`vit_geometry!`] / `vit_variant!`) to give a geometry a name;
/// [`load`], [`random`] and `build` are generic over it.
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
///
/// ```
/// let vit = dtl_vit::random::<dtl_vit::variants::VitMiniPatch4_28>(0).unwrap();
/// assert_eq!(vit.weights().blocks.len(), 4);
/// ```
pub fn random<G: Geometry>(seed: u64) -> Result<VitOf<G>> {
    Vit::random(G::spec(), seed)
}

/// Checks that a checkpoint loads into a registered variant, without building anything else
/// (the variants are registered by name with the `runner` feature; without it no name is
/// known and this is an error).
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
/// seeded by `run.seed` when absent) and hands the model to the runner: on the CPU as a
/// [`VitOn`] on the CPU kernels to the device step when the side network and head have
/// kernel-set descriptions (the built-in ones), else as a [`Vit`] to the dfdx-based runner;
/// for `run.device = "cuda:N"` in a build with the `cuda` feature, as a [`VitOn`] uploaded to
/// that GPU, opened at the resolved `run.precision` (`auto`: bf16), to the device-resident
/// runner. `run.precision = "bf16"` on the CPU is refused.
///
/// ```
/// use dtl_core::{BuildContext, Job, PipelineConfig, Result};
/// // what `vit_variant!` registers for a variant
/// let build: fn(&PipelineConfig, &BuildContext) -> Result<Box<dyn Job>> =
///     dtl_vit::build::<dtl_vit::variants::VitTestPatch8_32>;
/// ```
#[cfg(feature = "runner")]
pub fn build<G: Geometry>(cfg: &PipelineConfig, cx: &BuildContext) -> Result<Box<dyn Job>> {
    let spec = G::spec();
    let weights = match &cfg.backbone.weights {
        Some(w) => {
            let path = dtl_core::registry::resolve_path(&cx.pipeline_file, w);
            load_weights(&spec, &path, cfg.backbone.format)?.0
        }
        None => VitWeights::random(&spec, cfg.run.seed),
    };
    #[cfg(feature = "cuda")]
    if let dtl_core::config::DeviceSpec::Cuda(n) = cfg.device()? {
        // `auto` is bf16 on a GPU
        let gpu = dtl_cuda::Gpu::open_with(n, cfg.run.precision.on_device(true))?;
        let on = VitOn::upload(&gpu, &spec, &weights)?;
        return dtl_runner::build_resident_job(cfg, cx, on, gpu);
    }
    let on_cpu = !matches!(cfg.device()?, dtl_core::config::DeviceSpec::Cuda(_));
    // On the CPU the device step trains in f32 (and refuses `run.precision = "bf16"`).
    if on_cpu && has_kernel_description(cfg)? {
        let on = VitOn::from_weights(&spec, weights)?;
        return dtl_runner::build_resident_job(cfg, cx, on, dtl_kernels::CpuKernels::new());
    }
    let vit: VitOf<G> = Vit::new(spec, weights)?;
    dtl_runner::build_job::<VitOf<G>>(cfg, cx, vit)
}

/// Whether the pipeline's side network and head both have a description over the kernel set
/// (`SideEntry::kernels`, `HeadEntry::kernels`): then the CPU trains through the device step
/// (`dtl_runner::resident` on `CpuKernels`: flat buffers planned once, no tape); a plugin side
/// network without one trains on the tape-based CPU path.
#[cfg(feature = "runner")]
fn has_kernel_description(cfg: &PipelineConfig) -> Result<bool> {
    let reg = dtl_core::registry()?;
    Ok(reg.side(&cfg.side.kind)?.kernels.is_some() && reg.head(&cfg.head.kind)?.kernels.is_some())
}

/// The token count of a ViT geometry: `(image / patch)^2` patches plus one class token
/// when `class_token` (what [`vit_geometry!`] puts in `Geometry::Tokens`).
///
/// ```
/// assert_eq!(dtl_vit::vit_tokens(224, 16, true), 197);
/// assert_eq!(dtl_vit::vit_tokens(32, 8, false), 16);
/// ```
pub const fn vit_tokens(image: usize, patch: usize, class_token: bool) -> usize {
    let g = image / patch;
    g * g + class_token as usize
}

/// The [`BackboneSpec`] of a ViT geometry with its optional settings: the MLP hidden width
/// `width * mlp_ratio` (timm rounds down), a class token or none, and the LayerNorm eps
/// (what [`vit_geometry!`] returns from `Geometry::spec`).
///
/// ```
/// let s = dtl_vit::vit_spec("v", 32, 8, 48, 4, 3, 2.0, false, 1e-5);
/// assert_eq!((s.mlp_hidden, s.prefix_tokens, s.tokens(), s.norm_eps), (96, 0, 16, 1e-5));
/// assert_eq!(s.stages[0].prefix_tokens, 0);
/// ```
#[allow(clippy::too_many_arguments)]
pub fn vit_spec(
    name: &str,
    image: usize,
    patch: usize,
    width: usize,
    depth: usize,
    heads: usize,
    mlp_ratio: f64,
    class_token: bool,
    norm_eps: f64,
) -> BackboneSpec {
    BackboneSpec {
        mlp_hidden: (width as f64 * mlp_ratio) as usize,
        prefix_tokens: class_token as usize,
        norm_eps,
        ..BackboneSpec::vit(name, image, patch, width, depth, heads)
    }
    .single_stage()
}

/// Declares a ViT geometry type (a [`Geometry`]) without registering it by name.
///
/// The token count `(image / patch)^2 (+ 1 with the class token)` is computed at compile
/// time. After the five required numbers come, optionally and in this order:
/// `mlp_ratio` (MLP hidden width over `width`, default `4.0`), `class_token` (default
/// `true`) and `norm_eps` (every LayerNorm's eps, default `1e-6`).
///
/// ```
/// dtl_vit::vit_geometry!(
///     /// A ViT without class token, MLP ratio 2.
///     Plain, "plain_vit_patch8_32",
///     image: 32, patch: 8, width: 48, depth: 2, heads: 3,
///     mlp_ratio: 2.0, class_token: false
/// );
/// use dtl_vit::Geometry;
/// assert_eq!((Plain::spec().tokens(), Plain::spec().mlp_hidden), (16, 96));
/// let vit = dtl_vit::random::<Plain>(0).unwrap();
/// assert_eq!(vit.weights().blocks[0].fc1_b.len(), 96);
/// ```
#[macro_export]
macro_rules! vit_geometry {
    ($(#[$m:meta])* $ty:ident, $name:literal,
     image: $img:literal, patch: $patch:literal, width: $width:literal,
     depth: $depth:literal, heads: $heads:literal
     $(, mlp_ratio: $ratio:literal)? $(, class_token: $cls:literal)? $(, norm_eps: $eps:literal)? $(,)?) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, Default)]
        pub struct $ty;
        impl $crate::Geometry for $ty {
            type Tokens = $crate::__dfdx::prelude::Const<
                { $crate::vit_tokens($img, $patch, $crate::__or!($($cls)?, true)) },
            >;
            type Width = $crate::__dfdx::prelude::Const<$width>;
            const NAME: &'static str = $name;
            fn spec() -> $crate::__core::BackboneSpec {
                $crate::vit_spec(
                    $name,
                    $img,
                    $patch,
                    $width,
                    $depth,
                    $heads,
                    $crate::__or!($($ratio)?, 4.0),
                    $crate::__or!($($cls)?, true),
                    $crate::__or!($($eps)?, 1e-6),
                )
            }
        }
    };
}

/// The given value, else the default.
#[doc(hidden)]
#[macro_export]
macro_rules! __or {
    (, $default:expr) => {
        $default
    };
    ($v:literal, $default:expr) => {
        $v
    };
}

/// Declares a ViT geometry type (as [`vit_geometry!`]) and registers it by name, so that a
/// pipeline's `backbone.kind` finds it (needs the `runner` feature, on by default).
///
/// The token count is computed from the image and patch sizes; `mlp_ratio`, `class_token`
/// and `norm_eps` may follow the five required numbers, as in [`vit_geometry!`].
///
/// ```
/// dtl_vit::vit_variant!(
///     /// My geometry.
///     MyVit, "my_vit_patch8_64", "ViT for 64x64 inputs",
///     image: 64, patch: 8, width: 96, depth: 6, heads: 3
/// );
/// let reg = dtl_core::registry().unwrap();
/// assert_eq!(reg.backbone("my_vit_patch8_64").unwrap().spec().tokens(), 65);
/// let vit = dtl_vit::random::<MyVit>(0).unwrap();
/// ```
#[cfg(feature = "runner")]
#[macro_export]
macro_rules! vit_variant {
    ($(#[$m:meta])* $ty:ident, $name:literal, $desc:literal,
     image: $img:literal, patch: $patch:literal, width: $width:literal,
     depth: $depth:literal, heads: $heads:literal $($rest:tt)*) => {
        $crate::vit_geometry!(
            $(#[$m])* $ty, $name,
            image: $img, patch: $patch, width: $width, depth: $depth, heads: $heads $($rest)*
        );
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
