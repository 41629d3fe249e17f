//! The data pipeline: datasets opened through the registry, op lists built from `[augment]`,
//! and loaders that decode and augment on worker threads with a bounded prefetch queue.

use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

use dtl_core::config::AugmentOp;
use dtl_core::data::TensorBatch;
use dtl_core::{Augment, Dataset, DtlError, FloatImage, PipelineConfig, Result, Sample, Split};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::ops::Normalize;
use crate::params::Size;
use crate::resample::Interpolation;

/// One batch as the trainer consumes it, from the loader to the training step (the runner
/// re-exports it as `dtl_runner::data::Batch`).
///
/// ```
/// let b = dtl_data::Batch { images: vec![0.0; 2 * 3 * 4 * 4], labels: vec![1, 0], soft_targets: None, n: 2 };
/// assert_eq!(b.images.len() / b.n, 3 * 4 * 4);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// `n * 3 * size * size` values, `CHW` per image, normalised.
    pub images: Vec<f32>,
    /// Class index of each image.
    pub labels: Vec<usize>,
    /// `n * classes` target probabilities, set when batch ops (mixup/cutmix) or label
    /// smoothing apply to training batches; train with soft-target cross entropy then.
    pub soft_targets: Option<Vec<f32>>,
    /// Number of images.
    pub n: usize,
}

/// Which random stream a generator belongs to (mixed into its seed).
#[derive(Clone, Copy)]
#[repr(u64)]
enum Stream {
    Sample = 1,
    Batch = 2,
    Shuffle = 3,
    Limit = 4,
}

/// The epoch tag of evaluation samples.
const EVAL_EPOCH: u64 = u64::MAX;

/// A generator that depends only on `(seed, epoch, index, stream)`.
fn rng_for(seed: u64, epoch: u64, index: u64, stream: Stream) -> ChaCha8Rng {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    key[8..16].copy_from_slice(&epoch.to_le_bytes());
    key[16..24].copy_from_slice(&index.to_le_bytes());
    key[24..].copy_from_slice(&(stream as u64).to_le_bytes());
    ChaCha8Rng::from_seed(key)
}

/// A built op with its key path (`augment.train[2]`) and name, for messages.
type NamedOp = (String, String, Box<dyn Augment>);

/// An ordered list of per-sample ops with the key path of each (for messages).
struct OpList {
    name: String,
    ops: Vec<NamedOp>,
    mean: [f32; 3],
    std: [f32; 3],
    size: usize,
}

impl OpList {
    fn run(
        &self,
        sample: Sample,
        rng: &mut ChaCha8Rng,
        what: &dyn Fn() -> String,
    ) -> Result<FloatImage> {
        let mut s = sample;
        for (key, op, aug) in &self.ops {
            s = aug
                .apply(s, rng)
                .map_err(|e| DtlError::invalid(format!("{key} (op `{op}`) on {}: {e}", what())))?;
        }
        let t = match s {
            Sample::Tensor(t) => t,
            Sample::Rgb(img) => crate::ops::to_tensor(&img, self.mean, self.std),
        };
        if t.channels != 3 || t.height != self.size || t.width != self.size {
            return Err(DtlError::setting(
                &self.name,
                format!(
                    "the ops produce {}x{}x{} images from {}, but the backbone takes 3x{s}x{s}; end the list with `resize` or `center_crop` to size {s}",
                    t.channels,
                    t.height,
                    t.width,
                    what(),
                    s = self.size
                ),
            ));
        }
        Ok(t)
    }
}

