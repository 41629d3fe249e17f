//! Helpers shared by the Swin integration tests: the fixture folder, f64 tensor reading,
//! the forward of the whole backbone.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use dtl_kernels::{CpuKernels, KernelBackbone, Kernels};
use dtl_swin::SwinOn;

/// The Swin reference fixtures: `$DTL_SWIN_FIXTURES`, else `shared/fixtures/swin-reference` or
/// `tests/fixtures/swin-reference` in the workspace or a folder above it.
pub fn fixtures() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("DTL_SWIN_FIXTURES") {
        return Some(PathBuf::from(p));
    }
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    for dir in here.ancestors() {
        for sub in [
            "shared/fixtures/swin-reference",
            "tests/fixtures/swin-reference",
        ] {
            let p = dir.join(sub);
            if p.join("swin_dtl_swin.safetensors").is_file() {
                return Some(p);
            }
        }
    }
    eprintln!(
        "note: the Swin reference fixtures are not present; set DTL_SWIN_FIXTURES to run this test"
    );
    None
}

/// Every float tensor of a safetensors file as (shape, f64 values).
pub fn read_f64(path: &Path) -> BTreeMap<String, (Vec<usize>, Vec<f64>)> {
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
        out.insert(name, (v.shape().to_vec(), data));
    }
    out
}

/// The tokens after the final norm: embed, every stage's transition and blocks, norm.
pub fn forward(swin: &SwinOn<CpuKernels>, images: &[f32], batch: usize) -> Vec<f32> {
    let k = CpuKernels::new();
    let spec = swin.spec().clone();
    let mut ws = swin.workspace(&k, batch).unwrap();
    let big = batch * spec.stages[0].tokens() * spec.stages[0].width;
    let imgs = k.upload_new(images).unwrap();
    let (mut x, mut y) = (k.alloc(big).unwrap(), k.alloc(big).unwrap());
    swin.embed(&k, &mut ws, &imgs, batch, &mut x).unwrap();
    for (s, st) in spec.stages.iter().enumerate() {
        if s > 0 {
            swin.stage_forward(&k, &mut ws, s, &x, batch, &mut y)
                .unwrap();
            std::mem::swap(&mut x, &mut y);
        }
        for b in st.blocks.0..st.blocks.1 {
            swin.block_forward(&k, &mut ws, b, &x, batch, None, &mut y)
                .unwrap();
            std::mem::swap(&mut x, &mut y);
        }
    }
    let rows = batch * spec.tokens();
    swin.norm_forward(&k, &x, rows, &mut y).unwrap();
    k.download(&y, rows * spec.width).unwrap()
}

/// Deterministic values in [-1, 1).
pub fn noise(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f64 / (1u64 << 24) as f64 * 2.0 - 1.0) as f32
        })
        .collect()
}
