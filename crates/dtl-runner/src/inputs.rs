//! What a run depends on: fingerprints of the backbone weights file and the data files.
//!
//! A checkpoint records them (in its `state`, under `inputs`); `--resume` and `dtl eval`
//! compare them with the files as they are now and say what changed, so replacing the
//! weights file at the same path is never silent.

use std::io::Read;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

/// Size and CRC-32 of a file, as `{"path", "bytes", "crc32"}`; `{"path", "missing": true}`
/// when it cannot be read.
///
/// ```
/// let dir = tempfile::tempdir().unwrap();
/// let p = dir.path().join("w.bin");
/// std::fs::write(&p, b"abc").unwrap();
/// let f = dtl_runner::inputs::file_fingerprint(&p);
/// assert_eq!((f["bytes"].as_u64(), f["crc32"].as_str()), (Some(3), Some("352441c2")));
/// ```
pub fn file_fingerprint(path: &Path) -> Value {
    let shown = path.display().to_string();
    let Ok(mut f) = std::fs::File::open(path) else {
        return json!({"path": shown, "missing": true});
    };
    let mut h = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        match f.read(&mut buf) {
            Ok(0) => break,
            Ok(k) => {
                h.update(&buf[..k]);
                n += k as u64;
            }
            Err(_) => return json!({"path": shown, "missing": true}),
        }
    }
    json!({"path": shown, "bytes": n, "crc32": format!("{:08x}", h.finalize())})
}

/// The fingerprints of a run's inputs: the weights file (if any) and each data file.
///
/// ```
/// let v = dtl_runner::inputs::fingerprint(None, &[]);
/// assert!(v["weights"].is_null() && v["data"].as_array().unwrap().is_empty());
/// ```
pub fn fingerprint(weights: Option<&Path>, data: &[PathBuf]) -> Value {
    json!({
        "weights": weights.map(file_fingerprint),
        "data": data.iter().map(|p| file_fingerprint(p)).collect::<Vec<_>>(),
    })
}

fn describe(v: &Value) -> String {
    if v["missing"] == true {
        "missing".to_string()
    } else {
        format!(
            "{} bytes, crc32 {}",
            v["bytes"],
            v["crc32"].as_str().unwrap_or("?")
        )
    }
}

/// What changed between the `stored` and the `current` fingerprints, one line per file
/// (`backbone weights <path>: 830528 bytes, crc32 1a2b3c4d -> ...`); empty when nothing
/// did, or when `stored` holds no fingerprints (a checkpoint written before they existed).
///
/// ```
/// use dtl_runner::inputs::changes;
/// use serde_json::json;
/// let a = json!({"weights": {"path": "w", "bytes": 3, "crc32": "00000001"}, "data": []});
/// let b = json!({"weights": {"path": "w", "bytes": 3, "crc32": "00000002"}, "data": []});
/// assert_eq!(changes(&a, &b), vec!["backbone weights w: 3 bytes, crc32 00000001 -> 3 bytes, crc32 00000002"]);
/// assert!(changes(&a, &a).is_empty());
/// assert!(changes(&serde_json::Value::Null, &b).is_empty());
/// ```
pub fn changes(stored: &Value, current: &Value) -> Vec<String> {
    let mut out = Vec::new();
    if stored.is_null() {
        return out;
    }
    let same = |a: &Value, b: &Value| a["bytes"] == b["bytes"] && a["crc32"] == b["crc32"];
    match (&stored["weights"], &current["weights"]) {
        (Value::Null, Value::Null) => {}
        (a, Value::Null) => out.push(format!(
            "backbone weights: the checkpoint was trained with {}, the pipeline now uses random weights",
            a["path"].as_str().unwrap_or("?")
        )),
        (Value::Null, b) => out.push(format!(
            "backbone weights: the checkpoint was trained with random weights, the pipeline now loads {}",
            b["path"].as_str().unwrap_or("?")
        )),
        (a, b) if a["path"] != b["path"] => out.push(format!(
            "backbone weights: {} -> {} ({})",
            a["path"].as_str().unwrap_or("?"),
            b["path"].as_str().unwrap_or("?"),
            if same(a, b) { "same contents" } else { "different contents" }
        )),
        (a, b) if !same(a, b) => out.push(format!(
            "backbone weights {}: {} -> {}",
            a["path"].as_str().unwrap_or("?"),
            describe(a),
            describe(b)
        )),
        _ => {}
    }
    let empty = Vec::new();
    let old = stored["data"].as_array().unwrap_or(&empty);
    let new = current["data"].as_array().unwrap_or(&empty);
    for a in old {
        match new.iter().find(|b| b["path"] == a["path"]) {
            None => out.push(format!(
                "data file {}: no longer used",
                a["path"].as_str().unwrap_or("?")
            )),
            Some(b) if !same(a, b) => out.push(format!(
                "data file {}: {} -> {}",
                a["path"].as_str().unwrap_or("?"),
                describe(a),
                describe(b)
            )),
            _ => {}
        }
    }
    for b in new {
        if !old.iter().any(|a| a["path"] == b["path"]) {
            out.push(format!(
                "data file {}: not used in training",
                b["path"].as_str().unwrap_or("?")
            ));
        }
    }
    out
}
