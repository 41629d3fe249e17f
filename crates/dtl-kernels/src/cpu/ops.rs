//! The hot loops of the CPU kernels, on plain `f32` slices: matrix products, LayerNorm, GELU,
//! attention, residuals and the patch embedding.
//!
//! Matrix products go through [`super::strided::matmul`], the rows of the output split over
//! the rayon threads; row-wise work (LayerNorm, GELU, softmax) and attention (one task per
//! sample, or per sample and head for small batches) are parallelised with rayon, and the
//! innermost loops are compiled for AVX-512 and for AVX2 + FMA besides the baseline, the
//! copy picked at run time. Every function here works on row-major slices of
//! exactly the sizes it is given (longer slices are fine) and panics on slices too short: the
//! checked entry points are the [`Kernels`](crate::Kernels) methods of
//! [`CpuKernels`](super::CpuKernels).
//!
//! ```
//! use dtl_kernels::cpu::ops;
//! // y (1 x 2) = x (1 x 2) w^T + b, w = identity
//! let mut y = [0.0f32; 2];
//! ops::linear(&[1.0, 2.0], &[1.0, 0.0, 0.0, 1.0], Some(&[0.5, 0.5]), 1, 2, 2, &mut y, false);
//! assert_eq!(y, [1.5, 2.5]);
//! ```

use rayon::prelude::*;

use super::strided::{matmul, Mat, MatMut};
use crate::AttnShape;

/// Rows handled by one rayon task in the row-wise kernels, at least.
const ROW_CHUNK: usize = 16;

/// Values handled by one rayon task in the elementwise kernels, at least.
const ELEM_CHUNK: usize = 8192;

/// The rows (or values) per rayon task when `total` of them are split: about four tasks per
/// thread, so that the threads stay balanced without paying for many small tasks, and at
/// least `min`. Every kernel that uses it treats each row (value) on its own, so the results
/// do not depend on the split.
fn per_task(total: usize, min: usize) -> usize {
    let tasks = 4 * rayon::current_num_threads().max(1);
    total.div_ceil(tasks).max(min)
}

/// Compiles a slice loop three times, for AVX-512, for AVX2 + FMA and for the baseline, and
/// picks the best the CPU has at run time; `simd_loop! { avx2; fn ... }` leaves out the
/// AVX-512 copy (for loops over rows too short for 16-wide lanes to pay).
///
/// The body is written in plain scalar Rust with no calls that cannot be inlined, so the
/// compiler vectorises it: 16-wide lanes with AVX-512, 8-wide with AVX2. Rust contracts no
/// multiply-add on its own and keeps the order of every sum, so the copies give the same
/// values.
macro_rules! simd_loop {
    (avx2; $(#[$m:meta])* $vis:vis fn $name:ident($($a:ident: $t:ty),* $(,)?) $body:block) => {
        $(#[$m])*
        $vis fn $name($($a: $t),*) {
            #[inline(always)]
            fn inner($($a: $t),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[allow(unsafe_code)]
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($a: $t),*) {
                    inner($($a),*)
                }
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU supports the features `avx2` was compiled for.
                    #[allow(unsafe_code)]
                    return unsafe { avx2($($a),*) };
                }
            }
            inner($($a),*)
        }
    };
    ($(#[$m:meta])* $vis:vis fn $name:ident($($a:ident: $t:ty),* $(,)?) $body:block) => {
        $(#[$m])*
        $vis fn $name($($a: $t),*) {
            #[inline(always)]
            fn inner($($a: $t),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[allow(unsafe_code)]
                #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
                unsafe fn avx512($($a: $t),*) {
                    inner($($a),*)
                }
                #[allow(unsafe_code)]
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($a: $t),*) {
                    inner($($a),*)
                }
                if std::is_x86_feature_detected!("avx512f")
                    && std::is_x86_feature_detected!("avx512vl")
                    && std::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the CPU supports the features `avx512` was compiled for.
                    #[allow(unsafe_code)]
                    return unsafe { avx512($($a),*) };
                }
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU supports the features `avx2` was compiled for.
                    #[allow(unsafe_code)]
                    return unsafe { avx2($($a),*) };
                }
            }
            inner($($a),*)
        }
    };
}
pub(crate) use simd_loop;

/// `e^x` for `f32` in branch-free arithmetic (so that loops using it vectorise): range
/// reduction `x = n ln 2 + r`, `|r| <= ln 2 / 2`, a degree-6 Taylor polynomial for `e^r`
/// (relative error below 2e-7) and `2^n` built from the exponent bits.
///
/// ```
/// let e = dtl_kernels::cpu::ops::exp_fast(1.0);
/// assert!((e - std::f32::consts::E).abs() < 1e-6);
/// ```
#[inline(always)]
pub fn exp_fast(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split in a part exact in f32 and the remainder
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    let x = x.clamp(-87.0, 88.0);
    // 1.5 * 2^23: adding it to an integral float puts the integer in the low mantissa bits
    const MAGIC: f32 = 12_582_912.0;
    let n = (x * LOG2E + 0.5).floor();
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    // n (in [-126, 127]) as a two's-complement integer without a float-to-int conversion,
    // which the compiler would not vectorise
    let ni = (n + MAGIC).to_bits().wrapping_sub(MAGIC.to_bits());
    p * f32::from_bits(ni.wrapping_add(127) << 23)
}

/// `erf(x)` for `f32` in branch-free arithmetic: `x P(x^2) / Q(x^2)` on `[-4, 4]` (erf is
/// 1 to f32 precision beyond), absolute error below 4e-7. The coefficients are a weighted
/// least-squares rational fit to erf made for this crate.
///
/// ```
/// assert!((dtl_kernels::cpu::ops::erf_fast(0.5) - 0.520_499_9).abs() < 1e-6);
/// ```
#[inline(always)]
pub fn erf_fast(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let t = x * x;
    let p = 1.128_378_7
        + t * (0.213_778_17
            + t * (0.052_411_135
                + t * (0.004_283_622
                    + t * (1.551_236_6e-4 + t * (-1.985_071_8e-6 + t * 1.916_041_4e-8)))));
    let q =
        1.0 + t * (0.522_783_9 + t * (0.120_729_95 + t * (0.015_535_261 + t * 0.001_095_091_6)));
    x * p / q
}

