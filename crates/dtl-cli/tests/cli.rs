//! The `dtl` binary as a user meets it: broken pipelines, listing, help.

use std::path::PathBuf;

mod common;
use common::{dtl, text, workspace};

/// Every file in `tests/pipelines/broken/` fails validation with exit code 1 and a one-line
/// error containing the text of its `.expected` file; nothing panics.
#[test]
fn broken_pipelines_give_one_clear_line_each() {
    let dir = workspace().join("tests/pipelines/broken");
    let mut cases: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    cases.sort();
    assert!(cases.len() >= 10, "expected the broken-pipeline collection");
    for case in cases {
        let expected = std::fs::read_to_string(case.with_extension("expected"))
            .unwrap_or_else(|_| panic!("{} has no .expected file", case.display()));
        let expected = expected.trim();
        let rel = case.strip_prefix(workspace()).unwrap();
        for sub in [&["validate"][..], &["run"][..]] {
            let mut args: Vec<&str> = sub.to_vec();
            args.push(rel.to_str().unwrap());
            let out = dtl(&args);
            let err = text(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{}: {err}", case.display());
            assert!(!err.contains("panicked"), "{}: {err}", case.display());
            let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
            assert_eq!(
                lines.len(),
                1,
                "{}: want one error line, got:\n{err}",
                case.display()
            );
            assert!(
                lines[0].contains(expected),
                "{}:\n  want: {expected}\n  got:  {}",
                case.display(),
                lines[0]
            );
            assert!(
                lines[0].contains(case.file_name().unwrap().to_str().unwrap()),
                "{}: the message must name the file: {}",
                case.display(),
                lines[0]
            );
        }
    }
}

#[test]
fn validate_reports_every_file_and_every_error() {
    let out = dtl(&[
        "validate",
        "tests/pipelines/broken/zero-rank.toml",
        "tests/pipelines/broken/inject-past-depth.toml",
    ]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(err.contains("zero-rank.toml"), "{err}");
    assert!(err.contains("inject-past-depth.toml"), "{err}");
    assert!(err.contains("2 of 2 pipeline(s) invalid"), "{err}");
}

#[test]
fn list_backbones_is_sorted_and_shows_shapes() {
    let out = dtl(&["list", "backbones"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let names: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("  ") && !l.trim_start().starts_with("image "))
        .map(|l| l.split_whitespace().next().unwrap())
        .collect();
    assert!(names.contains(&"vit_base_patch16_224"), "{stdout}");
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(names, sorted);
    assert!(
        stdout.contains("image 224 patch 16 width 768 depth 12 heads 12 tokens 197"),
        "{stdout}"
    );
}

#[test]
fn overrides_apply_and_print_config_fills_defaults() {
    let out = dtl(&[
        "run",
        "tests/pipelines/valid.toml",
        "optim.lr=0.25",
        "side.taps=0-1",
        "--print-config",
    ]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(stdout.contains("lr = 0.25"), "{stdout}");
    assert!(stdout.contains("taps = \"0-1\""), "{stdout}");
    assert!(stdout.contains("weight_decay = 0.05"), "{stdout}");
    assert!(stdout.contains("[schedule]"), "{stdout}");
}

#[test]
fn a_bad_override_names_the_key() {
    let out = dtl(&[
        "run",
        "tests/pipelines/valid.toml",
        "optim.lrr=1",
        "--print-config",
    ]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(err.contains("unknown key `lrr`"), "{err}");
    assert!(err.contains("with overrides"), "{err}");
    let out = dtl(&[
        "run",
        "tests/pipelines/valid.toml",
        "side.rank=0",
        "--print-config",
    ]);
    assert!(text(&out.stderr).contains("key `side.rank`: must be at least 1"));
}

#[test]
fn help_shows_examples() {
    let out = dtl(&["--help"]);
    assert!(text(&out.stdout).contains("dtl run pipelines/quickstart.toml"));
}

#[test]
fn resuming_from_nothing_is_refused_before_writing_anything() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("runs/none");
    let out = dtl(&[
        "run",
        "tests/pipelines/valid.toml",
        "--resume",
        missing.to_str().unwrap(),
    ]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("nothing to resume from"), "{err}");
    assert!(!dir.path().join("runs").exists());
}

#[test]
fn a_gpu_device_that_cannot_be_used_is_one_line_naming_run_device() {
    // Without the cuda feature (or without a GPU) both commands stop before doing anything.
    for cmd in ["validate", "run"] {
        let out = dtl(&[cmd, "tests/pipelines/valid.toml", "run.device=cuda:0"]);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{cmd}: {err}");
        assert!(!err.contains("panicked"), "{cmd}: {err}");
        let first = err.lines().next().unwrap_or_default();
        assert!(
            first.contains("valid.toml") && first.contains("run.device"),
            "{cmd}: {err}"
        );
        if !cfg!(feature = "cuda") {
            assert!(first.contains("--features cuda"), "{cmd}: {err}");
        }
    }
}

#[test]
fn bench_json_has_the_fields_the_comparison_script_reads() {
    let out = dtl(&[
        "bench",
        "tests/pipelines/valid.toml",
        "--batch",
        "2",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--what",
        "train",
        "--json",
    ]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert_eq!(v["backbone"], "vit_test_patch8_32");
    assert!(v["device"].as_str().unwrap().starts_with("cpu"), "{v}");
    let rows = v["rows"].as_array().expect("rows");
    // dtl and dtl+ with each `run.activations` policy, the linear probe once
    let runs: Vec<(&str, &str)> = rows
        .iter()
        .map(|r| {
            (
                r["side"].as_str().unwrap(),
                r["activations"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        runs,
        [
            ("dtl", "recompute"),
            ("dtl", "store"),
            ("dtl+", "recompute"),
            ("dtl+", "store"),
            ("linear", "recompute")
        ]
    );
    for r in rows {
        assert_eq!(r["what"], "train");
        assert_eq!(r["batch"], 2);
        assert!(r["img_per_s"].as_f64().unwrap() > 0.0, "{r}");
        // No GPU probe on the CPU: the field is there, and null.
        assert!(r["peak_gpu_mib"].is_null(), "{r}");
        assert!(r.get("peak_rss_mib").is_some(), "{r}");
        assert!(r["trainable_params"].as_u64().unwrap() > 0, "{r}");
    }
}

#[test]
fn auto_device_without_a_gpu_runs_on_the_cpu_with_a_notice() {
    let out = dtl(&[
        "bench",
        "tests/pipelines/valid.toml",
        "run.device=auto",
        "--batch",
        "1",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--what",
        "forward",
        "--json",
    ]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        err.contains("notice: run.device = \"auto\": no usable GPU") && err.contains("on the CPU"),
        "{err}"
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert!(v["device"].as_str().unwrap().starts_with("cpu"), "{v}");
}
