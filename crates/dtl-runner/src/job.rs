//! The training job: train, resume, evaluate and benchmark one pipeline on a training device.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dfdx::prelude::*;
use dtl_core::{
    Backbone, BenchOptions, BuildContext, DropPath, DtlError, Job, Param, PipelineConfig, Result,
    RunEnv,
};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};

use crate::checkpoint::{self, Checkpoint};
use crate::data::{Batch, BatchIter, BatchSource};
use crate::model::{smoothed_targets, Model};
use crate::optim::{AdamW, Schedule};
use crate::report::{self, Metrics};
use crate::step;

/// How often `last.safetensors` is refreshed inside an epoch (it is always written at the
/// end of an epoch).
const CHECKPOINT_EVERY: Duration = Duration::from_secs(60);

/// Where training stands; saved in every checkpoint.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
struct Position {
    /// The epoch in progress (or the next one when `batch` is 0).
    epoch: usize,
    /// Batches of `epoch` already trained.
    batch: usize,
    /// Optimizer steps taken in total.
    step: u64,
    optim_steps: u64,
    best_top1: Option<f64>,
    best_epoch: Option<usize>,
    epoch_loss_sum: f64,
    epoch_loss_count: usize,
    images_trained: u64,
    train_seconds: f64,
    wall_seconds: f64,
    /// Fingerprints of the weights and data files ([`crate::inputs::fingerprint`]).
    #[serde(default)]
    inputs: Value,
}

/// Results of one evaluation pass.
#[derive(Debug, Clone, Copy)]
pub struct EvalResult {
    /// Top-1 accuracy in [0, 1].
    pub top1: f64,
    /// Top-5 accuracy in [0, 1].
    pub top5: f64,
    /// Mean cross-entropy.
    pub loss: f64,
    /// Images evaluated.
    pub images: usize,
}

/// The value a class subset adds to the logit of every class outside it before the counts
/// (see [`dtl_core::config::ClassSubset`]): far below any logit, yet finite, so that the
/// non-finite checks still see only what the model produced and the loss over the subset is
/// the cross-entropy of the kept classes.
pub const MASKED_LOGIT: f32 = -1.0e30;

/// The additive mask of a class subset: 0 for the `keep` classes, [`MASKED_LOGIT`] for the
/// other classes of `classes`.
///
/// ```
/// let m = dtl_runner::job::subset_mask(&[0, 2], 3);
/// assert_eq!(m, vec![0.0, dtl_runner::job::MASKED_LOGIT, 0.0]);
/// ```
pub fn subset_mask(keep: &[usize], classes: usize) -> Vec<f32> {
    let mut m = vec![MASKED_LOGIT; classes];
    for &k in keep {
        if k < classes {
            m[k] = 0.0;
        }
    }
    m
}

/// The additive mask of a class subset and the number of classes it keeps.
type ClassMask = (Vec<f32>, usize);

/// One extra test set of a run, open.
struct TestSet {
    /// The name it is reported under.
    name: String,
    /// Its pipeline (test split only).
    data: Box<dyn BatchSource>,
    /// The additive class mask, when it is scored over a subset.
    mask: Option<Vec<f32>>,
    /// Classes it is scored over.
    scored: usize,
    /// Also evaluated during training.
    during_training: bool,
}

/// Reports the device memory the process holds, in MiB (a GPU's used memory).
pub type MemoryProbe = Arc<dyn Fn() -> Option<f64> + Send + Sync>;

/// A model and its optimizer on one device, as the training loop drives them: the tape-based
/// CPU model ([`CpuEngine`]) or the device step over the kernel set
/// ([`crate::resident::ResidentEngine`]).
///
/// Parameters cross to the host only for checkpoints, in the CPU model's order and names, so
/// a checkpoint written by one engine loads into any other.
pub trait Engine {
    /// Number of trainable scalars.
    fn trainable_params(&self) -> usize;
    /// Optimizer steps taken.
    fn optim_steps(&self) -> u64;
    /// The parameters on the host (for checkpoints).
    fn host_params(&self) -> Result<Vec<Param<Cpu>>>;
    /// The optimizer state on the host (for checkpoints).
    fn host_optim(&self) -> Result<AdamW<Cpu>>;
    /// Loads a checkpoint's parameters and, with `optim`, its optimizer state.
    fn load(&mut self, ck: &Checkpoint, optim: bool) -> Result<()>;
    /// One optimisation step on `batch` with `targets` `(n, classes)`. Returns the loss when
    /// `read_loss` asks for it (a device may then wait for the step to finish) or when it is
    /// known anyway.
    #[allow(clippy::too_many_arguments)]
    fn train_step(
        &mut self,
        batch: &Batch,
        targets: &[f32],
        drops: &[Option<Arc<DropPath>>],
        lr: f64,
        clip: Option<f64>,
        read_loss: bool,
    ) -> Result<Option<f32>>;
    /// The sum of the losses of the steps since [`Engine::set_loss_sum`].
    fn loss_sum(&self) -> Result<f64>;
    /// Restarts the loss sum at `value` (0 at an epoch's start, the stored sum on resume).
    fn set_loss_sum(&mut self, value: f64) -> Result<()>;
    /// Evaluates on `batches`.
    fn evaluate(&mut self, batches: Box<dyn BatchIter>) -> Result<EvalResult>;
    /// Evaluates on `batches` with `mask` (one value per class, 0 or [`MASKED_LOGIT`]) added
    /// to every row of logits before top-1, top-5 and the loss are counted.
    fn evaluate_masked(
        &mut self,
        batches: Box<dyn BatchIter>,
        mask: Option<&[f32]>,
    ) -> Result<EvalResult>;
    /// Device memory in MiB, for reports.
    fn memory_mib(&self) -> Option<f64> {
        None
    }
    /// The device, in words.
    fn device(&self) -> String;
    /// The precision the engine trains at (`f32` or `bf16`: `run.precision` resolved).
    fn precision(&self) -> String {
        "f32".to_string()
    }
    /// Whether the training step replays a recorded graph: `captured`, or why not; `None`
    /// for an engine that never records one (the tape-based CPU path).
    fn graph(&self) -> Option<String> {
        None
    }
}

/// What makes the [`Engine`] of a pipeline once its class count is known, and benchmarks it.
pub trait EngineSource: Send {
    /// The engine it makes.
    type Engine: Engine;
    /// The frozen backbone's numbers.
    fn spec(&self) -> &dtl_core::BackboneSpec;
    /// A freshly initialised engine for `classes` classes.
    fn engine(&self, cfg: &PipelineConfig, classes: usize) -> Result<Self::Engine>;
    /// `dtl bench` on this source (see [`crate::bench::run`]).
    fn bench(&self, cfg: &PipelineConfig, opts: &BenchOptions) -> Result<Value>;
}

/// The runnable pipeline: the training loop, resume, evaluation and benchmarks, over an
/// [`EngineSource`]; see [`crate::build_job`] and [`crate::build_resident_job`].
pub struct Trainer<S: EngineSource> {
    cfg: PipelineConfig,
    pipeline_file: PathBuf,
    source: S,
    data: Option<Box<dyn BatchSource>>,
    /// The validation split's pipeline (`eval.val`), opened on first use.
    val_data: Option<Box<dyn BatchSource>>,
    /// The extra test sets (`eval.tests`), opened with the training data.
    tests: Option<Vec<TestSet>>,
    /// The class mask of `data.test` (`eval.test_classes`) and the classes it keeps.
    test_mask: Option<ClassMask>,
    checkpoint_every: Duration,
    step_limit: Option<u64>,
}

