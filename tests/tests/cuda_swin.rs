//! The Swin backbone on the CUDA device: `dtl_swin::SwinOn<dtl_cuda::Gpu>` against
//! `SwinOn<dtl_kernels::CpuKernels>`, the same block code over two kernel sets. The embedding,
//! every block's forward and input-only VJP (plain and shifted windows, several windows per
//! sample, odd head counts; with and without drop path on a GPU), every stage transition
//! (patch merging) and its VJP, and the final norm and its VJP must agree within 1e-4 of the
//! largest CPU value (`TOL`).
//!
//! Each check runs on every device present:
//! - `dtl_cuda::Gpu` at `cuda:0`, when one can be opened (otherwise the test says why and
//!   passes, unless `DTL_REQUIRE_GPU=1`);
//! - `dtl_cuda::Emulator`, the same device code on the host, for the small geometry only,
//!   when a C++20 compiler is there (`DTL_SKIP_EMULATOR=1` leaves it out).
//!
//! Compiled with `--features cuda` only: `cargo test -p dtl-tests --features cuda --test cuda_swin`.
#![cfg(feature = "cuda")]

use dtl_core::DropPath;
use dtl_kernels::{CpuKernels, Kernels};
use dtl_swin::{SwinConfig, SwinOn, SwinWeights};

/// Largest difference allowed, relative to the largest CPU value.
const TOL: f64 = 1e-4;

#[path = "cuda_common/mod.rs"]
mod cuda_common;
use cuda_common::{emulator, gpu};

mod common;
use common::{drop_pattern, xorshift_values, Host};

/// Deterministic values in [-1, 1).
fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
    xorshift_values(n, seed.wrapping_mul(0x2545_F491_4F6C_DD1D).wrapping_add(7))
}

/// `got` against the CPU's `want` within `TOL` of the largest |want|.
fn assert_close(got: &[f32], want: &[f32], what: &str) {
    common::assert_close(got, want, TOL, what);
}

/// Random weights with every term made to matter: the timm-like initialisation is rescaled so
/// that the attention is far from uniform (larger q/k weights and bias tables), and every
/// LayerNorm and bias is perturbed.
fn weights(cfg: &SwinConfig, seed: u64) -> SwinWeights {
    let mut w = SwinWeights::random(cfg, seed);
    let mut k = seed * 1000;
    let mut jitter = |v: &mut Vec<f32>, base: f32, amp: f32| {
        k += 1;
        let r = rand_vec(v.len(), k);
        for (x, r) in v.iter_mut().zip(r) {
            *x = base + amp * r;
        }
    };
    jitter(&mut w.patch_b, 0.0, 0.05);
    jitter(&mut w.patch_norm_w, 1.0, 0.2);
    jitter(&mut w.patch_norm_b, 0.0, 0.1);
    jitter(&mut w.norm_w, 1.0, 0.2);
    jitter(&mut w.norm_b, 0.0, 0.1);
    for m in &mut w.merges {
        jitter(&mut m.norm_w, 1.0, 0.2);
        jitter(&mut m.norm_b, 0.0, 0.1);
    }
    for b in &mut w.blocks {
        jitter(&mut b.norm1_w, 1.0, 0.2);
        jitter(&mut b.norm1_b, 0.0, 0.1);
        jitter(&mut b.qkv_w, 0.0, 0.3);
        jitter(&mut b.qkv_b, 0.0, 0.05);
        jitter(&mut b.proj_b, 0.0, 0.05);
        jitter(&mut b.rel_table, 0.0, 1.0);
        jitter(&mut b.norm2_w, 1.0, 0.2);
        jitter(&mut b.norm2_b, 0.0, 0.1);
        jitter(&mut b.fc1_b, 0.0, 0.05);
        jitter(&mut b.fc2_b, 0.0, 0.05);
    }
    w
}

/// The Swin on the device `k`, driven through host values ([`Host`]).
struct On<'a, K: Kernels> {
    host: Host<'a, K, SwinOn<K>>,
    cfg: SwinConfig,
}

impl<'a, K: Kernels> On<'a, K> {
    fn new(k: &'a K, cfg: &SwinConfig, w: &SwinWeights, batch: usize) -> Self {
        let host = Host::new(k, SwinOn::upload(k, cfg, w).unwrap(), batch);
        On {
            host,
            cfg: cfg.clone(),
        }
    }

    /// Values of the batch's tokens at stage `s`.
    fn tokens(&self, s: usize) -> usize {
        let r = self.cfg.resolution(s);
        self.host.batch * r * r * self.cfg.width(s)
    }

    fn embed(&mut self, images: &[f32]) -> Vec<f32> {
        let n = self.tokens(0);
        self.host.embed(images, n)
    }

    fn stage(&mut self, s: usize, x: &[f32]) -> Vec<f32> {
        let n = self.tokens(s);
        self.host.stage(s, x, n)
    }
}

impl<'a, K: Kernels> std::ops::Deref for On<'a, K> {
    type Target = Host<'a, K, SwinOn<K>>;
    fn deref(&self) -> &Self::Target {
        &self.host
    }
}

