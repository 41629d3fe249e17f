//! The generic training and evaluation loop of dtl.
//!
//! - [`sides`]: the built-in side networks `dtl`, `dtl+`, `linear` and the `linear` head,
//!   registered in the component registry.
//! - [`device`]: the devices training runs on (`Cpu`; `Cuda` with the `cuda` feature).
//! - [`model`]: a frozen backbone, side network and head composed, with memory-lean training.
//! - [`optim`]: AdamW with parameter groups, gradient clipping and the cosine schedule.
//! - [`job`]: training, resuming, evaluation; [`checkpoint`] and [`report`] write the files.
//! - [`bench`]: throughput and peak memory.
//! - [`toy`]: a tiny backbone for tests and examples.

#![warn(missing_docs)]

pub mod bench;
pub mod checkpoint;
pub mod data;
pub mod device;
pub mod generic_ops;
pub mod job;
pub mod model;
pub mod ops;
pub mod optim;
pub mod report;
pub mod sides;
pub mod toy;

use dfdx::prelude::Cpu;
use dtl_core::config::DeviceSpec;
use dtl_core::{Backbone, BuildContext, DtlError, Job, PipelineConfig, Result};

pub use job::{DtlJob, MemoryProbe};

/// Instantiates the training job for one backbone variant on the CPU.
///
/// A backbone plugin calls this from its registration's constructor after loading weights
/// (and [`build_job_cuda`] when the pipeline asks for `cuda:N` and the plugin has a GPU
/// implementation). The job opens the pipeline's data on first use.
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
    if let DeviceSpec::Cuda(n) = cfg.device()? {
        return Err(DtlError::Unavailable(format!(
            "run.device = \"cuda:{n}\": backbone `{}` runs on the CPU only in this build; \
             rebuild with `--features cuda` (see docs/cuda.md) or set run.device = \"cpu\"",
            backbone.spec().name
        )));
    }
    Ok(Box::new(DtlJob::new(cfg, cx, backbone, Cpu::default())))
}

/// Instantiates the training job for a backbone on a CUDA GPU (feature `cuda`): the side
/// network, head, loss and optimizer run on `dev`; `memory` reports the GPU memory in use
/// for reports and benchmarks.
#[cfg(feature = "cuda")]
pub fn build_job_cuda<B>(
    cfg: &PipelineConfig,
    cx: &BuildContext,
    backbone: B,
    dev: dfdx::prelude::Cuda,
    memory: Option<MemoryProbe>,
) -> Result<Box<dyn Job>>
where
    B: Backbone<dfdx::prelude::Cuda> + Send + Sync + 'static,
{
    if cfg.run.precision != "f32" {
        return Err(DtlError::Unavailable(format!(
            "run.precision = \"{}\": the GPU path trains in f32 in this version; set run.precision = \"f32\"",
            cfg.run.precision
        )));
    }
    let job = DtlJob::new(cfg, cx, backbone, dev);
    Ok(Box::new(match memory {
        Some(m) => job.with_memory_probe(m),
        None => job,
    }))
}
