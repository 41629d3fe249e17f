//! Loading Swin weights: timm `model.safetensors` files (timm 0.9+/1.0 names), PyTorch
//! `torch.save` checkpoints, or any table of named tensors, in the timm 1.0 layout or the
//! original release's layout.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use dtl_core::config::WeightsFormat;
use dtl_core::{DtlError, Result};

use crate::weights::{MergeWeights, SwinBlockWeights, SwinWeights};
use crate::SwinConfig;

/// One named tensor on the host, converted to `f32`, with its shape.
///
/// ```
/// let t = dtl_swin::HostTensor::new(vec![2, 1], vec![1.0, 2.0]);
/// assert_eq!(t.shape, vec![2, 1]);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    /// Shape, outermost first.
    pub shape: Vec<usize>,
    /// Values, row-major.
    pub data: Vec<f32>,
}

impl HostTensor {
    /// A tensor from its shape and values.
    ///
    /// ```
    /// assert_eq!(dtl_swin::HostTensor::new(vec![3], vec![0.0; 3]).data.len(), 3);
    /// ```
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Self {
        HostTensor { shape, data }
    }
}

/// Which names a table of tensors uses for the patch mergings.
///
/// ```
/// assert_eq!(dtl_swin::SwinLayout::Timm.describe(), "timm 1.0 (patch merging at the start of stages 1..)");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SwinLayout {
    /// timm 1.0: `layers.<s>.downsample` for `s >= 1` is the transition into stage `s`.
    Timm,
    /// The original release (and timm before 0.9's remapping): `layers.<s>.downsample` for
    /// `s` = 0..stages-2 is the transition into stage `s + 1`.
    Original,
}

impl SwinLayout {
    /// The layout in words.
    ///
    /// ```
    /// assert!(dtl_swin::SwinLayout::Original.describe().contains("end"));
    /// ```
    pub fn describe(self) -> &'static str {
        match self {
            SwinLayout::Timm => "timm 1.0 (patch merging at the start of stages 1..)",
            SwinLayout::Original => "original (patch merging at the end of stages ..-1)",
        }
    }
}

/// Reads every tensor of a safetensors file, converting F32, F16, BF16 and F64 to `f32`;
/// tensors of other types (integer buffers) are left out.
///
/// ```no_run
/// let t = dtl_swin::read_safetensors("model.safetensors".as_ref()).unwrap();
/// println!("{} tensors", t.len());
/// ```
pub fn read_safetensors(path: &Path) -> Result<BTreeMap<String, HostTensor>> {
    use safetensors::Dtype;
    let bytes = std::fs::read(path).map_err(|e| DtlError::io(path, e))?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| {
        DtlError::file(
            path,
            format!("not a valid safetensors file (truncated or corrupt?): {e:?}"),
        )
    })?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        let d = view.data();
        let data: Vec<f32> = match view.dtype() {
            Dtype::F32 => d
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::F16 => d
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::BF16 => d
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::F64 => d
                .chunks_exact(8)
                .map(|c| {
                    f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32
                })
                .collect(),
            _ => continue,
        };
        out.insert(name, HostTensor::new(view.shape().to_vec(), data));
    }
    Ok(out)
}

/// Reads the float tensors of a PyTorch `torch.save` checkpoint (zip format) without running
/// pickled code: the state dict under `model` (Microsoft's releases), `state_dict`, or at the
/// top level.
///
/// ```no_run
/// let t = dtl_swin::read_pth("swin_base_patch4_window7_224_22k.pth".as_ref()).unwrap();
/// assert!(t.contains_key("layers.0.downsample.reduction.weight")); // the original layout
/// ```
pub fn read_pth(path: &Path) -> Result<BTreeMap<String, HostTensor>> {
    let sd = dtl_pth::read_state_dict(path)
        .map_err(|e| DtlError::file(path, format!("{e}{PTH_HINT}")))?;
    Ok(sd
        .into_iter()
        .filter(|(_, t)| t.dtype.is_float())
        .map(|(k, t)| {
            let data = t.to_f32();
            (k, HostTensor::new(t.shape, data))
        })
        .collect())
}

