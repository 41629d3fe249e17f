//! The device training step on the CUDA device against the PyTorch reference fixtures, in f32
//! with TF32 off, at the CPU's tolerance (1e-4): logits, loss, every gradient and six AdamW
//! steps of DTL and DTL+, and a checkpoint trained on the device evaluated on the CPU.
//!
//! Each check runs on every device present (see `resident_common/devices.rs`): `cuda:0`, and
//! the host emulation of the same device code, each test on a device of its own. The six AdamW
//! steps record the step as a graph on the second and replay it on the others; the recorded
//! step (forward, backward, clipping and AdamW in one graph) trains exactly as the plain one,
//! also under a learning rate that changes every step.

#![cfg(feature = "cuda")]

mod resident_common;
#[path = "resident_common/devices.rs"]
#[macro_use]
mod devices;

use dtl_core::choice::Precision;
use dtl_kernels::Kernels;
use dtl_runner::resident::GraphStatus;
use resident_common::{
    adamw_trajectory, forward_and_grads, setup, train_on_sizes, train_scheduled,
};

on_devices!(Precision::F32, dtl_step_matches_reference, k => forward_and_grads("dtl", setup("dtl", k), 1e-4));
on_devices!(Precision::F32, dtlplus_step_matches_reference, k => forward_and_grads("dtlplus", setup("dtlplus", k), 1e-4));
on_devices!(Precision::F32, dtl_adamw_matches_reference, k => adamw_trajectory("dtl", setup("dtl", k), 1e-4));
on_devices!(Precision::F32, dtlplus_adamw_matches_reference, k => adamw_trajectory("dtlplus", setup("dtlplus", k), 1e-4));

#[test]
fn a_checkpoint_trained_on_the_gpu_evaluates_the_same_on_the_cpu() {
    // Two epochs of training: on the GPU only (the emulator is too slow for a run).
    if let Some((_one_at_a_time, g)) = devices::gpu(Precision::F32) {
        let r = resident_common::train_then_evaluate_on_the_cpu(g);
        assert!(r["top1"].as_f64().unwrap() > 0.5, "{r}");
        assert_eq!(r["precision"], "f32", "{r}");
        assert_eq!(r["graph"], "captured", "{r}");
    }
}

// f32 with graphs: the recorded step replayed trains to exactly the parameters of plain steps
// (full batches of 3 with drop path and clipping, a partial batch of 2 in between).
on_devices!(Precision::F32, the_recorded_f32_step_trains_exactly_as_the_plain_one, k => {
    let sizes = [3, 3, 2, 3];
    let mut graphed = setup("dtl", k.clone());
    let (p_graph, l_graph) = train_on_sizes(&mut graphed, &sizes, 0.2);
    assert_eq!(graphed.model.graph_status(), &GraphStatus::Captured);
    let mut plain = setup("dtl", k.clone());
    plain.model.set_graphs(false);
    let (p_plain, l_plain) = train_on_sizes(&mut plain, &sizes, 0.2);
    assert_eq!(l_graph, l_plain, "losses");
    assert_eq!(p_graph, p_plain, "parameters after {} steps", sizes.len());
});

// The whole step in the graph: with a learning rate that changes every step and clipping, six
// steps (recorded on the second, replayed on the third, fifth and sixth, a partial batch in
// between) train to exactly the parameters and losses of plain steps, and so does a run with
// graphs turned off from the start.
on_devices!(Precision::F32, the_recorded_f32_step_follows_the_schedule_exactly, k => {
    let sizes = [3, 3, 3, 2, 3, 3];
    let mut graphed = setup("dtlplus", k.clone());
    let (p_graph, l_graph) = train_scheduled(&mut graphed, &sizes, 0.2);
    assert_eq!(graphed.model.graph_status(), &GraphStatus::Captured, "{}", k.describe());
    let mut plain = setup("dtlplus", k.clone());
    plain.model.set_graphs(false);
    let (p_plain, l_plain) = train_scheduled(&mut plain, &sizes, 0.2);
    assert!(matches!(plain.model.graph_status(), GraphStatus::Off(_)));
    assert_eq!(l_graph, l_plain, "losses");
    for ((p, a), b) in graphed.model.params().iter().zip(&p_graph).zip(&p_plain) {
        assert_eq!(a, b, "{} after {} steps", p.name, sizes.len());
    }
    assert_eq!(graphed.model.optim_steps(), sizes.len() as u64);
});
