//! The training runner end to end on a tiny backbone and generated data: training, reports,
//! checkpoints, resuming after an interruption, evaluation and error messages.

use std::path::Path;

use dfdx::prelude::*;
use dtl_core::{BuildContext, Job, PipelineConfig, RunEnv};
use dtl_runner::data::SyntheticData;
use dtl_runner::toy::ToyBackbone;
use dtl_runner::DtlJob;

fn config(extra: &[&str]) -> PipelineConfig {
    let text = r#"
[run]
name = "toy"
seed = 3
log_every = 2
[backbone]
kind = "toy_patch4_8"
drop_path = 0.1
[side]
kind = "dtl+"
rank = 2
beta = 10.0
taps = "0-2"
injects = "1-2"
[data]
kind = "synthetic"
root = "."
batch_size = 4
[optim]
lr = 0.05
clip_grad = 5.0
label_smoothing = 0.1
[schedule]
epochs = 3
warmup_epochs = 1
"#;
    let overrides: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    PipelineConfig::from_str(text, "toy.toml".as_ref(), &overrides).unwrap()
}

fn job(cfg: &PipelineConfig) -> DtlJob<ToyBackbone> {
    let cx = BuildContext {
        pipeline_file: "toy.toml".into(),
    };
    DtlJob::new(
        cfg,
        &cx,
        ToyBackbone::new(&Cpu::default(), 11),
        Cpu::default(),
    )
    .with_data(Box::new(SyntheticData::new(3, 8, 24, 12, 4, 5)))
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
fn trains_learns_and_writes_every_file() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(&[]);
    let report = job(&cfg).train(&env(dir.path())).unwrap();
    for key in [
        "top1",
        "top5",
        "best_top1",
        "trainable_params",
        "epochs",
        "wall_s",
        "train_img_per_s",
        "peak_rss_mib",
        "run_dir",
    ] {
        assert!(!report[key].is_null(), "report lacks `{key}`: {report}");
    }
    assert_eq!(report["epochs"], 3);
    // 3 taps x (2x8 + 8x2) + 8 x 3 x 3 conv + head 3x8 + 3
    assert_eq!(report["trainable_params"], 3 * 32 + 72 + 27);
    assert!(
        report["top1"].as_f64().unwrap() > 0.6,
        "the generated task should be learnt: {report}"
    );
    for f in [
        "metrics.jsonl",
        "report.md",
        "report.json",
        "curves.svg",
        "best.safetensors",
        "last.safetensors",
    ] {
        assert!(dir.path().join(f).is_file(), "{f} missing");
    }
    let lines = dtl_runner::report::read_metrics(dir.path()).unwrap();
    let epochs: Vec<_> = lines.iter().filter(|l| l["kind"] == "epoch").collect();
    let steps: Vec<_> = lines.iter().filter(|l| l["kind"] == "step").collect();
    assert_eq!(epochs.len(), 3);
    assert_eq!(steps.len(), 9, "18 steps logged every 2");
    assert!(epochs[2]["train_loss"].as_f64().unwrap() < epochs[0]["train_loss"].as_f64().unwrap());
    // the warm-up epoch starts at warmup_lr
    assert!((epochs[0]["lr"].as_f64().unwrap() - 1e-7).abs() < 1e-12);
    let ck = dtl_runner::checkpoint::load(&dir.path().join("last.safetensors")).unwrap();
    assert!(ck.pipeline.contains("dtl+"));
    assert_eq!(ck.state["epoch"], 3);
    assert!(!ck.optim.is_empty());
    let best = dtl_runner::checkpoint::load(&dir.path().join("best.safetensors")).unwrap();
    assert!(best.optim.is_empty(), "best holds no optimizer state");
    let md = std::fs::read_to_string(dir.path().join("report.md")).unwrap();
    assert!(md.contains("trainable parameters"));

    // evaluate the run directory (best checkpoint) and the last checkpoint file
    let e = job(&cfg).evaluate(&env(dir.path()), dir.path()).unwrap();
    assert_eq!(e["images"], 12);
    assert_eq!(e["top1"], report["best_top1"]);
    let e = job(&cfg)
        .evaluate(&env(dir.path()), &dir.path().join("last.safetensors"))
        .unwrap();
    assert_eq!(e["top1"], report["top1"]);
}

