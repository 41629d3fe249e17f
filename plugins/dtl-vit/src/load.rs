//! Checkpoint loading: timm safetensors and Google/Flax npz files.
//!
//! Both containers are read into a table of named tensors converted to `f32`; the table is
//! then mapped onto [`VitWeights`] with either timm's names (fused qkv, PyTorch layouts) or the
//! Google/Flax names (`Transformer/encoderblock_N/...`, HWIO and `(in, out)` kernels), the way
//! timm's `_load_weights` reads them. Position embeddings whose grid differs from the
//! variant's are resampled with bicubic interpolation.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::{Path, PathBuf};

use dtl_core::config::WeightsFormat;
use dtl_core::{BackboneSpec, DtlError, Result};

use crate::weights::{BlockWeights, VitWeights};

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

/// One stored tensor converted to `f32` (or the reason it cannot be).
#[derive(Debug, Clone)]
struct RawTensor {
    shape: Vec<usize>,
    dtype: String,
    data: std::result::Result<Vec<f32>, String>,
}

/// Reads a whole checkpoint into a table of tensors.
fn read_tensors(
    path: &Path,
    format: Option<WeightFormat>,
) -> Result<(WeightFormat, BTreeMap<String, RawTensor>)> {
    let bytes = std::fs::read(path).map_err(|e| DtlError::io(path, e))?;
    let format = match format {
        Some(f) => f,
        None => WeightFormat::detect(path, &bytes)?,
    };
    let table = match format {
        WeightFormat::Safetensors => read_safetensors(path, &bytes)?,
        WeightFormat::Npz => read_npz(path, &bytes)?,
    };
    Ok((format, table))
}

fn read_safetensors(path: &Path, bytes: &[u8]) -> Result<BTreeMap<String, RawTensor>> {
    use safetensors::Dtype;
    let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| {
        DtlError::file(
            path,
            format!("not a valid safetensors file (truncated or corrupt?): {e:?}"),
        )
    })?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        let data = view.data();
        let dtype = format!("{:?}", view.dtype());
        let converted = match view.dtype() {
            Dtype::F32 => Ok(data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()),
            Dtype::F16 => Ok(data
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect()),
            Dtype::BF16 => Ok(data
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect()),
            Dtype::F64 => Ok(data
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8])) as f32)
                .collect()),
            other => Err(format!(
                "dtype {other:?} is not supported; use F32, F16, BF16 or F64"
            )),
        };
        out.insert(
            name,
            RawTensor {
                shape: view.shape().to_vec(),
                dtype,
                data: converted,
            },
        );
    }
    Ok(out)
}

fn read_npz(path: &Path, bytes: &[u8]) -> Result<BTreeMap<String, RawTensor>> {
    let corrupt = |m: String| DtlError::file(path, m);
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(bytes)).map_err(|e| {
        corrupt(format!(
            "not a valid npz (zip) archive (truncated or corrupt?): {e}"
        ))
    })?;
    let mut out = BTreeMap::new();
    for i in 0..zip.len() {
        let mut entry = zip
            .by_index(i)
            .map_err(|e| corrupt(format!("npz entry {i} cannot be read: {e}")))?;
        let entry_name = entry.name().to_string();
        let name = entry_name
            .strip_suffix(".npy")
            .unwrap_or(&entry_name)
            .to_string();
        // The sizes an archive announces are not trusted: reserve at most what the archive
        // could plausibly hold and stop reading at the memory limit.
        let limit = dtl_core::limits::memory_limit().0;
        let mut buf =
            Vec::with_capacity(entry.size().min(bytes.len() as u64 * 8).min(1 << 30) as usize);
        (&mut entry)
            .take(limit)
            .read_to_end(&mut buf)
            .map_err(|e| {
                corrupt(format!(
                    "tensor `{name}`: cannot be read (truncated or corrupt archive?): {e}"
                ))
            })?;
        if buf.len() as u64 >= limit {
            return Err(corrupt(format!(
                "tensor `{name}`: decompresses to more than {}, the memory limit",
                dtl_core::limits::human(limit)
            )));
        }
        let t = parse_npy(&buf).map_err(|m| corrupt(format!("tensor `{name}`: {m}")))?;
        out.insert(name, t);
    }
    Ok(out)
}