fn inject_defaults(op: &AugmentOp, cfg: &PipelineConfig) -> AugmentOp {
    let mut op = op.clone();
    let d = &cfg.data;
    let nums =
        |v: [f32; 3]| toml::Value::Array(v.iter().map(|&x| toml::Value::Float(x as f64)).collect());
    match op.op.as_str() {
        "normalize" => {
            op.params.entry("mean").or_insert_with(|| nums(d.mean));
            op.params.entry("std").or_insert_with(|| nums(d.std));
        }
        "rand_augment" => {
            op.params.entry("fill").or_insert_with(|| {
                toml::Value::Array(
                    d.mean
                        .iter()
                        .map(|&m| toml::Value::Integer((m as f64 * 255.0).round().clamp(0.0, 255.0) as i64))
                        .collect(),
                )
            });
        }
        "mixup" | "cutmix" => {
            op.params
                .entry("label_smoothing")
                .or_insert(toml::Value::Float(cfg.optim.label_smoothing));
        }
        _ => {}
    }
    op
}

fn build_ops(
    cfg: &PipelineConfig,
    list: &str,
    ops: &[AugmentOp],
    batch: bool,
) -> Result<Vec<NamedOp>> {
    let reg = dtl_core::registry()?;
    let mut out = Vec::new();
    for (i, op) in ops.iter().enumerate() {
        let key = format!("augment.{list}[{i}]");
        let entry = reg
            .augment(&op.op)
            .map_err(|e| DtlError::setting(format!("{key}.op"), e.to_string()))?;
        let aug = (entry.build)(&inject_defaults(op, cfg), &key)?;
        match (batch, aug.as_batch().is_some()) {
            (true, false) => {
                return Err(DtlError::setting(
                    key,
                    format!(
                    "op `{}` works on single images; list it under augment.train or augment.test",
                    op.op
                ),
                ))
            }
            (false, true) => {
                return Err(DtlError::setting(
                    key,
                    format!(
                        "op `{}` works on whole batches; list it under augment.batch",
                        op.op
                    ),
                ))
            }
            _ => {}
        }
        out.push((key, op.op.clone(), aug));
    }
    Ok(out)
}

fn sample_list(cfg: &PipelineConfig, list: &str, ops: &[AugmentOp], size: usize) -> Result<OpList> {
    let built = if ops.is_empty() {
        let d = &cfg.data;
        vec![
            (
                format!("augment.{list} (default)"),
                "resize".to_string(),
                Box::new(crate::ops::Resize {
                    size: Size::Exact(size, size),
                    filter: Interpolation::Bicubic,
                }) as Box<dyn Augment>,
            ),
            (
                format!("augment.{list} (default)"),
                "normalize".to_string(),
                Box::new(Normalize {
                    mean: d.mean,
                    std: d.std,
                }) as Box<dyn Augment>,
            ),
        ]
    } else {
        build_ops(cfg, list, ops, false)?
    };
    Ok(OpList {
        name: format!("augment.{list}"),
        ops: built,
        mean: cfg.data.mean,
        std: cfg.data.std,
        size,
    })
}

/// A seeded subset of `0..len` of at most `limit` indices, in ascending order.
fn subset(len: usize, limit: Option<usize>, seed: u64, which: u64) -> Vec<usize> {
    let mut all: Vec<usize> = (0..len).collect();
    match limit {
        Some(l) if l < len => {
            let mut rng = rng_for(seed, which, 0, Stream::Limit);
            let (chosen, _) = all.partial_shuffle(&mut rng, l);
            let mut v = chosen.to_vec();
            v.sort_unstable();
            v
        }
        _ => all,
    }
}

/// Datasets, op lists and batching settings of one pipeline.
///
/// ```no_run
/// let cfg = dtl_core::PipelineConfig::load("pipelines/quickstart.toml".as_ref(), &[]).unwrap();
/// let data = dtl_data::DataPipeline::new(&cfg, 224).unwrap();
/// for batch in data.train_epoch(0, 0).unwrap() {
///     let batch = batch.unwrap();
///     assert_eq!(batch.images.len(), batch.n * 3 * 224 * 224);
/// }
/// ```
pub struct DataPipeline {
    train: Arc<dyn Dataset>,
    test: Arc<dyn Dataset>,
    train_index: Arc<Vec<usize>>,
    test_index: Arc<Vec<usize>>,
    train_ops: Arc<OpList>,
    test_ops: Arc<OpList>,
    batch_ops: Arc<Vec<NamedOp>>,
    label_smoothing: f64,
    seed: u64,
    batch_size: usize,
    eval_batch_size: usize,
    workers: usize,
    prefetch: usize,
    drop_last: bool,
    num_classes: usize,
}

