//! Throughput and peak memory of training steps on synthetic batches.

use std::sync::Arc;
use std::time::Instant;

use dfdx::prelude::*;
use dtl_core::{Backbone, BenchOptions, DtlError, PipelineConfig, Result};
use serde_json::{json, Value};

use crate::job::{build_model, drop_masks, train_step};
use crate::model::smoothed_targets;
use crate::optim::AdamW;
use crate::report;

/// Side networks measured by `train`: the pipeline's own settings with each kind.
const KINDS: [&str; 3] = ["dtl", "dtl+", "linear"];

fn measure(
    warmup: usize,
    steps: usize,
    batch: usize,
    mut f: impl FnMut() -> Result<()>,
) -> Result<(f64, Option<f64>)> {
    for _ in 0..warmup {
        f()?;
    }
    report::reset_peak_rss();
    let t = Instant::now();
    for _ in 0..steps.max(1) {
        f()?;
    }
    let secs = t.elapsed().as_secs_f64();
    Ok(((steps.max(1) * batch) as f64 / secs, report::peak_rss_mib()))
}

/// A naive all-traced training step for comparison: dfdx's own autodiff through a
/// post-norm transformer encoder of the same width, heads, MLP width, depth and token
/// count (every activation and every weight gradient kept, as autodiff does), on random
/// input, loss = mean of the output.
fn naive_autodiff<const M: usize, const H: usize, const F: usize, const L: usize>(
    tokens: usize,
    batch: usize,
    warmup: usize,
    steps: usize,
) -> Result<(f64, Option<f64>)> {
    use dfdx::nn::{BuildOnDevice, Module, ZeroGrads};
    let dev = Cpu::seed_from_u64(0);
    let enc = dfdx::nn::builders::TransformerEncoder::<M, H, F, L>::try_build_on_device(&dev)
        .map_err(crate::ops::dev_err)?;
    let x: Tensor<(usize, usize, Const<M>), f32, Cpu> =
        dev.sample_normal_like(&(batch, tokens, Const));
    measure(warmup, steps, batch, || {
        let grads = enc.try_alloc_grads().map_err(crate::ops::dev_err)?;
        let y = enc
            .try_forward(x.trace(grads))
            .map_err(crate::ops::dev_err)?;
        let g = y.mean().backward();
        drop(g);
        Ok(())
    })
}

/// The naive comparison for the geometries it is instantiated for (ViT-Ti, ViT-S, ViT-B).
fn naive_for(
    spec: &dtl_core::BackboneSpec,
    batch: usize,
    warmup: usize,
    steps: usize,
) -> Result<Option<(f64, Option<f64>)>> {
    let t = spec.tokens();
    Ok(
        match (spec.width, spec.heads, spec.mlp_hidden, spec.depth) {
            (192, 3, 768, 12) => Some(naive_autodiff::<192, 3, 768, 12>(t, batch, warmup, steps)?),
            (384, 6, 1536, 12) => {
                Some(naive_autodiff::<384, 6, 1536, 12>(t, batch, warmup, steps)?)
            }
            (768, 12, 3072, 12) => Some(naive_autodiff::<768, 12, 3072, 12>(
                t, batch, warmup, steps,
            )?),
            _ => None,
        },
    )
}

