//! Every operation of the kernel set on the CUDA device against its twin on
//! `dtl_kernels::CpuKernels`, on random inputs of realistic shapes: a ViT-B attention at batch
//! 1, a Swin window attention with its shifted-window mask, odd sizes, prefix tokens, an even
//! convolution kernel (k = 4), `accumulate` both ways. The Swin operations are also checked
//! against plain host loops written here (the window and merge permutations value for value).
//!
//! Each check runs on every device present:
//! - `dtl_cuda::Gpu` at `cuda:0`, when one can be opened (otherwise the test says why and
//!   passes, unless `DTL_REQUIRE_GPU=1`);
//! - `dtl_cuda::Emulator`, the same device code on the host with the kernels compiled as C++,
//!   when a C++20 compiler is there (`DTL_SKIP_EMULATOR=1` leaves it out).
//!
//! Results must agree within 1e-5 of the largest reference value (`TOL`); every operation
//! meets that bound. Counts (`eval_stats` hits) must agree exactly.
//!
//! The `bf16_*` checks run on devices opened for bf16 storage and compare each operation on
//! bf16 buffers with the same operation on f32 buffers holding the same values, within a bound
//! stated per operation; the `graph_*` checks record work with `capture` and compare replays
//! with plain launches bit for bit, each on a device of its own.
//!
//! This file is also compiled into `dtl-cuda`'s own tests (`crates/dtl-cuda/tests/emulated.rs`),
//! so that `cargo test -p dtl-cuda --features cuda` runs it on the emulator.
#![cfg(feature = "cuda")]

use dtl_kernels::{AdamwStep, AttnShape, ConvShape, CpuKernels, Kernels, MergeShape, WindowShape};

/// Largest difference allowed, relative to the largest reference value.
const TOL: f64 = 1e-5;

#[path = "cuda_common/mod.rs"]
mod cuda_common;
use cuda_common::{emulator, gpu};

/// A `#[test]` per check, running it on each device present.
macro_rules! on_devices {
    ($($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                if let Some(g) = gpu() {
                    checks::$name(g);
                }
                if let Some(e) = emulator() {
                    checks::$name(e);
                }
            }
        )*
    };
}

on_devices!(
    memory_ops,
    uploads_are_ordered_and_staged,
    linear_family,
    sum_rows,
    layer_norm,
    gelu,
    attention_vit_b,
    attention_odd,
    residuals,
    patch_embedding,
    swish,
    depthwise_conv,
    mean_tokens,
    soft_cross_entropy,
    eval_stats,
    sum_squares,
    adamw,
    adamw_from_scalars_equals_adamw,
    errors_name_the_operation_and_buffer,
    attention_bias_swin,
    window_partition_merge,
    patch_merge,
    swin_errors_name_the_operation,
);

#[test]
fn gpu_memory_accounting() {
    let Some(shared) = gpu() else { return };
    // a handle of its own: the other tests allocate on the shared one meanwhile
    let g = &dtl_cuda::Gpu::open(shared.ordinal()).unwrap();
    let before = g.memory().unwrap();
    assert!(
        before.live >= 4 << 20,
        "the cuBLAS workspace counts: {before:?}"
    );
    g.reset_peak();
    let b = g.alloc(1 << 20).unwrap();
    let during = g.memory().unwrap();
    assert_eq!(during.live, before.live + (4 << 20));
    assert!(during.peak >= during.live);
    drop(b);
    let after = g.memory().unwrap();
    assert_eq!(after.live, before.live);
    assert_eq!(after.peak, during.peak);
    g.reset_peak();
    assert_eq!(g.memory().unwrap().peak, after.live);
    assert!(during.driver_used.is_some());
}

#[test]
fn gpu_buffers_of_another_handle_are_refused() {
    let Some(g) = gpu() else { return };
    let other = dtl_cuda::Gpu::open(g.ordinal()).unwrap();
    let foreign = other.alloc(4).unwrap();
    let mut mine = g.alloc(4).unwrap();
    let e = g.copy(&foreign, &mut mine, 4).unwrap_err().to_string();
    assert!(
        e.contains("copy") && e.contains("`src`") && e.contains("another"),
        "{e}"
    );
}

/// Deterministic values in [-1, 1).
fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn scaled_vec(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    rand_vec(n, seed).into_iter().map(|v| v * scale).collect()
}

/// `got` against `want` within `tol` of the largest |want|; equal non-finite values agree.
fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want
        .iter()
        .filter(|v| v.is_finite())
        .fold(0f64, |a, &b| a.max(b.abs() as f64))
        .max(1e-30);
    let mut worst = (0f64, 0usize);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        if !w.is_finite() || !g.is_finite() {
            let same = (w.is_nan() && g.is_nan()) || g == w;
            assert!(same, "{what}: value {i} is {g}, the CPU gives {w}");
            continue;
        }
        let err = (g as f64 - w as f64).abs() / scale;
        if err > worst.0 {
            worst = (err, i);
        }
    }
    assert!(
        worst.0 <= tol,
        "{what}: value {} is {} but the CPU gives {} (error {:.2e} of the largest value {:.3e}, bound {tol:.0e})",
        worst.1,
        got[worst.1],
        want[worst.1],
        worst.0,
        scale
    );
}

/// Host reference of a shifted-window partition, the way PyTorch writes it: roll the grid by
/// `(-shift.0, -shift.1)`, then cut it into windows.
fn window_partition_ref(x: &[f32], s: WindowShape) -> Vec<f32> {
    let ((gh, gw), (wh, ww), c) = (s.grid, s.window, s.width);
    let mut rolled = vec![0f32; x.len()];
    for b in 0..s.batch {
        for r in 0..gh {
            for q in 0..gw {
                let from = ((b * gh + (r + s.shift.0) % gh) * gw + (q + s.shift.1) % gw) * c;
                let to = ((b * gh + r) * gw + q) * c;
                rolled[to..to + c].copy_from_slice(&x[from..from + c]);
            }
        }
    }
    let mut out = Vec::with_capacity(x.len());
    for b in 0..s.batch {
        for wr in 0..gh / wh {
            for wc in 0..gw / ww {
                for tr in 0..wh {
                    for tc in 0..ww {
                        let at = ((b * gh + wr * wh + tr) * gw + wc * ww + tc) * c;
                        out.extend_from_slice(&rolled[at..at + c]);
                    }
                }
            }
        }
    }
    out
}

/// Host reference of the patch merging: the four 2 x 2 neighbours of each output token in
/// the order (0, 0), (1, 0), (0, 1), (1, 1).
fn patch_merge_ref(x: &[f32], s: MergeShape) -> Vec<f32> {
    let ((gh, gw), c) = (s.grid, s.width);
    let mut out = Vec::with_capacity(x.len());
    for b in 0..s.batch {
        for r in 0..gh / 2 {
            for q in 0..gw / 2 {
                for (dr, dc) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
                    let at = ((b * gh + 2 * r + dr) * gw + 2 * q + dc) * c;
                    out.extend_from_slice(&x[at..at + c]);
                }
            }
        }
    }
    out
}

/// The inverse of a permutation given as `forward(x)`: `inverse(forward(x)) = x`, found by
/// applying `forward` to the indices.
fn inverse_ref(y: &[f32], forward: impl Fn(&[f32]) -> Vec<f32>) -> Vec<f32> {
    let idx: Vec<f32> = (0..y.len()).map(|i| i as f32).collect();
    let perm = forward(&idx);
    let mut x = vec![f32::NAN; y.len()];
    for (j, &i) in perm.iter().enumerate() {
        x[i as usize] = y[j];
    }
    x
}

/// Host reference (f64) of the attention with a score bias and of its input-only VJP:
/// `(out, dqkv)`. Sample `b` uses bias group `b % groups`.
fn attention_bias_ref(
    qkv: &[f32],
    s: AttnShape,
    bias: &[f32],
    groups: usize,
    dout: &[f32],
) -> (Vec<f32>, Vec<f32>) {
    let (n, h, d) = (s.tokens, s.heads, s.head_dim);
    let w = h * d;
    let scale = 1.0 / (d as f64).sqrt();
    let mut out = vec![0f32; s.batch * n * w];
    let mut dqkv = vec![0f32; s.batch * n * 3 * w];
    let at = |b: usize, t: usize, part: usize, head: usize, e: usize| {
        (b * n + t) * 3 * w + part * w + head * d + e
    };
    for b in 0..s.batch {
        for head in 0..h {
            let qv = |t: usize, e: usize| qkv[at(b, t, 0, head, e)] as f64;
            let kv = |t: usize, e: usize| qkv[at(b, t, 1, head, e)] as f64;
            let vv = |t: usize, e: usize| qkv[at(b, t, 2, head, e)] as f64;
            let go = |t: usize, e: usize| dout[(b * n + t) * w + head * d + e] as f64;
            let bias_at = |i: usize, j: usize| bias[(((b % groups) * h + head) * n + i) * n + j];
            // probabilities
            let mut p = vec![0f64; n * n];
            for i in 0..n {
                let row = &mut p[i * n..(i + 1) * n];
                for (j, v) in row.iter_mut().enumerate() {
                    let dot: f64 = (0..d).map(|e| qv(i, e) * kv(j, e)).sum();
                    *v = dot * scale + bias_at(i, j) as f64;
                }
                let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = row.iter().map(|v| (v - m).exp()).sum();
                for v in row.iter_mut() {
                    *v = (*v - m).exp() / z;
                }
            }
            for i in 0..n {
                for e in 0..d {
                    let o: f64 = (0..n).map(|j| p[i * n + j] * vv(j, e)).sum();
                    out[(b * n + i) * w + head * d + e] = o as f32;
                }
            }
            // dS = P (dP - rowsum(dP P)), dP = dO V^T
            let mut ds = vec![0f64; n * n];
            for i in 0..n {
                let dp: Vec<f64> = (0..n)
                    .map(|j| (0..d).map(|e| go(i, e) * vv(j, e)).sum())
                    .collect();
                let dot: f64 = (0..n).map(|j| dp[j] * p[i * n + j]).sum();
                for j in 0..n {
                    ds[i * n + j] = p[i * n + j] * (dp[j] - dot);
                }
            }
            for t in 0..n {
                for e in 0..d {
                    let dq: f64 = (0..n).map(|j| ds[t * n + j] * kv(j, e)).sum::<f64>() * scale;
                    let dk: f64 = (0..n).map(|i| ds[i * n + t] * qv(i, e)).sum::<f64>() * scale;
                    let dv: f64 = (0..n).map(|i| p[i * n + t] * go(i, e)).sum();
                    dqkv[at(b, t, 0, head, e)] = dq as f32;
                    dqkv[at(b, t, 1, head, e)] = dk as f32;
                    dqkv[at(b, t, 2, head, e)] = dv as f32;
                }
            }
        }
    }
    (out, dqkv)
}

/// A Swin score bias for `windows` groups: a relative-position-like term per head plus the
/// shifted-window mask (-100 between tokens from different regions of the rolled grid).
fn swin_bias(s: WindowShape, heads: usize, seed: u64) -> Vec<f32> {
    let ((gh, gw), (wh, ww)) = (s.grid, s.window);
    let region = |i: usize, g: usize, w: usize, sh: usize| {
        if sh == 0 || i < g - w {
            0
        } else if i < g - sh {
            1
        } else {
            2
        }
    };
    let mut ids = Vec::with_capacity(gh * gw);
    for r in 0..gh {
        for q in 0..gw {
            ids.push((3 * region(r, gh, wh, s.shift.0) + region(q, gw, ww, s.shift.1)) as f32);
        }
    }
    // the region of each window token: the ids partitioned like the tokens (no roll: the
    // regions are of the rolled grid already)
    let unrolled = WindowShape {
        batch: 1,
        width: 1,
        shift: (0, 0),
        ..s
    };
    let ids = window_partition_ref(&ids, unrolled);
    let n = s.window_tokens();
    let rpb = scaled_vec(heads * n * n, seed, 2.0);
    let mut bias = Vec::with_capacity(s.windows() * heads * n * n);
    for win in 0..s.windows() {
        let id = &ids[win * n..(win + 1) * n];
        for head in 0..heads {
            for i in 0..n {
                for j in 0..n {
                    let mask = if id[i] == id[j] { 0.0 } else { -100.0 };
                    bias.push(rpb[(head * n + i) * n + j] + mask);
                }
            }
        }
    }
    bias
}

