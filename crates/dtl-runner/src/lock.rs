//! One writer per run directory.
//!
//! A run holds an exclusive operating-system lock (`flock`) on `<run dir>/.lock` while it
//! writes there. The kernel releases it when the process ends, however it ends, so a killed
//! run never blocks its own resume; a second writer fails at once, naming the process that
//! holds the lock. New run directories are claimed with an atomic `create_dir`, so two runs
//! of one name started together never share one.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use dtl_core::{DtlError, Result};

/// The lock file's name inside a run directory.
pub const LOCK_FILE: &str = ".lock";

/// An exclusive lock on a run directory, released when dropped (or when the process dies).
///
/// ```
/// let dir = tempfile::tempdir().unwrap();
/// let lock = dtl_runner::lock::RunLock::acquire(dir.path()).unwrap();
/// // A second writer, even in the same process, is refused while the first holds it.
/// let e = dtl_runner::lock::RunLock::acquire(dir.path()).unwrap_err();
/// assert!(e.to_string().contains(&format!("process {}", std::process::id())), "{e}");
/// drop(lock);
/// assert!(dtl_runner::lock::RunLock::acquire(dir.path()).is_ok());
/// ```
#[derive(Debug)]
pub struct RunLock {
    _file: File,
    dir: PathBuf,
}

#[cfg(unix)]
fn try_lock(f: &File) -> std::io::Result<bool> {
    use std::os::unix::io::AsRawFd;
    // SAFETY: `flock` only reads the descriptor, which `f` keeps open for the call.
    let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if r == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(e)
    }
}

#[cfg(not(unix))]
fn try_lock(_f: &File) -> std::io::Result<bool> {
    Ok(true)
}

impl RunLock {
    /// Locks `dir` (which must exist) for this process, or says which process holds it.
    pub fn acquire(dir: &Path) -> Result<RunLock> {
        let path = dir.join(LOCK_FILE);
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| DtlError::io(&path, e))?;
        if !try_lock(&f).map_err(|e| DtlError::io(&path, e))? {
            let mut holder = String::new();
            let _ = f.read_to_string(&mut holder);
            let holder = holder.trim();
            let who = if holder.is_empty() {
                "another process".to_string()
            } else {
                format!("process {holder}")
            };
            return Err(DtlError::file(
                dir,
                format!("the run directory is in use by {who}, which is writing to it; wait for it to end (or stop it) before resuming, or start a new run"),
            ));
        }
        // Ours now: record who holds it, for the message above.
        let _ = f.set_len(0);
        let _ = f.seek(SeekFrom::Start(0));
        let _ = write!(f, "{}", std::process::id());
        let _ = f.flush();
        Ok(RunLock {
            _file: f,
            dir: dir.to_path_buf(),
        })
    }

    /// The locked directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// Claims a new run directory `<parent>/<name>`, or `<name>-2`, `<name>-3`, ... when taken:
/// each candidate is created with an atomic `create_dir`, so of two runs racing for one name
/// exactly one gets it.
///
/// ```
/// let root = tempfile::tempdir().unwrap();
/// let a = dtl_runner::lock::claim_run_dir(root.path(), "quickstart").unwrap();
/// let b = dtl_runner::lock::claim_run_dir(root.path(), "quickstart").unwrap();
/// assert_eq!(a.file_name().unwrap(), "quickstart");
/// assert_eq!(b.file_name().unwrap(), "quickstart-2");
/// ```
pub fn claim_run_dir(parent: &Path, name: &str) -> Result<PathBuf> {
    std::fs::create_dir_all(parent).map_err(|e| DtlError::io(parent, e))?;
    for i in 1..=100_000u32 {
        let p = if i == 1 {
            parent.join(name)
        } else {
            parent.join(format!("{name}-{i}"))
        };
        match std::fs::create_dir(&p) {
            Ok(()) => return Ok(p),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(DtlError::io(&p, e)),
        }
    }
    Err(DtlError::file(
        parent,
        format!(
            "100000 run directories named `{name}` exist already; set run.name or run.output_dir"
        ),
    ))
}

/// Removes the temporary files an interrupted write left in `dir` (`.<name>.tmp` of a
/// checkpoint, `<name>.tmp` of a report, for example after a full disk) and returns them.
///
/// ```
/// let dir = tempfile::tempdir().unwrap();
/// std::fs::write(dir.path().join(".last.safetensors.tmp"), b"half").unwrap();
/// std::fs::write(dir.path().join("metrics.jsonl"), b"").unwrap();
/// let gone = dtl_runner::lock::remove_partial_files(dir.path()).unwrap();
/// assert_eq!(gone.len(), 1);
/// assert!(dir.path().join("metrics.jsonl").exists());
/// ```
pub fn remove_partial_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut gone = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(gone),
        Err(e) => return Err(DtlError::io(dir, e)),
    };
    for e in entries.flatten() {
        let p = e.path();
        let is_tmp = p.extension().is_some_and(|x| x == "tmp");
        if is_tmp && p.is_file() {
            std::fs::remove_file(&p).map_err(|e| DtlError::io(&p, e))?;
            gone.push(p);
        }
    }
    gone.sort();
    Ok(gone)
}
