//! What the CLI's integration tests share: the workspace root, running the `dtl` binary the
//! tests built, and reading its output.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The workspace root (where `pipelines/`, `tests/` and `data/` are).
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .unwrap()
        .to_path_buf()
}

/// Runs the `dtl` binary with `args` in `dir` and waits for it.
pub fn dtl_in(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dtl"))
        .args(args)
        .current_dir(dir)
        .output()
        .expect("the dtl binary runs")
}

/// Runs the `dtl` binary with `args` in the workspace root.
pub fn dtl(args: &[&str]) -> Output {
    dtl_in(&workspace(), args)
}

/// Output bytes as text.
pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Asserts that a run exited with 0 and did not panic; returns its standard error.
pub fn ok(out: &Output) -> String {
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}\n{}", text(&out.stdout));
    assert!(!err.contains("panicked"), "{err}");
    err
}
