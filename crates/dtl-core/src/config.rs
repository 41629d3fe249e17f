//! The pipeline schema: one TOML file describes one run.
//!
//! Parsing is strict (`deny_unknown_fields`), then [`validate`] checks meaning against the
//! registry. Every error names the file, the key (and line where known) and what is valid.
//! `docs/pipeline.md` documents every key.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

pub use crate::choice::{Pool, Precision, ScheduleKind, ScheduleUnit, WeightsFormat};
use crate::registry::{resolve_path, Registry};
use crate::{DtlError, Result};

/// A whole pipeline.
///
/// ```
/// let text = r#"
/// [run]
/// name = "demo"
/// [backbone]
/// kind = "vit_tiny_patch16_224"
/// [data]
/// kind = "image-folder"
/// root = "data"
/// "#;
/// let cfg = dtl_core::PipelineConfig::from_str(text, "demo.toml".as_ref(), &[]).unwrap();
/// assert_eq!(cfg.side.kind, "dtl");
/// assert_eq!(cfg.optim.betas, [0.9, 0.999]);
/// ```
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    /// `[run]`: name, seed, device, output folder, precision.
    #[serde(default)]
    pub run: RunConfig,
    /// `[backbone]`: the frozen model and its weights.
    pub backbone: BackboneConfig,
    /// `[side]`: the Compact Side Network.
    #[serde(default)]
    pub side: SideConfig,
    /// `[head]`: the classifier.
    #[serde(default)]
    pub head: HeadConfig,
    /// `[data]`: where samples come from and how they are batched.
    pub data: DataConfig,
    /// `[augment]`: ordered preprocessing and augmentation ops.
    #[serde(default)]
    pub augment: AugmentConfig,
    /// `[optim]`: AdamW.
    #[serde(default)]
    pub optim: OptimConfig,
    /// `[schedule]`: epochs and the learning-rate schedule.
    #[serde(default)]
    pub schedule: ScheduleConfig,
    /// `[eval]`: evaluation cadence.
    #[serde(default)]
    pub eval: EvalConfig,
}

/// `[run]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunConfig {
    /// Run name; the run directory is `<output_dir>/<name>`. Defaults to the file stem.
    pub name: String,
    /// Seed of every random choice (init, shuffling, augmentation, drop path).
    pub seed: u64,
    /// `cpu`, `cuda:N`, or `auto` (the first usable GPU, else the CPU).
    pub device: DeviceSpec,
    /// Parent folder of run directories, relative to the working directory.
    pub output_dir: PathBuf,
    /// `f32` or `bf16` (bf16 needs a CUDA device).
    pub precision: Precision,
    /// What the frozen blocks after the first inject keep for the backward pass:
    /// `recompute` (only their inputs; each block's VJP recomputes its internals) or `store`
    /// (their internals too, so the VJP recomputes nothing: faster, more memory). The
    /// tape-based CPU path of plugin side networks always recomputes.
    pub activations: String,
    /// CPU threads for compute (0 = all cores).
    pub threads: usize,
    /// Write a step metrics line every this many steps.
    pub log_every: usize,
}

impl Default for RunConfig {
    fn default() -> Self {
        RunConfig {
            name: String::new(),
            seed: 0,
            device: DeviceSpec::Cpu,
            output_dir: "runs".into(),
            precision: Precision::F32,
            activations: "recompute".into(),
            threads: 0,
            log_every: 10,
        }
    }
}

/// `[backbone]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackboneConfig {
    /// Registered variant name (`dtl list backbones`).
    pub kind: String,
    /// Checkpoint file (timm `.safetensors` or Google `.npz`); relative to the pipeline file.
    /// Without it the backbone is randomly initialised (for benchmarks only).
    #[serde(default)]
    pub weights: Option<PathBuf>,
    /// `auto` (from the file), `safetensors`, `npz` or `pth`.
    #[serde(default = "auto")]
    pub format: WeightsFormat,
    /// Stochastic-depth rate of the last block (timm's `drop_path_rate`).
    #[serde(default)]
    pub drop_path: f64,
}

fn auto() -> WeightsFormat {
    WeightsFormat::Auto
}

/// `[side]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SideConfig {
    /// `dtl`, `dtl+` or `linear` (or a registered plugin).
    pub kind: String,
    /// Rank r of each low-rank map.
    pub rank: usize,
    /// beta of swish_beta.
    pub beta: f64,
    /// Tapped blocks: `"0-11"`, `"0-3,8"`, `"all"` or a list. Default: all blocks.
    pub taps: Option<Blocks>,
    /// Blocks after which g(z) is added. Default: the second half of the blocks.
    pub injects: Option<Blocks>,
    /// Depthwise conv kernel of `dtl+` (0 = none). Default 3 for `dtl+`, 0 otherwise.
    pub kernel: Option<usize>,
    /// Extra parameters for plugin side networks.
    pub options: toml::Table,
}

impl Default for SideConfig {
    fn default() -> Self {
        SideConfig {
            kind: "dtl".into(),
            rank: 2,
            beta: 100.0,
            taps: None,
            injects: None,
            kernel: None,
            options: toml::Table::new(),
        }
    }
}

impl SideConfig {
    /// Tapped blocks for a backbone of `depth` blocks (validated).
    pub fn tap_blocks(&self, depth: usize) -> Vec<usize> {
        match &self.taps {
            Some(b) => b.resolve(depth),
            None => (0..depth).collect(),
        }
    }

    /// Inject blocks for a backbone of `depth` blocks (validated).
    pub fn inject_blocks(&self, depth: usize) -> Vec<usize> {
        match &self.injects {
            Some(b) => b.resolve(depth),
            None => (depth / 2..depth).collect(),
        }
    }

    /// The conv kernel: the configured one, else the side network's registered default
    /// ([`crate::registry::SideTraits::default_kernel`]: 3 for `dtl+`, 0 otherwise).
    pub fn kernel_size(&self) -> usize {
        self.kernel
            .unwrap_or_else(|| crate::registry::side_traits(&self.kind).default_kernel)
    }

