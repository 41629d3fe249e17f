//! `dtl summarize`: many finished runs turned into the paper's tables and a picture.
//!
//! Each run directory holds the resolved `pipeline.toml` and `report.json` that `dtl run`
//! wrote. The protocol of a run is read from its pipeline (or, without one, from the report's
//! `data` object): `data.kind = "vtab-1k"` is a
//! VTAB-1k task (`data.task`), `data.kind = "few-shot"` a fine-grained few-shot run
//! (`data.task`, `data.options.shots`, `data.options.seed`); anything else is a plain run.
//! The method is the side network (`DTL`, `DTL+ (k=3)`, `linear`, or the kind's name).
//!
//! - VTAB-1k: one row per task in the paper's order, one column per method, the Natural,
//!   Specialized and Structured means, the mean of the three group means (the paper's
//!   convention) and the plain mean over the tasks run; a task not run is `-`, never 0. A
//!   reference row (`--reference FILE.json`) adds its value and the difference per task.
//! - few-shot: per dataset, top-1 against shots, mean and standard deviation over the seeds,
//!   one curve per method.
//! - domain generalisation (`data.kind = "domain-generalization"`): one row per method, one
//!   column per test set (the source ImageNet, then -V2, -Sketch, -A, -R and any other the
//!   runs name), mean and standard deviation over the runs that report the set.
//! - other runs: one row per run (backbone, side, trainable parameters, top-1, top-5, img/s,
//!   peak memory, wall time), sortable by any column.
//!
//! Accuracies are the `top1` of `report.json` (the test split after the last epoch).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use dtl_core::{DtlError, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use serde_json::{json, Value};

/// The VTAB-1k groups and their tasks, in the paper's order.
pub const VTAB_GROUPS: [(&str, &[&str]); 3] = [
    (
        "Natural",
        &[
            "cifar_100",
            "caltech101",
            "dtd",
            "flowers102",
            "pets",
            "svhn",
            "sun397",
        ],
    ),
    (
        "Specialized",
        &[
            "patch_camelyon",
            "eurosat",
            "resisc45",
            "diabetic_retinopathy",
        ],
    ),
    (
        "Structured",
        &[
            "clevr_count",
            "clevr_dist",
            "dmlab",
            "kitti",
            "dsprites_loc",
            "dsprites_ori",
            "smallnorb_azi",
            "smallnorb_ele",
        ],
    ),
];

/// The protocol a run belongs to.
#[derive(Debug, Clone, PartialEq)]
pub enum Protocol {
    /// A VTAB-1k task.
    Vtab {
        /// The task's folder name (`cifar_100`, ...).
        task: String,
    },
    /// A fine-grained few-shot run.
    FewShot {
        /// The dataset (`fgvc-aircraft`, ...).
        dataset: String,
        /// Training images per class.
        shots: u64,
        /// The split seed.
        seed: u64,
    },
    /// A domain-generalisation run (`data.kind = "domain-generalization"`): trained on the
    /// source, tested on the source and the targets it names.
    DomainGeneralization {
        /// The split seed of the training list (`data.options.seed`).
        seed: u64,
    },
    /// Anything else.
    Other,
}

/// The test sets of the domain-generalisation table, in the paper's order: the name a run
/// reports, the column title.
pub const DG_COLUMNS: [(&str, &str); 5] = [
    ("imagenet", "ImageNet"),
    ("imagenetv2", "-V2"),
    ("imagenet-sketch", "-Sketch"),
    ("imagenet-adversarial", "-A"),
    ("imagenet-rendition", "-R"),
];

/// The name a domain-generalisation test set is tabled under: the dataset's folder name for
/// the known sets and their aliases (`imagenet-a` is `imagenet-adversarial`), `source` for
/// the source's own test split (`test`, `val`), anything else as it is.
///
/// ```
/// use dtl_runner::summary::dg_set_name;
/// assert_eq!(dg_set_name("imagenet-r", "imagenet"), "imagenet-rendition");
/// assert_eq!(dg_set_name("test", "imagenet"), "imagenet");
/// assert_eq!(dg_set_name("mine", "imagenet"), "mine");
/// ```
pub fn dg_set_name(name: &str, source: &str) -> String {
    let source = dtl_data::dg::dg_dataset(source).map_or(source.to_string(), |d| d.0.to_string());
    if name == "test" || name == "val" {
        return source;
    }
    dtl_data::dg::dg_dataset(name).map_or(name.to_string(), |d| d.0.to_string())
}

/// What `dtl summarize` reads of one finished run.
#[derive(Debug, Clone)]
pub struct RunRecord {
    /// The run directory.
    pub dir: PathBuf,
    /// `run.name`.
    pub name: String,
    /// `backbone.kind`.
    pub backbone: String,
    /// `side.kind`.
    pub side: String,
    /// The method label: `DTL`, `DTL+ (k=3)`, `linear`, ...
    pub method: String,
    /// The protocol, from the resolved pipeline.
    pub protocol: Protocol,
    /// Test top-1 in [0, 1].
    pub top1: f64,
    /// Test top-5 in [0, 1].
    pub top5: Option<f64>,
    /// Trainable parameters.
    pub trainable_params: Option<u64>,
    /// Training images per second.
    pub img_per_s: Option<f64>,
    /// Peak memory in MiB: the GPU's when the run had one, else the process's resident memory.
    pub peak_mib: Option<f64>,
    /// Wall time in seconds.
    pub wall_s: Option<f64>,
    /// Top-1 in [0, 1] per test set by name: the test split under its name
    /// (`data.test`; for domain-generalisation runs see [`dg_set_name`]) and every extra test
    /// set of the report's `tests`.
    pub tests: BTreeMap<String, f64>,
}

fn toml_str<'a>(t: &'a toml::Table, section: &str, key: &str) -> Option<&'a str> {
    t.get(section)?.get(key)?.as_str()
}

/// The method label of a side network: `DTL`, `DTL+ (k=K)`, `linear` or the kind itself.
///
/// ```
/// assert_eq!(dtl_runner::summary::method_label("dtl+", Some(3)), "DTL+ (k=3)");
/// assert_eq!(dtl_runner::summary::method_label("dtl", Some(0)), "DTL");
/// ```
pub fn method_label(side: &str, kernel: Option<i64>) -> String {
    let kernel = kernel.and_then(|k| usize::try_from(k).ok());
    dtl_core::registry::side_traits(side).method_label(side, kernel)
}