thread_local! {
    /// Large buffers kept for reuse by the calling thread, so that each block does not map
    /// fresh pages from the system for its intermediates.
    static POOL: std::cell::RefCell<Vec<Vec<f32>>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Buffers kept per thread at most.
const POOL_SIZE: usize = 8;

/// Buffers smaller than this many values are left to the allocator.
const POOL_MIN: usize = 1 << 12;

/// A zero-filled buffer of `n` values, reusing the smallest pooled allocation that is large
/// enough, if any.
///
/// ```
/// use dtl_kernels::cpu::ops::{recycle, scratch};
/// let v = scratch(10_000);
/// assert!(v.len() == 10_000 && v.iter().all(|&x| x == 0.0));
/// recycle(v); // the next scratch of up to 10,000 values on this thread reuses it
/// ```
pub fn scratch(n: usize) -> Vec<f32> {
    match pooled(n) {
        Some(mut v) => {
            v.resize(n, 0.0);
            v
        }
        None => vec![0.0; n],
    }
}

/// An empty buffer with room for `n` values: the smallest pooled allocation that is large
/// enough, if any (and `n` is not small).
///
/// ```
/// let v = dtl_kernels::cpu::ops::pooled(10).unwrap_or_default();
/// assert!(v.is_empty());
/// ```
pub fn pooled(n: usize) -> Option<Vec<f32>> {
    if n < POOL_MIN {
        return None;
    }
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        let (i, _) = p
            .iter()
            .enumerate()
            .filter(|(_, v)| v.capacity() >= n)
            .min_by_key(|(_, v)| v.capacity())?;
        let mut v = p.swap_remove(i);
        v.clear();
        Some(v)
    })
}

/// Returns a buffer to the calling thread's pool (the largest ones are kept).
///
/// ```
/// dtl_kernels::cpu::ops::recycle(vec![0.0; 5000]);
/// ```
pub fn recycle(v: Vec<f32>) {
    if v.capacity() < POOL_MIN {
        return;
    }
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        p.push(v);
        if p.len() > POOL_SIZE {
            let (i, _) = p
                .iter()
                .enumerate()
                .min_by_key(|(_, v)| v.capacity())
                .expect("pool is not empty");
            p.swap_remove(i);
        }
    });
}

/// `out (m x n) [+]= x (m x k) * w^T [+ bias]`, with `w` in PyTorch's (out, in) = (n x k)
/// layout; `accumulate` adds into `out`.
///
/// ```
/// let mut y = [1.0f32; 2];
/// dtl_kernels::cpu::ops::linear(&[1.0, 2.0], &[1.0, 1.0, 0.0, 1.0], None, 1, 2, 2, &mut y, true);
/// assert_eq!(y, [4.0, 3.0]);
/// ```
#[allow(clippy::too_many_arguments)]
pub fn linear(
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    m: usize,
    k: usize,
    n: usize,
    out: &mut [f32],
    accumulate: bool,
) {
    assert!(x.len() >= m * k && w.len() >= n * k && out.len() >= m * n);
    assert!(bias.map_or(true, |b| b.len() >= n));
    if m == 0 || n == 0 {
        return;
    }
    let out = &mut out[..m * n];
    // w^T read in place: element (kk, j) is w[j * k + kk].
    // the bias is added by each task to its rows right after their product, while they are
    // still in cache
    rows_product_bias(x, k, 1, w, 1, k, m, k, n, accumulate, bias, out);
}

simd_loop! {
    /// `rows[i] += bias` for each row of `rows` (rows of `bias.len()` values).
    fn add_bias_rows(rows: &mut [f32], bias: &[f32]) {
        let n = bias.len();
        for r in rows.chunks_exact_mut(n) {
            for j in 0..n {
                r[j] += bias[j];
            }
        }
    }
}

/// Rows per task when a product over `m` rows is split across the rayon threads.
fn rows_per_task(m: usize) -> usize {
    let t = rayon::current_num_threads().max(1);
    m.div_ceil(t).max(1)
}

/// The input gradient of [`linear`]: `dx (m x k) [+]= dy (m x n) * w (n x k)`.
///
/// ```
/// let mut dx = [0.0f32; 2];
/// dtl_kernels::cpu::ops::linear_vjp(&[1.0, 2.0], &[1.0, 1.0, 0.0, 1.0], 1, 2, 2, &mut dx, false);
/// assert_eq!(dx, [1.0, 3.0]);
/// ```
pub fn linear_vjp(
    dy: &[f32],
    w: &[f32],
    m: usize,
    k: usize,
    n: usize,
    dx: &mut [f32],
    accumulate: bool,
) {
    assert!(dy.len() >= m * n && w.len() >= n * k && dx.len() >= m * k);
    rows_product(dy, n, 1, w, k, 1, m, n, k, accumulate, dx);
}

/// The weight gradient of [`linear`]: `dw (n x k) [+]= dy^T (n x m) * x (m x k)`.
///
/// With enough output rows they are split over the threads; otherwise the `m` rows of the
/// inputs are, into partial sums that are then added in order (the result does not depend
/// on the thread pool's scheduling).
///
/// ```
/// let mut dw = [0.0f32; 2];
/// // two rows of x = [1, 2] and [3, 4], dy = [1, 1]: dw = [4, 6]
/// dtl_kernels::cpu::ops::linear_wgrad(&[1.0, 1.0], &[1.0, 2.0, 3.0, 4.0], 2, 2, 1, &mut dw, false);
/// assert_eq!(dw, [4.0, 6.0]);
/// ```
pub fn linear_wgrad(
    dy: &[f32],
    x: &[f32],
    m: usize,
    k: usize,
    n: usize,
    dw: &mut [f32],
    accumulate: bool,
) {
    assert!(dy.len() >= m * n && x.len() >= m * k && dw.len() >= n * k);
    if n == 0 || k == 0 {
        return;
    }
    let dw = &mut dw[..n * k];
    let threads = rayon::current_num_threads().max(1);
    if n >= 4 * threads || m < 64 * threads {
        // dy^T: element (i, l) is dy[l * n + i]
        rows_product(dy, 1, n, x, k, 1, n, m, k, accumulate, dw);
        return;
    }
    let per = m.div_ceil(threads);
    let parts: Vec<Vec<f32>> = (0..m.div_ceil(per))
        .into_par_iter()
        .map(|t| {
            let (lo, hi) = (t * per, ((t + 1) * per).min(m));
            let mut part = scratch(n * k);
            let a = Mat::new(dy, lo * n, n, hi - lo, 1, n);
            let b = Mat::new(x, lo * k, hi - lo, k, k, 1);
            matmul(MatMut::rows_of(&mut part, n, k), a, b, 1.0, false);
            part
        })
        .collect();
    let mut parts = parts.into_iter();
    if !accumulate {
        let first = parts.next().expect("m > 0 here");
        dw.copy_from_slice(&first[..n * k]);
        recycle(first);
    }
    for p in parts {
        for (o, v) in dw.iter_mut().zip(&p) {
            *o += v;
        }
        recycle(p);
    }
}

