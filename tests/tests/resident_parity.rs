//! The device training step, run on the CPU's kernels, against the PyTorch reference
//! fixtures at 1e-4: the same algorithm a GPU runs, with the CPU as its device.

mod resident_common;

use dtl_kernels::CpuKernels;
use resident_common::{adamw_trajectory, forward_and_grads, setup, setup_with};

#[test]
fn dtl_step_on_cpu_kernels_matches_reference() {
    forward_and_grads("dtl", setup("dtl", CpuKernels::new()), 1e-4);
}

#[test]
fn dtlplus_step_on_cpu_kernels_matches_reference() {
    forward_and_grads("dtlplus", setup("dtlplus", CpuKernels::new()), 1e-4);
}

#[test]
fn dtl_adamw_on_cpu_kernels_matches_reference() {
    adamw_trajectory("dtl", setup("dtl", CpuKernels::new()), 1e-4);
}

#[test]
fn dtlplus_adamw_on_cpu_kernels_matches_reference() {
    adamw_trajectory("dtlplus", setup("dtlplus", CpuKernels::new()), 1e-4);
}

// `run.activations = "store"`: the blocks after the first inject keep their internals from the
// forward pass and their VJPs recompute nothing; the same reference at the same tolerance.

#[test]
fn dtl_step_storing_activations_matches_reference() {
    forward_and_grads("dtl", setup_with("dtl", CpuKernels::new(), "store"), 1e-4);
}

#[test]
fn dtlplus_step_storing_activations_matches_reference() {
    forward_and_grads(
        "dtlplus",
        setup_with("dtlplus", CpuKernels::new(), "store"),
        1e-4,
    );
}

#[test]
fn dtl_adamw_storing_activations_matches_reference() {
    adamw_trajectory("dtl", setup_with("dtl", CpuKernels::new(), "store"), 1e-4);
}

#[test]
fn dtlplus_adamw_storing_activations_matches_reference() {
    adamw_trajectory(
        "dtlplus",
        setup_with("dtlplus", CpuKernels::new(), "store"),
        1e-4,
    );
}
