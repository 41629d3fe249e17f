//! Checkpoint loading: timm safetensors and Google/Flax npz files.
//!
//! Both containers are read into a table of named tensors converted to `f32`; the table is
//! then mapped onto [`VitWeights`] with either timm's names (fused qkv, PyTorch layouts) or the
//! Google/Flax names (`Transformer/encoderblock_N/...`, HWIO and `(in, out)` kernels), the way
//! timm's `_load_weights` reads them. Position embeddings whose grid differs from the
//! variant's are resampled with bicubic interpolation.
//!
//! The parts: `read` (the containers and the table of tensors), `names` (the timm and
//! Google/Flax name maps) and `resample` (position embeddings on another grid).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use dtl_core::config::WeightsFormat;
use dtl_core::{BackboneSpec, DtlError, Result};

use crate::weights::VitWeights;

mod names;
mod read;
mod resample;

pub use resample::resample_pos_embed;

use names::{read_flax, read_timm};
use read::{read_tensors, Reader};

/// A checkpoint container format.
///
/// ```
/// use dtl_vit::WeightFormat;
/// assert_eq!(WeightFormat::parse("npz").unwrap(), Some(WeightFormat::Npz));
/// assert_eq!(WeightFormat::parse("auto").unwrap(), None);
/// assert!(WeightFormat::parse("pth").is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightFormat {
    /// A safetensors file (timm or Hugging Face `model.safetensors`).
    Safetensors,
    /// A NumPy `.npz` archive (Google/Flax ViT checkpoints such as `ViT-B_16.npz`).
    Npz,
}

impl WeightFormat {
    /// Parses a `backbone.format` value: `Some(format)`, or `None` for `auto`.
    ///
    /// ```
    /// use dtl_vit::WeightFormat;
    /// assert_eq!(WeightFormat::parse("safetensors").unwrap(), Some(WeightFormat::Safetensors));
    /// ```
    pub fn parse(s: &str) -> Result<Option<Self>> {
        let not_vit = || {
            DtlError::invalid(format!(
                "`{s}` is not a weights format; use \"auto\", \"safetensors\" or \"npz\""
            ))
        };
        match s.parse::<WeightsFormat>().map_err(|_| not_vit())? {
            WeightsFormat::Auto => Ok(None),
            WeightsFormat::Safetensors => Ok(Some(WeightFormat::Safetensors)),
            WeightsFormat::Npz => Ok(Some(WeightFormat::Npz)),
            // PyTorch pickles are read for Swin only.
            WeightsFormat::Pth => Err(not_vit()),
        }
    }

    /// Detects the format from the file's first bytes, falling back to its extension.
    ///
    /// ```
    /// use dtl_vit::WeightFormat;
    /// let f = WeightFormat::detect("w.bin".as_ref(), b"PK\x03\x04rest").unwrap();
    /// assert_eq!(f, WeightFormat::Npz);
    /// assert!(WeightFormat::detect("w.bin".as_ref(), b"?").is_err());
    /// ```
    pub fn detect(path: &Path, bytes: &[u8]) -> Result<Self> {
        if bytes.starts_with(b"PK\x03\x04") || bytes.starts_with(b"PK\x05\x06") {
            return Ok(WeightFormat::Npz);
        }
        if bytes.len() >= 9 && bytes[8] == b'{' {
            return Ok(WeightFormat::Safetensors);
        }
        match path.extension().and_then(|e| e.to_str()) {
            Some("safetensors") => Ok(WeightFormat::Safetensors),
            Some("npz") => Ok(WeightFormat::Npz),
            _ => Err(DtlError::file(
                path,
                "cannot tell the weights format: the file is neither a zip (npz) archive nor a safetensors file; set `backbone.format` to \"safetensors\" or \"npz\"",
            )),
        }
    }

    /// The name used in `backbone.format`.
    ///
    /// ```
    /// assert_eq!(dtl_vit::WeightFormat::Npz.name(), "npz");
    /// ```
    pub fn name(self) -> &'static str {
        match self {
            WeightFormat::Safetensors => "safetensors",
            WeightFormat::Npz => "npz",
        }
    }
}