/// The bias gradient: `db (n) [+]= the sum of the m rows of dy (m x n)`, in row order.
///
/// ```
/// let mut db = [0.0f32; 2];
/// dtl_kernels::cpu::ops::sum_rows(&[1.0, 2.0, 3.0, 4.0], 2, 2, &mut db, false);
/// assert_eq!(db, [4.0, 6.0]);
/// ```
pub fn sum_rows(dy: &[f32], m: usize, n: usize, db: &mut [f32], accumulate: bool) {
    assert!(dy.len() >= m * n && db.len() >= n);
    let db = &mut db[..n];
    if !accumulate {
        db.fill(0.0);
    }
    if n == 0 {
        return;
    }
    for row in dy[..m * n].chunks_exact(n) {
        for (o, v) in db.iter_mut().zip(row) {
            *o += v;
        }
    }
}

/// `out (m x n) = [out +] A (m x k) * B` with `A` read from `a` with row stride `a_rs` and
/// column stride `a_cs`, and `B` the `k x n` matrix read from `b` with strides `b_rs`, `b_cs`.
///
/// The rows of `out` are split over the rayon threads, one single-threaded product each:
/// every task packs `B` once and runs long, which beats splitting inside each product here.
#[allow(clippy::too_many_arguments)]
fn rows_product(
    a: &[f32],
    a_rs: usize,
    a_cs: usize,
    b: &[f32],
    b_rs: usize,
    b_cs: usize,
    m: usize,
    k: usize,
    n: usize,
    accumulate: bool,
    out: &mut [f32],
) {
    rows_product_bias(a, a_rs, a_cs, b, b_rs, b_cs, m, k, n, accumulate, None, out);
}

/// [`rows_product`], then `bias` (n values) added to every row of `out` by the task that
/// computed it.
#[allow(clippy::too_many_arguments)]
fn rows_product_bias(
    a: &[f32],
    a_rs: usize,
    a_cs: usize,
    b: &[f32],
    b_rs: usize,
    b_cs: usize,
    m: usize,
    k: usize,
    n: usize,
    accumulate: bool,
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    assert!(out.len() >= m * n);
    if m == 0 || n == 0 {
        return;
    }
    let bias = bias.map(|b| &b[..n]);
    // the whole left operand, checked once up front (the views of the tasks are inside it)
    Mat::new(a, 0, m, k, a_rs, a_cs);
    let b = Mat::new(b, 0, k, n, b_rs, b_cs);
    let rows = rows_per_task(m);
    out[..m * n]
        .par_chunks_mut(rows * n)
        .enumerate()
        .for_each(|(t, o)| {
            let mr = o.len() / n;
            let a = Mat::new(a, t * rows * a_rs, mr, k, a_rs, a_cs);
            matmul(MatMut::rows_of(o, mr, n), a, b, 1.0, accumulate);
            if let Some(bias) = bias {
                add_bias_rows(o, bias);
            }
        });
}

simd_loop! {
    avx2;
    fn layer_norm_rows(x: &[f32], gamma: &[f32], beta: &[f32], d: usize, eps: f32, out: &mut [f32]) {
        for (orow, xrow) in out.chunks_mut(d).zip(x.chunks(d)) {
            let (mean, rstd) = moments(xrow, eps);
            for j in 0..d {
                orow[j] = (xrow[j] - mean) * rstd * gamma[j] + beta[j];
            }
        }
    }
}

/// Row-wise LayerNorm of `x` (rows x d) into `out` (the same length): statistics in f32,
/// biased variance, as PyTorch.
///
/// ```
/// let mut y = [0.0f32; 2];
/// dtl_kernels::cpu::ops::layer_norm(&[1.0, 3.0], &[1.0, 1.0], &[0.0, 0.5], 2, 0.0, &mut y);
/// assert_eq!(y, [-1.0, 1.5]);
/// ```
pub fn layer_norm(x: &[f32], gamma: &[f32], beta: &[f32], d: usize, eps: f32, out: &mut [f32]) {
    assert_eq!(x.len(), out.len());
    assert!(gamma.len() >= d && beta.len() >= d);
    if d == 0 {
        return;
    }
    let chunk = d * per_task(x.len() / d, ROW_CHUNK);
    out.par_chunks_mut(chunk)
        .zip(x.par_chunks(chunk))
        .for_each(|(o, xi)| layer_norm_rows(xi, gamma, beta, d, eps, o));
}

/// Mean and reciprocal standard deviation of one row (biased variance, as PyTorch).
#[inline(always)]
fn moments(row: &[f32], eps: f32) -> (f32, f32) {
    let d = row.len() as f32;
    let mean = sum8(row) / d;
    let mut acc = [0.0f32; 8];
    let mut it = row.chunks_exact(8);
    for c in &mut it {
        for k in 0..8 {
            let v = c[k] - mean;
            acc[k] += v * v;
        }
    }
    let var = (acc.iter().sum::<f32>()
        + it.remainder()
            .iter()
            .map(|v| (v - mean) * (v - mean))
            .sum::<f32>())
        / d;
    (mean, 1.0 / (var + eps).sqrt())
}

