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
use dtl_kernels::{CpuKernels, DropScales, KernelBackbone, Kernels};
use dtl_swin::{SwinConfig, SwinOn, SwinWeights};

/// Largest difference allowed, relative to the largest CPU value.
const TOL: f64 = 1e-4;

#[path = "cuda_common/mod.rs"]
mod cuda_common;
use cuda_common::{emulator, gpu};

/// Deterministic values in [-1, 1).
fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x2545_F491_4F6C_DD1D).wrapping_add(7);
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// `got` against the CPU's `want` within `TOL` of the largest |want|.
fn assert_close(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let scale = want
        .iter()
        .fold(0f64, |a, &b| a.max(b.abs() as f64))
        .max(1e-12);
    let (worst, at) = got
        .iter()
        .zip(want)
        .enumerate()
        .map(|(i, (&g, &w))| ((g as f64 - w as f64).abs() / scale, i))
        .fold((0.0, 0), |a, b| if b.0 > a.0 { b } else { a });
    assert!(
        worst <= TOL,
        "{what}: value {at} is {} on the device, {} on the CPU (relative error {worst:.3e} > {TOL:.0e})",
        got[at],
        want[at]
    );
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

/// The Swin `swin` on the device `k`, driven through host values: every call uploads its
/// inputs, runs on buffers one value longer than needed with a workspace planned for one
/// sample more than the batch, and downloads the result.
struct On<'a, K: Kernels> {
    k: &'a K,
    cfg: SwinConfig,
    swin: SwinOn<K>,
    ws: <SwinOn<K> as KernelBackbone<K>>::Workspace,
    batch: usize,
}

impl<'a, K: Kernels> On<'a, K> {
    fn new(k: &'a K, cfg: &SwinConfig, w: &SwinWeights, batch: usize) -> Self {
        let swin = SwinOn::upload(k, cfg, w).unwrap();
        let ws = swin.workspace(k, batch + 1).unwrap();
        On {
            k,
            cfg: cfg.clone(),
            swin,
            ws,
            batch,
        }
    }

    fn up(&self, v: &[f32]) -> K::Buf {
        let mut b = self.k.alloc(v.len() + 1).unwrap();
        self.k.upload(v, &mut b).unwrap();
        b
    }

    fn out(&self, n: usize) -> K::Buf {
        self.k.alloc(n + 1).unwrap()
    }

    /// Values of the batch's tokens at stage `s`.
    fn tokens(&self, s: usize) -> usize {
        let r = self.cfg.resolution(s);
        self.batch * r * r * self.cfg.width(s)
    }

    fn scales(&self, d: Option<&DropPath>) -> Option<DropScales<K>> {
        d.map(|d| {
            let mut s = DropScales::alloc(self.k, self.batch).unwrap();
            s.set(self.k, d).unwrap();
            s
        })
    }

    fn embed(&mut self, images: &[f32]) -> Vec<f32> {
        let (im, mut x) = (self.up(images), self.out(self.tokens(0)));
        self.swin
            .embed(self.k, &mut self.ws, &im, self.batch, &mut x)
            .unwrap();
        self.k.download(&x, self.tokens(0)).unwrap()
    }

    fn block(&mut self, i: usize, x: &[f32], d: Option<&DropPath>) -> Vec<f32> {
        let n = x.len();
        let (xb, mut y, d) = (self.up(x), self.out(n), self.scales(d));
        self.swin
            .block_forward(self.k, &mut self.ws, i, &xb, self.batch, d.as_ref(), &mut y)
            .unwrap();
        self.k.download(&y, n).unwrap()
    }

    fn block_vjp(&mut self, i: usize, x: &[f32], g: &[f32], d: Option<&DropPath>) -> Vec<f32> {
        let n = x.len();
        let (xb, gb, d) = (self.up(x), self.up(g), self.scales(d));
        let mut dx = self.out(n);
        self.swin
            .block_vjp(
                self.k,
                &mut self.ws,
                i,
                &xb,
                &gb,
                self.batch,
                d.as_ref(),
                &mut dx,
            )
            .unwrap();
        self.k.download(&dx, n).unwrap()
    }

    fn stage(&mut self, s: usize, x: &[f32]) -> Vec<f32> {
        let n = self.tokens(s);
        let (xb, mut y) = (self.up(x), self.out(n));
        self.swin
            .stage_forward(self.k, &mut self.ws, s, &xb, self.batch, &mut y)
            .unwrap();
        self.k.download(&y, n).unwrap()
    }

    fn stage_vjp(&mut self, s: usize, x: &[f32], g: &[f32]) -> Vec<f32> {
        let (xb, gb, mut dx) = (self.up(x), self.up(g), self.out(x.len()));
        self.swin
            .stage_vjp(self.k, &mut self.ws, s, &xb, &gb, self.batch, &mut dx)
            .unwrap();
        self.k.download(&dx, x.len()).unwrap()
    }

    fn norm(&self, x: &[f32]) -> Vec<f32> {
        let rows = x.len() / self.swin.spec().width;
        let (xb, mut y) = (self.up(x), self.out(x.len()));
        self.swin.norm_forward(self.k, &xb, rows, &mut y).unwrap();
        self.k.download(&y, x.len()).unwrap()
    }

    fn norm_vjp(&self, x: &[f32], g: &[f32]) -> Vec<f32> {
        let rows = x.len() / self.swin.spec().width;
        let (xb, gb, mut dx) = (self.up(x), self.up(g), self.out(x.len()));
        self.swin.norm_vjp(self.k, &xb, &gb, rows, &mut dx).unwrap();
        self.k.download(&dx, x.len()).unwrap()
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

    let drop = DropPath {
        attn: (0..batch)
            .map(|i| if i % 2 == 0 { 1.25 } else { 0.0 })
            .collect(),
        mlp: (0..batch)
            .map(|i| if i % 3 == 1 { 0.0 } else { 1.25 })
            .collect(),
    };
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
