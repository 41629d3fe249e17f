//! Throughput and peak memory of training steps on synthetic batches.

use std::sync::Arc;
use std::time::Instant;

use dfdx::prelude::*;
use dtl_core::{Backbone, BenchOptions, DtlError, PipelineConfig, Result};
use serde_json::Value;

use crate::device::{dev_err, TrainDevice};
use crate::model::smoothed_targets;
use crate::optim::AdamW;
use crate::report::{self, BenchReport, BenchRow};
use crate::step::{build_model, drop_masks, train_step};

/// Side networks measured by `train`: the pipeline's own settings with each kind.
pub(crate) const KINDS: [&str; 3] = ["dtl", "dtl+", "linear"];

/// What `dtl bench --what` measures.
///
/// ```
/// use dtl_runner::bench::Measurement;
/// assert_eq!("vjp".parse::<Measurement>().unwrap(), Measurement::Vjp);
/// assert_eq!(Measurement::Train.as_str(), "train");
/// let e = "speed".parse::<Measurement>().unwrap_err().to_string();
/// assert_eq!(e, "bench: `speed` is not a measurement; use train, forward or vjp");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Measurement {
    /// A whole training step of each built-in side network.
    Train,
    /// The frozen backbone's forward pass.
    Forward,
    /// The forward pass and every block's input-only VJP.
    Vjp,
}

impl Measurement {
    /// Every measurement, in the order of [`MEASUREMENTS`].
    pub const ALL: [Measurement; 3] = [Measurement::Train, Measurement::Forward, Measurement::Vjp];

    /// The name used by `--what` and in the `what` field of a row.
    pub fn as_str(self) -> &'static str {
        match self {
            Measurement::Train => "train",
            Measurement::Forward => "forward",
            Measurement::Vjp => "vjp",
        }
    }
}

impl std::str::FromStr for Measurement {
    type Err = DtlError;
    fn from_str(s: &str) -> Result<Self> {
        Measurement::ALL
            .into_iter()
            .find(|m| m.as_str() == s)
            .ok_or_else(|| {
                DtlError::argument(format!(
                    "bench: `{s}` is not a measurement; use train, forward or vjp"
                ))
            })
    }
}

impl std::fmt::Display for Measurement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The measurements `dtl bench --what` knows.
pub const MEASUREMENTS: [&str; 3] = ["train", "forward", "vjp"];

/// Parses `--what` values into [`Measurement`]s (the one place they are checked).
///
/// ```
/// use dtl_runner::bench::{parse_what, Measurement};
/// assert_eq!(parse_what(&["train".into()]).unwrap(), vec![Measurement::Train]);
/// assert!(parse_what(&["speed".into()]).is_err());
/// ```
pub fn parse_what(what: &[String]) -> Result<Vec<Measurement>> {
    what.iter().map(|w| w.parse()).collect()
}

/// Checks `--what` values with [`parse_what`] and returns them as given.
///
/// ```
/// assert!(dtl_runner::bench::check_what(&["train".into()]).is_ok());
/// let e = dtl_runner::bench::check_what(&["speed".into()]).unwrap_err().to_string();
/// assert!(e.contains("train, forward or vjp"));
/// ```
pub fn check_what(what: &[String]) -> Result<Vec<String>> {
    parse_what(what)?;
    Ok(what.to_vec())
}

/// The pipeline with side network `kind`, its other side settings kept. The conv kernel
/// follows the side network's registered default: none for one without a conv (`dtl`), the
/// pipeline's kernel or the default for one with a conv (`dtl+`: 3).
pub(crate) fn with_side(cfg: &PipelineConfig, kind: &str) -> PipelineConfig {
    let mut c = cfg.clone();
    c.side.kind = kind.to_string();
    let traits = dtl_core::registry::side_traits(kind);
    if traits.taps {
        if traits.default_kernel == 0 {
            c.side.kernel = Some(0);
        } else if c.side.kernel_size() == 0 {
            c.side.kernel = Some(traits.default_kernel);
        }
    }
    c
}

