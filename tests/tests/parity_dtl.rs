//! Parity of the DTL and DTL+ side networks, head, loss, gradients, AdamW trajectory and
//! learning-rate schedule with the PyTorch reference fixtures, on the CPU.

mod parity_common;

use dfdx::prelude::*;
use dtl_runner::optim::Schedule;
use parity_common::{adamw_trajectory, fixtures, forward_and_grads, setup};

fn case(name: &str) -> parity_common::Case<parity_common::RefVit, Cpu> {
    setup(name, Cpu::default(), |vit| vit)
}

#[test]
fn dtl_logits_loss_and_gradients_match_reference() {
    forward_and_grads("dtl", case("dtl"), 1e-4);
}

#[test]
fn dtlplus_logits_loss_and_gradients_match_reference() {
    forward_and_grads("dtlplus", case("dtlplus"), 1e-4);
}

#[test]
fn dtl_adamw_trajectory_matches_reference() {
    adamw_trajectory("dtl", case("dtl"), 1e-4);
}

#[test]
fn dtlplus_adamw_trajectory_matches_reference() {
    adamw_trajectory("dtlplus", case("dtlplus"), 1e-4);
}

#[test]
fn cosine_schedule_matches_reference() {
    let v: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("cosine_schedule.json")).unwrap(),
    )
    .unwrap();
    let cfg = dtl_core::config::ScheduleConfig {
        kind: "cosine".parse().unwrap(),
        epochs: v["epochs"].as_u64().unwrap() as usize,
        t_initial: Some(v["t_initial"].as_u64().unwrap() as usize),
        warmup_epochs: v["warmup_t"].as_u64().unwrap() as usize,
        warmup_lr: v["warmup_lr_init"].as_f64().unwrap(),
        min_lr: v["lr_min"].as_f64().unwrap(),
        cycle_decay: v["cycle_decay"].as_f64().unwrap(),
        per: "epoch".parse().unwrap(),
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

/// The fixture's side network and head through a dtl checkpoint: `from_safetensors` reads the
/// settings from the stored pipeline and gives the fixture's logits; a tensor of the wrong
/// shape or a missing one is an error naming it.
#[test]
fn checkpoint_gives_back_the_side_network_and_head() {
    use dtl_core::Parameters;
    use dtl_runner::checkpoint::save;
    use dtl_runner::model::Model;
    use dtl_runner::sides::from_safetensors;
    let c = case("dtlplus");
    let d = &c.cfg["dtl"];
    let list = |k: &str| {
        let v: Vec<String> = d[k]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.to_string())
            .collect();
        v.join(", ")
    };
    let pipeline = format!(
        "[backbone]\nkind = \"vit_test_patch8_32\"\n\
         [side]\nkind = \"dtl+\"\nrank = {}\nbeta = {}\ntaps = [{}]\ninjects = [{}]\nkernel = {}\n\
         [head]\nclasses = {}\n[data]\nkind = \"image-folder\"\nroot = \".\"\n",
        d["rank"],
        d["beta"].as_f64().unwrap(),
        list("taps"),
        list("injects"),
        d["fusion_kernel"],
        d["classes"],
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("last.safetensors");
    let state = serde_json::json!({});
    save(&path, &c.model.params(), None, &pipeline, &state).unwrap();
    let spec = dtl_core::Backbone::<Cpu>::spec(c.model.backbone.as_ref()).clone();
    let (side, head) = from_safetensors(&path, &spec, &Cpu::default()).unwrap();
    let names: Vec<String> = side
        .params()
        .iter()
        .chain(head.params().iter())
        .map(|p| p.name.clone())
        .collect();
    let want: Vec<String> = c.model.params().iter().map(|p| p.name.clone()).collect();
    assert_eq!(names, want);
    let model = Model::new(
        c.model.backbone.clone(),
        Box::new(side),
        Box::new(head),
        c.model.cls_pool,
    );
    let (shape, input) = &c.fx["input"];
    let images = c.dev.tensor_from_vec(
        input.iter().map(|&x| x as f32).collect(),
        (shape[0], Const::<3>, shape[2], shape[3]),
    );
    let logits = model.forward_eval(&images).unwrap().as_vec();
    let e = parity_common::rel_err(&logits, &c.fx["logits"].1);
    assert!(e < 1e-4, "logits from the checkpoint differ by {e:e}");

    // head.weight of width 47: both shapes in the message
    let mut params: Vec<dtl_core::Param<Cpu>> = c.model.params().into_iter().cloned().collect();
    let w = params.iter_mut().find(|p| p.name == "head.weight").unwrap();
    let classes = w.shape[0];
    *w = dtl_core::Param::zeros(&c.dev, "head.weight", &[classes, 47]);
    let refs: Vec<&dtl_core::Param<Cpu>> = params.iter().collect();
    save(&path, &refs, None, &pipeline, &state).unwrap();
    let e = from_safetensors(&path, &spec, &Cpu::default())
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("head.weight") && e.contains("[5, 47]") && e.contains("48"),
        "{e}"
    );

    // no fusion conv: the missing tensor is named
    let refs: Vec<&dtl_core::Param<Cpu>> = c
        .model
        .params()
        .into_iter()
        .filter(|p| p.name != "fusion.weight")
        .collect();
    save(&path, &refs, None, &pipeline, &state).unwrap();
    let e = from_safetensors(&path, &spec, &Cpu::default())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("`fusion.weight` is missing"), "{e}");
}