impl<K: Kernels> std::ops::DerefMut for On<'_, K> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.host
    }
}

/// The embedding, every block's forward and VJP (also with drop path when `with_drop`), every
/// stage transition and its VJP, and the final norm and its VJP of `cfg` on device `k` against
/// the CPU kernels, following the CPU's activations through the whole backbone.
fn swin_parity<K: Kernels>(
    k: &K,
    device: &str,
    cfg: &SwinConfig,
    batch: usize,
    with_drop: bool,
    seed: u64,
) {
    cfg.check().unwrap();
    let w = weights(cfg, seed);
    let cpu_k = CpuKernels::new();
    let mut cpu = On::new(&cpu_k, cfg, &w, batch);
    let mut dev = On::new(k, cfg, &w, batch);
    let name = format!("{} on {device}", cfg.name);

    let images = rand_vec(batch * 3 * cfg.image_size * cfg.image_size, seed + 1);
    let mut x = cpu.embed(&images);
    assert_close(&dev.embed(&images), &x, &format!("{name}: embed"));

    let drop = drop_pattern(batch);
    let mut shifted = 0;
    let mut block = 0;
    for s in 0..cfg.stages() {
        if s > 0 {
            let y = cpu.stage(s, &x);
            assert_close(
                &dev.stage(s, &x),
                &y,
                &format!("{name}: transition into stage {s}"),
            );
            let g = rand_vec(y.len(), seed + 10 + s as u64);
            assert_close(
                &dev.stage_vjp(s, &x, &g),
                &cpu.stage_vjp(s, &x, &g),
                &format!("{name}: transition into stage {s}, vjp"),
            );
            x = y;
        }
        let gy = rand_vec(x.len(), seed + 20 + s as u64);
        for _ in 0..cfg.depths[s] {
            shifted += usize::from(cfg.shift_of(block) > 0);
            let drops: &[Option<&DropPath>] = if with_drop {
                &[None, Some(&drop)]
            } else {
                &[None]
            };
            for &d in drops {
                let tag = format!(
                    "{name}: block {block} (shift {}) drop={}",
                    cfg.shift_of(block),
                    d.is_some()
                );
                assert_close(
                    &dev.block(block, &x, d),
                    &cpu.block(block, &x, d),
                    &format!("{tag} forward"),
                );
                assert_close(
                    &dev.block_vjp(block, &x, &gy, d),
                    &cpu.block_vjp(block, &x, &gy, d),
                    &format!("{tag} vjp"),
                );
            }
            x = cpu.block(block, &x, None);
            block += 1;
        }
    }
    assert!(shifted > 0, "{name}: the geometry has no shifted block");
    let gy = rand_vec(x.len(), seed + 3);
    assert_close(&dev.norm(&x), &cpu.norm(&x), &format!("{name}: norm"));
    assert_close(
        &dev.norm_vjp(&x, &gy),
        &cpu.norm_vjp(&x, &gy),
        &format!("{name}: norm vjp"),
    );
}

/// A small Swin: 32-pixel images in 2-pixel patches, 4 x 4 windows; stage 0 a 16 x 16 grid of
/// width 24 (16 windows per sample), stage 1 8 x 8 of width 48 (4 windows), 3 heads in both
/// (odd), the second block of each stage shifted by 2.
fn test_geometry() -> SwinConfig {
    SwinConfig::new(
        "swin_test_patch2_window4_32",
        32,
        2,
        24,
        &[2, 2],
        &[3, 3],
        4,
    )
}

/// The smallest geometry with every feature, for the (slow) emulator: 16-pixel images in
/// 2-pixel patches, 4 x 4 windows; stage 0 an 8 x 8 grid of width 12 (4 windows per sample,
/// the second block shifted by 2), stage 1 one 4 x 4 window of width 24; 3 heads.
fn emulator_geometry() -> SwinConfig {
    SwinConfig::new(
        "swin_test_patch2_window4_16",
        16,
        2,
        12,
        &[2, 1],
        &[3, 3],
        4,
    )
}

#[test]
fn test_geometry_matches_the_cpu_kernels() {
    if let Some(g) = gpu() {
        swin_parity(g, &g.describe(), &test_geometry(), 3, true, 5);
    }
    // drop path adds only the kernels `add_scaled` and `scaled` (checked on the emulator by
    // cuda_kernels.rs and cuda_vit.rs): left out here to keep the emulator fast
    if let Some(e) = emulator() {
        swin_parity(e, "the emulator", &emulator_geometry(), 2, false, 5);
    }
}

#[test]
fn swin_t_sized_stages_match_the_cpu_kernels() {
    // Swin-T's widths, heads and 7 x 7 windows on a 112-pixel image: a 28 x 28 grid of width
    // 96 (16 windows), then 14 x 14 of width 192 (4 windows), then one 7 x 7 window
    if let Some(g) = gpu() {
        let cfg = SwinConfig::new("swin_t_112", 112, 4, 96, &[2, 2, 2], &[3, 6, 12], 7);
        swin_parity(g, &g.describe(), &cfg, 2, true, 9);
    }
}
