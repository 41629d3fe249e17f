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

/// Reads a field leniently: a value of the wrong type reads as absent (`None`), as when the
/// key is missing, so that a report written by another version still reads.
fn lenient<'de, D, T>(d: D) -> std::result::Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::de::DeserializeOwned,
{
    let v = <Value as serde::Deserialize>::deserialize(d)?;
    Ok(serde_json::from_value(v).ok())
}

/// Reads a map of named entries leniently: an entry of the wrong shape reads as all absent.
fn lenient_map<'de, D, T>(d: D) -> std::result::Result<Option<BTreeMap<String, T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::de::DeserializeOwned + Default,
{
    let v = <Value as serde::Deserialize>::deserialize(d)?;
    Ok(v.as_object().map(|m| {
        m.iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    serde_json::from_value(v.clone()).unwrap_or_default(),
                )
            })
            .collect()
    }))
}

/// Converts a typed report to the JSON object [`dtl_core::Job`] returns.
fn to_json<T: Serialize>(r: &T) -> Value {
    serde_json::to_value(r).unwrap_or(Value::Null)
}

/// One extra test set of a report (`"tests"` of [`TrainReport`] and [`EvalReport`]).
///
/// ```
/// let t: dtl_runner::report::TestSetReport =
///     serde_json::from_str(r#"{"top1": 0.5, "images": 10}"#).unwrap();
/// assert_eq!((t.top1, t.images, t.top5), (Some(0.5), Some(10), None));
/// ```
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TestSetReport {
    /// Top-1 accuracy in [0, 1].
    #[serde(default, deserialize_with = "lenient")]
    pub top1: Option<f64>,
    /// Top-5 accuracy in [0, 1].
    #[serde(default, deserialize_with = "lenient")]
    pub top5: Option<f64>,
    /// Mean cross-entropy.
    #[serde(default, deserialize_with = "lenient")]
    pub loss: Option<f64>,
    /// Images evaluated.
    #[serde(default, deserialize_with = "lenient")]
    pub images: Option<usize>,
    /// Classes scored over.
    #[serde(default, deserialize_with = "lenient")]
    pub classes: Option<usize>,
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

/// `"data"` of a [`TrainReport`]: where the run's samples came from.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DataReport {
    /// `data.kind`.
    #[serde(default, deserialize_with = "lenient")]
    pub kind: Option<String>,
    /// `data.task`.
    #[serde(default, deserialize_with = "lenient")]
    pub task: Option<String>,
    /// `data.train`.
    #[serde(default, deserialize_with = "lenient")]
    pub train: Option<String>,
    /// `data.test`.
    #[serde(default, deserialize_with = "lenient")]
    pub test: Option<String>,
    /// `data.options` as JSON.
    #[serde(default)]
    pub options: Value,
}

