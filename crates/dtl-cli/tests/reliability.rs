//! Hostile input and concurrent use, through the `dtl` binary: broken weights, changed inputs,
//! two writers on one run directory, two new runs of one name, interrupted writes.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{dtl_in, text, workspace};

fn errors(out: &Output) -> Vec<String> {
    text(&out.stderr)
        .lines()
        .filter(|l| l.starts_with("error:"))
        .map(str::to_string)
        .collect()
}

/// A folder with the quickstart backbone's weights, a tiny CSV task and `p.toml` over them.
fn project(epochs: usize) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::copy(
        workspace().join("assets/vit_mini_patch4_28_fmnist.safetensors"),
        root.join("w.safetensors"),
    )
    .unwrap();
    std::fs::create_dir(root.join("data")).unwrap();
    let rows = |labels: &[usize]| -> String {
        labels
            .iter()
            .enumerate()
            .map(|(i, l)| format!("{l},{},{},{},{}\n", i % 7, 60 * l, 255 - 60 * l, 9))
            .collect()
    };
    std::fs::write(root.join("data/train.csv"), rows(&[0, 1, 2, 0, 1, 2, 0, 1])).unwrap();
    std::fs::write(root.join("data/test.csv"), rows(&[0, 1, 2, 1])).unwrap();
    std::fs::write(
        root.join("p.toml"),
        format!(
            "[run]\nname = \"r\"\noutput_dir = \"runs\"\n\n[backbone]\nkind = \"vit_mini_patch4_28\"\nweights = \"w.safetensors\"\n\n\
             [side]\nkind = \"dtl\"\n\n[data]\nkind = \"csv\"\nroot = \"data\"\nbatch_size = 2\nworkers = 0\n\n\
             [schedule]\nepochs = {epochs}\n"
        ),
    )
    .unwrap();
    dir
}

/// Overwrites element `index` of the f32 tensor `name` of a safetensors file with `value`.
fn poke(file: &Path, name: &str, index: usize, value: f32) {
    let mut bytes = std::fs::read(file).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let start = header[name]["data_offsets"][0].as_u64().unwrap() as usize;
    let at = 8 + n + start + 4 * index;
    bytes[at..at + 4].copy_from_slice(&value.to_le_bytes());
    std::fs::write(file, bytes).unwrap();
}

#[test]
fn weights_with_a_nan_are_refused_at_load_naming_the_tensor_and_leave_no_run_dir() {
    let p = project(1);
    poke(&p.path().join("w.safetensors"), "norm.weight", 3, f32::NAN);
    let out = dtl_in(p.path(), &["run", "p.toml", "--no-progress"]);
    let errs = errors(&out);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert_eq!(errs.len(), 1, "{}", text(&out.stderr));
    assert!(
        errs[0].contains("w.safetensors: weights tensor `norm.weight` holds NaN at index 3"),
        "{}",
        errs[0]
    );
    assert!(
        !p.path().join("runs/r").exists(),
        "a run that failed before training leaves no directory"
    );
}

