//! `dtl bench --profile` as a user meets it on a machine without a GPU: a clear refusal
//! naming the flag and the device it needs, never a panic; and the JSON without the flag
//! has no `profile` field.

mod common;
use common::{dtl, text};

const BENCH: [&str; 10] = [
    "bench",
    "tests/pipelines/valid.toml",
    "--batch",
    "1",
    "--steps",
    "1",
    "--warmup",
    "0",
    "--what",
    "train",
];

#[test]
fn profile_on_the_cpu_is_refused_with_the_flag_and_the_device_it_needs() {
    let mut args = BENCH.to_vec();
    args.extend(["run.device=cpu", "--profile"]);
    let out = dtl(&args);
    let err = text(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    let line = err
        .lines()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_else(|| panic!("an error line: {err}"));
    assert!(
        line.contains("--profile") && line.contains("cuda:N") && line.contains("CPU"),
        "{line}"
    );
    assert!(
        out.stdout.is_empty(),
        "nothing measured: {}",
        text(&out.stdout)
    );
}

#[test]
fn profile_markdown_on_the_cpu_is_refused_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let md = dir.path().join("profile.md");
    let mut args = BENCH.to_vec();
    let md_arg = md.to_str().unwrap().to_string();
    args.extend(["run.device=cpu", "--json", "--profile-md", &md_arg]);
    let out = dtl(&args);
    let err = text(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.contains("--profile"), "{err}");
    assert!(!md.exists());
}

#[test]
fn without_profile_the_json_has_no_profile_field() {
    let mut args = BENCH.to_vec();
    args.extend(["run.device=cpu", "--json"]);
    let out = dtl(&args);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    for r in v["rows"].as_array().expect("rows") {
        assert!(r.get("profile").is_none(), "{r}");
    }
}