/// Reads one finished run directory. A run without `report.json` is unfinished; a report
/// that is not JSON or lacks a numeric `top1` is corrupt; both are errors naming the run.
///
/// ```
/// let tmp = tempfile::tempdir().unwrap();
/// let dir = tmp.path().join("r");
/// std::fs::create_dir(&dir).unwrap();
/// std::fs::write(dir.join("pipeline.toml"),
///     "[run]\nname = \"r\"\n[side]\nkind = \"dtl\"\n[data]\nkind = \"vtab-1k\"\ntask = \"dtd\"\n").unwrap();
/// assert!(dtl_runner::summary::load_run(&dir).unwrap_err().to_string().contains("unfinished"));
/// std::fs::write(dir.join("report.json"), r#"{"top1": 0.5, "side": "dtl"}"#).unwrap();
/// let r = dtl_runner::summary::load_run(&dir).unwrap();
/// assert_eq!(r.protocol, dtl_runner::summary::Protocol::Vtab { task: "dtd".into() });
/// std::fs::write(dir.join("report.json"), r#"{"top1": 0.5, "si"#).unwrap();
/// assert!(dtl_runner::summary::load_run(&dir).unwrap_err().to_string().contains("corrupt"));
/// ```
pub fn load_run(dir: &Path) -> Result<RunRecord> {
    let report_path = dir.join("report.json");
    let text = match std::fs::read_to_string(&report_path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(DtlError::file(
                dir,
                "run is unfinished (no report.json yet): finish it with `dtl run <pipeline> --resume <run dir>` or leave it out",
            ))
        }
        Err(e) => return Err(DtlError::io(&report_path, e)),
    };
    let report: Value = serde_json::from_str(&text).map_err(|e| {
        DtlError::file(
            &report_path,
            format!("report is corrupt ({e}); rerun the run or leave it out"),
        )
    })?;
    let report = crate::report::TrainReport::from_json(&report);
    let top1 = report.top1.ok_or_else(|| {
        DtlError::file(
            &report_path,
            "report is corrupt: no numeric `top1`; rerun the run or leave it out",
        )
    })?;
    let data = report.data.clone().unwrap_or_default();
    let pipeline_path = dir.join("pipeline.toml");
    let pipeline: toml::Table = match std::fs::read_to_string(&pipeline_path) {
        Ok(t) => t.parse().map_err(|e| {
            DtlError::file(
                &pipeline_path,
                format!("resolved pipeline is corrupt ({e}); rerun the run or leave it out"),
            )
        })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => toml::Table::new(),
        Err(e) => return Err(DtlError::io(&pipeline_path, e)),
    };
    let side = toml_str(&pipeline, "side", "kind")
        .or(report.side.as_deref())
        .unwrap_or("-")
        .to_string();
    let kernel = pipeline
        .get("side")
        .and_then(|s| s.get("kernel"))
        .and_then(|k| k.as_integer());
    // The resolved pipeline first, then what the report says of its data.
    let data_kind = toml_str(&pipeline, "data", "kind")
        .or(data.kind.as_deref())
        .unwrap_or("");
    let task = toml_str(&pipeline, "data", "task")
        .or(data.task.as_deref())
        .map(str::to_string);
    let option = |k: &str, default: u64| {
        pipeline
            .get("data")
            .and_then(|d| d.get("options"))
            .and_then(|o| o.get(k))
            .and_then(|v| v.as_integer())
            .or(data.options.get(k).and_then(Value::as_i64))
            .map_or(default, |v| v.max(0) as u64)
    };
    let protocol = match (data_kind, task) {
        ("vtab-1k", Some(task)) => Protocol::Vtab {
            task: vtab_name(&task),
        },
        ("few-shot", Some(dataset)) => Protocol::FewShot {
            dataset: few_shot_name(&dataset),
            shots: option("shots", 16),
            seed: option("seed", 0),
        },
        ("domain-generalization", _) => Protocol::DomainGeneralization {
            seed: option("seed", 0),
        },
        _ => Protocol::Other,
    };
    let test_split = toml_str(&pipeline, "data", "test")
        .or(data.test.as_deref())
        .unwrap_or("test");
    let primary = match &protocol {
        Protocol::DomainGeneralization { .. } => dg_set_name(
            test_split,
            toml_str(&pipeline, "data", "task")
                .or(data.task.as_deref())
                .unwrap_or("imagenet"),
        ),
        _ => test_split.to_string(),
    };
    let mut tests = BTreeMap::new();
    tests.insert(primary, top1);
    if let Some(t) = &report.tests {
        for (name, v) in t {
            let t1 = v.top1.ok_or_else(|| {
                DtlError::file(
                    &report_path,
                    format!("report is corrupt: test set `{name}` has no numeric `top1`; rerun the run or leave it out"),
                )
            })?;
            let key = match &protocol {
                Protocol::DomainGeneralization { .. } => dg_set_name(name, "imagenet"),
                _ => name.clone(),
            };
            tests.insert(key, t1);
        }
    }
    let name = toml_str(&pipeline, "run", "name")
        .or(report.name.as_deref())
        .map(str::to_string)
        .unwrap_or_else(|| dir.display().to_string());
    Ok(RunRecord {
        dir: dir.to_path_buf(),
        name,
        backbone: toml_str(&pipeline, "backbone", "kind")
            .or(report.backbone.as_deref())
            .unwrap_or("-")
            .to_string(),
        method: method_label(&side, kernel),
        side,
        protocol,
        top1,
        top5: report.top5,
        trainable_params: report.trainable_params.map(|p| p as u64),
        img_per_s: report.train_img_per_s,
        peak_mib: report.gpu_mib.or(report.peak_rss_mib),
        wall_s: report.wall_s,
        tests,
    })
}

