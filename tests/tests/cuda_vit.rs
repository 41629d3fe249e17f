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

use dtl_core::{BackboneSpec, DropPath};
use dtl_kernels::{CpuKernels, DropScales, KernelBackbone, Kernels};
use dtl_vit::{VitOn, VitWeights};
use std::collections::HashMap;

/// Largest difference allowed, relative to the largest CPU value.
const TOL: f64 = 1e-4;

#[path = "cuda_common/mod.rs"]
mod cuda_common;
use cuda_common::{emulator, gpu};

/// Deterministic values in [-1, 1).
fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
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

/// Largest difference relative to the largest entry of `want`.
fn rel_err(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len(), "lengths");
    let scale = want.iter().fold(0f64, |a, &b| a.max(b.abs())).max(1e-12);
    got.iter()
        .zip(want)
        .map(|(&g, &w)| (g as f64 - w).abs())
        .fold(0.0, f64::max)
        / scale
}

fn assert_close(got: &[f32], cpu: &[f32], what: &str) {
    let want: Vec<f64> = cpu.iter().map(|&v| v as f64).collect();
    let e = rel_err(got, &want);
    assert!(
        e <= TOL,
        "{what}: device vs CPU relative error {e:.3e} > {TOL:.0e}"
    );
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

/// The ViT `vit` on the device `k`, driven through host values: every call uploads its
/// inputs, runs on buffers one value longer than needed with a workspace planned for one
/// sample more than the batch, and downloads the result.
struct On<'a, K: Kernels> {
    k: &'a K,
    vit: VitOn<K>,
    ws: <VitOn<K> as KernelBackbone<K>>::Workspace,
    batch: usize,
}

impl<'a, K: Kernels> On<'a, K> {
    fn new(k: &'a K, spec: &BackboneSpec, w: &VitWeights, batch: usize) -> Self {
        let vit = VitOn::upload(k, spec, w).unwrap();
        let ws = vit.workspace(k, batch + 1).unwrap();
        On { k, vit, ws, batch }
    }

    fn up(&self, v: &[f32]) -> K::Buf {
        let mut b = self.k.alloc(v.len() + 1).unwrap();
        self.k.upload(v, &mut b).unwrap();
        b
    }

    fn out(&self, n: usize) -> K::Buf {
        self.k.alloc(n + 1).unwrap()
    }

    fn tokens(&self) -> usize {
        let s = self.vit.spec();
        self.batch * s.tokens() * s.width
    }

    fn scales(&self, d: Option<&DropPath>) -> Option<DropScales<K>> {
        d.map(|d| {
            let mut s = DropScales::alloc(self.k, self.batch).unwrap();
            s.set(self.k, d).unwrap();
            s
        })
    }

    fn embed(&mut self, images: &[f32]) -> Vec<f32> {
        let (im, mut x) = (self.up(images), self.out(self.tokens()));
        self.vit
            .embed(self.k, &mut self.ws, &im, self.batch, &mut x)
            .unwrap();
        self.k.download(&x, self.tokens()).unwrap()
    }

    fn block(&mut self, i: usize, x: &[f32], d: Option<&DropPath>) -> Vec<f32> {
        let (xb, mut y, d) = (self.up(x), self.out(self.tokens()), self.scales(d));
        self.vit
            .block_forward(self.k, &mut self.ws, i, &xb, self.batch, d.as_ref(), &mut y)
            .unwrap();
        self.k.download(&y, self.tokens()).unwrap()
    }

    fn block_vjp(&mut self, i: usize, x: &[f32], g: &[f32], d: Option<&DropPath>) -> Vec<f32> {
        let (xb, gb, d) = (self.up(x), self.up(g), self.scales(d));
        let mut dx = self.out(self.tokens());
        self.vit
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
        self.k.download(&dx, self.tokens()).unwrap()
    }

    fn norm(&self, x: &[f32]) -> Vec<f32> {
        let rows = x.len() / self.vit.spec().width;
        let (xb, mut y) = (self.up(x), self.out(x.len()));
        self.vit.norm_forward(self.k, &xb, rows, &mut y).unwrap();
        self.k.download(&y, x.len()).unwrap()
    }

    fn norm_vjp(&self, x: &[f32], g: &[f32]) -> Vec<f32> {
        let rows = x.len() / self.vit.spec().width;
        let (xb, gb, mut dx) = (self.up(x), self.up(g), self.out(x.len()));
        self.vit.norm_vjp(self.k, &xb, &gb, rows, &mut dx).unwrap();
        self.k.download(&dx, x.len()).unwrap()
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

    let drop = DropPath {
        attn: (0..batch)
            .map(|i| if i % 2 == 0 { 1.25 } else { 0.0 })
            .collect(),
        mlp: (0..batch)
            .map(|i| if i % 3 == 1 { 0.0 } else { 1.25 })
            .collect(),
    };
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

/// Every tensor of a reference fixture as (shape, f64 values).
fn read_fixture(name: &str) -> HashMap<String, (Vec<usize>, Vec<f64>)> {
    use safetensors::tensor::{Dtype, SafeTensors};
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/dtl-reference")
        .join(name);
    let raw = std::fs::read(&path).unwrap();
    let st = SafeTensors::deserialize(&raw).unwrap();
    st.tensors()
        .into_iter()
        .filter_map(|(n, t)| {
            let d = t.data();
            let v: Vec<f64> = match t.dtype() {
                Dtype::F32 => d
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes(b.try_into().unwrap()) as f64)
                    .collect(),
                Dtype::F64 => d
                    .chunks_exact(8)
                    .map(|b| f64::from_le_bytes(b.try_into().unwrap()))
                    .collect(),
                _ => return None,
            };
            Some((n, (t.shape().to_vec(), v)))
        })
        .collect()
}

/// timm's `forward_features` of the fixture ViTs on device `k`, against PyTorch.
fn fixture_parity<K: Kernels>(k: &K, device: &str) {
    let spec = test_geometry();
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/dtl-reference");
    for name in ["dtl", "dtlplus"] {
        let (w, _) =
            dtl_vit::load_weights(&spec, &dir.join(format!("{name}_vit.safetensors")), "auto")
                .unwrap();
        let fx = read_fixture(&format!("{name}_dtl.safetensors"));
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