mod checks {
    use super::*;

    /// The same operation on the device and on the CPU, from the same inputs.
    pub(crate) struct Pair<'a, K: Kernels> {
        pub k: &'a K,
        pub cpu: CpuKernels,
    }

    impl<'a, K: Kernels> Pair<'a, K> {
        fn new(k: &'a K) -> Self {
            Pair {
                k,
                cpu: CpuKernels::new(),
            }
        }

        fn up(&self, v: &[f32]) -> (K::Buf, dtl_kernels::CpuBuf) {
            (
                self.k.upload_new(v).unwrap(),
                self.cpu.upload_new(v).unwrap(),
            )
        }

        /// Both buffers of `len` values holding `v` in front (the rest zero): a buffer longer
        /// than the operation needs.
        fn up_long(&self, v: &[f32], len: usize) -> (K::Buf, dtl_kernels::CpuBuf) {
            let mut d = self.k.alloc(len).unwrap();
            self.k.upload(v, &mut d).unwrap();
            let mut c = self.cpu.alloc(len).unwrap();
            self.cpu.upload(v, &mut c).unwrap();
            (d, c)
        }

        fn check(&self, what: &str, bufs: &(K::Buf, dtl_kernels::CpuBuf), len: usize, tol: f64) {
            let got = self.k.download(&bufs.0, len).unwrap();
            let want = self.cpu.download(&bufs.1, len).unwrap();
            assert_close(
                &format!("{} on {}", what, self.k.describe()),
                &got,
                &want,
                tol,
            );
        }
    }

    pub fn memory_ops<K: Kernels>(k: &K) {
        let p = Pair::new(k);
        let z = k.alloc(1001).unwrap();
        assert_eq!(k.len(&z), 1001);
        assert!(k.download(&z, 1001).unwrap().iter().all(|&v| v == 0.0));
        assert!(k.download(&z, 0).unwrap().is_empty());
        let empty = k.alloc(0).unwrap();
        assert_eq!(k.len(&empty), 0);
        // a partial upload into a longer buffer leaves the rest as it was
        let v = rand_vec(700, 1);
        let mut b = k.alloc(1001).unwrap();
        k.fill(&mut b, 1001, 3.5).unwrap();
        k.upload(&v, &mut b).unwrap();
        let back = k.download(&b, 1001).unwrap();
        assert_eq!(&back[..700], &v[..]);
        assert!(back[700..].iter().all(|&x| x == 3.5));
        // copy, fill and add touch only the leading values
        let mut c = k.alloc(1001).unwrap();
        k.copy(&b, &mut c, 500).unwrap();
        let cv = k.download(&c, 1001).unwrap();
        assert_eq!(&cv[..500], &v[..500]);
        assert!(cv[500..].iter().all(|&x| x == 0.0));
        let mut x = p.up(&rand_vec(999, 2));
        let y = p.up(&rand_vec(999, 3));
        k.add(&mut x.0, &y.0, 998).unwrap();
        p.cpu.add(&mut x.1, &y.1, 998).unwrap();
        p.check("add", &x, 999, 0.0);
        k.fill(&mut x.0, 17, -2.0).unwrap();
        p.cpu.fill(&mut x.1, 17, -2.0).unwrap();
        p.check("fill", &x, 999, 0.0);
        k.synchronize().unwrap();
    }

    pub fn uploads_are_ordered_and_staged<K: Kernels>(k: &K) {
        // more than two staging buffers (2^22 values each), so that one upload reuses one, and
        // several uploads in a row that reuse them while earlier copies may still be in flight
        let big = rand_vec(2 * (1 << 22) + 12_345, 4);
        let b = k.upload_new(&big).unwrap();
        assert_eq!(k.download(&b, big.len()).unwrap(), big);
        let parts: Vec<Vec<f32>> = (0..5)
            .map(|i| rand_vec(300_000 + i, 10 + i as u64))
            .collect();
        let mut bufs: Vec<K::Buf> = parts.iter().map(|p| k.alloc(p.len()).unwrap()).collect();
        for (p, b) in parts.iter().zip(&mut bufs) {
            k.upload(p, b).unwrap();
        }
        // an upload is ordered before later operations: overwrite and add at once
        let mut acc = k.alloc(300_000).unwrap();
        for b in &bufs {
            k.add(&mut acc, b, 300_000).unwrap();
        }
        for (p, b) in parts.iter().zip(&bufs) {
            assert_eq!(&k.download(b, p.len()).unwrap(), p);
        }
        let want: Vec<f32> = (0..300_000)
            .map(|i| parts.iter().fold(0.0f32, |a, p| a + p[i]))
            .collect();
        assert_close(
            "upload then add",
            &k.download(&acc, 300_000).unwrap(),
            &want,
            0.0,
        );
    }

    pub fn linear_family<K: Kernels>(k: &K) {
        let p = Pair::new(k);
        // ViT-B qkv at batch 1 (with bias), then odd sizes accumulating, then k = 0
        for (m, kk, n, bias, acc) in [
            (197, 768, 2304, true, false),
            (37, 13, 29, true, true),
            (5, 7, 3, false, true),
            (6, 9, 4, false, false),
            (3, 0, 4, true, false),
            (3, 0, 4, false, false),
        ] {
            let x = p.up(&rand_vec(m * kk, 20));
            let w = p.up(&scaled_vec(n * kk, 21, 0.05));
            let b = p.up(&rand_vec(n, 22));
            let mut y = p.up_long(&rand_vec(m * n, 23), m * n + 3);
            k.linear(&x.0, &w.0, bias.then_some(&b.0), m, kk, n, &mut y.0, acc)
                .unwrap();
            p.cpu
                .linear(&x.1, &w.1, bias.then_some(&b.1), m, kk, n, &mut y.1, acc)
                .unwrap();
            p.check(
                &format!("linear {m}x{kk}x{n} bias {bias} acc {acc}"),
                &y,
                m * n + 3,
                TOL,
            );

            let dy = p.up(&rand_vec(m * n, 24));
            let mut dx = p.up(&rand_vec(m * kk, 25));
            k.linear_vjp(&dy.0, &w.0, m, kk, n, &mut dx.0, acc).unwrap();
            p.cpu
                .linear_vjp(&dy.1, &w.1, m, kk, n, &mut dx.1, acc)
                .unwrap();
            p.check(
                &format!("linear_vjp {m}x{kk}x{n} acc {acc}"),
                &dx,
                m * kk,
                TOL,
            );

            let mut dw = p.up(&rand_vec(n * kk, 26));
            k.linear_wgrad(&dy.0, &x.0, m, kk, n, &mut dw.0, acc)
                .unwrap();
            p.cpu
                .linear_wgrad(&dy.1, &x.1, m, kk, n, &mut dw.1, acc)
                .unwrap();
            p.check(
                &format!("linear_wgrad {m}x{kk}x{n} acc {acc}"),
                &dw,
                n * kk,
                TOL,
            );
        }
        // no rows: the weight gradient is zero (or unchanged when accumulating)
        let (x, dy) = (p.up(&[]), p.up(&[]));
        for acc in [false, true] {
            let mut dw = p.up(&rand_vec(12, 27));
            k.linear_wgrad(&dy.0, &x.0, 0, 3, 4, &mut dw.0, acc)
                .unwrap();
            p.cpu
                .linear_wgrad(&dy.1, &x.1, 0, 3, 4, &mut dw.1, acc)
                .unwrap();
            p.check("linear_wgrad with no rows", &dw, 12, 0.0);
        }
    }

    pub fn sum_rows<K: Kernels>(k: &K) {
        let p = Pair::new(k);
        for (m, n, acc) in [
            (394, 768, false),
            (5, 37, true),
            (1, 1, false),
            (0, 9, false),
            (1000, 33, true),
        ] {
            let dy = p.up(&rand_vec(m * n, 30));
            let mut db = p.up(&rand_vec(n, 31));
            k.sum_rows(&dy.0, m, n, &mut db.0, acc).unwrap();
            p.cpu.sum_rows(&dy.1, m, n, &mut db.1, acc).unwrap();
            p.check(&format!("sum_rows {m}x{n} acc {acc}"), &db, n, TOL);
        }
    }

    pub fn layer_norm<K: Kernels>(k: &K) {
        let p = Pair::new(k);
        for (rows, d, acc) in [
            (394, 768, false),
            (7, 45, true),
            (3, 1, false),
            (5, 1000, true),
        ] {
            // an offset and a spread, like real activations
            let xs: Vec<f32> = rand_vec(rows * d, 40)
                .iter()
                .map(|v| 3.0 * v + 0.5)
                .collect();
            let x = p.up(&xs);
            let g = p.up(&rand_vec(d, 41));
            let b = p.up(&rand_vec(d, 42));
            let mut y = p.up(&vec![0.0; rows * d]);
            k.layer_norm(&x.0, &g.0, &b.0, rows, d, 1e-6, &mut y.0)
                .unwrap();
            p.cpu
                .layer_norm(&x.1, &g.1, &b.1, rows, d, 1e-6, &mut y.1)
                .unwrap();
            p.check(&format!("layer_norm {rows}x{d}"), &y, rows * d, TOL);
            let dy = p.up(&rand_vec(rows * d, 43));
            let mut dx = p.up(&rand_vec(rows * d, 44));
            k.layer_norm_vjp(&x.0, &g.0, &dy.0, rows, d, 1e-6, &mut dx.0, acc)
                .unwrap();
            p.cpu
                .layer_norm_vjp(&x.1, &g.1, &dy.1, rows, d, 1e-6, &mut dx.1, acc)
                .unwrap();
            p.check(
                &format!("layer_norm_vjp {rows}x{d} acc {acc}"),
                &dx,
                rows * d,
                TOL,
            );
        }
    }

    pub fn gelu<K: Kernels>(k: &K) {
        let p = Pair::new(k);
        for n in [197 * 3072, 1001, 1] {
            let x = p.up(&scaled_vec(n, 50, 5.0));
            let mut y = p.up(&vec![0.0; n]);
            k.gelu(&x.0, n, &mut y.0).unwrap();
            p.cpu.gelu(&x.1, n, &mut y.1).unwrap();
            p.check(&format!("gelu {n}"), &y, n, TOL);
            let mut g = p.up(&rand_vec(n, 51));
            k.gelu_vjp(&x.0, n, &mut g.0).unwrap();
            p.cpu.gelu_vjp(&x.1, n, &mut g.1).unwrap();
            p.check(&format!("gelu_vjp {n}"), &g, n, TOL);
        }
    }

    fn attention_case<K: Kernels>(k: &K, s: AttnShape) {
        let p = Pair::new(k);
        let rows = s.batch * s.tokens;
        let w = s.width();
        let qkv = p.up(&scaled_vec(rows * 3 * w, 60, 2.0));
        let mut sd = k.alloc(k.attention_scratch(s)).unwrap();
        let mut sc = p.cpu.alloc(p.cpu.attention_scratch(s)).unwrap();
        let mut out = p.up(&rand_vec(rows * w, 61));
        k.attention(&qkv.0, s, &mut out.0, &mut sd).unwrap();
        p.cpu.attention(&qkv.1, s, &mut out.1, &mut sc).unwrap();
        p.check(&format!("attention {s:?}"), &out, rows * w, TOL);
        let dout = p.up(&rand_vec(rows * w, 62));
        let mut dqkv = p.up(&rand_vec(rows * 3 * w, 63));
        k.attention_vjp(&qkv.0, &dout.0, s, &mut dqkv.0, &mut sd)
            .unwrap();
        p.cpu
            .attention_vjp(&qkv.1, &dout.1, s, &mut dqkv.1, &mut sc)
            .unwrap();
        p.check(&format!("attention_vjp {s:?}"), &dqkv, rows * 3 * w, TOL);
    }

    pub fn attention_vit_b<K: Kernels>(k: &K) {
        attention_case(
            k,
            AttnShape {
                batch: 1,
                tokens: 197,
                heads: 12,
                head_dim: 64,
            },
        );
    }

    pub fn attention_odd<K: Kernels>(k: &K) {
        for s in [
            AttnShape {
                batch: 2,
                tokens: 5,
                heads: 3,
                head_dim: 7,
            },
            AttnShape {
                batch: 3,
                tokens: 1,
                heads: 2,
                head_dim: 4,
            },
            AttnShape {
                batch: 1,
                tokens: 50,
                heads: 1,
                head_dim: 33,
            },
        ] {
            attention_case(k, s);
        }
    }

    pub fn residuals<K: Kernels>(k: &K) {
        let p = Pair::new(k);
        let (batch, per) = (3, 197 * 16 + 5);
        let n = batch * per;
        let branch = p.up(&rand_vec(n, 70));
        // drop path: sample 0 dropped, sample 1 kept (1 / keep), sample 2 plain
        let scales = p.up(&[0.0, 1.25, 1.0]);
        for sc in [None, Some(&scales)] {
            let mut x = p.up(&rand_vec(n, 71));
            k.add_scaled(&mut x.0, &branch.0, batch, per, sc.map(|s| &s.0))
                .unwrap();
            p.cpu
                .add_scaled(&mut x.1, &branch.1, batch, per, sc.map(|s| &s.1))
                .unwrap();
            p.check(&format!("add_scaled scales {}", sc.is_some()), &x, n, TOL);
            let mut out = p.up(&rand_vec(n, 72));
            k.scaled(&branch.0, batch, per, sc.map(|s| &s.0), &mut out.0)
                .unwrap();
            p.cpu
                .scaled(&branch.1, batch, per, sc.map(|s| &s.1), &mut out.1)
                .unwrap();
            p.check(&format!("scaled scales {}", sc.is_some()), &out, n, TOL);
        }
        // a dropped sample stays as it is even when its branch is not finite
        let bad = p.up(&[f32::INFINITY, f32::NAN, 1.0, 2.0]);
        let sc = p.up(&[0.0, 2.0]);
        let mut x = p.up(&[1.0, 1.0, 1.0, 1.0]);
        k.add_scaled(&mut x.0, &bad.0, 2, 2, Some(&sc.0)).unwrap();
        p.cpu
            .add_scaled(&mut x.1, &bad.1, 2, 2, Some(&sc.1))
            .unwrap();
        p.check("add_scaled with a dropped non-finite branch", &x, 4, 0.0);
    }

    pub fn patch_embedding<K: Kernels>(k: &K) {
        let p = Pair::new(k);
        for (batch, c, size, patch) in [(2, 3, 224, 16), (3, 2, 12, 4), (1, 1, 5, 1)] {
            let n = batch * c * size * size;
            let img = p.up(&rand_vec(n, 80));
            let mut cols = p.up(&vec![0.0; n]);
            k.patchify(&img.0, batch, c, size, patch, &mut cols.0)
                .unwrap();
            p.cpu
                .patchify(&img.1, batch, c, size, patch, &mut cols.1)
                .unwrap();
            p.check(
                &format!("patchify {batch}x{c}x{size} p {patch}"),
                &cols,
                n,
                0.0,
            );
        }
        for (batch, prefix, pps, d) in [(2, 1, 196, 768), (3, 0, 7, 5), (2, 2, 9, 3)] {
            let patches = p.up(&rand_vec(batch * pps * d, 81));
            let pre = p.up(&rand_vec(prefix * d, 82));
            let pos = p.up(&rand_vec((prefix + pps) * d, 83));
            let len = batch * (prefix + pps) * d;
            let mut out = p.up(&vec![0.0; len]);
            k.assemble_tokens(
                &patches.0, &pre.0, &pos.0, batch, prefix, pps, d, &mut out.0,
            )
            .unwrap();
            p.cpu
                .assemble_tokens(
                    &patches.1, &pre.1, &pos.1, batch, prefix, pps, d, &mut out.1,
                )
                .unwrap();
            p.check(&format!("assemble_tokens prefix {prefix}"), &out, len, TOL);
        }
    }

    pub fn swish<K: Kernels>(k: &K) {
        let p = Pair::new(k);
        for (n, beta) in [(197 * 768 * 2, 100.0), (1001, 1.0), (33, 0.5)] {
            // side-network activations are small: beta * z spans a few units
            let z = p.up(&scaled_vec(n, 90, 0.1));
            let mut y = p.up(&vec![0.0; n]);
            k.swish(&z.0, n, beta, &mut y.0).unwrap();
            p.cpu.swish(&z.1, n, beta, &mut y.1).unwrap();
            p.check(&format!("swish {n} beta {beta}"), &y, n, TOL);
            let dy = p.up(&rand_vec(n, 91));
            for acc in [false, true] {
                let mut dz = p.up(&rand_vec(n, 92));
                k.swish_vjp(&z.0, &dy.0, n, beta, &mut dz.0, acc).unwrap();
                p.cpu
                    .swish_vjp(&z.1, &dy.1, n, beta, &mut dz.1, acc)
                    .unwrap();
                p.check(&format!("swish_vjp {n} beta {beta} acc {acc}"), &dz, n, TOL);
            }
        }
    }

    pub fn depthwise_conv<K: Kernels>(k: &K) {
        let p = Pair::new(k);
        for (s, acc) in [
            (
                ConvShape {
                    batch: 2,
                    prefix: 1,
                    grid: (14, 14),
                    width: 768,
                    kernel: 3,
                },
                false,
            ),
            (
                ConvShape {
                    batch: 2,
                    prefix: 1,
                    grid: (14, 14),
                    width: 64,
                    kernel: 4,
                },
                true,
            ),
            (
                ConvShape {
                    batch: 3,
                    prefix: 0,
                    grid: (3, 5),
                    width: 37,
                    kernel: 5,
                },
                false,
            ),
            (
                ConvShape {
                    batch: 1,
                    prefix: 2,
                    grid: (4, 2),
                    width: 7,
                    kernel: 4,
                },
                true,
            ),
            (
                ConvShape {
                    batch: 2,
                    prefix: 1,
                    grid: (2, 3),
                    width: 5,
                    kernel: 1,
                },
                false,
            ),
        ] {
            let len = s.batch * s.tokens() * s.width;
            let x = p.up(&rand_vec(len, 100));
            let w = p.up(&scaled_vec(s.weights(), 101, 0.3));
            let mut y = p.up(&rand_vec(len, 102));
            k.depthwise_conv(&x.0, &w.0, s, &mut y.0).unwrap();
            p.cpu.depthwise_conv(&x.1, &w.1, s, &mut y.1).unwrap();
            p.check(&format!("depthwise_conv {s:?}"), &y, len, TOL);
            let dy = p.up(&rand_vec(len, 103));
            let mut dx = p.up(&rand_vec(len, 104));
            let mut dw = p.up(&rand_vec(s.weights(), 105));
            k.depthwise_conv_vjp(&x.0, &w.0, &dy.0, s, &mut dx.0, &mut dw.0, acc)
                .unwrap();
            p.cpu
                .depthwise_conv_vjp(&x.1, &w.1, &dy.1, s, &mut dx.1, &mut dw.1, acc)
                .unwrap();
            p.check(&format!("depthwise_conv_vjp dx {s:?}"), &dx, len, TOL);
            p.check(
                &format!("depthwise_conv_vjp dw {s:?} acc {acc}"),
                &dw,
                s.weights(),
                TOL,
            );
        }
    }

    pub fn mean_tokens<K: Kernels>(k: &K) {
        let p = Pair::new(k);
        for (b, t, d, from, to) in [(2, 197, 768, 1, 197), (3, 7, 5, 2, 6), (1, 1, 3, 0, 1)] {
            let x = p.up(&rand_vec(b * t * d, 110));
            let mut out = p.up(&rand_vec(b * d, 111));
            k.mean_tokens(&x.0, b, t, d, from, to, &mut out.0).unwrap();
            p.cpu
                .mean_tokens(&x.1, b, t, d, from, to, &mut out.1)
                .unwrap();
            p.check(
                &format!("mean_tokens {b}x{t}x{d} {from}..{to}"),
                &out,
                b * d,
                TOL,
            );
            let g = p.up(&rand_vec(b * d, 112));
            let mut dx = p.up(&rand_vec(b * t * d, 113));
            k.mean_tokens_vjp(&g.0, b, t, d, from, to, &mut dx.0)
                .unwrap();
            p.cpu
                .mean_tokens_vjp(&g.1, b, t, d, from, to, &mut dx.1)
                .unwrap();
            p.check(
                &format!("mean_tokens_vjp {b}x{t}x{d} {from}..{to}"),
                &dx,
                b * t * d,
                TOL,
            );
        }
    }

    pub fn soft_cross_entropy<K: Kernels>(k: &K) {
        let p = Pair::new(k);
        for (b, c, smooth) in [
            (32, 10, 0.0),
            (5, 1000, 0.1),
            (37, 3, 0.5),
            (1, 1, 0.0),
            (0, 4, 0.0),
        ] {
            let logits = p.up(&scaled_vec(b * c, 120, 4.0));
            // one-hot targets with label smoothing, and one row of mixed soft targets
            let mut t = vec![smooth / c as f32; b * c];
            for r in 0..b {
                t[r * c + (r * 7) % c] += 1.0 - smooth;
            }
            if b > 2 && c > 1 {
                t[2 * c] = 0.3;
                t[2 * c + 1] = 0.9;
            }
            let targets = p.up(&t);
            let mut loss = p.up(&[7.0, 7.0]);
            let mut grad = p.up(&rand_vec(b * c, 121));
            k.soft_cross_entropy(&logits.0, &targets.0, b, c, &mut loss.0, &mut grad.0)
                .unwrap();
            p.cpu
                .soft_cross_entropy(&logits.1, &targets.1, b, c, &mut loss.1, &mut grad.1)
                .unwrap();
            p.check(&format!("soft_cross_entropy loss {b}x{c}"), &loss, 2, TOL);
            p.check(
                &format!("soft_cross_entropy grad {b}x{c}"),
                &grad,
                b * c,
                TOL,
            );
        }
    }

    pub fn eval_stats<K: Kernels>(k: &K) {
        let p = Pair::new(k);
        // finite logits, labels including invalid ones (negative, too large, fractional)
        let (b, c) = (67, 100);
        let logits = p.up(&scaled_vec(b * c, 130, 3.0));
        let mut labels: Vec<f32> = (0..b).map(|i| ((i * 37) % c) as f32).collect();
        labels[3] = -1.0;
        labels[4] = c as f32;
        labels[5] = 2.5;
        let labels = p.up(&labels);
        let mut stats = p.up(&[1.0, 2.0, 3.0, 4.0]);
        for _ in 0..2 {
            k.eval_stats(&logits.0, &labels.0, b, c, &mut stats.0)
                .unwrap();
            p.cpu
                .eval_stats(&logits.1, &labels.1, b, c, &mut stats.1)
                .unwrap();
        }
        let got = k.download(&stats.0, 4).unwrap();
        let want = p.cpu.download(&stats.1, 4).unwrap();
        assert_eq!(
            (got[0], got[1], got[3]),
            (want[0], want[1], want[3]),
            "counts on {}",
            k.describe()
        );
        assert!(
            got[2].is_infinite() && want[2].is_infinite(),
            "invalid labels: infinite loss"
        );
        // all valid: the loss sum is finite and agrees
        let valid = p.up(&(0..b).map(|i| ((i * 13) % c) as f32).collect::<Vec<_>>());
        let mut stats = p.up(&[0.0; 4]);
        k.eval_stats(&logits.0, &valid.0, b, c, &mut stats.0)
            .unwrap();
        p.cpu
            .eval_stats(&logits.1, &valid.1, b, c, &mut stats.1)
            .unwrap();
        p.check("eval_stats, valid labels", &stats, 4, TOL);
        // rows that are not all finite are counted
        let mut lv = scaled_vec(4 * 6, 131, 1.0);
        lv[1] = f32::NAN;
        lv[6 + 2] = f32::INFINITY;
        let l = p.up(&lv);
        let y = p.up(&[0.0, 1.0, 2.0, 3.0]);
        let mut stats = p.up(&[0.0; 4]);
        k.eval_stats(&l.0, &y.0, 4, 6, &mut stats.0).unwrap();
        p.cpu.eval_stats(&l.1, &y.1, 4, 6, &mut stats.1).unwrap();
        let got = k.download(&stats.0, 4).unwrap();
        let want = p.cpu.download(&stats.1, 4).unwrap();
        assert_eq!(got[3], 2.0);
        assert_eq!((got[0], got[1], got[3]), (want[0], want[1], want[3]));
    }

    pub fn sum_squares<K: Kernels>(k: &K) {
        let p = Pair::new(k);
        for n in [(1 << 20) + 7, 36_864, 1] {
            let x = p.up(&rand_vec(n, 140));
            let mut acc = p.up(&[0.5, 9.0]);
            for _ in 0..2 {
                k.sum_squares(&x.0, n, &mut acc.0).unwrap();
                p.cpu.sum_squares(&x.1, n, &mut acc.1).unwrap();
            }
            p.check(&format!("sum_squares {n}"), &acc, 2, TOL);
        }
    }

    pub fn adamw<K: Kernels>(k: &K) {
        let p = Pair::new(k);
        let n = 10_007;
        for (wd, clip) in [(0.05, None), (0.0, Some(0.5)), (0.05, Some(1e6))] {
            let mut param = p.up(&rand_vec(n, 150));
            let mut m = p.up(&vec![0.0; n]);
            let mut v = p.up(&vec![0.0; n]);
            for t in 1..=3u64 {
                let grad = p.up(&scaled_vec(n, 150 + t, 0.1));
                let step = AdamwStep::new(1e-3, 0.9, 0.999, 1e-8, wd, t);
                let mut sq = p.up(&[0.0]);
                k.sum_squares(&grad.0, n, &mut sq.0).unwrap();
                p.cpu.sum_squares(&grad.1, n, &mut sq.1).unwrap();
                let cd = clip.map(|c| (&sq.0, c as f32));
                let cc = clip.map(|c| (&sq.1, c as f32));
                k.adamw(&mut param.0, &grad.0, &mut m.0, &mut v.0, n, &step, cd)
                    .unwrap();
                p.cpu
                    .adamw(&mut param.1, &grad.1, &mut m.1, &mut v.1, n, &step, cc)
                    .unwrap();
            }
            let what = format!("adamw wd {wd} clip {clip:?}");
            p.check(&format!("{what}: param"), &param, n, TOL);
            p.check(&format!("{what}: m"), &m, n, TOL);
            p.check(&format!("{what}: v"), &v, n, TOL);
        }
    }

    /// The step scalars of `steps`, one entry each, as [`Kernels::adamw_from`] reads them.
    pub fn scalars_of(steps: &[AdamwStep]) -> Vec<f32> {
        steps.iter().flat_map(|s| s.scalars()).collect()
    }

    pub fn adamw_from_scalars_equals_adamw<K: Kernels>(k: &K) {
        let n = 10_007;
        for (wd, clip) in [
            (0.05, None),
            (0.0, Some(0.5)),
            (0.05, Some(0.5)),
            (0.05, Some(1e6)),
        ] {
            let start = rand_vec(n, 160);
            let (mut pa, mut pb) = (k.upload_new(&start).unwrap(), k.upload_new(&start).unwrap());
            let (mut ma, mut mb) = (k.alloc(n).unwrap(), k.alloc(n).unwrap());
            let (mut va, mut vb) = (k.alloc(n).unwrap(), k.alloc(n).unwrap());
            let mut scalars = k.alloc(3 * AdamwStep::SCALARS).unwrap();
            for t in 1..=4u64 {
                let grad = k.upload_new(&scaled_vec(n, 160 + t, 0.1)).unwrap();
                let mut sq = k.upload_new(&[0.0]).unwrap();
                k.sum_squares(&grad, n, &mut sq).unwrap();
                // a schedule: another learning rate every step; the entry used is the middle one
                let lr = 1e-3 * (1.0 + t as f64 / 3.0);
                let step = AdamwStep::new(lr, 0.9, 0.999, 1e-8, wd, t);
                let other = AdamwStep::new(0.5, 0.5, 0.5, 0.5, 0.5, 1);
                k.upload(&scalars_of(&[other, step, other]), &mut scalars)
                    .unwrap();
                let c = clip.map(|c| (&sq, c as f32));
                k.adamw(&mut pa, &grad, &mut ma, &mut va, n, &step, c)
                    .unwrap();
                k.adamw_from(&mut pb, &grad, &mut mb, &mut vb, n, &scalars, 1, c)
                    .unwrap();
            }
            let what = format!("adamw_from wd {wd} clip {clip:?}");
            for (name, a, b) in [("param", &pa, &pb), ("m", &ma, &mb), ("v", &va, &vb)] {
                let (a, b) = (k.download(a, n).unwrap(), k.download(b, n).unwrap());
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert!(bits(&a) == bits(&b), "{what}: {name} differs from adamw's");
            }
        }
        // an entry past the end of the buffer is refused, naming it
        let (mut p, g) = (k.alloc(4).unwrap(), k.alloc(4).unwrap());
        let (mut m, mut v) = (k.alloc(4).unwrap(), k.alloc(4).unwrap());
        let scalars = k.alloc(2 * AdamwStep::SCALARS).unwrap();
        let e = k
            .adamw_from(&mut p, &g, &mut m, &mut v, 4, &scalars, 2, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("adamw_from") && e.contains("`scalars`"), "{e}");
        k.synchronize().unwrap();
    }

    pub fn errors_name_the_operation_and_buffer<K: Kernels>(k: &K) {
        let short = k.alloc(3).unwrap();
        let mut out = k.alloc(16).unwrap();
        let e = k.gelu(&short, 4, &mut out).unwrap_err().to_string();
        assert!(
            e.contains("gelu") && e.contains("`x`") && e.contains('4'),
            "{e}"
        );
        let w = k.alloc(6).unwrap();
        let e = k
            .linear(&out, &w, None, 4, 2, 4, &mut k.alloc(15).unwrap(), false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("linear") && e.contains("`w`"), "{e}");
        let s = AttnShape {
            batch: 1,
            tokens: 2,
            heads: 1,
            head_dim: 2,
        };
        let mut scratch = k.alloc(k.attention_scratch(s) - 1).unwrap();
        let qkv = k.alloc(12).unwrap();
        let e = k
            .attention(&qkv, s, &mut out, &mut scratch)
            .unwrap_err()
            .to_string();
        assert!(e.contains("attention") && e.contains("`scratch`"), "{e}");
        let e = k
            .mean_tokens(&out, 1, 4, 2, 3, 3, &mut k.alloc(2).unwrap())
            .unwrap_err()
            .to_string();
        assert!(e.contains("token range"), "{e}");
        let e = k
            .patchify(&out, 1, 1, 4, 3, &mut k.alloc(16).unwrap())
            .unwrap_err()
            .to_string();
        assert!(e.contains("patchify"), "{e}");
        let cs = ConvShape {
            batch: 1,
            prefix: 0,
            grid: (2, 2),
            width: 1,
            kernel: 0,
        };
        let e = k
            .depthwise_conv(&out, &w, cs, &mut k.alloc(4).unwrap())
            .unwrap_err()
            .to_string();
        assert!(e.contains("kernel side is 0"), "{e}");
        // nothing failed on the device itself
        k.synchronize().unwrap();
    }

    /// `got` equal to `want` value for value (permutations move values, they compute nothing).
    fn assert_same(what: &str, got: &[f32], want: &[f32]) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        if let Some(i) = (0..got.len()).find(|&i| got[i].to_bits() != want[i].to_bits()) {
            panic!("{what}: value {i} is {}, expected {}", got[i], want[i]);
        }
    }

    fn attention_bias_case<K: Kernels>(k: &K, s: AttnShape, bias: &[f32], groups: usize) {
        let p = Pair::new(k);
        let rows = s.batch * s.tokens;
        let w = s.width();
        let qkv_h = scaled_vec(rows * 3 * w, 200, 2.0);
        let dout_h = rand_vec(rows * w, 201);
        let (want_out, want_dqkv) = attention_bias_ref(&qkv_h, s, bias, groups, &dout_h);
        let what = format!("{s:?} groups {groups} on {}", k.describe());
        let qkv = p.up(&qkv_h);
        let b = p.up(bias);
        let dout = p.up(&dout_h);
        let mut sd = k.alloc(k.attention_scratch(s)).unwrap();
        let mut out = k.upload_new(&rand_vec(rows * w, 202)).unwrap();
        k.attention_bias(&qkv.0, s, &b.0, groups, &mut out, &mut sd)
            .unwrap();
        let got = k.download(&out, rows * w).unwrap();
        assert_close(&format!("attention_bias {what}"), &got, &want_out, TOL);
        let mut dqkv = k.upload_new(&rand_vec(rows * 3 * w, 203)).unwrap();
        k.attention_bias_vjp(&qkv.0, &dout.0, s, &b.0, groups, &mut dqkv, &mut sd)
            .unwrap();
        let got_d = k.download(&dqkv, rows * 3 * w).unwrap();
        assert_close(
            &format!("attention_bias_vjp {what}"),
            &got_d,
            &want_dqkv,
            TOL,
        );
        // and dtl_kernels::CpuKernels agrees
        let mut sc = p.cpu.alloc(p.cpu.attention_scratch(s)).unwrap();
        let mut cpu_out = p.cpu.alloc(rows * w).unwrap();
        p.cpu
            .attention_bias(&qkv.1, s, &b.1, groups, &mut cpu_out, &mut sc)
            .unwrap();
        let want = p.cpu.download(&cpu_out, rows * w).unwrap();
        assert_close(
            &format!("attention_bias {what} vs CpuKernels"),
            &got,
            &want,
            TOL,
        );
        let mut cpu_d = p.cpu.alloc(rows * 3 * w).unwrap();
        p.cpu
            .attention_bias_vjp(&qkv.1, &dout.1, s, &b.1, groups, &mut cpu_d, &mut sc)
            .unwrap();
        let want = p.cpu.download(&cpu_d, rows * 3 * w).unwrap();
        assert_close(
            &format!("attention_bias_vjp {what} vs CpuKernels"),
            &got_d,
            &want,
            TOL,
        );
    }

    pub fn attention_bias_swin<K: Kernels>(k: &K) {
        // two samples of a 14 x 7 grid in 7 x 7 windows shifted by (3, 3): 2 windows each,
        // one bias group per window (the shifted-window mask), 3 heads
        let ws = WindowShape {
            batch: 2,
            grid: (14, 7),
            width: 3 * 8,
            window: (7, 7),
            shift: (3, 3),
        };
        let s = AttnShape {
            batch: ws.batch * ws.windows(),
            tokens: ws.window_tokens(),
            heads: 3,
            head_dim: 8,
        };
        attention_bias_case(k, s, &swin_bias(ws, 3, 210), ws.windows());
        // more groups than divide the batch, odd sizes; and a single group
        let s = AttnShape {
            batch: 5,
            tokens: 6,
            heads: 3,
            head_dim: 5,
        };
        attention_bias_case(k, s, &scaled_vec(2 * 3 * 36, 211, 3.0), 2);
        let s = AttnShape {
            batch: 3,
            tokens: 33,
            heads: 1,
            head_dim: 4,
        };
        attention_bias_case(k, s, &scaled_vec(33 * 33, 212, 1.0), 1);
        // a zero bias is the plain attention
        let s = AttnShape {
            batch: 2,
            tokens: 9,
            heads: 3,
            head_dim: 4,
        };
        let rows = s.batch * s.tokens;
        let qkv = k
            .upload_new(&scaled_vec(rows * 3 * s.width(), 213, 2.0))
            .unwrap();
        let zero = k.alloc(2 * 3 * 81).unwrap();
        let mut sd = k.alloc(k.attention_scratch(s)).unwrap();
        let (mut a, mut b) = (
            k.alloc(rows * s.width()).unwrap(),
            k.alloc(rows * s.width()).unwrap(),
        );
        k.attention(&qkv, s, &mut a, &mut sd).unwrap();
        k.attention_bias(&qkv, s, &zero, 2, &mut b, &mut sd)
            .unwrap();
        let (a, b) = (
            k.download(&a, rows * s.width()).unwrap(),
            k.download(&b, rows * s.width()).unwrap(),
        );
        assert_same("attention_bias with a zero bias", &b, &a);
    }

    pub fn window_partition_merge<K: Kernels>(k: &K) {
        let p = Pair::new(k);
        for s in [
            WindowShape {
                batch: 2,
                grid: (8, 12),
                width: 5,
                window: (4, 3),
                shift: (2, 1),
            },
            WindowShape {
                batch: 1,
                grid: (14, 14),
                width: 3,
                window: (7, 7),
                shift: (3, 3),
            },
            WindowShape {
                batch: 3,
                grid: (6, 4),
                width: 2,
                window: (3, 4),
                shift: (0, 0),
            },
            WindowShape {
                batch: 2,
                grid: (7, 7),
                width: 4,
                window: (7, 7),
                shift: (0, 0),
            },
        ] {
            let len = s.len();
            let x_h = rand_vec(len, 220);
            let want = window_partition_ref(&x_h, s);
            let x = p.up(&x_h);
            let mut win = k.upload_new(&rand_vec(len, 221)).unwrap();
            k.window_partition(&x.0, s, &mut win).unwrap();
            let got = k.download(&win, len).unwrap();
            assert_same(
                &format!("window_partition {s:?} on {}", k.describe()),
                &got,
                &want,
            );
            // the merge undoes it, and is the inverse permutation on any input
            let mut back = k.upload_new(&rand_vec(len, 222)).unwrap();
            k.window_merge(&win, s, &mut back).unwrap();
            let back = k.download(&back, len).unwrap();
            assert_same(
                &format!("window_merge(window_partition) {s:?}"),
                &back,
                &x_h,
            );
            let y_h = rand_vec(len, 223);
            let want = inverse_ref(&y_h, |v| window_partition_ref(v, s));
            let y = p.up(&y_h);
            let mut m = k.upload_new(&rand_vec(len, 224)).unwrap();
            k.window_merge(&y.0, s, &mut m).unwrap();
            let got_m = k.download(&m, len).unwrap();
            assert_same(
                &format!("window_merge {s:?} on {}", k.describe()),
                &got_m,
                &want,
            );
            let mut c = p.cpu.alloc(len).unwrap();
            p.cpu.window_partition(&x.1, s, &mut c).unwrap();
            let cpu = p.cpu.download(&c, len).unwrap();
            assert_same(&format!("window_partition {s:?} vs CpuKernels"), &got, &cpu);
            p.cpu.window_merge(&y.1, s, &mut c).unwrap();
            let cpu = p.cpu.download(&c, len).unwrap();
            assert_same(&format!("window_merge {s:?} vs CpuKernels"), &got_m, &cpu);
        }
    }

    pub fn patch_merge<K: Kernels>(k: &K) {
        let p = Pair::new(k);
        for s in [
            MergeShape {
                batch: 2,
                grid: (4, 6),
                width: 3,
            },
            MergeShape {
                batch: 1,
                grid: (14, 14),
                width: 8,
            },
            MergeShape {
                batch: 3,
                grid: (2, 2),
                width: 1,
            },
        ] {
            let len = s.len();
            let x_h = rand_vec(len, 230);
            let want = patch_merge_ref(&x_h, s);
            let x = p.up(&x_h);
            let mut y = k.upload_new(&rand_vec(len, 231)).unwrap();
            k.patch_merge(&x.0, s, &mut y).unwrap();
            let got = k.download(&y, len).unwrap();
            assert_same(
                &format!("patch_merge {s:?} on {}", k.describe()),
                &got,
                &want,
            );
            let dy_h = rand_vec(len, 232);
            let want = inverse_ref(&dy_h, |v| patch_merge_ref(v, s));
            let dy = p.up(&dy_h);
            let mut dx = k.upload_new(&rand_vec(len, 233)).unwrap();
            k.patch_merge_vjp(&dy.0, s, &mut dx).unwrap();
            let got_d = k.download(&dx, len).unwrap();
            assert_same(
                &format!("patch_merge_vjp {s:?} on {}", k.describe()),
                &got_d,
                &want,
            );
            let mut c = p.cpu.alloc(len).unwrap();
            p.cpu.patch_merge(&x.1, s, &mut c).unwrap();
            let cpu = p.cpu.download(&c, len).unwrap();
            assert_same(&format!("patch_merge {s:?} vs CpuKernels"), &got, &cpu);
            p.cpu.patch_merge_vjp(&dy.1, s, &mut c).unwrap();
            let cpu = p.cpu.download(&c, len).unwrap();
            assert_same(
                &format!("patch_merge_vjp {s:?} vs CpuKernels"),
                &got_d,
                &cpu,
            );
        }
    }

    pub fn swin_errors_name_the_operation<K: Kernels>(k: &K) {
        let x = k.alloc(64).unwrap();
        let mut out = k.alloc(64).unwrap();
        let ws = WindowShape {
            batch: 1,
            grid: (4, 4),
            width: 4,
            window: (2, 2),
            shift: (1, 1),
        };
        let bad = [
            (WindowShape { grid: (4, 5), ..ws }, "whole number"),
            (
                WindowShape {
                    shift: (2, 0),
                    ..ws
                },
                "shift",
            ),
            (
                WindowShape {
                    window: (0, 2),
                    ..ws
                },
                "side of 0",
            ),
            (WindowShape { batch: 2, ..ws }, "`x`"),
        ];
        for (s, part) in bad {
            let e = k.window_partition(&x, s, &mut out).unwrap_err().to_string();
            assert!(e.contains("window_partition") && e.contains(part), "{e}");
            let e = k.window_merge(&x, s, &mut out).unwrap_err().to_string();
            assert!(e.contains("window_merge") && e.contains(part), "{e}");
        }
        let e = k
            .window_partition(&x, ws, &mut k.alloc(63).unwrap())
            .unwrap_err()
            .to_string();
        assert!(e.contains("`out`") && e.contains("64"), "{e}");
        let ms = MergeShape {
            batch: 1,
            grid: (4, 3),
            width: 4,
        };
        let e = k.patch_merge(&x, ms, &mut out).unwrap_err().to_string();
        assert!(e.contains("patch_merge") && e.contains("odd"), "{e}");
        let ms = MergeShape { grid: (4, 4), ..ms };
        let e = k
            .patch_merge_vjp(&k.alloc(63).unwrap(), ms, &mut out)
            .unwrap_err()
            .to_string();
        assert!(e.contains("patch_merge_vjp") && e.contains("`dy`"), "{e}");
        let s = AttnShape {
            batch: 2,
            tokens: 3,
            heads: 2,
            head_dim: 2,
        };
        let qkv = k.alloc(2 * 3 * 3 * 4).unwrap();
        let mut scratch = k.alloc(k.attention_scratch(s)).unwrap();
        let mut o = k.alloc(2 * 3 * 4).unwrap();
        let short_bias = k.alloc(2 * 9 - 1).unwrap();
        let e = k
            .attention_bias(&qkv, s, &short_bias, 1, &mut o, &mut scratch)
            .unwrap_err()
            .to_string();
        assert!(e.contains("attention_bias") && e.contains("`bias`"), "{e}");
        let bias = k.alloc(2 * 9).unwrap();
        let e = k
            .attention_bias_vjp(
                &qkv,
                &o,
                s,
                &bias,
                0,
                &mut k.alloc(36).unwrap(),
                &mut scratch,
            )
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("attention_bias_vjp") && e.contains("0 groups"),
            "{e}"
        );
        // nothing failed on the device itself
        k.synchronize().unwrap();
    }
}

