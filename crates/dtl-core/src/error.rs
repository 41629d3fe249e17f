//! Errors shared by every crate of the workspace.

use std::path::PathBuf;

/// The one error type of dtl.
///
/// Every variant renders as a single line that names what was wrong and, where it
/// applies, the file and key involved and what would be valid.
///
/// ```
/// use dtl_core::DtlError;
/// let e = DtlError::config("run.toml", "side.rank", None, "must be at least 1, got 0");
/// assert_eq!(e.to_string(), "run.toml: key `side.rank`: must be at least 1, got 0");
/// ```
#[derive(Debug, thiserror::Error)]
pub enum DtlError {
    /// A pipeline file (or an override) is malformed or invalid.
    #[error("{}", render_config(.file, .key, .line, .message))]
    Config {
        /// The pipeline file, or `<override>` for a command-line override.
        file: PathBuf,
        /// Dotted key path such as `backbone.kind`; empty when the error is about the whole file.
        key: String,
        /// 1-based line in the file, when known.
        line: Option<usize>,
        /// What is wrong and what would be valid.
        message: String,
    },
    /// A name that is not registered.
    #[error("unknown {kind} `{name}`{}; registered {kind}s: {}", suggest(.suggestion), .registered.join(", "))]
    UnknownComponent {
        /// Which registry: `backbone`, `side network`, ...
        kind: &'static str,
        /// The name asked for.
        name: String,
        /// The closest registered name, if any is close.
        suggestion: Option<String>,
        /// Every registered name, sorted.
        registered: Vec<String>,
    },
    /// Two registrations share a name.
    #[error("duplicate {kind} registration `{name}`: registered by {first} and by {second}")]
    DuplicateComponent {
        /// Which registry.
        kind: &'static str,
        /// The shared name.
        name: String,
        /// Where the first registration comes from (crate or module path).
        first: String,
        /// Where the second one comes from.
        second: String,
    },
    /// A weights, data or checkpoint file could not be read or is malformed.
    #[error("{}: {message}", .path.display())]
    File {
        /// The file involved.
        path: PathBuf,
        /// What went wrong, naming the tensor, line or item.
        message: String,
    },
    /// A shape or value check failed at run time.
    #[error("{0}")]
    Invalid(String),
    /// The requested device or feature is not available in this build or on this machine.
    #[error("{0}")]
    Unavailable(String),
    /// An operating-system I/O error, with the path involved.
    #[error("{}: {source}", .path.display())]
    Io {
        /// The file or folder involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// An error raised by a tensor device (allocation failure, kernel launch failure).
    #[error("device error: {0}")]
    Device(String),
}

fn render_config(file: &std::path::Path, key: &str, line: &Option<usize>, message: &str) -> String {
    let mut out = file.display().to_string();
    if let Some(line) = line {
        out.push_str(&format!(":{line}"));
    }
    if !key.is_empty() {
        out.push_str(&format!(": key `{key}`"));
    }
    out.push_str(": ");
    out.push_str(message);
    out
}

fn suggest(s: &Option<String>) -> String {
    match s {
        Some(s) => format!(" (did you mean `{s}`?)"),
        None => String::new(),
    }
}

impl DtlError {
    /// A configuration error about `key` in `file`.
    pub fn config(
        file: impl Into<PathBuf>,
        key: impl Into<String>,
        line: Option<usize>,
        message: impl Into<String>,
    ) -> Self {
        DtlError::Config {
            file: file.into(),
            key: key.into(),
            line,
            message: message.into(),
        }
    }

    /// An error about a file's contents.
    pub fn file(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        DtlError::File {
            path: path.into(),
            message: message.into(),
        }
    }

    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        DtlError::Io {
            path: path.into(),
            source,
        }
    }

    /// A failed run-time check.
    pub fn invalid(message: impl Into<String>) -> Self {
        DtlError::Invalid(message.into())
    }
}

/// Result alias used throughout dtl.
pub type Result<T, E = DtlError> = std::result::Result<T, E>;

/// The closest name in `candidates` to `name`, if one is reasonably close.
///
/// ```
/// let names = ["vit_base_patch16_224", "vit_tiny_patch16_224"];
/// assert_eq!(dtl_core::error::closest("vit_bse_patch16_224", names.iter().copied()),
///            Some("vit_base_patch16_224".to_string()));
/// assert_eq!(dtl_core::error::closest("resnet", names.iter().copied()), None);
/// assert_eq!(dtl_core::error::closest("dtlplus", ["dtl", "dtl+"]), Some("dtl+".to_string()));
/// ```
pub fn closest<'a>(name: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<String> {
    // Compare spellings, not punctuation: `dtl+`, `DTL_plus` and `dtlplus` are the same word.
    fn fold(s: &str) -> String {
        s.to_lowercase()
            .replace('+', "plus")
            .chars()
            .filter(|c| c.is_alphanumeric())
            .collect()
    }
    let folded = fold(name);
    let mut best: Option<(f64, &str)> = None;
    for c in candidates {
        let score = strsim::normalized_damerau_levenshtein(name, c)
            .max(strsim::normalized_damerau_levenshtein(&folded, &fold(c)));
        if best.map(|(s, _)| score > s).unwrap_or(true) {
            best = Some((score, c));
        }
    }
    best.filter(|(s, _)| *s >= 0.6).map(|(_, c)| c.to_string())
}
