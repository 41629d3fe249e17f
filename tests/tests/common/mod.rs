//! Helpers shared by the integration tests that compare a backbone on one kernel set with the
//! same backbone on another (the CUDA device, the emulator, the CPU kernels) or with the
//! PyTorch fixtures: deterministic test values, the relative-error comparison, fixture
//! reading and [`Host`], a backbone driven through host values.
//!
//! A test file takes it with `mod common;` (and the devices from `cuda_common`, see
//! `cuda_common/mod.rs`).

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::Path;

use dtl_core::DropPath;
use dtl_kernels::{DropScales, KernelBackbone, Kernels};

/// `n` deterministic values in [-1, 1) from the xorshift generator started at `state`.
pub fn xorshift_values(n: usize, state: u64) -> Vec<f32> {
    let mut s = state;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// Largest difference of `got` and `want` relative to the largest |`want`| (at least 1e-12),
/// and the index where it is.
pub fn worst_rel_err(got: &[f32], want: &[f64]) -> (f64, usize) {
    let scale = want.iter().fold(0f64, |a, &b| a.max(b.abs())).max(1e-12);
    got.iter()
        .zip(want)
        .enumerate()
        .map(|(i, (&g, &w))| ((g as f64 - w).abs() / scale, i))
        .fold((0.0, 0), |a, b| if b.0 > a.0 { b } else { a })
}

/// Largest difference of `got` and `want` relative to the largest |`want`|; the lengths must
/// agree.
pub fn rel_err(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len(), "lengths");
    worst_rel_err(got, want).0
}

/// `got` (a device's) against the CPU's `want` within `tol` of the largest |`want`|; the
/// message names `what` and the worst value.
pub fn assert_close(got: &[f32], want: &[f32], tol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let want64: Vec<f64> = want.iter().map(|&v| v as f64).collect();
    let (worst, at) = worst_rel_err(got, &want64);
    assert!(
        worst <= tol,
        "{what}: value {at} is {} on the device, {} on the CPU (relative error {worst:.3e} > {tol:.0e})",
        got[at],
        want[at]
    );
}

/// Drop-path scales for `batch` samples that drop some residual branches and scale the others
/// by 1.25 (attention: the odd samples dropped; MLP: every third from the second).
pub fn drop_pattern(batch: usize) -> DropPath {
    DropPath {
        attn: (0..batch)
            .map(|i| if i % 2 == 0 { 1.25 } else { 0.0 })
            .collect(),
        mlp: (0..batch)
            .map(|i| if i % 3 == 1 { 0.0 } else { 1.25 })
            .collect(),
    }
}

/// Every tensor of the safetensors file `dir/name` as (shape, f64 values); the fixtures hold
/// f32, f64 and i64 tensors only, and any other dtype fails the test, naming the tensor.
pub fn read_fixture(dir: &Path, name: &str) -> HashMap<String, (Vec<usize>, Vec<f64>)> {
    use safetensors::tensor::{Dtype, SafeTensors};
    let path = dir.join(name);
    let raw = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = SafeTensors::deserialize(&raw).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    st.tensors()
        .into_iter()
        .map(|(n, t)| {
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
                Dtype::I64 => d
                    .chunks_exact(8)
                    .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as f64)
                    .collect(),
                other => panic!("unexpected dtype {other:?} of {n} in {}", path.display()),
            };
            (n, (t.shape().to_vec(), v))
        })
        .collect()
}

/// The backbone `net` on the device `k`, driven through host values: every call uploads its
/// inputs, runs on buffers one value longer than needed with a workspace planned for one
/// sample more than the batch, and downloads the result.
pub struct Host<'a, K: Kernels, B: KernelBackbone<K>> {
    /// The device.
    pub k: &'a K,
    /// The backbone, uploaded to `k`.
    pub net: B,
    ws: B::Workspace,
    /// Samples of every call.
    pub batch: usize,
}