/// Parses one `.npy` payload.
fn parse_npy(buf: &[u8]) -> std::result::Result<RawTensor, String> {
    if buf.len() < 10 || &buf[..6] != b"\x93NUMPY" {
        return Err("not a .npy array (bad magic bytes)".into());
    }
    let major = buf[6];
    let (hlen, start) = match major {
        1 => (u16::from_le_bytes([buf[8], buf[9]]) as usize, 10),
        2 | 3 => {
            if buf.len() < 12 {
                return Err("truncated .npy header".into());
            }
            (
                u32::from_le_bytes([buf[8], buf[9], buf[10], buf[11]]) as usize,
                12,
            )
        }
        v => return Err(format!("unsupported .npy version {v}")),
    };
    let header = buf
        .get(start..start + hlen)
        .ok_or("truncated .npy header")?;
    let header = std::str::from_utf8(header).map_err(|_| "the .npy header is not text")?;
    let descr = dict_value(header, "descr").ok_or("the .npy header has no `descr`")?;
    let descr = descr.trim_matches(|c| c == '\'' || c == '"');
    let fortran = dict_value(header, "fortran_order")
        .map(|v| v.starts_with("True"))
        .unwrap_or(false);
    let shape_txt = dict_value(header, "shape").ok_or("the .npy header has no `shape`")?;
    let shape_txt = shape_txt
        .trim()
        .strip_prefix('(')
        .and_then(|s| s.split(')').next())
        .ok_or("malformed `shape` in the .npy header")?;
    let shape: Vec<usize> = shape_txt
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<usize>())
        .collect::<std::result::Result<_, _>>()
        .map_err(|_| "malformed `shape` in the .npy header")?;
    let count = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| format!("shape {shape:?} overflows when multiplied"))?;
    let body = &buf[start + hlen..];
    let (little, kind) = match descr.as_bytes().first() {
        Some(b'<') | Some(b'|') | Some(b'=') => (true, &descr[1..]),
        Some(b'>') => (false, &descr[1..]),
        _ => (true, descr),
    };
    let width = match kind {
        "f4" => 4,
        "f8" => 8,
        "f2" | "V2" => 2,
        _ => 0,
    };
    let dtype = match kind {
        "f4" => "F32",
        "f8" => "F64",
        "f2" => "F16",
        "V2" => "BF16",
        _ => kind,
    }
    .to_string();
    if width == 0 {
        return Ok(RawTensor {
            shape,
            dtype: descr.to_string(),
            data: Err(format!(
                "dtype `{descr}` is not supported; use float32, float16, bfloat16 or float64"
            )),
        });
    }
    if !matches!(count.checked_mul(width), Some(need) if body.len() >= need) {
        return Err(format!(
            "truncated data: shape {shape:?} needs {} bytes, found {}",
            count.saturating_mul(width),
            body.len()
        ));
    }
    let word = |c: &[u8]| -> Vec<u8> {
        let mut v = c.to_vec();
        if !little {
            v.reverse();
        }
        v
    };
    let mut data: Vec<f32> = body[..count * width]
        .chunks_exact(width)
        .map(|c| {
            let w = word(c);
            match kind {
                "f4" => f32::from_le_bytes([w[0], w[1], w[2], w[3]]),
                "f8" => f64::from_le_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]) as f32,
                "f2" => half::f16::from_le_bytes([w[0], w[1]]).to_f32(),
                _ => half::bf16::from_le_bytes([w[0], w[1]]).to_f32(),
            }
        })
        .collect();
    if fortran && shape.len() > 1 {
        data = fortran_to_c(&data, &shape);
    }
    Ok(RawTensor {
        shape,
        dtype,
        data: Ok(data),
    })
}