#[test]
fn eval_says_when_the_weights_changed_and_refuses_nan_weights_and_an_edited_pipeline() {
    let p = project(1);
    let out = dtl_in(p.path(), &["run", "p.toml", "--no-progress"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = dtl_in(p.path(), &["eval", "runs/r"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        !text(&out.stderr).contains("warning"),
        "{}",
        text(&out.stderr)
    );

    // The same path, other contents: evaluated, but never silently.
    poke(&p.path().join("w.safetensors"), "norm.bias", 0, 0.125);
    let out = dtl_in(p.path(), &["eval", "runs/r"]);
    let err = text(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("was trained on inputs that have changed since"),
        "{err}"
    );
    assert!(
        err.contains("backbone weights") && err.contains("w.safetensors: 830528 bytes, crc32"),
        "{err}"
    );

    // Resuming says so too.
    let out = dtl_in(
        p.path(),
        &["run", "p.toml", "--no-progress", "--resume", "runs/r"],
    );
    let err = text(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("with inputs that differ from the ones it was trained with")
            && err.contains("backbone weights"),
        "{err}"
    );

    // A NaN is refused, naming the tensor.
    poke(
        &p.path().join("w.safetensors"),
        "norm.bias",
        0,
        f32::INFINITY,
    );
    let out = dtl_in(p.path(), &["eval", "runs/r"]);
    let errs = errors(&out);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        errs[0].contains("weights tensor `norm.bias` holds inf at index 0"),
        "{errs:?}"
    );

    // A pipeline.toml that is not the checkpoint's is refused, naming the key.
    let pipe = p.path().join("runs/r/pipeline.toml");
    let t = std::fs::read_to_string(&pipe).unwrap();
    std::fs::write(&pipe, t.replace("lr = 0.001", "lr = 0.5")).unwrap();
    let out = dtl_in(p.path(), &["eval", "runs/r"]);
    let errs = errors(&out);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        errs[0].contains("disagrees with the pipeline stored in")
            && errs[0].contains("optim.lr: 0.001 -> 0.5"),
        "{errs:?}"
    );
}

#[test]
fn non_finite_logits_at_evaluation_name_the_step_and_the_cause() {
    let p = project(1);
    let out = dtl_in(p.path(), &["run", "p.toml", "--no-progress"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    // Finite, but so large that the logits overflow.
    let best = p.path().join("runs/r/best.safetensors");
    for i in 0..64 {
        poke(&best, "head.weight", i, 3e38);
    }
    let out = dtl_in(p.path(), &["eval", "runs/r"]);
    let errs = errors(&out);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(
        errs[0].contains("evaluation step 1: the logits of") && errs[0].contains("optim.lr"),
        "{errs:?}"
    );
    assert!(!errs[0].contains("top-1"), "{errs:?}");
}

/// Waits until `path` exists and is not empty.
fn wait_for(path: &Path, limit: Duration) {
    let t = Instant::now();
    while std::fs::metadata(path)
        .map(|m| m.len() == 0)
        .unwrap_or(true)
    {
        assert!(t.elapsed() < limit, "{} never appeared", path.display());
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn one_writer_per_run_directory_and_a_killed_run_resumes() {
    let p = project(100_000);
    let mut child = Command::new(env!("CARGO_BIN_EXE_dtl"))
        .args(["run", "p.toml", "--no-progress"])
        .current_dir(p.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let dir = p.path().join("runs/r");
    wait_for(&dir.join(".lock"), Duration::from_secs(120));
    wait_for(&dir.join("last.safetensors"), Duration::from_secs(120));
    // A few epochs trained, so that the resume below asks for fewer than were trained.
    let t = Instant::now();
    while std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap_or_default()
        .matches("\"kind\":\"epoch\"")
        .count()
        < 3
    {
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "three epochs in two minutes"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let t = Instant::now();
    let out = dtl_in(
        p.path(),
        &["run", "p.toml", "--no-progress", "--resume", "runs/r"],
    );
    let errs = errors(&out);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(
        errs[0].contains(&format!("in use by process {}", child.id())),
        "{errs:?}"
    );
    assert!(
        t.elapsed() < Duration::from_secs(30),
        "the refusal is immediate"
    );
    child.kill().unwrap();
    child.wait().unwrap();

    // The kernel dropped the lock with the process: resume works, here with fewer epochs
    // than were trained, and a half-written temporary file from a full disk is cleared.
    std::fs::write(dir.join(".last.safetensors.tmp"), b"partial").unwrap();
    let out = dtl_in(
        p.path(),
        &[
            "run",
            "p.toml",
            "--no-progress",
            "--resume",
            "runs/r",
            "schedule.epochs=1",
        ],
    );
    let err = text(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("left by an interrupted write"), "{err}");
    assert!(!dir.join(".last.safetensors.tmp").exists());
    assert!(
        err.contains("nothing is trained, the checkpoint is evaluated"),
        "{err}"
    );
    let report = std::fs::read_to_string(dir.join("report.md")).unwrap();
    assert!(report.contains("trained (schedule.epochs is 1"), "{report}");
}

#[test]
fn new_runs_of_one_name_started_together_get_a_directory_each() {
    let p = project(1);
    let children: Vec<_> = (0..4)
        .map(|_| {
            Command::new(env!("CARGO_BIN_EXE_dtl"))
                .args(["run", "p.toml", "--no-progress"])
                .current_dir(p.path())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for c in children {
        let out = c.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
    let mut dirs: Vec<String> = std::fs::read_dir(p.path().join("runs"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    dirs.sort();
    assert_eq!(dirs, ["r", "r-2", "r-3", "r-4"]);
    for d in dirs {
        let report = p.path().join("runs").join(d).join("report.json");
        assert!(report.is_file(), "{}", report.display());
    }
}

#[test]
fn a_byte_order_mark_is_not_data() {
    let p = project(1);
    for f in ["train.csv", "test.csv"] {
        let path = p.path().join("data").join(f);
        let mut b = b"\xEF\xBB\xBF".to_vec();
        b.extend(std::fs::read(&path).unwrap());
        std::fs::write(&path, b).unwrap();
    }
    let out = dtl_in(p.path(), &["run", "p.toml", "--no-progress"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    // The first row is an item, not a header that the mark made unreadable.
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(p.path().join("runs/r/report.json")).unwrap())
            .unwrap();
    assert_eq!(report["test_images"], 4, "{report}");
}
