//! The generic training and evaluation loop of dtl.

use dfdx::prelude::Cpu;
use dtl_core::{Backbone, BuildContext, DtlError, Job, PipelineConfig, Result};

/// Instantiates the training job for one backbone variant.
///
/// A backbone plugin calls this from its registration's constructor after loading weights.
pub fn build_job<B>(cfg: &PipelineConfig, cx: &BuildContext, backbone: B) -> Result<Box<dyn Job>>
where
    B: Backbone<Cpu> + Send + Sync,
{
    let _ = (cfg, cx, backbone);
    Err(DtlError::Unavailable(
        "the training loop is not available in this build".into(),
    ))
}
