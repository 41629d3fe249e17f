//! The generic training and evaluation loop of dtl.
//!
//! - [`sides`]: the built-in side networks `dtl`, `dtl+`, `linear` and the `linear` head,
//!   registered in the component registry.
//! - [`device`]: the dfdx device the tape-based model trains on (`Cpu`).
//! - [`model`]: a frozen backbone, side network and head composed on dfdx's tape, with
//!   memory-lean training (the CPU path).
//! - [`resident`]: the training step written over the kernel set (`dtl_kernels::Kernels`),
//!   resident in a device's memory from the uploaded batch to the AdamW update (the GPU path).
//! - [`optim`]: AdamW with parameter groups, gradient clipping and the cosine schedule.
//! - [`step`]: the training step, from batch to update (model, drop-path masks, forward,
//!   backward, AdamW), shared by [`job`] and [`bench`](mod@bench).
//! - [`job`]: the training loop over an [`job::Engine`] (training, resuming, evaluation);
//!   [`checkpoint`] and [`report`] write the files.
//! - [`bench`](mod@bench): throughput and peak memory.
//! - [`toy`]: a tiny backbone for tests and examples.

#![warn(missing_docs)]

pub mod bench;
pub mod checkpoint;
pub mod data;
pub mod device;
mod glyphs;
pub mod inputs;
pub mod job;
pub mod lock;
pub mod model;
pub mod ops;
pub mod optim;
pub mod raster;
pub mod report;
pub mod resident;
pub mod sanity;
pub mod sides;
pub mod step;
pub mod summary;
pub mod sweep;
pub mod toy;

use dfdx::prelude::Cpu;
use dtl_core::choice::Precision;
use dtl_core::config::DeviceSpec;
use dtl_core::{Backbone, BuildContext, DtlError, Job, PipelineConfig, Result};

pub use job::{DtlJob, Engine, EngineSource, MemoryProbe, Trainer};

/// Instantiates the training job for one backbone variant on the CPU.
///
/// A backbone plugin calls this from its registration's constructor after loading weights
/// (and [`build_resident_job`] when the pipeline asks for `cuda:N` and the plugin has an
/// implementation over the kernel set). The job opens the pipeline's data on first use.
///
/// ```
/// use dfdx::prelude::*;
/// use dtl_core::{BuildContext, PipelineConfig};
/// let cfg = PipelineConfig::from_str(
///     "[backbone]\nkind = \"toy\"\n[data]\nkind = \"image-folder\"\nroot = \".\"\n",
///     "toy.toml".as_ref(), &[]).unwrap();
/// let cx = BuildContext { pipeline_file: "toy.toml".into() };
/// let bb = dtl_runner::toy::ToyBackbone::new(&Cpu::default(), 0);
/// let _job = dtl_runner::build_job(&cfg, &cx, bb).unwrap();
/// ```
pub fn build_job<B>(cfg: &PipelineConfig, cx: &BuildContext, backbone: B) -> Result<Box<dyn Job>>
where
    B: Backbone<Cpu> + Send + Sync + 'static,
{
    let spec = backbone.spec();
    if spec.is_hierarchical() {
        return Err(DtlError::Unavailable(format!(
            "backbone `{}` has {} stages: the tape-based CPU path, and with it a plugin side \
             network, needs a single-stage backbone; a hierarchical backbone trains with the \
             device step (`build_resident_job`, on the CPU's kernels or a GPU) with side.kind = \
             \"dtl\", \"dtl+\" or \"linear\"",
            spec.name,
            spec.stages.len()
        )));
    }
    if let DeviceSpec::Cuda(n) = cfg.device()? {
        return Err(DtlError::Unavailable(format!(
            "run.device = \"cuda:{n}\": backbone `{}` runs on the CPU only in this build; \
             rebuild with `--features cuda` (see docs/cuda.md) or set run.device = \"cpu\"",
            backbone.spec().name
        )));
    }
    if cfg.run.precision.on_device(false) != "f32" {
        return Err(DtlError::config(
            "pipeline",
            "run.precision",
            None,
            format!(
                "\"{}\" needs a GPU; the CPU trains in f32 (set run.precision = \"f32\")",
                cfg.run.precision
            ),
        ));
    }
    Ok(Box::new(DtlJob::new(cfg, cx, backbone, Cpu::default())))
}

/// Instantiates the training job of a backbone written over the kernel set on device `k`:
/// the device step of [`resident`], from the uploaded batch to the AdamW update in the
/// device's memory. A backbone plugin calls this for `run.device = "cuda:N"` with the GPU
/// (`dtl_cuda::Gpu`, opened at the resolved `run.precision`) and its weights uploaded there;
/// it runs on the CPU's kernels as well.
///
/// The step trains at the device's precision ([`dtl_kernels::Kernels::precision`]):
/// `run.precision = "auto"` takes it as it is; `"f32"` and `"bf16"` must match it, so
/// `"bf16"` on the CPU (which trains in f32) is refused with an error naming the key.
///
/// ```no_run
/// # fn demo<K: dtl_kernels::Kernels + Clone, B: dtl_kernels::KernelBackbone<K>>(
/// #     cfg: &dtl_core::PipelineConfig, cx: &dtl_core::BuildContext, backbone: B, k: K) -> dtl_core::Result<()> {
/// let job = dtl_runner::build_resident_job(cfg, cx, backbone, k)?;
/// # Ok(()) }
/// ```
pub fn build_resident_job<K, B>(
    cfg: &PipelineConfig,
    cx: &BuildContext,
    backbone: B,
    k: K,
) -> Result<Box<dyn Job>>
where
    K: dtl_kernels::Kernels + Clone,
    B: dtl_kernels::KernelBackbone<K>,
{
    check_precision(cfg.run.precision, &k)?;
    Ok(Box::new(Trainer::with_source(
        cfg,
        cx,
        resident::ResidentSource::new(k, backbone),
    )))
}

/// Checks that `run.precision = wanted` fits device `k`: `auto` fits every device, `f32` and
/// `bf16` the device whose [`dtl_kernels::Kernels::precision`] they name.
///
/// ```
/// use dtl_core::choice::Precision;
/// let cpu = dtl_kernels::CpuKernels::new();
/// assert!(dtl_runner::check_precision(Precision::Auto, &cpu).is_ok());
/// assert!(dtl_runner::check_precision(Precision::F32, &cpu).is_ok());
/// let e = dtl_runner::check_precision(Precision::Bf16, &cpu).unwrap_err().to_string();
/// assert!(e.contains("run.precision") && e.contains("\"f32\""), "{e}");
/// ```
pub fn check_precision<K: dtl_kernels::Kernels>(wanted: Precision, k: &K) -> Result<()> {
    let have = k.precision();
    if wanted == Precision::Auto || wanted == have {
        return Ok(());
    }
    let why = match wanted {
        Precision::Bf16 => format!(
            "\"bf16\" needs a CUDA device (`run.device = \"cuda:N\"` in a build with the `cuda` \
             feature); {} trains in {have}: set run.precision = \"f32\" or \"auto\"",
            k.describe()
        ),
        _ => format!(
            "\"{wanted}\" asked for, but {} was opened for {have}: open it at the precision the \
             pipeline names (`run.precision = \"auto\"` takes the device's)",
            k.describe()
        ),
    };
    Err(DtlError::config("pipeline", "run.precision", None, why))
}