simd_loop! {
    avx2;
    #[allow(clippy::too_many_arguments)]
    fn layer_norm_vjp_rows(
        x: &[f32],
        gamma: &[f32],
        g: &[f32],
        d: usize,
        eps: f32,
        dx: &mut [f32],
        accumulate: bool,
        gh: &mut [f32],
    ) {
        for ((dxr, xr), gr) in dx.chunks_mut(d).zip(x.chunks(d)).zip(g.chunks(d)) {
            let (mean, rstd) = moments(xr, eps);
            // eight running sums each, value j going to sum j % 8 (in whole groups of eight,
            // so that the loop vectorises, then the remainder)
            let mut m1 = [0.0f32; 8];
            let mut m2 = [0.0f32; 8];
            let whole = d / 8 * 8;
            for (((ghc, gc), gmc), xc) in gh[..whole]
                .chunks_exact_mut(8)
                .zip(gr[..whole].chunks_exact(8))
                .zip(gamma[..whole].chunks_exact(8))
                .zip(xr[..whole].chunks_exact(8))
            {
                for k in 0..8 {
                    let v = gc[k] * gmc[k];
                    ghc[k] = v;
                    m1[k] += v;
                    m2[k] += v * (xc[k] - mean) * rstd;
                }
            }
            for j in whole..d {
                gh[j] = gr[j] * gamma[j];
                m1[j % 8] += gh[j];
                m2[j % 8] += gh[j] * (xr[j] - mean) * rstd;
            }
            let m1 = m1.iter().sum::<f32>() / d as f32;
            let m2 = m2.iter().sum::<f32>() / d as f32;
            if accumulate {
                for j in 0..d {
                    let xhat = (xr[j] - mean) * rstd;
                    dxr[j] += rstd * (gh[j] - m1 - xhat * m2);
                }
            } else {
                for j in 0..d {
                    let xhat = (xr[j] - mean) * rstd;
                    dxr[j] = rstd * (gh[j] - m1 - xhat * m2);
                }
            }
        }
    }
}

/// Input-only VJP of [`layer_norm`]: `dx (+)= J^T g`, recomputing the row statistics from `x`.
///
/// With `accumulate` the result is added into `dx`. `x`, `g` and `dx` have the same length.
///
/// ```
/// // a constant gradient through a LayerNorm with unit weight vanishes
/// let mut dx = [1.0f32; 2];
/// dtl_kernels::cpu::ops::layer_norm_vjp(&[1.0, 3.0], &[1.0, 1.0], &[1.0, 1.0], 2, 0.0, &mut dx, false);
/// assert_eq!(dx, [0.0, 0.0]);
/// ```
pub fn layer_norm_vjp(
    x: &[f32],
    gamma: &[f32],
    g: &[f32],
    d: usize,
    eps: f32,
    dx: &mut [f32],
    accumulate: bool,
) {
    assert!(x.len() == g.len() && x.len() == dx.len());
    assert!(gamma.len() >= d);
    if d == 0 {
        return;
    }
    let chunk = d * per_task(x.len() / d, ROW_CHUNK);
    dx.par_chunks_mut(chunk)
        .zip(x.par_chunks(chunk))
        .zip(g.par_chunks(chunk))
        .for_each_init(
            || vec![0.0f32; d],
            |gh, ((dxc, xc), gc)| layer_norm_vjp_rows(xc, gamma, gc, d, eps, dxc, accumulate, gh),
        );
}

const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
/// 1 / sqrt(2 pi).
const INV_SQRT_2PI: f32 = 0.398_942_3;

/// The erf GELU, `0.5 x (1 + erf(x / sqrt 2))`.
///
/// ```
/// assert!((dtl_kernels::cpu::ops::gelu_scalar(1.0) - 0.841_344_7).abs() < 1e-6);
/// ```
#[inline]
pub fn gelu_scalar(x: f32) -> f32 {
    0.5 * x * (1.0 + erf_fast(x * FRAC_1_SQRT_2))
}

/// Derivative of the erf GELU: `Phi(x) + x phi(x)`.
///
/// ```
/// assert!((dtl_kernels::cpu::ops::gelu_grad_scalar(0.0) - 0.5).abs() < 1e-7);
/// ```
#[inline]
pub fn gelu_grad_scalar(x: f32) -> f32 {
    let cdf = 0.5 * (1.0 + erf_fast(x * FRAC_1_SQRT_2));
    cdf + x * INV_SQRT_2PI * exp_fast(-0.5 * x * x)
}

simd_loop! {
    fn gelu_chunk(x: &[f32], out: &mut [f32]) {
        for (o, &v) in out.iter_mut().zip(x) {
            *o = gelu_scalar(v);
        }
    }
}

simd_loop! {
    fn gelu_grad_chunk(u: &[f32], g: &mut [f32]) {
        for (g, &v) in g.iter_mut().zip(u) {
            *g *= gelu_grad_scalar(v);
        }
    }
}

/// `out = gelu(x)` elementwise (over the shorter of the two slices).
///
/// ```
/// let mut y = [1.0f32; 2];
/// dtl_kernels::cpu::ops::gelu(&[0.0, 10.0], &mut y);
/// assert!(y[0] == 0.0 && (y[1] - 10.0).abs() < 1e-5);
/// ```
pub fn gelu(x: &[f32], out: &mut [f32]) {
    let chunk = per_task(x.len().min(out.len()), ELEM_CHUNK);
    out.par_chunks_mut(chunk)
        .zip(x.par_chunks(chunk))
        .for_each(|(o, i)| gelu_chunk(i, o));
}

/// `g *= gelu'(u)` elementwise (over the shorter of the two slices).
///
/// ```
/// let mut g = [2.0f32; 2];
/// dtl_kernels::cpu::ops::gelu_backward_inplace(&[0.0, 10.0], &mut g);
/// assert!(g[0] == 1.0 && (g[1] - 2.0).abs() < 1e-5);
/// ```
pub fn gelu_backward_inplace(u: &[f32], g: &mut [f32]) {
    let chunk = per_task(u.len().min(g.len()), ELEM_CHUNK);
    g.par_chunks_mut(chunk)
        .zip(u.par_chunks(chunk))
        .for_each(|(g, u)| gelu_grad_chunk(u, g));
}

/// Sum of a slice with eight independent accumulators (vectorises).
#[inline(always)]
fn sum8(x: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let mut it = x.chunks_exact(8);
    for c in &mut it {
        for k in 0..8 {
            acc[k] += c[k];
        }
    }
    acc.iter().sum::<f32>() + it.remainder().iter().sum::<f32>()
}