impl std::fmt::Debug for DataPipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataPipeline")
            .field("train_len", &self.train_len())
            .field("test_len", &self.test_len())
            .field("num_classes", &self.num_classes)
            .field("batch_size", &self.batch_size)
            .finish()
    }
}

impl DataPipeline {
    /// Opens `data.train` and `data.test` through the registry and builds the `[augment]`
    /// lists for images of `image_size x image_size`.
    pub fn new(cfg: &PipelineConfig, image_size: usize) -> Result<DataPipeline> {
        let d = &cfg.data;
        if image_size == 0 {
            return Err(DtlError::argument("image size must be at least 1"));
        }
        if d.batch_size == 0 {
            return Err(DtlError::setting(
                "data.batch_size",
                "must be at least 1, got 0",
            ));
        }
        if cfg.eval_batch_size() == 0 {
            return Err(DtlError::setting(
                "data.eval_batch_size",
                "must be at least 1, got 0",
            ));
        }
        if d.prefetch == 0 {
            return Err(DtlError::setting(
                "data.prefetch",
                "must be at least 1, got 0",
            ));
        }
        let reg = dtl_core::registry()?;
        let train: Arc<dyn Dataset> = Arc::from(reg.open_dataset(d, Split::Train)?);
        let test: Arc<dyn Dataset> = Arc::from(reg.open_dataset(d, Split::Test)?);
        let num_classes = train.num_classes();
        if test.num_classes() > num_classes {
            return Err(DtlError::setting(
                "data.test",
                format!(
                    "the test split `{}` has {} classes but the training split `{}` only {num_classes}",
                    d.test,
                    test.num_classes(),
                    d.train
                ),
            ));
        }
        for (key, limit) in [
            ("data.limit_train", d.limit_train),
            ("data.limit_test", d.limit_test),
        ] {
            if limit == Some(0) {
                return Err(DtlError::setting(
                    key,
                    "must be at least 1, got 0; remove the key to use every item",
                ));
            }
        }
        let train_index = subset(train.len(), d.limit_train, cfg.run.seed, 0);
        let test_index = subset(test.len(), d.limit_test, cfg.run.seed, 1);
        if d.drop_last && train_index.len() < d.batch_size {
            return Err(DtlError::setting(
                "data.batch_size",
                format!(
                    "{} is more than the {} training items, and data.drop_last = true leaves no batch; lower the batch size or set data.drop_last = false",
                    d.batch_size,
                    train_index.len()
                ),
            ));
        }
        let train_ops = sample_list(cfg, "train", &cfg.augment.train, image_size)?;
        let test_ops = sample_list(cfg, "test", &cfg.augment.test, image_size)?;
        let batch_ops = build_ops(cfg, "batch", &cfg.augment.batch, true)?;
        Ok(DataPipeline {
            train,
            test,
            train_index: Arc::new(train_index),
            test_index: Arc::new(test_index),
            train_ops: Arc::new(train_ops),
            test_ops: Arc::new(test_ops),
            batch_ops: Arc::new(batch_ops),
            label_smoothing: cfg.optim.label_smoothing,
            seed: cfg.run.seed,
            batch_size: d.batch_size,
            eval_batch_size: cfg.eval_batch_size(),
            workers: d.workers,
            prefetch: d.prefetch,
            drop_last: d.drop_last,
            num_classes,
        })
    }