/// The CPU job of a backbone: the tape-based model ([`Model`]) and [`AdamW`] on dfdx's `Cpu`.
pub type DtlJob<B> = Trainer<CpuSource<B>>;

fn pos_state(p: &Position) -> Value {
    serde_json::to_value(p).unwrap_or(Value::Null)
}

impl<S: EngineSource> Trainer<S> {
    /// A job for `cfg` over `source`; its data is opened on first use.
    pub fn with_source(cfg: &PipelineConfig, cx: &BuildContext, source: S) -> Self {
        Trainer {
            cfg: cfg.clone(),
            pipeline_file: cx.pipeline_file.clone(),
            source,
            data: None,
            val_data: None,
            tests: None,
            test_mask: None,
            checkpoint_every: CHECKPOINT_EVERY,
            step_limit: None,
        }
    }

    /// Uses `data` instead of the data crate's pipeline (generated data, tests, examples).
    pub fn with_data(mut self, data: Box<dyn BatchSource>) -> Self {
        self.data = Some(data);
        self
    }

    /// Refreshes `last.safetensors` inside an epoch at most this often (default 60 s; zero
    /// writes it after every step).
    pub fn with_checkpoint_interval(mut self, every: Duration) -> Self {
        self.checkpoint_every = every;
        self
    }

    /// Stops after this many optimizer steps in total, leaving `last.safetensors` where a
    /// later [`RunEnv::resume`] picks up (a time-boxed run, or a simulated interruption).
    pub fn with_step_limit(mut self, steps: u64) -> Self {
        self.step_limit = Some(steps);
        self
    }

    /// The engine source.
    pub fn source(&self) -> &S {
        &self.source
    }

    fn data(&mut self) -> Result<&mut Box<dyn BatchSource>> {
        if self.data.is_none() {
            self.data = Some(crate::data::open_pipeline(
                &self.cfg,
                self.source.spec().image_size,
            )?);
        }
        Ok(self.data.as_mut().expect("data opened above"))
    }

    /// Evaluates `engine` on the test split (over `eval.test_classes` when set).
    pub fn evaluate_engine(&mut self, engine: &mut S::Engine) -> Result<EvalResult> {
        let loader = self.data()?.test_loader()?;
        match &self.test_mask {
            Some((m, _)) => engine.evaluate_masked(loader, Some(m)),
            None => engine.evaluate(loader),
        }
    }

    /// Opens the extra test sets of `eval.tests` and the class subset of `eval.test_classes`
    /// for a head of `classes` classes, unless they are open. Every error names the key.
    fn open_tests(&mut self, classes: usize) -> Result<()> {
        if self.tests.is_some() {
            return Ok(());
        }
        let (mask, sets) = open_test_sets(&self.cfg, self.source.spec().image_size, classes)?;
        self.test_mask = mask;
        self.tests = Some(sets);
        Ok(())
    }

    /// Evaluates `engine` on every extra test set (with `during_training`, only those that ask
    /// to be evaluated during training): `(name, result, classes scored)` in `eval.tests` order.
    fn evaluate_tests(
        &mut self,
        engine: &mut S::Engine,
        during_training: bool,
    ) -> Result<Vec<(String, EvalResult, usize)>> {
        let mut out = Vec::new();
        for t in self.tests.iter_mut().flatten() {
            if during_training && !t.during_training {
                continue;
            }
            let loader = t.data.test_loader()?;
            let r = engine
                .evaluate_masked(loader, t.mask.as_deref())
                .map_err(|e| DtlError::invalid(format!("test set `{}`: {e}", t.name)))?;
            out.push((t.name.clone(), r, t.scored));
        }
        Ok(out)
    }

    /// Opens the validation split `eval.val` (read with the test transforms) unless it is
    /// open; an error names the key and the split, and a class count that differs from the
    /// training split's is refused.
    fn open_val(&mut self, val: &str) -> Result<()> {
        if self.val_data.is_some() {
            return Ok(());
        }
        let mut cfg = self.cfg.clone();
        cfg.data.test = val.to_string();
        let d = crate::data::open_pipeline(&cfg, self.source.spec().image_size).map_err(|e| {
            DtlError::invalid(format!(
                "eval.val = \"{val}\": cannot open the validation split: {e}"
            ))
        })?;
        let (v, t) = (d.num_classes(), self.data()?.num_classes());
        if v != t {
            return Err(DtlError::invalid(format!(
                "eval.val = \"{val}\": the validation split has {v} classes, the training split {t}; name a split of the same dataset"
            )));
        }
        self.val_data = Some(d);
        Ok(())
    }

    /// Evaluates `engine` where training evaluates: the validation split `eval.val` when the
    /// pipeline names one (read with the test transforms), else the test split.
    pub fn evaluate_during_training(&mut self, engine: &mut S::Engine) -> Result<EvalResult> {
        let Some(val) = self.cfg.eval.val.clone() else {
            return self.evaluate_engine(engine);
        };
        self.open_val(&val)?;
        let loader = self
            .val_data
            .as_mut()
            .expect("validation data opened above")
            .test_loader()?;
        engine.evaluate(loader)
    }

    fn steps_per_epoch(&mut self) -> Result<usize> {
        let n = self.data()?.train_len();
        let b = self.cfg.data.batch_size.max(1);
        Ok(if self.cfg.data.drop_last {
            n / b
        } else {
            n.div_ceil(b)
        })
    }

    fn save(&self, path: &Path, engine: &S::Engine, optim: bool, pos: &Position) -> Result<()> {
        let params = engine.host_params()?;
        let opt = if optim {
            Some(engine.host_optim()?)
        } else {
            None
        };
        checkpoint::save(
            path,
            &params.iter().collect::<Vec<_>>(),
            opt.as_ref(),
            &self.cfg.to_toml(),
            &pos_state(pos),
        )
    }
}

impl<B: Backbone<Cpu> + Send + Sync> Trainer<CpuSource<B>> {
    /// The CPU job for `cfg` on `backbone`; its data is opened on first use.
    pub fn new(cfg: &PipelineConfig, cx: &BuildContext, backbone: B, dev: Cpu) -> Self {
        Trainer::with_source(
            cfg,
            cx,
            CpuSource {
                backbone: Arc::new(backbone),
                dev,
            },
        )
    }

    /// The model of this pipeline with freshly initialised side network and head.
    pub fn build_model(&self, classes: usize) -> Result<Model<B, Cpu>> {
        step::build_model(&self.cfg, &self.source.backbone, classes, &self.source.dev)
    }

    /// Evaluates `model` on the test split.
    pub fn evaluate_model(&mut self, model: &Model<B, Cpu>) -> Result<EvalResult> {
        let image_size = self.source.spec().image_size;
        let loader = self.data()?.test_loader()?;
        evaluate_cpu(model, &self.source.dev, image_size, loader, None)
    }
}

