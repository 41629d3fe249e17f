//! Parity of the DTL and DTL+ side networks, head, loss, gradients, AdamW trajectory and
//! learning-rate schedule with the PyTorch reference fixtures.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use dfdx::prelude::*;
use dtl_core::Parameters;
use dtl_runner::job::loss_and_grads;
use dtl_runner::model::{smoothed_targets, Model};
use dtl_runner::optim::{AdamW, Schedule};
use dtl_runner::sides::{DtlSide, LinearHead};
use dtl_vit::variants::VitTestPatch8_32;
use safetensors::tensor::{Dtype, SafeTensors};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/dtl-reference")
}

/// Every tensor of a fixture as (shape, f64 values).
fn read(name: &str) -> HashMap<String, (Vec<usize>, Vec<f64>)> {
    let raw = std::fs::read(fixtures().join(name)).unwrap();
    let st = SafeTensors::deserialize(&raw).unwrap();
    let mut out = HashMap::new();
    for (n, t) in st.tensors() {
        let d = t.data();
        let v: Vec<f64> = match t.dtype() {
            Dtype::F32 => d
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()) as f64)
                .collect(),
            Dtype::F64 => d
                .chunks_exact(8)
                .map(|b| f64::from_le_bytes(b.try_into().unwrap()))
                .collect(),
            Dtype::I64 => d
                .chunks_exact(8)
                .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as f64)
                .collect(),
            other => panic!("unexpected dtype {other:?} of {n}"),
        };
        out.insert(n, (t.shape().to_vec(), v));
    }
    out
}

fn rel_err(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0f64, |a, &b| a.max(b.abs())).max(1e-12);
    got.iter()
        .zip(want)
        .map(|(&g, &w)| (g as f64 - w).abs())
        .fold(0.0, f64::max)
        / scale
}

struct Case {
    model: Model<dtl_vit::VitOf<VitTestPatch8_32>>,
    fx: HashMap<String, (Vec<usize>, Vec<f64>)>,
    cfg: serde_json::Value,
}

fn setup(name: &str) -> Case {
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
    let spec = dtl_core::Backbone::<Cpu>::spec(&vit).clone();
    let ints = |k: &str| {
        cfg["dtl"][k]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect::<Vec<_>>()
    };
    let dev = Cpu::seed_from_u64(0);
    let kernel = cfg["dtl"]["fusion_kernel"].as_u64().unwrap() as usize;
    let mut side =
        DtlSide::new(&spec, 2, 100.0, ints("taps"), ints("injects"), kernel, &dev).unwrap();
    let classes = cfg["dtl"]["classes"].as_u64().unwrap() as usize;
    let mut head = LinearHead::new(spec.width, classes, &dev).unwrap();
    for p in side.params_mut().into_iter().chain(head.params_mut()) {
        let (shape, v) = &fx[&format!("init.{}", p.name)];
        assert_eq!(shape, &p.shape, "{}", p.name);
        p.value
            .copy_from(&v.iter().map(|&x| x as f32).collect::<Vec<_>>());
    }
    let model = Model::new(Arc::new(vit), Box::new(side), Box::new(head), false);
    Case { model, fx, cfg }
}

fn batch(case: &Case) -> (dtl_core::Images<Cpu>, Vec<f32>) {
    let (shape, input) = &case.fx["input"];
    let images = Cpu::default().tensor_from_vec(
        input.iter().map(|&x| x as f32).collect(),
        (shape[0], Const::<3>, shape[2], shape[3]),
    );
    let labels: Vec<usize> = case.fx["labels"].1.iter().map(|&l| l as usize).collect();
    (
        images,
        smoothed_targets(&labels, case.model.head.classes(), 0.0),
    )
}