/// The paper's name of a VTAB-1k task given by its folder name or an alias (`cifar`,
/// `oxford_iiit_pet` and `pets` are `cifar_100` and `pets`); unknown names stay as they are.
///
/// ```
/// assert_eq!(dtl_runner::summary::vtab_name("cifar"), "cifar_100");
/// assert_eq!(dtl_runner::summary::vtab_name("oxford_iiit_pet"), "pets");
/// assert_eq!(dtl_runner::summary::vtab_name("mine"), "mine");
/// ```
pub fn vtab_name(task: &str) -> String {
    let Some((official, _)) = dtl_data::datasets::vtab_task(task) else {
        return task.to_string();
    };
    VTAB_GROUPS
        .iter()
        .flat_map(|g| g.1.iter())
        .find(|t| dtl_data::datasets::vtab_task(t).is_some_and(|(o, _)| o == official))
        .map_or(task.to_string(), |t| t.to_string())
}

/// The data crate's name of a few-shot dataset given by its folder name or an alias
/// (`food101` is `food-101`); unknown names stay as they are.
///
/// ```
/// assert_eq!(dtl_runner::summary::few_shot_name("food101"), "food-101");
/// assert_eq!(dtl_runner::summary::few_shot_name("fgvc-aircraft"), "fgvc-aircraft");
/// ```
pub fn few_shot_name(dataset: &str) -> String {
    let n = dataset.to_ascii_lowercase();
    dtl_data::datasets::FEW_SHOT_DATASETS
        .iter()
        .find(|(o, _, a)| *o == n || a.contains(&n.as_str()))
        .map_or(dataset.to_string(), |(o, _, _)| o.to_string())
}

fn is_run_dir(p: &Path) -> bool {
    p.is_dir() && (p.join("report.json").exists() || p.join("pipeline.toml").exists())
}

/// The run directories named by `args`: run directories, glob patterns (`runs/vtab-*`), or
/// folders whose sub-folders are run directories (`runs/`). Sorted, without duplicates.
///
/// ```
/// let tmp = tempfile::tempdir().unwrap();
/// for d in ["a", "b"] {
///     std::fs::create_dir(tmp.path().join(d)).unwrap();
///     std::fs::write(tmp.path().join(d).join("pipeline.toml"), "").unwrap();
/// }
/// let all = dtl_runner::summary::expand_run_dirs(&[tmp.path().display().to_string()]).unwrap();
/// assert_eq!(all.len(), 2);
/// let pat = format!("{}/a*", tmp.path().display());
/// assert_eq!(dtl_runner::summary::expand_run_dirs(&[pat]).unwrap().len(), 1);
/// // A pattern skips what is not a run; a pattern without any run is an error.
/// std::fs::create_dir(tmp.path().join("summary")).unwrap();
/// let all = format!("{}/*", tmp.path().display());
/// assert_eq!(dtl_runner::summary::expand_run_dirs(&[all]).unwrap().len(), 2);
/// let none = format!("{}/s*", tmp.path().display());
/// assert!(dtl_runner::summary::expand_run_dirs(&[none]).is_err());
/// ```
pub fn expand_run_dirs(args: &[String]) -> Result<Vec<PathBuf>> {
    let mut out = BTreeSet::new();
    for a in args {
        let mut matched: Vec<PathBuf> = Vec::new();
        if a.contains(['*', '?', '[']) {
            let paths = glob::glob(a)
                .map_err(|e| DtlError::argument(format!("`{a}` is not a valid pattern: {e}")))?;
            matched.extend(paths.filter_map(|p| p.ok()));
            if matched.is_empty() {
                return Err(DtlError::argument(format!(
                    "`{a}` matches no run directory"
                )));
            }
        } else {
            matched.push(PathBuf::from(a));
        }
        let pattern = a.contains(['*', '?', '[']);
        let mut found = false;
        for p in matched {
            if is_run_dir(&p) {
                found = true;
                out.insert(p);
            } else if pattern {
                // What a pattern matches besides run directories (a summary folder, a file) is
                // not a run: left out.
            } else if p.is_dir() {
                let mut children: Vec<PathBuf> = std::fs::read_dir(&p)
                    .map_err(|e| DtlError::io(&p, e))?
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|c| is_run_dir(c))
                    .collect();
                if children.is_empty() {
                    return Err(DtlError::file(
                        &p,
                        "not a run directory (no report.json or pipeline.toml) and holds none",
                    ));
                }
                children.sort();
                out.extend(children);
            } else if p.exists() {
                return Err(DtlError::file(
                    &p,
                    "not a run directory: give folders written by `dtl run`",
                ));
            } else {
                return Err(DtlError::file(
                    &p,
                    "no such run directory: give folders written by `dtl run`",
                ));
            }
        }
        if pattern && !found {
            return Err(DtlError::argument(format!(
                "`{a}` matches no run directory (a folder with report.json or pipeline.toml)"
            )));
        }
    }
    Ok(out.into_iter().collect())
}

/// The columns `--sort` accepts for the table of plain runs.
pub const SORT_KEYS: [&str; 9] = [
    "name",
    "backbone",
    "side",
    "params",
    "top1",
    "top5",
    "img_per_s",
    "memory",
    "wall",
];

