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
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};

use crate::checkpoint::{self, Checkpoint};
use crate::data::{Batch, BatchIter, BatchSource};
use crate::device::{dev_err, TrainDevice};
use crate::model::{smoothed_targets, Model};
use crate::optim::{clip_grad_norm, AdamW, Flat, Schedule};
use crate::report::{self, Metrics};

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
    /// Device memory in MiB, for reports.
    fn memory_mib(&self) -> Option<f64> {
        None
    }
    /// The device, in words.
    fn device(&self) -> String;
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

    /// Evaluates `engine` on the test split.
    pub fn evaluate_engine(&mut self, engine: &mut S::Engine) -> Result<EvalResult> {
        let loader = self.data()?.test_loader()?;
        engine.evaluate(loader)
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
        build_model(&self.cfg, &self.source.backbone, classes, &self.source.dev)
    }

    /// Evaluates `model` on the test split.
    pub fn evaluate_model(&mut self, model: &Model<B, Cpu>) -> Result<EvalResult> {
        let image_size = self.source.spec().image_size;
        let loader = self.data()?.test_loader()?;
        evaluate_cpu(model, &self.source.dev, image_size, loader)
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
        let model = build_model(cfg, &self.backbone, classes, &self.dev)?;
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
        return Err(DtlError::invalid(format!(
            "a batch of {} images needs {} values at {s}x{s}, got {} (and {} labels)",
            batch.n,
            batch.n * 3 * s * s,
            batch.images.len(),
            batch.labels.len()
        )));
    }
    Ok(dev.tensor_from_vec(batch.images.clone(), (batch.n, Const::<3>, s, s)))
}

