//! Parity with the PyTorch reference fixtures, for any training device: logits, loss,
//! gradients and the AdamW trajectory of the DTL and DTL+ fixtures.

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use dfdx::prelude::*;
use dtl_core::{Backbone, Head};
use dtl_runner::device::TrainDevice;
use dtl_runner::model::{smoothed_targets, Model};
use dtl_runner::optim::AdamW;
use dtl_runner::sides::{DtlSide, LinearHead};
use dtl_runner::step::loss_and_grads;
use dtl_vit::variants::VitTestPatch8_32;

#[path = "../common/mod.rs"]
mod common;
pub use common::{read_fixture, rel_err};

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/dtl-reference")
}

/// Every tensor of a fixture as (shape, f64 values).
pub fn read(name: &str) -> HashMap<String, (Vec<usize>, Vec<f64>)> {
    read_fixture(&fixtures(), name)
}

/// The reference ViT of the fixtures.
pub type RefVit = dtl_vit::VitOf<VitTestPatch8_32>;

/// The fixture's `vit` section describes the geometry `spec` (the compiled variant).
pub fn check_geometry(cfg: &serde_json::Value, spec: &dtl_core::BackboneSpec) {
    let v = &cfg["vit"];
    let n = |k: &str| v[k].as_u64().unwrap() as usize;
    assert_eq!(
        (n("img_size"), n("patch_size"), n("in_chans")),
        (spec.image_size, spec.patch_size, spec.in_chans)
    );
    assert_eq!(
        (n("embed_dim"), n("depth"), n("num_heads")),
        (spec.width, spec.depth, spec.heads)
    );
    let ratio = v["mlp_ratio"].as_f64().unwrap();
    assert_eq!((spec.width as f64 * ratio) as usize, spec.mlp_hidden);
    assert_eq!(v["class_token"].as_bool().unwrap(), spec.prefix_tokens == 1);
    assert!(
        !v["fc_norm"].as_bool().unwrap(),
        "the fixtures norm before pooling"
    );
}

/// One fixture's model (with the fixture's initial values) and its expected values.
pub struct Case<B: Backbone<D>, D: TrainDevice> {
    pub model: Model<B, D>,
    pub fx: HashMap<String, (Vec<usize>, Vec<f64>)>,
    pub cfg: serde_json::Value,
    pub dev: D,
}

/// Loads fixture `name` onto `dev`; `backbone` turns the CPU reference ViT into the backbone
/// for `dev`.
pub fn setup<B: Backbone<D>, D: TrainDevice>(
    name: &str,
    dev: D,
    backbone: impl FnOnce(RefVit) -> B,
) -> Case<B, D> {
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
    check_geometry(&cfg, &spec);
    let d = &cfg["dtl"];
    let ints = |k: &str| {
        d[k].as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect::<Vec<_>>()
    };
    let (taps, injects) = (ints("taps"), ints("injects"));
    let kernel = d["fusion_kernel"].as_u64().unwrap() as usize;
    let rank = d["rank"].as_u64().unwrap() as usize;
    let init = |name: &str| {
        let (shape, v) = &fx[&format!("init.{name}")];
        (
            shape.clone(),
            v.iter().map(|&x| x as f32).collect::<Vec<f32>>(),
        )
    };
    let values = DtlSide::<D>::shapes(&spec, rank, &taps, &injects, kernel)
        .unwrap()
        .iter()
        .map(|(name, _)| init(name))
        .collect();
    let side = DtlSide::from_params(
        &spec,
        rank,
        d["beta"].as_f64().unwrap(),
        taps,
        injects,
        kernel,
        values,
        &dev,
    )
    .unwrap();
    let head = LinearHead::from_params(init("head.weight"), init("head.bias"), &dev).unwrap();
    assert_eq!(
        head.classes(),
        d["classes"].as_u64().unwrap() as usize,
        "the fixture's head has `dtl.classes` outputs"
    );
    let cls_pool = match cfg["vit"]["global_pool"].as_str().unwrap() {
        "avg" => false,
        "token" => true,
        other => panic!("fixture pooling `{other}`"),
    };
    let model = Model::new(
        Arc::new(backbone(vit)),
        Box::new(side),
        Box::new(head),
        cls_pool,
    );
    Case {
        model,
        fx,
        cfg,
        dev,
    }
}

fn batch<B: Backbone<D>, D: TrainDevice>(case: &Case<B, D>) -> (dtl_core::Images<D>, Vec<f32>) {
    let (shape, input) = &case.fx["input"];
    let images = case.dev.tensor_from_vec(
        input.iter().map(|&x| x as f32).collect(),
        (shape[0], Const::<3>, shape[2], shape[3]),
    );
    let labels: Vec<usize> = case.fx["labels"].1.iter().map(|&l| l as usize).collect();
    assert_eq!(shape[0] as u64, case.cfg["dtl"]["batch"].as_u64().unwrap());
    (
        images,
        smoothed_targets(&labels, case.model.head.classes(), 0.0),
    )
}

/// Logits, loss and every gradient of one step agree with the fixture within `tol` relative.
pub fn forward_and_grads<B: Backbone<D>, D: TrainDevice>(name: &str, case: Case<B, D>, tol: f64) {
    let (images, targets) = batch(&case);
    let out = loss_and_grads(&case.model, &images, &targets, &[]).unwrap();
    let e = rel_err(&out.logits, &case.fx["logits"].1);
    assert!(e < tol, "{name}: logits differ by {e:e} relative");
    let want_loss = case.fx["loss"].1[0];
    assert!(
        ((out.loss as f64 - want_loss) / want_loss).abs() < tol,
        "{name}: loss {} vs {want_loss}",
        out.loss
    );
    let names: Vec<String> = case.model.params().iter().map(|p| p.name.clone()).collect();
    assert_eq!(
        names.len(),
        case.fx.keys().filter(|k| k.starts_with("grad.")).count()
    );
    for (n, g) in names.iter().zip(&out.host_grads()) {
        let e = rel_err(g, &case.fx[&format!("grad.{n}")].1);
        assert!(e < tol, "{name}: gradient of {n} differs by {e:e} relative");
    }
    // evaluation path gives the same logits
    let eval = case.model.forward_eval(&images).unwrap().as_vec();
    assert!(rel_err(&eval, &case.fx["logits"].1) < tol);
}

/// Six AdamW steps follow the fixture's losses and end at its parameters within `tol`.
pub fn adamw_trajectory<B: Backbone<D>, D: TrainDevice>(
    name: &str,
    mut case: Case<B, D>,
    tol: f64,
) {
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
        &case.dev,
    );
    let lr = a["lr"].as_f64().unwrap();
    let want = &case.fx["train_losses"].1;
    assert_eq!(want.len() as u64, a["steps"].as_u64().unwrap());
    assert_eq!(a["no_decay"], "names ending in .bias");
    for (i, &w) in want.iter().enumerate() {
        let loss = dtl_runner::step::train_step(
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
            ((loss as f64 - w) / w).abs() < tol,
            "{name}: loss before step {i}: {loss} vs {w}"
        );
    }
    for p in case.model.params() {
        let e = rel_err(&p.value.as_vec(), &case.fx[&format!("final.{}", p.name)].1);
        assert!(
            e < tol,
            "{name}: {} after {} steps differs by {e:e} relative",
            p.name,
            want.len()
        );
    }
}
