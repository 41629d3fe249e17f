//! Parity of the device training step ([`dtl_runner::resident`]) with the PyTorch reference
//! fixtures, for any device of the kernel set and any backbone written over it: logits, loss,
//! every gradient and six AdamW steps of the DTL and DTL+ fixtures. Every setting is read from
//! the fixture's json.

#![allow(dead_code)]

use std::sync::Arc;

use dtl_core::PipelineConfig;
use dtl_kernels::{KernelBackbone, Kernels};
use dtl_runner::model::smoothed_targets;
use dtl_runner::resident::ResidentModel;
use dtl_vit::VitOn;

#[path = "../parity_common/mod.rs"]
mod parity_common;
pub use parity_common::{fixtures, read, read_fixture, rel_err};

/// The fixture's pipeline: its side network, head and optimizer settings.
pub fn pipeline(cfg: &serde_json::Value) -> PipelineConfig {
    pipeline_with(cfg, "recompute")
}

/// [`pipeline`] with `run.activations = activations` (`"recompute"` or `"store"`).
pub fn pipeline_with(cfg: &serde_json::Value, activations: &str) -> PipelineConfig {
    pipeline_for(cfg, activations, "vit_test_patch8_32")
}

/// The fixture's pipeline on backbone `kind`, with `run.activations = activations`.
pub fn pipeline_for(cfg: &serde_json::Value, activations: &str, kind: &str) -> PipelineConfig {
    let d = &cfg["dtl"];
    let a = &cfg["adamw"];
    let list = |v: &serde_json::Value| {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let kernel = d["fusion_kernel"].as_u64().unwrap();
    let betas = a["betas"].as_array().unwrap();
    let text = format!(
        "[run]\nactivations = \"{activations}\"\n\
         [backbone]\nkind = \"{kind}\"\n\
         [side]\nkind = \"{}\"\nrank = {}\nbeta = {}\ntaps = [{}]\ninjects = [{}]\nkernel = {kernel}\n\
         [head]\nclasses = {}\npool = \"{}\"\n\
         [data]\nkind = \"image-folder\"\nroot = \".\"\nbatch_size = {}\n\
         [optim]\nlr = {}\nbetas = [{}, {}]\neps = {}\nweight_decay = {}\n",
        if kernel > 0 { "dtl+" } else { "dtl" },
        d["rank"],
        d["beta"].as_f64().unwrap(),
        list(&d["taps"]),
        list(&d["injects"]),
        d["classes"],
        // the backbone section: `vit` or `swin`
        match ["vit", "swin"]
            .iter()
            .find_map(|b| cfg[b]["global_pool"].as_str())
            .unwrap()
        {
            "avg" => "mean",
            "token" => "cls",
            other => panic!("fixture pooling `{other}`"),
        },
        d["batch"],
        a["lr"].as_f64().unwrap(),
        betas[0].as_f64().unwrap(),
        betas[1].as_f64().unwrap(),
        a["eps"].as_f64().unwrap(),
        a["weight_decay"].as_f64().unwrap(),
    );
    PipelineConfig::from_str(&text, "fixture.toml".as_ref(), &[]).unwrap()
}

/// One fixture on device `k`: the model with the fixture's initial values, its images,
/// targets and expected values.
pub struct Case<K: Kernels + Clone, B: KernelBackbone<K> = VitOn<K>> {
    pub model: ResidentModel<K, B>,
    pub fx: std::collections::HashMap<String, (Vec<usize>, Vec<f64>)>,
    pub cfg: serde_json::Value,
    pub images: Vec<f32>,
    pub n: usize,
    pub targets: Vec<f32>,
}

pub fn setup<K: Kernels + Clone>(name: &str, k: K) -> Case<K> {
    setup_with(name, k, "recompute")
}

/// [`setup`] with `run.activations = activations`.
pub fn setup_with<K: Kernels + Clone>(name: &str, k: K, activations: &str) -> Case<K> {
    use dtl_vit::variants::VitTestPatch8_32;
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join(format!("{name}.json"))).unwrap(),
    )
    .unwrap();
    let fx = read(&format!("{name}_dtl.safetensors"));
    let vit = dtl_vit::load::<VitTestPatch8_32>(
        &fixtures().join(format!("{name}_vit.safetensors")),
        "auto",
    )
    .unwrap();
    let spec = dtl_core::Backbone::<dfdx::prelude::Cpu>::spec(&vit).clone();
    parity_common::check_geometry(&cfg, &spec);
    let on = VitOn::upload(&k, &spec, vit.weights()).unwrap();
    let p = pipeline_with(&cfg, activations);
    case_from(p, cfg, fx, k, on)
}

