//! The ViT's blocks on the CUDA device: `dtl_vit::VitOn<dtl_cuda::Gpu>` against
//! `VitOn<dtl_kernels::CpuKernels>`, the same block code over two kernel sets. Embedding, every
//! block's forward and input-only VJP (with and without drop path), the final norm and its VJP
//! must agree within 1e-4 of the largest CPU value (`TOL`); the whole forward must match the
//! PyTorch fixtures.
//!
//! Each check runs on every device present:
//! - `dtl_cuda::Gpu` at `cuda:0`, when one can be opened (otherwise the test says why and
//!   passes, unless `DTL_REQUIRE_GPU=1`);
//! - `dtl_cuda::Emulator`, the same device code on the host, for the small geometry only,
//!   when a C++20 compiler is there (`DTL_SKIP_EMULATOR=1` leaves it out).
//!
//! Compiled with `--features cuda` only: `cargo test -p dtl-tests --features cuda --test cuda_vit`.
#![cfg(feature = "cuda")]

use dtl_core::BackboneSpec;
use dtl_kernels::{CpuKernels, DropScales, KernelBackbone, Kernels};
use dtl_vit::{VitOn, VitWeights};

/// Largest difference allowed, relative to the largest CPU value.
const TOL: f64 = 1e-4;

#[path = "cuda_common/mod.rs"]
mod cuda_common;
use cuda_common::{emulator, gpu};

mod common;
use common::{drop_pattern, read_fixture, rel_err, xorshift_values, Host};

/// Deterministic values in [-1, 1).
fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
    xorshift_values(n, seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(1))
}

/// `got` against the CPU's `cpu` within `TOL` of the largest |cpu|.
fn assert_close(got: &[f32], cpu: &[f32], what: &str) {
    common::assert_close(got, cpu, TOL, what);
}

/// timm-style random weights with every LayerNorm and bias perturbed, so that no term of
/// the block is an identity or a zero.
fn weights(spec: &BackboneSpec, seed: u64) -> VitWeights {
    let mut w = VitWeights::random(spec, seed);
    let mut k = seed * 100;
    let mut jitter = |v: &mut Vec<f32>, base: f32, amp: f32| {
        k += 1;
        let r = rand_vec(v.len(), k);
        for (x, r) in v.iter_mut().zip(r) {
            *x = base + amp * r;
        }
    };
    jitter(&mut w.patch_b, 0.0, 0.05);
    jitter(&mut w.norm_w, 1.0, 0.2);
    jitter(&mut w.norm_b, 0.0, 0.1);
    for b in &mut w.blocks {
        jitter(&mut b.norm1_w, 1.0, 0.2);
        jitter(&mut b.norm1_b, 0.0, 0.1);
        jitter(&mut b.qkv_b, 0.0, 0.05);
        jitter(&mut b.proj_b, 0.0, 0.05);
        jitter(&mut b.norm2_w, 1.0, 0.2);
        jitter(&mut b.norm2_b, 0.0, 0.1);
        jitter(&mut b.fc1_b, 0.0, 0.05);
        jitter(&mut b.fc2_b, 0.0, 0.05);
    }
    w
}

/// The ViT on the device `k`, driven through host values ([`Host`]).
struct On<'a, K: Kernels>(Host<'a, K, VitOn<K>>);

impl<'a, K: Kernels> On<'a, K> {
    fn new(k: &'a K, spec: &BackboneSpec, w: &VitWeights, batch: usize) -> Self {
        On(Host::new(k, VitOn::upload(k, spec, w).unwrap(), batch))
    }

    /// Values of the batch's tokens.
    fn tokens(&self) -> usize {
        let s = self.0.net.spec();
        self.0.batch * s.tokens() * s.width
    }

    fn embed(&mut self, images: &[f32]) -> Vec<f32> {
        let n = self.tokens();
        self.0.embed(images, n)
    }
}