/// The frozen backbone of a CPU job and the dfdx device it trains on.
pub struct CpuSource<B> {
    backbone: Arc<B>,
    dev: Cpu,
}

/// The tape-based model and its optimizer on the CPU.
pub struct CpuEngine<B: Backbone<Cpu>> {
    model: Model<B, Cpu>,
    opt: AdamW<Cpu>,
    dev: Cpu,
    image_size: usize,
    loss_sum: f64,
}

impl<B: Backbone<Cpu> + Send + Sync> EngineSource for CpuSource<B> {
    type Engine = CpuEngine<B>;
    fn spec(&self) -> &dtl_core::BackboneSpec {
        self.backbone.spec()
    }
    fn engine(&self, cfg: &PipelineConfig, classes: usize) -> Result<CpuEngine<B>> {
        let model = step::build_model(cfg, &self.backbone, classes, &self.dev)?;
        let opt = AdamW::from_config(&cfg.optim, &model.params(), &self.dev);
        Ok(CpuEngine {
            model,
            opt,
            dev: self.dev.clone(),
            image_size: self.backbone.spec().image_size,
            loss_sum: 0.0,
        })
    }
    fn bench(&self, cfg: &PipelineConfig, opts: &BenchOptions) -> Result<Value> {
        crate::bench::run(cfg, &self.backbone, &self.dev, opts)
    }
}

/// A batch's images as a CPU tensor, checked against the image size.
fn cpu_images(dev: &Cpu, batch: &Batch, s: usize) -> Result<dtl_core::Images<Cpu>> {
    if batch.images.len() != batch.n * 3 * s * s || batch.labels.len() != batch.n {
        return Err(DtlError::shape(format!(
            "a batch of {} images needs {} values at {s}x{s}, got {} (and {} labels)",
            batch.n,
            batch.n * 3 * s * s,
            batch.images.len(),
            batch.labels.len()
        )));
    }
    Ok(dev.tensor_from_vec(batch.images.clone(), (batch.n, Const::<3>, s, s)))
}

/// Evaluates a CPU model on `batches`, with `mask` added to every row of logits first.
fn evaluate_cpu<B: Backbone<Cpu>>(
    model: &Model<B, Cpu>,
    dev: &Cpu,
    image_size: usize,
    batches: Box<dyn BatchIter>,
    mask: Option<&[f32]>,
) -> Result<EvalResult> {
    let classes = model.head.classes();
    let mut res = EvalResult {
        top1: 0.0,
        top5: 0.0,
        loss: 0.0,
        images: 0,
    };
    let (mut c1, mut c5) = (0usize, 0usize);
    for (step, batch) in batches.enumerate() {
        let batch = batch?;
        let images = cpu_images(dev, &batch, image_size)?;
        let mut logits = model.forward_eval(&images)?.as_vec();
        crate::sanity::finite_logits(&logits, classes, step, &batch.images)?;
        if let Some(m) = mask {
            check_mask(m, classes)?;
            for row in logits.chunks_exact_mut(classes) {
                row.iter_mut().zip(m).for_each(|(v, a)| *v += a);
            }
        }
        for (row, &l) in logits.chunks_exact(classes).zip(&batch.labels) {
            if l >= classes {
                return Err(DtlError::label_range(l, classes));
            }
            let above = row.iter().filter(|&&v| v > row[l]).count();
            c1 += (above == 0) as usize;
            c5 += (above < 5) as usize;
            let m = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
            let lse = m + row.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln();
            res.loss += lse - row[l] as f64;
        }
        res.images += batch.n;
    }
    if res.images > 0 {
        res.top1 = c1 as f64 / res.images as f64;
        res.top5 = c5 as f64 / res.images as f64;
        res.loss /= res.images as f64;
    }
    Ok(res)
}

impl<B: Backbone<Cpu> + Send + Sync> Engine for CpuEngine<B> {
    fn trainable_params(&self) -> usize {
        self.model.trainable_params()
    }
    fn optim_steps(&self) -> u64 {
        self.opt.steps
    }
    fn host_params(&self) -> Result<Vec<Param<Cpu>>> {
        Ok(self.model.params().into_iter().cloned().collect())
    }
    fn host_optim(&self) -> Result<AdamW<Cpu>> {
        Ok(self.opt.clone())
    }
    fn load(&mut self, ck: &Checkpoint, optim: bool) -> Result<()> {
        ck.apply(self.model.params_mut())?;
        if optim {
            let names: Vec<String> = self.model.params().iter().map(|p| p.name.clone()).collect();
            ck.apply_optim(&mut self.opt, &names)?;
        }
        Ok(())
    }
    fn train_step(
        &mut self,
        batch: &Batch,
        targets: &[f32],
        drops: &[Option<Arc<DropPath>>],
        lr: f64,
        clip: Option<f64>,
        _read_loss: bool,
    ) -> Result<Option<f32>> {
        let images = cpu_images(&self.dev, batch, self.image_size)?;
        let loss = step::train_step(
            &mut self.model,
            &mut self.opt,
            &images,
            targets,
            drops,
            lr,
            clip,
        )?;
        self.loss_sum += loss as f64;
        Ok(Some(loss))
    }
    fn loss_sum(&self) -> Result<f64> {
        Ok(self.loss_sum)
    }
    fn set_loss_sum(&mut self, value: f64) -> Result<()> {
        self.loss_sum = value;
        Ok(())
    }
    fn evaluate(&mut self, batches: Box<dyn BatchIter>) -> Result<EvalResult> {
        evaluate_cpu(&self.model, &self.dev, self.image_size, batches, None)
    }
    fn evaluate_masked(
        &mut self,
        batches: Box<dyn BatchIter>,
        mask: Option<&[f32]>,
    ) -> Result<EvalResult> {
        evaluate_cpu(&self.model, &self.dev, self.image_size, batches, mask)
    }
    fn device(&self) -> String {
        "cpu".into()
    }
}

fn set_threads(n: usize) {
    if n > 0 {
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global();
    }
}

/// What one call of [`Job::train`] carries from phase to phase: the engine, where training
/// stands, the open metrics file and the clocks.
struct TrainRun<E> {
    /// The model and its optimizer on the training device.
    engine: E,
    /// Classes of the head.
    classes: usize,
    /// Blocks of the backbone (one stochastic-depth mask each).
    depth: usize,
    /// `schedule.epochs`.
    epochs: usize,
    /// The learning rate of every step.
    sched: Schedule,
    /// Where training stands; saved in every checkpoint.
    pos: Position,
    /// `metrics.jsonl`, open for appending.
    metrics: Metrics,
    /// The run directory and the two checkpoints in it.
    run_dir: PathBuf,
    last_path: PathBuf,
    best_path: PathBuf,
    /// Show progress bars and epoch summaries.
    progress: bool,
    bar_style: ProgressStyle,
    /// Started with this call; `wall_before` is the wall time of the calls before it (resume).
    wall: Instant,
    wall_before: f64,
    /// When `last.safetensors` was last written.
    last_save: Instant,
    /// The last evaluation on the test split (none with a validation split).
    last_eval: Option<EvalResult>,
    /// The last loss the engine reported.
    last_loss: Option<f32>,
}

