//! What a person reads after (and during) a run: `metrics.jsonl`, `report.md`,
//! `report.json` and `curves.svg`, plus the process's memory figures.

use std::io::Write;
use std::path::{Path, PathBuf};

use dtl_core::{DtlError, Result};
use plotters::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;

/// Appends one JSON object per line to `metrics.jsonl`.
///
/// Step lines: `{"kind":"step","epoch","step","loss","lr","img_per_s","time_s"}`; epoch
/// lines: `{"kind":"epoch","epoch","train_loss","lr","top1","top5","test_loss","wall_s"}`
/// (with `"tests": {name: {"top1","top5","loss"}}` for the test sets evaluated during
/// training); one line per extra test set after training:
/// `{"kind":"test","name","top1","top5","loss","images","classes"}`.
///
/// ```
/// let dir = tempfile::tempdir().unwrap();
/// let mut m = dtl_runner::report::Metrics::open(dir.path()).unwrap();
/// m.write(&serde_json::json!({"kind": "step", "loss": 1.0})).unwrap();
/// assert_eq!(dtl_runner::report::read_metrics(dir.path()).unwrap().len(), 1);
/// ```
pub struct Metrics {
    path: PathBuf,
    file: std::fs::File,
}

impl Metrics {
    /// Opens (appending) `<run_dir>/metrics.jsonl`.
    pub fn open(run_dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(run_dir).map_err(|e| DtlError::io(run_dir, e))?;
        let path = run_dir.join("metrics.jsonl");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| DtlError::io(&path, e))?;
        Ok(Metrics { path, file })
    }

    /// Writes one line.
    pub fn write(&mut self, v: &Value) -> Result<()> {
        writeln!(self.file, "{v}").map_err(|e| DtlError::io(&self.path, e))
    }

    /// Removes lines past a resume point: step lines with `step > step` and epoch lines past
    /// `completed_epochs` (they will be written again).
    pub fn truncate_after(run_dir: &Path, completed_epochs: usize, step: u64) -> Result<()> {
        let lines = read_metrics(run_dir)?;
        let kept: Vec<String> = lines
            .into_iter()
            .filter(|v| match v["kind"].as_str() {
                Some("step") => v["step"].as_u64().map(|s| s <= step).unwrap_or(true),
                Some("epoch") => v["epoch"]
                    .as_u64()
                    .map(|e| (e as usize) <= completed_epochs)
                    .unwrap_or(true),
                // Test-set lines are written once, after training, so again after a resume.
                Some("test") => false,
                _ => true,
            })
            .map(|v| v.to_string() + "\n")
            .collect();
        let path = run_dir.join("metrics.jsonl");
        dtl_core::fsio::write_atomic(&path, kept.concat().as_bytes())
    }
}

/// Every line of `<run_dir>/metrics.jsonl` (empty when absent).
pub fn read_metrics(run_dir: &Path) -> Result<Vec<Value>> {
    let path = run_dir.join("metrics.jsonl");
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(DtlError::io(&path, e)),
    };
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l)
                .map_err(|e| DtlError::file(&path, format!("line {}: {e}", i + 1)))
        })
        .collect()
}

/// Peak resident memory of this process in MiB (`VmHWM`), when the OS reports it.
pub fn peak_rss_mib() -> Option<f64> {
    proc_status_kib("VmHWM:").map(|k| k / 1024.0)
}

/// Current resident memory of this process in MiB (`VmRSS`).
pub fn rss_mib() -> Option<f64> {
    proc_status_kib("VmRSS:").map(|k| k / 1024.0)
}

/// Resets the peak-RSS counter so that the next [`peak_rss_mib`] measures from now
/// (Linux `clear_refs`); returns whether it worked.
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

