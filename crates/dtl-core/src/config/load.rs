//! Loading a pipeline: the file is parsed on its own (so that its errors carry line
//! numbers), then with the overrides merged in; paths written in the file are resolved
//! against the file's folder ([`resolve_path`]), those given on the command line against the
//! working directory.

use std::path::{Path, PathBuf};

use super::overrides::{apply_override, parse_override};
use super::PipelineConfig;
use crate::{DtlError, Result};

/// Resolves `path` against the folder of the pipeline file `base` when it is relative.
///
/// ```
/// use std::path::Path;
/// let p = dtl_core::config::resolve_path(Path::new("pipes/a.toml"), Path::new("w.safetensors"));
/// assert_eq!(p, Path::new("pipes/w.safetensors"));
/// assert_eq!(dtl_core::registry::resolve_path(Path::new("a.toml"), Path::new("/abs")), Path::new("/abs"));
/// ```
pub fn resolve_path(base: &Path, path: &Path) -> PathBuf {
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        base.parent().unwrap_or(Path::new(".")).join(path)
    }
}

/// `path` made absolute against the working directory, `.`/`..` folded where possible.
fn absolute(path: &Path) -> PathBuf {
    let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    abs.canonicalize().unwrap_or_else(|_| {
        // The path does not exist (yet): fold `..` lexically so messages stay readable.
        let mut out = PathBuf::new();
        for c in abs.components() {
            match c {
                std::path::Component::ParentDir => {
                    out.pop();
                }
                std::path::Component::CurDir => {}
                other => out.push(other),
            }
        }
        out
    })
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

fn deserialize_with_path(text: &str, file: &Path, origin: &Path) -> Result<PipelineConfig> {
    let de = toml::Deserializer::new(text);
    serde_path_to_error::deserialize::<_, PipelineConfig>(de).map_err(|e| {
        let key = e.path().to_string();
        let key = if key == "." { String::new() } else { key };
        let inner = e.into_inner();
        let line = inner.span().map(|s| line_of(text, s.start));
        let msg = inner.message().trim().to_string();
        let msg = explain(&msg);
        let _ = file;
        DtlError::config(origin, key, line, msg)
    })
}

/// Rewrites serde's messages into ones that say what would be valid.
fn explain(msg: &str) -> String {
    if let Some(rest) = msg.strip_prefix("unknown field ") {
        return format!("unknown key {rest}");
    }
    if msg.starts_with("missing field") {
        return msg.replacen("missing field", "missing required key", 1);
    }
    msg.replace("expected usize", "expected a whole number (0 or more)")
        .replace("expected u64", "expected a whole number (0 or more)")
        .replace("expected f64", "expected a number")
        .replace("expected f32", "expected a number")
}

impl PipelineConfig {
    /// Reads and parses a pipeline file, applies `key=value` overrides and resolves relative
    /// paths against the file's folder. Semantic checks are
    /// [`validate`](crate::config::validate)'s job.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| DtlError::io(path, e))?;
        Self::from_str(&text, path, overrides)
    }

    /// Parses pipeline text as if read from `path`.
    #[allow(clippy::should_implement_trait)]
    pub fn from_str(text: &str, path: &Path, overrides: &[String]) -> Result<Self> {
        // The file on its own first, so that its errors carry line numbers.
        let mut cfg = deserialize_with_path(text, path, path)?;
        let mut overridden = Vec::new();
        if !overrides.is_empty() {
            let mut table: toml::Table = toml::from_str(text)
                .map_err(|e| DtlError::config(path, "", None, e.message().to_string()))?;
            for o in overrides {
                let (k, v) = parse_override(o)?;
                apply_override(&mut table, &k, v)?;
                overridden.push(k);
            }
            let merged = toml::to_string(&table)
                .map_err(|e| DtlError::config("command line", "", None, e.to_string()))?;
            cfg =
                deserialize_with_path(&merged, path, Path::new("command line")).map_err(
                    |e| match e {
                        DtlError::Config { key, message, .. } => DtlError::config(
                            format!("{} (with overrides)", path.display()),
                            key,
                            None,
                            message,
                        ),
                        other => other,
                    },
                )?;
        }
        if cfg.run.name.is_empty() {
            cfg.run.name = path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "run".into());
        }
        // Paths written in the file are relative to the file; paths given on the command line
        // are relative to the working directory, as a shell user expects.
        let resolve = |key: &str, p: &Path| {
            if overridden.iter().any(|k| k == key) {
                absolute(p)
            } else {
                absolute(&resolve_path(path, p))
            }
        };
        if let Some(w) = &cfg.backbone.weights {
            cfg.backbone.weights = Some(resolve("backbone.weights", w));
        }
        cfg.data.root = resolve("data.root", &cfg.data.root);
        for t in &mut cfg.eval.tests {
            if let Some(r) = &t.root {
                t.root = Some(absolute(&resolve_path(path, r)));
            }
        }
        cfg.run.output_dir = absolute(&cfg.run.output_dir);
        Ok(cfg)
    }
}