impl<'a, K: Kernels, B: KernelBackbone<K>> Host<'a, K, B> {
    /// `net` on `k` for batches of `batch` samples.
    pub fn new(k: &'a K, net: B, batch: usize) -> Self {
        let ws = net.workspace(k, batch + 1).unwrap();
        Host { k, net, ws, batch }
    }

    fn up(&self, v: &[f32]) -> K::Buf {
        let mut b = self.k.alloc(v.len() + 1).unwrap();
        self.k.upload(v, &mut b).unwrap();
        b
    }

    fn out(&self, n: usize) -> K::Buf {
        self.k.alloc(n + 1).unwrap()
    }

    fn scales(&self, d: Option<&DropPath>) -> Option<DropScales<K>> {
        d.map(|d| {
            let mut s = DropScales::alloc(self.k, self.batch).unwrap();
            s.set(self.k, d).unwrap();
            s
        })
    }

    /// The embedding of `images`: `n` values.
    pub fn embed(&mut self, images: &[f32], n: usize) -> Vec<f32> {
        let (im, mut x) = (self.up(images), self.out(n));
        self.net
            .embed(self.k, &mut self.ws, &im, self.batch, &mut x)
            .unwrap();
        self.k.download(&x, n).unwrap()
    }

    /// Block `i` on `x`, with drop path `d`.
    pub fn block(&mut self, i: usize, x: &[f32], d: Option<&DropPath>) -> Vec<f32> {
        let n = x.len();
        let (xb, mut y, d) = (self.up(x), self.out(n), self.scales(d));
        self.net
            .block_forward(self.k, &mut self.ws, i, &xb, self.batch, d.as_ref(), &mut y)
            .unwrap();
        self.k.download(&y, n).unwrap()
    }

    /// The input-only VJP of block `i` at `x` for the output gradient `g`.
    pub fn block_vjp(&mut self, i: usize, x: &[f32], g: &[f32], d: Option<&DropPath>) -> Vec<f32> {
        let n = x.len();
        let (xb, gb, d) = (self.up(x), self.up(g), self.scales(d));
        let mut dx = self.out(n);
        self.net
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

    /// The transition into stage `s` from `x`: `n` values.
    pub fn stage(&mut self, s: usize, x: &[f32], n: usize) -> Vec<f32> {
        let (xb, mut y) = (self.up(x), self.out(n));
        self.net
            .stage_forward(self.k, &mut self.ws, s, &xb, self.batch, &mut y)
            .unwrap();
        self.k.download(&y, n).unwrap()
    }

    /// The input-only VJP of the transition into stage `s` at `x` for the gradient `g`.
    pub fn stage_vjp(&mut self, s: usize, x: &[f32], g: &[f32]) -> Vec<f32> {
        let (xb, gb, mut dx) = (self.up(x), self.up(g), self.out(x.len()));
        self.net
            .stage_vjp(self.k, &mut self.ws, s, &xb, &gb, self.batch, &mut dx)
            .unwrap();
        self.k.download(&dx, x.len()).unwrap()
    }

    /// The final norm of `x`.
    pub fn norm(&self, x: &[f32]) -> Vec<f32> {
        let rows = x.len() / self.net.spec().width;
        let (xb, mut y) = (self.up(x), self.out(x.len()));
        self.net.norm_forward(self.k, &xb, rows, &mut y).unwrap();
        self.k.download(&y, x.len()).unwrap()
    }

    /// The input-only VJP of the final norm at `x` for the gradient `g`.
    pub fn norm_vjp(&self, x: &[f32], g: &[f32]) -> Vec<f32> {
        let rows = x.len() / self.net.spec().width;
        let (xb, gb, mut dx) = (self.up(x), self.up(g), self.out(x.len()));
        self.net.norm_vjp(self.k, &xb, &gb, rows, &mut dx).unwrap();
        self.k.download(&dx, x.len()).unwrap()
    }
}