impl<E> TrainRun<E> {
    /// The wall time of the run so far, this call and the ones it resumes.
    fn wall_seconds(&self) -> f64 {
        self.wall_before + self.wall.elapsed().as_secs_f64()
    }
}

/// The targets of a training batch, `(n, classes)`: its soft targets (mixup, cutmix) when it
/// has them, else its labels one-hot with label smoothing `smoothing`.
fn batch_targets(batch: &Batch, classes: usize, smoothing: f64) -> Result<Vec<f32>> {
    match &batch.soft_targets {
        Some(s) if s.len() == batch.n * classes => Ok(s.clone()),
        Some(s) => Err(DtlError::shape(format!(
            "soft targets hold {} values, expected {} images x {classes} classes",
            s.len(),
            batch.n
        ))),
        None => {
            if let Some(&l) = batch.labels.iter().find(|&&l| l >= classes) {
                return Err(DtlError::argument(format!(
                    "label {l} is out of range for {classes} classes (head.classes)"
                )));
            }
            Ok(smoothed_targets(&batch.labels, classes, smoothing))
        }
    }
}

/// Warns that the checkpoint `path` is resumed with `what` (`"inputs that differ from the
/// ones"`) it was trained with, one line per difference; silent when there is none.
fn warn_differences(path: &Path, what: &str, differences: &[String]) {
    if differences.is_empty() {
        return;
    }
    eprintln!(
        "warning: resuming {} with {what} it was trained with:",
        path.display()
    );
    for c in differences {
        eprintln!("  {c}");
    }
}