/// The text after `'key':` in a Python dict literal, up to the end.
fn dict_value<'a>(header: &'a str, key: &str) -> Option<&'a str> {
    let pat1 = format!("'{key}':");
    let pat2 = format!("\"{key}\":");
    let i = header
        .find(&pat1)
        .map(|i| i + pat1.len())
        .or_else(|| header.find(&pat2).map(|i| i + pat2.len()))?;
    let rest = header[i..].trim_start();
    if rest.starts_with('(') {
        return Some(rest);
    }
    Some(rest.split(',').next().unwrap_or(rest).trim())
}

/// Reorders column-major data into row-major.
fn fortran_to_c(data: &[f32], shape: &[usize]) -> Vec<f32> {
    let n = data.len();
    let mut out = vec![0.0; n];
    let rank = shape.len();
    let mut idx = vec![0usize; rank];
    for (flat_c, slot) in out.iter_mut().enumerate() {
        let mut rem = flat_c;
        for a in (0..rank).rev() {
            idx[a] = rem % shape[a];
            rem /= shape[a];
        }
        let mut flat_f = 0;
        let mut stride = 1;
        for a in 0..rank {
            flat_f += idx[a] * stride;
            stride *= shape[a];
        }
        *slot = data[flat_f];
    }
    out
}

/// Takes tensors out of a table, with messages naming the file and the tensor.
struct Reader<'a> {
    path: &'a Path,
    prefix: String,
    table: BTreeMap<String, RawTensor>,
    used: BTreeSet<String>,
    dtypes: BTreeSet<String>,
}

impl Reader<'_> {
    fn err(&self, msg: String) -> DtlError {
        DtlError::file(self.path, msg)
    }

    /// The tensor `name` (without prefix) with its stored shape.
    fn take_any(&mut self, name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
        let full = format!("{}{name}", self.prefix);
        let Some(t) = self.table.get(&full) else {
            let hint = dtl_core::error::closest(&full, self.table.keys().map(|s| s.as_str()))
                .map(|c| format!(" (closest name in the file: `{c}`)"))
                .unwrap_or_default();
            return Err(self.err(format!(
                "tensor `{full}` is missing{hint}; the file has {} tensors",
                self.table.len()
            )));
        };
        let data = match &t.data {
            Ok(d) => d.clone(),
            Err(m) => return Err(self.err(format!("tensor `{full}`: {m}"))),
        };
        let need = t.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        if need != Some(data.len()) {
            return Err(self.err(format!(
                "tensor `{full}`: shape {:?} needs {} values, the file holds {}",
                t.shape,
                need.map_or("more than 2^64".to_string(), |n| n.to_string()),
                data.len()
            )));
        }
        crate::weights::finite_tensor(self.path, &full, &data)?;
        self.dtypes.insert(t.dtype.clone());
        let shape = t.shape.clone();
        self.used.insert(full);
        Ok((shape, data))
    }

    /// The tensor `name`, which must have shape `expect`.
    fn take(&mut self, name: &str, expect: &[usize]) -> Result<Vec<f32>> {
        let (shape, data) = self.take_any(name)?;
        if shape != expect {
            return Err(self.err(format!(
                "tensor `{}{name}`: expected shape {expect:?}, found {shape:?}",
                self.prefix
            )));
        }
        Ok(data)
    }
}

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