fn mean(v: &[f64]) -> Option<f64> {
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

/// Sample standard deviation (n - 1); 0 for a single value.
fn std_dev(v: &[f64]) -> f64 {
    if v.len() < 2 {
        return 0.0;
    }
    let m = v.iter().sum::<f64>() / v.len() as f64;
    (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (v.len() - 1) as f64).sqrt()
}

/// The VTAB-1k table of one method: top-1 in percent per task (mean over the runs of the
/// task), the group means over the tasks run, their mean, and the plain mean.
#[derive(Debug, Clone, serde::Serialize)]
pub struct VtabColumn {
    /// The method label.
    pub method: String,
    /// Task -> top-1 in percent; absent tasks were not run.
    pub tasks: BTreeMap<String, f64>,
    /// Natural, Specialized, Structured means in percent (`None`: no task of the group run).
    pub groups: Vec<(String, Option<f64>)>,
    /// The mean of the three group means (the paper's convention); `None` unless every group has a task.
    pub mean_of_groups: Option<f64>,
    /// The plain mean over the tasks run.
    pub mean_of_tasks: Option<f64>,
    /// How many of the 19 tasks were run.
    pub tasks_run: usize,
}

impl VtabColumn {
    /// Computes the means of `tasks` (top-1 in percent).
    ///
    /// ```
    /// use std::collections::BTreeMap;
    /// let tasks: BTreeMap<String, f64> =
    ///     [("cifar_100".to_string(), 60.0), ("dtd".to_string(), 70.0), ("eurosat".to_string(), 90.0),
    ///      ("kitti".to_string(), 40.0)].into();
    /// let c = dtl_runner::summary::VtabColumn::new("DTL", tasks);
    /// assert_eq!(c.groups[0].1, Some(65.0));
    /// assert_eq!(c.mean_of_groups, Some((65.0 + 90.0 + 40.0) / 3.0));
    /// assert_eq!(c.mean_of_tasks, Some(65.0));
    /// ```
    pub fn new(method: &str, tasks: BTreeMap<String, f64>) -> Self {
        let groups: Vec<(String, Option<f64>)> = VTAB_GROUPS
            .iter()
            .map(|(g, ts)| {
                let v: Vec<f64> = ts.iter().filter_map(|t| tasks.get(*t).copied()).collect();
                (g.to_string(), mean(&v))
            })
            .collect();
        let gm: Vec<f64> = groups.iter().filter_map(|g| g.1).collect();
        let mean_of_groups = (gm.len() == groups.len()).then(|| mean(&gm)).flatten();
        let all: Vec<f64> = tasks.values().copied().collect();
        VtabColumn {
            method: method.to_string(),
            tasks_run: tasks.len(),
            mean_of_tasks: mean(&all),
            tasks,
            groups,
            mean_of_groups,
        }
    }
}

/// A reference row for the VTAB-1k table, read from JSON:
/// `{"name": "...", "tasks": {"cifar_100": 69.6, ...}}` (top-1 in percent).
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
pub struct Reference {
    /// Where the figures come from, shown as the column title.
    pub name: String,
    /// Task -> top-1 in percent.
    pub tasks: BTreeMap<String, f64>,
}

impl Reference {
    /// Reads a reference file; task names may be folder names or aliases (see [`vtab_name`]),
    /// and an unknown one is an error naming it.
    ///
    /// ```
    /// let tmp = tempfile::tempdir().unwrap();
    /// let p = tmp.path().join("ref.json");
    /// std::fs::write(&p, r#"{"name": "paper", "tasks": {"dtd": 71.0}}"#).unwrap();
    /// assert_eq!(dtl_runner::summary::Reference::load(&p).unwrap().tasks["dtd"], 71.0);
    /// std::fs::write(&p, r#"{"name": "paper", "tasks": {"cifar": 71.0}}"#).unwrap();
    /// assert_eq!(dtl_runner::summary::Reference::load(&p).unwrap().tasks["cifar_100"], 71.0);
    /// std::fs::write(&p, r#"{"name": "paper", "tasks": {"imagenet": 71.0}}"#).unwrap();
    /// assert!(dtl_runner::summary::Reference::load(&p).is_err());
    /// ```
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| DtlError::io(path, e))?;
        let mut r: Reference = serde_json::from_str(&text).map_err(|e| {
            DtlError::file(
                path,
                format!(
                    "{e}; expected {{\"name\": \"...\", \"tasks\": {{\"cifar_100\": 69.6, ...}}}}"
                ),
            )
        })?;
        // Folder names and aliases (`cifar`, `oxford_iiit_pet`) mean the paper's tasks.
        r.tasks = r
            .tasks
            .into_iter()
            .map(|(k, v)| (vtab_name(&k), v))
            .collect();
        let known: Vec<&str> = VTAB_GROUPS
            .iter()
            .flat_map(|g| g.1.iter().copied())
            .collect();
        if let Some(bad) = r.tasks.keys().find(|t| !known.contains(&t.as_str())) {
            return Err(DtlError::file(
                path,
                format!(
                    "tasks.{bad}: not a VTAB-1k task; the tasks are {}",
                    known.join(", ")
                ),
            ));
        }
        Ok(r)
    }
}

/// One method's few-shot curve on one dataset: (shots, mean top-1 %, std %, seeds).
pub type Curve = Vec<(u64, f64, f64, usize)>;

/// Everything `dtl summarize` computed.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    /// Every run read.
    pub runs: Vec<RunRecord>,
    /// VTAB-1k columns, one per method.
    pub vtab: Vec<VtabColumn>,
    /// A reference row for the VTAB-1k table.
    pub reference: Option<Reference>,
    /// Few-shot: dataset -> method -> curve.
    pub few_shot: BTreeMap<String, BTreeMap<String, Curve>>,
    /// Indices into `runs` of the plain runs, in table order.
    pub others: Vec<usize>,
    /// Domain generalisation: method -> test set -> top-1 % of each run that reports it.
    pub dg: BTreeMap<String, BTreeMap<String, Vec<f64>>>,
}

/// (mean, sample standard deviation, runs) of a list of accuracies.
fn mean_std(v: &[f64]) -> Option<(f64, f64, usize)> {
    mean(v).map(|m| (m, std_dev(v), v.len()))
}

impl Summary {
    /// The domain-generalisation test sets that some run reports, in table order: the
    /// paper's five first, then any other by name.
    pub fn dg_sets(&self) -> Vec<String> {
        let present: BTreeSet<&String> = self.dg.values().flat_map(|m| m.keys()).collect();
        let mut v: Vec<String> = DG_COLUMNS
            .iter()
            .map(|c| c.0.to_string())
            .filter(|c| present.contains(c))
            .collect();
        v.extend(
            present
                .into_iter()
                .filter(|p| !DG_COLUMNS.iter().any(|c| c.0 == p.as_str()))
                .cloned(),
        );
        v
    }

    /// Mean, standard deviation and number of runs of `method` on the test set `set`.
    ///
    /// ```
    /// let mut s = dtl_runner::summary::Summary::default();
    /// s.dg.entry("DTL".into()).or_default().insert("imagenet".into(), vec![70.0, 72.0]);
    /// let (m, sd, n) = s.dg_cell("DTL", "imagenet").unwrap();
    /// assert_eq!((m, n), (71.0, 2));
    /// assert!((sd - 2f64.sqrt()).abs() < 1e-12);
    /// assert!(s.dg_cell("DTL", "imagenetv2").is_none());
    /// ```
    pub fn dg_cell(&self, method: &str, set: &str) -> Option<(f64, f64, usize)> {
        mean_std(self.dg.get(method)?.get(set)?)
    }

    /// The title of a domain-generalisation column.
    fn dg_title(set: &str) -> String {
        DG_COLUMNS
            .iter()
            .find(|c| c.0 == set)
            .map_or(set.to_string(), |c| c.1.to_string())
    }
}