/// The phases of [`Job::train`], in the order a run goes through them: [`Trainer::start`]
/// (with [`Trainer::resume`]), [`Trainer::evaluate_at_start`], then per epoch
/// [`Trainer::epoch`], which runs [`Trainer::step`] per batch and ends with
/// [`Trainer::evaluate_epoch`] and [`Trainer::checkpoint`], and last [`Trainer::finish`].
impl<S: EngineSource> Trainer<S> {
    /// Start phase: the run directory, the data, a fresh engine, the schedule, the
    /// validation split and the extra test sets (refused now rather than at the first
    /// evaluation), the position (from `env.resume` when set, see [`Trainer::resume`]) and the
    /// metrics file.
    fn start(&mut self, env: &RunEnv, wall: Instant) -> Result<TrainRun<S::Engine>> {
        let run_dir = env.run_dir.clone();
        std::fs::create_dir_all(&run_dir).map_err(|e| DtlError::io(&run_dir, e))?;
        let found = self.data()?.num_classes();
        let classes = self.cfg.classes(found);
        let mut engine = self.source.engine(&self.cfg, classes)?;
        let spe = self.steps_per_epoch()?;
        if spe == 0 {
            return Err(DtlError::argument(format!(
                "the training split has {} images, fewer than one batch of {}; lower data.batch_size or set data.drop_last = false",
                self.data()?.train_len(),
                self.cfg.data.batch_size
            )));
        }
        if let Some(val) = self.cfg.eval.val.clone() {
            // Refused now rather than at the first evaluation.
            self.open_val(&val)?;
        }
        self.open_tests(classes)?;
        let sched = Schedule::new(&self.cfg.schedule, self.cfg.optim.lr, spe);
        let epochs = self.cfg.schedule.epochs;
        let sources = self.data()?.sources();
        let inputs = crate::inputs::fingerprint(self.cfg.backbone.weights.as_deref(), &sources);
        let mut pos = match &env.resume {
            Some(r) => self.resume(r, &run_dir, &mut engine, spe, &inputs)?,
            None => Position::default(),
        };
        pos.inputs = inputs;
        let metrics = Metrics::open(&run_dir)?;
        let bar_style =
            ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg} ETA {eta}")
                .map_err(|e| DtlError::invalid(e.to_string()))?
                .progress_chars("=> ");
        Ok(TrainRun {
            engine,
            classes,
            depth: self.source.spec().depth,
            epochs,
            sched,
            wall_before: pos.wall_seconds,
            pos,
            metrics,
            last_path: run_dir.join("last.safetensors"),
            best_path: run_dir.join("best.safetensors"),
            run_dir,
            progress: env.progress,
            bar_style,
            wall,
            last_save: Instant::now(),
            last_eval: None,
            last_loss: None,
        })
    }

    /// Resume phase: loads the checkpoint `from` (a file or a run directory) into `engine`,
    /// parameters and optimizer state, and returns its position after checking that it fits
    /// `steps_per_epoch`. A pipeline or inputs (weights, data files) that differ from the
    /// ones it was trained with are warnings; `metrics.jsonl` loses the lines after the
    /// position.
    fn resume(
        &self,
        from: &Path,
        run_dir: &Path,
        engine: &mut S::Engine,
        steps_per_epoch: usize,
        inputs: &Value,
    ) -> Result<Position> {
        let path = checkpoint::resolve(from, true)?;
        let ck = checkpoint::load(&path)?;
        let changes = checkpoint::pipeline_changes(&ck.pipeline, &self.cfg.to_toml());
        warn_differences(&path, "a pipeline that differs from the one", &changes);
        engine.load(&ck, true)?;
        let pos: Position = serde_json::from_value(ck.state.clone()).map_err(|e| {
            DtlError::file(
                &path,
                format!("metadata `state` is not a training position: {e}"),
            )
        })?;
        check_position(&path, &pos, steps_per_epoch)?;
        let changed = crate::inputs::changes(&pos.inputs, inputs);
        warn_differences(&path, "inputs that differ from the ones", &changed);
        let epochs = self.cfg.schedule.epochs;
        if pos.epoch >= epochs {
            eprintln!(
                "notice: {} has trained {} epochs already, schedule.epochs is {epochs}: nothing is trained, the checkpoint is evaluated",
                path.display(),
                pos.epoch
            );
        }
        Metrics::truncate_after(run_dir, pos.epoch, pos.step)?;
        Ok(pos)
    }

    /// `eval.at_start`: evaluates the freshly initialised engine before the first epoch
    /// (epoch 0 of the metrics).
    fn evaluate_at_start(&mut self, run: &mut TrainRun<S::Engine>) -> Result<()> {
        let r = self.evaluate_during_training(&mut run.engine)?;
        if self.cfg.eval.val.is_some() {
            run.metrics.write(&json!({"kind": "eval", "epoch": 0, "val_top1": r.top1, "val_top5": r.top5, "val_loss": r.loss}))?;
        } else {
            run.metrics.write(&json!({"kind": "eval", "epoch": 0, "top1": r.top1, "top5": r.top5, "test_loss": r.loss}))?;
        }
        Ok(())
    }

    /// Epoch phase: trains the batches of `epoch` from where the position stands (a resumed
    /// run skips the batches its checkpoint had trained), one [`Trainer::step`] each, then
    /// writes the epoch's line: the mean training loss, the evaluation when one is due
    /// ([`Trainer::evaluate_epoch`]) and the wall time, and refreshes `last.safetensors`.
    /// Returns the stop report when the step limit ends the run inside the epoch.
    fn epoch(&mut self, run: &mut TrainRun<S::Engine>, epoch: usize) -> Result<Option<Value>> {
        let epochs = run.epochs;
        let skip = if epoch == run.pos.epoch {
            run.pos.batch
        } else {
            0
        };
        if skip == 0 {
            run.pos.epoch_loss_sum = 0.0;
            run.pos.epoch_loss_count = 0;
        }
        run.engine.set_loss_sum(run.pos.epoch_loss_sum)?;
        let loader = self.data()?.train_epoch(epoch, skip)?;
        let bar = if run.progress {
            ProgressBar::new((skip + loader.batches()) as u64)
        } else {
            ProgressBar::hidden()
        };
        bar.set_style(run.bar_style.clone());
        bar.set_prefix(format!("epoch {}/{epochs}", epoch + 1));
        bar.set_position(skip as u64);
        let mut lr = run.sched.lr(epoch, skip);
        for (i, batch) in loader.enumerate() {
            let bi = skip + i;
            let batch = batch?;
            lr = run.sched.lr(epoch, bi);
            if let Some(stopped) = self.step(run, &bar, epoch, bi, &batch, lr)? {
                bar.finish_and_clear();
                return Ok(Some(stopped));
            }
        }
        bar.finish_and_clear();
        run.pos.epoch_loss_sum = run.engine.loss_sum()?;
        let train_loss = run.pos.epoch_loss_sum / run.pos.epoch_loss_count.max(1) as f64;
        if !train_loss.is_finite() {
            return Err(DtlError::diverged(
                1,
                1,
                format!(
                    "the mean training loss of epoch {} is {train_loss}; lower optim.lr or set optim.clip_grad",
                    epoch + 1
                ),
            ));
        }
        let mut line =
            json!({"kind": "epoch", "epoch": epoch + 1, "train_loss": train_loss, "lr": lr});
        let is_last = epoch + 1 == epochs;
        if (epoch + 1) % self.cfg.eval.every == 0 || is_last {
            let top1 = self.evaluate_epoch(run, &mut line)?;
            if run.pos.best_top1.map(|b| top1 > b).unwrap_or(true) {
                run.pos.best_top1 = Some(top1);
                run.pos.best_epoch = Some(epoch + 1);
                self.checkpoint_best(run, epoch)?;
            }
        }
        run.pos.epoch = epoch + 1;
        run.pos.batch = 0;
        run.pos.wall_seconds = run.wall_seconds();
        line["wall_s"] = json!(run.pos.wall_seconds);
        run.metrics.write(&line)?;
        if run.progress {
            eprintln!("{}", epoch_summary(&line));
        }
        self.checkpoint(run)?;
        Ok(None)
    }

    /// Step phase: one optimizer step on `batch`, batch `bi` of `epoch`, at learning rate
    /// `lr`: the targets ([`batch_targets`]), the step's drop-path masks ([`step::drop_masks`]),
    /// [`Engine::train_step`] (forward, loss, backward, AdamW), then the position, the
    /// progress bar, a `step` line of the metrics every `run.log_every` steps and
    /// `last.safetensors` when the checkpoint interval has passed. Returns the stop report
    /// when the step limit is reached.
    fn step(
        &mut self,
        run: &mut TrainRun<S::Engine>,
        bar: &ProgressBar,
        epoch: usize,
        bi: usize,
        batch: &Batch,
        lr: f64,
    ) -> Result<Option<Value>> {
        let cfg = &self.cfg;
        let t = Instant::now();
        let targets = batch_targets(batch, run.classes, cfg.optim.label_smoothing)?;
        let drops = step::drop_masks(
            cfg.backbone.drop_path,
            run.depth,
            batch.n,
            cfg.run.seed,
            run.pos.step,
        );
        let logging = (run.pos.step + 1) % cfg.run.log_every as u64 == 0;
        let loss =
            run.engine
                .train_step(batch, &targets, &drops, lr, cfg.optim.clip_grad, logging)?;
        if let Some(loss) = loss {
            if !loss.is_finite() {
                return Err(DtlError::diverged(
                    1,
                    1,
                    format!(
                        "the loss became {loss} at epoch {} step {}; lower optim.lr or set optim.clip_grad",
                        epoch + 1,
                        run.pos.step + 1
                    ),
                ));
            }
            run.last_loss = Some(loss);
        }
        let dt = t.elapsed().as_secs_f64();
        let pos = &mut run.pos;
        pos.step += 1;
        pos.optim_steps = run.engine.optim_steps();
        pos.batch = bi + 1;
        pos.epoch = epoch;
        pos.epoch_loss_count += 1;
        pos.images_trained += batch.n as u64;
        pos.train_seconds += dt;
        let ips = batch.n as f64 / dt.max(1e-9);
        let shown = run.last_loss.map_or("-".to_string(), |l| format!("{l:.4}"));
        bar.set_message(format!("loss {shown} lr {lr:.2e} {ips:.1} img/s"));
        bar.inc(1);
        if logging {
            let loss = run.last_loss.unwrap_or(f32::NAN);
            let time_s = run.wall_seconds();
            run.metrics.write(&json!({
                "kind": "step", "epoch": epoch + 1, "step": run.pos.step, "loss": loss,
                "lr": lr, "img_per_s": ips, "time_s": time_s
            }))?;
        }
        let stop = self.step_limit.map(|l| run.pos.step >= l).unwrap_or(false);
        if stop || run.last_save.elapsed() >= self.checkpoint_every {
            run.pos.wall_seconds = run.wall_seconds();
            run.pos.epoch_loss_sum = run.engine.loss_sum()?;
            self.checkpoint(run)?;
        }
        if stop {
            return Ok(Some(
                json!({"stopped": true, "step": run.pos.step, "epoch": epoch, "batch": run.pos.batch,
                       "run_dir": run.run_dir.display().to_string(),
                       "last": run.last_path.display().to_string()}),
            ));
        }
        Ok(None)
    }

    /// Evaluation phase of an epoch: evaluates where training evaluates
    /// ([`Trainer::evaluate_during_training`]: the validation split, else the test split)
    /// and the extra test sets that ask for it, and writes the results into the epoch's
    /// metrics `line`. Returns the top-1 that selects the best checkpoint.
    fn evaluate_epoch(&mut self, run: &mut TrainRun<S::Engine>, line: &mut Value) -> Result<f64> {
        let r = self.evaluate_during_training(&mut run.engine)?;
        let tracked = self.evaluate_tests(&mut run.engine, true)?;
        if !tracked.is_empty() {
            line["tests"] = tracked
                .iter()
                .map(|(n, t, _)| {
                    (
                        n.clone(),
                        json!({"top1": t.top1, "top5": t.top5, "loss": t.loss}),
                    )
                })
                .collect::<serde_json::Map<_, _>>()
                .into();
        }
        if self.cfg.eval.val.is_some() {
            line["val_top1"] = json!(r.top1);
            line["val_top5"] = json!(r.top5);
            line["val_loss"] = json!(r.loss);
        } else {
            line["top1"] = json!(r.top1);
            line["top5"] = json!(r.top5);
            line["test_loss"] = json!(r.loss);
            run.last_eval = Some(r);
        }
        Ok(r.top1)
    }

    /// Checkpoint phase: writes `last.safetensors` (parameters, optimizer state and the
    /// position as it stands), from which [`RunEnv::resume`] picks up.
    fn checkpoint(&self, run: &mut TrainRun<S::Engine>) -> Result<()> {
        self.save(&run.last_path, &run.engine, true, &run.pos)?;
        run.last_save = Instant::now();
        Ok(())
    }

    /// Writes `best.safetensors` (parameters only) at the end of `epoch`, whose evaluation
    /// is the best so far.
    fn checkpoint_best(&self, run: &TrainRun<S::Engine>, epoch: usize) -> Result<()> {
        let mut bp = run.pos.clone();
        bp.epoch = epoch + 1;
        bp.batch = 0;
        self.save(&run.best_path, &run.engine, false, &bp)
    }

    /// Finish phase: with a validation split, loads the best checkpoint (the one training
    /// selected) and evaluates the test split once; evaluates the extra test sets; writes
    /// `report.json`, the report's text and the curves, and returns the report.
    fn finish(&mut self, mut run: TrainRun<S::Engine>) -> Result<Value> {
        let cfg = self.cfg.clone();
        let selected = cfg.eval.val.is_some() && run.best_path.is_file();
        if selected {
            let ck = checkpoint::load(&run.best_path)?;
            run.engine.load(&ck, false)?;
        }
        let last_eval = match run.last_eval {
            Some(r) => r,
            None => self.evaluate_engine(&mut run.engine)?,
        };
        let mut tests = std::collections::BTreeMap::new();
        for (name, r, scored) in self.evaluate_tests(&mut run.engine, false)? {
            run.metrics.write(
                &json!({"kind": "test", "name": name, "top1": r.top1, "top5": r.top5,
                                  "loss": r.loss, "images": r.images, "classes": scored}),
            )?;
            tests.insert(name, report::TestSetReport::of(&r, scored));
        }
        let run_dir = &run.run_dir;
        let epochs_lines: Vec<Value> = report::read_metrics(run_dir)?
            .into_iter()
            .filter(|v| v["kind"] == "epoch")
            .collect();
        let points: Vec<(usize, f64, Option<f64>)> = epochs_lines
            .iter()
            .map(|v| {
                (
                    v["epoch"].as_u64().unwrap_or(0) as usize,
                    v["train_loss"].as_f64().unwrap_or(0.0),
                    v["top1"].as_f64().or(v["val_top1"].as_f64()),
                )
            })
            .collect();
        let wall_s = run.wall_seconds();
        let (pos, classes, engine) = (&run.pos, run.classes, &run.engine);
        let report = report::TrainReport {
            name: Some(cfg.run.name.clone()),
            backbone: Some(cfg.backbone.kind.clone()),
            side: Some(cfg.side.kind.clone()),
            head: Some(cfg.head.kind.clone()),
            classes: Some(classes),
            top1: Some(last_eval.top1),
            top5: Some(last_eval.top5),
            test_loss: Some(last_eval.loss),
            test_images: Some(last_eval.images),
            test_classes: Some(self.test_mask.as_ref().map_or(classes, |m| m.1)),
            tests: Some(tests),
            best_top1: if cfg.eval.val.is_some() {
                None
            } else {
                Some(pos.best_top1.unwrap_or(last_eval.top1))
            },
            best_epoch: pos.best_epoch,
            eval_split: Some(
                cfg.eval
                    .val
                    .clone()
                    .unwrap_or_else(|| cfg.data.test.clone()),
            ),
            best_val_top1: if cfg.eval.val.is_some() {
                pos.best_top1
            } else {
                None
            },
            tested_checkpoint: Some(if selected { "best" } else { "last" }.to_string()),
            trainable_params: Some(engine.trainable_params()),
            backbone_params: Some(self.source.spec().parameter_count()),
            epochs: Some(run.epochs),
            epochs_trained: Some(pos.epoch),
            steps: Some(pos.step),
            wall_s: Some(wall_s),
            train_img_per_s: Some(pos.images_trained as f64 / pos.train_seconds.max(1e-9)),
            device: Some(engine.device()),
            precision: Some(engine.precision()),
            graph: engine.graph(),
            peak_rss_mib: report::peak_rss_mib(),
            gpu_mib: engine.memory_mib(),
            run_dir: Some(run_dir.display().to_string()),
            pipeline_file: Some(self.pipeline_file.display().to_string()),
            data: Some(report::DataReport {
                kind: Some(cfg.data.kind.clone()),
                task: cfg.data.task.clone(),
                train: Some(cfg.data.train.clone()),
                test: Some(cfg.data.test.clone()),
                options: json!(cfg.data.options),
            }),
            checkpoints: Some(report::CheckpointsReport {
                best: Some(run.best_path.display().to_string()),
                last: Some(run.last_path.display().to_string()),
            }),
        }
        .to_json();
        report::write_report(run_dir, &report, &epochs_lines)?;
        let split = if cfg.eval.val.is_some() {
            "val"
        } else {
            "test"
        };
        report::plot_curves_of(&run_dir.join("curves.svg"), &points, split)?;
        Ok(report)
    }
}