// ---- bf16 storage -------------------------------------------------------------------------

/// A `#[test]` per bf16 check, on each device opened for bf16 that is present.
macro_rules! on_bf16_devices {
    ($($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                if let Some(g) = cuda_common::gpu_bf16() {
                    bf16_checks::$name(g);
                }
                if let Some(e) = cuda_common::emulator_bf16() {
                    bf16_checks::$name(e);
                }
            }
        )*
    };
}

on_bf16_devices!(
    bf16_upload_download_round_to_nearest_even,
    bf16_elementwise_and_layout,
    bf16_products,
    bf16_mixed_products,
    bf16_rows_and_norms,
    bf16_attention,
    bf16_convolution_and_pooling,
    bf16_loss_and_optimizer,
);

/// A `#[test]` per graph check, each on a device of its own (a recording takes in everything
/// issued to its device meanwhile, and the shared devices run other tests in parallel).
macro_rules! on_own_devices {
    ($($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                use dtl_core::choice::Precision;
                for p in [Precision::F32, Precision::Bf16] {
                    if cuda_common::gpu().is_some() {
                        graph_checks::$name(&dtl_cuda::Gpu::open_with(0, p).unwrap());
                    }
                    if cuda_common::emulator().is_some() {
                        graph_checks::$name(&dtl_cuda::Emulator::with_precision(p).unwrap());
                    }
                }
            }
        )*
    };
}

