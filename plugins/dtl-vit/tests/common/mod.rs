//! Helpers shared by the integration tests: fixture paths, safetensors reading and writing,
//! error measures.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The workspace's fixture folder.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// A reference fixture file.
pub fn reference(name: &str) -> PathBuf {
    fixtures().join("dtl-reference").join(name)
}

/// One tensor read from a safetensors file, as f64.
pub struct Stored {
    pub shape: Vec<usize>,
    pub data: Vec<f64>,
}

/// Reads every float tensor of a safetensors file as f64.
pub fn read_st(path: &Path) -> BTreeMap<String, Stored> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut out = BTreeMap::new();
    for (name, v) in st.tensors() {
        let d = v.data();
        let data: Vec<f64> = match v.dtype() {
            safetensors::Dtype::F32 => d
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
                .collect(),
            safetensors::Dtype::F64 => d
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
                .collect(),
            _ => continue,
        };
        out.insert(
            name,
            Stored {
                shape: v.shape().to_vec(),
                data,
            },
        );
    }
    out
}

/// A tensor to write: dtype name as safetensors spells it, shape, raw little-endian bytes.
pub struct Raw {
    pub dtype: String,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

impl Raw {
    pub fn f32(shape: &[usize], v: &[f64]) -> Self {
        Raw {
            dtype: "F32".into(),
            shape: shape.to_vec(),
            bytes: v.iter().flat_map(|x| (*x as f32).to_le_bytes()).collect(),
        }
    }
}

/// Writes a safetensors file by hand (header JSON + data), so tests can also write
/// malformed ones.
pub fn write_st(path: &Path, tensors: &BTreeMap<String, Raw>) {
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    let mut body = Vec::new();
    for (name, t) in tensors {
        header.insert(
            name.clone(),
            serde_json::json!({
                "dtype": t.dtype,
                "shape": t.shape,
                "data_offsets": [offset, offset + t.bytes.len()],
            }),
        );
        offset += t.bytes.len();
        body.extend_from_slice(&t.bytes);
    }
    let mut h = serde_json::to_vec(&serde_json::Value::Object(header)).unwrap();
    while h.len() % 8 != 0 {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h);
    out.extend(body);
    std::fs::write(path, out).unwrap();
}

/// The fixture ViT's tensors as f32 raw tensors, ready to be altered and written back.
pub fn vit_tensors(name: &str) -> BTreeMap<String, Raw> {
    read_st(&reference(name))
        .into_iter()
        .map(|(k, v)| (k, Raw::f32(&v.shape, &v.data)))
        .collect()
}

/// max |a - b| / max |b|.
pub fn max_rel_err(a: &[f32], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let scale = b.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-30);
    a.iter()
        .zip(b)
        .fold(0.0f64, |m, (x, y)| m.max((*x as f64 - y).abs()))
        / scale
}

/// A reproducible pseudo-random vector in [-1, 1).
pub fn noise(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f64 / (1u64 << 24) as f64 * 2.0 - 1.0) as f32
        })
        .collect()
}