/// Groups the runs by protocol and computes every table. `sort` orders the plain runs by one
/// of [`SORT_KEYS`] (numbers descending, names ascending).
///
/// ```
/// let s = dtl_runner::summary::summarize(Vec::new(), None, Some("top1")).unwrap();
/// assert!(s.vtab.is_empty() && s.others.is_empty());
/// assert!(dtl_runner::summary::summarize(Vec::new(), None, Some("colour")).is_err());
/// ```
pub fn summarize(
    runs: Vec<RunRecord>,
    reference: Option<Reference>,
    sort: Option<&str>,
) -> Result<Summary> {
    if let Some(k) = sort {
        if !SORT_KEYS.contains(&k) {
            return Err(DtlError::argument(format!(
                "--sort {k}: not a column; the columns are {}",
                SORT_KEYS.join(", ")
            )));
        }
    }
    let mut vtab: BTreeMap<String, BTreeMap<String, Vec<f64>>> = BTreeMap::new();
    let mut fs: BTreeMap<String, BTreeMap<String, BTreeMap<u64, Vec<f64>>>> = BTreeMap::new();
    let mut others = Vec::new();
    let mut dg: BTreeMap<String, BTreeMap<String, Vec<f64>>> = BTreeMap::new();
    for (i, r) in runs.iter().enumerate() {
        match &r.protocol {
            Protocol::DomainGeneralization { .. } => {
                let m = dg.entry(r.method.clone()).or_default();
                for (set, t1) in &r.tests {
                    m.entry(set.clone()).or_default().push(100.0 * t1);
                }
            }
            Protocol::Vtab { task } => vtab
                .entry(r.method.clone())
                .or_default()
                .entry(task.clone())
                .or_default()
                .push(100.0 * r.top1),
            Protocol::FewShot { dataset, shots, .. } => fs
                .entry(dataset.clone())
                .or_default()
                .entry(r.method.clone())
                .or_default()
                .entry(*shots)
                .or_default()
                .push(100.0 * r.top1),
            Protocol::Other => others.push(i),
        }
    }
    let vtab = vtab
        .into_iter()
        .map(|(m, tasks)| {
            let t = tasks
                .into_iter()
                .filter_map(|(k, v)| mean(&v).map(|m| (k, m)))
                .collect();
            VtabColumn::new(&m, t)
        })
        .collect();
    let few_shot = fs
        .into_iter()
        .map(|(d, methods)| {
            let m = methods
                .into_iter()
                .map(|(m, shots)| {
                    let c: Curve = shots
                        .into_iter()
                        .map(|(s, v)| (s, mean(&v).unwrap_or(0.0), std_dev(&v), v.len()))
                        .collect();
                    (m, c)
                })
                .collect();
            (d, m)
        })
        .collect();
    if let Some(k) = sort {
        let num = |r: &RunRecord| -> Option<f64> {
            match k {
                "params" => r.trainable_params.map(|v| v as f64),
                "top1" => Some(r.top1),
                "top5" => r.top5,
                "img_per_s" => r.img_per_s,
                "memory" => r.peak_mib,
                "wall" => r.wall_s,
                _ => None,
            }
        };
        others.sort_by(|&a, &b| {
            let (ra, rb) = (&runs[a], &runs[b]);
            match k {
                "name" => ra.name.cmp(&rb.name),
                "backbone" => ra.backbone.cmp(&rb.backbone),
                "side" => ra.side.cmp(&rb.side),
                _ => {
                    // Descending; runs without the value last.
                    let (x, y) = (num(ra), num(rb));
                    match (x, y) {
                        (Some(x), Some(y)) => y.total_cmp(&x),
                        (Some(_), None) => std::cmp::Ordering::Less,
                        (None, Some(_)) => std::cmp::Ordering::Greater,
                        (None, None) => std::cmp::Ordering::Equal,
                    }
                }
            }
        });
    }
    Ok(Summary {
        runs,
        vtab,
        reference,
        few_shot,
        others,
        dg,
    })
}

fn pct(v: Option<f64>) -> String {
    v.map_or("-".to_string(), |x| format!("{x:.2}"))
}

fn opt(v: Option<f64>, d: usize) -> String {
    v.map_or("-".to_string(), |x| format!("{x:.d$}"))
}