impl<S: EngineSource> Job for Trainer<S> {
    /// Trains the pipeline: `Trainer::start` (resuming when `env.resume` is set), the
    /// evaluation before training when `eval.at_start` asks for it, one `Trainer::epoch`
    /// per remaining epoch, then `Trainer::finish`. With a step limit the run may stop
    /// inside an epoch, leaving `last.safetensors` to resume from.
    fn train(&mut self, env: &RunEnv) -> Result<Value> {
        let wall = Instant::now();
        set_threads(self.cfg.run.threads);
        let mut run = self.start(env, wall)?;
        if self.cfg.eval.at_start && env.resume.is_none() {
            self.evaluate_at_start(&mut run)?;
        }
        // The checkpoint interval counts from the first step.
        run.last_save = Instant::now();
        for epoch in run.pos.epoch..run.epochs {
            if let Some(stopped) = self.epoch(&mut run, epoch)? {
                return Ok(stopped);
            }
        }
        self.finish(run)
    }

    fn evaluate(&mut self, env: &RunEnv, checkpoint_path: &Path) -> Result<Value> {
        set_threads(self.cfg.run.threads);
        let _ = env;
        let path = checkpoint::resolve(checkpoint_path, false)?;
        let ck = checkpoint::load(&path)?;
        let stored = ck
            .params
            .iter()
            .find(|(n, _, _)| n == "head.bias")
            .map(|(_, s, _)| s[0]);
        let classes = match stored {
            Some(c) => c,
            None => {
                let n = self.data()?.num_classes();
                self.cfg.classes(n)
            }
        };
        let mut engine = self.source.engine(&self.cfg, classes)?;
        engine.load(&ck, false)?;
        self.open_tests(classes)?;
        let t = Instant::now();
        let r = self.evaluate_engine(&mut engine)?;
        let secs = t.elapsed().as_secs_f64();
        let tests = self
            .evaluate_tests(&mut engine, false)?
            .into_iter()
            .map(|(n, r, scored)| (n, report::TestSetReport::of(&r, scored)))
            .collect();
        Ok(report::EvalReport {
            checkpoint: Some(path.display().to_string()),
            epoch: ck.state["epoch"].clone(),
            top1: Some(r.top1),
            top5: Some(r.top5),
            test_loss: Some(r.loss),
            images: Some(r.images),
            img_per_s: Some(r.images as f64 / secs.max(1e-9)),
            tests: Some(tests),
            device: Some(engine.device()),
            precision: Some(engine.precision()),
        }
        .to_json())
    }