/// Evaluates a CPU model on `batches`.
fn evaluate_cpu<B: Backbone<Cpu>>(
    model: &Model<B, Cpu>,
    dev: &Cpu,
    image_size: usize,
    batches: Box<dyn BatchIter>,
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
        let logits = model.forward_eval(&images)?.as_vec();
        crate::sanity::finite_logits(&logits, classes, step, &batch.images)?;
        for (row, &l) in logits.chunks_exact(classes).zip(&batch.labels) {
            if l >= classes {
                return Err(DtlError::invalid(format!(
                    "label {l} is out of range for {classes} classes"
                )));
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
        let loss = train_step(
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
        evaluate_cpu(&self.model, &self.dev, self.image_size, batches)
    }
    fn device(&self) -> String {
        "cpu".into()
    }
}

/// Builds the model of `cfg` on `backbone` through the registry, on `dev` (side network and
/// head initialised from `run.seed`, identically on every device).
pub fn build_model<B: Backbone<D>, D: TrainDevice>(
    cfg: &PipelineConfig,
    backbone: &Arc<B>,
    classes: usize,
    dev: &D,
) -> Result<Model<B, D>> {
    let init = Cpu::seed_from_u64(cfg.run.seed);
    let (side, head) = D::build_parts(cfg, backbone.spec(), classes, &init, dev)?;
    Ok(Model::new(
        Arc::clone(backbone),
        side,
        head,
        cfg.head.pool == "cls",
    ))
}

/// The outcome of one forward and backward pass.
#[derive(Debug, Clone)]
pub struct StepGrads<D: TrainDevice = Cpu> {
    /// The mean loss.
    pub loss: f32,
    /// The logits, (batch, classes) row-major.
    pub logits: Vec<f32>,
    /// The gradient of every trainable tensor, in [`Model::params`] order, on the device.
    pub grads: Vec<Flat<D>>,
}

impl<D: TrainDevice> StepGrads<D> {
    /// The gradients on the host.
    pub fn host_grads(&self) -> Vec<Vec<f32>> {
        self.grads.iter().map(|g| g.as_vec()).collect()
    }
}

/// Forward and backward pass of one batch: loss, logits and every trainable gradient.
pub fn loss_and_grads<B: Backbone<D>, D: TrainDevice>(
    model: &Model<B, D>,
    images: &dtl_core::Images<D>,
    targets: &[f32],
    drops: &[Option<Arc<DropPath>>],
) -> Result<StepGrads<D>> {
    let logits = model.forward_train(images, drops)?;
    let logit_values = logits.as_vec();
    let loss = D::soft_cross_entropy(logits, targets)?;
    let value = loss.as_vec()[0];
    let mut grads = loss.backward();
    let mut gs = Vec::new();
    for p in model.params() {
        // A parameter the loss does not reach gets a zero gradient.
        grads.try_alloc_for(&p.value).map_err(dev_err)?;
        gs.push(grads.get(&p.value));
    }
    Ok(StepGrads {
        loss: value,
        logits: logit_values,
        grads: gs,
    })
}

/// One optimisation step; returns the loss before the update.
pub fn train_step<B: Backbone<D>, D: TrainDevice>(
    model: &mut Model<B, D>,
    opt: &mut AdamW<D>,
    images: &dtl_core::Images<D>,
    targets: &[f32],
    drops: &[Option<Arc<DropPath>>],
    lr: f64,
    clip: Option<f64>,
) -> Result<f32> {
    let StepGrads {
        loss, mut grads, ..
    } = loss_and_grads(model, images, targets, drops)?;
    if let Some(c) = clip {
        clip_grad_norm(&mut grads, c)?;
    }
    opt.step(model.params_mut(), &grads, lr)?;
    Ok(loss)
}

/// Stochastic-depth masks for every block of one step, drawn from a generator seeded by the
/// run seed and the global step (so a resumed run draws the same masks).
pub fn drop_masks(
    rate: f64,
    depth: usize,
    batch: usize,
    seed: u64,
    step: u64,
) -> Vec<Option<Arc<DropPath>>> {
    if rate <= 0.0 {
        return vec![None; depth];
    }
    let mut rng = ChaCha8Rng::seed_from_u64(
        seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(0xD0F),
    );
    DropPath::block_rates(rate, depth)
        .into_iter()
        .map(|r| DropPath::sample(r, batch, &mut rng).map(Arc::new))
        .collect()
}

fn set_threads(n: usize) {
    if n > 0 {
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global();
    }
}

impl<S: EngineSource> Job for Trainer<S> {
    fn train(&mut self, env: &RunEnv) -> Result<Value> {
        let wall = Instant::now();
        set_threads(self.cfg.run.threads);
        let run_dir = env.run_dir.clone();
        std::fs::create_dir_all(&run_dir).map_err(|e| DtlError::io(&run_dir, e))?;
        let cfg = self.cfg.clone();
        let spec = self.source.spec().clone();
        let classes = cfg.classes(self.data()?.num_classes());
        let mut engine = self.source.engine(&cfg, classes)?;
        let spe = self.steps_per_epoch()?;
        if spe == 0 {
            return Err(DtlError::invalid(format!(
                "the training split has {} images, fewer than one batch of {}; lower data.batch_size or set data.drop_last = false",
                self.data()?.train_len(),
                cfg.data.batch_size
            )));
        }
        if let Some(val) = &cfg.eval.val {
            // Refused now rather than at the first evaluation.
            self.open_val(val)?;
        }
        let sched = Schedule::new(&cfg.schedule, cfg.optim.lr, spe);
        let epochs = cfg.schedule.epochs;
        let inputs =
            crate::inputs::fingerprint(cfg.backbone.weights.as_deref(), &self.data()?.sources());
        let mut pos = Position::default();
        if let Some(r) = &env.resume {
            let path = checkpoint::resolve(r, true)?;
            let ck = checkpoint::load(&path)?;
            let changes = checkpoint::pipeline_changes(&ck.pipeline, &cfg.to_toml());
            if !changes.is_empty() {
                eprintln!(
                    "warning: resuming {} with a pipeline that differs from the one it was trained with:",
                    path.display()
                );
                for c in &changes {
                    eprintln!("  {c}");
                }
            }
            engine.load(&ck, true)?;
            pos = serde_json::from_value(ck.state.clone()).map_err(|e| {
                DtlError::file(
                    &path,
                    format!("metadata `state` is not a training position: {e}"),
                )
            })?;
            check_position(&path, &pos, spe)?;
            let changed = crate::inputs::changes(&pos.inputs, &inputs);
            if !changed.is_empty() {
                eprintln!(
                    "warning: resuming {} with inputs that differ from the ones it was trained with:",
                    path.display()
                );
                for c in &changed {
                    eprintln!("  {c}");
                }
            }
            if pos.epoch >= epochs {
                eprintln!(
                    "notice: {} has trained {} epochs already, schedule.epochs is {epochs}: nothing is trained, the checkpoint is evaluated",
                    path.display(),
                    pos.epoch
                );
            }
            Metrics::truncate_after(&run_dir, pos.epoch, pos.step)?;
        }
        pos.inputs = inputs;
        let mut metrics = Metrics::open(&run_dir)?;
        let last_path = run_dir.join("last.safetensors");
        let best_path = run_dir.join("best.safetensors");
        if cfg.eval.at_start && env.resume.is_none() {
            let r = self.evaluate_during_training(&mut engine)?;
            if cfg.eval.val.is_some() {
                metrics.write(&json!({"kind": "eval", "epoch": 0, "val_top1": r.top1, "val_top5": r.top5, "val_loss": r.loss}))?;
            } else {
                metrics.write(&json!({"kind": "eval", "epoch": 0, "top1": r.top1, "top5": r.top5, "test_loss": r.loss}))?;
            }
        }
        let depth = spec.depth;
        let mut last_eval: Option<EvalResult> = None;
        let mut last_save = Instant::now();
        let wall_before = pos.wall_seconds;
        let bar_style =
            ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg} ETA {eta}")
                .map_err(|e| DtlError::invalid(e.to_string()))?
                .progress_chars("=> ");
        let mut last_loss: Option<f32> = None;
        for epoch in pos.epoch..epochs {
            let skip = if epoch == pos.epoch { pos.batch } else { 0 };
            if skip == 0 {
                pos.epoch_loss_sum = 0.0;
                pos.epoch_loss_count = 0;
            }
            engine.set_loss_sum(pos.epoch_loss_sum)?;
            let loader = self.data()?.train_epoch(epoch, skip)?;
            let bar = if env.progress {
                ProgressBar::new((skip + loader.batches()) as u64)
            } else {
                ProgressBar::hidden()
            };
            bar.set_style(bar_style.clone());
            bar.set_prefix(format!("epoch {}/{epochs}", epoch + 1));
            bar.set_position(skip as u64);
            let mut lr = sched.lr(epoch, skip);
            for (i, batch) in loader.enumerate() {
                let bi = skip + i;
                let batch = batch?;
                let t = Instant::now();
                let targets = match &batch.soft_targets {
                    Some(s) if s.len() == batch.n * classes => s.clone(),
                    Some(s) => {
                        return Err(DtlError::invalid(format!(
                            "soft targets hold {} values, expected {} images x {classes} classes",
                            s.len(),
                            batch.n
                        )))
                    }
                    None => {
                        if let Some(&l) = batch.labels.iter().find(|&&l| l >= classes) {
                            return Err(DtlError::invalid(format!(
                                "label {l} is out of range for {classes} classes (head.classes)"
                            )));
                        }
                        smoothed_targets(&batch.labels, classes, cfg.optim.label_smoothing)
                    }
                };
                lr = sched.lr(epoch, bi);
                let drops = drop_masks(
                    cfg.backbone.drop_path,
                    depth,
                    batch.n,
                    cfg.run.seed,
                    pos.step,
                );
                let logging = (pos.step + 1) % cfg.run.log_every as u64 == 0;
                let loss = engine.train_step(
                    &batch,
                    &targets,
                    &drops,
                    lr,
                    cfg.optim.clip_grad,
                    logging,
                )?;
                if let Some(loss) = loss {
                    if !loss.is_finite() {
                        return Err(DtlError::invalid(format!(
                            "the loss became {loss} at epoch {} step {}; lower optim.lr or set optim.clip_grad",
                            epoch + 1,
                            pos.step + 1
                        )));
                    }
                    last_loss = Some(loss);
                }
                let dt = t.elapsed().as_secs_f64();
                pos.step += 1;
                pos.optim_steps = engine.optim_steps();
                pos.batch = bi + 1;
                pos.epoch = epoch;
                pos.epoch_loss_count += 1;
                pos.images_trained += batch.n as u64;
                pos.train_seconds += dt;
                let ips = batch.n as f64 / dt.max(1e-9);
                let shown = last_loss.map_or("-".to_string(), |l| format!("{l:.4}"));
                bar.set_message(format!("loss {shown} lr {lr:.2e} {ips:.1} img/s"));
                bar.inc(1);
                if logging {
                    let loss = last_loss.unwrap_or(f32::NAN);
                    metrics.write(&json!({
                        "kind": "step", "epoch": epoch + 1, "step": pos.step, "loss": loss,
                        "lr": lr, "img_per_s": ips, "time_s": wall_before + wall.elapsed().as_secs_f64()
                    }))?;
                }
                let stop = self.step_limit.map(|l| pos.step >= l).unwrap_or(false);
                if stop || last_save.elapsed() >= self.checkpoint_every {
                    pos.wall_seconds = wall_before + wall.elapsed().as_secs_f64();
                    pos.epoch_loss_sum = engine.loss_sum()?;
                    self.save(&last_path, &engine, true, &pos)?;
                    last_save = Instant::now();
                }
                if stop {
                    bar.finish_and_clear();
                    return Ok(
                        json!({"stopped": true, "step": pos.step, "epoch": epoch, "batch": pos.batch,
                                     "run_dir": run_dir.display().to_string(),
                                     "last": last_path.display().to_string()}),
                    );
                }
            }
            bar.finish_and_clear();
            pos.epoch_loss_sum = engine.loss_sum()?;
            let train_loss = pos.epoch_loss_sum / pos.epoch_loss_count.max(1) as f64;
            if !train_loss.is_finite() {
                return Err(DtlError::invalid(format!(
                    "the mean training loss of epoch {} is {train_loss}; lower optim.lr or set optim.clip_grad",
                    epoch + 1
                )));
            }
            let mut line =
                json!({"kind": "epoch", "epoch": epoch + 1, "train_loss": train_loss, "lr": lr});
            let is_last = epoch + 1 == epochs;
            if (epoch + 1) % cfg.eval.every == 0 || is_last {
                let r = self.evaluate_during_training(&mut engine)?;
                if cfg.eval.val.is_some() {
                    line["val_top1"] = json!(r.top1);
                    line["val_top5"] = json!(r.top5);
                    line["val_loss"] = json!(r.loss);
                } else {
                    line["top1"] = json!(r.top1);
                    line["top5"] = json!(r.top5);
                    line["test_loss"] = json!(r.loss);
                    last_eval = Some(r);
                }
                if pos.best_top1.map(|b| r.top1 > b).unwrap_or(true) {
                    pos.best_top1 = Some(r.top1);
                    pos.best_epoch = Some(epoch + 1);
                    let mut bp = pos.clone();
                    bp.epoch = epoch + 1;
                    bp.batch = 0;
                    self.save(&best_path, &engine, false, &bp)?;
                }
            }
            pos.epoch = epoch + 1;
            pos.batch = 0;
            pos.wall_seconds = wall_before + wall.elapsed().as_secs_f64();
            line["wall_s"] = json!(pos.wall_seconds);
            metrics.write(&line)?;
            if env.progress {
                eprintln!("{}", epoch_summary(&line));
            }
            self.save(&last_path, &engine, true, &pos)?;
            last_save = Instant::now();
        }
        // With a validation split, the test split is evaluated once, with the checkpoint of
        // the best validation top-1 (the one training selected).
        let selected = cfg.eval.val.is_some() && best_path.is_file();
        if selected {
            let ck = checkpoint::load(&best_path)?;
            engine.load(&ck, false)?;
        }
        let last_eval = match last_eval {
            Some(r) => r,
            None => self.evaluate_engine(&mut engine)?,
        };
        let epochs_lines: Vec<Value> = report::read_metrics(&run_dir)?
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
        let wall_s = wall_before + wall.elapsed().as_secs_f64();
        let report = json!({
            "name": cfg.run.name,
            "backbone": cfg.backbone.kind,
            "side": cfg.side.kind,
            "head": cfg.head.kind,
            "classes": classes,
            "top1": last_eval.top1,
            "top5": last_eval.top5,
            "test_loss": last_eval.loss,
            "test_images": last_eval.images,
            "best_top1": if cfg.eval.val.is_some() { None } else { Some(pos.best_top1.unwrap_or(last_eval.top1)) },
            "best_epoch": pos.best_epoch,
            "eval_split": cfg.eval.val.clone().unwrap_or_else(|| cfg.data.test.clone()),
            "best_val_top1": if cfg.eval.val.is_some() { pos.best_top1 } else { None },
            "tested_checkpoint": if selected { "best" } else { "last" },
            "trainable_params": engine.trainable_params(),
            "backbone_params": spec.parameter_count(),
            "epochs": epochs,
            "epochs_trained": pos.epoch,
            "steps": pos.step,
            "wall_s": wall_s,
            "train_img_per_s": pos.images_trained as f64 / pos.train_seconds.max(1e-9),
            "device": engine.device(),
            "peak_rss_mib": report::peak_rss_mib(),
            "gpu_mib": engine.memory_mib(),
            "run_dir": run_dir.display().to_string(),
            "pipeline_file": self.pipeline_file.display().to_string(),
            "data": {"kind": cfg.data.kind, "task": cfg.data.task, "train": cfg.data.train,
                     "test": cfg.data.test, "options": cfg.data.options},
            "checkpoints": {"best": best_path.display().to_string(), "last": last_path.display().to_string()},
        });
        report::write_report(&run_dir, &report, &epochs_lines)?;
        let split = if cfg.eval.val.is_some() {
            "val"
        } else {
            "test"
        };
        report::plot_curves_of(&run_dir.join("curves.svg"), &points, split)?;
        Ok(report)
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
        let t = Instant::now();
        let r = self.evaluate_engine(&mut engine)?;
        Ok(json!({
            "checkpoint": path.display().to_string(),
            "epoch": ck.state["epoch"],
            "top1": r.top1,
            "top5": r.top5,
            "test_loss": r.loss,
            "images": r.images,
            "img_per_s": r.images as f64 / t.elapsed().as_secs_f64().max(1e-9),
            "device": engine.device(),
        }))
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
    s
}