/// Reads a position embedding of any grid and resamples it to the spec's grid.
fn pos_embed(
    spec: &BackboneSpec,
    r: &mut Reader<'_>,
    name: &str,
) -> Result<(Vec<f32>, Option<Grid>)> {
    let d = spec.width;
    let (shape, data) = r.take_any(name)?;
    let full = format!("{}{name}", r.prefix);
    let n = match shape.as_slice() {
        [1, n, w] if *w == d => *n,
        [n, w] if *w == d => *n,
        _ => {
            return Err(r.err(format!(
                "tensor `{full}`: expected shape [1, {}, {d}], found {shape:?}",
                spec.tokens()
            )))
        }
    };
    if n == spec.tokens() {
        return Ok((data, None));
    }
    let prefix = spec.prefix_tokens;
    let patches = n.saturating_sub(prefix);
    let side = (patches as f64).sqrt().round() as usize;
    if n <= prefix || side * side != patches {
        return Err(r.err(format!(
            "tensor `{full}`: expected shape [1, {}, {d}], found {shape:?} ({n} tokens are not {prefix} prefix token(s) plus a square patch grid, so it cannot be resampled)",
            spec.tokens()
        )));
    }
    let out = resample_pos_embed(&data, (side, side), spec.grid, prefix, d);
    Ok((out, Some((side, side))))
}

fn read_timm(spec: &BackboneSpec, r: &mut Reader<'_>) -> Result<(VitWeights, Option<Grid>)> {
    let d = spec.width;
    let hdn = spec.mlp_hidden;
    let (c, p) = (spec.in_chans, spec.patch_size);
    let patch_w = r.take("patch_embed.proj.weight", &[d, c, p, p])?;
    let patch_b = r.take("patch_embed.proj.bias", &[d])?;
    let cls_token = if spec.prefix_tokens > 0 {
        r.take("cls_token", &[1, spec.prefix_tokens, d])?
    } else {
        Vec::new()
    };
    let (pos, resampled) = pos_embed(spec, r, "pos_embed")?;
    let mut blocks = Vec::with_capacity(spec.depth);
    for i in 0..spec.depth {
        let b = |s: &str| format!("blocks.{i}.{s}");
        blocks.push(BlockWeights {
            norm1_w: r.take(&b("norm1.weight"), &[d])?,
            norm1_b: r.take(&b("norm1.bias"), &[d])?,
            qkv_w: r.take(&b("attn.qkv.weight"), &[3 * d, d])?,
            qkv_b: r.take(&b("attn.qkv.bias"), &[3 * d])?,
            proj_w: r.take(&b("attn.proj.weight"), &[d, d])?,
            proj_b: r.take(&b("attn.proj.bias"), &[d])?,
            norm2_w: r.take(&b("norm2.weight"), &[d])?,
            norm2_b: r.take(&b("norm2.bias"), &[d])?,
            fc1_w: r.take(&b("mlp.fc1.weight"), &[hdn, d])?,
            fc1_b: r.take(&b("mlp.fc1.bias"), &[hdn])?,
            fc2_w: r.take(&b("mlp.fc2.weight"), &[d, hdn])?,
            fc2_b: r.take(&b("mlp.fc2.bias"), &[d])?,
        });
    }
    let norm_w = r.take("norm.weight", &[d])?;
    let norm_b = r.take("norm.bias", &[d])?;
    Ok((
        VitWeights {
            patch_w,
            patch_b,
            cls_token,
            pos_embed: pos,
            blocks,
            norm_w,
            norm_b,
        },
        resampled,
    ))
}

/// `(rows, cols)` row-major -> `(cols, rows)` row-major.
fn transpose(x: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; x.len()];
    for i in 0..rows {
        for j in 0..cols {
            out[j * rows + i] = x[i * cols + j];
        }
    }
    out
}

