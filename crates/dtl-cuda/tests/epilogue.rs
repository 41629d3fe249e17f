//! The bias of a bf16 linear added in the product's epilogue (`DTL_GEMM_EPILOGUE=lt`, cuBLASLt's
//! `CUBLASLT_EPILOGUE_BIAS`) against the plain path (`BiasRows`, then the product with
//! `beta = 1`) and against an f64 host reference on the bf16 inputs, with and without
//! `accumulate`, on square, odd and ViT-like shapes; and the fallbacks to the plain path: a
//! product the modelled cuBLASLt refuses, vector-shaped products, f32 weights. Each check runs
//! on the emulator (when a C++20 compiler is there) and on `cuda:0` opened for bf16 (when a GPU
//! is there).
//!
//! Bounds, per value, with `u = 2^-8` (bf16's unit roundoff), `A = sum |x w|` over the value's
//! products, `k` the inner size, `g = (k + 2) 2^-24 (A + |c| + |bias|)` (f32 summation), `c` the
//! output's value before an accumulating linear:
//! - `lt` against the f64 reference `x w^T + c + bias`: `u |ref| + g` (one rounding to bf16);
//! - `lt` against `plain`: `u (|lt| + |plain|) + 2 g`. The bias is written exactly (it is bf16
//!   already), and on the emulator, whose model of cuBLAS and cuBLASLt sums in the same order,
//!   both paths agree bit for bit.
//! - An accumulating linear (`y += x w^T + bias`) keeps the plain path under `lt` too, so both
//!   give the same bits; the f64 bound still applies, plus `u |c + bias|` for the plain path's
//!   rounding of `c + bias`.
#![cfg(feature = "cuda")]

use dtl_core::choice::Precision;
use dtl_cuda::{DeviceSettings, Emulator, EpilogueStats, GemmEpilogue, Gpu};
use dtl_kernels::Kernels;

const U: f64 = 1.0 / 256.0;

/// A device opened for bf16 storage whose epilogue can be chosen.
trait Device: Kernels + Clone {
    fn select(&mut self, e: GemmEpilogue);
    fn stats(&self) -> EpilogueStats;
    /// Whether its products sum in the same order on both paths (the emulator's model).
    fn same_order(&self) -> bool;
}

impl Device for Emulator {
    fn select(&mut self, e: GemmEpilogue) {
        self.set_gemm_epilogue(e);
    }
    fn stats(&self) -> EpilogueStats {
        self.epilogue_stats()
    }
    fn same_order(&self) -> bool {
        true
    }
}

impl Device for Gpu {
    fn select(&mut self, e: GemmEpilogue) {
        self.set_gemm_epilogue(e);
    }
    fn stats(&self) -> EpilogueStats {
        self.epilogue_stats()
    }
    fn same_order(&self) -> bool {
        false
    }
}

fn emulator() -> Option<Emulator> {
    if std::env::var("DTL_SKIP_EMULATOR").is_ok_and(|v| v == "1") {
        return None;
    }
    match Emulator::with_precision(Precision::Bf16) {
        Ok(e) => Some(e),
        Err(e) => {
            eprintln!("no emulator, its checks are skipped: {e}");
            None
        }
    }
}

fn gpu() -> Option<Gpu> {
    match Gpu::open_with(0, Precision::Bf16) {
        Ok(g) => Some(g),
        Err(e) => {
            assert!(
                std::env::var("DTL_REQUIRE_GPU").map_or(true, |v| v != "1"),
                "DTL_REQUIRE_GPU=1 but cuda:0 cannot be opened: {e}"
            );
            eprintln!("no GPU at cuda:0, the GPU checks are skipped: {e}");
            None
        }
    }
}

/// Values in [-scale, scale), from a fixed seed.
fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

/// The inputs of one linear on `d`, in bf16 buffers, and their bf16 values on the host.
struct Case<D: Kernels> {
    m: usize,
    k: usize,
    n: usize,
    x: (D::Buf, Vec<f32>),
    w: (D::Buf, Vec<f32>),
    bias: (D::Buf, Vec<f32>),
    y0: Vec<f32>,
}

fn case<D: Kernels>(d: &D, (m, k, n): (usize, usize, usize), seed: u64) -> Case<D> {
    let up = |v: Vec<f32>| {
        let b = d.upload_frozen(&v).unwrap();
        let r = d.download(&b, v.len()).unwrap();
        (b, r)
    };
    let y0 = {
        let mut b = d.alloc_act(m * n).unwrap();
        d.upload(&values(m * n, seed + 3, 2.0), &mut b).unwrap();
        d.download(&b, m * n).unwrap()
    };
    Case {
        m,
        k,
        n,
        x: up(values(m * k, seed, 1.0)),
        w: up(values(n * k, seed + 1, 0.5)),
        bias: up(values(n, seed + 2, 1.5)),
        y0,
    }
}