/// Maximum of a non-empty slice with eight independent accumulators (vectorises).
#[inline(always)]
fn max8(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 8];
    let mut it = x.chunks_exact(8);
    for c in &mut it {
        for k in 0..8 {
            acc[k] = if c[k] > acc[k] { c[k] } else { acc[k] };
        }
    }
    let mut m = f32::NEG_INFINITY;
    for &v in acc.iter().chain(it.remainder()) {
        m = if v > m { v } else { m };
    }
    m
}

/// Dot product with eight independent accumulators (vectorises).
#[inline(always)]
fn dot8(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let mut ia = a.chunks_exact(8);
    let mut ib = b.chunks_exact(8);
    for (x, y) in (&mut ia).zip(&mut ib) {
        for k in 0..8 {
            acc[k] += x[k] * y[k];
        }
    }
    acc.iter().sum::<f32>()
        + ia.remainder()
            .iter()
            .zip(ib.remainder())
            .map(|(x, y)| x * y)
            .sum::<f32>()
}

simd_loop! {
    /// In-place softmax of each row of length `n`.
    pub(super) fn softmax_rows(s: &mut [f32], n: usize) {
        for row in s.chunks_mut(n) {
            let max = max8(row);
            for v in row.iter_mut() {
                *v = exp_fast(*v - max);
            }
            let inv = 1.0 / sum8(row);
            for v in row.iter_mut() {
                *v *= inv;
            }
        }
    }
}

simd_loop! {
    /// `dS = P * (dP - rowsum(dP * P)) * scale`, in place in `dp`.
    pub(super) fn softmax_backward_rows(p: &[f32], dp: &mut [f32], n: usize, scale: f32) {
        for (prow, dprow) in p.chunks(n).zip(dp.chunks_mut(n)) {
            let dot = dot8(prow, dprow);
            for (g, &pv) in dprow.iter_mut().zip(prow) {
                *g = pv * (*g - dot) * scale;
            }
        }
    }
}

/// Views of head `h` of sample `b` inside the fused `qkv` buffer (rows x 3d, timm order
/// `[q | k | v]`, each split into heads): `[q, k, v]`, each tokens x head_dim.
fn head_views(qkv: &[f32], s: AttnShape, b: usize, h: usize) -> [Mat<'_>; 3] {
    let d = s.width();
    let base = b * s.tokens * 3 * d + h * s.head_dim;
    [0, d, 2 * d].map(|at| Mat::new(qkv, base + at, s.tokens, s.head_dim, 3 * d, 1))
}

/// Copies per-head results into token rows: `src` holds, for each sample and head, `parts`
/// consecutive tokens x head_dim blocks; `dst` has rows of `parts * d` per token, part `p`
/// of head `h` at columns `p * d + h * head_dim`.
fn heads_to_rows(src: &[f32], s: AttnShape, parts: usize, dst: &mut [f32]) {
    let (d, n, hd) = (s.width(), s.tokens, s.head_dim);
    let block = n * hd;
    dst[..s.batch * n * parts * d]
        .par_chunks_mut(n * parts * d)
        .enumerate()
        .for_each(|(b, sample)| {
            for h in 0..s.heads {
                for p in 0..parts {
                    let from = &src[((b * s.heads + h) * parts + p) * block..][..block];
                    for (row, vals) in sample.chunks_mut(parts * d).zip(from.chunks(hd)) {
                        row[p * d + h * hd..][..hd].copy_from_slice(vals);
                    }
                }
            }
        });
}

/// Values of the per-head scratch buffer of [`attention`] and [`attention_vjp`] for `s`.
///
/// ```
/// let s = dtl_kernels::AttnShape { batch: 2, tokens: 5, heads: 3, head_dim: 4 };
/// assert_eq!(dtl_kernels::cpu::ops::attention_scratch_len(s), 3 * 2 * 5 * 12);
/// ```
pub fn attention_scratch_len(s: AttnShape) -> usize {
    3 * s.batch * s.heads * s.tokens * s.head_dim
}

/// Whether the attention kernels run one task per sample (enough samples to keep every
/// thread busy) rather than one per sample and head.
fn by_sample(s: AttnShape) -> bool {
    s.batch >= 2 * rayon::current_num_threads().max(1)
}

/// Multi-head self-attention core: `out[b, :, head h] = softmax(q k^T * scale) v`.
///
/// `qkv` is (batch * tokens, 3d); `out` is (batch * tokens, d). With at least two samples per
/// thread, one task per sample writes each head's result straight into `out`; otherwise one
/// task per sample and head writes its own block of `heads` (at least
/// [`attention_scratch_len`] values), which is then copied into `out`.
///
/// ```
/// use dtl_kernels::{cpu::ops, AttnShape};
/// // one token: the output is its value vector
/// let s = AttnShape { batch: 1, tokens: 1, heads: 1, head_dim: 2 };
/// let mut out = [0.0f32; 2];
/// let mut heads = vec![0.0; ops::attention_scratch_len(s)];
/// ops::attention(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], s, &mut out, &mut heads);
/// assert_eq!(out, [5.0, 6.0]);
/// ```
pub fn attention(qkv: &[f32], s: AttnShape, out: &mut [f32], heads: &mut [f32]) {
    attention_keeping(qkv, s, out, heads, None);
}

/// Values of the probabilities [`attention_keeping`] keeps for `s`: one tokens x tokens
/// block per sample and head.
///
/// ```
/// let s = dtl_kernels::AttnShape { batch: 2, tokens: 5, heads: 3, head_dim: 4 };
/// assert_eq!(dtl_kernels::cpu::ops::attention_probs_len(s), 2 * 3 * 5 * 5);
/// ```
pub fn attention_probs_len(s: AttnShape) -> usize {
    s.batch * s.heads * s.tokens * s.tokens
}

