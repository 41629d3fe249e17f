//! The device training step on a Swin backbone against the PyTorch reference fixtures
//! (`fixtures/swin-reference`, the official DTL Swin loop on timm's Swin): logits, loss,
//! every gradient and six AdamW steps of DTL and DTL+, within 1e-4 of each tensor's largest
//! entry, on the CPU's kernels. Every setting (rank, beta, taps, injects, kernel, AdamW) is
//! read from the fixture's json. The parameters no gradient reaches (a stage's taps with no
//! inject after them, the convs of stages without injects) must end exactly where they began.
//! With the `cuda` feature the same checks run on `cuda:0` when there is one.

mod resident_common;

use std::collections::HashMap;
use std::path::PathBuf;

use dtl_kernels::{CpuKernels, Kernels};
use dtl_swin::SwinOn;
use resident_common::{adamw_trajectory, case_from, forward_and_grads, pipeline_for, Case};

const VARIANT: &str = "swin_test_patch2_window4_32";
const TOL: f64 = 1e-4;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/swin-reference")
}

/// Every tensor of a fixture file as (shape, f64 values).
fn read(name: &str) -> HashMap<String, (Vec<usize>, Vec<f64>)> {
    resident_common::read_fixture(&dir(), name)
}

fn json(name: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir().join(format!("{name}.json"))).unwrap())
        .unwrap()
}

/// The fixture's Swin (its geometry checked against the variant's) and model on the CPU's
/// kernels.
fn setup(name: &str, activations: &str) -> Case<CpuKernels, SwinOn<CpuKernels>> {
    setup_on(name, activations, CpuKernels::new(), |sc, w| {
        SwinOn::from_weights(sc, w).unwrap()
    })
}