/// Loads a Swin checkpoint into the variant `cfg`: a timm `model.safetensors`, or a PyTorch
/// `torch.save` file such as Microsoft's `.pth` releases (read by [`read_pth`]). `format` is
/// `auto` (told apart by the file's first bytes), `safetensors` or `pth` (also spelt `pt` or
/// `torch`), as a `&str` or a [`dtl_core::config::WeightsFormat`].
///
/// ```no_run
/// let cfg = dtl_swin::variant("swin_tiny_patch4_window7_224").unwrap();
/// let w = dtl_swin::load_weights(&cfg, "model.safetensors".as_ref(), "auto").unwrap();
/// ```
pub fn load_weights(cfg: &SwinConfig, path: &Path, format: impl AsRef<str>) -> Result<SwinWeights> {
    let format = format.as_ref();
    let parsed = match format {
        "pt" | "torch" => Ok(WeightsFormat::Pth),
        other => other.parse::<WeightsFormat>(),
    };
    let torch = match parsed {
        Ok(WeightsFormat::Auto) => is_torch_pickle(path),
        Ok(WeightsFormat::Safetensors) => false,
        Ok(WeightsFormat::Pth) => true,
        Ok(WeightsFormat::Npz) | Err(_) => {
            return Err(DtlError::file(
                path,
                format!(
                    "`{format}` is not a weights format for Swin; use \"auto\", \"safetensors\" or \"pth\""
                ),
            ))
        }
    };
    let table = if torch {
        read_pth(path)?
    } else {
        read_safetensors(path)?
    };
    SwinWeights::from_tensors(cfg, table, &path.display().to_string())
}

/// What to do when a PyTorch checkpoint cannot be read.
const PTH_HINT: &str =
    "; or convert it once to safetensors with python: `import torch, safetensors.torch as st; \
sd = torch.load('in.pth', map_location='cpu'); sd = sd.get('model', sd); \
st.save_file({k: v.contiguous() for k, v in sd.items()}, 'out.safetensors')` \
(timm 1.0's and the original release's names are both recognised)";

/// Whether `path` starts like a `torch.save` file: a zip archive holding `data.pkl`, or a
/// legacy pickle (protocol 2 to 5).
fn is_torch_pickle(path: &Path) -> bool {
    use std::io::Read;
    let mut head = [0u8; 4];
    let ok = std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut head))
        .is_ok();
    ok && (head == *b"PK\x03\x04" || (head[0] == 0x80 && (2..=5).contains(&head[1])))
}

/// Takes tensors out of a table, remembering what is missing and what was used.
struct Reader<'a> {
    source: &'a str,
    prefix: String,
    table: BTreeMap<String, HostTensor>,
    used: BTreeSet<String>,
    missing: Vec<String>,
}

impl Reader<'_> {
    fn err(&self, m: String) -> DtlError {
        DtlError::invalid(format!("{}: {m}", self.source))
    }

    /// The tensor `name` (no prefix) with its stored shape; a missing one is remembered and
    /// `None` returned.
    fn take_any(&mut self, name: &str) -> Result<Option<HostTensor>> {
        let full = format!("{}{name}", self.prefix);
        let Some(t) = self.table.get(&full) else {
            self.missing.push(full);
            return Ok(None);
        };
        let need = t.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        if need != Some(t.data.len()) {
            return Err(self.err(format!(
                "tensor `{full}`: shape {:?} needs {} values, {} given",
                t.shape,
                need.map_or("more than 2^64".into(), |n| n.to_string()),
                t.data.len()
            )));
        }
        if let Some(i) = t.data.iter().position(|v| !v.is_finite()) {
            return Err(self.err(format!(
                "tensor `{full}`: value {i} is {} (not finite)",
                t.data[i]
            )));
        }
        self.used.insert(full);
        Ok(Some(t.clone()))
    }

    /// The tensor `name` of shape `expect` (empty when missing).
    fn take(&mut self, name: &str, expect: &[usize]) -> Result<Vec<f32>> {
        let Some(t) = self.take_any(name)? else {
            return Ok(Vec::new());
        };
        if t.shape != expect {
            return Err(self.err(format!(
                "tensor `{}{name}`: expected shape {expect:?}, found {:?}",
                self.prefix, t.shape
            )));
        }
        Ok(t.data)
    }

    /// A relative-position bias table of `heads` columns for a `w x w` window, resampled
    /// (bicubic, per head, as timm does) when the stored one is for another window.
    fn table(&mut self, name: &str, w: usize, heads: usize) -> Result<Vec<f32>> {
        let Some(t) = self.take_any(name)? else {
            return Ok(Vec::new());
        };
        let side = 2 * w - 1;
        let expect = [side * side, heads];
        if t.shape == expect {
            return Ok(t.data);
        }
        let full = format!("{}{name}", self.prefix);
        let stored_side = match t.shape.as_slice() {
            [n, h] if *h == heads => {
                let s = (*n as f64).sqrt().round() as usize;
                (s * s == *n && s % 2 == 1).then_some(s)
            }
            _ => None,
        };
        let Some(s) = stored_side else {
            return Err(self.err(format!(
                "tensor `{full}`: expected shape {expect:?}, found {:?} (not a ((2w-1)^2, {heads}) table that could be resampled)",
                t.shape
            )));
        };
        Ok(dtl_vit::resample_pos_embed(
            &t.data,
            (s, s),
            (side, side),
            0,
            heads,
        ))
    }
}

