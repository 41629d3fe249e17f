//! The training loop over the device step ([`dtl_runner::resident`]) end to end, on the CPU's
//! kernels and a small random ViT with generated data: it learns, writes every file, resumes
//! mid-epoch to the same result, and its checkpoints evaluate identically on the tape-based
//! CPU path (so a checkpoint trained on a GPU evaluates on a CPU).

use std::path::Path;

use dfdx::prelude::*;
use dtl_core::{BuildContext, Job, PipelineConfig, RunEnv};
use dtl_kernels::CpuKernels;
use dtl_runner::data::SyntheticData;
use dtl_runner::resident::ResidentSource;
use dtl_runner::{DtlJob, Trainer};
use dtl_vit::variants::VitTestPatch8_32;
use dtl_vit::VitOn;

fn config(extra: &[&str]) -> PipelineConfig {
    let text = r#"
[run]
name = "resident"
seed = 5
log_every = 2
[backbone]
kind = "vit_test_patch8_32"
drop_path = 0.1
[side]
kind = "dtl+"
taps = "0-3"
injects = "2-3"
[data]
kind = "synthetic"
root = "."
batch_size = 4
[optim]
lr = 0.02
clip_grad = 5.0
label_smoothing = 0.1
[schedule]
epochs = 3
warmup_epochs = 1
"#;
    let overrides: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    PipelineConfig::from_str(text, "resident.toml".as_ref(), &overrides).unwrap()
}

fn cx() -> BuildContext {
    BuildContext {
        pipeline_file: "resident.toml".into(),
    }
}

fn data() -> Box<SyntheticData> {
    Box::new(SyntheticData::new(3, 32, 24, 12, 4, 7))
}

fn vit() -> dtl_vit::VitOf<VitTestPatch8_32> {
    dtl_vit::random::<VitTestPatch8_32>(9).unwrap()
}

fn resident_job(cfg: &PipelineConfig) -> Trainer<ResidentSource<CpuKernels, VitOn<CpuKernels>>> {
    let k = CpuKernels::new();
    let v = vit();
    let spec = dtl_core::Backbone::<Cpu>::spec(&v).clone();
    let on = VitOn::upload(&k, &spec, v.weights()).unwrap();
    Trainer::with_source(cfg, &cx(), ResidentSource::new(k, on)).with_data(data())
}

fn cpu_job(cfg: &PipelineConfig) -> DtlJob<dtl_vit::VitOf<VitTestPatch8_32>> {
    DtlJob::new(cfg, &cx(), vit(), Cpu::default()).with_data(data())
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
fn device_step_trains_and_its_checkpoints_evaluate_on_the_cpu_path() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(&[]);
    let report = resident_job(&cfg).train(&env(dir.path())).unwrap();
    assert_eq!(report["epochs"], 3);
    assert!(
        report["top1"].as_f64().unwrap() > 0.6,
        "the generated task should be learnt: {report}"
    );
    for f in [
        "metrics.jsonl",
        "report.json",
        "curves.svg",
        "best.safetensors",
        "last.safetensors",
    ] {
        assert!(dir.path().join(f).is_file(), "{f} missing");
    }
    // the written report says how the step ran: f32, and no graph on the CPU
    let written: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("report.json")).unwrap())
            .unwrap();
    assert_eq!(written["precision"], "f32", "{written}");
    assert!(
        written["graph"]
            .as_str()
            .unwrap()
            .ends_with("does not record graphs"),
        "{written}"
    );
    assert!(written["device"].as_str().unwrap().ends_with(", f32"));
    let lines = dtl_runner::report::read_metrics(dir.path()).unwrap();
    let steps: Vec<_> = lines.iter().filter(|l| l["kind"] == "step").collect();
    assert_eq!(steps.len(), 9, "18 steps logged every 2");
    assert!(steps
        .iter()
        .all(|s| s["loss"].as_f64().unwrap().is_finite()));
    let epochs: Vec<_> = lines.iter().filter(|l| l["kind"] == "epoch").collect();
    assert!(epochs[2]["train_loss"].as_f64().unwrap() < epochs[0]["train_loss"].as_f64().unwrap());
    // the same checkpoint on the tape-based CPU path and on the device step
    let last = dir.path().join("last.safetensors");
    let on_cpu = cpu_job(&cfg).evaluate(&env(dir.path()), &last).unwrap();
    let on_device = resident_job(&cfg)
        .evaluate(&env(dir.path()), &last)
        .unwrap();
    assert_eq!(on_cpu["top1"], report["top1"]);
    assert_eq!(on_device["top1"], report["top1"]);
    let dl =
        (on_cpu["test_loss"].as_f64().unwrap() - on_device["test_loss"].as_f64().unwrap()).abs();
    assert!(dl < 1e-4, "test losses {on_cpu} vs {on_device}");
}

