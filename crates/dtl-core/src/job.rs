//! The type-erased runnable pipeline a backbone registration builds.

use std::path::PathBuf;

use crate::Result;

/// What `dtl run`, `dtl eval` and `dtl bench` hand to a job besides the pipeline.
#[derive(Debug, Clone, Default)]
pub struct RunEnv {
    /// The run directory: resolved pipeline, metrics, checkpoints and reports go here.
    pub run_dir: PathBuf,
    /// Show progress bars (off in tests and when stderr is not a terminal).
    pub progress: bool,
    /// Resume from this checkpoint (or run directory) instead of starting afresh.
    pub resume: Option<PathBuf>,
}

/// Options of a throughput/memory benchmark.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Batch sizes to measure.
    pub batches: Vec<usize>,
    /// Timed steps per batch size (after warm-up).
    pub steps: usize,
    /// Warm-up steps per batch size.
    pub warmup: usize,
    /// What to measure: `forward`, `train`, `vjp`.
    pub what: Vec<String>,
    /// Time every kernel, product and copy of the timed training steps (`dtl bench
    /// --profile`; a CUDA device only, graphs off meanwhile).
    pub profile: bool,
}

/// A pipeline instantiated for one backbone variant, ready to train, evaluate or benchmark.
///
/// Reports are JSON objects so that every backbone family can add its own fields; the
/// runner documents the keys it writes.
///
/// ```
/// use dtl_core::{Job, RunEnv, BenchOptions, Result};
/// struct Nothing;
/// impl Job for Nothing {
///     fn train(&mut self, _env: &RunEnv) -> Result<serde_json::Value> { Ok(serde_json::json!({"top1": 0.0})) }
///     fn evaluate(&mut self, _env: &RunEnv, _ckpt: &std::path::Path) -> Result<serde_json::Value> { Ok(serde_json::json!({})) }
///     fn bench(&mut self, _opts: &BenchOptions) -> Result<serde_json::Value> { Ok(serde_json::json!({})) }
/// }
/// assert_eq!(Nothing.train(&RunEnv::default()).unwrap()["top1"], 0.0);
/// ```
pub trait Job {
    /// Trains (or resumes), evaluates, writes metrics, checkpoints and the report; returns the report.
    fn train(&mut self, env: &RunEnv) -> Result<serde_json::Value>;
    /// Evaluates a checkpoint on the pipeline's test split.
    fn evaluate(&mut self, env: &RunEnv, checkpoint: &std::path::Path)
        -> Result<serde_json::Value>;
    /// Measures throughput and memory.
    fn bench(&mut self, opts: &BenchOptions) -> Result<serde_json::Value>;
}