impl<'a, K: Kernels> std::ops::Deref for On<'a, K> {
    type Target = Host<'a, K, VitOn<K>>;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl<K: Kernels> std::ops::DerefMut for On<'_, K> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

/// Embedding, every block's forward and VJP with and without drop path, and the final norm
/// and its VJP of one geometry on device `k` against the CPU kernels.
fn block_parity<K: Kernels>(k: &K, device: &str, spec: BackboneSpec, batch: usize, seed: u64) {
    let w = weights(&spec, seed);
    let cpu_k = CpuKernels::new();
    let mut cpu = On::new(&cpu_k, &spec, &w, batch);
    let mut dev = On::new(k, &spec, &w, batch);
    let name = format!("{} on {device}", spec.name);

    let images = rand_vec(batch * 3 * spec.image_size * spec.image_size, seed + 1);
    let x_cpu = cpu.embed(&images);
    assert_close(&dev.embed(&images), &x_cpu, &format!("{name}: embed"));

    let drop = drop_pattern(batch);
    let gy = rand_vec(x_cpu.len(), seed + 2);
    let mut x = x_cpu;
    for i in 0..spec.depth {
        for d in [None, Some(&drop)] {
            let tag = format!("{name}: block {i} drop={}", d.is_some());
            assert_close(
                &dev.block(i, &x, d),
                &cpu.block(i, &x, d),
                &format!("{tag} forward"),
            );
            assert_close(
                &dev.block_vjp(i, &x, &gy, d),
                &cpu.block_vjp(i, &x, &gy, d),
                &format!("{tag} vjp"),
            );
        }
        x = cpu.block(i, &x, None);
    }
    assert_close(&dev.norm(&x), &cpu.norm(&x), &format!("{name}: norm"));
    assert_close(
        &dev.norm_vjp(&x, &gy),
        &cpu.norm_vjp(&x, &gy),
        &format!("{name}: norm vjp"),
    );
}

fn test_geometry() -> BackboneSpec {
    // image 32, patch 8, width 48, 4 blocks, 3 heads: 17 tokens
    BackboneSpec::vit("vit_test_patch8_32", 32, 8, 48, 4, 3)
}

#[test]
fn test_geometry_matches_the_cpu_kernels() {
    if let Some(g) = gpu() {
        block_parity(g, &g.describe(), test_geometry(), 3, 7);
    }
    if let Some(e) = emulator() {
        block_parity(e, "the emulator", test_geometry(), 3, 7);
    }
}

#[test]
fn vit_base_block_matches_the_cpu_kernels() {
    // one ViT-B/16 block: 197 tokens of width 768, 12 heads (rows wider than a thread block)
    if let Some(g) = gpu() {
        let spec = BackboneSpec::vit("vit_b16_one_block", 224, 16, 768, 1, 12);
        block_parity(g, &g.describe(), spec, 2, 11);
    }
}

/// timm's `forward_features` of the fixture ViTs on device `k`, against PyTorch.
fn fixture_parity<K: Kernels>(k: &K, device: &str) {
    let spec = test_geometry();
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/dtl-reference");
    for name in ["dtl", "dtlplus"] {
        let (w, _) =
            dtl_vit::load_weights(&spec, &dir.join(format!("{name}_vit.safetensors")), "auto")
                .unwrap();
        let fx = read_fixture(&dir, &format!("{name}_dtl.safetensors"));
        let (shape, input) = &fx["input"];
        let (_, want) = &fx["backbone_tokens"];
        let images: Vec<f32> = input.iter().map(|&v| v as f32).collect();
        let mut dev = On::new(k, &spec, &w, shape[0]);
        let mut x = dev.embed(&images);
        for i in 0..spec.depth {
            x = dev.block(i, &x, None);
        }
        let got = dev.norm(&x);
        let e = rel_err(&got, want);
        // CPU and PyTorch agree within 1e-4, the device and the CPU too
        assert!(
            e <= 2.0 * TOL,
            "{name} on {device}: forward_features vs PyTorch: relative error {e:.3e}"
        );
    }
}

#[test]
fn forward_features_match_the_pytorch_fixtures() {
    if let Some(g) = gpu() {
        fixture_parity(g, &g.describe());
    }
    if let Some(e) = emulator() {
        fixture_parity(e, "the emulator");
    }
}

/// Wrong inputs are errors naming what is wrong, on device `k`.
fn bad_inputs<K: Kernels>(k: &K) {
    let spec = BackboneSpec::vit("vit_test_patch8_32", 32, 8, 48, 1, 3);
    let w = weights(&spec, 1);
    let vit = VitOn::upload(k, &spec, &w).unwrap();
    let mut ws = vit.workspace(k, 2).unwrap();
    let n = 2 * 17 * 48;
    let x = k.alloc(n).unwrap();
    let mut y = k.alloc(n).unwrap();
    let e = vit
        .block_forward(k, &mut ws, 1, &x, 2, None, &mut y)
        .unwrap_err()
        .to_string();
    assert!(e.contains("block 1 does not exist"), "{e}");
    let e = vit
        .block_forward(k, &mut ws, 0, &x, 3, None, &mut y)
        .unwrap_err()
        .to_string();
    assert!(e.contains("planned for 2"), "{e}");
    let short = k.alloc(n - 1).unwrap();
    let e = vit
        .block_vjp(k, &mut ws, 0, &x, &short, 2, None, &mut y)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("holds") && e.contains(&format!("{}", n - 1)),
        "{e}"
    );
    let drop = DropScales::alloc(k, 1).unwrap();
    assert!(vit
        .block_forward(k, &mut ws, 0, &x, 2, Some(&drop), &mut y)
        .is_err());
    let mut broken = w.clone();
    broken.blocks[0].qkv_w.pop();
    let e = VitOn::upload(k, &spec, &broken).unwrap_err().to_string();
    assert!(e.contains("blocks.0.attn.qkv.weight"), "{e}");
}

#[test]
fn bad_inputs_are_errors_naming_what_is_wrong() {
    bad_inputs(&CpuKernels::new());
    if let Some(g) = gpu() {
        bad_inputs(g);
    }
}