    /// A pipeline of `data.test` alone, read with the test transforms, for an extra test set
    /// of a run whose training split is `classes` classes: the training split is not opened
    /// (it has no items), and a test split with more classes than `classes` is refused.
    pub fn test_only(cfg: &PipelineConfig, image_size: usize, classes: usize) -> Result<Self> {
        let d = &cfg.data;
        if image_size == 0 || cfg.eval_batch_size() == 0 || d.prefetch == 0 {
            return Err(DtlError::argument(
                "the image size, data.eval_batch_size and data.prefetch must be at least 1",
            ));
        }
        if d.limit_test == Some(0) {
            return Err(DtlError::setting(
                "data.limit_test",
                "must be at least 1, got 0; remove the key to use every item",
            ));
        }
        let test: Arc<dyn Dataset> = Arc::from(dtl_core::registry()?.open_dataset(d, Split::Test)?);
        if test.num_classes() > classes {
            return Err(DtlError::setting(
                "data.test",
                format!(
                    "the test split `{}` has {} classes but the training split only {classes}",
                    d.test,
                    test.num_classes()
                ),
            ));
        }
        let test_index = subset(test.len(), d.limit_test, cfg.run.seed, 1);
        let test_ops = sample_list(cfg, "test", &cfg.augment.test, image_size)?;
        Ok(DataPipeline {
            train: Arc::clone(&test),
            test,
            train_index: Arc::new(Vec::new()),
            test_index: Arc::new(test_index),
            train_ops: Arc::new(sample_list(cfg, "test", &cfg.augment.test, image_size)?),
            test_ops: Arc::new(test_ops),
            batch_ops: Arc::new(Vec::new()),
            label_smoothing: cfg.optim.label_smoothing,
            seed: cfg.run.seed,
            batch_size: d.batch_size.max(1),
            eval_batch_size: cfg.eval_batch_size(),
            workers: d.workers,
            prefetch: d.prefetch,
            drop_last: false,
            num_classes: classes,
        })
    }

    /// The dataset behind the test split (labels and item names without decoding).
    pub fn test_dataset(&self) -> &Arc<dyn Dataset> {
        &self.test
    }

    /// Number of classes (the training split's).
    pub fn num_classes(&self) -> usize {
        self.num_classes
    }

    /// Training items used (after `data.limit_train`).
    pub fn train_len(&self) -> usize {
        self.train_index.len()
    }

    /// Evaluation items used (after `data.limit_test`).
    pub fn test_len(&self) -> usize {
        self.test_index.len()
    }

    /// Training batches per epoch.
    pub fn train_batches(&self) -> usize {
        let n = self.train_len();
        if self.drop_last {
            n / self.batch_size
        } else {
            n.div_ceil(self.batch_size)
        }
    }

    /// Checks every label of the items in use (both splits, after the limits) against a head
    /// of `classes` classes, without decoding any image; the first one out of range is an
    /// error naming its file and line (or item) and the valid range. `key` is the setting
    /// that fixes `classes`, for the message.
    pub fn check_labels(&self, classes: usize, key: &str) -> Result<()> {
        for (split, ds, index) in [
            ("training", &self.train, &self.train_index),
            ("test", &self.test, &self.test_index),
        ] {
            for &i in index.iter() {
                match ds.label(i) {
                    Some(l) if l >= classes => {
                        return Err(DtlError::argument(format!(
                            "{}: {split} label {l} is out of range: {key} = {classes} allows labels 0-{}",
                            ds.describe(i),
                            classes.saturating_sub(1)
                        )))
                    }
                    _ => {}
                }
            }
        }
        Ok(())
    }

    /// The files both splits are read from (see [`Dataset::sources`]), without repeats.
    pub fn sources(&self) -> Vec<std::path::PathBuf> {
        let mut out = self.train.sources();
        for p in self.test.sources() {
            if !out.contains(&p) {
                out.push(p);
            }
        }
        out
    }

    /// Where training item `i` (an index into the training split) comes from.
    pub fn describe_train(&self, i: usize) -> String {
        self.train.describe(i)
    }