/// Runs the benchmark described by `opts` (`what`: `train`, `forward`, `vjp`) and returns
/// one JSON row per measurement: `what`, `side`, `batch`, `img_per_s`, `peak_rss_mib`.
///
/// `train` measures a full step (forward, backward, AdamW) of `dtl`, `dtl+` and `linear`
/// with the pipeline's side settings, then, for ViT-Ti/S/B geometries, a naive all-traced
/// step (`side = "naive-autodiff"`, see `naive_autodiff`). Peak memory is the process's peak
/// resident set size during the timed steps (reset before each measurement).
pub fn run<B: Backbone<Cpu>>(
    cfg: &PipelineConfig,
    backbone: &Arc<B>,
    opts: &BenchOptions,
) -> Result<Value> {
    let spec = backbone.spec().clone();
    let s = spec.image_size;
    let classes = cfg.head.classes.unwrap_or(10);
    let dev = Cpu::seed_from_u64(cfg.run.seed);
    let mut rows = Vec::new();
    for what in &opts.what {
        if !["train", "forward", "vjp"].contains(&what.as_str()) {
            return Err(DtlError::invalid(format!(
                "bench: `{what}` is not a measurement; use train, forward or vjp"
            )));
        }
    }
    for &batch in &opts.batches {
        if batch == 0 {
            return Err(DtlError::invalid("bench: batch sizes must be at least 1"));
        }
        let images: dtl_core::Images<Cpu> = dev.sample_normal_like(&(batch, Const::<3>, s, s));
        let labels: Vec<usize> = (0..batch).map(|i| i % classes).collect();
        let targets = smoothed_targets(&labels, classes, 0.0);
        for what in &opts.what {
            match what.as_str() {
                "train" => {
                    for kind in KINDS {
                        let mut c = cfg.clone();
                        c.side.kind = kind.to_string();
                        if kind == "dtl" {
                            c.side.kernel = Some(0);
                        } else if kind == "dtl+" && c.side.kernel_size() == 0 {
                            c.side.kernel = Some(3);
                        }
                        let mut model = build_model(&c, backbone, classes)?;
                        let names: Vec<(String, usize)> = model
                            .params()
                            .iter()
                            .map(|p| (p.name.clone(), p.numel()))
                            .collect();
                        let mut opt = AdamW::from_config(&c.optim, &names);
                        let mut step = 0u64;
                        let (ips, peak) = measure(opts.warmup, opts.steps, batch, || {
                            let drops = drop_masks(
                                c.backbone.drop_path,
                                spec.depth,
                                batch,
                                c.run.seed,
                                step,
                            );
                            step += 1;
                            train_step(
                                &mut model, &mut opt, &images, &targets, &drops, c.optim.lr, None,
                            )
                            .map(|_| ())
                        })?;
                        rows.push(json!({"what": "train", "side": kind, "batch": batch, "img_per_s": ips, "peak_rss_mib": peak,
                                         "trainable_params": model.trainable_params()}));
                    }
                    if let Some((ips, peak)) = naive_for(&spec, batch, opts.warmup, opts.steps)? {
                        rows.push(json!({"what": "train", "side": "naive-autodiff", "batch": batch, "img_per_s": ips, "peak_rss_mib": peak}));
                    }
                }
                "forward" => {
                    let (ips, peak) = measure(opts.warmup, opts.steps, batch, || {
                        let mut x = backbone.embed(&images)?;
                        for i in 0..spec.depth {
                            x = backbone.block_forward(i, &x, None)?;
                        }
                        Ok(())
                    })?;
                    rows.push(json!({"what": "forward", "side": "none", "batch": batch, "img_per_s": ips, "peak_rss_mib": peak}));
                }
                _ => {
                    let x0 = backbone.embed(&images)?;
                    let (ips, peak) = measure(opts.warmup, opts.steps, batch, || {
                        let mut x = x0.clone();
                        let mut inputs = Vec::with_capacity(spec.depth);
                        for i in 0..spec.depth {
                            inputs.push(x.clone());
                            x = backbone.block_forward(i, &x, None)?;
                        }
                        let mut g = x;
                        for i in (0..spec.depth).rev() {
                            g = backbone.block_vjp(i, &inputs[i], &g, None)?;
                        }
                        Ok(())
                    })?;
                    rows.push(json!({"what": "vjp", "side": "none", "batch": batch, "img_per_s": ips, "peak_rss_mib": peak}));
                }
            }
        }
    }
    Ok(json!({"backbone": spec.name, "image_size": s, "rows": rows}))
}