    /// Whether the side network taps blocks (false for the linear probe); see
    /// [`crate::registry::SideTraits::taps`].
    pub fn taps_blocks(&self) -> bool {
        crate::registry::side_traits(&self.kind).taps
    }
}

/// `[head]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HeadConfig {
    /// `linear` (or a registered plugin).
    pub kind: String,
    /// `mean` (mean of patch tokens, the DTL head) or `cls` (class token).
    pub pool: Pool,
    /// Number of classes; defaults to the dataset's.
    pub classes: Option<usize>,
}

impl Default for HeadConfig {
    fn default() -> Self {
        HeadConfig {
            kind: "linear".into(),
            pool: Pool::Mean,
            classes: None,
        }
    }
}

/// `[data]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// Registered dataset layout (`dtl list datasets`).
    pub kind: String,
    /// Dataset root folder or file; relative to the pipeline file.
    pub root: PathBuf,
    /// Task or dataset name inside the root (VTAB-1k task, few-shot dataset).
    #[serde(default)]
    pub task: Option<String>,
    /// Training split name (layout-specific; e.g. `train800val200`).
    #[serde(default = "train_split")]
    pub train: String,
    /// Evaluation split name.
    #[serde(default = "test_split")]
    pub test: String,
    /// Training batch size.
    #[serde(default = "batch")]
    pub batch_size: usize,
    /// Evaluation batch size (defaults to the training one).
    #[serde(default)]
    pub eval_batch_size: Option<usize>,
    /// Decoding/augmentation worker threads.
    #[serde(default = "workers")]
    pub workers: usize,
    /// Batches prepared ahead of the trainer.
    #[serde(default = "prefetch")]
    pub prefetch: usize,
    /// Drop the last incomplete training batch.
    #[serde(default = "yes")]
    pub drop_last: bool,
    /// Per-channel mean subtracted after scaling pixels to [0, 1].
    #[serde(default = "half3")]
    pub mean: [f32; 3],
    /// Per-channel standard deviation.
    #[serde(default = "half3")]
    pub std: [f32; 3],
    /// Use at most this many training items (quick runs).
    #[serde(default)]
    pub limit_train: Option<usize>,
    /// Use at most this many evaluation items.
    #[serde(default)]
    pub limit_test: Option<usize>,
    /// Layout-specific parameters (few-shot `shots`/`seed`, IDX file names, CSV columns).
    #[serde(default)]
    pub options: toml::Table,
}

fn train_split() -> String {
    "train".into()
}
fn test_split() -> String {
    "test".into()
}
fn batch() -> usize {
    32
}
fn workers() -> usize {
    2
}
fn prefetch() -> usize {
    4
}
fn yes() -> bool {
    true
}
fn half3() -> [f32; 3] {
    [0.5; 3]
}

/// `[augment]`: op lists applied in order. Empty lists mean "resize to the backbone's input
/// and normalise".
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AugmentConfig {
    /// Ops for training samples.
    pub train: Vec<AugmentOp>,
    /// Ops for evaluation samples.
    pub test: Vec<AugmentOp>,
    /// Batch-level ops (mixup/cutmix) for training batches.
    pub batch: Vec<AugmentOp>,
}

/// One op: `{ op = "resize", size = 224 }`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AugmentOp {
    /// Registered op name (`dtl list augment`).
    pub op: String,
    /// The op's parameters.
    #[serde(flatten)]
    pub params: toml::Table,
}

/// `[optim]`: AdamW.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimConfig {
    /// `adamw`.
    pub kind: String,
    /// Peak learning rate.
    pub lr: f64,
    /// Adam betas.
    pub betas: [f64; 2],
    /// Adam epsilon.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// Parameters whose names end with one of these get no weight decay.
    pub no_decay: Vec<String>,
    /// Clip the global gradient norm to this value (none when absent).
    pub clip_grad: Option<f64>,
    /// Label smoothing of the cross-entropy loss.
    pub label_smoothing: f64,
}

impl Default for OptimConfig {
    fn default() -> Self {
        OptimConfig {
            kind: "adamw".into(),
            lr: 1e-3,
            betas: [0.9, 0.999],
            eps: 1e-8,
            weight_decay: 0.05,
            no_decay: vec![".bias".into()],
            clip_grad: None,
            label_smoothing: 0.0,
        }
    }
}

impl OptimConfig {
    /// Whether the parameter `name` gets weight decay.
    ///
    /// ```
    /// let o = dtl_core::config::OptimConfig::default();
    /// assert!(!o.decays("head.bias"));
    /// assert!(o.decays("side.0.a"));
    /// ```
    pub fn decays(&self, name: &str) -> bool {
        !self.no_decay.iter().any(|s| name.ends_with(s.as_str()))
    }
}

/// `[schedule]`: epochs and timm `CosineLRScheduler` semantics.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScheduleConfig {
    /// `cosine` or `constant`.
    pub kind: ScheduleKind,
    /// Training epochs.
    pub epochs: usize,
    /// Length of the first cosine cycle in epochs (timm `t_initial`); defaults to `epochs`.
    pub t_initial: Option<usize>,
    /// Linear warm-up epochs (they overlap the cosine, as in timm).
    pub warmup_epochs: usize,
    /// Learning rate at the start of warm-up.
    pub warmup_lr: f64,
    /// Floor of the cosine.
    pub min_lr: f64,
    /// Peak decay factor per cycle.
    pub cycle_decay: f64,
    /// `epoch` (update once per epoch, timm's default) or `step` (every optimizer step).
    pub per: ScheduleUnit,
}

impl Default for ScheduleConfig {
    fn default() -> Self {
        ScheduleConfig {
            kind: ScheduleKind::Cosine,
            epochs: 10,
            t_initial: None,
            warmup_epochs: 0,
            warmup_lr: 1e-7,
            min_lr: 1e-8,
            cycle_decay: 0.5,
            per: ScheduleUnit::Epoch,
        }
    }
}