    /// The batches of training epoch `epoch`, shuffled and augmented; the same for a given
    /// `run.seed` and epoch whatever the worker count. The first `skip_batches` batches are
    /// skipped without decoding anything (to resume mid-epoch).
    pub fn train_epoch(&self, epoch: usize, skip_batches: usize) -> Result<Loader> {
        let mut order = (*self.train_index).clone();
        order.shuffle(&mut rng_for(self.seed, epoch as u64, 0, Stream::Shuffle));
        let smoothing = if self.batch_ops.is_empty() && self.label_smoothing > 0.0 {
            Some(self.label_smoothing)
        } else {
            None
        };
        let job = Job {
            ds: self.train.clone(),
            order,
            batch_size: self.batch_size,
            batches: self.train_batches(),
            ops: self.train_ops.clone(),
            batch_ops: self.batch_ops.clone(),
            smoothing,
            seed: self.seed,
            epoch: epoch as u64,
            num_classes: self.num_classes,
            split: "training",
        };
        Ok(Loader::start(
            Arc::new(job),
            skip_batches,
            self.workers,
            self.prefetch,
        ))
    }

    /// The evaluation batches, in order, with the test ops.
    pub fn test_loader(&self) -> Result<Loader> {
        let n = self.test_len();
        let job = Job {
            ds: self.test.clone(),
            order: (*self.test_index).clone(),
            batch_size: self.eval_batch_size,
            batches: n.div_ceil(self.eval_batch_size),
            ops: self.test_ops.clone(),
            batch_ops: Arc::new(Vec::new()),
            smoothing: None,
            seed: self.seed,
            epoch: EVAL_EPOCH,
            num_classes: self.num_classes,
            split: "test",
        };
        Ok(Loader::start(Arc::new(job), 0, self.workers, self.prefetch))
    }
}

/// Everything needed to build any batch of one pass, shared by the workers.
struct Job {
    ds: Arc<dyn Dataset>,
    order: Vec<usize>,
    batch_size: usize,
    batches: usize,
    ops: Arc<OpList>,
    batch_ops: Arc<Vec<NamedOp>>,
    smoothing: Option<f64>,
    seed: u64,
    epoch: u64,
    num_classes: usize,
    split: &'static str,
}

impl Job {
    fn make(&self, b: usize) -> Result<Batch> {
        let lo = b * self.batch_size;
        let hi = (lo + self.batch_size).min(self.order.len());
        let idx = &self.order[lo..hi];
        let n = idx.len();
        let size = self.ops.size;
        let per = 3 * size * size;
        let mut images = Vec::with_capacity(n * per);
        let mut labels = Vec::with_capacity(n);
        for &i in idx {
            let ex = self.ds.get(i)?;
            if ex.label >= self.num_classes {
                return Err(DtlError::argument(format!(
                    "{}: label {} is out of range: the pipeline has {} classes (0-{}), taken from the training split",
                    self.ds.describe(i),
                    ex.label,
                    self.num_classes,
                    self.num_classes - 1
                )));
            }
            let mut rng = rng_for(self.seed, self.epoch, i as u64, Stream::Sample);
            let t = self
                .ops
                .run(Sample::Rgb(ex.image), &mut rng, &|| self.ds.describe(i))?;
            images.extend_from_slice(&t.data);
            labels.push(ex.label);
        }
        let mut soft_targets = None;
        if !self.batch_ops.is_empty() {
            let mut tb = TensorBatch::new(images, 3, size, size, labels, self.num_classes)?;
            let mut rng = rng_for(self.seed, self.epoch, b as u64, Stream::Batch);
            for (key, op, aug) in self.batch_ops.iter() {
                let batch_op = aug.as_batch().ok_or_else(|| {
                    DtlError::setting(key, format!("op `{op}` is not a batch op"))
                })?;
                batch_op.apply_batch(&mut tb, &mut rng).map_err(|e| {
                    DtlError::invalid(format!(
                        "{key} (op `{op}`) on {} batch {b}: {e}",
                        self.split
                    ))
                })?;
            }
            images = tb.images;
            labels = tb.labels;
            soft_targets = tb.soft_targets;
        } else if let Some(s) = self.smoothing {
            let c = self.num_classes;
            let off = (s / c as f64) as f32;
            let on = (1.0 - s) as f32 + off;
            let mut t = vec![off; n * c];
            for (k, &l) in labels.iter().enumerate() {
                t[k * c + l] = on;
            }
            soft_targets = Some(t);
        }
        Ok(Batch {
            images,
            labels,
            soft_targets,
            n,
        })
    }
}

