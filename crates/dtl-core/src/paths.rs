//! What a path on disk is, for messages that say what is there instead of what is not.

use std::path::Path;

/// What sits at a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathKind {
    /// A regular file (or a link to one).
    File,
    /// A directory.
    Dir,
    /// A device, a pipe or a socket.
    Special,
    /// Nothing.
    Missing,
}

/// What `path` is, following links.
///
/// ```
/// use dtl_core::paths::{kind, PathKind};
/// assert_eq!(kind(std::env::temp_dir().as_path()), PathKind::Dir);
/// assert_eq!(kind("/no/such/file".as_ref()), PathKind::Missing);
/// # #[cfg(unix)]
/// assert_eq!(kind("/dev/null".as_ref()), PathKind::Special);
/// ```
pub fn kind(path: &Path) -> PathKind {
    match std::fs::metadata(path) {
        Err(_) => PathKind::Missing,
        Ok(m) if m.is_file() => PathKind::File,
        Ok(m) if m.is_dir() => PathKind::Dir,
        Ok(_) => PathKind::Special,
    }
}

/// Why `path` is not a regular file, as a phrase after its name (`is a directory`,
/// `does not exist`, ...), or `None` when it is one.
///
/// ```
/// assert_eq!(dtl_core::paths::not_a_file("/no/such".as_ref()).as_deref(), Some("does not exist"));
/// assert_eq!(dtl_core::paths::not_a_file(std::env::temp_dir().as_path()).as_deref(), Some("is a directory, not a file"));
/// ```
pub fn not_a_file(path: &Path) -> Option<String> {
    match kind(path) {
        PathKind::File => None,
        PathKind::Dir => Some("is a directory, not a file".into()),
        PathKind::Special => Some("is a device or pipe, not a regular file".into()),
        PathKind::Missing => Some("does not exist".into()),
    }
}

/// Why `path` is not a directory, as a phrase after its name, or `None` when it is one.
///
/// ```
/// assert_eq!(dtl_core::paths::not_a_dir("/no/such".as_ref()).as_deref(), Some("does not exist"));
/// assert_eq!(dtl_core::paths::not_a_dir(std::env::temp_dir().as_path()), None);
/// ```
pub fn not_a_dir(path: &Path) -> Option<String> {
    match kind(path) {
        PathKind::Dir => None,
        PathKind::File => Some("is a file, not a directory".into()),
        PathKind::Special => Some("is a device or pipe, not a directory".into()),
        PathKind::Missing => Some("does not exist".into()),
    }
}
