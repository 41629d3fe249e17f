//! The device training step on the CUDA device against the PyTorch reference fixtures, in f32
//! with TF32 off, at the CPU's tolerance (1e-4): logits, loss, every gradient and six AdamW
//! steps of DTL and DTL+, and a checkpoint trained on the device evaluated on the CPU.
//!
//! Each check runs on every device present (see `cuda_common`): `cuda:0`, and the host
//! emulation of the same device code.

#![cfg(feature = "cuda")]

#[path = "cuda_common/mod.rs"]
mod cuda_common;
mod resident_common;

use cuda_common::{emulator, gpu};
use resident_common::{adamw_trajectory, forward_and_grads, setup};

/// A `#[test]` running `$body` with `$k` bound to each device present.
macro_rules! on_devices {
    ($name:ident, $k:ident => $body:expr) => {
        #[test]
        fn $name() {
            if let Some(g) = gpu() {
                let $k = g.clone();
                $body;
            }
            if let Some(e) = emulator() {
                let $k = e.clone();
                $body;
            }
        }
    };
}

on_devices!(dtl_step_matches_reference, k => forward_and_grads("dtl", setup("dtl", k), 1e-4));
on_devices!(dtlplus_step_matches_reference, k => forward_and_grads("dtlplus", setup("dtlplus", k), 1e-4));
on_devices!(dtl_adamw_matches_reference, k => adamw_trajectory("dtl", setup("dtl", k), 1e-4));
on_devices!(dtlplus_adamw_matches_reference, k => adamw_trajectory("dtlplus", setup("dtlplus", k), 1e-4));

#[test]
fn a_checkpoint_trained_on_the_gpu_evaluates_the_same_on_the_cpu() {
    // Two epochs of training: on the GPU only (the emulator is too slow for a run).
    if let Some(g) = gpu() {
        let r = resident_common::train_then_evaluate_on_the_cpu(g.clone());
        assert!(r["top1"].as_f64().unwrap() > 0.5, "{r}");
    }
}