enum Source {
    Inline(Arc<Job>),
    Threads {
        rx: Vec<Receiver<Result<Batch>>>,
        handles: Vec<JoinHandle<()>>,
    },
}

/// The batches of one pass over a split, produced ahead on worker threads.
///
/// Each worker builds whole batches (batch `b` goes to worker `b % workers`) into its own
/// bounded queue, and the loader hands them out in order, so batches are identical whatever
/// the worker count. With `data.workers = 0` batches are built on the calling thread. The
/// iteration stops after the first error.
///
/// ```no_run
/// # let cfg = dtl_core::PipelineConfig::load("pipelines/quickstart.toml".as_ref(), &[]).unwrap();
/// let data = dtl_data::DataPipeline::new(&cfg, 28).unwrap();
/// let loader = data.test_loader().unwrap();
/// println!("{} batches", loader.batches());
/// for batch in loader { let _ = batch.unwrap(); }
/// ```
pub struct Loader {
    total: usize,
    next: usize,
    start: usize,
    failed: bool,
    source: Source,
}

impl Loader {
    fn start(job: Arc<Job>, skip: usize, workers: usize, prefetch: usize) -> Loader {
        let total = job.batches;
        let start = skip.min(total);
        let source = if workers == 0 || start >= total {
            Source::Inline(job)
        } else {
            let workers = workers.min(total - start);
            let cap = prefetch.div_ceil(workers).max(1);
            let mut rx = Vec::with_capacity(workers);
            let mut handles = Vec::with_capacity(workers);
            for w in 0..workers {
                let (tx, r) = sync_channel::<Result<Batch>>(cap);
                let job = job.clone();
                let handle = std::thread::Builder::new()
                    .name(format!("dtl-data-{w}"))
                    .spawn(move || {
                        let mut b = start + w;
                        while b < total {
                            let out = job.make(b);
                            let stop = out.is_err();
                            if tx.send(out).is_err() || stop {
                                break;
                            }
                            b += workers;
                        }
                    });
                match handle {
                    Ok(h) => {
                        rx.push(r);
                        handles.push(h);
                    }
                    Err(_) => break,
                }
            }
            if rx.len() < workers {
                // Not every thread could start: build on the calling thread instead.
                rx.clear();
                for h in handles {
                    let _ = h.join();
                }
                Source::Inline(job)
            } else {
                Source::Threads { rx, handles }
            }
        };
        Loader {
            total,
            next: start,
            start,
            failed: false,
            source,
        }
    }

    /// Batches in the whole pass (an epoch), including any skipped at the start.
    pub fn batches(&self) -> usize {
        self.total
    }

    /// Batches still to come.
    pub fn remaining(&self) -> usize {
        if self.failed {
            0
        } else {
            self.total - self.next
        }
    }
}

impl Iterator for Loader {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Result<Batch>> {
        if self.failed || self.next >= self.total {
            return None;
        }
        let b = self.next;
        self.next += 1;
        let out = match &self.source {
            Source::Inline(job) => job.make(b),
            Source::Threads { rx, .. } => {
                let w = (b - self.start) % rx.len();
                rx[w].recv().unwrap_or_else(|_| {
                    Err(DtlError::invalid(format!(
                        "data loader worker {w} stopped unexpectedly while preparing batch {b}"
                    )))
                })
            }
        };
        if out.is_err() {
            self.failed = true;
        }
        Some(out)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.remaining(), Some(self.remaining()))
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        if let Source::Threads { rx, handles } = &mut self.source {
            // Closing the queues makes every worker stop at its next send.
            rx.clear();
            for h in handles.drain(..) {
                let _ = h.join();
            }
        }
    }
}