/// The fixture's case on `backbone`: the model of pipeline `p` with the fixture's initial
/// values, its input, labels and expected values.
pub fn case_from<K: Kernels + Clone, B: KernelBackbone<K>>(
    p: PipelineConfig,
    cfg: serde_json::Value,
    fx: std::collections::HashMap<String, (Vec<usize>, Vec<f64>)>,
    k: K,
    backbone: B,
) -> Case<K, B> {
    let classes = cfg["dtl"]["classes"].as_u64().unwrap() as usize;
    let mut model = ResidentModel::from_config(&p, k, Arc::new(backbone), classes).unwrap();
    let init: Vec<Vec<f32>> = model
        .params()
        .iter()
        .map(|q| {
            let (shape, v) = &fx[&format!("init.{}", q.name)];
            assert_eq!(shape, &q.shape, "{}", q.name);
            v.iter().map(|&x| x as f32).collect()
        })
        .collect();
    model.set_params(&init).unwrap();
    let (shape, input) = &fx["input"];
    let n = shape[0];
    let images: Vec<f32> = input.iter().map(|&x| x as f32).collect();
    let labels: Vec<usize> = fx["labels"].1.iter().map(|&l| l as usize).collect();
    let targets = smoothed_targets(&labels, classes, 0.0);
    Case {
        model,
        fx,
        cfg,
        images,
        n,
        targets,
    }
}

/// Logits, loss and every gradient of one step agree with the fixture within `tol` relative.
pub fn forward_and_grads<K: Kernels + Clone, B: KernelBackbone<K>>(
    name: &str,
    mut case: Case<K, B>,
    tol: f64,
) {
    let n = case.n;
    case.model
        .forward_backward(&case.images, n, &case.targets, &[])
        .unwrap();
    let logits = case.model.read_logits(n).unwrap();
    let e = rel_err(&logits, &case.fx["logits"].1);
    assert!(e < tol, "{name}: logits differ by {e:e} relative");
    let loss = case.model.read_loss().unwrap() as f64;
    let want = case.fx["loss"].1[0];
    assert!(
        ((loss - want) / want).abs() < tol,
        "{name}: loss {loss} vs {want}"
    );
    let grads = case.model.read_grads().unwrap();
    assert_eq!(
        grads.len(),
        case.fx.keys().filter(|k| k.starts_with("grad.")).count()
    );
    for (p, g) in case.model.params().iter().zip(&grads) {
        let e = rel_err(g, &case.fx[&format!("grad.{}", p.name)].1);
        assert!(
            e < tol,
            "{name}: gradient of {} differs by {e:e} relative",
            p.name
        );
    }
    let eval = case.model.forward_eval(&case.images, n).unwrap();
    let e = rel_err(&eval, &case.fx["logits"].1);
    assert!(
        e < tol,
        "{name}: evaluation logits differ by {e:e} relative"
    );
}

/// Six AdamW steps follow the fixture's losses and end at its parameters within `tol`.
pub fn adamw_trajectory<K: Kernels + Clone, B: KernelBackbone<K>>(
    name: &str,
    mut case: Case<K, B>,
    tol: f64,
) {
    let lr = case.cfg["adamw"]["lr"].as_f64().unwrap();
    let want = case.fx["train_losses"].1.clone();
    let n = case.n;
    for (i, &w) in want.iter().enumerate() {
        case.model
            .train_step(&case.images, n, &case.targets, &[], lr, None)
            .unwrap();
        let loss = case.model.read_loss().unwrap() as f64;
        assert!(
            ((loss - w) / w).abs() < tol,
            "{name}: loss before step {i}: {loss} vs {w}"
        );
    }
    for (p, v) in case
        .model
        .params()
        .iter()
        .zip(case.model.host_params().unwrap())
    {
        let e = rel_err(&v.value.as_vec(), &case.fx[&format!("final.{}", p.name)].1);
        assert!(
            e < tol,
            "{name}: {} after {} steps differs by {e:e} relative",
            p.name,
            want.len()
        );
    }
}

/// Trains two epochs of a small DTL+ pipeline on generated data with the device step on `k`,
/// then evaluates its last checkpoint on `k` and on the tape-based CPU path: both give the
/// accuracy the run reported. Returns the report (`report.json`).
pub fn train_then_evaluate_on_the_cpu<K: Kernels + Clone>(k: K) -> serde_json::Value {
    cross_device_run(k, 2, 24, 12)
}