#[test]
fn device_step_starts_where_the_cpu_path_starts_and_follows_it() {
    // one epoch on each path from the same seed: same initial values, nearly the same end
    let cfg = config(&["schedule.epochs=1", "backbone.drop_path=0.0"]);
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    cpu_job(&cfg).train(&env(a.path())).unwrap();
    resident_job(&cfg).train(&env(b.path())).unwrap();
    let (ta, tb) = (
        tensors(&a.path().join("last.safetensors")),
        tensors(&b.path().join("last.safetensors")),
    );
    assert_eq!(ta.len(), tb.len());
    for ((na, va), (nb, vb)) in ta.iter().zip(&tb) {
        assert_eq!(na, nb);
        let scale = va.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
        let e = va
            .iter()
            .zip(vb)
            .fold(0f32, |m, (x, y)| m.max((x - y).abs()))
            / scale;
        assert!(e < 1e-3, "{na} differs by {e:e} relative after one epoch");
    }
}

#[test]
fn device_step_resumes_mid_epoch_to_the_same_result() {
    let cfg = config(&[]);
    let full = tempfile::tempdir().unwrap();
    resident_job(&cfg).train(&env(full.path())).unwrap();
    let cut = tempfile::tempdir().unwrap();
    let r = resident_job(&cfg)
        .with_step_limit(8)
        .train(&env(cut.path()))
        .unwrap();
    assert_eq!(r["stopped"], true);
    let mut e = env(cut.path());
    e.resume = Some(cut.path().to_path_buf());
    let resumed = resident_job(&cfg).train(&e).unwrap();
    assert_eq!(resumed["steps"], 18);
    assert_eq!(
        tensors(&full.path().join("last.safetensors")),
        tensors(&cut.path().join("last.safetensors")),
        "a resumed run must end exactly where the uninterrupted one does"
    );
    let a = dtl_runner::checkpoint::load(&full.path().join("last.safetensors")).unwrap();
    let b = dtl_runner::checkpoint::load(&cut.path().join("last.safetensors")).unwrap();
    assert_eq!(a.state["epoch_loss_sum"], b.state["epoch_loss_sum"]);
}

#[test]
fn linear_probe_and_plain_dtl_train_on_the_device_step() {
    for kind in ["linear", "dtl"] {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(&[&format!("side.kind=\"{kind}\""), "schedule.epochs=2"]);
        let r = resident_job(&cfg).train(&env(dir.path())).unwrap();
        let cpu = cpu_job(&cfg).build_model(3).unwrap().trainable_params();
        assert_eq!(r["trainable_params"], cpu, "{kind}");
        assert!(r["top1"].as_f64().unwrap() > 0.5, "{kind}: {r}");
    }
}

#[test]
fn class_token_pooling_trains_on_the_device_step() {
    let dir = tempfile::tempdir().unwrap();
    let r = resident_job(&config(&["schedule.epochs=1", "head.pool=\"cls\""]))
        .train(&env(dir.path()))
        .unwrap();
    assert_eq!(r["epochs"], 1);
}

#[test]
fn stored_activations_train_to_the_same_parameters_and_resume() {
    let recompute = tempfile::tempdir().unwrap();
    resident_job(&config(&[]))
        .train(&env(recompute.path()))
        .unwrap();
    let cfg = config(&["run.activations=\"store\""]);
    let cut = tempfile::tempdir().unwrap();
    let r = resident_job(&cfg)
        .with_step_limit(8)
        .train(&env(cut.path()))
        .unwrap();
    assert_eq!(r["stopped"], true);
    let mut e = env(cut.path());
    e.resume = Some(cut.path().to_path_buf());
    let resumed = resident_job(&cfg).train(&e).unwrap();
    assert_eq!(resumed["steps"], 18);
    assert_eq!(
        tensors(&recompute.path().join("last.safetensors")),
        tensors(&cut.path().join("last.safetensors")),
        "keeping the blocks' internals changes no value, and a resumed run ends where an uninterrupted one does"
    );
}

#[test]
fn bf16_is_refused_on_the_cpu_naming_the_key() {
    let cx = BuildContext {
        pipeline_file: "resident.toml".into(),
    };
    for side in ["dtl+", "linear"] {
        let side = format!("side.kind=\"{side}\"");
        let cfg = config(&["run.precision=\"bf16\"", side.as_str()]);
        let e = dtl_vit::build::<VitTestPatch8_32>(&cfg, &cx)
            .err()
            .expect("bf16 on the CPU")
            .to_string();
        assert!(
            e.contains("run.precision") && e.contains("\"f32\"") && e.contains("\"auto\""),
            "{e}"
        );
    }
    // `auto` is f32 on the CPU
    let cfg = config(&["run.precision=\"auto\""]);
    assert!(dtl_vit::build::<VitTestPatch8_32>(&cfg, &cx).is_ok());
}