/// Throughput and memory of one measurement.
struct Measured {
    img_per_s: f64,
    peak_rss_mib: Option<f64>,
}

fn measure(
    warmup: usize,
    steps: usize,
    batch: usize,
    mut f: impl FnMut() -> Result<()>,
) -> Result<Measured> {
    for _ in 0..warmup {
        f()?;
    }
    report::reset_peak_rss();
    let t = Instant::now();
    for _ in 0..steps.max(1) {
        f()?;
    }
    let secs = t.elapsed().as_secs_f64();
    Ok(Measured {
        img_per_s: (steps.max(1) * batch) as f64 / secs.max(1e-12),
        peak_rss_mib: report::peak_rss_mib(),
    })
}

fn row(what: &str, side: &str, batch: usize, m: &Measured, params: Option<usize>) -> BenchRow {
    BenchRow {
        what: Some(what.to_string()),
        side: Some(side.to_string()),
        batch: Some(batch),
        img_per_s: Some(m.img_per_s),
        peak_rss_mib: m.peak_rss_mib,
        trainable_params: params,
        ..BenchRow::default()
    }
}

/// A naive all-traced training step for comparison: dfdx's own autodiff through a
/// post-norm transformer encoder of the same width, heads, MLP width, depth and token
/// count (every activation and every weight gradient kept, as autodiff does), on random
/// input, loss = mean of the output.
fn naive_autodiff<const M: usize, const H: usize, const F: usize, const L: usize>(
    tokens: usize,
    batch: usize,
    warmup: usize,
    steps: usize,
) -> Result<Measured> {
    use dfdx::nn::{BuildOnDevice, Module, ZeroGrads};
    let dev = Cpu::seed_from_u64(0);
    let enc = dfdx::nn::builders::TransformerEncoder::<M, H, F, L>::try_build_on_device(&dev)
        .map_err(dev_err)?;
    let x: Tensor<(usize, usize, Const<M>), f32, Cpu> =
        dev.sample_normal_like(&(batch, tokens, Const));
    measure(warmup, steps, batch, || {
        let grads = enc.try_alloc_grads().map_err(dev_err)?;
        let y = enc.try_forward(x.trace(grads)).map_err(dev_err)?;
        let g = y.mean().backward();
        drop(g);
        Ok(())
    })
}

/// The naive comparison for the geometries it is instantiated for (ViT-Ti, ViT-S, ViT-B).
fn naive_for(
    spec: &dtl_core::BackboneSpec,
    batch: usize,
    warmup: usize,
    steps: usize,
) -> Result<Option<Measured>> {
    let t = spec.tokens();
    Ok(
        match (spec.width, spec.heads, spec.mlp_hidden, spec.depth) {
            (192, 3, 768, 12) => Some(naive_autodiff::<192, 3, 768, 12>(t, batch, warmup, steps)?),
            (384, 6, 1536, 12) => {
                Some(naive_autodiff::<384, 6, 1536, 12>(t, batch, warmup, steps)?)
            }
            (768, 12, 3072, 12) => Some(naive_autodiff::<768, 12, 3072, 12>(
                t, batch, warmup, steps,
            )?),
            _ => None,
        },
    )
}

