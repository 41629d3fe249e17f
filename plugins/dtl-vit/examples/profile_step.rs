//! Where a CPU training step of ViT-Ti/16 at 224 goes: the device step (`dtl_runner::resident`
//! on `CpuKernels`) timed as a whole and by parts, rounds interleaved, medians printed.
//!
//! ```text
//! cargo run --release -p dtl-vit --example profile_step -- [--side dtl|dtl+] [--batch 8] [--rounds 5]
//! ```
//!
//! Per round: the frozen forward with the side network (an evaluation batch: nothing kept),
//! a training step with `run.activations = "recompute"` and one with `"store"`. The difference
//! of the two steps is the recomputation inside the block VJPs; a step minus the forward is
//! the backward pass (VJP products, side-network gradients, AdamW) plus what the forward keeps.

use std::sync::Arc;
use std::time::Instant;

use dtl_core::PipelineConfig;
use dtl_kernels::CpuKernels;
use dtl_runner::resident::ResidentModel;
use dtl_vit::variants::VitTinyPatch16_224;
use dtl_vit::{Geometry, VitOn, VitWeights};

fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
        .unwrap_or_else(|| default.to_string())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() -> dtl_core::Result<()> {
    let side = arg("--side", "dtl");
    let batch: usize = arg("--batch", "8").parse().expect("--batch");
    let rounds: usize = arg("--rounds", "5").parse().expect("--rounds");
    let spec = VitTinyPatch16_224::spec();
    let on = Arc::new(VitOn::from_weights(&spec, VitWeights::random(&spec, 0))?);
    let classes = 10;
    let model =
        |activations: &str| -> dtl_core::Result<ResidentModel<CpuKernels, VitOn<CpuKernels>>> {
            let text = format!(
            "[run]\nactivations = \"{activations}\"\n[backbone]\nkind = \"{}\"\n\
             [side]\nkind = \"{side}\"\nrank = 2\nbeta = 100.0\ntaps = \"0-11\"\ninjects = \"6-11\"\n\
             [head]\nclasses = {classes}\n[data]\nkind = \"image-folder\"\nroot = \".\"\n",
            spec.name
        );
            let cfg = PipelineConfig::from_str(&text, "profile.toml".as_ref(), &[])?;
            let mut m =
                ResidentModel::from_config(&cfg, CpuKernels::new(), Arc::clone(&on), classes)?;
            m.plan(batch)?;
            Ok(m)
        };
    let images = vec![0.1f32; batch * 3 * spec.image_size * spec.image_size];
    let labels: Vec<usize> = (0..batch).map(|i| i % classes).collect();
    let targets = dtl_runner::model::smoothed_targets(&labels, classes, 0.0);
    let drops = vec![None; spec.depth];
    let mut recompute = model("recompute")?;
    let mut store = model("store")?;
    let (mut fwd, mut rec, mut sto) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..=rounds {
        let t = Instant::now();
        recompute.eval_begin(batch)?;
        recompute.eval_batch(&images, batch, &labels)?;
        let f = t.elapsed().as_secs_f64() * 1e3;
        let t = Instant::now();
        recompute.train_step(&images, batch, &targets, &drops, 1e-3, None)?;
        let r = t.elapsed().as_secs_f64() * 1e3;
        let t = Instant::now();
        store.train_step(&images, batch, &targets, &drops, 1e-3, None)?;
        let s = t.elapsed().as_secs_f64() * 1e3;
        if round > 0 {
            // round 0 warms up
            fwd.push(f);
            rec.push(r);
            sto.push(s);
        }
    }
    let (f, r, s) = (median(fwd), median(rec), median(sto));
    println!("{side}, batch {batch}, {rounds} rounds, medians in ms per step:");
    println!("  frozen forward + side network (nothing kept)  {f:8.1}");
    println!(
        "  training step, activations = recompute        {r:8.1}  ({:.1} img/s)",
        batch as f64 * 1e3 / r
    );
    println!(
        "  training step, activations = store            {s:8.1}  ({:.1} img/s)",
        batch as f64 * 1e3 / s
    );
    println!(
        "  recomputation inside the block VJPs           {:8.1}",
        r - s
    );
    println!(
        "  backward without recomputation (store - fwd)  {:8.1}",
        s - f
    );
    Ok(())
}