/// What a load did, for logs and `dtl validate`.
///
/// ```no_run
/// let r = dtl_vit::check_weights("vit_base_patch16_224", "ViT-B_16.npz".as_ref(), "auto").unwrap();
/// println!("{} tensors in {} layout", r.tensors, r.layout);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct LoadReport {
    /// The checkpoint file.
    pub path: PathBuf,
    /// The container format that was read.
    pub format: WeightFormat,
    /// `timm` or `flax`.
    pub layout: &'static str,
    /// Name prefix stripped from every key (`opt/target/`, `params/`, `model.` or empty).
    pub prefix: String,
    /// Tensors used.
    pub tensors: usize,
    /// Stored element types of the used tensors (`F32`, `BF16`, ...).
    pub dtypes: Vec<String>,
    /// Classifier tensors skipped (`head`, `pre_logits`).
    pub skipped: Vec<String>,
    /// Other tensors the ViT does not use.
    pub unused: Vec<String>,
    /// Patch grid of the checkpoint's position embedding when it was resampled.
    pub resampled_from: Option<(usize, usize)>,
}

/// A patch grid (rows, columns).
type Grid = (usize, usize);

/// Loads a checkpoint for `spec`, returning the weights and what was done.
///
/// `format` is `auto`, `safetensors` or `npz` (a `&str` or a
/// [`dtl_core::config::WeightsFormat`]). Errors name the file and the tensor.
///
/// ```no_run
/// use dtl_vit::{Geometry, variants::VitBasePatch16_224};
/// let (w, report) =
///     dtl_vit::load_weights(&VitBasePatch16_224::spec(), "ViT-B_16.npz".as_ref(), "auto").unwrap();
/// assert_eq!((report.layout, w.blocks.len()), ("flax", 12));
/// ```
pub fn load_weights(
    spec: &BackboneSpec,
    path: &Path,
    format: impl AsRef<str>,
) -> Result<(VitWeights, LoadReport)> {
    let format =
        WeightFormat::parse(format.as_ref()).map_err(|e| DtlError::file(path, e.to_string()))?;
    let (format, table) = read_tensors(path, format)?;
    let has = |k: &str| table.contains_key(k);
    // Layout and prefix, as timm's loaders look for them.
    let flax_prefix = ["", "opt/target/", "params/", "params/img/"]
        .into_iter()
        .find(|p| has(&format!("{p}embedding/kernel")));
    let timm_prefix = ["", "model.", "module.", "state_dict."]
        .into_iter()
        .find(|p| has(&format!("{p}patch_embed.proj.weight")));
    let (layout, prefix) = match (timm_prefix, flax_prefix) {
        (Some(p), _) => ("timm", p),
        (None, Some(p)) => ("flax", p),
        (None, None) => {
            return Err(DtlError::file(
                path,
                format!(
                    "not a ViT checkpoint: neither timm's `patch_embed.proj.weight` nor Google/Flax `embedding/kernel` is in its {} tensors",
                    table.len()
                ),
            ))
        }
    };
    let mut r = Reader {
        path,
        prefix: prefix.to_string(),
        table,
        used: BTreeSet::new(),
        dtypes: BTreeSet::new(),
    };
    let (weights, resampled_from) = if layout == "timm" {
        read_timm(spec, &mut r)?
    } else {
        read_flax(spec, &mut r, prefix.starts_with("params/"))?
    };
    weights
        .check(spec)
        .map_err(|e| DtlError::file(path, e.to_string()))?;

    let mut skipped = Vec::new();
    let mut unused = Vec::new();
    for name in r.table.keys() {
        if r.used.contains(name) {
            continue;
        }
        let Some(rest) = name.strip_prefix(prefix) else {
            continue; // optimizer state and other trees outside the parameters
        };
        let classifier = ["head", "pre_logits", "fc_norm"]
            .iter()
            .any(|h| rest.starts_with(&format!("{h}.")) || rest.starts_with(&format!("{h}/")));
        if classifier {
            skipped.push(name.clone());
        } else {
            unused.push(name.clone());
        }
    }
    if !skipped.is_empty() {
        eprintln!(
            "info: {}: skipped classifier tensors not used by the frozen backbone: {}",
            path.display(),
            skipped.join(", ")
        );
    }
    if !unused.is_empty() {
        eprintln!(
            "info: {}: ignored tensors the ViT does not use: {}",
            path.display(),
            unused.join(", ")
        );
    }
    if let Some((gh, gw)) = resampled_from {
        eprintln!(
            "info: {}: resampled the position embedding from a {gh}x{gw} to a {}x{} patch grid (bicubic)",
            path.display(),
            spec.grid.0,
            spec.grid.1
        );
    }
    let report = LoadReport {
        path: path.to_path_buf(),
        format,
        layout,
        prefix: prefix.to_string(),
        tensors: r.used.len(),
        dtypes: r.dtypes.into_iter().collect(),
        skipped,
        unused,
        resampled_from,
    };
    Ok((weights, report))
}