/// `[eval]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalConfig {
    /// Evaluate every this many epochs (and always after the last).
    pub every: usize,
    /// Also evaluate before training.
    pub at_start: bool,
    /// A validation split (a `data.test`-style split name, e.g. `"val"` for the few-shot
    /// lists): when set, the evaluations during training run on it, the best checkpoint is the
    /// one with the best validation top-1, and the test split is evaluated once at the end,
    /// with that checkpoint. Unset: the evaluations run on the test split.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub val: Option<String>,
    /// The classes the test split `data.test` is scored over (see [`ClassSubset`]); unset:
    /// every class of the head.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub test_classes: Option<ClassSubset>,
    /// More test sets (`[[eval.tests]]`), each evaluated after training with the checkpoint
    /// the test split uses and reported by its name.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tests: Vec<TestSetConfig>,
}

impl Default for EvalConfig {
    fn default() -> Self {
        EvalConfig {
            every: 1,
            at_start: false,
            val: None,
            test_classes: None,
            tests: Vec::new(),
        }
    }
}

/// One extra test set of `[[eval.tests]]`: a name, where its items come from (any key left
/// out is taken from `[data]`) and the classes it is scored over.
///
/// ```
/// let text = r#"
/// [backbone]
/// kind = "vit_tiny_patch16_224"
/// [data]
/// kind = "domain-generalization"
/// root = "DG"
/// [[eval.tests]]
/// name = "imagenet-a"
/// split = "imagenet-adversarial"
/// classes = "present"
/// "#;
/// let cfg = dtl_core::PipelineConfig::from_str(text, "dg.toml".as_ref(), &[]).unwrap();
/// let t = &cfg.eval.tests[0];
/// assert_eq!(t.data_config(&cfg.data).test, "imagenet-adversarial");
/// assert_eq!(t.data_config(&cfg.data).kind, "domain-generalization");
/// assert_eq!(t.classes, Some(dtl_core::config::ClassSubset::Present));
/// ```
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TestSetConfig {
    /// The name it is reported under (unique, and not `data.test`'s).
    pub name: String,
    /// Dataset layout; defaults to `data.kind`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// Dataset root; defaults to `data.root`. Relative to the pipeline file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root: Option<PathBuf>,
    /// Task or dataset inside the root; defaults to `data.task`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<String>,
    /// The split read as this test set; defaults to `data.test`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub split: Option<String>,
    /// Use only N items (a fixed subset drawn with `run.seed`); defaults to `data.limit_test`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
    /// The classes it is scored over; unset: every class of the head.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub classes: Option<ClassSubset>,
    /// Also evaluate it at every evaluation during training (the metrics' epoch lines).
    #[serde(default)]
    pub during_training: bool,
    /// Layout options; default to `data.options` when the layout is `data.kind`'s, else none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub options: Option<toml::Table>,
}

impl TestSetConfig {
    /// The `[data]` section this test set is read with: `data` with the keys it sets
    /// replaced (its split becomes `data.test`).
    pub fn data_config(&self, data: &DataConfig) -> DataConfig {
        let mut d = data.clone();
        let same_layout = self.kind.as_deref().map_or(true, |k| k == data.kind);
        if let Some(k) = &self.kind {
            d.kind = k.clone();
        }
        if let Some(r) = &self.root {
            d.root = r.clone();
        }
        if self.task.is_some() {
            d.task = self.task.clone();
        }
        if let Some(s) = &self.split {
            d.test = s.clone();
        }
        d.options = match &self.options {
            Some(o) => o.clone(),
            None if same_layout => data.options.clone(),
            None => toml::Table::new(),
        };
        if self.limit.is_some() {
            d.limit_test = self.limit;
        }
        d
    }
}

/// The classes a test set is scored over: its labels live in the training label space and
/// the logits of every other class are left out before top-1, top-5 and the loss (the
/// convention of ImageNet-A and ImageNet-R, 200 of ImageNet's 1000 classes).
///
/// Written `"all"` (every class), `"present"` (the classes that occur in the test set) or a
/// list of training labels (`[1, 5, 9]`).
///
/// ```
/// use dtl_core::config::ClassSubset;
/// let c: ClassSubset = toml::Value::from("present").try_into().unwrap();
/// assert_eq!(c, ClassSubset::Present);
/// let c: ClassSubset = toml::Value::from(vec![3i64, 1]).try_into().unwrap();
/// assert_eq!(c, ClassSubset::List(vec![3, 1]));
/// assert!(toml::Value::from("some").try_into::<ClassSubset>().is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClassSubset {
    /// Every class of the head.
    All,
    /// The classes that occur among the test set's labels.
    Present,
    /// These training labels.
    List(Vec<usize>),
}

impl Serialize for ClassSubset {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            ClassSubset::All => s.serialize_str("all"),
            ClassSubset::Present => s.serialize_str("present"),
            ClassSubset::List(v) => v.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for ClassSubset {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Name(String),
            List(Vec<usize>),
        }
        let bad = "expected \"all\", \"present\" or a list of training labels such as [1, 5, 9]";
        match Raw::deserialize(d).map_err(|_| serde::de::Error::custom(bad))? {
            Raw::Name(n) if n == "all" => Ok(ClassSubset::All),
            Raw::Name(n) if n == "present" => Ok(ClassSubset::Present),
            Raw::Name(n) => Err(serde::de::Error::custom(format!("`{n}`: {bad}"))),
            Raw::List(v) => Ok(ClassSubset::List(v)),
        }
    }
}

/// A set of block indices written as `"0-11"`, `"0-3,6,8-11"`, `"all"`, `"none"` or a list.
///
/// ```
/// use dtl_core::config::Blocks;
/// let b: Blocks = "0-2,5".parse().unwrap();
/// assert_eq!(b.resolve(12), vec![0, 1, 2, 5]);
/// assert_eq!("all".parse::<Blocks>().unwrap().resolve(3), vec![0, 1, 2]);
/// assert!("3-1".parse::<Blocks>().is_err());
/// // No backbone has 4 billion blocks: an index past MAX_BLOCK is refused, never expanded.
/// assert!("0-4000000000".parse::<Blocks>().is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Blocks {
    /// Every block.
    All,
    /// Explicit indices, sorted and deduplicated.
    List(Vec<usize>),
}