/// `"checkpoints"` of a [`TrainReport`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CheckpointsReport {
    /// The best checkpoint's path.
    #[serde(default, deserialize_with = "lenient")]
    pub best: Option<String>,
    /// The last checkpoint's path.
    #[serde(default, deserialize_with = "lenient")]
    pub last: Option<String>,
}

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
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainReport {
    /// `run.name`.
    #[serde(default, deserialize_with = "lenient")]
    pub name: Option<String>,
    /// `backbone.kind`.
    #[serde(default, deserialize_with = "lenient")]
    pub backbone: Option<String>,
    /// `side.kind`.
    #[serde(default, deserialize_with = "lenient")]
    pub side: Option<String>,
    /// `head.kind`.
    #[serde(default, deserialize_with = "lenient")]
    pub head: Option<String>,
    /// Classes of the head.
    #[serde(default, deserialize_with = "lenient")]
    pub classes: Option<usize>,
    /// Top-1 accuracy on the test split.
    #[serde(default, deserialize_with = "lenient")]
    pub top1: Option<f64>,
    /// Top-5 accuracy on the test split.
    #[serde(default, deserialize_with = "lenient")]
    pub top5: Option<f64>,
    /// Mean cross-entropy on the test split.
    #[serde(default, deserialize_with = "lenient")]
    pub test_loss: Option<f64>,
    /// Images of the test split.
    #[serde(default, deserialize_with = "lenient")]
    pub test_images: Option<usize>,
    /// Classes the test split was scored over.
    #[serde(default, deserialize_with = "lenient")]
    pub test_classes: Option<usize>,
    /// The extra test sets by name.
    #[serde(default, deserialize_with = "lenient_map")]
    pub tests: Option<BTreeMap<String, TestSetReport>>,
    /// Best test top-1 during training (`null` with a validation split).
    #[serde(default, deserialize_with = "lenient")]
    pub best_top1: Option<f64>,
    /// Epoch of the best evaluation.
    #[serde(default, deserialize_with = "lenient")]
    pub best_epoch: Option<usize>,
    /// The split evaluated during training.
    #[serde(default, deserialize_with = "lenient")]
    pub eval_split: Option<String>,
    /// Best validation top-1 (`null` without a validation split).
    #[serde(default, deserialize_with = "lenient")]
    pub best_val_top1: Option<f64>,
    /// `best` or `last`: the checkpoint the test split was evaluated with.
    #[serde(default, deserialize_with = "lenient")]
    pub tested_checkpoint: Option<String>,
    /// Trained parameters (side network and head).
    #[serde(default, deserialize_with = "lenient")]
    pub trainable_params: Option<usize>,
    /// Parameters of the frozen backbone.
    #[serde(default, deserialize_with = "lenient")]
    pub backbone_params: Option<usize>,
    /// `schedule.epochs`.
    #[serde(default, deserialize_with = "lenient")]
    pub epochs: Option<usize>,
    /// Epochs completed.
    #[serde(default, deserialize_with = "lenient")]
    pub epochs_trained: Option<usize>,
    /// Optimizer steps taken.
    #[serde(default, deserialize_with = "lenient")]
    pub steps: Option<u64>,
    /// Wall-clock seconds of the run, over every resume.
    #[serde(default, deserialize_with = "lenient")]
    pub wall_s: Option<f64>,
    /// Training throughput in images per second.
    #[serde(default, deserialize_with = "lenient")]
    pub train_img_per_s: Option<f64>,
    /// The device the run trained on.
    #[serde(default, deserialize_with = "lenient")]
    pub device: Option<String>,
    /// The precision it trained at (`f32` or `bf16`: `run.precision` resolved).
    #[serde(default, deserialize_with = "lenient")]
    pub precision: Option<String>,
    /// Whether the training step replayed a recorded graph: `captured`, or why not (absent
    /// for the tape-based CPU path, which records none).
    #[serde(
        default,
        deserialize_with = "lenient",
        skip_serializing_if = "Option::is_none"
    )]
    pub graph: Option<String>,
    /// Peak resident memory of the process in MiB.
    #[serde(default, deserialize_with = "lenient")]
    pub peak_rss_mib: Option<f64>,
    /// Peak GPU memory in MiB (`null` on the CPU).
    #[serde(default, deserialize_with = "lenient")]
    pub gpu_mib: Option<f64>,
    /// The run folder.
    #[serde(default, deserialize_with = "lenient")]
    pub run_dir: Option<String>,
    /// The pipeline file the run started from.
    #[serde(default, deserialize_with = "lenient")]
    pub pipeline_file: Option<String>,
    /// Where the samples came from.
    #[serde(default, deserialize_with = "lenient")]
    pub data: Option<DataReport>,
    /// The checkpoint files.
    #[serde(default, deserialize_with = "lenient")]
    pub checkpoints: Option<CheckpointsReport>,
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

/// What `dtl eval` reports of a checkpoint.
///
/// ```
/// let r = dtl_runner::report::EvalReport::from_json(&serde_json::json!({"top1": 0.5, "images": 8}));
/// assert_eq!((r.top1, r.images), (Some(0.5), Some(8)));
/// ```
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    /// The checkpoint evaluated.
    #[serde(default, deserialize_with = "lenient")]
    pub checkpoint: Option<String>,
    /// The epoch the checkpoint was saved after, as stored.
    #[serde(default)]
    pub epoch: Value,
    /// Top-1 accuracy on the test split.
    #[serde(default, deserialize_with = "lenient")]
    pub top1: Option<f64>,
    /// Top-5 accuracy on the test split.
    #[serde(default, deserialize_with = "lenient")]
    pub top5: Option<f64>,
    /// Mean cross-entropy on the test split.
    #[serde(default, deserialize_with = "lenient")]
    pub test_loss: Option<f64>,
    /// Images evaluated.
    #[serde(default, deserialize_with = "lenient")]
    pub images: Option<usize>,
    /// Evaluation throughput in images per second.
    #[serde(default, deserialize_with = "lenient")]
    pub img_per_s: Option<f64>,
    /// The extra test sets by name.
    #[serde(default, deserialize_with = "lenient_map")]
    pub tests: Option<BTreeMap<String, TestSetReport>>,
    /// The device evaluated on.
    #[serde(default, deserialize_with = "lenient")]
    pub device: Option<String>,
    /// The precision it evaluated at (`f32` or `bf16`).
    #[serde(default, deserialize_with = "lenient")]
    pub precision: Option<String>,
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