    fn bench(&mut self, opts: &BenchOptions) -> Result<Value> {
        set_threads(self.cfg.run.threads);
        self.source.bench(&self.cfg, opts)
    }
}

/// Refuses a stored training position that does not fit this pipeline: a batch offset past
/// the batches of an epoch, or counters that contradict each other.
fn check_position(path: &Path, pos: &Position, steps_per_epoch: usize) -> Result<()> {
    let bad = |m: String| {
        Err(DtlError::file(
            path,
            format!("metadata `state`: {m}; resume from a `last.safetensors` written by `dtl run` for this pipeline, or start a new run"),
        ))
    };
    if pos.batch > steps_per_epoch {
        return bad(format!(
            "batch {} of epoch {} is past the {steps_per_epoch} batches of an epoch (data.batch_size, data.limit_train or the training split changed?)",
            pos.batch,
            pos.epoch + 1
        ));
    }
    if pos.epoch > 1_000_000 || pos.step < pos.batch as u64 {
        return bad(format!(
            "epoch {} and step {} are not a position training reaches",
            pos.epoch, pos.step
        ));
    }
    if pos.epoch_loss_count > steps_per_epoch || !pos.epoch_loss_sum.is_finite() {
        return bad(format!(
            "the epoch's loss sum {} over {} batches is not a position training reaches",
            pos.epoch_loss_sum, pos.epoch_loss_count
        ));
    }
    Ok(())
}

fn epoch_summary(line: &Value) -> String {
    let mut s = format!(
        "epoch {}: train loss {:.4}",
        line["epoch"],
        line["train_loss"].as_f64().unwrap_or(f64::NAN)
    );
    if let Some(t) = line["top1"].as_f64() {
        s.push_str(&format!(
            ", top-1 {:.2} %, top-5 {:.2} %",
            100.0 * t,
            100.0 * line["top5"].as_f64().unwrap_or(0.0)
        ));
    }
    if let Some(tests) = line["tests"].as_object() {
        for (name, t) in tests {
            s.push_str(&format!(
                ", {name} top-1 {:.2} %",
                100.0 * t["top1"].as_f64().unwrap_or(f64::NAN)
            ));
        }
    }
    s
}

/// The class mask of `data.test` (`eval.test_classes`) and the extra test sets of
/// `eval.tests`, opened for a head of `classes` classes at `image_size`.
fn open_test_sets(
    cfg: &PipelineConfig,
    image_size: usize,
    classes: usize,
) -> Result<(Option<ClassMask>, Vec<TestSet>)> {
    let mut test_mask = None;
    if let Some(sub) = &cfg.eval.test_classes {
        let t = crate::data::open_test_set(cfg, image_size, classes)
            .map_err(|e| DtlError::setting("eval.test_classes", e.to_string()))?;
        test_mask = class_mask(sub, "eval.test_classes", t.dataset.as_ref(), classes)?;
    }
    let mut sets = Vec::new();
    for (i, t) in cfg.eval.tests.iter().enumerate() {
        let key = format!("eval.tests[{i}] (`{}`)", t.name);
        let mut tcfg = cfg.clone();
        tcfg.data = t.data_config(&cfg.data);
        let opened = crate::data::open_test_set(&tcfg, image_size, classes)
            .map_err(|e| DtlError::setting(&key, e.to_string()))?;
        let mask = match &t.classes {
            Some(sub) => class_mask(
                sub,
                &format!("{key}.classes"),
                opened.dataset.as_ref(),
                classes,
            )?,
            None => None,
        };
        sets.push(TestSet {
            name: t.name.clone(),
            data: opened.source,
            scored: mask.as_ref().map_or(classes, |m| m.1),
            mask: mask.map(|m| m.0),
            during_training: t.during_training,
        });
    }
    Ok((test_mask, sets))
}

/// Opens every test set of `eval.tests` and the class subsets of `eval.test_classes` and
/// `eval.tests[i].classes` for a head of `classes` classes, as a run does before its first
/// epoch (lists, labels, options), without decoding an image: `(name, items, classes scored)`
/// per extra test set. Errors name the key.
pub fn check_test_sets(
    cfg: &PipelineConfig,
    image_size: usize,
    classes: usize,
) -> Result<Vec<(String, usize, usize)>> {
    let (_, sets) = open_test_sets(cfg, image_size, classes)?;
    Ok(sets
        .into_iter()
        .map(|t| (t.name, t.data.test_len(), t.scored))
        .collect())
}

/// Refuses a class mask that does not cover the head's classes or keeps none of them.
pub(crate) fn check_mask(mask: &[f32], classes: usize) -> Result<()> {
    if mask.len() != classes {
        return Err(DtlError::shape(format!(
            "a class mask of {} values for a head of {classes} classes",
            mask.len()
        )));
    }
    if !mask.contains(&0.0) {
        return Err(DtlError::argument("a class mask keeps no class"));
    }
    Ok(())
}

