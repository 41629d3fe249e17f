//! Helpers shared by the GPU test files.
#![allow(dead_code)]

use dtl_cuda::Gpu;

/// The GPU at `cuda:0`; the GPU tests cannot run without one.
pub fn gpu() -> Gpu {
    Gpu::new(0).unwrap_or_else(|e| {
        panic!("the CUDA tests need a GPU at cuda:0 ({e}); run them with scripts/gpu-check.sh")
    })
}

/// Deterministic values in [-1, 1).
pub fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(1);
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}