/// [`setup`] on device `k`, the weights placed there by `place`.
fn setup_on<K: Kernels + Clone>(
    name: &str,
    activations: &str,
    k: K,
    place: impl FnOnce(&dtl_swin::SwinConfig, dtl_swin::SwinWeights) -> SwinOn<K>,
) -> Case<K, SwinOn<K>> {
    let cfg = json(name);
    let sc = dtl_swin::variant(VARIANT).unwrap();
    let s = &cfg["swin"];
    let depths: Vec<usize> = s["depths"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect();
    assert_eq!(
        (
            sc.image_size,
            sc.patch_size,
            sc.embed_dim,
            &sc.depths,
            sc.window
        ),
        (
            s["img_size"].as_u64().unwrap() as usize,
            s["patch_size"].as_u64().unwrap() as usize,
            s["embed_dim"].as_u64().unwrap() as usize,
            &depths,
            s["window_size"].as_u64().unwrap() as usize
        ),
        "{name}: the fixture's Swin is not `{VARIANT}`"
    );
    let weights =
        dtl_swin::load_weights(&sc, &dir().join(format!("{name}_swin.safetensors")), "auto")
            .unwrap();
    let swin = place(&sc, weights);
    let fx = read(&format!("{name}_dtl.safetensors"));
    let p = pipeline_for(&cfg, activations, VARIANT);
    case_from(p, cfg, fx, k, swin)
}

/// The trainable tensors in the fixture's order (taps' maps, one conv per stage, the head)
/// with its shapes, and the unused ones at their initial values with zero gradients.
fn layout_and_unused(name: &str) {
    let mut case = setup(name, "recompute");
    let cfg = &case.cfg;
    let d = &cfg["dtl"];
    let mut want: Vec<String> = Vec::new();
    for t in d["taps"].as_array().unwrap() {
        want.push(format!("side.{t}.a"));
        want.push(format!("side.{t}.b"));
    }
    if d["fusion_kernel"].as_u64().unwrap() > 0 {
        for s in 0..cfg["geometry"].as_array().unwrap().len() {
            want.push(format!("fusion.{s}.weight"));
        }
    }
    want.extend(["head.weight".to_string(), "head.bias".to_string()]);
    let got: Vec<String> = case.model.params().iter().map(|p| p.name.clone()).collect();
    assert_eq!(got, want, "{name}");
    for p in case.model.params() {
        let shape: Vec<usize> = cfg["trainable"][&p.name]
            .as_array()
            .unwrap_or_else(|| panic!("{name}: `{}` is not in the fixture", p.name))
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(p.shape, shape, "{name}: {}", p.name);
    }
    let unused: Vec<&str> = cfg["unused_params"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(
        !unused.is_empty(),
        "{name}: the fixture lists no unused parameter"
    );
    let lr = cfg["adamw"]["lr"].as_f64().unwrap();
    let n = case.n;
    for _ in 0..cfg["train_losses"].as_array().unwrap().len() {
        case.model
            .train_step(&case.images, n, &case.targets, &[], lr, None)
            .unwrap();
    }
    let grads = case.model.read_grads().unwrap();
    let values = case.model.host_params().unwrap();
    for ((p, g), v) in case.model.params().iter().zip(&grads).zip(&values) {
        if !unused.contains(&p.name.as_str()) {
            continue;
        }
        let init: Vec<f32> = case.fx[&format!("init.{}", p.name)]
            .1
            .iter()
            .map(|&x| x as f32)
            .collect();
        assert_eq!(v.value.as_vec(), init, "{name}: unused {} moved", p.name);
        assert!(
            g.iter().all(|&x| x == 0.0),
            "{name}: unused {} has a gradient",
            p.name
        );
        let fin: Vec<f32> = case.fx[&format!("final.{}", p.name)]
            .1
            .iter()
            .map(|&x| x as f32)
            .collect();
        assert_eq!(fin, init, "{name}: the fixture moved {}", p.name);
    }
}

#[test]
fn swin_dtl_step_matches_reference() {
    forward_and_grads("swin_dtl", setup("swin_dtl", "recompute"), TOL);
}

#[test]
fn swin_dtlplus_step_matches_reference() {
    forward_and_grads("swin_dtlplus", setup("swin_dtlplus", "recompute"), TOL);
}

#[test]
fn swin_dtl_adamw_matches_reference() {
    adamw_trajectory("swin_dtl", setup("swin_dtl", "recompute"), TOL);
}

#[test]
fn swin_dtlplus_adamw_matches_reference() {
    adamw_trajectory("swin_dtlplus", setup("swin_dtlplus", "recompute"), TOL);
}

#[test]
fn swin_dtlplus_adamw_storing_activations_matches_reference() {
    adamw_trajectory("swin_dtlplus", setup("swin_dtlplus", "store"), TOL);
}

#[test]
fn swin_dtl_unused_params_stay_at_their_initial_values() {
    layout_and_unused("swin_dtl");
}

#[test]
fn swin_dtlplus_unused_params_stay_at_their_initial_values() {
    layout_and_unused("swin_dtlplus");
}

#[cfg(feature = "cuda")]
#[path = "cuda_common/mod.rs"]
mod cuda_common;

/// The same fixtures on `cuda:0` when one can be opened (the host emulation of the device
/// code is too slow for a Swin step).
#[cfg(feature = "cuda")]
mod on_cuda {
    use super::*;

    fn check<K: Kernels + Clone>(k: &K, name: &str) {
        let place = |sc: &dtl_swin::SwinConfig, w: dtl_swin::SwinWeights| {
            SwinOn::upload(k, sc, &w).unwrap()
        };
        forward_and_grads(name, setup_on(name, "recompute", k.clone(), place), TOL);
        adamw_trajectory(name, setup_on(name, "recompute", k.clone(), place), TOL);
    }

    #[test]
    fn swin_steps_and_adamw_match_reference_on_the_gpu() {
        if let Some(g) = cuda_common::gpu() {
            for name in ["swin_dtl", "swin_dtlplus"] {
                check(g, name);
            }
        }
    }
}