/// [`attention`], with the probabilities `softmax(q k^T * scale)` written to `probs` (at
/// least [`attention_probs_len`] values, the block of sample `b` and head `h` at
/// `(b * heads + h) * tokens^2`) when it is given, for [`attention_vjp_kept`]. The output is
/// the same with and without it.
///
/// ```
/// use dtl_kernels::{cpu::ops, AttnShape};
/// let s = AttnShape { batch: 1, tokens: 2, heads: 1, head_dim: 1 };
/// let (mut out, mut probs) = ([0.0f32; 2], [0.0f32; 4]);
/// let mut heads = vec![0.0; ops::attention_scratch_len(s)];
/// // equal keys: every query attends to both tokens equally
/// ops::attention_keeping(&[1.0, 1.0, 2.0, 2.0, 1.0, 4.0], s, &mut out, &mut heads, Some(&mut probs));
/// assert_eq!(probs, [0.5; 4]);
/// assert_eq!(out, [3.0, 3.0]);
/// ```
pub fn attention_keeping(
    qkv: &[f32],
    s: AttnShape,
    out: &mut [f32],
    heads: &mut [f32],
    probs: Option<&mut [f32]>,
) {
    let (d, n, hd) = (s.width(), s.tokens, s.head_dim);
    assert!(qkv.len() >= s.batch * n * 3 * d && out.len() >= s.batch * n * d);
    let heads = &mut heads[..s.batch * s.heads * n * hd];
    if heads.is_empty() {
        return;
    }
    let scale = 1.0 / (hd as f32).sqrt();
    let nn = n * n;
    // P = softmax(q k^T * scale) into `scores`, then P v into `o`
    let head = |scores: &mut [f32], b: usize, h: usize, o: MatMut<'_>| {
        let [q, k, v] = head_views(qkv, s, b, h);
        matmul(MatMut::rows_of(scores, n, n), q, k.t(), scale, false);
        softmax_rows(scores, n);
        matmul(o, Mat::rows_of(scores, n, n), v, 1.0, false);
    };
    let out = &mut out[..s.batch * n * d];
    if by_sample(s) {
        // one task per sample, each head's result written straight into its columns
        let sample =
            |scores: &mut [f32], b: usize, ob: &mut [f32], kept: Option<&mut [f32]>| match kept {
                Some(kept) => {
                    for (h, p) in kept.chunks_mut(nn).enumerate() {
                        head(p, b, h, MatMut::new(ob, h * hd, n, hd, d, 1));
                    }
                }
                None => {
                    for h in 0..s.heads {
                        head(scores, b, h, MatMut::new(ob, h * hd, n, hd, d, 1));
                    }
                }
            };
        match probs {
            Some(probs) => out
                .par_chunks_mut(n * d)
                .zip(probs[..s.batch * s.heads * nn].par_chunks_mut(s.heads * nn))
                .enumerate()
                .for_each(|(b, (ob, kept))| sample(&mut [], b, ob, Some(kept))),
            None => out.par_chunks_mut(n * d).enumerate().for_each_init(
                || vec![0.0f32; nn],
                |scores, (b, ob)| sample(scores, b, ob, None),
            ),
        }
        return;
    }
    match probs {
        Some(probs) => heads
            .par_chunks_mut(n * hd)
            .zip(probs[..s.batch * s.heads * nn].par_chunks_mut(nn))
            .enumerate()
            .for_each(|(bh, (o, p))| {
                head(p, bh / s.heads, bh % s.heads, MatMut::rows_of(o, n, hd));
            }),
        None => heads.par_chunks_mut(n * hd).enumerate().for_each_init(
            || vec![0.0f32; nn],
            |scores, (bh, o)| {
                head(
                    scores,
                    bh / s.heads,
                    bh % s.heads,
                    MatMut::rows_of(o, n, hd),
                );
            },
        ),
    }
    heads_to_rows(heads, s, 1, out);
}

/// Input-only VJP of [`attention`]: the gradient with respect to the fused `qkv` buffer
/// (overwritten), given the gradient `dout` of the attention output. Probabilities are
/// recomputed; `heads` holds at least [`attention_scratch_len`] values.
///
/// ```
/// use dtl_kernels::{cpu::ops, AttnShape};
/// // one token: only the value vector gets a gradient
/// let s = AttnShape { batch: 1, tokens: 1, heads: 1, head_dim: 2 };
/// let mut dqkv = [9.0f32; 6];
/// let mut heads = vec![0.0; ops::attention_scratch_len(s)];
/// ops::attention_vjp(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[1.0, -1.0], s, &mut dqkv, &mut heads);
/// assert_eq!(dqkv, [0.0, 0.0, 0.0, 0.0, 1.0, -1.0]);
/// ```
pub fn attention_vjp(qkv: &[f32], dout: &[f32], s: AttnShape, dqkv: &mut [f32], heads: &mut [f32]) {
    attention_vjp_kept(qkv, None, dout, s, dqkv, heads);
}

/// [`attention_vjp`] with the probabilities [`attention_keeping`] kept (`probs`, in its
/// layout) instead of recomputed, when they are given: the same gradient, without the
/// `q k^T` products and the softmax.
///
/// ```
/// use dtl_kernels::{cpu::ops, AttnShape};
/// let s = AttnShape { batch: 1, tokens: 2, heads: 1, head_dim: 1 };
/// let qkv = [1.0f32, 0.5, 2.0, -1.0, 0.3, 4.0];
/// let mut heads = vec![0.0; ops::attention_scratch_len(s)];
/// let (mut out, mut probs) = ([0.0f32; 2], [0.0f32; 4]);
/// ops::attention_keeping(&qkv, s, &mut out, &mut heads, Some(&mut probs));
/// let (mut kept, mut again) = ([0.0f32; 6], [0.0f32; 6]);
/// ops::attention_vjp_kept(&qkv, Some(&probs), &[1.0, 2.0], s, &mut kept, &mut heads);
/// ops::attention_vjp(&qkv, &[1.0, 2.0], s, &mut again, &mut heads);
/// assert_eq!(kept, again);
/// ```
pub fn attention_vjp_kept(
    qkv: &[f32],
    probs: Option<&[f32]>,
    dout: &[f32],
    s: AttnShape,
    dqkv: &mut [f32],
    heads: &mut [f32],
) {
    let (d, n, hd) = (s.width(), s.tokens, s.head_dim);
    assert!(qkv.len() >= s.batch * n * 3 * d && dout.len() >= s.batch * n * d);
    assert!(dqkv.len() >= s.batch * n * 3 * d);
    // per sample and head: [dq | dk | dv], each tokens x head_dim
    let heads = &mut heads[..s.batch * s.heads * 3 * n * hd];
    if heads.is_empty() {
        return;
    }
    let nn = n * n;
    let probs = probs.map(|p| &p[..s.batch * s.heads * nn]);
    let kept = |b: usize, h: usize| probs.map(|p| &p[(b * s.heads + h) * nn..][..nn]);
    let scale = 1.0 / (hd as f32).sqrt();
    if by_sample(s) {
        // one task per sample, each head's gradients written straight into its columns
        dqkv[..s.batch * n * 3 * d]
            .par_chunks_mut(n * 3 * d)
            .enumerate()
            .for_each_init(
                || {
                    (
                        vec![0.0f32; if probs.is_some() { 0 } else { nn }],
                        vec![0.0f32; nn],
                    )
                },
                |(p, dp), (b, gb)| {
                    for h in 0..s.heads {
                        let [q, k, v] = head_views(qkv, s, b, h);
                        let d_o = Mat::new(dout, b * n * d + h * hd, n, hd, d, 1);
                        let at = [0, d, 2 * d].map(|c| c + h * hd);
                        let p = HeadProbs {
                            kept: kept(b, h),
                            scratch: p,
                        };
                        attention_head_vjp([q, k, v], d_o, scale, p, dp, gb, at, 3 * d);
                    }
                },
            );
        return;
    }
    heads.par_chunks_mut(3 * n * hd).enumerate().for_each_init(
        || {
            (
                vec![0.0f32; if probs.is_some() { 0 } else { nn }],
                vec![0.0f32; nn],
            )
        },
        |(p, dp), (bh, grads)| {
            let (b, h) = (bh / s.heads, bh % s.heads);
            let [q, k, v] = head_views(qkv, s, b, h);
            let d_o = Mat::new(dout, b * n * d + h * hd, n, hd, d, 1);
            let at = [0, n * hd, 2 * n * hd];
            let p = HeadProbs {
                kept: kept(b, h),
                scratch: p,
            };
            attention_head_vjp([q, k, v], d_o, scale, p, dp, grads, at, hd);
        },
    );
    heads_to_rows(heads, s, 3, dqkv);
}