on_own_devices!(
    graph_replay_matches_plain_launches,
    graph_replay_follows_new_adamw_scalars,
    graph_capture_that_uploads_runs_plain,
    graph_keeps_dropped_buffers,
);

// the checks build their inputs as `&[v.clone(), ...]` lists, one or several alike
#[allow(clippy::cloned_ref_to_slice_refs)]
mod bf16_checks {
    use super::*;
    use dtl_core::choice::Precision;

    /// `v` rounded to bf16 on the host: to nearest, ties to even; a NaN stays a NaN.
    pub fn round_bf16(v: f32) -> f32 {
        let u = v.to_bits();
        if v.is_nan() {
            return f32::from_bits((u | 0x0040_0000) & 0xffff_0000);
        }
        f32::from_bits(((u + 0x7fff + ((u >> 16) & 1)) >> 16) << 16)
    }

    fn rounded(v: &[f32]) -> Vec<f32> {
        v.iter().map(|&x| round_bf16(x)).collect()
    }

    /// One rounding of each output to bf16: at most 2^-8 of the value (8 significant bits),
    /// so of the largest value; f32 noise beside it is far smaller.
    const ONE_ROUNDING: f64 = 1.0 / 256.0 + 1e-5;

    /// Runs `op` on a bf16 device twice: on bf16 buffers (the inputs `ins` made with
    /// `upload_frozen`, the outputs with `alloc_act` holding `outs`), and on f32 buffers
    /// holding the same bf16-rounded values. Each output of the first must agree with the
    /// second within `tol` of its largest value: the difference is the roundings of the bf16
    /// path only.
    #[allow(clippy::type_complexity)]
    fn twin<K: Kernels>(
        k: &K,
        what: &str,
        ins: &[Vec<f32>],
        outs: &[Vec<f32>],
        tol: f64,
        op: &dyn Fn(&[K::Buf], &mut [K::Buf]) -> dtl_core::Result<()>,
    ) {
        twin_outputs(k, what, ins, outs, outs.len(), tol, op)
    }