impl Summary {
    /// The summary as markdown.
    pub fn markdown(&self) -> String {
        let mut md = String::from("# Summary\n\n");
        md.push_str(&format!("{} runs.\n", self.runs.len()));
        if !self.vtab.is_empty() {
            md.push_str("\n## VTAB-1k (top-1 %)\n\n| group | task |");
            for c in &self.vtab {
                md.push_str(&format!(" {} |", c.method));
            }
            if let Some(r) = &self.reference {
                md.push_str(&format!(" {} |", r.name));
                for c in &self.vtab {
                    md.push_str(&format!(" {} - ref |", c.method));
                }
            }
            let cols = 2
                + self.vtab.len() * if self.reference.is_some() { 2 } else { 1 }
                + self.reference.is_some() as usize;
            md.push_str(&format!("\n|{}\n", "---|".repeat(cols)));
            let reference = |t: &str| {
                self.reference
                    .as_ref()
                    .and_then(|r| r.tasks.get(t).copied())
            };
            for (g, tasks) in VTAB_GROUPS {
                for t in tasks {
                    md.push_str(&format!("| {g} | {t} |"));
                    for c in &self.vtab {
                        md.push_str(&format!(" {} |", pct(c.tasks.get(*t).copied())));
                    }
                    if self.reference.is_some() {
                        md.push_str(&format!(" {} |", pct(reference(t))));
                        for c in &self.vtab {
                            let d = c.tasks.get(*t).zip(reference(t)).map(|(a, b)| a - b);
                            md.push_str(&format!(
                                " {} |",
                                d.map_or("-".into(), |d| format!("{d:+.2}"))
                            ));
                        }
                    }
                    md.push('\n');
                }
            }
            let ref_col = |f: &dyn Fn(&VtabColumn) -> Option<f64>| -> String {
                match &self.reference {
                    None => String::new(),
                    Some(r) => {
                        let rc = VtabColumn::new(&r.name, r.tasks.clone());
                        let rv = f(&rc);
                        let mut s = format!(" {} |", pct(rv));
                        for c in &self.vtab {
                            let d = f(c).zip(rv).map(|(a, b)| a - b);
                            s.push_str(&format!(
                                " {} |",
                                d.map_or("-".into(), |d| format!("{d:+.2}"))
                            ));
                        }
                        s
                    }
                }
            };
            for (gi, (g, _)) in VTAB_GROUPS.iter().enumerate() {
                md.push_str(&format!("| **{g} mean** | |"));
                for c in &self.vtab {
                    md.push_str(&format!(" {} |", pct(c.groups[gi].1)));
                }
                md.push_str(&ref_col(&|c: &VtabColumn| c.groups[gi].1));
                md.push('\n');
            }
            md.push_str("| **mean of the group means** | |");
            for c in &self.vtab {
                md.push_str(&format!(" {} |", pct(c.mean_of_groups)));
            }
            md.push_str(&ref_col(&|c: &VtabColumn| c.mean_of_groups));
            md.push_str("\n| **mean of the tasks** | |");
            for c in &self.vtab {
                md.push_str(&format!(" {} |", pct(c.mean_of_tasks)));
            }
            md.push_str(&ref_col(&|c: &VtabColumn| c.mean_of_tasks));
            md.push_str("\n| tasks run | |");
            for c in &self.vtab {
                md.push_str(&format!(" {} of 19 |", c.tasks_run));
            }
            md.push_str("\n\nA task not run is `-`. The paper's mean is the mean of the three group means; \
a group mean is over the tasks of the group that were run, and the mean of the group means needs every group.\n");
        }
        if !self.few_shot.is_empty() {
            md.push_str("\n## Few-shot (top-1 %, mean ± std over seeds)\n");
            for (d, methods) in &self.few_shot {
                let shots: BTreeSet<u64> = methods.values().flatten().map(|p| p.0).collect();
                md.push_str(&format!("\n### {d}\n\n| method |"));
                for s in &shots {
                    md.push_str(&format!(" {s}-shot |"));
                }
                md.push_str(&format!("\n|{}\n", "---|".repeat(shots.len() + 1)));
                for (m, curve) in methods {
                    md.push_str(&format!("| {m} |"));
                    for s in &shots {
                        match curve.iter().find(|p| p.0 == *s) {
                            Some((_, mu, sd, n)) => md.push_str(&format!(
                                " {mu:.2} ± {sd:.2} ({n} seed{}) |",
                                if *n == 1 { "" } else { "s" }
                            )),
                            None => md.push_str(" - |"),
                        }
                    }
                    md.push('\n');
                }
            }
        }
        if !self.dg.is_empty() {
            let sets = self.dg_sets();
            md.push_str("\n## Domain generalisation (top-1 %, mean ± std over runs)\n\n| method |");
            for set in &sets {
                md.push_str(&format!(" {} |", Summary::dg_title(set)));
            }
            md.push_str(&format!("\n|{}\n", "---|".repeat(sets.len() + 1)));
            for m in self.dg.keys() {
                md.push_str(&format!("| {m} |"));
                for set in &sets {
                    match self.dg_cell(m, set) {
                        Some((mu, sd, n)) => md.push_str(&format!(
                            " {mu:.2} ± {sd:.2} ({n} run{}) |",
                            if n == 1 { "" } else { "s" }
                        )),
                        None => md.push_str(" - |"),
                    }
                }
                md.push('\n');
            }
            md.push_str("\nImageNet is the source (the runs train on its few-shot lists); the others are targets. \
A set no run reports is `-`. A set scored over a class subset (ImageNet-A and -R: 200 classes) is so because its runs say so \
(`eval.test_classes`, or `classes` in `[[eval.tests]]`).\n");
        }
        if !self.others.is_empty() {
            md.push_str("\n## Runs\n\n| run | backbone | side | trainable | top-1 % | top-5 % | img/s | peak MiB | wall s |\n|---|---|---|---|---|---|---|---|---|\n");
            for &i in &self.others {
                let r = &self.runs[i];
                md.push_str(&format!(
                    "| {} | {} | {} | {} | {:.2} | {} | {} | {} | {} |\n",
                    r.name,
                    r.backbone,
                    r.side,
                    r.trainable_params.map_or("-".into(), |v| v.to_string()),
                    100.0 * r.top1,
                    pct(r.top5.map(|v| 100.0 * v)),
                    opt(r.img_per_s, 1),
                    opt(r.peak_mib, 0),
                    opt(r.wall_s, 1)
                ));
            }
        }
        md.push_str("\nPicture: `summary.png` and `summary.svg`.\n");
        md
    }

    /// The summary as JSON (accuracies in percent; a task not run is absent, never 0).
    pub fn json(&self) -> Value {
        let runs: Vec<Value> = self
            .runs
            .iter()
            .map(|r| {
                let mut v = json!({
                    "dir": r.dir.display().to_string(), "name": r.name, "backbone": r.backbone,
                    "side": r.side, "method": r.method, "top1": 100.0 * r.top1,
                    "top5": r.top5.map(|v| 100.0 * v), "trainable_params": r.trainable_params,
                    "img_per_s": r.img_per_s, "peak_mib": r.peak_mib, "wall_s": r.wall_s,
                });
                match &r.protocol {
                    Protocol::Vtab { task } => {
                        v["protocol"] = json!("vtab-1k");
                        v["task"] = json!(task);
                    }
                    Protocol::FewShot {
                        dataset,
                        shots,
                        seed,
                    } => {
                        v["protocol"] = json!("few-shot");
                        v["dataset"] = json!(dataset);
                        v["shots"] = json!(shots);
                        v["seed"] = json!(seed);
                    }
                    Protocol::DomainGeneralization { seed } => {
                        v["protocol"] = json!("domain-generalization");
                        v["seed"] = json!(seed);
                    }
                    Protocol::Other => v["protocol"] = json!("other"),
                }
                if r.tests.len() > 1 || matches!(r.protocol, Protocol::DomainGeneralization { .. })
                {
                    v["tests"] = json!(r
                        .tests
                        .iter()
                        .map(|(k, t)| (k.clone(), json!(100.0 * t)))
                        .collect::<serde_json::Map<_, _>>());
                }
                v
            })
            .collect();
        let few_shot: BTreeMap<&String, BTreeMap<&String, Vec<Value>>> = self
            .few_shot
            .iter()
            .map(|(d, ms)| {
                let m = ms
                    .iter()
                    .map(|(m, c)| {
                        let pts = c
                            .iter()
                            .map(|(s, mu, sd, n)| json!({"shots": s, "mean": mu, "std": sd, "seeds": n}))
                            .collect();
                        (m, pts)
                    })
                    .collect();
                (d, m)
            })
            .collect();
        let sets = self.dg_sets();
        let dg: BTreeMap<&String, BTreeMap<&String, Value>> = self
            .dg
            .iter()
            .map(|(m, per)| {
                let cells = per
                    .iter()
                    .filter_map(|(set, v)| {
                        mean_std(v).map(|(mu, sd, n)| {
                            (set, json!({"mean": mu, "std": sd, "runs": n, "values": v}))
                        })
                    })
                    .collect();
                (m, cells)
            })
            .collect();
        json!({
            "runs": runs,
            "domain_generalization": {"sets": sets, "methods": dg},
            "vtab": self.vtab,
            "reference": self.reference,
            "few_shot": few_shot,
            "others": self.others.iter().map(|&i| self.runs[i].name.clone()).collect::<Vec<_>>(),
        })
    }