/// [`train_then_evaluate_on_the_cpu`] for `epochs` epochs of `train` generated images in
/// batches of 4 (drop path 0.1, clipping on), evaluated on `test` images; returns
/// `report.json` as the run wrote it.
pub fn cross_device_run<K: Kernels + Clone>(
    k: K,
    epochs: usize,
    train: usize,
    test: usize,
) -> serde_json::Value {
    use dfdx::prelude::Cpu;
    use dtl_core::{BuildContext, Job, RunEnv};
    use dtl_runner::data::SyntheticData;
    use dtl_runner::resident::ResidentSource;
    use dtl_runner::{DtlJob, Trainer};
    use dtl_vit::variants::VitTestPatch8_32;
    let text = format!(
        "[run]\nname = \"cross\"\nseed = 5\n[backbone]\nkind = \"vit_test_patch8_32\"\ndrop_path = 0.1\n\
         [side]\nkind = \"dtl+\"\ntaps = \"0-3\"\ninjects = \"2-3\"\n\
         [data]\nkind = \"synthetic\"\nroot = \".\"\nbatch_size = 4\n\
         [optim]\nlr = 0.02\nclip_grad = 5.0\n[schedule]\nepochs = {epochs}\nwarmup_epochs = {}\n",
        usize::from(epochs > 1)
    );
    let cfg = PipelineConfig::from_str(&text, "cross.toml".as_ref(), &[]).unwrap();
    let cx = BuildContext {
        pipeline_file: "cross.toml".into(),
    };
    let data = || Box::new(SyntheticData::new(3, 32, train, test, 4, 7));
    let vit = || dtl_vit::random::<VitTestPatch8_32>(9).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let env = RunEnv {
        run_dir: dir.path().to_path_buf(),
        progress: false,
        resume: None,
    };
    let device_job = || {
        let v = vit();
        let spec = dtl_core::Backbone::<Cpu>::spec(&v).clone();
        let on = VitOn::upload(&k, &spec, v.weights()).unwrap();
        Trainer::with_source(&cfg, &cx, ResidentSource::new(k.clone(), on)).with_data(data())
    };
    device_job().train(&env).unwrap();
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("report.json")).unwrap())
            .unwrap();
    let last = dir.path().join("last.safetensors");
    let on_device = device_job().evaluate(&env, &last).unwrap();
    let on_cpu = DtlJob::new(&cfg, &cx, vit(), Cpu::default())
        .with_data(data())
        .evaluate(&env, &last)
        .unwrap();
    assert_eq!(on_device["top1"], report["top1"], "{on_device} vs {report}");
    assert_eq!(on_cpu["top1"], report["top1"], "{on_cpu} vs {report}");
    report
}

/// Trains the fixture's case on batches of `sizes` images (the first images of its batch)
/// with drop path `rate`, and returns every parameter and the loss of every step.
pub fn train_on_sizes<K: Kernels + Clone, B: KernelBackbone<K>>(
    case: &mut Case<K, B>,
    sizes: &[usize],
    rate: f64,
) -> (Vec<Vec<f32>>, Vec<f32>) {
    let lr = case.cfg["adamw"]["lr"].as_f64().unwrap();
    train_with_lr(case, sizes, rate, |_| lr)
}

/// [`train_on_sizes`] with a learning rate that changes every step: a linear warm-up over
/// three steps to the fixture's rate, then a cosine decay, as the trainer's schedule does.
pub fn train_scheduled<K: Kernels + Clone, B: KernelBackbone<K>>(
    case: &mut Case<K, B>,
    sizes: &[usize],
    rate: f64,
) -> (Vec<Vec<f32>>, Vec<f32>) {
    let base = case.cfg["adamw"]["lr"].as_f64().unwrap();
    let steps = sizes.len() as f64;
    train_with_lr(case, sizes, rate, |step| {
        let t = step as f64;
        if step < 3 {
            base * (t + 1.0) / 3.0
        } else {
            base * 0.5 * (1.0 + (std::f64::consts::PI * (t - 2.0) / steps).cos())
        }
    })
}

