//! The pipeline schema: one TOML file describes one run.
//!
//! This module is the schema: the sections of a pipeline file as serde structs
//! ([`PipelineConfig`] and one struct per section) and the values they hold. Beside it:
//! block ranges ([`Blocks`]), `key=value` overrides ([`parse_override`]), loading
//! ([`PipelineConfig::load`]: parsing, overrides, paths resolved against the file with
//! [`resolve_path`]) and the checks of meaning against the registry ([`validate`]).
//!
//! Parsing is strict (`deny_unknown_fields`), then [`validate`] checks meaning against the
//! registry. Every error names the file, the key (and line where known) and what is valid.
//! `docs/pipeline.md` documents every key.

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

mod blocks;
mod load;
mod overrides;

pub use self::blocks::Blocks;
pub use self::load::resolve_path;
pub use self::overrides::parse_override;
pub use crate::choice::{Pool, Precision, ScheduleKind, ScheduleUnit, WeightsFormat};
pub use crate::validate::{stage_tap_warning, unreached_taps, validate, ValidationContext};
use crate::Result;

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
    /// `auto` (bf16 on a CUDA device, f32 on the CPU), `f32` or `bf16` (bf16 needs a CUDA
    /// device).
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
            precision: Precision::Auto,
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
            .unwrap_or_else(|| crate::side_traits::side_traits(&self.kind).default_kernel)
    }

    /// Whether the side network taps blocks (false for the linear probe); see
    /// [`crate::registry::SideTraits::taps`].
    pub fn taps_blocks(&self) -> bool {
        crate::side_traits::side_traits(&self.kind).taps
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

impl PipelineConfig {
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
