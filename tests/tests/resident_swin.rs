//! The training loop over the device step on a hierarchical backbone (a small random Swin on
//! the CPU's kernels, generated data): it learns, resumes mid-epoch to exactly the same
//! parameters, and its checkpoint evaluates to the accuracy the run reported.

use std::path::Path;

use dtl_core::{BuildContext, Job, PipelineConfig, RunEnv};
use dtl_kernels::CpuKernels;
use dtl_runner::data::SyntheticData;
use dtl_runner::resident::ResidentSource;
use dtl_runner::Trainer;
use dtl_swin::{SwinOn, SwinWeights};

const VARIANT: &str = "swin_test_patch2_window4_32";

fn config(extra: &[&str]) -> PipelineConfig {
    // Blocks 0-7 in four stages of two; injects in stages 2 and 3, taps from stage 1 on.
    let text = format!(
        "[run]\nname = \"swin\"\nseed = 5\nlog_every = 2\n\
         [backbone]\nkind = \"{VARIANT}\"\n\
         [side]\nkind = \"dtl+\"\ntaps = \"3-7\"\ninjects = \"5-7\"\n\
         [data]\nkind = \"synthetic\"\nroot = \".\"\nbatch_size = 4\n\
         [optim]\nlr = 0.02\nclip_grad = 5.0\n\
         [schedule]\nepochs = 3\nwarmup_epochs = 1\n"
    );
    let overrides: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    PipelineConfig::from_str(&text, "swin.toml".as_ref(), &overrides).unwrap()
}

fn job(cfg: &PipelineConfig) -> Trainer<ResidentSource<CpuKernels, SwinOn<CpuKernels>>> {
    let sc = dtl_swin::variant(VARIANT).unwrap();
    let swin = SwinOn::from_weights(&sc, SwinWeights::random(&sc, 9)).unwrap();
    let cx = BuildContext {
        pipeline_file: "swin.toml".into(),
    };
    Trainer::with_source(cfg, &cx, ResidentSource::new(CpuKernels::new(), swin))
        .with_data(Box::new(SyntheticData::new(3, 32, 24, 12, 4, 7)))
}

fn env(dir: &Path) -> RunEnv {
    RunEnv {
        run_dir: dir.to_path_buf(),
        progress: false,
        resume: None,
    }
}

fn tensors(path: &Path) -> Vec<(String, Vec<f32>)> {
    dtl_runner::checkpoint::load(path)
        .unwrap()
        .params
        .into_iter()
        .map(|(n, _, v)| (n, v))
        .collect()
}

#[test]
fn swin_trains_resumes_and_evaluates_on_the_device_step() {
    let cfg = config(&[]);
    let full = tempfile::tempdir().unwrap();
    let report = job(&cfg).train(&env(full.path())).unwrap();
    assert_eq!(report["steps"], 18);
    assert!(
        report["top1"].as_f64().unwrap() > 0.5,
        "the generated task should be learnt: {report}"
    );
    let last = full.path().join("last.safetensors");
    let names: Vec<String> = tensors(&last).into_iter().map(|(n, _)| n).collect();
    assert_eq!(
        names.iter().filter(|n| n.starts_with("fusion.")).count(),
        4,
        "one conv per stage: {names:?}"
    );
    // Tap 3 has no inject after it in stage 1, nor has stage 0 or 1 an inject: their
    // tensors end where they began.
    let cut = tempfile::tempdir().unwrap();
    let r = job(&cfg)
        .with_step_limit(1)
        .train(&env(cut.path()))
        .unwrap();
    assert_eq!(r["stopped"], true);
    let first = tensors(&cut.path().join("last.safetensors"));
    let end = tensors(&last);
    for ((n, a), (_, b)) in first.iter().zip(&end) {
        let frozen = ["side.3.a", "side.3.b", "fusion.0.weight", "fusion.1.weight"];
        assert_eq!(frozen.contains(&n.as_str()), a == b, "{n}");
    }
    // Mid-epoch resume.
    let cut = tempfile::tempdir().unwrap();
    job(&cfg)
        .with_step_limit(8)
        .train(&env(cut.path()))
        .unwrap();
    let mut e = env(cut.path());
    e.resume = Some(cut.path().to_path_buf());
    let resumed = job(&cfg).train(&e).unwrap();
    assert_eq!(resumed["steps"], 18);
    assert_eq!(
        tensors(&last),
        tensors(&cut.path().join("last.safetensors")),
        "a resumed run must end exactly where the uninterrupted one does"
    );
    let again = job(&cfg).evaluate(&env(full.path()), &last).unwrap();
    assert_eq!(again["top1"], report["top1"]);
}
