//! What `dtl validate` and `dtl run` both check before anything trains, so that whatever
//! `dtl run` refuses before training, `dtl validate` refuses with the same line.
//!
//! Past the schema and the meaning of each key ([`dtl_core::config::validate`]): the data is
//! opened (every list line, label and option checked, nothing decoded), every label is
//! checked against the head, the memory of a step is estimated with the dataset's class
//! count, and settings that make training meaningless are reported as warnings.

use std::path::Path;

use dtl_core::{BackboneSpec, DtlError, PipelineConfig, Result};

/// What the checks learnt about a pipeline's data.
pub struct Checked {
    /// The data files read, for fingerprints.
    pub sources: Vec<std::path::PathBuf>,
}

/// An error of the data crate as an error of `file`: `key: message` becomes a key error.
fn in_file(file: &Path, e: DtlError) -> DtlError {
    let msg = e.to_string();
    if let Some((key, rest)) = msg.split_once(": ") {
        let is_key =
            key.starts_with("data.") || key.starts_with("augment.") || key.starts_with("head.");
        if is_key && !key.contains(' ') && !key.contains('/') {
            return DtlError::config(file, key, None, rest);
        }
    }
    DtlError::file(file, msg)
}

/// Opens the pipeline's data and checks labels and memory; see the module docs.
pub fn check(cfg: &PipelineConfig, spec: &BackboneSpec, file: &Path) -> Result<Checked> {
    let data = dtl_data::DataPipeline::new(cfg, spec.image_size).map_err(|e| in_file(file, e))?;
    let classes = cfg.classes(data.num_classes());
    match cfg.head.classes {
        Some(c) => data
            .check_labels(c, "head.classes")
            .map_err(|e| in_file(file, e))?,
        // With head.classes set, dtl_core::config::validate has estimated the memory already.
        None => {
            if classes > dtl_core::limits::MAX_CLASSES {
                return Err(DtlError::config(
                    file,
                    "head.classes",
                    None,
                    format!(
                        "the dataset has {classes} classes, more than the {} a head may have",
                        dtl_core::limits::MAX_CLASSES
                    ),
                ));
            }
            dtl_core::limits::check_memory(cfg, spec, classes, file)?
        }
    }
    if cfg.eval.test_classes.is_some() || !cfg.eval.tests.is_empty() {
        dtl_runner::job::check_test_sets(cfg, spec.image_size, classes)
            .map_err(|e| DtlError::file(file, e.to_string()))?;
    }
    Ok(Checked {
        sources: data.sources(),
    })
}

/// Settings that are valid but make training meaningless, one line each (`file: key `k`: ...`).
pub fn warnings(cfg: &PipelineConfig, spec: &BackboneSpec, file: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut warn = |key: &str, m: String| out.push(format!("{}: key `{key}`: {m}", file.display()));
    let s = &cfg.schedule;
    if s.kind == "cosine" && s.min_lr > cfg.optim.lr {
        warn(
            "schedule.min_lr",
            format!(
                "{} is above optim.lr = {}: the cosine rises instead of decaying",
                s.min_lr, cfg.optim.lr
            ),
        );
    }
    if s.warmup_epochs > 0 && s.warmup_epochs >= s.epochs {
        warn(
            "schedule.warmup_epochs",
            format!(
                "{} warm-up epochs of {} epochs: training ends before the rate reaches optim.lr",
                s.warmup_epochs, s.epochs
            ),
        );
    }
    if s.warmup_epochs > 0 && s.warmup_lr > cfg.optim.lr {
        warn(
            "schedule.warmup_lr",
            format!(
                "{} is above optim.lr = {}: the warm-up descends",
                s.warmup_lr, cfg.optim.lr
            ),
        );
    }
    if let Some(m) = dtl_core::config::stage_tap_warning(cfg, spec) {
        warn("side.taps", m);
    } else if cfg.side.taps_blocks() && !spec.is_hierarchical() {
        let taps = cfg.side.tap_blocks(spec.depth);
        let injects = cfg.side.inject_blocks(spec.depth);
        if let Some(&last) = injects.iter().max() {
            let unread: Vec<String> = taps
                .iter()
                .filter(|&&t| t > last)
                .map(|t| t.to_string())
                .collect();
            if !unread.is_empty() {
                warn(
                    "side.taps",
                    format!(
                        "block(s) {} are tapped after the last inject block {last}: no inject ever reads them, so their maps never train",
                        unread.join(", ")
                    ),
                );
            }
        }
    }
    if cfg.eval.every > s.epochs {
        warn(
            "eval.every",
            format!(
                "{} is more than schedule.epochs = {}: only the last epoch is evaluated",
                cfg.eval.every, s.epochs
            ),
        );
    }
    out
}