impl Blocks {
    /// The largest block index a pipeline may name (backbones have tens of blocks).
    pub const MAX_BLOCK: usize = 4095;

    fn too_far(i: impl fmt::Display) -> String {
        format!(
            "block {i} is past the largest block index, {}",
            Blocks::MAX_BLOCK
        )
    }

    /// The indices for a backbone of `depth` blocks (indices past the depth are kept, so
    /// that validation can report them).
    pub fn resolve(&self, depth: usize) -> Vec<usize> {
        match self {
            Blocks::All => (0..depth).collect(),
            Blocks::List(v) => v.clone(),
        }
    }
}

impl std::str::FromStr for Blocks {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let t = s.trim();
        if t == "all" {
            return Ok(Blocks::All);
        }
        if t == "none" || t.is_empty() {
            return Ok(Blocks::List(vec![]));
        }
        let mut out = Vec::new();
        for part in t.split(',') {
            let part = part.trim();
            let bad = || {
                format!("`{part}` is not a block index or range; write e.g. \"0-11\", \"0-3,8\", \"all\" or [0, 1, 2]")
            };
            if let Some((a, b)) = part.split_once('-') {
                let a: usize = a.trim().parse().map_err(|_| bad())?;
                let b: usize = b.trim().parse().map_err(|_| bad())?;
                if a > b {
                    return Err(format!(
                        "range `{part}` is empty: its start is after its end"
                    ));
                }
                if b > Blocks::MAX_BLOCK {
                    return Err(Blocks::too_far(b));
                }
                out.extend(a..=b);
            } else {
                let i: usize = part.parse().map_err(|_| bad())?;
                if i > Blocks::MAX_BLOCK {
                    return Err(Blocks::too_far(i));
                }
                out.push(i);
            }
        }
        out.sort_unstable();
        out.dedup();
        Ok(Blocks::List(out))
    }
}

impl fmt::Display for Blocks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Blocks::All => write!(f, "all"),
            Blocks::List(v) => {
                let mut parts = Vec::new();
                let mut i = 0;
                while i < v.len() {
                    let mut j = i;
                    while j + 1 < v.len() && v[j + 1] == v[j] + 1 {
                        j += 1;
                    }
                    parts.push(if i == j {
                        v[i].to_string()
                    } else {
                        format!("{}-{}", v[i], v[j])
                    });
                    i = j + 1;
                }
                if parts.is_empty() {
                    write!(f, "none")
                } else {
                    write!(f, "{}", parts.join(","))
                }
            }
        }
    }
}

impl Serialize for Blocks {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Blocks {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Text(String),
            List(Vec<i64>),
        }
        match Raw::deserialize(d).map_err(|_| {
            serde::de::Error::custom(
                "expected block indices: a string like \"0-11\" or \"0-3,8\" or \"all\", or a list like [0, 1, 2]",
            )
        })? {
            Raw::Text(s) => s.parse().map_err(serde::de::Error::custom),
            Raw::List(v) => {
                let mut out = Vec::new();
                for i in v {
                    if i < 0 {
                        return Err(serde::de::Error::custom(format!(
                            "block index {i} is negative"
                        )));
                    }
                    if i as u64 > Blocks::MAX_BLOCK as u64 {
                        return Err(serde::de::Error::custom(Blocks::too_far(i)));
                    }
                    out.push(i as usize);
                }
                out.sort_unstable();
                out.dedup();
                Ok(Blocks::List(out))
            }
        }
    }
}

/// A parsed `cpu` / `cuda:N` / `auto` device string.
///
/// ```
/// use dtl_core::config::DeviceSpec;
/// assert_eq!("cuda:1".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(1));
/// assert_eq!("cuda".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(0));
/// assert_eq!("auto".parse::<DeviceSpec>().unwrap(), DeviceSpec::Auto);
/// assert!("gpu".parse::<DeviceSpec>().is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    /// The host CPU.
    Cpu,
    /// CUDA device with this ordinal.
    Cuda(usize),
    /// The first usable CUDA device, else the CPU; see [`PipelineConfig::resolve_device`].
    Auto,
}

impl std::str::FromStr for DeviceSpec {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "cpu" => Ok(DeviceSpec::Cpu),
            "auto" => Ok(DeviceSpec::Auto),
            "cuda" => Ok(DeviceSpec::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(DeviceSpec::Cuda)
                .ok_or_else(|| {
                    format!("`{s}` is not a device; use \"cpu\", \"cuda:N\" (e.g. \"cuda:0\") or \"auto\"")
                }),
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
            DeviceSpec::Auto => f.write_str("auto"),
        }
    }
}

impl PartialEq<&str> for DeviceSpec {
    fn eq(&self, other: &&str) -> bool {
        other.parse::<DeviceSpec>().is_ok_and(|d| d == *self)
    }
}