/// Runs the benchmark described by `opts` (`what`: `train`, `forward`, `vjp`) on `dev` and
/// returns the report: `backbone`, `image_size`, `device`, `precision` (always
/// [`CPU_PRECISION`]) and one JSON row per measurement: `what`, `side`, `batch`, `img_per_s`,
/// `peak_rss_mib`, `peak_gpu_mib`.
///
/// `train` measures a full step (forward, backward, AdamW) of `dtl`, `dtl+` and `linear`
/// with the pipeline's side settings, then, on the CPU and for ViT-Ti/S/B geometries, a
/// naive all-traced step (`side = "naive-autodiff"`, see `naive_autodiff`). `peak_rss_mib`
/// is the process's peak resident set size during the timed steps (reset before each
/// measurement); `peak_gpu_mib` is `null` (see [`crate::resident::bench`] for a GPU).
/// dfdx's buffer cache is emptied before each training measurement.
pub fn run<B: Backbone<D>, D: TrainDevice>(
    cfg: &PipelineConfig,
    backbone: &Arc<B>,
    dev: &D,
    opts: &BenchOptions,
) -> Result<Value> {
    let spec = backbone.spec().clone();
    let s = spec.image_size;
    let classes = cfg.head.classes.unwrap_or(10);
    let rng = Cpu::seed_from_u64(cfg.run.seed);
    let mut rows = Vec::new();
    let what = parse_what(&opts.what)?;
    if opts.profile {
        return Err(DtlError::argument(format!(
            "bench: {PROFILE_NEEDS_CUDA}; this pipeline runs on {}",
            cfg.run.device
        )));
    }
    for &batch in &opts.batches {
        if batch == 0 {
            return Err(DtlError::argument("bench: batch sizes must be at least 1"));
        }
        let host: Tensor<(usize, Const<3>, usize, usize), f32, Cpu> =
            rng.sample_normal_like(&(batch, Const::<3>, s, s));
        let images: dtl_core::Images<D> = dev.tensor_from_vec(host.as_vec(), *host.shape());
        let labels: Vec<usize> = (0..batch).map(|i| i % classes).collect();
        let targets = smoothed_targets(&labels, classes, 0.0);
        for what in &what {
            match what {
                Measurement::Train => {
                    for kind in KINDS {
                        let c = with_side(cfg, kind);
                        // Buffers the previous measurement left in dfdx's cache are not this
                        // one's memory.
                        dev.try_empty_cache().map_err(dev_err)?;
                        let mut model = build_model(&c, backbone, classes, dev)?;
                        let mut opt = AdamW::from_config(&c.optim, &model.params(), dev);
                        let mut step = 0u64;
                        let m = measure(opts.warmup, opts.steps, batch, || {
                            let drops = drop_masks(
                                c.backbone.drop_path,
                                spec.depth,
                                batch,
                                c.run.seed,
                                step,
                            );
                            step += 1;
                            train_step(
                                &mut model, &mut opt, &images, &targets, &drops, c.optim.lr, None,
                            )
                            .map(|_| ())
                        })?;
                        let mut r = row("train", kind, batch, &m, Some(model.trainable_params()));
                        // the tape-based path always recomputes the blocks' internals
                        r.activations = Some("recompute".into());
                        rows.push(r);
                    }
                    if let Some(m) = naive_for(&spec, batch, opts.warmup, opts.steps)? {
                        let mut r = row("train", "naive-autodiff", batch, &m, None);
                        r.activations = Some("store".into());
                        rows.push(r);
                    }
                }
                Measurement::Forward => {
                    let m = measure(opts.warmup, opts.steps, batch, || {
                        let mut x = backbone.embed(&images)?;
                        for i in 0..spec.depth {
                            x = backbone.block_forward(i, &x, None)?;
                        }
                        Ok(())
                    })?;
                    rows.push(row("forward", "none", batch, &m, None));
                }
                Measurement::Vjp => {
                    let x0 = backbone.embed(&images)?;
                    let m = measure(opts.warmup, opts.steps, batch, || {
                        let mut x = x0.clone();
                        let mut inputs = Vec::with_capacity(spec.depth);
                        for i in 0..spec.depth {
                            inputs.push(x.clone());
                            x = backbone.block_forward(i, &x, None)?;
                        }
                        let mut g = x;
                        for i in (0..spec.depth).rev() {
                            g = backbone.block_vjp(i, &inputs[i], &g, None)?;
                        }
                        Ok(())
                    })?;
                    rows.push(row("vjp", "none", batch, &m, None));
                }
            }
        }
    }
    let mut report = BenchReport {
        backbone: Some(spec.name.clone()),
        image_size: Some(s),
        device: Some(cfg.run.device.to_string()),
        rows,
    }
    .to_json();
    // The CPU path computes in f32 whatever `run.precision` says (`auto` is f32 here and bf16
    // is refused up front), and tables of several runs tell them apart by this field.
    report["precision"] = serde_json::json!(CPU_PRECISION);
    Ok(report)
}

