//! Writing files that readers must never see half-written.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::{DtlError, Result};

/// The temporary name [`write_atomic`] writes `path` under first: `.<name>.tmp` in the same
/// folder, so the final rename never crosses a file system.
///
/// ```
/// let t = dtl_core::fsio::temp_path("runs/a/report.json".as_ref());
/// assert_eq!(t, std::path::PathBuf::from("runs/a/.report.json.tmp"));
/// ```
pub fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp"))
}

/// Replaces `path` with `contents` atomically: writes a temporary file in the same folder,
/// flushes it to disk, renames it over `path` and flushes the folder. A reader sees the old
/// file or the new one, never a part; after a crash at worst a `.<name>.tmp` file is left.
/// Missing parent folders are created.
///
/// ```
/// let dir = tempfile::tempdir().unwrap();
/// let p = dir.path().join("report.json");
/// dtl_core::fsio::write_atomic(&p, b"{}\n").unwrap();
/// dtl_core::fsio::write_atomic(&p, b"{\"top1\": 0.5}\n").unwrap();
/// assert_eq!(std::fs::read_to_string(&p).unwrap(), "{\"top1\": 0.5}\n");
/// assert!(!dtl_core::fsio::temp_path(&p).exists());
/// ```
pub fn write_atomic(path: &Path, contents: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir).map_err(|e| DtlError::io(dir, e))?;
    let tmp = temp_path(path);
    let written = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(contents)?;
        f.sync_all()
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(DtlError::io(&tmp, e));
    }
    if let Err(e) = std::fs::rename(&tmp, path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(DtlError::io(path, e));
    }
    // The rename is durable once the folder's entry is on disk; not every platform can open
    // a folder for syncing, and the file itself is already complete.
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}