#[test]
fn resumes_mid_epoch_to_the_same_result() {
    let cfg = config(&[]);
    let full = tempfile::tempdir().unwrap();
    job(&cfg).train(&env(full.path())).unwrap();

    let cut = tempfile::tempdir().unwrap();
    // interrupted in the middle of the second epoch (6 steps per epoch)
    let r = job(&cfg)
        .with_step_limit(8)
        .train(&env(cut.path()))
        .unwrap();
    assert_eq!(r["stopped"], true);
    assert_eq!(r["batch"], 2);
    let mut e = env(cut.path());
    e.resume = Some(cut.path().to_path_buf());
    let resumed = job(&cfg).train(&e).unwrap();
    assert_eq!(resumed["steps"], 18);
    assert_eq!(
        tensors(&full.path().join("last.safetensors")),
        tensors(&cut.path().join("last.safetensors")),
        "a resumed run must end exactly where the uninterrupted one does"
    );
    let lines = dtl_runner::report::read_metrics(cut.path()).unwrap();
    assert_eq!(lines.iter().filter(|l| l["kind"] == "epoch").count(), 3);
    assert_eq!(lines.iter().filter(|l| l["kind"] == "step").count(), 9);
}

#[test]
fn same_seed_same_run_other_seed_other_run() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let c = tempfile::tempdir().unwrap();
    let cfg = config(&["schedule.epochs=1"]);
    job(&cfg).train(&env(a.path())).unwrap();
    job(&cfg).train(&env(b.path())).unwrap();
    job(&config(&["schedule.epochs=1", "run.seed=4"]))
        .train(&env(c.path()))
        .unwrap();
    let (ta, tb, tc) = (
        tensors(&a.path().join("last.safetensors")),
        tensors(&b.path().join("last.safetensors")),
        tensors(&c.path().join("last.safetensors")),
    );
    assert_eq!(ta, tb);
    assert_ne!(ta, tc);
}

#[test]
fn linear_probe_and_plain_dtl_train() {
    for kind in ["linear", "dtl"] {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(&[
            &format!("side.kind=\"{kind}\""),
            "schedule.epochs=2",
            "schedule.per=\"step\"",
        ]);
        let r = job(&cfg).train(&env(dir.path())).unwrap();
        let want = if kind == "linear" { 27 } else { 3 * 32 + 27 };
        assert_eq!(r["trainable_params"], want, "{kind}");
        assert!(r["top1"].as_f64().unwrap() > 0.5, "{kind}: {r}");
    }
    // class-token pooling (the toy backbone mixes no tokens, so only check that it runs)
    let dir = tempfile::tempdir().unwrap();
    let r = job(&config(&["schedule.epochs=1", "head.pool=\"cls\""]))
        .train(&env(dir.path()))
        .unwrap();
    assert_eq!(r["epochs"], 1);
}

#[test]
fn bad_checkpoints_give_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(&["schedule.epochs=1"]);
    job(&cfg).train(&env(dir.path())).unwrap();
    // a DTL (no conv) pipeline cannot load a DTL+ checkpoint
    let other = config(&["side.kind=\"dtl\""]);
    let err = job(&other)
        .evaluate(&env(dir.path()), dir.path())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("fusion.weight") && err.contains("best.safetensors"),
        "{err}"
    );
    let missing = dir.path().join("nope.safetensors");
    let err = job(&cfg)
        .evaluate(&env(dir.path()), &missing)
        .unwrap_err()
        .to_string();
    assert!(err.contains("nope.safetensors"), "{err}");
    let junk = dir.path().join("junk.safetensors");
    std::fs::write(&junk, b"not a checkpoint").unwrap();
    let err = job(&cfg)
        .evaluate(&env(dir.path()), &junk)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("junk.safetensors") && err.contains("safetensors"),
        "{err}"
    );
}