/// Refuses benchmark batch sizes that are absurd or cannot fit in memory.
pub fn bench_batches(
    cfg: &PipelineConfig,
    spec: &BackboneSpec,
    batches: &[usize],
    file: &Path,
) -> Result<()> {
    for &b in batches {
        if b > dtl_core::limits::MAX_BATCH {
            return Err(DtlError::argument(format!(
                "--batch {b}: more than the largest batch, {}",
                dtl_core::limits::MAX_BATCH
            )));
        }
        let mut c = cfg.clone();
        c.data.batch_size = b;
        c.data.eval_batch_size = Some(b);
        let classes = cfg.head.classes.unwrap_or(1000);
        dtl_core::limits::check_memory(&c, spec, classes, file)
            .map_err(|e| DtlError::argument(format!("--batch {b}: {e}")))?;
    }
    Ok(())
}

/// For `dtl eval`: the checkpoint's own pipeline must be the run directory's `pipeline.toml`
/// (else the refusal lists the keys that differ), and the inputs it was trained on are
/// compared with the files as they are now (each change is printed as a warning).
pub fn eval_target(
    pipeline: &Path,
    checkpoint: &Path,
    cfg: &PipelineConfig,
    sources: &[std::path::PathBuf],
) -> Result<()> {
    let path = dtl_runner::checkpoint::resolve(checkpoint, false)?;
    let ck = dtl_runner::checkpoint::load(&path)?;
    if !ck.pipeline.is_empty() {
        let text = dtl_data::text::read(pipeline)?;
        let changes = dtl_runner::checkpoint::pipeline_changes(&ck.pipeline, &text);
        if !changes.is_empty() {
            return Err(DtlError::file(
                pipeline,
                format!(
                    "disagrees with the pipeline stored in {}: {}; restore the run's pipeline.toml, or give the changes as overrides to `dtl eval`",
                    path.display(),
                    changes.join(", ")
                ),
            ));
        }
    }
    let now = dtl_runner::inputs::fingerprint(cfg.backbone.weights.as_deref(), sources);
    let changed = dtl_runner::inputs::changes(&ck.state["inputs"], &now);
    if !changed.is_empty() {
        eprintln!(
            "warning: {} was trained on inputs that have changed since:",
            path.display()
        );
        for c in &changed {
            eprintln!("  {c}");
        }
    }
    Ok(())
}

/// Locks `dir` for this run ([`dtl_runner::lock::RunLock`]) and removes the temporary files
/// an interrupted write left there.
pub fn enter_run_dir(dir: &Path) -> Result<dtl_runner::lock::RunLock> {
    let lock = dtl_runner::lock::RunLock::acquire(dir)?;
    for p in dtl_runner::lock::remove_partial_files(dir)? {
        eprintln!(
            "notice: removed {}, left by an interrupted write",
            p.display()
        );
    }
    Ok(lock)
}

/// After a new run failed: removes its directory when nothing worth keeping is in it (no
/// checkpoint, no metric line), so a failure before training leaves no empty run behind.
pub fn tidy_failed(dir: &Path) {
    let has_checkpoint =
        dir.join("last.safetensors").exists() || dir.join("best.safetensors").exists();
    let has_metrics = std::fs::metadata(dir.join("metrics.jsonl")).is_ok_and(|m| m.len() > 0);
    if !has_checkpoint && !has_metrics {
        let _ = std::fs::remove_dir_all(dir);
    }
}
