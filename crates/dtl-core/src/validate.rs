//! The checks of a parsed pipeline's meaning against the registry: every component named
//! exists, every number is in range, block indices fit the backbone, the sizes fit the caps
//! and (where the class count is known) the memory of a step. Re-exported from
//! [`crate::config`], where the schema lives.

use std::path::Path;

use crate::config::{ClassSubset, DeviceSpec, PipelineConfig, Pool, Precision};
use crate::registry::Registry;
use crate::DtlError;

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
            "bf16 needs a CUDA device; use \"auto\" or \"f32\" on the CPU".into(),
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