fn forward_and_grads(name: &str) {
    let case = setup(name);
    let (images, targets) = batch(&case);
    let out = loss_and_grads(&case.model, &images, &targets, &[]).unwrap();
    let e = rel_err(&out.logits, &case.fx["logits"].1);
    assert!(e < 1e-4, "{name}: logits differ by {e:e} relative");
    let want_loss = case.fx["loss"].1[0];
    assert!(
        ((out.loss as f64 - want_loss) / want_loss).abs() < 1e-4,
        "{name}: loss {} vs {want_loss}",
        out.loss
    );
    let names: Vec<String> = case.model.params().iter().map(|p| p.name.clone()).collect();
    assert_eq!(
        names.len(),
        case.fx.keys().filter(|k| k.starts_with("grad.")).count()
    );
    for (n, g) in names.iter().zip(&out.grads) {
        let e = rel_err(g, &case.fx[&format!("grad.{n}")].1);
        assert!(
            e < 1e-4,
            "{name}: gradient of {n} differs by {e:e} relative"
        );
    }
    // evaluation path gives the same logits
    let eval = case.model.forward_eval(&images).unwrap().as_vec();
    assert!(rel_err(&eval, &case.fx["logits"].1) < 1e-4);
}

fn adamw_trajectory(name: &str) {
    let mut case = setup(name);
    let (images, targets) = batch(&case);
    let a = &case.cfg["adamw"];
    let names: Vec<(String, usize)> = case
        .model
        .params()
        .iter()
        .map(|p| (p.name.clone(), p.numel()))
        .collect();
    let layout = names
        .iter()
        .map(|(n, k)| (*k, !n.ends_with(".bias")))
        .collect();
    let betas = a["betas"].as_array().unwrap();
    let mut opt = AdamW::new(
        betas[0].as_f64().unwrap(),
        betas[1].as_f64().unwrap(),
        a["eps"].as_f64().unwrap(),
        a["weight_decay"].as_f64().unwrap(),
        layout,
    );
    let lr = a["lr"].as_f64().unwrap();
    let want = &case.fx["train_losses"].1;
    for (i, &w) in want.iter().enumerate() {
        let loss = dtl_runner::job::train_step(
            &mut case.model,
            &mut opt,
            &images,
            &targets,
            &[],
            lr,
            None,
        )
        .unwrap();
        assert!(
            ((loss as f64 - w) / w).abs() < 1e-4,
            "{name}: loss before step {i}: {loss} vs {w}"
        );
    }
    for p in case.model.params() {
        let e = rel_err(&p.value.as_vec(), &case.fx[&format!("final.{}", p.name)].1);
        assert!(
            e < 1e-4,
            "{name}: {} after {} steps differs by {e:e} relative",
            p.name,
            want.len()
        );
    }
}

#[test]
fn dtl_logits_loss_and_gradients_match_reference() {
    forward_and_grads("dtl");
}

#[test]
fn dtlplus_logits_loss_and_gradients_match_reference() {
    forward_and_grads("dtlplus");
}

#[test]
fn dtl_adamw_trajectory_matches_reference() {
    adamw_trajectory("dtl");
}

#[test]
fn dtlplus_adamw_trajectory_matches_reference() {
    adamw_trajectory("dtlplus");
}

#[test]
fn cosine_schedule_matches_reference() {
    let v: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("cosine_schedule.json")).unwrap(),
    )
    .unwrap();
    let cfg = dtl_core::config::ScheduleConfig {
        kind: "cosine".into(),
        epochs: v["epochs"].as_u64().unwrap() as usize,
        t_initial: Some(v["t_initial"].as_u64().unwrap() as usize),
        warmup_epochs: v["warmup_t"].as_u64().unwrap() as usize,
        warmup_lr: v["warmup_lr_init"].as_f64().unwrap(),
        min_lr: v["lr_min"].as_f64().unwrap(),
        cycle_decay: v["cycle_decay"].as_f64().unwrap(),
        per: "epoch".into(),
    };
    let s = Schedule::new(&cfg, v["base_lr"].as_f64().unwrap(), 7);
    let want = v["lr_per_epoch"].as_array().unwrap();
    assert_eq!(want.len(), 110);
    for (e, w) in want.iter().enumerate() {
        let w = w.as_f64().unwrap();
        for step in [0, 3, 6] {
            let got = s.lr(e, step);
            assert!(((got - w) / w).abs() < 1e-9, "epoch {e}: {got} vs {w}");
        }
    }
}