/// `y` after the linear of `c` on `d`, starting from `c.y0` when accumulating, else from NaN
/// (a product that does not accumulate must not read its output).
fn linear<D: Kernels>(d: &D, c: &Case<D>, accumulate: bool) -> Vec<f32> {
    let mut y = d.alloc_act(c.m * c.n).unwrap();
    if accumulate {
        d.upload(&c.y0, &mut y).unwrap();
    } else {
        d.upload(&vec![f32::NAN; c.m * c.n], &mut y).unwrap();
    }
    d.linear(
        &c.x.0,
        &c.w.0,
        Some(&c.bias.0),
        c.m,
        c.k,
        c.n,
        &mut y,
        accumulate,
    )
    .unwrap();
    d.download(&y, c.m * c.n).unwrap()
}

/// Per value: the f64 reference, `A + |c| + |bias|` and `c + bias`.
fn reference<D: Kernels>(c: &Case<D>, accumulate: bool) -> Vec<(f64, f64, f64)> {
    let mut out = Vec::with_capacity(c.m * c.n);
    for r in 0..c.m {
        for j in 0..c.n {
            let (mut s, mut a) = (0f64, 0f64);
            for l in 0..c.k {
                let p = c.x.1[r * c.k + l] as f64 * c.w.1[j * c.k + l] as f64;
                s += p;
                a += p.abs();
            }
            let prev = if accumulate {
                c.y0[r * c.n + j] as f64
            } else {
                0.0
            };
            let b = c.bias.1[j] as f64;
            out.push((s + prev + b, a + prev.abs() + b.abs(), prev + b));
        }
    }
    out
}

/// `lt` against `plain` and both against the reference, within the bounds of the module docs.
fn compare<D: Device>(dev: &D, shape: (usize, usize, usize), accumulate: bool, seed: u64) {
    let (mut lt, mut plain) = (dev.clone(), dev.clone());
    lt.select(GemmEpilogue::Lt);
    plain.select(GemmEpilogue::Plain);
    let c = case(dev, shape, seed);
    let before = lt.stats();
    let got_lt = linear(&lt, &c, accumulate);
    let after = lt.stats();
    // An accumulating linear keeps the plain path (see `linear_ptr`): nothing is counted.
    let want = if accumulate { (0, 0) } else { (1, 0) };
    assert_eq!(
        (after.fused - before.fused, after.fallback - before.fallback),
        want,
        "{shape:?} accumulate {accumulate}: the epilogue ran where it should not, or not where it should"
    );
    let got_plain = linear(&plain, &c, accumulate);
    assert_eq!(plain.stats(), after, "{shape:?}: the plain path counted");
    if accumulate {
        for (i, (l, p)) in got_lt.iter().zip(&got_plain).enumerate() {
            assert_eq!(l.to_bits(), p.to_bits(), "{shape:?}: value {i}: {l} vs {p}");
        }
    }
    let g_of = |a: f64| (c.k as f64 + 2.0) * a / (1u64 << 24) as f64;
    for (i, ((l, p), (r, a, cb))) in got_lt
        .iter()
        .zip(&got_plain)
        .zip(reference(&c, accumulate))
        .enumerate()
    {
        let (l, p) = (*l as f64, *p as f64);
        let g = g_of(a);
        let what = format!("{shape:?} accumulate {accumulate}: value {i}");
        assert!(l.is_finite() && p.is_finite(), "{what}: {l} / {p}");
        let to_ref = U * r.abs() + g + if accumulate { U * cb.abs() } else { 0.0 };
        assert!(
            (l - r).abs() <= to_ref,
            "{what}: lt {l} vs reference {r} (bound {to_ref:e})"
        );
        let to_plain =
            U * (l.abs() + p.abs()) + 2.0 * g + if accumulate { U * cb.abs() } else { 0.0 };
        assert!(
            (l - p).abs() <= to_plain,
            "{what}: lt {l} vs plain {p} (bound {to_plain:e})"
        );
        if !accumulate && dev.same_order() {
            assert_eq!(l.to_bits(), p.to_bits(), "{what}: lt {l} vs plain {p}");
        }
    }
}

const SHAPES: [(usize, usize, usize); 5] = [
    (2, 2, 2),
    (3, 5, 7),
    (17, 33, 9),
    (50, 64, 96),
    (197, 40, 24),
];

fn all_shapes<D: Device>(d: &D) {
    for (i, s) in SHAPES.into_iter().enumerate() {
        for acc in [false, true] {
            compare(d, s, acc, 10 * i as u64 + acc as u64);
        }
    }
}

