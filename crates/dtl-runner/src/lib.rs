//! The generic training and evaluation loop of dtl.
//!
//! - [`sides`]: the built-in side networks `dtl`, `dtl+`, `linear` and the `linear` head,
//!   registered in the component registry.
//! - [`model`]: a frozen backbone, side network and head composed, with memory-lean training.
//! - [`optim`]: AdamW with parameter groups, gradient clipping and the cosine schedule.
//! - [`job`]: training, resuming, evaluation; [`checkpoint`] and [`report`] write the files.
//! - [`bench`]: throughput and peak memory.
//! - [`toy`]: a tiny backbone for tests and examples.

#![warn(missing_docs)]

pub mod bench;
pub mod checkpoint;
pub mod data;
pub mod job;
pub mod model;
pub mod ops;
pub mod optim;
pub mod report;
pub mod sides;
pub mod toy;

use dfdx::prelude::Cpu;
use dtl_core::{Backbone, BuildContext, Job, PipelineConfig, Result};

pub use job::DtlJob;

/// Instantiates the training job for one backbone variant.
///
/// A backbone plugin calls this from its registration's constructor after loading weights.
/// The job opens the pipeline's data on first use.
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
    B: Backbone<Cpu> + Send + Sync,
{
    if let dtl_core::config::DeviceSpec::Cuda(n) = cfg.device()? {
        return Err(dtl_core::DtlError::Unavailable(format!(
            "run.device = \"cuda:{n}\": the training loop runs on the CPU in this version (the \
             CUDA kernels and the GPU ViT exist, the runner does not drive them yet); set \
             run.device = \"cpu\""
        )));
    }
    Ok(Box::new(DtlJob::new(cfg, cx, backbone)))
}
