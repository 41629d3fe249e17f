//! Sweeps: many pipelines run one after another, resumable with `dtl run --skip-done`.
//!
//! A run directory is `<output_dir>/<name>`, or `<name>-2`, `<name>-3`, ... when an earlier
//! run took the name. [`find_previous`] looks at every one of them and says whether the run
//! asked for is already finished there (its `report.json` exists and its resolved
//! `pipeline.toml` equals the one asked for), was interrupted there (same pipeline, a
//! `last.safetensors` but no report), was interrupted before its first checkpoint (same
//! pipeline, neither), or has to start afresh.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::checkpoint::pipeline_changes;

/// What an earlier run of the same pipeline left behind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Previous {
    /// Finished in this directory: skip it.
    Done(PathBuf),
    /// Interrupted in this directory: resume from its `last.safetensors`.
    Interrupted(PathBuf),
    /// Interrupted in this directory before its first checkpoint: train afresh there (its
    /// `metrics.jsonl` holds nothing a new run keeps).
    Unstarted(PathBuf),
    /// Nothing to reuse.
    None,
}

/// The run directories of `name` under `output_dir` that exist: `<name>` and `<name>-<k>`,
/// sorted by `k` (the plain name first).
///
/// ```
/// let tmp = tempfile::tempdir().unwrap();
/// for d in ["a", "a-3", "a-2", "ab", "a-x"] {
///     std::fs::create_dir(tmp.path().join(d)).unwrap();
/// }
/// let dirs = dtl_runner::sweep::run_dirs(tmp.path(), "a");
/// let names: Vec<_> = dirs.iter().map(|d| d.file_name().unwrap().to_str().unwrap()).collect();
/// assert_eq!(names, ["a", "a-2", "a-3"]);
/// ```
pub fn run_dirs(output_dir: &Path, name: &str) -> Vec<PathBuf> {
    let mut found: Vec<(usize, PathBuf)> = Vec::new();
    let Ok(rd) = std::fs::read_dir(output_dir) else {
        return Vec::new();
    };
    for e in rd.filter_map(|e| e.ok()) {
        let p = e.path();
        if !p.is_dir() {
            continue;
        }
        let f = e.file_name().to_string_lossy().into_owned();
        let k = if f == name {
            Some(1)
        } else {
            f.strip_prefix(name)
                .and_then(|r| r.strip_prefix('-'))
                .and_then(|r| r.parse::<usize>().ok())
                .filter(|&k| k >= 2)
        };
        if let Some(k) = k {
            found.push((k, p));
        }
    }
    found.sort();
    found.into_iter().map(|(_, p)| p).collect()
}

/// Whether `report.json` in `dir` is a finished run's report (a JSON object with a top-1).
fn finished(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("report.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .is_some_and(|v| v["top1"].is_number())
}

/// What the earlier runs of the pipeline `resolved` (its resolved TOML, as `dtl run` writes
/// it into `pipeline.toml`) named `name` left under `output_dir`. A finished run wins over
/// an interrupted one; a directory whose pipeline differs in any key is never reused.
///
/// ```
/// use dtl_runner::sweep::{find_previous, Previous};
/// let tmp = tempfile::tempdir().unwrap();
/// let toml = "[optim]\nlr = 0.01\n";
/// assert_eq!(find_previous(tmp.path(), "a", toml), Previous::None);
/// let dir = tmp.path().join("a");
/// std::fs::create_dir(&dir).unwrap();
/// std::fs::write(dir.join("pipeline.toml"), toml).unwrap();
/// assert_eq!(find_previous(tmp.path(), "a", toml), Previous::Unstarted(dir.clone()));
/// std::fs::write(dir.join("last.safetensors"), b"").unwrap();
/// assert_eq!(find_previous(tmp.path(), "a", toml), Previous::Interrupted(dir.clone()));
/// std::fs::write(dir.join("report.json"), r#"{"top1": 0.5}"#).unwrap();
/// assert_eq!(find_previous(tmp.path(), "a", toml), Previous::Done(dir));
/// // Another learning rate is another run.
/// assert_eq!(find_previous(tmp.path(), "a", "[optim]\nlr = 0.02\n"), Previous::None);
/// ```
pub fn find_previous(output_dir: &Path, name: &str, resolved: &str) -> Previous {
    let mut interrupted = None;
    let mut unstarted = None;
    for dir in run_dirs(output_dir, name) {
        let Ok(stored) = std::fs::read_to_string(dir.join("pipeline.toml")) else {
            continue;
        };
        if stored.parse::<toml::Table>().is_err() || !pipeline_changes(&stored, resolved).is_empty()
        {
            continue;
        }
        if finished(&dir) {
            return Previous::Done(dir);
        }
        if dir.join("last.safetensors").is_file() {
            interrupted.get_or_insert(dir);
        } else {
            unstarted.get_or_insert(dir);
        }
    }
    match (interrupted, unstarted) {
        (Some(d), _) => Previous::Interrupted(d),
        (None, Some(d)) => Previous::Unstarted(d),
        (None, None) => Previous::None,
    }
}

/// The sweep's progress: run `k` of `n`, what is done and skipped, and an estimate of the
/// time left from the mean duration of the runs trained so far.
///
/// ```
/// use std::time::Duration;
/// let mut p = dtl_runner::sweep::Progress::new(4);
/// p.skipped();
/// p.trained(Duration::from_secs(60));
/// assert_eq!(
///     p.line(3, "c.toml", Duration::from_secs(61)),
///     "sweep: run 3 of 4 (c.toml); 1 trained, 1 skipped, elapsed 1m01s, ETA 2m00s"
/// );
/// ```
#[derive(Debug, Clone)]
pub struct Progress {
    total: usize,
    trained: usize,
    skipped: usize,
    train_time: Duration,
}

/// `1h02m03s`, `4m05s` or `6s`.
///
/// ```
/// use std::time::Duration;
/// assert_eq!(dtl_runner::sweep::hms(Duration::from_secs(3723)), "1h02m03s");
/// assert_eq!(dtl_runner::sweep::hms(Duration::from_secs(6)), "6s");
/// ```
pub fn hms(d: Duration) -> String {
    let s = d.as_secs();
    let (h, m, s) = (s / 3600, (s / 60) % 60, s % 60);
    if h > 0 {
        format!("{h}h{m:02}m{s:02}s")
    } else if m > 0 {
        format!("{m}m{s:02}s")
    } else {
        format!("{s}s")
    }
}

impl Progress {
    /// A sweep of `total` runs.
    pub fn new(total: usize) -> Self {
        Progress {
            total,
            trained: 0,
            skipped: 0,
            train_time: Duration::ZERO,
        }
    }

    /// Counts one run skipped as done.
    pub fn skipped(&mut self) {
        self.skipped += 1;
    }

    /// Counts one run trained in `took`.
    pub fn trained(&mut self, took: Duration) {
        self.trained += 1;
        self.train_time += took;
    }

    /// The line shown before run `k` (1-based) of the sweep, `elapsed` after its start.
    /// The estimate assumes every run left (this one included) takes the mean time of the
    /// runs trained so far; it is `?` before the first one finishes.
    pub fn line(&self, k: usize, what: &str, elapsed: Duration) -> String {
        let left = self.total + 1 - k.min(self.total);
        let eta = if self.trained == 0 {
            "?".to_string()
        } else {
            hms(self.train_time / self.trained as u32 * left as u32)
        };
        format!(
            "sweep: run {k} of {} ({what}); {} trained, {} skipped, elapsed {}, ETA {eta}",
            self.total,
            self.trained,
            self.skipped,
            hms(elapsed)
        )
    }
}