impl SwinWeights {
    /// The weights of variant `cfg` from a table of named tensors (a parsed `state_dict`),
    /// with timm's names: timm 1.0's layout, or the original release's (patch merging at the
    /// end of stages `0..stages-1`), told apart by where the first merging is. A `model.` or
    /// `module.` prefix is stripped; `relative_position_index`, `attn_mask` and classifier
    /// (`head.*`) tensors are ignored; a relative-position bias table made for another window
    /// is resampled. `source` names the table in errors.
    ///
    /// Errors list every missing tensor, or name a tensor whose shape differs from the
    /// variant's with both shapes.
    ///
    /// ```
    /// use std::collections::BTreeMap;
    /// let cfg = dtl_swin::SwinConfig::new("t", 8, 2, 4, &[1, 1], &[1, 1], 2);
    /// let mut t = BTreeMap::new();
    /// t.insert("patch_embed.proj.weight".to_string(), dtl_swin::HostTensor::new(vec![4, 3, 2, 2], vec![0.0; 48]));
    /// let e = dtl_swin::SwinWeights::from_tensors(&cfg, t, "state").unwrap_err().to_string();
    /// assert!(e.contains("missing") && e.contains("layers.1.downsample.reduction.weight"), "{e}");
    /// ```
    pub fn from_tensors(
        cfg: &SwinConfig,
        table: BTreeMap<String, HostTensor>,
        source: &str,
    ) -> Result<SwinWeights> {
        Ok(Self::from_tensors_with_layout(cfg, table, source)?.0)
    }