    /// [`twin`] comparing only the first `compared` of `outs`: the others are buffers the
    /// operation works in (an attention scratch), whose contents depend on the kernels the
    /// device selected and are no result.
    #[allow(clippy::type_complexity)]
    fn twin_outputs<K: Kernels>(
        k: &K,
        what: &str,
        ins: &[Vec<f32>],
        outs: &[Vec<f32>],
        compared: usize,
        tol: f64,
        op: &dyn Fn(&[K::Buf], &mut [K::Buf]) -> dtl_core::Result<()>,
    ) {
        assert_eq!(k.precision(), Precision::Bf16);
        let run = |bf16: bool| -> Vec<Vec<f32>> {
            let ib: Vec<K::Buf> = ins
                .iter()
                .map(|v| {
                    if bf16 {
                        k.upload_frozen(v).unwrap()
                    } else {
                        k.upload_new(&rounded(v)).unwrap()
                    }
                })
                .collect();
            let mut ob: Vec<K::Buf> = outs
                .iter()
                .map(|v| {
                    if bf16 {
                        let mut b = k.alloc_act(v.len()).unwrap();
                        k.upload(v, &mut b).unwrap();
                        b
                    } else {
                        k.upload_new(&rounded(v)).unwrap()
                    }
                })
                .collect();
            op(&ib, &mut ob).unwrap_or_else(|e| panic!("{what}: {e}"));
            ob.iter()
                .zip(outs)
                .map(|(b, v)| k.download(b, v.len()).unwrap())
                .collect()
        };
        let (got, want) = (run(true), run(false));
        for (i, (g, w)) in got.iter().zip(&want).enumerate().take(compared) {
            assert_close(&format!("{what} (bf16), output {i}"), g, w, tol);
        }
    }