/// One row of a [`BenchReport`]: one measurement at one batch size.
///
/// ```
/// let r: dtl_runner::report::BenchRow =
///     serde_json::from_str(r#"{"what": "train", "side": "dtl", "batch": 8, "img_per_s": 12.5}"#).unwrap();
/// assert_eq!((r.what.as_deref(), r.batch, r.peak_gpu_mib), (Some("train"), Some(8), None));
/// ```
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BenchRow {
    /// `train`, `forward` or `vjp`.
    #[serde(default, deserialize_with = "lenient")]
    pub what: Option<String>,
    /// The side network measured (`none` for the backbone alone).
    #[serde(default, deserialize_with = "lenient")]
    pub side: Option<String>,
    /// `recompute` or `store` (training rows).
    #[serde(
        default,
        deserialize_with = "lenient",
        skip_serializing_if = "Option::is_none"
    )]
    pub activations: Option<String>,
    /// Batch size.
    #[serde(default, deserialize_with = "lenient")]
    pub batch: Option<usize>,
    /// Throughput in images per second.
    #[serde(default, deserialize_with = "lenient")]
    pub img_per_s: Option<f64>,
    /// Peak resident memory of the process in MiB.
    #[serde(default, deserialize_with = "lenient")]
    pub peak_rss_mib: Option<f64>,
    /// Peak GPU memory in MiB (`null` on the CPU).
    #[serde(default, deserialize_with = "lenient")]
    pub peak_gpu_mib: Option<f64>,
    /// GPU memory the driver reports in use, in MiB (GPU rows only).
    #[serde(
        default,
        deserialize_with = "lenient",
        skip_serializing_if = "Option::is_none"
    )]
    pub gpu_driver_mib: Option<f64>,
    /// Trained parameters (training rows).
    #[serde(
        default,
        deserialize_with = "lenient",
        skip_serializing_if = "Option::is_none"
    )]
    pub trainable_params: Option<usize>,
    /// The precision of the device step (`f32` or `bf16`; device rows only).
    #[serde(
        default,
        deserialize_with = "lenient",
        skip_serializing_if = "Option::is_none"
    )]
    pub precision: Option<String>,
    /// Whether the timed training steps replayed a recorded graph: `captured`, or why not
    /// (device training rows only).
    #[serde(
        default,
        deserialize_with = "lenient",
        skip_serializing_if = "Option::is_none"
    )]
    pub graph: Option<String>,
}

/// What `dtl bench` reports: the backbone, the device and one row per measurement.
///
/// ```
/// let r = dtl_runner::report::BenchReport::from_json(&serde_json::json!(
///     {"backbone": "vit", "image_size": 32, "device": "cpu", "rows": [{"what": "forward"}]}));
/// assert_eq!((r.image_size, r.rows.len()), (Some(32), 1));
/// ```
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BenchReport {
    /// The backbone variant.
    #[serde(default, deserialize_with = "lenient")]
    pub backbone: Option<String>,
    /// Input image side.
    #[serde(default, deserialize_with = "lenient")]
    pub image_size: Option<usize>,
    /// The device measured on.
    #[serde(default, deserialize_with = "lenient")]
    pub device: Option<String>,
    /// The measurements.
    #[serde(default, deserialize_with = "lenient_rows")]
    pub rows: Vec<BenchRow>,
}

fn lenient_rows<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Vec<BenchRow>, D::Error> {
    let v = <Value as serde::Deserialize>::deserialize(d)?;
    Ok(v.as_array()
        .map(|a| {
            a.iter()
                .map(|r| serde_json::from_value(r.clone()).unwrap_or_default())
                .collect()
        })
        .unwrap_or_default())
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