    /// [`SwinWeights::from_tensors`], also saying which layout the table was in.
    ///
    /// ```
    /// use std::collections::BTreeMap;
    /// let cfg = dtl_swin::SwinConfig::new("t", 8, 2, 4, &[1, 1], &[1, 1], 2);
    /// let e = dtl_swin::SwinWeights::from_tensors_with_layout(&cfg, BTreeMap::new(), "empty").unwrap_err();
    /// assert!(e.to_string().contains("patch_embed.proj.weight"));
    /// ```
    pub fn from_tensors_with_layout(
        cfg: &SwinConfig,
        table: BTreeMap<String, HostTensor>,
        source: &str,
    ) -> Result<(SwinWeights, SwinLayout)> {
        cfg.check()?;
        let has = |k: &str| table.contains_key(k);
        let prefix = ["", "model.", "module.", "state_dict."]
            .into_iter()
            .find(|p| has(&format!("{p}patch_embed.proj.weight")))
            .unwrap_or("");
        let layout =
            if cfg.stages() > 1 && has(&format!("{prefix}layers.0.downsample.reduction.weight")) {
                SwinLayout::Original
            } else {
                SwinLayout::Timm
            };
        let mut r = Reader {
            source,
            prefix: prefix.to_string(),
            table,
            used: BTreeSet::new(),
            missing: Vec::new(),
        };
        let (c0, p, ci) = (cfg.embed_dim, cfg.patch_size, cfg.in_chans);
        let patch_w = r.take("patch_embed.proj.weight", &[c0, ci, p, p])?;
        let patch_b = r.take("patch_embed.proj.bias", &[c0])?;
        let patch_norm_w = r.take("patch_embed.norm.weight", &[c0])?;
        let patch_norm_b = r.take("patch_embed.norm.bias", &[c0])?;
        let mut blocks = Vec::new();
        let mut merges = Vec::new();
        for s in 0..cfg.stages() {
            let c = cfg.width(s);
            let h = cfg.mlp_ratio * c;
            if s > 0 {
                let at = match layout {
                    SwinLayout::Timm => s,
                    SwinLayout::Original => s - 1,
                };
                let cin = cfg.width(s - 1);
                let k = |t: &str| format!("layers.{at}.downsample.{t}");
                merges.push(MergeWeights {
                    norm_w: r.take(&k("norm.weight"), &[4 * cin])?,
                    norm_b: r.take(&k("norm.bias"), &[4 * cin])?,
                    reduction_w: r.take(&k("reduction.weight"), &[2 * cin, 4 * cin])?,
                });
            }
            for j in 0..cfg.depths[s] {
                let k = |t: &str| format!("layers.{s}.blocks.{j}.{t}");
                blocks.push(SwinBlockWeights {
                    norm1_w: r.take(&k("norm1.weight"), &[c])?,
                    norm1_b: r.take(&k("norm1.bias"), &[c])?,
                    qkv_w: r.take(&k("attn.qkv.weight"), &[3 * c, c])?,
                    qkv_b: r.take(&k("attn.qkv.bias"), &[3 * c])?,
                    proj_w: r.take(&k("attn.proj.weight"), &[c, c])?,
                    proj_b: r.take(&k("attn.proj.bias"), &[c])?,
                    rel_table: r.table(
                        &k("attn.relative_position_bias_table"),
                        cfg.stage_window(s),
                        cfg.heads[s],
                    )?,
                    norm2_w: r.take(&k("norm2.weight"), &[c])?,
                    norm2_b: r.take(&k("norm2.bias"), &[c])?,
                    fc1_w: r.take(&k("mlp.fc1.weight"), &[h, c])?,
                    fc1_b: r.take(&k("mlp.fc1.bias"), &[h])?,
                    fc2_w: r.take(&k("mlp.fc2.weight"), &[c, h])?,
                    fc2_b: r.take(&k("mlp.fc2.bias"), &[c])?,
                });
            }
        }
        let cl = cfg.width(cfg.stages() - 1);
        let norm_w = r.take("norm.weight", &[cl])?;
        let norm_b = r.take("norm.bias", &[cl])?;
        if !r.missing.is_empty() {
            let hint = dtl_core::error::closest(&r.missing[0], r.table.keys().map(|s| s.as_str()))
                .map(|c| format!(" (the closest name to the first is `{c}`)"))
                .unwrap_or_default();
            return Err(r.err(format!(
                "{} tensor(s) of {} ({} layout) are missing: {}{hint}; the table has {} tensors",
                r.missing.len(),
                cfg.name,
                layout.describe(),
                r.missing
                    .iter()
                    .map(|m| format!("`{m}`"))
                    .collect::<Vec<_>>()
                    .join(", "),
                r.table.len()
            )));
        }
        let ignored = |k: &str| {
            k.ends_with("relative_position_index")
                || k.ends_with("attn_mask")
                || k.strip_prefix(prefix)
                    .is_some_and(|rest| rest.starts_with("head.") || rest.starts_with("head_"))
        };
        let unused: Vec<&String> = r
            .table
            .keys()
            .filter(|k| !r.used.contains(*k) && !ignored(k))
            .collect();
        if !unused.is_empty() {
            eprintln!(
                "info: {source}: ignored tensors the Swin backbone does not use: {}",
                unused
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        let w = SwinWeights {
            patch_w,
            patch_b,
            patch_norm_w,
            patch_norm_b,
            blocks,
            merges,
            norm_w,
            norm_b,
        };
        w.check(cfg)?;
        Ok((w, layout))
    }
}