    fn panels(&self) -> Vec<Panel> {
        let mut p = Vec::new();
        if !self.vtab.is_empty() {
            let mut labels: Vec<String> = Vec::new();
            for (_, ts) in VTAB_GROUPS {
                labels.extend(ts.iter().map(|t| t.to_string()));
            }
            labels.extend(["Natural", "Specialized", "Structured", "mean"].map(String::from));
            let mut series: Vec<(String, Vec<Option<f64>>)> = self
                .vtab
                .iter()
                .map(|c| {
                    let mut v: Vec<Option<f64>> = VTAB_GROUPS
                        .iter()
                        .flat_map(|(_, ts)| ts.iter().map(|t| c.tasks.get(*t).copied()))
                        .collect();
                    v.extend(c.groups.iter().map(|g| g.1));
                    v.push(c.mean_of_groups);
                    (c.method.clone(), v)
                })
                .collect();
            if let Some(r) = &self.reference {
                let c = VtabColumn::new(&r.name, r.tasks.clone());
                let mut v: Vec<Option<f64>> = VTAB_GROUPS
                    .iter()
                    .flat_map(|(_, ts)| ts.iter().map(|t| c.tasks.get(*t).copied()))
                    .collect();
                v.extend(c.groups.iter().map(|g| g.1));
                v.push(c.mean_of_groups);
                series.push((r.name.clone(), v));
            }
            p.push(Panel::Bars {
                title: "VTAB-1k top-1 (%)".into(),
                labels,
                series,
                wide: true,
            });
        }
        for (d, methods) in &self.few_shot {
            p.push(Panel::Lines {
                title: format!("{d}: top-1 (%) against shots"),
                series: methods
                    .iter()
                    .map(|(m, c)| (m.clone(), c.iter().map(|q| (q.0, q.1, q.2)).collect()))
                    .collect(),
            });
        }
        if !self.dg.is_empty() {
            let sets = self.dg_sets();
            p.push(Panel::Bars {
                title: "domain generalisation: top-1 (%), mean over runs".into(),
                labels: sets.iter().map(|s| Summary::dg_title(s)).collect(),
                series: self
                    .dg
                    .keys()
                    .map(|m| {
                        (
                            m.clone(),
                            sets.iter()
                                .map(|s| self.dg_cell(m, s).map(|c| c.0))
                                .collect(),
                        )
                    })
                    .collect(),
                wide: false,
            });
        }
        if !self.others.is_empty() {
            p.push(Panel::Bars {
                title: "top-1 (%) per run".into(),
                labels: self
                    .others
                    .iter()
                    .map(|&i| self.runs[i].name.clone())
                    .collect(),
                series: vec![(
                    "top-1".into(),
                    self.others
                        .iter()
                        .map(|&i| Some(100.0 * self.runs[i].top1))
                        .collect(),
                )],
                wide: self.others.len() > 6,
            });
        }
        p
    }

    /// Writes `summary.md`, `summary.json`, `summary.png` and `summary.svg` into `out`.
    pub fn write(&self, out: &Path) -> Result<()> {
        std::fs::create_dir_all(out).map_err(|e| DtlError::io(out, e))?;
        let md = out.join("summary.md");
        dtl_core::fsio::write_atomic(&md, self.markdown().as_bytes())?;
        let js = out.join("summary.json");
        let text = serde_json::to_string_pretty(&self.json())
            .map_err(|e| DtlError::invalid(e.to_string()))?;
        dtl_core::fsio::write_atomic(&js, (text + "\n").as_bytes())?;
        let panels = self.panels();
        let size = layout_size(&panels);
        let svg = out.join("summary.svg");
        let mut text = String::new();
        {
            let root = SVGBackend::with_string(&mut text, size).into_drawing_area();
            draw_panels(&root, &panels)
                .map_err(|e| DtlError::file(&svg, format!("cannot draw the picture: {e}")))?;
            root.present()
                .map_err(|e| DtlError::file(&svg, format!("cannot write the picture: {e}")))?;
        }
        dtl_core::fsio::write_atomic(&svg, text.as_bytes())?;
        crate::raster::write_png(&out.join("summary.png"), size, |root| {
            draw_panels(root, &panels)
        })
    }
}

/// (shots, mean top-1 %, std %) of one point of a few-shot curve.
type ShotPoint = (u64, f64, f64);

/// One chart of the picture.
enum Panel {
    /// Grouped bars: one group per label, one bar per series; `None` draws nothing.
    Bars {
        title: String,
        labels: Vec<String>,
        series: Vec<(String, Vec<Option<f64>>)>,
        wide: bool,
    },
    /// Curves against shots (log2 axis) with ±std whiskers.
    Lines {
        title: String,
        series: Vec<(String, Vec<ShotPoint>)>,
    },
}

const PANEL: (u32, u32) = (560, 420);