#[test]
fn lt_matches_plain_and_the_reference() {
    if let Some(e) = emulator() {
        all_shapes(&e);
    }
    if let Some(g) = gpu() {
        all_shapes(&g);
    }
}

/// A linear of `shape` with `lt` selected runs the plain path: the same values bit for bit,
/// and one fallback counted (none for an accumulating linear, which never asks for the
/// epilogue).
fn falls_back<D: Device>(lt: &D, shape: (usize, usize, usize), accumulate: bool) {
    let mut plain = lt.clone();
    plain.select(GemmEpilogue::Plain);
    let c = case(lt, shape, 77);
    let before = lt.stats();
    let got = linear(lt, &c, accumulate);
    let after = lt.stats();
    assert_eq!(
        (after.fused - before.fused, after.fallback - before.fallback),
        (0, if accumulate { 0 } else { 1 }),
        "{shape:?} accumulate {accumulate}"
    );
    let want = linear(&plain, &c, accumulate);
    assert_eq!(
        got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        "{shape:?} accumulate {accumulate}"
    );
}

fn vector_shapes_fall_back<D: Device>(d: &D) {
    let mut lt = d.clone();
    lt.select(GemmEpilogue::Lt);
    for (i, s) in [(1, 8, 6), (5, 1, 6), (5, 8, 1)].into_iter().enumerate() {
        falls_back(&lt, s, i % 2 == 1);
    }
}

#[test]
fn vector_shaped_products_run_the_plain_path() {
    if let Some(e) = emulator() {
        vector_shapes_fall_back(&e);
    }
    if let Some(g) = gpu() {
        vector_shapes_fall_back(&g);
    }
}

#[test]
fn a_product_cublaslt_refuses_runs_the_plain_path() {
    let Some(mut e) = emulator() else { return };
    e.set_gemm_epilogue(GemmEpilogue::Lt);
    e.refuse_gemm_epilogue(true);
    for acc in [false, true] {
        falls_back(&e, (17, 33, 9), acc);
    }
    // taken again once cuBLASLt accepts it
    e.refuse_gemm_epilogue(false);
    compare(&e, (17, 33, 9), false, 5);
}

fn f32_weights_keep_the_plain_path<D: Device>(d: &D) {
    let (mut lt, mut plain) = (d.clone(), d.clone());
    lt.select(GemmEpilogue::Lt);
    plain.select(GemmEpilogue::Plain);
    let (m, k, n) = (6, 10, 4);
    let x = lt.upload_frozen(&values(m * k, 1, 1.0)).unwrap();
    // trained weights and bias stay f32 on a bf16 device
    let w = lt.upload_new(&values(n * k, 2, 0.5)).unwrap();
    let b = lt.upload_new(&values(n, 3, 1.0)).unwrap();
    let run = |dev: &D| {
        let mut y = dev.alloc_act(m * n).unwrap();
        dev.linear(&x, &w, Some(&b), m, k, n, &mut y, false)
            .unwrap();
        dev.download(&y, m * n).unwrap()
    };
    let before = lt.stats();
    let got = run(&lt);
    assert_eq!(lt.stats(), before, "an f32 linear asked for the epilogue");
    assert_eq!(got, run(&plain));
}

#[test]
fn f32_weights_keep_the_plain_path_on_devices() {
    if let Some(e) = emulator() {
        f32_weights_keep_the_plain_path(&e);
    }
    if let Some(g) = gpu() {
        f32_weights_keep_the_plain_path(&g);
    }
}

fn graph_replays_the_epilogue<D: Device>(d: &D) {
    let mut lt = d.clone();
    lt.select(GemmEpilogue::Lt);
    let c = case(&lt, (17, 33, 9), 9);
    let want = linear(&lt, &c, true);
    let mut y = lt.alloc_act(c.m * c.n).unwrap();
    lt.upload(&c.y0, &mut y).unwrap();
    let captured = lt
        .capture(&mut || lt.linear(&c.x.0, &c.w.0, Some(&c.bias.0), c.m, c.k, c.n, &mut y, true))
        .unwrap();
    // the capture ran the linear once; replaying it from y0 again gives the same values
    assert_eq!(lt.download(&y, c.m * c.n).unwrap(), want);
    lt.upload(&c.y0, &mut y).unwrap();
    if let dtl_kernels::Capture::Graph(id) = captured {
        lt.replay(&id).unwrap();
        assert_eq!(lt.download(&y, c.m * c.n).unwrap(), want);
        lt.release(id);
    }
}

#[test]
fn a_recorded_graph_replays_the_epilogue() {
    if let Some(e) = emulator() {
        graph_replays_the_epilogue(&e);
    }
    if let Some(g) = gpu() {
        graph_replays_the_epilogue(&g);
    }
}