/// The precision every `dtl bench` measurement on the CPU runs in (the report's `precision`).
///
/// ```
/// assert_eq!(dtl_runner::bench::CPU_PRECISION, "f32");
/// ```
pub const CPU_PRECISION: &str = "f32";

/// Why `dtl bench --profile` refuses a device without a kernel profiler.
///
/// ```
/// assert!(dtl_runner::bench::PROFILE_NEEDS_CUDA.contains("--profile"));
/// ```
pub const PROFILE_NEEDS_CUDA: &str =
    "--profile times the kernels of a CUDA device and needs run.device = \"cuda:N\" (or \"auto\" on a machine with a GPU)";

/// The `graph` of a training row measured with `--profile`: events inside a graph capture
/// time nothing, so the profiled steps run as plain launches.
///
/// ```
/// assert!(dtl_runner::bench::PROFILE_GRAPH.starts_with("off"));
/// ```
pub const PROFILE_GRAPH: &str =
    "off (kernel profiling: events inside a graph capture time nothing)";

/// The timed steps start here: with `--profile`, every operation the device issues from now
/// on is timed (the device refuses when it has no profiler).
pub(crate) fn profile_start<K: dtl_kernels::Kernels>(k: &K, opts: &BenchOptions) -> Result<()> {
    if !opts.profile {
        return Ok(());
    }
    k.profile_start()
        .map_err(|e| DtlError::Unavailable(format!("bench: {PROFILE_NEEDS_CUDA} ({e})")))
}

/// The timed steps (`steps` of them) ended and the device was waited for: the profile, if
/// one was running.
pub(crate) fn profile_take<K: dtl_kernels::Kernels>(
    k: &K,
    steps: usize,
) -> Result<Option<report::BenchProfile>> {
    Ok(k.profile_take()?
        .map(|p| report::BenchProfile::from_kernels(&p, steps, "")))
}

/// Marks a profiled training row (JSON) as run without graphs, in the row and its profile.
pub(crate) fn note_profiled_graph(row: &mut Value) {
    if row.get("profile").is_some_and(|p| p.is_object()) {
        row["graph"] = serde_json::json!(PROFILE_GRAPH);
        row["profile"]["graph"] = serde_json::json!(PROFILE_GRAPH);
    }
}

/// Whether `dtl bench` measures the training row of side network `kind` at activation policy
/// `mode`: every row, but with `--profile` only the pipeline's own side network at its own
/// `run.activations` (a breakdown is read one configuration at a time).
pub(crate) fn measured(cfg: &PipelineConfig, opts: &BenchOptions, kind: &str, mode: &str) -> bool {
    !opts.profile || (kind == cfg.side.kind && (kind == "linear" || mode == cfg.run.activations))
}

/// Checks that `dtl bench --profile` has a row to profile: the pipeline's side network must be
/// one `dtl bench` trains (`dtl`, `dtl+` or `linear`).
///
/// ```
/// let cfg = dtl_core::PipelineConfig::from_str(
///     "[backbone]\nkind = \"vit_test_patch8_32\"\n[side]\nkind = \"dtl\"\n[data]\nkind = \"synthetic\"\nroot = \".\"\n",
///     "p.toml".as_ref(),
///     &[],
/// )
/// .unwrap();
/// assert!(dtl_runner::bench::check_profile(&cfg).is_ok());
/// ```
pub fn check_profile(cfg: &PipelineConfig) -> Result<()> {
    if KINDS.contains(&cfg.side.kind.as_str()) {
        return Ok(());
    }
    Err(DtlError::argument(format!(
        "bench: --profile times the training row of the pipeline's side network (side.kind), \
         and `{}` is not one dtl bench trains; use side.kind = \"dtl\", \"dtl+\" or \"linear\"",
        cfg.side.kind
    )))
}