fn read_flax(
    spec: &BackboneSpec,
    r: &mut Reader<'_>,
    big_vision: bool,
) -> Result<(VitWeights, Option<Grid>)> {
    let d = spec.width;
    let hdn = spec.mlp_hidden;
    let (c, p) = (spec.in_chans, spec.patch_size);
    let heads = spec.heads;
    let hd = d / heads;
    // HWIO (p, p, c, d) -> (d, c, p, p)
    let k = r.take("embedding/kernel", &[p, p, c, d])?;
    let mut patch_w = vec![0.0; d * c * p * p];
    for y in 0..p {
        for x in 0..p {
            for ci in 0..c {
                for o in 0..d {
                    patch_w[((o * c + ci) * p + y) * p + x] = k[((y * p + x) * c + ci) * d + o];
                }
            }
        }
    }
    let patch_b = r.take("embedding/bias", &[d])?;
    let cls_token = if spec.prefix_tokens > 0 {
        r.take("cls", &[1, spec.prefix_tokens, d])?
    } else {
        Vec::new()
    };
    let pos_name = if big_vision {
        "pos_embedding"
    } else {
        "Transformer/posembed_input/pos_embedding"
    };
    let (pos, resampled) = pos_embed(spec, r, pos_name)?;
    let (mha, mlp, ln2) = if big_vision { (0, 0, 1) } else { (1, 3, 2) };
    let mut blocks = Vec::with_capacity(spec.depth);
    for i in 0..spec.depth {
        let b = |s: &str| format!("Transformer/encoderblock_{i}/{s}");
        let a = |s: &str| b(&format!("MultiHeadDotProductAttention_{mha}/{s}"));
        let mut qkv_w = Vec::with_capacity(3 * d * d);
        let mut qkv_b = Vec::with_capacity(3 * d);
        for part in ["query", "key", "value"] {
            let kern = r.take(&a(&format!("{part}/kernel")), &[d, heads, hd])?;
            qkv_w.extend(transpose(&kern, d, d));
            qkv_b.extend(r.take(&a(&format!("{part}/bias")), &[heads, hd])?);
        }
        let out = r.take(&a("out/kernel"), &[heads, hd, d])?;
        blocks.push(BlockWeights {
            norm1_w: r.take(&b("LayerNorm_0/scale"), &[d])?,
            norm1_b: r.take(&b("LayerNorm_0/bias"), &[d])?,
            qkv_w,
            qkv_b,
            proj_w: transpose(&out, d, d),
            proj_b: r.take(&a("out/bias"), &[d])?,
            norm2_w: r.take(&b(&format!("LayerNorm_{ln2}/scale")), &[d])?,
            norm2_b: r.take(&b(&format!("LayerNorm_{ln2}/bias")), &[d])?,
            fc1_w: transpose(
                &r.take(&b(&format!("MlpBlock_{mlp}/Dense_0/kernel")), &[d, hdn])?,
                d,
                hdn,
            ),
            fc1_b: r.take(&b(&format!("MlpBlock_{mlp}/Dense_0/bias")), &[hdn])?,
            fc2_w: transpose(
                &r.take(&b(&format!("MlpBlock_{mlp}/Dense_1/kernel")), &[hdn, d])?,
                hdn,
                d,
            ),
            fc2_b: r.take(&b(&format!("MlpBlock_{mlp}/Dense_1/bias")), &[d])?,
        });
    }
    let norm_w = r.take("Transformer/encoder_norm/scale", &[d])?;
    let norm_b = r.take("Transformer/encoder_norm/bias", &[d])?;
    Ok((
        VitWeights {
            patch_w,
            patch_b,
            cls_token,
            pos_embed: pos,
            blocks,
            norm_w,
            norm_b,
        },
        resampled,
    ))
}

/// PyTorch's cubic convolution weights for the four taps around fractional offset `t`
/// (A = -0.75).
fn cubic_weights(t: f64) -> [f64; 4] {
    const A: f64 = -0.75;
    let c1 = |x: f64| ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
    let c2 = |x: f64| ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A;
    [c2(t + 1.0), c1(t), c1(1.0 - t), c2(2.0 - t)]
}