/// The probabilities of one head in [`attention_head_vjp`]: kept from the forward pass, or
/// recomputed into `scratch` (tokens x tokens).
struct HeadProbs<'a> {
    kept: Option<&'a [f32]>,
    scratch: &'a mut [f32],
}

/// One head of [`attention_vjp`]: dQ, dK and dV go to `grads` at the offsets `at`, tokens x
/// head_dim each with row stride `rs`; `dp` is tokens x tokens scratch.
#[allow(clippy::too_many_arguments)]
fn attention_head_vjp(
    [q, k, v]: [Mat<'_>; 3],
    d_o: Mat<'_>,
    scale: f32,
    p: HeadProbs<'_>,
    dp: &mut [f32],
    grads: &mut [f32],
    at: [usize; 3],
    rs: usize,
) {
    let (n, hd) = (q.rows(), q.cols());
    let p: &[f32] = match p.kept {
        Some(kept) => kept,
        None => {
            // P = softmax(q k^T * scale)
            matmul(MatMut::rows_of(p.scratch, n, n), q, k.t(), scale, false);
            softmax_rows(p.scratch, n);
            p.scratch
        }
    };
    let pm = Mat::rows_of(p, n, n);
    // dV = P^T dO
    matmul(
        MatMut::new(grads, at[2], n, hd, rs, 1),
        pm.t(),
        d_o,
        1.0,
        false,
    );
    // dP = dO V^T
    matmul(MatMut::rows_of(dp, n, n), d_o, v.t(), 1.0, false);
    // dS = P * (dP - rowsum(dP * P)), times the scale
    softmax_backward_rows(p, dp, n, scale);
    let ds = Mat::rows_of(dp, n, n);
    // dQ = dS K ; dK = dS^T Q
    matmul(MatMut::new(grads, at[0], n, hd, rs, 1), ds, k, 1.0, false);
    matmul(
        MatMut::new(grads, at[1], n, hd, rs, 1),
        ds.t(),
        q,
        1.0,
        false,
    );
}

/// `x[b] += scale[b] * y[b]` over `batch` samples of `per_sample` values; a missing scale
/// table means 1 everywhere, and a scale of 0 leaves the sample as it is.
///
/// ```
/// let mut x = [1.0f32, 1.0, 1.0, 1.0];
/// dtl_kernels::cpu::ops::add_scaled(&mut x, &[1.0, 2.0, 3.0, 4.0], 2, 2, Some(&[0.0, 2.0]));
/// assert_eq!(x, [1.0, 1.0, 7.0, 9.0]);
/// ```
pub fn add_scaled(
    x: &mut [f32],
    y: &[f32],
    batch: usize,
    per_sample: usize,
    scale: Option<&[f32]>,
) {
    let len = batch * per_sample;
    assert!(x.len() >= len && y.len() >= len && scale.map_or(true, |s| s.len() >= batch));
    if len == 0 {
        return;
    }
    x[..len]
        .par_chunks_mut(per_sample)
        .zip(y[..len].par_chunks(per_sample))
        .enumerate()
        .for_each(|(i, (xs, ys))| {
            let s = scale.map(|s| s[i]).unwrap_or(1.0);
            if s == 1.0 {
                for (a, b) in xs.iter_mut().zip(ys) {
                    *a += b;
                }
            } else if s != 0.0 {
                for (a, b) in xs.iter_mut().zip(ys) {
                    *a += s * b;
                }
            }
        });
}

/// `out[b] = scale[b] * y[b]` over `batch` samples of `per_sample` values; a missing scale
/// table means a copy.
///
/// ```
/// let mut out = [0.0f32; 4];
/// dtl_kernels::cpu::ops::scaled(&[1.0, 2.0, 3.0, 4.0], 2, 2, Some(&[0.0, 2.0]), &mut out);
/// assert_eq!(out, [0.0, 0.0, 6.0, 8.0]);
/// ```
pub fn scaled(y: &[f32], batch: usize, per_sample: usize, scale: Option<&[f32]>, out: &mut [f32]) {
    let len = batch * per_sample;
    assert!(out.len() >= len && y.len() >= len && scale.map_or(true, |s| s.len() >= batch));
    if len == 0 {
        return;
    }
    out[..len]
        .par_chunks_mut(per_sample)
        .zip(y[..len].par_chunks(per_sample))
        .enumerate()
        .for_each(|(i, (o, ys))| match scale {
            None => o.copy_from_slice(ys),
            Some(s) => {
                let s = s[i];
                for (a, b) in o.iter_mut().zip(ys) {
                    *a = s * b;
                }
            }
        });
}

/// im2col of a patch embedding: `images (batch, channels, size, size)` to
/// `cols (batch * (size / patch)^2, channels * patch * patch)`, one row per patch in
/// row-major grid order, columns in the (channel, row, column) order of a conv weight.
///
/// ```
/// // one 1-channel 2x2 image, patch 1: four patches of one value
/// let mut cols = [0.0f32; 4];
/// dtl_kernels::cpu::ops::patchify(&[1.0, 2.0, 3.0, 4.0], 1, 1, 2, 1, &mut cols);
/// assert_eq!(cols, [1.0, 2.0, 3.0, 4.0]);
/// ```
pub fn patchify(
    images: &[f32],
    batch: usize,
    channels: usize,
    size: usize,
    patch: usize,
    cols: &mut [f32],
) {
    let (c, p, img) = (channels, patch, size);
    let g = img.checked_div(p).unwrap_or(0);
    let k = c * p * p;
    let npatch = g * g;
    assert!(images.len() >= batch * c * img * img && cols.len() >= batch * npatch * k);
    if batch * npatch * k == 0 {
        return;
    }
    cols[..batch * npatch * k]
        .par_chunks_mut(npatch * k)
        .enumerate()
        .for_each(|(b, sample)| {
            for py in 0..g {
                for px in 0..g {
                    let row = &mut sample[(py * g + px) * k..][..k];
                    for ci in 0..c {
                        for y in 0..p {
                            let src = ((b * c + ci) * img + py * p + y) * img + px * p;
                            row[(ci * p + y) * p..][..p].copy_from_slice(&images[src..src + p]);
                        }
                    }
                }
            }
        });
}

/// Token assembly: `out (batch, prefix + patches_per_sample, d)` where token `t < prefix`
/// is `prefix_tokens[t] + pos[t]` and token `prefix + j` is `patches[b, j] + pos[prefix + j]`.
///
/// ```
/// let mut out = [0.0f32; 3];
/// // width 1: a class token 10 and two patches, position embedding 1, 2, 3
/// dtl_kernels::cpu::ops::assemble_tokens(&[5.0, 6.0], &[10.0], &[1.0, 2.0, 3.0], 1, 1, 2, 1, &mut out);
/// assert_eq!(out, [11.0, 7.0, 9.0]);
/// ```
#[allow(clippy::too_many_arguments)]
pub fn assemble_tokens(
    patches: &[f32],
    prefix_tokens: &[f32],
    pos: &[f32],
    batch: usize,
    prefix: usize,
    patches_per_sample: usize,
    d: usize,
    out: &mut [f32],
) {
    let n = prefix + patches_per_sample;
    let per = n * d;
    assert!(patches.len() >= batch * patches_per_sample * d && prefix_tokens.len() >= prefix * d);
    assert!(pos.len() >= per && out.len() >= batch * per);
    if batch * per == 0 {
        return;
    }
    out[..batch * per]
        .par_chunks_mut(per)
        .enumerate()
        .for_each(|(b, xb)| {
            let (head, tail) = xb.split_at_mut(prefix * d);
            for ((o, c), p) in head.iter_mut().zip(prefix_tokens).zip(pos) {
                *o = c + p;
            }
            let pb = &patches[b * patches_per_sample * d..][..patches_per_sample * d];
            for ((o, v), p) in tail.iter_mut().zip(pb).zip(&pos[prefix * d..per]) {
                *o = v + p;
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive_linear(x: &[f32], w: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
        let mut out = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut acc = b[j] as f64;
                for l in 0..k {
                    acc += x[i * k + l] as f64 * w[j * k + l] as f64;
                }
                out[i * n + j] = acc as f32;
            }
        }
        out
    }

    fn ramp(n: usize, a: f32) -> Vec<f32> {
        (0..n).map(|i| (i as f32 * a).sin() * 0.5).collect()
    }

    #[test]
    fn linear_matches_naive() {
        let (m, k, n) = (37, 19, 23);
        let x = ramp(m * k, 0.37);
        let w = ramp(n * k, 0.91);
        let b = ramp(n, 1.3);
        let mut out = vec![0.0; m * n];
        linear(&x, &w, Some(&b), m, k, n, &mut out, false);
        let want = naive_linear(&x, &w, &b, m, k, n);
        for (a, b) in out.iter().zip(&want) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
        // vjp: dx = dy w
        let dy = ramp(m * n, 0.53);
        let mut dx = vec![0.0; m * k];
        linear_vjp(&dy, &w, m, k, n, &mut dx, false);
        for i in 0..m {
            for l in 0..k {
                let want: f32 = (0..n).map(|j| dy[i * n + j] * w[j * k + l]).sum();
                assert!((dx[i * k + l] - want).abs() < 1e-5);
            }
        }
    }

    #[test]
    fn fast_math_accuracy() {
        let mut worst_exp = 0.0f64;
        let mut worst_erf = 0.0f64;
        for i in -40000..=40000 {
            let x = i as f32 * 2.5e-3; // [-100, 100] for exp, [-100, 100] clamps for erf
            let e = exp_fast(x) as f64;
            let want = (x as f64).exp();
            if want > 1e-30 && want < 1e30 {
                worst_exp = worst_exp.max(((e - want) / want).abs());
            }
            let xs = x / 10.0;
            worst_erf = worst_erf.max((erf_fast(xs) as f64 - libm::erf(xs as f64)).abs());
        }
        assert!(worst_exp < 5e-7, "exp relative error {worst_exp:e}");
        assert!(worst_erf < 5e-7, "erf absolute error {worst_erf:e}");
    }

    #[test]
    fn gelu_values() {
        // 0.5 x (1 + erf(x / sqrt 2)) at x = 1 and -2 (erf values from tables)
        assert!((gelu_scalar(1.0) - 0.841_344_7).abs() < 1e-6);
        assert!((gelu_scalar(-2.0) + 0.045_500_26).abs() < 1e-6);
        let h = 1e-3f32;
        for &x in &[-3.0f32, -1.0, -0.2, 0.0, 0.5, 2.0] {
            let fd = (gelu_scalar(x + h) - gelu_scalar(x - h)) / (2.0 * h);
            assert!((fd - gelu_grad_scalar(x)).abs() < 1e-3, "{x}");
        }
    }
}
