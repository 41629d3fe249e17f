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
///
/// A caller tells the kinds apart by matching, not by reading the text:
///
/// ```
/// use dtl_core::DtlError;
/// fn advice(e: &DtlError) -> &'static str {
///     match e {
///         DtlError::Diverged { non_finite, .. } if *non_finite > 0 => "lower the learning rate",
///         DtlError::Env { .. } => "fix the environment variable",
///         DtlError::Setting { key, .. } if key.starts_with("data.") => "fix the data section",
///         DtlError::Shape(_) | DtlError::State(_) => "a bug in the calling code",
///         _ => "see the message",
///     }
/// }
/// let e = DtlError::diverged(3, 32, "the logits of 3 of 32 test images are not finite");
/// assert_eq!(advice(&e), "lower the learning rate");
/// let e = DtlError::setting("data.prefetch", "must be at least 1, got 0");
/// assert_eq!(advice(&e), "fix the data section");
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
    /// Sizes or shapes that must agree do not: a buffer, tensor, batch or set of targets
    /// holds a different number of values, or has a different shape, than the operation
    /// needs. The message names the item and both sizes.
    #[error("{0}")]
    Shape(String),
    /// An operation was called out of order, or a value it relies on from an earlier call
    /// is missing: reading a loss before any step, an update before a backward pass, a
    /// kept activation that was never kept.
    #[error("{0}")]
    State(String),
    /// A run diverged: a loss or logits are not finite (NaN or Inf).
    #[error("{message}")]
    Diverged {
        /// How many values are not finite: images with a non-finite logit, or 1 for a loss.
        non_finite: usize,
        /// Out of how many: the images evaluated, or 1 for a loss.
        total: usize,
        /// What diverged, where, and what to change.
        message: String,
    },
    /// An environment variable holds a value the program does not accept.
    #[error("{var} = `{value}`: use {valid}")]
    Env {
        /// The variable, such as `DTL_GRAPHS`.
        var: String,
        /// Its value, as read.
        value: String,
        /// The values that would be valid and what each does.
        valid: String,
    },
    /// A pipeline setting (a dotted key such as `data.batch_size`) has a value that cannot
    /// be used, found where the file it came from is not known.
    #[error("{key}: {message}")]
    Setting {
        /// The dotted key, such as `data.batch_size` or `augment.train[2]`.
        key: String,
        /// What is wrong and what would be valid.
        message: String,
    },
    /// An argument of a library call or of a command is out of range or does not fit the
    /// others: a batch size of 0, a label past the class count, options that exclude each
    /// other.
    #[error("{0}")]
    Argument(String),
    /// A run-time check that fits none of the other variants failed.
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

    /// A failed run-time check that fits none of the other variants.
    ///
    /// ```
    /// let e = dtl_core::DtlError::invalid("the side network injects into no block");
    /// assert!(matches!(e, dtl_core::DtlError::Invalid(_)));
    /// ```
    pub fn invalid(message: impl Into<String>) -> Self {
        DtlError::Invalid(message.into())
    }

    /// Sizes or shapes that do not agree; `message` names the item and both sizes.
    ///
    /// ```
    /// let e = dtl_core::DtlError::shape("targets hold 6 values, expected 2 images x 4 classes");
    /// assert!(matches!(e, dtl_core::DtlError::Shape(_)));
    /// ```
    pub fn shape(message: impl Into<String>) -> Self {
        DtlError::Shape(message.into())
    }

    /// Buffer `name` of operation `op` holds `got` values where the operation reads at
    /// least `want`.
    ///
    /// ```
    /// let e = dtl_core::DtlError::buffer_len("layer_norm", "x", 6, 8);
    /// assert_eq!(e.to_string(), "layer_norm: buffer `x` holds 6 values, needs at least 8");
    /// ```
    pub fn buffer_len(op: &str, name: &str, got: usize, want: usize) -> Self {
        DtlError::Shape(format!(
            "{op}: buffer `{name}` holds {got} values, needs at least {want}"
        ))
    }

    /// `what` (which says its shape) needs `want` values but `got` were given.
    ///
    /// ```
    /// let e = dtl_core::DtlError::value_count("parameter `w`: shape [2, 3]", 6, 5);
    /// assert_eq!(e.to_string(), "parameter `w`: shape [2, 3] needs 6 values, got 5");
    /// ```
    pub fn value_count(what: &str, want: usize, got: usize) -> Self {
        DtlError::Shape(format!("{what} needs {want} values, got {got}"))
    }

    /// An operation called out of order, or missing what an earlier call leaves behind.
    ///
    /// ```
    /// let e = dtl_core::DtlError::state("no step has run yet");
    /// assert!(matches!(e, dtl_core::DtlError::State(_)));
    /// ```
    pub fn state(message: impl Into<String>) -> Self {
        DtlError::State(message.into())
    }

    /// A value the backward pass needs (`what`, such as `input of block 3`) was not kept by
    /// the forward pass.
    ///
    /// ```
    /// let e = dtl_core::DtlError::not_kept("input of block 3");
    /// assert_eq!(e.to_string(), "the input of block 3 was not kept");
    /// ```
    pub fn not_kept(what: &str) -> Self {
        DtlError::State(format!("the {what} was not kept"))
    }

    /// A diverged run: `non_finite` of `total` values (images, or 1 of 1 for a loss) are
    /// not finite; `message` says what diverged and what to change.
    ///
    /// ```
    /// let e = dtl_core::DtlError::diverged(1, 1, "the loss became NaN at epoch 1 step 3");
    /// assert!(matches!(e, dtl_core::DtlError::Diverged { non_finite: 1, total: 1, .. }));
    /// ```
    pub fn diverged(non_finite: usize, total: usize, message: impl Into<String>) -> Self {
        DtlError::Diverged {
            non_finite,
            total,
            message: message.into(),
        }
    }

    /// Environment variable `var` holds `value`; `valid` lists what would be valid.
    ///
    /// ```
    /// let e = dtl_core::DtlError::env("DTL_GRAPHS", "2", "1 or 0");
    /// assert_eq!(e.to_string(), "DTL_GRAPHS = `2`: use 1 or 0");
    /// ```
    pub fn env(var: impl Into<String>, value: impl Into<String>, valid: impl Into<String>) -> Self {
        DtlError::Env {
            var: var.into(),
            value: value.into(),
            valid: valid.into(),
        }
    }

    /// Pipeline setting `key` has a value that cannot be used.
    ///
    /// ```
    /// let e = dtl_core::DtlError::setting("data.batch_size", "must be at least 1, got 0");
    /// assert_eq!(e.to_string(), "data.batch_size: must be at least 1, got 0");
    /// ```
    pub fn setting(key: impl Into<String>, message: impl Into<String>) -> Self {
        DtlError::Setting {
            key: key.into(),
            message: message.into(),
        }
    }

    /// An argument out of range or in conflict with the others.
    ///
    /// ```
    /// let e = dtl_core::DtlError::argument("the batch size must be at least 1");
    /// assert!(matches!(e, dtl_core::DtlError::Argument(_)));
    /// ```
    pub fn argument(message: impl Into<String>) -> Self {
        DtlError::Argument(message.into())
    }

    /// A label at or past the number of classes: `label {label} is out of range for
    /// {classes} classes`.
    ///
    /// ```
    /// let e = dtl_core::DtlError::label_range(7, 4);
    /// assert_eq!(e.to_string(), "label 7 is out of range for 4 classes");
    /// ```
    pub fn label_range(label: usize, classes: usize) -> Self {
        DtlError::Argument(format!(
            "label {label} is out of range for {classes} classes"
        ))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shape_errors_render_as_before() {
        let e = DtlError::buffer_len("adamw", "grad", 3, 8);
        assert_eq!(
            e.to_string(),
            "adamw: buffer `grad` holds 3 values, needs at least 8"
        );
        assert!(matches!(e, DtlError::Shape(_)));
        let e = DtlError::value_count("a batch of 2 images of 3x4x4", 96, 95);
        assert_eq!(
            e.to_string(),
            "a batch of 2 images of 3x4x4 needs 96 values, got 95"
        );
        assert!(matches!(e, DtlError::Shape(_)));
        let text = "targets hold 6 values, expected 2 images x 4 classes";
        assert_eq!(DtlError::shape(text).to_string(), text);
    }

    #[test]
    fn state_errors_render_as_before() {
        let e = DtlError::not_kept("input of block 3");
        assert_eq!(e.to_string(), "the input of block 3 was not kept");
        assert!(matches!(&e, DtlError::State(m) if m.contains("block 3")));
        let e = DtlError::state("update before any forward and backward pass");
        assert_eq!(e.to_string(), "update before any forward and backward pass");
    }

    #[test]
    fn diverged_keeps_counts_and_text() {
        let text =
            "the logits of 2 of 8 test images are not finite (NaN or Inf): the side network \
                    or head has diverged; lower optim.lr or set optim.clip_grad";
        let e = DtlError::diverged(2, 8, text);
        assert_eq!(e.to_string(), text);
        match e {
            DtlError::Diverged {
                non_finite, total, ..
            } => assert_eq!((non_finite, total), (2, 8)),
            other => panic!("not Diverged: {other:?}"),
        }
    }

    #[test]
    fn env_renders_variable_value_and_choices() {
        let e = DtlError::env(
            "DTL_GRAPHS",
            "yes",
            "1 (record the training step as a CUDA graph, the default) or 0 (plain launches)",
        );
        assert_eq!(
            e.to_string(),
            "DTL_GRAPHS = `yes`: use 1 (record the training step as a CUDA graph, the default) \
             or 0 (plain launches)"
        );
        assert!(
            matches!(&e, DtlError::Env { var, value, .. } if var == "DTL_GRAPHS" && value == "yes")
        );
    }

    #[test]
    fn setting_renders_key_then_message() {
        let e = DtlError::setting("data.batch_size", "must be at least 1, got 0");
        assert_eq!(e.to_string(), "data.batch_size: must be at least 1, got 0");
        assert!(matches!(&e, DtlError::Setting { key, .. } if key == "data.batch_size"));
        let e = DtlError::setting("augment.train[0].op", "unknown augment op `flip`");
        assert_eq!(
            e.to_string(),
            "augment.train[0].op: unknown augment op `flip`"
        );
    }

    #[test]
    fn argument_errors_render_as_before() {
        let e = DtlError::label_range(9, 4);
        assert_eq!(e.to_string(), "label 9 is out of range for 4 classes");
        assert!(matches!(e, DtlError::Argument(_)));
        let e = DtlError::argument("the batch size must be at least 1");
        assert_eq!(e.to_string(), "the batch size must be at least 1");
    }

    #[test]
    fn invalid_still_renders_its_message() {
        let e = DtlError::invalid("a class mask keeps no class");
        assert_eq!(e.to_string(), "a class mask keeps no class");
        assert!(matches!(e, DtlError::Invalid(_)));
    }
}