/// Trains `case` on batches of `sizes` images with drop path at `rate`, clipping to norm 1 and
/// the learning rate `lr(step)`; returns the parameters and the loss of every step.
fn train_with_lr<K: Kernels + Clone, B: KernelBackbone<K>>(
    case: &mut Case<K, B>,
    sizes: &[usize],
    rate: f64,
    lr: impl Fn(usize) -> f64,
) -> (Vec<Vec<f32>>, Vec<f32>) {
    let per_image = case.images.len() / case.n;
    let classes = case.model.classes();
    let depth = case.model.backbone().spec().depth;
    let mut losses = Vec::new();
    for (step, &m) in sizes.iter().enumerate() {
        let drops = dtl_runner::step::drop_masks(rate, depth, m, 3, step as u64);
        case.model
            .train_step(
                &case.images[..m * per_image],
                m,
                &case.targets[..m * classes],
                &drops,
                lr(step),
                Some(1.0),
            )
            .unwrap();
        losses.push(case.model.read_loss().unwrap());
    }
    let params = case
        .model
        .host_params()
        .unwrap()
        .iter()
        .map(|p| p.value.as_vec())
        .collect();
    (params, losses)
}

/// Cosine similarity of `got` and `want` (1 when both are zero, 0 when only one is).
pub fn cosine(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    let dot: f64 = got.iter().zip(want).map(|(&g, &w)| g as f64 * w).sum();
    let ng = got.iter().map(|&g| (g as f64).powi(2)).sum::<f64>().sqrt();
    let nw = want.iter().map(|&w| w * w).sum::<f64>().sqrt();
    match (ng == 0.0, nw == 0.0) {
        (true, true) => 1.0,
        (true, false) | (false, true) => 0.0,
        _ => dot / (ng * nw),
    }
}

/// The fixture's AdamW steps at a reduced precision: the first step's logits and loss within
/// `tol` relative and every gradient at cosine similarity `cos` or more to the reference's,
/// then the loss before each of the fixture's steps within `steps_tol` relative. One pass
/// serves both checks (the first training step is the step the gradients are checked on).
pub fn reduced_precision_trajectory<K: Kernels + Clone, B: KernelBackbone<K>>(
    name: &str,
    mut case: Case<K, B>,
    tol: f64,
    cos: f64,
    steps_tol: f64,
) {
    let lr = case.cfg["adamw"]["lr"].as_f64().unwrap();
    let want = case.fx["train_losses"].1.clone();
    let n = case.n;
    let mut got = Vec::new();
    for i in 0..want.len() {
        case.model
            .train_step(&case.images, n, &case.targets, &[], lr, None)
            .unwrap();
        got.push(case.model.read_loss().unwrap() as f64);
        if i > 0 {
            continue;
        }
        let loss = got[0];
        assert!(
            ((loss - want[0]) / want[0]).abs() < tol,
            "{name}: loss {loss} vs {}",
            want[0]
        );
        let logits = case.model.read_logits(n).unwrap();
        let e = rel_err(&logits, &case.fx["logits"].1);
        assert!(e < tol, "{name}: logits differ by {e:e} relative");
        let grads = case.model.read_grads().unwrap();
        for (p, g) in case.model.params().iter().zip(&grads) {
            let c = cosine(g, &case.fx[&format!("grad.{}", p.name)].1);
            assert!(
                c >= cos,
                "{name}: gradient of {} has cosine similarity {c:.6} to the reference",
                p.name
            );
        }
    }
    let worst = got
        .iter()
        .zip(&want)
        .map(|(g, w)| ((g - w) / w).abs())
        .fold(0.0, f64::max);
    eprintln!("{name}: losses {got:?}, reference {want:?}, worst {worst:.2e} relative");
    assert!(
        worst < steps_tol,
        "{name}: losses {got:?} vs {want:?}: {worst:.2e} relative"
    );
}

/// The Swin fixture `name` of `fixtures/swin-reference` on device `k` (its Swin uploaded
/// there), with `run.activations = activations`.
pub fn swin_setup<K: Kernels + Clone>(
    name: &str,
    activations: &str,
    k: K,
) -> Case<K, dtl_swin::SwinOn<K>> {
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/swin-reference");
    let variant = "swin_test_patch2_window4_32";
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join(format!("{name}.json"))).unwrap())
            .unwrap();
    let sc = dtl_swin::variant(variant).unwrap();
    assert_eq!(
        cfg["swin"]["embed_dim"].as_u64().unwrap() as usize,
        sc.embed_dim,
        "{name}: the fixture's Swin is not `{variant}`"
    );
    let weights =
        dtl_swin::load_weights(&sc, &dir.join(format!("{name}_swin.safetensors")), "auto").unwrap();
    let swin = dtl_swin::SwinOn::upload(&k, &sc, &weights).unwrap();
    let fx = read_fixture(&dir, &format!("{name}_dtl.safetensors"));
    let p = pipeline_for(&cfg, activations, variant);
    case_from(p, cfg, fx, k, swin)
}