/// The mask of `sub` over `classes` for the test set `ds` and the classes it keeps (`None` for
/// every class). Every item's label must be one of the kept classes: one outside is an error
/// naming `key`, the item and its label.
fn class_mask(
    sub: &dtl_core::config::ClassSubset,
    key: &str,
    ds: &dyn dtl_core::Dataset,
    classes: usize,
) -> Result<Option<ClassMask>> {
    use dtl_core::config::ClassSubset;
    let keep: Vec<usize> = match sub {
        ClassSubset::All => return Ok(None),
        ClassSubset::Present => {
            let set: std::collections::BTreeSet<usize> =
                (0..ds.len()).filter_map(|i| ds.label(i)).collect();
            set.into_iter().collect()
        }
        ClassSubset::List(v) => v.clone(),
    };
    if let Some(&l) = keep.iter().find(|&&l| l >= classes) {
        return Err(DtlError::setting(
            key,
            format!(
                "label {l} is out of range: the head has {classes} classes (labels 0-{})",
                classes - 1
            ),
        ));
    }
    if keep.is_empty() {
        return Err(DtlError::setting(
            key,
            "the test set has no labelled items, so no class is kept",
        ));
    }
    let kept: std::collections::BTreeSet<usize> = keep.iter().copied().collect();
    for i in 0..ds.len() {
        if let Some(l) = ds.label(i) {
            if !kept.contains(&l) {
                return Err(DtlError::setting(key, format!(
                    "item {} has label {l}, which is not one of the {} classes the test set is scored over; add it to the list or use \"present\"",
                    ds.describe(i),
                    kept.len()
                )));
            }
        }
    }
    Ok(Some((subset_mask(&keep, classes), kept.len())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::SyntheticData;

    type ToyTokens = dtl_core::backbone::TokensOf<crate::toy::ToyBackbone, Cpu>;
    type ToyFeatures = dtl_core::FeaturesOf<crate::toy::ToyBackbone, Cpu>;

    /// The toy backbone with a block VJP that fails.
    struct FailingVjp(crate::toy::ToyBackbone);

    impl Backbone<Cpu> for FailingVjp {
        type Tokens = <crate::toy::ToyBackbone as Backbone<Cpu>>::Tokens;
        type Width = <crate::toy::ToyBackbone as Backbone<Cpu>>::Width;
        fn spec(&self) -> &dtl_core::BackboneSpec {
            self.0.spec()
        }
        fn embed(&self, images: &dtl_core::Images<Cpu>) -> Result<ToyTokens> {
            self.0.embed(images)
        }
        fn block_forward(
            &self,
            i: usize,
            x: &ToyTokens,
            d: Option<&DropPath>,
        ) -> Result<ToyTokens> {
            self.0.block_forward(i, x, d)
        }
        fn block_vjp(
            &self,
            i: usize,
            _x: &ToyTokens,
            _g: &ToyTokens,
            _d: Option<&DropPath>,
        ) -> Result<ToyTokens> {
            Err(DtlError::invalid(format!(
                "block {i}: cannot recompute the activations"
            )))
        }
        fn norm_forward(&self, x: &ToyFeatures) -> Result<ToyFeatures> {
            self.0.norm_forward(x)
        }
        fn norm_vjp(&self, x: &ToyFeatures, g: &ToyFeatures) -> Result<ToyFeatures> {
            self.0.norm_vjp(x, g)
        }
    }

    /// A block VJP that fails on the tape is an error of the step, and nothing is updated.
    #[test]
    fn a_failing_vjp_on_the_tape_is_an_error_of_the_step() {
        let cfg = PipelineConfig::from_str(
            "[backbone]\nkind = \"toy\"\n[data]\nkind = \"image-folder\"\nroot = \".\"\n",
            "toy.toml".as_ref(),
            &[],
        )
        .unwrap();
        let dev = Cpu::default();
        let bb = Arc::new(FailingVjp(crate::toy::ToyBackbone::new(&dev, 3)));
        let classes = 4;
        let mut model = step::build_model(&cfg, &bb, classes, &dev).unwrap();
        let mut opt = crate::optim::AdamW::from_config(&cfg.optim, &model.params(), &dev);
        let size = bb.spec().image_size;
        let images: dtl_core::Images<Cpu> =
            dev.tensor_from_vec(vec![0.25; 2 * 3 * size * size], (2, Const::<3>, size, size));
        let targets = crate::model::smoothed_targets(&[0, 1], classes, 0.0);
        let drops = step::drop_masks(0.0, bb.spec().depth, 2, 0, 0);
        let before: Vec<Vec<f32>> = model.params().iter().map(|p| p.value.as_vec()).collect();
        let e = step::train_step(&mut model, &mut opt, &images, &targets, &drops, 1e-2, None)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("error in backward pass: block "), "{e}");
        assert!(e.contains("cannot recompute the activations"), "{e}");
        let after: Vec<Vec<f32>> = model.params().iter().map(|p| p.value.as_vec()).collect();
        assert_eq!(
            before, after,
            "a failed step must not update the parameters"
        );
        assert!(dtl_core::tape::check_backward().is_ok());
    }

    struct Batches(std::vec::IntoIter<Batch>);
    impl Iterator for Batches {
        type Item = Result<Batch>;
        fn next(&mut self) -> Option<Result<Batch>> {
            self.0.next().map(Ok)
        }
    }
    impl BatchIter for Batches {
        fn batches(&self) -> usize {
            self.0.len()
        }
    }

    /// The tape-based CPU evaluation over a class subset: top-1 is the best of the kept
    /// classes and the loss their cross-entropy, as computed here from the model's logits.
    #[test]
    fn cpu_evaluation_over_a_class_subset_matches_the_logits() {
        let cfg = PipelineConfig::from_str(
            "[backbone]\nkind = \"toy\"\n[data]\nkind = \"image-folder\"\nroot = \".\"\n",
            "toy.toml".as_ref(),
            &[],
        )
        .unwrap();
        let dev = Cpu::default();
        let bb = Arc::new(crate::toy::ToyBackbone::new(&dev, 3));
        let classes = 5;
        let mut model = step::build_model(&cfg, &bb, classes, &dev).unwrap();
        // A trained-looking head: random weights instead of the zero-initialised B maps.
        for p in model.params_mut() {
            let n = p.value.as_vec().len();
            let v: Vec<f32> = (0..n).map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.3).collect();
            p.value = dev.tensor_from_vec(v, (n,));
        }
        let keep = [1usize, 3, 4];
        let mut data = SyntheticData::new(classes, 8, 4, 40, 8, 9);
        let mut kept = Vec::new();
        for b in data.test_loader().unwrap() {
            let b = b.unwrap();
            let px = 3 * 8 * 8;
            let mut images = Vec::new();
            let mut labels = Vec::new();
            for (i, &l) in b.labels.iter().enumerate() {
                if keep.contains(&l) {
                    images.extend_from_slice(&b.images[i * px..(i + 1) * px]);
                    labels.push(l);
                }
            }
            let n = labels.len();
            kept.push(Batch {
                images,
                labels,
                soft_targets: None,
                n,
            });
        }
        let (mut hits, mut all_hits, mut loss, mut count) = (0usize, 0usize, 0f64, 0usize);
        for b in &kept {
            let x = dev.tensor_from_vec(b.images.clone(), (b.n, Const::<3>, 8, 8));
            let logits = model.forward_eval(&x).unwrap().as_vec();
            for (row, &l) in logits.chunks_exact(classes).zip(&b.labels) {
                let best = *keep
                    .iter()
                    .max_by(|&&a, &&c| row[a].total_cmp(&row[c]))
                    .unwrap();
                hits += (best == l) as usize;
                let argmax = (0..classes)
                    .max_by(|&a, &c| row[a].total_cmp(&row[c]))
                    .unwrap();
                all_hits += (argmax == l) as usize;
                let m = keep.iter().map(|&k| row[k] as f64).fold(f64::MIN, f64::max);
                let lse = m + keep
                    .iter()
                    .map(|&k| (row[k] as f64 - m).exp())
                    .sum::<f64>()
                    .ln();
                loss += lse - row[l] as f64;
                count += 1;
            }
        }
        assert_eq!(count, 24);
        let mask = subset_mask(&keep, classes);
        let r = evaluate_cpu(
            &model,
            &dev,
            8,
            Box::new(Batches(kept.clone().into_iter())),
            Some(&mask),
        )
        .unwrap();
        assert_eq!(r.images, 24);
        assert!((r.top1 - hits as f64 / 24.0).abs() < 1e-12, "{r:?} {hits}");
        assert!((r.loss - loss / 24.0).abs() < 1e-5, "{r:?} {}", loss / 24.0);
        let full =
            evaluate_cpu(&model, &dev, 8, Box::new(Batches(kept.into_iter())), None).unwrap();
        assert!((full.top1 - all_hits as f64 / 24.0).abs() < 1e-12);
        assert!(
            full.loss > r.loss,
            "the subset leaves classes out of the loss"
        );
        // A mask that does not fit the head is refused.
        assert!(check_mask(&mask[..3], classes).is_err());
        assert!(check_mask(&[MASKED_LOGIT; 5], classes).is_err());
    }
}
