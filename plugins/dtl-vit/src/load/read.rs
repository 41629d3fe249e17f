//! The checkpoint containers: safetensors files and NumPy `.npz` archives (`.npy` members,
//! C or Fortran order) read into one table of named tensors converted to `f32`, and the
//! [`Reader`] that takes tensors out of it by name and shape.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::Path;

use dtl_core::{DtlError, Result};

use super::WeightFormat;

/// One stored tensor converted to `f32` (or the reason it cannot be).
#[derive(Debug, Clone)]
pub(super) struct RawTensor {
    pub(super) shape: Vec<usize>,
    pub(super) dtype: String,
    pub(super) data: std::result::Result<Vec<f32>, String>,
}

/// Reads a whole checkpoint into a table of tensors.
pub(super) fn read_tensors(
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
pub(super) struct Reader<'a> {
    pub(super) path: &'a Path,
    pub(super) prefix: String,
    pub(super) table: BTreeMap<String, RawTensor>,
    pub(super) used: BTreeSet<String>,
    pub(super) dtypes: BTreeSet<String>,
}

impl Reader<'_> {
    /// An error naming the file.
    pub(super) fn err(&self, msg: String) -> DtlError {
        DtlError::file(self.path, msg)
    }

    /// The tensor `name` (without prefix) with its stored shape.
    pub(super) fn take_any(&mut self, name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
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
    pub(super) fn take(&mut self, name: &str, expect: &[usize]) -> Result<Vec<f32>> {
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
}