    pub fn bf16_upload_download_round_to_nearest_even<K: Kernels>(k: &K) {
        let one = 1.0f32;
        let ulp = 1.0 / 128.0; // bf16's spacing in [1, 2)
        let cases = [
            (one, one),
            (one + ulp / 2.0, one),              // a tie goes to the even 1.0
            (one + 1.5 * ulp, one + 2.0 * ulp),  // a tie goes to the even neighbour
            (one + ulp / 2.0 + 1e-6, one + ulp), // above the tie rounds up
            (-(one + ulp / 4.0), -one),          // below the tie rounds down
            (-0.0, -0.0),
            (f32::INFINITY, f32::INFINITY),
            (f32::NEG_INFINITY, f32::NEG_INFINITY),
            (f32::MAX, f32::INFINITY),  // past the largest bf16
            (1e-40, round_bf16(1e-40)), // subnormals are kept, rounded
            (3.0e38, round_bf16(3.0e38)),
        ];
        let host: Vec<f32> = cases.iter().map(|c| c.0).chain([f32::NAN]).collect();
        let b = k.upload_frozen(&host).unwrap();
        let back = k.download(&b, host.len()).unwrap();
        for (i, (x, want)) in cases.iter().enumerate() {
            assert_eq!(
                back[i].to_bits(),
                want.to_bits(),
                "upload of {x:e}: {} read back, {want:e} wanted",
                back[i]
            );
        }
        assert!(back[cases.len()].is_nan(), "a NaN stays a NaN");
        // values bf16 represents go and come back exactly, also through a copy to f32 and back
        let exact = rounded(&scaled_vec(1000, 1, 100.0));
        let mut a = k.alloc_act(1000).unwrap();
        k.upload(&exact, &mut a).unwrap();
        assert_eq!(k.download(&a, 1000).unwrap(), exact);
        let mut f = k.alloc(1000).unwrap();
        k.copy(&a, &mut f, 1000).unwrap();
        assert_eq!(k.download(&f, 1000).unwrap(), exact);
        // a copy from f32 to bf16 rounds as an upload does
        let fine = scaled_vec(1000, 2, 3.0);
        let f = k.upload_new(&fine).unwrap();
        k.copy(&f, &mut a, 1000).unwrap();
        assert_eq!(k.download(&a, 1000).unwrap(), rounded(&fine));
        // alloc stays f32; fill writes the rounded value
        let mut z = k.alloc(3).unwrap();
        k.upload(&[one + ulp / 4.0; 3], &mut z).unwrap();
        assert_eq!(k.download(&z, 3).unwrap(), vec![one + ulp / 4.0; 3]);
        k.fill(&mut a, 2, 0.1).unwrap();
        assert_eq!(k.download(&a, 2).unwrap(), vec![round_bf16(0.1); 2]);
    }

    pub fn bf16_elementwise_and_layout<K: Kernels>(k: &K) {
        let n = 3001;
        let x = scaled_vec(n, 10, 3.0);
        let y = scaled_vec(n, 11, 3.0);
        twin(
            k,
            "add",
            &[x.clone()],
            &[y.clone()],
            ONE_ROUNDING,
            &|i, o| k.add(&mut o[0], &i[0], n),
        );
        twin(
            k,
            "gelu",
            &[x.clone()],
            &[vec![0.0; n]],
            ONE_ROUNDING,
            &|i, o| k.gelu(&i[0], n, &mut o[0]),
        );
        twin(
            k,
            "gelu_vjp",
            &[x.clone()],
            &[y.clone()],
            ONE_ROUNDING,
            &|i, o| k.gelu_vjp(&i[0], n, &mut o[0]),
        );
        twin(
            k,
            "swish",
            &[x.clone()],
            &[vec![0.0; n]],
            ONE_ROUNDING,
            &|i, o| k.swish(&i[0], n, 1.5, &mut o[0]),
        );
        for acc in [false, true] {
            twin(
                k,
                "swish_vjp",
                &[x.clone(), y.clone()],
                &[y.clone()],
                ONE_ROUNDING,
                &|i, o| k.swish_vjp(&i[0], &i[1], n, 1.5, &mut o[0], acc),
            );
        }
        let (batch, per) = (3, 1000);
        let scales = vec![0.5, 0.0, 2.0];
        twin(
            k,
            "add_scaled",
            &[x.clone(), scales.clone()],
            &[y.clone()],
            ONE_ROUNDING,
            &|i, o| k.add_scaled(&mut o[0], &i[0], batch, per, Some(&i[1])),
        );
        twin(
            k,
            "scaled",
            &[x.clone(), scales],
            &[vec![0.0; n]],
            ONE_ROUNDING,
            &|i, o| k.scaled(&i[0], batch, per, Some(&i[1]), &mut o[0]),
        );
        // the permutations move values: exact
        let (b, c, size, patch) = (2, 3, 8, 4);
        let img = scaled_vec(b * c * size * size, 12, 2.0);
        twin(
            k,
            "patchify",
            &[img.clone()],
            &[vec![0.0; img.len()]],
            0.0,
            &|i, o| k.patchify(&i[0], b, c, size, patch, &mut o[0]),
        );
        let (prefix, pps, d) = (1, 4, 6);
        let ins = [
            scaled_vec(b * pps * d, 13, 1.0),
            scaled_vec(prefix * d, 14, 1.0),
            scaled_vec((prefix + pps) * d, 15, 1.0),
        ];
        twin(
            k,
            "assemble_tokens",
            &ins,
            &[vec![0.0; b * (prefix + pps) * d]],
            ONE_ROUNDING,
            &|i, o| k.assemble_tokens(&i[0], &i[1], &i[2], b, prefix, pps, d, &mut o[0]),
        );
        let ws = WindowShape {
            batch: 2,
            grid: (4, 6),
            width: 3,
            window: (2, 3),
            shift: (1, 1),
        };
        let t = scaled_vec(2 * 4 * 6 * 3, 16, 1.0);
        twin(
            k,
            "window_partition",
            &[t.clone()],
            &[vec![0.0; t.len()]],
            0.0,
            &|i, o| k.window_partition(&i[0], ws, &mut o[0]),
        );
        twin(
            k,
            "window_merge",
            &[t.clone()],
            &[vec![0.0; t.len()]],
            0.0,
            &|i, o| k.window_merge(&i[0], ws, &mut o[0]),
        );
        let ms = MergeShape {
            batch: 2,
            grid: (4, 6),
            width: 3,
        };
        twin(
            k,
            "patch_merge",
            &[t.clone()],
            &[vec![0.0; t.len()]],
            0.0,
            &|i, o| k.patch_merge(&i[0], ms, &mut o[0]),
        );
        twin(
            k,
            "patch_merge_vjp",
            &[t.clone()],
            &[vec![0.0; t.len()]],
            0.0,
            &|i, o| k.patch_merge_vjp(&i[0], ms, &mut o[0]),
        );
        // f32 gradients accumulate bf16 ones: y (f32) += x (bf16) is exact in the rounded x
        let xb = k.upload_frozen(&x).unwrap();
        let mut yf = k.upload_new(&y).unwrap();
        k.add(&mut yf, &xb, n).unwrap();
        let want: Vec<f32> = y.iter().zip(&x).map(|(a, b)| a + round_bf16(*b)).collect();
        assert_eq!(k.download(&yf, n).unwrap(), want, "f32 += bf16");
    }

    pub fn bf16_products<K: Kernels>(k: &K) {
        // odd sizes, with and without bias, accumulating both ways; outputs bf16
        let (m, kk, n) = (13, 37, 19);
        let x = scaled_vec(m * kk, 20, 1.0);
        let w = scaled_vec(n * kk, 21, 1.0);
        let bias = scaled_vec(n, 22, 1.0);
        let y0 = scaled_vec(m * n, 23, 1.0);
        let dy = scaled_vec(m * n, 24, 1.0);
        for acc in [false, true] {
            twin(
                k,
                "linear",
                &[x.clone(), w.clone(), bias.clone()],
                &[y0.clone()],
                ONE_ROUNDING,
                &|i, o| k.linear(&i[0], &i[1], Some(&i[2]), m, kk, n, &mut o[0], acc),
            );
            twin(
                k,
                "linear",
                &[x.clone(), w.clone()],
                &[y0.clone()],
                ONE_ROUNDING,
                &|i, o| k.linear(&i[0], &i[1], None, m, kk, n, &mut o[0], acc),
            );
            twin(
                k,
                "linear_vjp",
                &[dy.clone(), w.clone()],
                &[vec![0.5; m * kk]],
                ONE_ROUNDING,
                &|i, o| k.linear_vjp(&i[0], &i[1], m, kk, n, &mut o[0], acc),
            );
            twin(
                k,
                "linear_wgrad",
                &[dy.clone(), x.clone()],
                &[vec![0.5; n * kk]],
                ONE_ROUNDING,
                &|i, o| k.linear_wgrad(&i[0], &i[1], m, kk, n, &mut o[0], acc),
            );
        }
    }

