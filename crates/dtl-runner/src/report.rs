//! What a person reads after (and during) a run: `metrics.jsonl`, `report.md`,
//! `report.json` and `curves.svg`, plus the process's memory figures.

use std::io::Write;
use std::path::{Path, PathBuf};

use dtl_core::{DtlError, Result};
use plotters::prelude::*;
use serde_json::Value;

/// Appends one JSON object per line to `metrics.jsonl`.
///
/// Step lines: `{"kind":"step","epoch","step","loss","lr","img_per_s","time_s"}`; epoch
/// lines: `{"kind":"epoch","epoch","train_loss","lr","top1","top5","test_loss","wall_s"}`.
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
                _ => true,
            })
            .map(|v| v.to_string() + "\n")
            .collect();
        let path = run_dir.join("metrics.jsonl");
        std::fs::write(&path, kept.concat()).map_err(|e| DtlError::io(&path, e))
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
    std::fs::write(&json_path, text + "\n").map_err(|e| DtlError::io(&json_path, e))?;
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
    std::fs::write(&md_path, md).map_err(|e| DtlError::io(&md_path, e))
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
    let err = |e: String| DtlError::file(path, format!("cannot draw the plot: {e}"));
    let root = SVGBackend::new(path, (900, 400)).into_drawing_area();
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