/// Rows of the layout: a wide panel takes a row; others go two to a row.
fn layout(panels: &[Panel]) -> Vec<Vec<usize>> {
    let mut rows: Vec<Vec<usize>> = Vec::new();
    for (i, p) in panels.iter().enumerate() {
        let wide = matches!(p, Panel::Bars { wide: true, .. });
        match rows.last_mut() {
            Some(r) if !wide && r.len() == 1 && !is_wide(&panels[r[0]]) => r.push(i),
            _ => rows.push(vec![i]),
        }
    }
    rows
}

fn is_wide(p: &Panel) -> bool {
    matches!(p, Panel::Bars { wide: true, .. })
}

fn layout_size(panels: &[Panel]) -> (u32, u32) {
    let rows = layout(panels).len().max(1) as u32;
    (2 * PANEL.0, rows * PANEL.1)
}

fn color(i: usize) -> RGBColor {
    const C: [RGBColor; 6] = [
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(214, 39, 40),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
    ];
    C[i % C.len()]
}

fn draw_panels<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    panels: &[Panel],
) -> std::result::Result<(), String> {
    let e = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    root.fill(&WHITE).map_err(e)?;
    if panels.is_empty() {
        root.draw(&Text::new(
            "no runs",
            (20, 20),
            ("sans-serif", 18).into_font(),
        ))
        .map_err(e)?;
        return Ok(());
    }
    let rows = layout(panels);
    let strips = root.split_evenly((rows.len(), 1));
    for (row, strip) in rows.iter().zip(strips) {
        if row.len() == 1 && is_wide(&panels[row[0]]) {
            draw_panel(&strip, &panels[row[0]])?;
        } else {
            let (l, r) = strip.split_horizontally(PANEL.0);
            draw_panel(&l, &panels[row[0]])?;
            if let Some(&j) = row.get(1) {
                draw_panel(&r, &panels[j])?;
            }
        }
    }
    Ok(())
}

fn draw_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    panel: &Panel,
) -> std::result::Result<(), String> {
    let e = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    match panel {
        Panel::Bars {
            title,
            labels,
            series,
            ..
        } => {
            let n = labels.len().max(1);
            let k = series.len().max(1);
            let mut c = ChartBuilder::on(area)
                .caption(title, ("sans-serif", 18))
                .margin(10)
                .x_label_area_size(160)
                .y_label_area_size(45)
                .build_cartesian_2d(0.0..n as f64, 0.0..140.0)
                .map_err(e)?;
            c.configure_mesh()
                .disable_x_mesh()
                .x_labels(0)
                .y_desc("top-1 (%)")
                .draw()
                .map_err(e)?;
            // One label under each group of bars, written downwards.
            let base = area.get_base_pixel();
            let style = ("sans-serif", 12)
                .into_font()
                .transform(FontTransform::Rotate90)
                .color(&BLACK);
            for (i, l) in labels.iter().enumerate() {
                let (x, y) = c.backend_coord(&(i as f64 + 0.5, 0.0));
                // A group without any value is said to be missing, not drawn as 0.
                let missing = series
                    .iter()
                    .all(|s| s.1.get(i).copied().flatten().is_none());
                let l = if missing {
                    format!("{l} (not run)")
                } else {
                    l.clone()
                };
                area.draw(&Text::new(
                    l,
                    (x - base.0 + 6, y - base.1 + 6),
                    style.clone(),
                ))
                .map_err(e)?;
            }
            let w = 0.8 / k as f64;
            for (si, (name, vals)) in series.iter().enumerate() {
                let col = color(si);
                let bars: Vec<Rectangle<(f64, f64)>> = vals
                    .iter()
                    .enumerate()
                    .filter_map(|(i, v)| {
                        v.map(|v| {
                            let x0 = i as f64 + 0.1 + si as f64 * w;
                            Rectangle::new([(x0, 0.0), (x0 + w, v.clamp(0.0, 100.0))], col.filled())
                        })
                    })
                    .collect();
                c.draw_series(bars)
                    .map_err(e)?
                    .label(name.clone())
                    .legend(move |(x, y)| {
                        Rectangle::new([(x, y - 5), (x + 10, y + 5)], col.filled())
                    });
            }
            if series.len() > 1 {
                c.configure_series_labels()
                    .background_style(WHITE.mix(0.8))
                    .border_style(BLACK)
                    .position(SeriesLabelPosition::UpperRight)
                    .draw()
                    .map_err(e)?;
            }
        }
        Panel::Lines { title, series } => {
            let max_shot = series
                .iter()
                .flat_map(|s| s.1.iter().map(|p| p.0))
                .max()
                .unwrap_or(16)
                .max(2);
            let xmax = (max_shot as f64).log2() + 0.3;
            let mut c = ChartBuilder::on(area)
                .caption(title, ("sans-serif", 18))
                .margin(10)
                .x_label_area_size(35)
                .y_label_area_size(45)
                .build_cartesian_2d(-0.3..xmax, 0.0..100.0)
                .map_err(e)?;
            c.configure_mesh()
                .x_labels(((max_shot as f64).log2() as usize + 1) * 2)
                .x_label_formatter(&|x| {
                    let r = x.round();
                    if (x - r).abs() < 1e-6 && r >= 0.0 {
                        format!("{}", 1u64 << (r as u32))
                    } else {
                        String::new()
                    }
                })
                .x_desc("shots per class")
                .y_desc("top-1 (%)")
                .draw()
                .map_err(e)?;
            for (si, (name, pts)) in series.iter().enumerate() {
                let col = color(si);
                let xy: Vec<(f64, f64)> = pts.iter().map(|p| ((p.0 as f64).log2(), p.1)).collect();
                c.draw_series(LineSeries::new(xy.clone(), col.stroke_width(2)))
                    .map_err(e)?
                    .label(name.clone())
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 15, y)], col.stroke_width(2))
                    });
                c.draw_series(xy.iter().map(|&p| Circle::new(p, 3, col.filled())))
                    .map_err(e)?;
                for p in pts {
                    let x = (p.0 as f64).log2();
                    let (lo, hi) = ((p.1 - p.2).max(0.0), (p.1 + p.2).min(100.0));
                    if p.2 > 0.0 {
                        c.draw_series(std::iter::once(PathElement::new(
                            vec![(x, lo), (x, hi)],
                            col,
                        )))
                        .map_err(e)?;
                    }
                }
            }
            c.configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .position(SeriesLabelPosition::LowerRight)
                .draw()
                .map_err(e)?;
        }
    }
    Ok(())
}