    /// `y (m x n) = x w^T` on the host by the autocast rule: operands rounded to bf16, exact
    /// products summed in f64, then the output rounded to its storage (`bf16_out`).
    fn linear_ref(
        x: &[f32],
        w: &[f32],
        (m, kk, n): (usize, usize, usize),
        bf16_out: bool,
    ) -> Vec<f32> {
        let mut y = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                let s: f64 = (0..kk)
                    .map(|l| round_bf16(x[i * kk + l]) as f64 * round_bf16(w[j * kk + l]) as f64)
                    .sum();
                y[i * n + j] = if bf16_out {
                    round_bf16(s as f32)
                } else {
                    s as f32
                };
            }
        }
        y
    }

    pub fn bf16_mixed_products<K: Kernels>(k: &K) {
        let (m, kk, n) = (9, 33, 7);
        let x = scaled_vec(m * kk, 30, 1.0);
        let w = scaled_vec(n * kk, 31, 1.0);
        // each of x, w and y f32 or bf16; any bf16 one makes the product bf16 with f32
        // accumulation. Bound: the output's rounding (bf16: 2^-8 of the value) plus the f32
        // sum's order (k = 33 terms, ~1e-6).
        for mask in 1..8u32 {
            let (xb, wb, yb) = (mask & 1 != 0, mask & 2 != 0, mask & 4 != 0);
            let up = |v: &[f32], bf: bool| {
                if bf {
                    k.upload_frozen(v).unwrap()
                } else {
                    k.upload_new(v).unwrap()
                }
            };
            let (xd, wd) = (up(&x, xb), up(&w, wb));
            let mut y = if yb {
                k.alloc_act(m * n).unwrap()
            } else {
                k.alloc(m * n).unwrap()
            };
            k.linear(&xd, &wd, None, m, kk, n, &mut y, false).unwrap();
            let want = linear_ref(&x, &w, (m, kk, n), yb);
            let tol = if yb { ONE_ROUNDING } else { 1e-5 };
            let what = format!("linear with x {xb} w {wb} y {yb} in bf16");
            assert_close(&what, &k.download(&y, m * n).unwrap(), &want, tol);
            // and accumulating into it once more: y + x w^T
            k.linear(&xd, &wd, None, m, kk, n, &mut y, true).unwrap();
            let twice: Vec<f32> = want
                .iter()
                .zip(linear_ref(&x, &w, (m, kk, n), false))
                .map(|(a, b)| if yb { round_bf16(a + b) } else { a + b })
                .collect();
            assert_close(
                &format!("{what}, accumulated"),
                &k.download(&y, m * n).unwrap(),
                &twice,
                2.0 * tol,
            );
        }
        // an all-f32 product on a bf16 device is the f32 product (no rounding at all)
        let (xd, wd) = (k.upload_new(&x).unwrap(), k.upload_new(&w).unwrap());
        let mut y = k.alloc(m * n).unwrap();
        k.linear(&xd, &wd, None, m, kk, n, &mut y, false).unwrap();
        let cpu = CpuKernels::new();
        let (xc, wc) = (cpu.upload_new(&x).unwrap(), cpu.upload_new(&w).unwrap());
        let mut yc = cpu.alloc(m * n).unwrap();
        cpu.linear(&xc, &wc, None, m, kk, n, &mut yc, false)
            .unwrap();
        assert_close(
            "f32 linear on a bf16 device",
            &k.download(&y, m * n).unwrap(),
            &cpu.download(&yc, m * n).unwrap(),
            TOL,
        );
    }

    pub fn bf16_rows_and_norms<K: Kernels>(k: &K) {
        let (rows, d) = (7, 77);
        let x = scaled_vec(rows * d, 40, 2.0);
        let gamma = scaled_vec(d, 41, 1.0);
        let beta = scaled_vec(d, 42, 1.0);
        let dy = scaled_vec(rows * d, 43, 1.0);
        // the statistics are f32 from the same values: one rounding of the output
        twin(
            k,
            "layer_norm",
            &[x.clone(), gamma.clone(), beta],
            &[vec![0.0; rows * d]],
            ONE_ROUNDING,
            &|i, o| k.layer_norm(&i[0], &i[1], &i[2], rows, d, 1e-6, &mut o[0]),
        );
        for acc in [false, true] {
            twin(
                k,
                "layer_norm_vjp",
                &[x.clone(), gamma.clone(), dy.clone()],
                &[dy.clone()],
                ONE_ROUNDING,
                &|i, o| k.layer_norm_vjp(&i[0], &i[1], &i[2], rows, d, 1e-6, &mut o[0], acc),
            );
            twin(
                k,
                "sum_rows",
                &[dy.clone()],
                &[gamma.clone()],
                ONE_ROUNDING,
                &|i, o| k.sum_rows(&i[0], rows, d, &mut o[0], acc),
            );
        }
    }

    pub fn bf16_attention<K: Kernels>(k: &K) {
        let s = AttnShape {
            batch: 2,
            tokens: 9,
            heads: 2,
            head_dim: 8,
        };
        let rows = s.batch * s.tokens;
        let qkv = scaled_vec(rows * 3 * s.width(), 50, 1.0);
        let dout = scaled_vec(rows * s.width(), 51, 1.0);
        let bias = scaled_vec(2 * s.heads * s.tokens * s.tokens, 52, 2.0);
        let sc = vec![0.0; k.attention_scratch(s)];
        // Only the outputs are compared, not the scratch: the fused kernels keep f32
        // statistics there, the unfused ones the scores and probabilities.
        // bf16 scratch: the scores, the probabilities and the output are each rounded once
        // (2^-8 of the value each); the scores' error reaches the probabilities through exp
        // as |score| times it (scores stay below 2 here), so about 4 roundings: 2^-6.
        const ATT: f64 = 1.0 / 64.0;
        twin_outputs(
            k,
            "attention",
            &[qkv.clone()],
            &[vec![0.0; rows * s.width()], sc.clone()],
            1,
            ATT,
            &|i, o| {
                let [out, scratch] = o else { unreachable!() };
                k.attention(&i[0], s, out, scratch)
            },
        );
        twin_outputs(
            k,
            "attention_bias",
            &[qkv.clone(), bias.clone()],
            &[vec![0.0; rows * s.width()], sc.clone()],
            1,
            ATT,
            &|i, o| {
                let [out, scratch] = o else { unreachable!() };
                k.attention_bias(&i[0], s, &i[1], 2, out, scratch)
            },
        );
        // the VJP adds the rounded gradient of the probabilities and the three products of
        // the gradients (one rounding each) to those: 2^-5.
        const ATT_VJP: f64 = 1.0 / 32.0;
        twin_outputs(
            k,
            "attention_vjp",
            &[qkv.clone(), dout.clone()],
            &[vec![0.0; rows * 3 * s.width()], sc.clone()],
            1,
            ATT_VJP,
            &|i, o| {
                let [dqkv, scratch] = o else { unreachable!() };
                k.attention_vjp(&i[0], &i[1], s, dqkv, scratch)
            },
        );
        twin_outputs(
            k,
            "attention_bias_vjp",
            &[qkv, dout, bias],
            &[vec![0.0; rows * 3 * s.width()], sc],
            1,
            ATT_VJP,
            &|i, o| {
                let [dqkv, scratch] = o else { unreachable!() };
                k.attention_bias_vjp(&i[0], &i[1], s, &i[2], 2, dqkv, scratch)
            },
        );
    }

    pub fn bf16_convolution_and_pooling<K: Kernels>(k: &K) {
        let s = ConvShape {
            batch: 2,
            prefix: 1,
            grid: (4, 5),
            width: 6,
            kernel: 3,
        };
        let len = 2 * 21 * 6;
        let x = scaled_vec(len, 60, 1.0);
        let w = scaled_vec(6 * 9, 61, 1.0);
        let dy = scaled_vec(len, 62, 1.0);
        twin(
            k,
            "depthwise_conv",
            &[x.clone(), w.clone()],
            &[vec![0.0; len]],
            ONE_ROUNDING,
            &|i, o| k.depthwise_conv(&i[0], &i[1], s, &mut o[0]),
        );
        for acc in [false, true] {
            twin(
                k,
                "depthwise_conv_vjp",
                &[x.clone(), w.clone(), dy.clone()],
                &[vec![0.0; len], w.clone()],
                ONE_ROUNDING,
                &|i, o| {
                    let [dx, dw] = o else { unreachable!() };
                    k.depthwise_conv_vjp(&i[0], &i[1], &i[2], s, dx, dw, acc)
                },
            );
        }
        let (b, t, d) = (2, 21, 6);
        twin(
            k,
            "mean_tokens",
            &[x.clone()],
            &[vec![0.0; b * d]],
            ONE_ROUNDING,
            &|i, o| k.mean_tokens(&i[0], b, t, d, 1, t, &mut o[0]),
        );
        twin(
            k,
            "mean_tokens_vjp",
            &[scaled_vec(b * d, 63, 1.0)],
            &[vec![0.0; len]],
            ONE_ROUNDING,
            &|i, o| k.mean_tokens_vjp(&i[0], b, t, d, 1, t, &mut o[0]),
        );
    }

    pub fn bf16_loss_and_optimizer<K: Kernels>(k: &K) {
        let (b, c) = (5, 11);
        let logits = scaled_vec(b * c, 70, 3.0);
        let targets: Vec<f32> = rand_vec(b * c, 71)
            .iter()
            .map(|v| v.abs() / c as f32)
            .collect();
        twin(
            k,
            "soft_cross_entropy",
            &[logits.clone(), targets],
            &[vec![0.0], vec![0.0; b * c]],
            ONE_ROUNDING,
            &|i, o| {
                let [loss, grad] = o else { unreachable!() };
                k.soft_cross_entropy(&i[0], &i[1], b, c, loss, grad)
            },
        );
        // hit counts are small whole numbers, exact in bf16; the summed loss is rounded once
        let labels = vec![0.0, 3.0, 10.0, 2.0, 7.0];
        twin(
            k,
            "eval_stats",
            &[logits, labels],
            &[vec![0.0; 4]],
            ONE_ROUNDING,
            &|i, o| k.eval_stats(&i[0], &i[1], b, c, &mut o[0]),
        );
        let n = 2001;
        let x = scaled_vec(n, 72, 1.0);
        twin(
            k,
            "sum_squares",
            &[x.clone()],
            &[vec![0.5]],
            ONE_ROUNDING,
            &|i, o| k.sum_squares(&i[0], n, &mut o[0]),
        );
        // every buffer bf16 (the side network keeps f32 ones; any mix is accepted): the new
        // parameter, m and v are each rounded once
        let step = AdamwStep::new(1e-2, 0.9, 0.999, 1e-8, 0.05, 2);
        let grad = scaled_vec(n, 73, 0.1);
        twin(
            k,
            "adamw",
            &[grad, vec![30.0]],
            &[
                x,
                scaled_vec(n, 74, 0.01),
                rand_vec(n, 75).iter().map(|v| v * v * 1e-3).collect(),
            ],
            ONE_ROUNDING,
            &|i, o| {
                let [param, m, v] = o else { unreachable!() };
                k.adamw(param, &i[0], m, v, n, &step, Some((&i[1], 1.0)))
            },
        );
    }
}

mod graph_checks {
    use super::*;
    use dtl_kernels::Capture;