impl Serialize for DeviceSpec {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for DeviceSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// `path` made absolute against the working directory, `.`/`..` folded where possible.
fn absolute(path: &Path) -> PathBuf {
    let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    abs.canonicalize().unwrap_or_else(|_| {
        // The path does not exist (yet): fold `..` lexically so messages stay readable.
        let mut out = PathBuf::new();
        for c in abs.components() {
            match c {
                std::path::Component::ParentDir => {
                    out.pop();
                }
                std::path::Component::CurDir => {}
                other => out.push(other),
            }
        }
        out
    })
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// Parses a `key=value` override into a dotted key and a TOML value. Values are read as
/// TOML (`3e-4`, `true`, `[1, 2]`, `"x"`); anything that is not valid TOML is a string.
///
/// ```
/// let (k, v) = dtl_core::config::parse_override("optim.lr=3e-4").unwrap();
/// assert_eq!(k, "optim.lr");
/// assert_eq!(v.as_float(), Some(3e-4));
/// let (_, v) = dtl_core::config::parse_override("side.taps=0-11").unwrap();
/// assert_eq!(v.as_str(), Some("0-11"));
/// ```
pub fn parse_override(text: &str) -> Result<(String, toml::Value)> {
    let (key, value) = text.split_once('=').ok_or_else(|| {
        DtlError::config(
            "command line",
            text,
            None,
            "an override must look like `section.key=value`, e.g. `optim.lr=3e-4`",
        )
    })?;
    let key = key.trim().to_string();
    if key.is_empty() || key.split('.').any(|p| p.is_empty()) {
        return Err(DtlError::config(
            "command line",
            text,
            None,
            "an override key must be dotted like `optim.lr`",
        ));
    }
    let value = value.trim();
    let parsed = toml::from_str::<toml::Table>(&format!("v = {value}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(value.to_string()));
    Ok((key, parsed))
}

fn apply_override(table: &mut toml::Table, key: &str, value: toml::Value) -> Result<()> {
    let parts: Vec<&str> = key.split('.').collect();
    let mut cur = table;
    for (i, p) in parts.iter().enumerate() {
        if i + 1 == parts.len() {
            cur.insert(p.to_string(), value);
            return Ok(());
        }
        let entry = cur
            .entry(p.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        cur = entry.as_table_mut().ok_or_else(|| {
            DtlError::config(
                "command line",
                key,
                None,
                format!(
                    "`{}` is not a table, so `{key}` cannot be set",
                    parts[..=i].join(".")
                ),
            )
        })?;
    }
    Ok(())
}

fn deserialize_with_path(text: &str, file: &Path, origin: &Path) -> Result<PipelineConfig> {
    let de = toml::Deserializer::new(text);
    serde_path_to_error::deserialize::<_, PipelineConfig>(de).map_err(|e| {
        let key = e.path().to_string();
        let key = if key == "." { String::new() } else { key };
        let inner = e.into_inner();
        let line = inner.span().map(|s| line_of(text, s.start));
        let msg = inner.message().trim().to_string();
        let msg = explain(&msg);
        let _ = file;
        DtlError::config(origin, key, line, msg)
    })
}

/// Rewrites serde's messages into ones that say what would be valid.
fn explain(msg: &str) -> String {
    if let Some(rest) = msg.strip_prefix("unknown field ") {
        return format!("unknown key {rest}");
    }
    if msg.starts_with("missing field") {
        return msg.replacen("missing field", "missing required key", 1);
    }
    msg.replace("expected usize", "expected a whole number (0 or more)")
        .replace("expected u64", "expected a whole number (0 or more)")
        .replace("expected f64", "expected a number")
        .replace("expected f32", "expected a number")
}

impl PipelineConfig {
    /// Reads and parses a pipeline file, applies `key=value` overrides and resolves relative
    /// paths against the file's folder. Semantic checks are [`validate`]'s job.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| DtlError::io(path, e))?;
        Self::from_str(&text, path, overrides)
    }

    /// Parses pipeline text as if read from `path`.
    #[allow(clippy::should_implement_trait)]
    pub fn from_str(text: &str, path: &Path, overrides: &[String]) -> Result<Self> {
        // The file on its own first, so that its errors carry line numbers.
        let mut cfg = deserialize_with_path(text, path, path)?;
        let mut overridden = Vec::new();
        if !overrides.is_empty() {
            let mut table: toml::Table = toml::from_str(text)
                .map_err(|e| DtlError::config(path, "", None, e.message().to_string()))?;
            for o in overrides {
                let (k, v) = parse_override(o)?;
                apply_override(&mut table, &k, v)?;
                overridden.push(k);
            }
            let merged = toml::to_string(&table)
                .map_err(|e| DtlError::config("command line", "", None, e.to_string()))?;
            cfg =
                deserialize_with_path(&merged, path, Path::new("command line")).map_err(
                    |e| match e {
                        DtlError::Config { key, message, .. } => DtlError::config(
                            format!("{} (with overrides)", path.display()),
                            key,
                            None,
                            message,
                        ),
                        other => other,
                    },
                )?;
        }
        if cfg.run.name.is_empty() {
            cfg.run.name = path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "run".into());
        }
        // Paths written in the file are relative to the file; paths given on the command line
        // are relative to the working directory, as a shell user expects.
        let resolve = |key: &str, p: &Path| {
            if overridden.iter().any(|k| k == key) {
                absolute(p)
            } else {
                absolute(&resolve_path(path, p))
            }
        };
        if let Some(w) = &cfg.backbone.weights {
            cfg.backbone.weights = Some(resolve("backbone.weights", w));
        }
        cfg.data.root = resolve("data.root", &cfg.data.root);
        for t in &mut cfg.eval.tests {
            if let Some(r) = &t.root {
                t.root = Some(absolute(&resolve_path(path, r)));
            }
        }
        cfg.run.output_dir = absolute(&cfg.run.output_dir);
        Ok(cfg)
    }

    /// The resolved pipeline as TOML, every default filled in.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot print: {e}\n"))
    }

    /// The number of classes: `head.classes` if set, else `fallback` (the dataset's).
    pub fn classes(&self, fallback: usize) -> usize {
        self.head.classes.unwrap_or(fallback)
    }

    /// Evaluation batch size.
    pub fn eval_batch_size(&self) -> usize {
        self.data.eval_batch_size.unwrap_or(self.data.batch_size)
    }

    /// Replaces `run.device = "auto"` with the device it stands for: `cuda:N` for the first
    /// usable GPU that `first_gpu` finds, else `cpu`, in which case the returned notice says
    /// why (one line, for the user). Any other device is left as it is.
    ///
    /// ```
    /// use dtl_core::PipelineConfig;
    /// let mut cfg = PipelineConfig::from_str("[backbone]\nkind = \"toy\"\n[run]\ndevice = \"auto\"\n[data]\nkind = \"image-folder\"\nroot = \".\"\n",
    ///     "p.toml".as_ref(), &[]).unwrap();
    /// let notice = cfg.resolve_device(|| Err("no CUDA driver".into()));
    /// assert_eq!(cfg.run.device, "cpu");
    /// assert!(notice.unwrap().contains("no CUDA driver"));
    /// let mut cfg2 = cfg.clone();
    /// cfg2.run.device = dtl_core::config::DeviceSpec::Auto;
    /// assert!(cfg2.resolve_device(|| Ok(0)).is_none());
    /// assert_eq!(cfg2.run.device, "cuda:0");
    /// ```
    pub fn resolve_device(
        &mut self,
        first_gpu: impl FnOnce() -> std::result::Result<usize, String>,
    ) -> Option<String> {
        if self.run.device != DeviceSpec::Auto {
            return None;
        }
        match first_gpu() {
            Ok(n) => {
                self.run.device = DeviceSpec::Cuda(n);
                None
            }
            Err(why) => {
                self.run.device = DeviceSpec::Cpu;
                Some(format!(
                    "run.device = \"auto\": no usable GPU ({why}); training on the CPU"
                ))
            }
        }
    }

    /// The device (`run.device`, parsed with the pipeline).
    pub fn device(&self) -> Result<DeviceSpec> {
        Ok(self.run.device)
    }
}

/// `x > 0`, false for NaN.
fn positive(x: f64) -> bool {
    x > 0.0
}

/// What [`validate`] needs besides the pipeline.
pub struct ValidationContext<'a> {
    /// The pipeline file (named in every message).
    pub file: &'a Path,
    /// The component registry.
    pub registry: &'a Registry,
    /// Says why a device cannot be used, or `Ok` when it can.
    pub device_check: &'a dyn Fn(DeviceSpec) -> std::result::Result<(), String>,
}

/// The tapped blocks of `spec` that no gradient can reach: those with no inject block at or
/// after them in their own stage. The side state starts again from zero at every stage, so
/// what a tap adds is read only by the injects of its stage; the maps of such a tap never
/// train (on a single-stage backbone: the taps after the last inject).
///
/// ```
/// use dtl_core::{BackboneSpec, StageSpec};
/// let st = |blocks, width| StageSpec { blocks, width, heads: 1, grid: (2, 2), prefix_tokens: 0 };
/// let spec = BackboneSpec {
///     stages: vec![st((0, 2), 8), st((2, 4), 16)],
///     ..BackboneSpec::vit("two_stages", 8, 4, 16, 4, 1)
/// };
/// assert_eq!(dtl_core::config::unreached_taps(&spec, &[0, 1, 2, 3], &[0, 2]), vec![1, 3]);
/// ```
pub fn unreached_taps(spec: &crate::BackboneSpec, taps: &[usize], injects: &[usize]) -> Vec<usize> {
    taps.iter()
        .copied()
        .filter(|&t| {
            let st = spec.stage(t);
            !injects.iter().any(|&j| j >= t && st.contains(j))
        })
        .collect()
}

/// The warning for the `side.taps` of a pipeline that no gradient can reach (see
/// [`unreached_taps`]: on a single-stage backbone the taps after the last inject), or `None`
/// (always `None` for the linear probe).
///
/// ```
/// use dtl_core::{BackboneSpec, PipelineConfig, StageSpec};
/// let st = |blocks, width| StageSpec { blocks, width, heads: 1, grid: (2, 2), prefix_tokens: 0 };
/// let spec = BackboneSpec {
///     stages: vec![st((0, 2), 8), st((2, 4), 16)],
///     ..BackboneSpec::vit("two_stages", 8, 4, 16, 4, 1)
/// };
/// let cfg = PipelineConfig::from_str(
///     "[backbone]\nkind = \"two_stages\"\n[side]\ntaps = [0, 1, 2, 3]\ninjects = [2, 3]\n\
///      [data]\nkind = \"image-folder\"\nroot = \".\"\n",
///     "p.toml".as_ref(), &[]).unwrap();
/// let w = dtl_core::config::stage_tap_warning(&cfg, &spec).unwrap();
/// assert!(w.contains("block(s) 0, 1"), "{w}");
/// // a ViT: the taps after the last inject are reported
/// let vit = BackboneSpec::vit("vit_test", 8, 4, 16, 4, 1);
/// assert!(dtl_core::config::stage_tap_warning(&cfg, &vit).is_none());
/// let late = PipelineConfig::from_str(
///     "[backbone]\nkind = \"vit_test\"\n[side]\ntaps = [0, 1, 2, 3]\ninjects = [1]\n\
///      [data]\nkind = \"image-folder\"\nroot = \".\"\n",
///     "p.toml".as_ref(), &[]).unwrap();
/// let w = dtl_core::config::stage_tap_warning(&late, &vit).unwrap();
/// assert!(w.contains("block(s) 2, 3") && w.contains("last inject block 1"), "{w}");
/// ```
pub fn stage_tap_warning(cfg: &PipelineConfig, spec: &crate::BackboneSpec) -> Option<String> {
    if !cfg.side.taps_blocks() {
        return None;
    }
    let taps = cfg.side.tap_blocks(spec.depth);
    let injects = cfg.side.inject_blocks(spec.depth);
    let lost = unreached_taps(spec, &taps, &injects);
    if lost.is_empty() || injects.is_empty() {
        return None;
    }
    if !spec.is_hierarchical() {
        return Some(format!(
            "block(s) {} of `{}` are tapped after the last inject block {}: no gradient reaches \
             their maps and they never train; leave them out of side.taps",
            lost.iter()
                .map(|t| t.to_string())
                .collect::<Vec<_>>()
                .join(", "),
            spec.name,
            injects.iter().max().copied().unwrap_or(0)
        ));
    }
    let stages: Vec<String> = spec
        .stages
        .iter()
        .enumerate()
        .map(|(s, st)| format!("{s}: blocks {}-{}", st.blocks.0, st.blocks.1 - 1))
        .collect();
    Some(format!(
        "block(s) {} of `{}` are tapped with no inject block at or after them in their stage \
         (stages {}): the side state starts again from zero at every stage, so no gradient \
         reaches their maps and they never train; tap those stages' blocks only together \
         with a later inject in the same stage, or leave them out of side.taps",
        lost.iter()
            .map(|t| t.to_string())
            .collect::<Vec<_>>()
            .join(", "),
        spec.name,
        stages.join("; ")
    ))
}

/// Checks a parsed pipeline's meaning and returns every problem found (empty when valid).
pub fn validate(cfg: &PipelineConfig, cx: &ValidationContext<'_>) -> Vec<DtlError> {
    let mut errs = Vec::new();
    let file = cx.file;
    let mut err = |key: &str, msg: String| errs.push(DtlError::config(file, key, None, msg));
    let reg = cx.registry;

    // [run]
    if let Err(m) = (cx.device_check)(cfg.run.device) {
        err("run.device", m);
    }
    if cfg.run.precision == Precision::Bf16 && cfg.run.device == DeviceSpec::Cpu {
        err(
            "run.precision",
            "bf16 needs a CUDA device; use \"f32\" on the CPU".into(),
        );
    }
    if !["recompute", "store"].contains(&cfg.run.activations.as_str()) {
        err(
            "run.activations",
            format!(
                "`{}` is not an activation policy; use \"recompute\" or \"store\"",
                cfg.run.activations
            ),
        );
    }
    if cfg.run.log_every == 0 {
        err("run.log_every", "must be at least 1".into());
    }

    // [backbone]
    let depth = match reg.backbone(&cfg.backbone.kind) {
        Ok(b) => Some(b.spec().depth),
        Err(e) => {
            err("backbone.kind", e.to_string());
            None
        }
    };
    if let Some(w) = &cfg.backbone.weights {
        if let Some(why) = crate::paths::not_a_file(w) {
            err("backbone.weights", format!("file `{}` {why}; give the path of a timm .safetensors or Google .npz checkpoint (relative to the pipeline file), or remove the key for random weights", w.display()));
        }
    }
    if !(0.0..1.0).contains(&cfg.backbone.drop_path) {
        err(
            "backbone.drop_path",
            format!("must be in [0, 1), got {}", cfg.backbone.drop_path),
        );
    }

    // [side]
    match reg.side(&cfg.side.kind) {
        Err(e) => err("side.kind", e.to_string()),
        Ok(_) if cfg.side.taps_blocks() => {
            if cfg.side.rank == 0 {
                err("side.rank", "must be at least 1, got 0".into());
            }
            if !(cfg.side.beta.is_finite() && cfg.side.beta > 0.0) {
                err(
                    "side.beta",
                    format!("must be a positive number, got {}", cfg.side.beta),
                );
            }
            let k = cfg.side.kernel_size();
            if k > 7 {
                err(
                    "side.kernel",
                    format!("must be 0 (no conv) or 1 to 7, got {k}"),
                );
            }
            if let Some(depth) = depth {
                let taps = cfg.side.tap_blocks(depth);
                let injects = cfg.side.inject_blocks(depth);
                for (key, set) in [("side.taps", &taps), ("side.injects", &injects)] {
                    if let Some(bad) = set.iter().find(|&&i| i >= depth) {
                        err(
                            key,
                            format!(
                                "block {bad} is past the backbone's depth: `{}` has blocks 0-{}",
                                cfg.backbone.kind,
                                depth - 1
                            ),
                        );
                    }
                }
                if taps.is_empty() {
                    err(
                        "side.taps",
                        "no block is tapped; tap at least one block or use side.kind = \"linear\""
                            .into(),
                    );
                } else if let Some(&first) = injects.first() {
                    if first < taps[0] {
                        err("side.injects", format!("block {first} is injected before the first tapped block {}; injects must not come before the first tap", taps[0]));
                    }
                } else {
                    err("side.injects", "no inject block; add at least one (default: the second half of the blocks)".into());
                }
            }
        }
        Ok(_) => {}
    }
    if reg.sides.contains(&cfg.side.kind) && !reg.side_traits(&cfg.side.kind).reads_options {
        if let Some(k) = cfg.side.options.keys().next() {
            err(
                &format!("side.options.{k}"),
                format!(
                    "side network `{}` reads no options; remove `{k}` (side.options is for plugin side networks)",
                    cfg.side.kind
                ),
            );
        }
    }

    // [head]
    if let Err(e) = reg.head(&cfg.head.kind) {
        err("head.kind", e.to_string());
    }
    if cfg.head.pool == Pool::Cls {
        if let Ok(b) = reg.backbone(&cfg.backbone.kind) {
            if b.spec().prefix_tokens == 0 {
                err(
                    "head.pool",
                    format!(
                        "\"cls\" needs a class token and backbone `{}` has none; use \"mean\"",
                        cfg.backbone.kind
                    ),
                );
            }
        }
    }
    if let Some(c) = cfg.head.classes {
        if c < 2 {
            err("head.classes", format!("must be at least 2, got {c}"));
        }
    }

    // [data]
    if let Err(e) = reg.dataset(&cfg.data.kind) {
        err("data.kind", e.to_string());
    }
    if !cfg.data.root.exists() {
        err("data.root", format!("`{}` does not exist; point it at the dataset folder (relative to the pipeline file)", cfg.data.root.display()));
    }
    if cfg.data.batch_size == 0 {
        err("data.batch_size", "must be at least 1, got 0".into());
    }
    if cfg.data.eval_batch_size == Some(0) {
        err("data.eval_batch_size", "must be at least 1, got 0".into());
    }
    if cfg.data.prefetch == 0 {
        err("data.prefetch", "must be at least 1, got 0".into());
    }
    for (i, s) in cfg.data.std.iter().enumerate() {
        if *s <= 0.0 {
            err(
                "data.std",
                format!("channel {i} has std {s}; every std must be positive"),
            );
        }
    }

    // [augment]
    for (list, ops) in [
        ("train", &cfg.augment.train),
        ("test", &cfg.augment.test),
        ("batch", &cfg.augment.batch),
    ] {
        for (i, op) in ops.iter().enumerate() {
            let key = format!("augment.{list}[{i}]");
            match reg.augment(&op.op) {
                Err(e) => err(&format!("{key}.op"), e.to_string()),
                Ok(entry) => {
                    if let Err(e) = (entry.build)(op, &key) {
                        err(&key, e.to_string());
                    }
                }
            }
        }
    }

    // [optim]
    if cfg.optim.kind != "adamw" {
        err(
            "optim.kind",
            format!("`{}` is not an optimizer; use \"adamw\"", cfg.optim.kind),
        );
    }
    if !(cfg.optim.lr.is_finite() && cfg.optim.lr > 0.0) {
        err(
            "optim.lr",
            format!("must be a positive number, got {}", cfg.optim.lr),
        );
    }
    for (i, b) in cfg.optim.betas.iter().enumerate() {
        if !(0.0..1.0).contains(b) {
            err(
                "optim.betas",
                format!("beta{} must be in [0, 1), got {b}", i + 1),
            );
        }
    }
    if !positive(cfg.optim.eps) {
        err(
            "optim.eps",
            format!("must be positive, got {}", cfg.optim.eps),
        );
    }
    if !(positive(cfg.optim.weight_decay) || cfg.optim.weight_decay == 0.0) {
        err(
            "optim.weight_decay",
            format!("must be 0 or more, got {}", cfg.optim.weight_decay),
        );
    }
    if let Some(c) = cfg.optim.clip_grad {
        if !positive(c) {
            err(
                "optim.clip_grad",
                format!("must be positive, got {c}; remove the key for no clipping"),
            );
        }
    }
    if !(0.0..1.0).contains(&cfg.optim.label_smoothing) {
        err(
            "optim.label_smoothing",
            format!("must be in [0, 1), got {}", cfg.optim.label_smoothing),
        );
    }

    // [schedule]
    let s = &cfg.schedule;
    if s.epochs == 0 {
        err("schedule.epochs", "must be at least 1, got 0".into());
    }
    if s.t_initial == Some(0) {
        err("schedule.t_initial", "must be at least 1, got 0".into());
    }
    if s.min_lr < 0.0 || s.warmup_lr < 0.0 {
        err(
            "schedule.min_lr",
            "learning rates must not be negative".into(),
        );
    }

    // [eval]
    if cfg.eval.every == 0 {
        err("eval.every", "must be at least 1, got 0".into());
    }
    if cfg.eval.val.as_deref().is_some_and(|v| v.trim().is_empty()) {
        err(
            "eval.val",
            "is empty; name a validation split (e.g. \"val\") or leave the key out".into(),
        );
    }
    if let Some(ClassSubset::List(v)) = &cfg.eval.test_classes {
        if let Some(m) = subset_problem(v, cfg.head.classes) {
            err("eval.test_classes", m);
        }
    }
    let mut names: Vec<&str> = vec![cfg.data.test.as_str()];
    for (i, t) in cfg.eval.tests.iter().enumerate() {
        let key = |k: &str| format!("eval.tests[{i}].{k}");
        let name = t.name.trim();
        if name.is_empty() {
            err(
                &key("name"),
                "is empty; name the test set (e.g. \"imagenet-a\")".into(),
            );
        } else if !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.+".contains(c))
        {
            err(
                &key("name"),
                format!("`{name}` may hold only letters, digits and - _ . +"),
            );
        } else if names.contains(&name) {
            err(
                &key("name"),
                format!(
                    "`{name}` is used twice{}; give every test set its own name",
                    if name == cfg.data.test {
                        " (it is data.test's split name)"
                    } else {
                        ""
                    }
                ),
            );
        } else {
            names.push(name);
        }
        if let Some(k) = &t.kind {
            if let Err(e) = reg.dataset(k) {
                err(&key("kind"), e.to_string());
            }
        }
        if let Some(r) = &t.root {
            if !r.exists() {
                err(&key("root"), format!("`{}` does not exist; point it at the test set's folder (relative to the pipeline file) or leave the key out for data.root", r.display()));
            }
        }
        if t.split.as_deref().is_some_and(|s| s.trim().is_empty()) {
            err(
                &key("split"),
                "is empty; name a split or leave the key out for data.test".into(),
            );
        }
        if t.limit == Some(0) {
            err(&key("limit"), "must be at least 1, got 0".into());
        }
        if let Some(ClassSubset::List(v)) = &t.classes {
            if let Some(m) = subset_problem(v, cfg.head.classes) {
                err(&key("classes"), m);
            }
        }
    }

    // Sizes: the caps, then (where the class count is already known) the memory of a step.
    if let Ok(b) = reg.backbone(&cfg.backbone.kind) {
        let spec = b.spec();
        let capped = crate::limits::caps(cfg, &spec, file);
        if capped.is_empty() && errs.is_empty() {
            if let Some(c) = cfg.head.classes {
                if let Err(e) = crate::limits::check_memory(cfg, &spec, c, file) {
                    errs.push(e);
                }
            }
        }
        errs.extend(capped);
    }
    errs
}

/// What is wrong with an explicit class subset, if anything: empty, repeated labels, or a
/// label past `classes` (when known).
fn subset_problem(v: &[usize], classes: Option<usize>) -> Option<String> {
    if v.is_empty() {
        return Some("is an empty list; list the training labels to score over, or use \"all\" or \"present\"".into());
    }
    let mut seen = std::collections::BTreeSet::new();
    if let Some(d) = v.iter().find(|&&l| !seen.insert(l)) {
        return Some(format!(
            "label {d} is listed twice; list each training label once"
        ));
    }
    if let Some(c) = classes {
        if let Some(l) = v.iter().find(|&&l| l >= c) {
            return Some(format!(
                "label {l} is out of range: head.classes = {c} allows labels 0-{}",
                c - 1
            ));
        }
    }
    None
}
