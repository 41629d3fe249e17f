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