    /// A small training-step-like sequence: products (mixed f32 and bf16 operands on a bf16
    /// device), LayerNorm, GELU, attention, a reduction, a copy and an optimizer step.
    struct Work<K: Kernels> {
        x: K::Buf,
        w: K::Buf,
        gamma: K::Buf,
        beta: K::Buf,
        h: K::Buf,
        n: K::Buf,
        qkv: K::Buf,
        att: K::Buf,
        scratch: K::Buf,
        sq: K::Buf,
        p: K::Buf,
        m: K::Buf,
        v: K::Buf,
        grad: K::Buf,
    }

    const M: usize = 6;
    const D: usize = 8;
    const SHAPE: AttnShape = AttnShape {
        batch: 2,
        tokens: 3,
        heads: 2,
        head_dim: 4,
    };

    fn setup<K: Kernels>(k: &K) -> Work<K> {
        Work {
            x: k.alloc_act(M * D).unwrap(),
            w: k.upload_frozen(&scaled_vec(3 * D * D, 81, 0.5)).unwrap(),
            gamma: k.upload_frozen(&scaled_vec(D, 82, 1.0)).unwrap(),
            beta: k.upload_new(&scaled_vec(D, 83, 1.0)).unwrap(),
            h: k.alloc_act(M * D).unwrap(),
            n: k.alloc(M * D).unwrap(),
            qkv: k.alloc_act(M * 3 * D).unwrap(),
            att: k.alloc_act(M * D).unwrap(),
            scratch: k.alloc_act(k.attention_scratch(SHAPE)).unwrap(),
            sq: k.alloc(1).unwrap(),
            p: k.upload_new(&scaled_vec(D * D, 84, 1.0)).unwrap(),
            m: k.alloc(D * D).unwrap(),
            v: k.alloc(D * D).unwrap(),
            grad: k.alloc(D * D).unwrap(),
        }
    }

    fn step<K: Kernels>(k: &K, s: &mut Work<K>) -> dtl_core::Result<()> {
        k.layer_norm(&s.x, &s.gamma, &s.beta, M, D, 1e-6, &mut s.n)?;
        k.linear(&s.n, &s.w, None, M, D, 3 * D, &mut s.qkv, false)?;
        k.attention(&s.qkv, SHAPE, &mut s.att, &mut s.scratch)?;
        k.gelu(&s.att, M * D, &mut s.h)?;
        k.linear_wgrad(&s.h, &s.att, M, D, D, &mut s.grad, false)?;
        k.copy(&s.h, &mut s.n, M * D)?;
        k.fill(&mut s.sq, 1, 0.0)?;
        k.sum_squares(&s.grad, D * D, &mut s.sq)?;
        let st = AdamwStep::new(1e-2, 0.9, 0.999, 1e-8, 0.05, 1);
        k.adamw(
            &mut s.p,
            &s.grad,
            &mut s.m,
            &mut s.v,
            D * D,
            &st,
            Some((&s.sq, 1.0)),
        )
    }

    fn results<K: Kernels>(k: &K, s: &Work<K>) -> Vec<Vec<f32>> {
        [&s.n, &s.qkv, &s.att, &s.h, &s.grad, &s.sq, &s.p, &s.m, &s.v]
            .iter()
            .map(|b| k.download(b, k.len(b)).unwrap())
            .collect()
    }

    pub fn graph_replay_matches_plain_launches<K: Kernels>(k: &K) {
        let mut plain = setup(k);
        let mut rec = setup(k);
        // warm up once: the bf16 conversion scratch grows outside the recording
        k.upload(&scaled_vec(M * D, 85, 1.0), &mut plain.x).unwrap();
        step(k, &mut plain).unwrap();
        k.upload(&scaled_vec(M * D, 85, 1.0), &mut rec.x).unwrap();
        step(k, &mut rec).unwrap();
        let mut plain_results = Vec::new();
        let c = k.capture(&mut || step(k, &mut rec)).unwrap();
        step(k, &mut plain).unwrap();
        plain_results.push(results(k, &plain));
        let Capture::Graph(g) = c else {
            // a device without graphs runs the work plainly: the same results all the same
            assert_eq!(results(k, &rec), plain_results[0]);
            return;
        };
        // the capture ran the work once
        assert_eq!(results(k, &rec), plain_results[0], "after capture");
        // new inputs through device buffers, then replays: bit for bit the plain launches
        for round in 0..2u64 {
            let x = scaled_vec(M * D, 86 + round, 1.5);
            k.upload(&x, &mut rec.x).unwrap();
            k.upload(&x, &mut plain.x).unwrap();
            k.replay(&g).unwrap();
            step(k, &mut plain).unwrap();
            assert_eq!(results(k, &rec), results(k, &plain), "replay {round}");
        }
        k.release(g);
    }

    /// The parameters, moments and gradients of three tensors updated with clipping.
    struct Update<K: Kernels> {
        p: Vec<K::Buf>,
        m: Vec<K::Buf>,
        v: Vec<K::Buf>,
        g: Vec<K::Buf>,
        sq: K::Buf,
    }

    const LENS: [usize; 3] = [37, 300, 5];

    fn update_setup<K: Kernels>(k: &K) -> Update<K> {
        let each = |f: &dyn Fn(usize, usize) -> K::Buf| {
            LENS.iter()
                .enumerate()
                .map(|(i, &n)| f(i, n))
                .collect::<Vec<_>>()
        };
        Update {
            p: each(&|i, n| k.upload_new(&scaled_vec(n, 90 + i as u64, 1.0)).unwrap()),
            m: each(&|_, n| k.alloc(n).unwrap()),
            v: each(&|_, n| k.alloc(n).unwrap()),
            g: each(&|_, n| k.alloc(n).unwrap()),
            sq: k.alloc(1).unwrap(),
        }
    }

    /// Clipping to norm 0.5 and AdamW on every tensor: with `steps`, their scalars as launch
    /// arguments; without, read from `scalars`.
    fn update_step<K: Kernels>(
        k: &K,
        u: &mut Update<K>,
        steps: Option<&[AdamwStep]>,
        scalars: &K::Buf,
    ) -> dtl_core::Result<()> {
        k.fill(&mut u.sq, 1, 0.0)?;
        for (g, &n) in u.g.iter().zip(&LENS) {
            k.sum_squares(g, n, &mut u.sq)?;
        }
        for (i, &n) in LENS.iter().enumerate() {
            let clip = Some((&u.sq, 0.5));
            match steps {
                Some(s) => k.adamw(
                    &mut u.p[i],
                    &u.g[i],
                    &mut u.m[i],
                    &mut u.v[i],
                    n,
                    &s[i],
                    clip,
                )?,
                None => k.adamw_from(
                    &mut u.p[i],
                    &u.g[i],
                    &mut u.m[i],
                    &mut u.v[i],
                    n,
                    scalars,
                    i,
                    clip,
                )?,
            }
        }
        Ok(())
    }

    /// The update of step `t` of a schedule whose learning rate changes every step; the
    /// second tensor does not decay.
    fn scheduled(t: u64) -> Vec<AdamwStep> {
        let lr = 1e-2 / t as f64;
        (0..LENS.len())
            .map(|i| AdamwStep::new(lr, 0.9, 0.999, 1e-8, if i == 1 { 0.0 } else { 0.05 }, t))
            .collect()
    }

    fn update_results<K: Kernels>(k: &K, u: &Update<K>) -> Vec<Vec<u32>> {
        u.p.iter()
            .chain(&u.m)
            .chain(&u.v)
            .chain([&u.sq])
            .map(|b| {
                k.download(b, k.len(b))
                    .unwrap()
                    .iter()
                    .map(|x| x.to_bits())
                    .collect()
            })
            .collect()
    }

    pub fn graph_replay_follows_new_adamw_scalars<K: Kernels>(k: &K) {
        let mut plain = update_setup(k);
        let mut rec = update_setup(k);
        let mut scalars = k.alloc(LENS.len() * AdamwStep::SCALARS).unwrap();
        let new_grads = |u: &mut Update<K>, t: u64| {
            for (i, (g, &n)) in u.g.iter_mut().zip(&LENS).enumerate() {
                k.upload(&scaled_vec(n, 100 * t + i as u64, 0.3), g)
                    .unwrap();
            }
        };
        // step 1 recorded, steps 2 to 5 replayed, each after new gradients and new scalars
        let mut graph = None;
        for t in 1..=5u64 {
            let steps = scheduled(t);
            new_grads(&mut plain, t);
            new_grads(&mut rec, t);
            k.upload(&super::checks::scalars_of(&steps), &mut scalars)
                .unwrap();
            update_step(k, &mut plain, Some(&steps), &scalars).unwrap();
            match &graph {
                None => {
                    let c = k
                        .capture(&mut || update_step(k, &mut rec, None, &scalars))
                        .unwrap();
                    graph = Some(c);
                }
                Some(Capture::Graph(g)) => k.replay(g).unwrap(),
                // a device without graphs: the same operations, run plainly
                Some(Capture::Plain(_)) => update_step(k, &mut rec, None, &scalars).unwrap(),
            }
            assert!(
                update_results(k, &rec) == update_results(k, &plain),
                "{}: step {t} differs from the plain update",
                k.describe()
            );
        }
        if let Some(Capture::Graph(g)) = graph {
            k.release(g);
        }
    }

    pub fn graph_capture_that_uploads_runs_plain<K: Kernels>(k: &K) {
        let mut y = k.alloc(4).unwrap();
        let mut sum = k.alloc(4).unwrap();
        let c = k
            .capture(&mut || {
                k.fill(&mut sum, 4, 1.0)?;
                k.upload(&[1.0, 2.0, 3.0, 4.0], &mut y)?;
                k.add(&mut sum, &y, 4)
            })
            .unwrap();
        let reason = c.reason().expect("a capture that uploads is not recorded");
        assert!(reason.contains("upload"), "{reason}");
        // and the work ran, once
        assert_eq!(k.download(&sum, 4).unwrap(), vec![2.0, 3.0, 4.0, 5.0]);
        // an error of the work itself is returned as it is
        let e = k
            .capture(&mut || k.add(&mut sum, &y, 5))
            .unwrap_err()
            .to_string();
        assert!(e.contains("add") && e.contains("`x`"), "{e}");
        // so is a download, and the device works afterwards
        let c = k.capture(&mut || k.download(&y, 4).map(|_| ())).unwrap();
        assert!(c.reason().is_some_and(|r| r.contains("download")), "{c:?}");
        k.add(&mut sum, &y, 4).unwrap();
        assert_eq!(k.download(&sum, 4).unwrap(), vec![3.0, 5.0, 7.0, 9.0]);
        // replaying an unknown graph is an error
        assert!(k.replay(&dtl_kernels::GraphId(999_999)).is_err());
    }

    pub fn graph_keeps_dropped_buffers<K: Kernels>(k: &K) {
        let Some(before) = k.memory() else { return };
        let x = k.upload_new(&[1.0, 2.0, 3.0]).unwrap();
        let mut y = k.alloc(1 << 16).unwrap();
        let c = k.capture(&mut || k.add(&mut y, &x, 3)).unwrap();
        let Capture::Graph(g) = c else { return };
        let during = k.memory().unwrap().live;
        assert!(during >= before.live + (1 << 18), "{during} vs {before:?}");
        // dropped while the graph lives: kept (the graph holds their pointers)
        drop(x);
        drop(y);
        assert_eq!(
            k.memory().unwrap().live,
            during,
            "kept while the graph lives"
        );
        k.replay(&g).unwrap();
        k.synchronize().unwrap();
        // released: freed
        k.release(g);
        k.synchronize().unwrap();
        assert_eq!(
            k.memory().unwrap().live,
            before.live,
            "freed after the release"
        );
        assert!(k.replay(&dtl_kernels::GraphId(0)).is_err());
    }
}