fn proc_status_kib(key: &str) -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with(key))?;
    line[key.len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// Writes `report.json` and `report.md` into `run_dir`.
pub fn write_report(run_dir: &Path, report: &Value, epochs: &[Value]) -> Result<()> {
    let json_path = run_dir.join("report.json");
    let text =
        serde_json::to_string_pretty(report).map_err(|e| DtlError::invalid(e.to_string()))?;
    dtl_core::fsio::write_atomic(&json_path, (text + "\n").as_bytes())?;
    let f = |k: &str| report[k].clone();
    let pct = |v: Value| {
        v.as_f64()
            .map(|x| format!("{:.2} %", 100.0 * x))
            .unwrap_or_else(|| "-".into())
    };
    let num = |v: Value, d: usize| {
        v.as_f64()
            .map(|x| format!("{x:.d$}"))
            .unwrap_or_else(|| "-".into())
    };
    let mut md = String::new();
    md.push_str(&format!(
        "# Run `{}`\n\n",
        report["name"].as_str().unwrap_or("run")
    ));
    md.push_str("| metric | value |\n|---|---|\n");
    md.push_str(&format!(
        "| backbone | `{}` |\n",
        report["backbone"].as_str().unwrap_or("-")
    ));
    md.push_str(&format!(
        "| side network | `{}` |\n",
        report["side"].as_str().unwrap_or("-")
    ));
    md.push_str(&format!(
        "| device | `{}` |\n",
        report["device"].as_str().unwrap_or("cpu")
    ));
    for (key, label) in [("precision", "precision"), ("graph", "CUDA graph")] {
        if let Some(v) = report[key].as_str() {
            md.push_str(&format!("| {label} | {v} |\n"));
        }
    }
    if f("best_val_top1").is_number() {
        // Selected on a validation split: the test figures are those of the best checkpoint.
        md.push_str(&format!(
            "| best {} top-1 | {} (epoch {}) |\n",
            report["eval_split"].as_str().unwrap_or("validation"),
            pct(f("best_val_top1")),
            f("best_epoch")
        ));
        md.push_str(&format!(
            "| test top-1 (that checkpoint) | {} |\n",
            pct(f("top1"))
        ));
        md.push_str(&format!(
            "| test top-5 (that checkpoint) | {} |\n",
            pct(f("top5"))
        ));
    } else {
        md.push_str(&format!("| top-1 (last epoch) | {} |\n", pct(f("top1"))));
        md.push_str(&format!("| top-5 (last epoch) | {} |\n", pct(f("top5"))));
        md.push_str(&format!(
            "| best top-1 | {} (epoch {}) |\n",
            pct(f("best_top1")),
            f("best_epoch")
        ));
    }
    md.push_str(&format!(
        "| trainable parameters | {} |\n",
        f("trainable_params")
    ));
    match (f("epochs").as_u64(), f("epochs_trained").as_u64()) {
        (Some(asked), Some(done)) if done != asked => md.push_str(&format!(
            "| epochs | {done} trained (schedule.epochs is {asked}: the checkpoint resumed had trained {done} already) |\n"
        )),
        _ => md.push_str(&format!("| epochs | {} |\n", f("epochs"))),
    }
    md.push_str(&format!("| wall time | {} s |\n", num(f("wall_s"), 1)));
    md.push_str(&format!(
        "| training speed | {} img/s |\n",
        num(f("train_img_per_s"), 1)
    ));
    md.push_str(&format!(
        "| peak resident memory | {} MiB |\n",
        num(f("peak_rss_mib"), 0)
    ));
    if f("gpu_mib").is_number() {
        md.push_str(&format!(
            "| GPU memory held at the end (weights, cached buffers) | {} MiB |\n",
            num(f("gpu_mib"), 0)
        ));
    }
    let tests = report["tests"].as_object().cloned().unwrap_or_default();
    if !tests.is_empty() || f("test_classes") != f("classes") {
        md.push_str("\n## Test sets\n\n| test set | top-1 | top-5 | images | classes scored |\n|---|---|---|---|---|\n");
        md.push_str(&format!(
            "| {} (data.test) | {} | {} | {} | {} |\n",
            report["data"]["test"].as_str().unwrap_or("test"),
            pct(f("top1")),
            pct(f("top5")),
            f("test_images"),
            f("test_classes")
        ));
        for (name, t) in &tests {
            md.push_str(&format!(
                "| {name} | {} | {} | {} | {} |\n",
                pct(t["top1"].clone()),
                pct(t["top5"].clone()),
                t["images"],
                t["classes"]
            ));
        }
    }
    if !epochs.is_empty() {
        md.push_str("\n## Per epoch\n\n| epoch | train loss | lr | top-1 | top-5 |\n|---|---|---|---|---|\n");
        for e in epochs {
            md.push_str(&format!(
                "| {} | {} | {} | {} | {} |\n",
                e["epoch"],
                num(e["train_loss"].clone(), 4),
                e["lr"]
                    .as_f64()
                    .map(|x| format!("{x:.3e}"))
                    .unwrap_or_else(|| "-".into()),
                pct(e["top1"].clone()),
                pct(e["top5"].clone())
            ));
        }
    }
    md.push_str("\nLoss and accuracy per epoch: `curves.svg`.\n");
    let md_path = run_dir.join("report.md");
    dtl_core::fsio::write_atomic(&md_path, md.as_bytes())
}

/// Draws training loss and test top-1 per epoch into an SVG file.
///
/// ```
/// let dir = tempfile::tempdir().unwrap();
/// let p = dir.path().join("curves.svg");
/// dtl_runner::report::plot_curves(&p, &[(1, 2.0, Some(0.3)), (2, 1.0, Some(0.6))]).unwrap();
/// assert!(std::fs::read_to_string(&p).unwrap().contains("<svg"));
/// ```
pub fn plot_curves(path: &Path, points: &[(usize, f64, Option<f64>)]) -> Result<()> {
    plot_curves_of(path, points, "test")
}

/// Like [`plot_curves`], the accuracy panel titled after the split it was measured on
/// (`"val"` when training evaluates on a validation split).
///
/// ```
/// let dir = tempfile::tempdir().unwrap();
/// let p = dir.path().join("curves.svg");
/// dtl_runner::report::plot_curves_of(&p, &[(1, 2.0, Some(0.3))], "val").unwrap();
/// assert!(std::fs::read_to_string(&p).unwrap().contains("val top-1"));
/// ```
pub fn plot_curves_of(
    path: &Path,
    points: &[(usize, f64, Option<f64>)],
    split: &str,
) -> Result<()> {
    let mut svg = String::new();
    draw_curves(&mut svg, path, points, split)?;
    dtl_core::fsio::write_atomic(path, svg.as_bytes())
}

/// Draws the curves of [`plot_curves_of`] into `svg` (`path` names the file in messages).
fn draw_curves(
    svg: &mut String,
    path: &Path,
    points: &[(usize, f64, Option<f64>)],
    split: &str,
) -> Result<()> {
    let err = |e: String| DtlError::file(path, format!("cannot draw the plot: {e}"));
    let root = SVGBackend::with_string(svg, (900, 400)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let (left, right) = root.split_horizontally(450);
    let max_epoch = points.iter().map(|p| p.0).max().unwrap_or(1).max(1) as f64;
    let max_loss = points.iter().map(|p| p.1).fold(0.0f64, f64::max).max(1e-3) * 1.05;
    let mut c = ChartBuilder::on(&left)
        .caption("training loss", ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(50)
        .build_cartesian_2d(0.0..max_epoch, 0.0..max_loss)
        .map_err(|e| err(e.to_string()))?;
    c.configure_mesh()
        .x_desc("epoch")
        .draw()
        .map_err(|e| err(e.to_string()))?;
    let loss: Vec<(f64, f64)> = points.iter().map(|p| (p.0 as f64, p.1)).collect();
    c.draw_series(LineSeries::new(loss.iter().copied(), &RED))
        .map_err(|e| err(e.to_string()))?;
    // Markers too, so that a run with a single epoch or evaluation still shows its value.
    c.draw_series(loss.iter().map(|&p| Circle::new(p, 3, RED.filled())))
        .map_err(|e| err(e.to_string()))?;
    let mut c = ChartBuilder::on(&right)
        .caption(format!("{split} top-1 (%)"), ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(50)
        .build_cartesian_2d(0.0..max_epoch, 0.0..100.0)
        .map_err(|e| err(e.to_string()))?;
    c.configure_mesh()
        .x_desc("epoch")
        .draw()
        .map_err(|e| err(e.to_string()))?;
    let acc: Vec<(f64, f64)> = points
        .iter()
        .filter_map(|p| p.2.map(|a| (p.0 as f64, 100.0 * a)))
        .collect();
    c.draw_series(LineSeries::new(acc.iter().copied(), &BLUE))
        .map_err(|e| err(e.to_string()))?;
    c.draw_series(acc.iter().map(|&p| Circle::new(p, 3, BLUE.filled())))
        .map_err(|e| err(e.to_string()))?;
    root.present().map_err(|e| err(e.to_string()))?;
    Ok(())
}

/// How a field of a typed report reads from JSON: leniently, so that a report written by
/// another version still reads. A value of the wrong type reads as absent (`None`), as when the
/// key is missing; a map of named entries reads an entry of the wrong shape as all absent; a
/// list reads a row of the wrong shape as all absent and a value that is no list as empty; a
/// raw JSON value reads as it is.
trait Lenient: Sized {
    /// The field from its JSON value.
    fn from_value(v: Value) -> Self;
}

/// [`Lenient`] for `Option<T>` of each type `T` a report field holds.
macro_rules! lenient_option {
    ($($t:ty),* $(,)?) => {
        $(impl Lenient for Option<$t> {
            fn from_value(v: Value) -> Self {
                serde_json::from_value(v).ok()
            }
        })*
    };
}

lenient_option!(
    String,
    usize,
    u64,
    f64,
    DataReport,
    CheckpointsReport,
    BenchProfile
);

impl<T: serde::de::DeserializeOwned + Default> Lenient for Option<BTreeMap<String, T>> {
    fn from_value(v: Value) -> Self {
        v.as_object().map(|m| {
            m.iter()
                .map(|(k, v)| {
                    (
                        k.clone(),
                        serde_json::from_value(v.clone()).unwrap_or_default(),
                    )
                })
                .collect()
        })
    }
}

impl<T: serde::de::DeserializeOwned + Default> Lenient for Vec<T> {
    fn from_value(v: Value) -> Self {
        v.as_array()
            .map(|a| {
                a.iter()
                    .map(|r| serde_json::from_value(r.clone()).unwrap_or_default())
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Lenient for Value {
    fn from_value(v: Value) -> Self {
        v
    }
}

/// The `deserialize_with` of every field of a typed report (see [`Lenient`]).
fn lenient<'de, D, T>(d: D) -> std::result::Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Lenient,
{
    let v = <Value as serde::Deserialize>::deserialize(d)?;
    Ok(T::from_value(v))
}

/// Declares a typed report: the struct as written, deriving `Debug`, `Clone`, `Default`,
/// `PartialEq` and serde's traits, every field read with [`lenient`] and `Default` where its
/// key is missing (a field's own `#[serde]` attributes, such as `skip_serializing_if`, are
/// kept).
macro_rules! lenient_fields {
    (
        $(#[$meta:meta])*
        pub struct $name:ident {
            $(
                $(#[$field_meta:meta])*
                pub $field:ident : $ty:ty
            ),* $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
        pub struct $name {
            $(
                $(#[$field_meta])*
                #[serde(default, deserialize_with = "lenient")]
                pub $field: $ty,
            )*
        }
    };
}

/// Converts a typed report to the JSON object [`dtl_core::Job`] returns.
fn to_json<T: Serialize>(r: &T) -> Value {
    serde_json::to_value(r).unwrap_or(Value::Null)
}

lenient_fields! {
    /// One extra test set of a report (`"tests"` of [`TrainReport`] and [`EvalReport`]).
    ///
    /// ```
    /// let t: dtl_runner::report::TestSetReport =
    ///     serde_json::from_str(r#"{"top1": 0.5, "images": 10}"#).unwrap();
    /// assert_eq!((t.top1, t.images, t.top5), (Some(0.5), Some(10), None));
    /// ```
    pub struct TestSetReport {
        /// Top-1 accuracy in [0, 1].
        pub top1: Option<f64>,
        /// Top-5 accuracy in [0, 1].
        pub top5: Option<f64>,
        /// Mean cross-entropy.
        pub loss: Option<f64>,
        /// Images evaluated.
        pub images: Option<usize>,
        /// Classes scored over.
        pub classes: Option<usize>,
    }
}

impl TestSetReport {
    /// The entry for an evaluation scored over `classes` classes.
    ///
    /// ```
    /// use dtl_runner::job::EvalResult;
    /// let r = EvalResult { top1: 0.5, top5: 1.0, loss: 0.7, images: 4 };
    /// let t = dtl_runner::report::TestSetReport::of(&r, 3);
    /// assert_eq!((t.top1, t.classes), (Some(0.5), Some(3)));
    /// ```
    pub fn of(r: &crate::job::EvalResult, classes: usize) -> Self {
        TestSetReport {
            top1: Some(r.top1),
            top5: Some(r.top5),
            loss: Some(r.loss),
            images: Some(r.images),
            classes: Some(classes),
        }
    }
}

lenient_fields! {
    /// `"data"` of a [`TrainReport`]: where the run's samples came from.
    pub struct DataReport {
        /// `data.kind`.
        pub kind: Option<String>,
        /// `data.task`.
        pub task: Option<String>,
        /// `data.train`.
        pub train: Option<String>,
        /// `data.test`.
        pub test: Option<String>,
        /// `data.options` as JSON.
        pub options: Value,
    }
}

lenient_fields! {
    /// `"checkpoints"` of a [`TrainReport`].
    pub struct CheckpointsReport {
        /// The best checkpoint's path.
        pub best: Option<String>,
        /// The last checkpoint's path.
        pub last: Option<String>,
    }
}

lenient_fields! {
    /// `report.json` of a training run, as `dtl run` writes it and `dtl summarize` reads it.
    ///
    /// Every field is optional when read (a report of another version may lack one, or hold a
    /// value of another type: both read as `None`); the runner writes every field, `null` where
    /// a value does not apply (`best_top1` with a validation split, for example).
    ///
    /// ```
    /// let r = dtl_runner::report::TrainReport::from_json(&serde_json::json!({"top1": 0.5, "side": "dtl"}));
    /// assert_eq!((r.top1, r.side.as_deref(), r.top5), (Some(0.5), Some("dtl"), None));
    /// ```
    pub struct TrainReport {
        /// `run.name`.
        pub name: Option<String>,
        /// `backbone.kind`.
        pub backbone: Option<String>,
        /// `side.kind`.
        pub side: Option<String>,
        /// `head.kind`.
        pub head: Option<String>,
        /// Classes of the head.
        pub classes: Option<usize>,
        /// Top-1 accuracy on the test split.
        pub top1: Option<f64>,
        /// Top-5 accuracy on the test split.
        pub top5: Option<f64>,
        /// Mean cross-entropy on the test split.
        pub test_loss: Option<f64>,
        /// Images of the test split.
        pub test_images: Option<usize>,
        /// Classes the test split was scored over.
        pub test_classes: Option<usize>,
        /// The extra test sets by name.
        pub tests: Option<BTreeMap<String, TestSetReport>>,
        /// Best test top-1 during training (`null` with a validation split).
        pub best_top1: Option<f64>,
        /// Epoch of the best evaluation.
        pub best_epoch: Option<usize>,
        /// The split evaluated during training.
        pub eval_split: Option<String>,
        /// Best validation top-1 (`null` without a validation split).
        pub best_val_top1: Option<f64>,
        /// `best` or `last`: the checkpoint the test split was evaluated with.
        pub tested_checkpoint: Option<String>,
        /// Trained parameters (side network and head).
        pub trainable_params: Option<usize>,
        /// Parameters of the frozen backbone.
        pub backbone_params: Option<usize>,
        /// `schedule.epochs`.
        pub epochs: Option<usize>,
        /// Epochs completed.
        pub epochs_trained: Option<usize>,
        /// Optimizer steps taken.
        pub steps: Option<u64>,
        /// Wall-clock seconds of the run, over every resume.
        pub wall_s: Option<f64>,
        /// Training throughput in images per second.
        pub train_img_per_s: Option<f64>,
        /// The device the run trained on.
        pub device: Option<String>,
        /// The precision it trained at (`f32` or `bf16`: `run.precision` resolved).
        pub precision: Option<String>,
        /// Whether the training step replayed a recorded graph: `captured`, or why not (absent
        /// for the tape-based CPU path, which records none).
        #[serde(skip_serializing_if = "Option::is_none")]
        pub graph: Option<String>,
        /// Peak resident memory of the process in MiB.
        pub peak_rss_mib: Option<f64>,
        /// Peak GPU memory in MiB (`null` on the CPU).
        pub gpu_mib: Option<f64>,
        /// The run folder.
        pub run_dir: Option<String>,
        /// The pipeline file the run started from.
        pub pipeline_file: Option<String>,
        /// Where the samples came from.
        pub data: Option<DataReport>,
        /// The checkpoint files.
        pub checkpoints: Option<CheckpointsReport>,
    }
}

impl TrainReport {
    /// Reads a report from its JSON object (never fails: see the type's notes).
    pub fn from_json(v: &Value) -> Self {
        serde_json::from_value(v.clone()).unwrap_or_default()
    }

    /// The report as the JSON object `report.json` holds.
    ///
    /// ```
    /// let r = dtl_runner::report::TrainReport { top1: Some(0.25), ..Default::default() };
    /// assert_eq!(r.to_json()["top1"], 0.25);
    /// assert!(r.to_json()["top5"].is_null());
    /// ```
    pub fn to_json(&self) -> Value {
        to_json(self)
    }
}

lenient_fields! {
    /// What `dtl eval` reports of a checkpoint.
    ///
    /// ```
    /// let r = dtl_runner::report::EvalReport::from_json(&serde_json::json!({"top1": 0.5, "images": 8}));
    /// assert_eq!((r.top1, r.images), (Some(0.5), Some(8)));
    /// ```
    pub struct EvalReport {
        /// The checkpoint evaluated.
        pub checkpoint: Option<String>,
        /// The epoch the checkpoint was saved after, as stored.
        pub epoch: Value,
        /// Top-1 accuracy on the test split.
        pub top1: Option<f64>,
        /// Top-5 accuracy on the test split.
        pub top5: Option<f64>,
        /// Mean cross-entropy on the test split.
        pub test_loss: Option<f64>,
        /// Images evaluated.
        pub images: Option<usize>,
        /// Evaluation throughput in images per second.
        pub img_per_s: Option<f64>,
        /// The extra test sets by name.
        pub tests: Option<BTreeMap<String, TestSetReport>>,
        /// The device evaluated on.
        pub device: Option<String>,
        /// The precision it evaluated at (`f32` or `bf16`).
        pub precision: Option<String>,
    }
}

impl EvalReport {
    /// Reads a report from its JSON object (never fails; absent or mistyped fields are `None`).
    pub fn from_json(v: &Value) -> Self {
        serde_json::from_value(v.clone()).unwrap_or_default()
    }

    /// The report as a JSON object.
    ///
    /// ```
    /// let r = dtl_runner::report::EvalReport { images: Some(3), ..Default::default() };
    /// assert_eq!(r.to_json()["images"], 3);
    /// ```
    pub fn to_json(&self) -> Value {
        to_json(self)
    }
}

lenient_fields! {
    /// One row of a [`BenchReport`]: one measurement at one batch size.
    ///
    /// ```
    /// let r: dtl_runner::report::BenchRow =
    ///     serde_json::from_str(r#"{"what": "train", "side": "dtl", "batch": 8, "img_per_s": 12.5}"#).unwrap();
    /// assert_eq!((r.what.as_deref(), r.batch, r.peak_gpu_mib), (Some("train"), Some(8), None));
    /// ```
    pub struct BenchRow {
        /// `train`, `forward` or `vjp`.
        pub what: Option<String>,
        /// The side network measured (`none` for the backbone alone).
        pub side: Option<String>,
        /// `recompute` or `store` (training rows).
        #[serde(skip_serializing_if = "Option::is_none")]
        pub activations: Option<String>,
        /// Batch size.
        pub batch: Option<usize>,
        /// Throughput in images per second.
        pub img_per_s: Option<f64>,
        /// Peak resident memory of the process in MiB.
        pub peak_rss_mib: Option<f64>,
        /// Peak GPU memory in MiB (`null` on the CPU).
        pub peak_gpu_mib: Option<f64>,
        /// GPU memory the driver reports in use, in MiB (GPU rows only).
        #[serde(skip_serializing_if = "Option::is_none")]
        pub gpu_driver_mib: Option<f64>,
        /// Trained parameters (training rows).
        #[serde(skip_serializing_if = "Option::is_none")]
        pub trainable_params: Option<usize>,
        /// The precision of the device step (`f32` or `bf16`; device rows only).
        #[serde(skip_serializing_if = "Option::is_none")]
        pub precision: Option<String>,
        /// Whether the timed training steps replayed a recorded graph: `captured`, or why not
        /// (device training rows only).
        #[serde(skip_serializing_if = "Option::is_none")]
        pub graph: Option<String>,
        /// Where the device's time went during the timed steps (`dtl bench --profile`,
        /// device training rows only).
        #[serde(skip_serializing_if = "Option::is_none")]
        pub profile: Option<BenchProfile>,
    }
}

/// One label of a [`BenchProfile`]: a kernel, a matrix product's operation, shape and
/// storage, `copy`, `graph replay` or `other`.
///
/// ```
/// let r: dtl_runner::report::BenchProfileRow =
///     serde_json::from_str(r#"{"label": "dtl_gelu", "calls": 24, "total_ms": 1.5}"#).unwrap();
/// assert_eq!((r.calls, r.share), (24, 0.0));
/// ```
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct BenchProfileRow {
    /// What was timed.
    pub label: String,
    /// Operations timed under the label, over all timed steps.
    pub calls: u64,
    /// Their summed time in milliseconds.
    pub total_ms: f64,
    /// Mean time of one operation in microseconds.
    pub mean_us: f64,
    /// Fraction of the summed time of every label (the shares sum to 1).
    pub share: f64,
}

/// Where a device's time went during the timed steps of a `dtl bench --profile` row: the
/// report's form of a [`dtl_kernels::KernelProfile`], every label kept (the tables show the
/// longest ones).
///
/// ```
/// use dtl_runner::report::BenchProfile;
/// let k = dtl_kernels::KernelProfile::from_totals(
///     "cuda events",
///     20.0,
///     [("dtl_gelu".to_string(), 4, 2.0), ("copy".to_string(), 2, 6.0)],
/// );
/// let p = BenchProfile::from_kernels(&k, 2, "off (kernel profiling)");
/// assert_eq!(p.rows[0].label, "copy");
/// let md = p.markdown("ViT-B/16, batch 32", 25);
/// assert!(md.contains("| copy | 2 | 6.000 | 3.000 | 3000.0 | 75.0% |"), "{md}");
/// ```
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct BenchProfile {
    /// How the operations were timed: `cuda events` on a GPU, `host clock (emulator)` on the
    /// emulator (which times its host emulation, not a GPU).
    pub clock: String,
    /// Host wall-clock time of the timed steps in milliseconds, the final wait included.
    pub wall_ms: f64,
    /// Timed steps.
    pub steps: usize,
    /// What became of graph recording while profiling (events inside a graph capture time
    /// nothing, so the steps run as plain launches).
    pub graph: String,
    /// Every label, longest total first.
    pub rows: Vec<BenchProfileRow>,
}

impl BenchProfile {
    /// The report's form of `p`, measured over `steps` timed steps, `graph` saying what became
    /// of graph recording.
    ///
    /// ```
    /// let k = dtl_kernels::KernelProfile::default();
    /// let p = dtl_runner::report::BenchProfile::from_kernels(&k, 3, "off");
    /// assert_eq!((p.steps, p.graph.as_str()), (3, "off"));
    /// ```
    pub fn from_kernels(p: &dtl_kernels::KernelProfile, steps: usize, graph: &str) -> Self {
        BenchProfile {
            clock: p.clock.clone(),
            wall_ms: p.wall_ms,
            steps,
            graph: graph.to_string(),
            rows: p
                .rows
                .iter()
                .map(|r| BenchProfileRow {
                    label: r.label.clone(),
                    calls: r.calls,
                    total_ms: r.total_ms,
                    mean_us: r.mean_us,
                    share: r.share,
                })
                .collect(),
        }
    }

    /// The `top` longest rows and one `other` row for the rest (see
    /// [`dtl_kernels::KernelProfile::top`]).
    ///
    /// ```
    /// let p = dtl_runner::report::BenchProfile::default();
    /// assert!(p.top(25).rows.is_empty());
    /// ```
    pub fn top(&self, top: usize) -> BenchProfile {
        let k = dtl_kernels::KernelProfile {
            rows: self
                .rows
                .iter()
                .map(|r| dtl_kernels::ProfileRow {
                    label: r.label.clone(),
                    calls: r.calls,
                    total_ms: r.total_ms,
                    mean_us: r.mean_us,
                    share: r.share,
                })
                .collect(),
            wall_ms: self.wall_ms,
            clock: self.clock.clone(),
        }
        .top(top);
        BenchProfile::from_kernels(&k, self.steps, &self.graph)
    }

    /// The summed time of every label in milliseconds.
    ///
    /// ```
    /// assert_eq!(dtl_runner::report::BenchProfile::default().total_ms(), 0.0);
    /// ```
    pub fn total_ms(&self) -> f64 {
        self.rows.iter().map(|r| r.total_ms).sum()
    }

    /// One line on the whole: the timed time against the wall time, the steps, the clock and
    /// graph recording.
    ///
    /// ```
    /// let p = dtl_runner::report::BenchProfile { wall_ms: 10.0, steps: 2, ..Default::default() };
    /// assert!(p.summary().contains("of 10.0 ms wall"));
    /// ```
    pub fn summary(&self) -> String {
        let total = self.total_ms();
        let busy = if self.wall_ms > 0.0 {
            format!(" ({:.0}% busy)", 100.0 * total / self.wall_ms)
        } else {
            String::new()
        };
        let clock = if self.clock.is_empty() {
            "an unknown clock"
        } else {
            &self.clock
        };
        let graph = if self.graph.is_empty() {
            String::new()
        } else {
            format!("; graph: {}", self.graph)
        };
        format!(
            "{total:.1} ms timed of {:.1} ms wall{busy} over {} steps, timed by {clock}{graph}",
            self.wall_ms, self.steps
        )
    }

    fn per_step(&self, ms: f64) -> f64 {
        ms / self.steps.max(1) as f64
    }

    /// A plain-text table of the `top` longest labels and `other` (the terminal form).
    ///
    /// ```
    /// let p = dtl_runner::report::BenchProfile::default();
    /// assert!(p.table(25).starts_with("label"));
    /// ```
    pub fn table(&self, top: usize) -> String {
        let t = self.top(top);
        let width = t
            .rows
            .iter()
            .map(|r| r.label.chars().count())
            .max()
            .unwrap_or(0)
            .max(5);
        let mut out = format!(
            "{:<width$} {:>8} {:>10} {:>10} {:>10} {:>7}\n",
            "label", "calls", "total ms", "ms/step", "mean us", "share"
        );
        for r in &t.rows {
            out.push_str(&format!(
                "{:<width$} {:>8} {:>10.3} {:>10.3} {:>10.1} {:>6.1}%\n",
                r.label,
                r.calls,
                r.total_ms,
                self.per_step(r.total_ms),
                r.mean_us,
                100.0 * r.share
            ));
        }
        out
    }

    /// A markdown section: `title` as a heading, [`BenchProfile::summary`], and the table of
    /// the `top` longest labels and `other`.
    ///
    /// ```
    /// let p = dtl_runner::report::BenchProfile::default();
    /// assert!(p.markdown("t", 25).starts_with("### t\n"));
    /// ```
    pub fn markdown(&self, title: &str, top: usize) -> String {
        let t = self.top(top);
        let mut out = format!(
            "### {title}\n\n{}.\n\n| label | calls | total ms | ms/step | mean us | share |\n|---|---:|---:|---:|---:|---:|\n",
            self.summary()
        );
        for r in &t.rows {
            out.push_str(&format!(
                "| {} | {} | {:.3} | {:.3} | {:.1} | {:.1}% |\n",
                r.label.replace('|', "\\|"),
                r.calls,
                r.total_ms,
                self.per_step(r.total_ms),
                r.mean_us,
                100.0 * r.share
            ));
        }
        out
    }
}

lenient_fields! {
    /// What `dtl bench` reports: the backbone, the device and one row per measurement.
    ///
    /// ```
    /// let r = dtl_runner::report::BenchReport::from_json(&serde_json::json!(
    ///     {"backbone": "vit", "image_size": 32, "device": "cpu", "rows": [{"what": "forward"}]}));
    /// assert_eq!((r.image_size, r.rows.len()), (Some(32), 1));
    /// ```
    pub struct BenchReport {
        /// The backbone variant.
        pub backbone: Option<String>,
        /// Input image side.
        pub image_size: Option<usize>,
        /// The device measured on.
        pub device: Option<String>,
        /// The measurements.
        pub rows: Vec<BenchRow>,
    }
}

impl BenchReport {
    /// Reads a report from its JSON object (never fails; absent or mistyped fields are `None`).
    pub fn from_json(v: &Value) -> Self {
        serde_json::from_value(v.clone()).unwrap_or_default()
    }

    /// The report as a JSON object.
    ///
    /// ```
    /// let r = dtl_runner::report::BenchReport { device: Some("cpu".into()), ..Default::default() };
    /// assert_eq!(r.to_json()["device"], "cpu");
    /// ```
    pub fn to_json(&self) -> Value {
        to_json(self)
    }
}

#[cfg(test)]
mod typed_tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_train_report_serialises_to_the_json_it_always_had() {
        let mut tests = BTreeMap::new();
        tests.insert(
            "a".to_string(),
            TestSetReport {
                top1: Some(0.5),
                top5: Some(1.0),
                loss: Some(0.25),
                images: Some(4),
                classes: Some(2),
            },
        );
        let r = TrainReport {
            name: Some("n".into()),
            backbone: Some("b".into()),
            side: Some("dtl".into()),
            head: Some("linear".into()),
            classes: Some(10),
            top1: Some(0.5),
            top5: Some(0.75),
            test_loss: Some(1.5),
            test_images: Some(20),
            test_classes: Some(10),
            tests: Some(tests),
            best_top1: None,
            best_epoch: Some(2),
            eval_split: Some("val".into()),
            best_val_top1: Some(0.625),
            tested_checkpoint: Some("best".into()),
            trainable_params: Some(123),
            backbone_params: Some(4567),
            epochs: Some(3),
            epochs_trained: Some(3),
            steps: Some(30),
            wall_s: Some(1.25),
            train_img_per_s: Some(80.0),
            device: Some("cpu".into()),
            precision: Some("f32".into()),
            graph: Some("captured".into()),
            peak_rss_mib: None,
            gpu_mib: None,
            run_dir: Some("runs/n".into()),
            pipeline_file: Some("p.toml".into()),
            data: Some(DataReport {
                kind: Some("image-folder".into()),
                task: None,
                train: Some("train".into()),
                test: Some("test".into()),
                options: json!({"shots": 2}),
            }),
            checkpoints: Some(CheckpointsReport {
                best: Some("runs/n/best.safetensors".into()),
                last: Some("runs/n/last.safetensors".into()),
            }),
        };
        let want = json!({
            "name": "n", "backbone": "b", "side": "dtl", "head": "linear", "classes": 10,
            "top1": 0.5, "top5": 0.75, "test_loss": 1.5, "test_images": 20, "test_classes": 10,
            "tests": {"a": {"top1": 0.5, "top5": 1.0, "loss": 0.25, "images": 4, "classes": 2}},
            "best_top1": null, "best_epoch": 2, "eval_split": "val", "best_val_top1": 0.625,
            "tested_checkpoint": "best", "trainable_params": 123, "backbone_params": 4567,
            "epochs": 3, "epochs_trained": 3, "steps": 30, "wall_s": 1.25,
            "train_img_per_s": 80.0, "device": "cpu", "precision": "f32", "graph": "captured",
            "peak_rss_mib": null, "gpu_mib": null,
            "run_dir": "runs/n", "pipeline_file": "p.toml",
            "data": {"kind": "image-folder", "task": null, "train": "train", "test": "test",
                     "options": {"shots": 2}},
            "checkpoints": {"best": "runs/n/best.safetensors", "last": "runs/n/last.safetensors"},
        });
        let got = r.to_json();
        assert_eq!(
            serde_json::to_string_pretty(&got).unwrap(),
            serde_json::to_string_pretty(&want).unwrap()
        );
        // and it reads back to the same report
        assert_eq!(TrainReport::from_json(&got), r);
    }

    #[test]
    fn mistyped_or_missing_fields_read_as_absent() {
        let r = TrainReport::from_json(&json!({"top1": "high", "top5": 0.5, "tests": {"x": 3}}));
        assert_eq!((r.top1, r.top5), (None, Some(0.5)));
        assert_eq!(r.tests.unwrap()["x"], TestSetReport::default());
        assert_eq!(
            TrainReport::from_json(&json!([1, 2])),
            TrainReport::default()
        );
    }

    #[test]
    fn bench_rows_keep_their_optional_keys_out() {
        let row = BenchRow {
            what: Some("forward".into()),
            side: Some("none".into()),
            batch: Some(8),
            img_per_s: Some(10.0),
            peak_rss_mib: Some(100.0),
            ..BenchRow::default()
        };
        assert_eq!(
            serde_json::to_value(&row).unwrap(),
            json!({"what": "forward", "side": "none", "batch": 8, "img_per_s": 10.0,
                   "peak_rss_mib": 100.0, "peak_gpu_mib": null})
        );
    }
}