/// Taps and weights of a 1-D bicubic resize from `inp` to `out` samples
/// (`align_corners=False`, no antialiasing, edge indices clamped).
fn cubic_plan(inp: usize, out: usize) -> Vec<([usize; 4], [f64; 4])> {
    let scale = inp as f64 / out as f64;
    (0..out)
        .map(|o| {
            let src = scale * (o as f64 + 0.5) - 0.5;
            let x0 = src.floor();
            let w = cubic_weights(src - x0);
            let mut idx = [0usize; 4];
            for (k, slot) in idx.iter_mut().enumerate() {
                let i = x0 as i64 - 1 + k as i64;
                *slot = i.clamp(0, inp as i64 - 1) as usize;
            }
            (idx, w)
        })
        .collect()
}

/// Resamples a position embedding `(prefix + old.0 * old.1, dim)` to the grid `new`:
/// prefix tokens are kept, the grid part is resized with bicubic interpolation
/// (`align_corners=False`, no antialiasing), as timm's `resample_abs_pos_embed` does.
///
/// ```
/// // A constant grid stays constant.
/// let pos = vec![1.0f32; (1 + 4) * 2];
/// let out = dtl_vit::resample_pos_embed(&pos, (2, 2), (3, 3), 1, 2);
/// assert_eq!(out.len(), (1 + 9) * 2);
/// assert!(out.iter().all(|v| (v - 1.0).abs() < 1e-6));
/// ```
pub fn resample_pos_embed(
    pos: &[f32],
    old: (usize, usize),
    new: (usize, usize),
    prefix: usize,
    dim: usize,
) -> Vec<f32> {
    let grid = &pos[prefix * dim..];
    let rows = cubic_plan(old.0, new.0);
    let cols = cubic_plan(old.1, new.1);
    let mut out = pos[..prefix * dim].to_vec();
    out.reserve(new.0 * new.1 * dim);
    // separable: first along columns for every old row, then along rows
    let mut tmp = vec![0.0f64; old.0 * new.1 * dim];
    for y in 0..old.0 {
        for (x, (idx, w)) in cols.iter().enumerate() {
            for c in 0..dim {
                let mut acc = 0.0;
                for k in 0..4 {
                    acc += w[k] * grid[(y * old.1 + idx[k]) * dim + c] as f64;
                }
                tmp[(y * new.1 + x) * dim + c] = acc;
            }
        }
    }
    for (idx, w) in rows.iter() {
        for x in 0..new.1 {
            for c in 0..dim {
                let mut acc = 0.0;
                for k in 0..4 {
                    acc += w[k] * tmp[(idx[k] * new.1 + x) * dim + c];
                }
                out.push(acc as f32);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn npy_header_parsing() {
        let header = "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }";
        let mut h = header.to_string();
        while (10 + h.len() + 1) % 64 != 0 {
            h.push(' ');
        }
        h.push('\n');
        let mut buf = b"\x93NUMPY\x01\x00".to_vec();
        buf.extend((h.len() as u16).to_le_bytes());
        buf.extend(h.as_bytes());
        for v in 0..6 {
            buf.extend((v as f32).to_le_bytes());
        }
        let t = parse_npy(&buf).unwrap();
        assert_eq!(t.shape, vec![2, 3]);
        assert_eq!(t.data.unwrap(), vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
        let short = &buf[..buf.len() - 3];
        assert!(parse_npy(short).unwrap_err().contains("truncated"));
    }

    #[test]
    fn fortran_order_is_transposed() {
        // column-major [[0, 1, 2], [3, 4, 5]] is stored 0 3 1 4 2 5
        let out = fortran_to_c(&[0.0, 3.0, 1.0, 4.0, 2.0, 5.0], &[2, 3]);
        assert_eq!(out, vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
    }

    #[test]
    fn cubic_weights_sum_to_one() {
        for t in [0.0, 0.25, 0.5, 0.9] {
            let s: f64 = cubic_weights(t).iter().sum();
            assert!((s - 1.0).abs() < 1e-12);
        }
        // identity resize reproduces the input
        let pos: Vec<f32> = (0..(1 + 9) * 2).map(|v| v as f32).collect();
        let out = resample_pos_embed(&pos, (3, 3), (3, 3), 1, 2);
        assert_eq!(out, pos);
    }
}
