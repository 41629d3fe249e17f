//! `dtl bench --profile` end to end below the command line: `dtl_runner::resident::bench` on
//! a CUDA device with `BenchOptions::profile`, on a small random ViT. Every training row carries
//! a profile of its timed steps (a few tens of labels, shares summing to 1, the optimizer's
//! and the products' rows among them) and says that graphs were off; without the option no
//! row has one; the CPU refuses the option.
//!
//! Each check runs on every device present (see `resident_common/devices.rs`): `cuda:0`, and
//! the host emulation of the same device code, each test on a device of its own.

#![cfg(feature = "cuda")]

#[path = "resident_common/devices.rs"]
#[macro_use]
mod devices;

use std::sync::Arc;

use dfdx::prelude::Cpu;
use dtl_core::choice::Precision;
use dtl_core::{BenchOptions, PipelineConfig};
use dtl_kernels::{CpuKernels, Kernels};
use dtl_runner::report::BenchReport;
use dtl_vit::variants::VitTestPatch8_32;
use dtl_vit::VitOn;

fn config() -> PipelineConfig {
    let text = r#"
[backbone]
kind = "vit_test_patch8_32"
[side]
kind = "dtl"
taps = "0-3"
injects = "2-3"
[data]
kind = "synthetic"
root = "."
batch_size = 2
"#;
    PipelineConfig::from_str(text, "profile.toml".as_ref(), &[]).unwrap()
}

fn opts(profile: bool) -> BenchOptions {
    BenchOptions {
        batches: vec![2],
        steps: 2,
        warmup: 0,
        what: vec!["train".into()],
        profile,
    }
}

fn backbone<K: Kernels>(k: &K) -> Arc<VitOn<K>> {
    let v = dtl_vit::random::<VitTestPatch8_32>(3).unwrap();
    let spec = dtl_core::Backbone::<Cpu>::spec(&v).clone();
    Arc::new(VitOn::upload(k, &spec, v.weights()).unwrap())
}

fn profiled_rows<K: Kernels + Clone>(k: K) {
    let cfg = config();
    let b = backbone(&k);
    let report = dtl_runner::resident::bench(&cfg, &k, &b, &opts(true)).unwrap();
    let typed = BenchReport::from_json(&report);
    assert!(!typed.rows.is_empty());
    for (raw, r) in report["rows"].as_array().unwrap().iter().zip(&typed.rows) {
        let p = r
            .profile
            .as_ref()
            .unwrap_or_else(|| panic!("a profile in every row: {raw}"));
        assert_eq!(r.graph.as_deref(), Some(dtl_runner::bench::PROFILE_GRAPH));
        assert_eq!(p.graph, dtl_runner::bench::PROFILE_GRAPH);
        assert_eq!(p.steps, 2);
        assert!(p.wall_ms > 0.0, "{p:?}");
        assert!(
            (3..100).contains(&p.rows.len()),
            "tens of labels, not thousands: {}",
            p.rows.len()
        );
        let labels: Vec<&str> = p.rows.iter().map(|r| r.label.as_str()).collect();
        assert!(labels.contains(&"dtl_adamw"), "{labels:?}");
        assert!(labels.iter().any(|l| l.starts_with("gemm ")), "{labels:?}");
        assert!(!labels.contains(&"graph replay"), "{labels:?}");
        let shares: f64 = p.rows.iter().map(|r| r.share).sum();
        assert!((shares - 1.0).abs() < 1e-9, "{shares}");
        assert!(p.rows.iter().all(|r| r.total_ms >= 0.0 && r.calls > 0));
        // the same work every step: every count is a multiple of the steps
        assert!(p.rows.iter().all(|r| r.calls % 2 == 0), "{:?}", p.rows);
        let md = p.markdown("train", 5);
        assert_eq!(
            md.lines().filter(|l| l.starts_with("| ")).count(),
            1 + 5 + usize::from(p.rows.len() > 5),
            "{md}"
        );
    }
    eprintln!("{}", typed.rows[0].profile.as_ref().unwrap().table(10));
    // only the pipeline's own side network at its own activation policy is profiled
    let runs: Vec<_> = typed
        .rows
        .iter()
        .map(|r| (r.side.as_deref(), r.activations.as_deref()))
        .collect();
    assert_eq!(runs, [(Some("dtl"), Some("recompute"))]);
    assert_eq!(k.profile_take().unwrap(), None, "nothing left running");
}

on_devices!(Precision::Bf16, training_rows_carry_a_profile, k => profiled_rows(k));

#[test]
fn the_cpu_kernels_refuse_to_profile_naming_the_option() {
    let k = CpuKernels::new();
    let b = backbone(&k);
    let e = dtl_runner::resident::bench(&config(), &k, &b, &opts(true))
        .unwrap_err()
        .to_string();
    assert!(e.contains("--profile") && e.contains("cuda:N"), "{e}");
    // without the option every training row is measured, none with a profile
    let plain = dtl_runner::resident::bench(&config(), &k, &b, &opts(false)).unwrap();
    let rows = plain["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 5, "{plain}");
    for r in rows {
        assert!(r.get("profile").is_none(), "{r}");
        assert_ne!(r["graph"], dtl_runner::bench::PROFILE_GRAPH, "{r}");
    }
}
