//! The CPU loops of the side network, the pooling, the loss and the optimizer, on plain `f32`
//! slices.
//!
//! They follow the conventions of the dfdx-based side operations of the CPU runner, including
//! the order of every floating-point sum: the depthwise convolution summing its taps in kernel
//! order, the mean pooling summing tokens in order and scaling once, the soft cross entropy in
//! f64, and AdamW's update term by term as PyTorch writes it. Swish and its VJP use the
//! vectorising [`exp_fast`](super::ops::exp_fast) (relative error below 2e-7) rather than the
//! standard library's `exp`, and the elementwise and convolution loops are compiled for
//! AVX2 + FMA where the CPU has them. Like [`super::ops`], every function
//! works on the sizes it is given and panics on slices that are too short; the checked entry
//! points are the [`Kernels`](crate::Kernels) methods of [`CpuKernels`](super::CpuKernels).
//!
//! ```
//! use dtl_kernels::cpu::side;
//! let mut y = [0.0f32; 2];
//! side::swish(&[0.0, 1.0], 1.0, &mut y);
//! assert!((y[1] - 1.0 / (1.0 + (-1.0f32).exp())).abs() < 1e-7);
//! ```

use rayon::prelude::*;

use super::ops::{exp_fast, simd_loop};
use crate::{AdamwStep, ConvShape};

/// Values per rayon task in the elementwise loops.
const CHUNK: usize = 1 << 14;

/// `(s, s (1 - s))` for `s = sigmoid(a)`, in branch-free arithmetic (the loops using it
/// vectorise). With `e = exp(-|a|)` (never below `exp(-87)`, so never subnormal) and
/// `r = 1 / (1 + e)`: `s = r` for `a >= 0` and `e r` otherwise, and `s (1 - s) = e r^2` either
/// way, so no step subtracts nearly equal numbers or forms a subnormal intermediate.
#[inline(always)]
fn sigmoid_parts(a: f32) -> (f32, f32) {
    let e = exp_fast(-a.abs());
    let r = 1.0 / (1.0 + e);
    let er = e * r;
    (if a >= 0.0 { r } else { er }, er * r)
}

simd_loop! {
    fn swish_chunk(z: &[f32], beta: f32, y: &mut [f32]) {
        for (o, &v) in y.iter_mut().zip(z) {
            *o = v * sigmoid_parts(beta * v).0;
        }
    }
}

simd_loop! {
    fn swish_vjp_chunk(z: &[f32], dy: &[f32], beta: f32, dz: &mut [f32], accumulate: bool) {
        // swish'(z) = s + beta z s (1 - s)
        if accumulate {
            for ((o, &v), &g) in dz.iter_mut().zip(z).zip(dy) {
                let a = beta * v;
                let (s, ds) = sigmoid_parts(a);
                *o += g * (s + a * ds);
            }
        } else {
            for ((o, &v), &g) in dz.iter_mut().zip(z).zip(dy) {
                let a = beta * v;
                let (s, ds) = sigmoid_parts(a);
                *o = g * (s + a * ds);
            }
        }
    }
}

/// `y = z * sigmoid(beta * z)` elementwise, over the shorter of `z` and `y`.
///
/// ```
/// let mut y = [1.0f32; 1];
/// dtl_kernels::cpu::side::swish(&[0.0], 100.0, &mut y);
/// assert_eq!(y, [0.0]);
/// ```
pub fn swish(z: &[f32], beta: f32, y: &mut [f32]) {
    y.par_chunks_mut(CHUNK)
        .zip(z.par_chunks(CHUNK))
        .for_each(|(y, z)| swish_chunk(z, beta, y));
}

/// `dz [+]= dy * swish'(z)` elementwise, with
/// `swish'(z) = s + beta z s (1 - s)`, `s = sigmoid(beta z)`; over the shortest slice.
///
/// ```
/// let mut dz = [0.0f32; 1];
/// // swish'(0) = 1/2
/// dtl_kernels::cpu::side::swish_vjp(&[0.0], &[2.0], 3.0, &mut dz, false);
/// assert_eq!(dz, [1.0]);
/// ```
pub fn swish_vjp(z: &[f32], dy: &[f32], beta: f32, dz: &mut [f32], accumulate: bool) {
    dz.par_chunks_mut(CHUNK)
        .zip(z.par_chunks(CHUNK).zip(dy.par_chunks(CHUNK)))
        .for_each(|(dz, (z, dy))| swish_vjp_chunk(z, dy, beta, dz, accumulate));
}

/// Padding before and after for a "same" convolution with kernel `k` (PyTorch's rule: the
/// extra pixel of an even kernel goes after).
///
/// ```
/// assert_eq!(dtl_kernels::cpu::side::same_padding(3), (1, 1));
/// assert_eq!(dtl_kernels::cpu::side::same_padding(4), (1, 2));
/// ```
pub fn same_padding(k: usize) -> (usize, usize) {
    let total = k.saturating_sub(1);
    (total / 2, total - total / 2)
}

/// For each patch of the grid, the kernel taps `(tap, source patch)` that fall inside the
/// grid, in kernel order.
fn conv_plan(s: &ConvShape) -> Vec<Vec<(usize, usize)>> {
    let (gh, gw) = s.grid;
    let k = s.kernel;
    let (pad, _) = same_padding(k);
    (0..gh * gw)
        .map(|p| {
            let (i, j) = (p / gw, p % gw);
            let mut v = Vec::with_capacity(k * k);
            for di in 0..k {
                for dj in 0..k {
                    let (si, sj) = (
                        (i + di) as isize - pad as isize,
                        (j + dj) as isize - pad as isize,
                    );
                    if si >= 0 && sj >= 0 && (si as usize) < gh && (sj as usize) < gw {
                        v.push((di * k + dj, si as usize * gw + sj as usize));
                    }
                }
            }
            v
        })
        .collect()
}

/// The weight `(d, 1, k, k)` rearranged to `(k * k, d)`, so that the inner loops run over
/// contiguous channels.
fn taps_by_channel(w: &[f32], d: usize, kk: usize) -> Vec<f32> {
    let mut wt = vec![0f32; kk * d];
    for c in 0..d {
        for t in 0..kk {
            wt[t * d + c] = w[c * kk + t];
        }
    }
    wt
}

/// Taps of each patch, `(tap, source patch)`: see [`conv_plan`].
type Plan = [Vec<(usize, usize)>];

simd_loop! {
    avx2;
    /// One sample of [`depthwise_conv`]: `yb` from `xb` (tokens x d), taps summed in order.
    fn conv_sample(xb: &[f32], wt: &[f32], plan: &Plan, prefix: usize, d: usize, yb: &mut [f32]) {
        yb[..prefix * d].copy_from_slice(&xb[..prefix * d]);
        for (p, taps) in plan.iter().enumerate() {
            let out = &mut yb[(prefix + p) * d..][..d];
            out.fill(0.0);
            for &(t, q) in taps {
                let src = &xb[(prefix + q) * d..][..d];
                let w = &wt[t * d..][..d];
                for c in 0..d {
                    out[c] += src[c] * w[c];
                }
            }
        }
    }
}

simd_loop! {
    avx2;
    /// One sample of the input gradient of [`depthwise_conv`]: `gs` from `g`.
    fn conv_dx_sample(g: &[f32], wt: &[f32], plan: &Plan, prefix: usize, d: usize, gs: &mut [f32]) {
        gs[..prefix * d].copy_from_slice(&g[..prefix * d]);
        gs[prefix * d..].fill(0.0);
        for (p, taps) in plan.iter().enumerate() {
            let go = &g[(prefix + p) * d..][..d];
            for &(t, q) in taps {
                let dst = &mut gs[(prefix + q) * d..][..d];
                let w = &wt[t * d..][..d];
                for c in 0..d {
                    dst[c] += go[c] * w[c];
                }
            }
        }
    }
}

simd_loop! {
    avx2;
    /// The weight gradient of channels `c0..c0 + cw` into `acc` (`kk x cw`, zeroed), summed
    /// over the samples, patches and taps in that order.
    #[allow(clippy::too_many_arguments)]
    fn conv_dw_block(
        x: &[f32],
        dy: &[f32],
        plan: &Plan,
        s: ConvShape,
        c0: usize,
        cw: usize,
        acc: &mut [f32],
    ) {
        let (d, prefix) = (s.width, s.prefix);
        let per = s.tokens() * d;
        for b in 0..s.batch {
            let base = b * per;
            for (p, taps) in plan.iter().enumerate() {
                let go = &dy[base + (prefix + p) * d + c0..][..cw];
                for &(t, q) in taps {
                    let src = &x[base + (prefix + q) * d + c0..][..cw];
                    let a = &mut acc[t * cw..][..cw];
                    for c in 0..cw {
                        a[c] += go[c] * src[c];
                    }
                }
            }
        }
    }
}

/// Depthwise "same" convolution of the patch tokens of `x`, the prefix tokens copied (see
/// [`ConvShape`]); `w` is `(width, 1, k, k)`.
///
/// ```
/// use dtl_kernels::ConvShape;
/// // identity kernel: only the centre tap is 1
/// let mut w = [0.0f32; 9];
/// w[4] = 1.0;
/// let s = ConvShape { batch: 1, prefix: 1, grid: (2, 2), width: 1, kernel: 3 };
/// let mut y = [0.0f32; 5];
/// dtl_kernels::cpu::side::depthwise_conv(&[7.0, 1.0, 2.0, 3.0, 4.0], &w, s, &mut y);
/// assert_eq!(y, [7.0, 1.0, 2.0, 3.0, 4.0]);
/// ```
pub fn depthwise_conv(x: &[f32], w: &[f32], s: ConvShape, y: &mut [f32]) {
    let (n, d, kk) = (s.tokens(), s.width, s.kernel * s.kernel);
    let per = n * d;
    assert!(x.len() >= s.batch * per && y.len() >= s.batch * per && w.len() >= d * kk);
    if s.batch * per == 0 {
        return;
    }
    let plan = conv_plan(&s);
    let wt = taps_by_channel(w, d, kk);
    let prefix = s.prefix;
    y[..s.batch * per]
        .par_chunks_mut(per)
        .zip(x[..s.batch * per].par_chunks(per))
        .for_each(|(yb, xb)| conv_sample(xb, &wt, &plan, prefix, d, yb));
}

/// Both gradients of [`depthwise_conv`]: `dx` (overwritten; the prefix tokens' gradient
/// passes through) and `dw [+]= ...`.
///
/// `dx` is computed one sample per task, `dw` a block of channels per task, each summing
/// over the samples, patches and taps in order (so the result does not depend on the
/// threads).
///
/// ```
/// use dtl_kernels::ConvShape;
/// // a 1x1 kernel of 2 on one channel: dx = 2 dy on the patches, dw = sum(x dy) there
/// let s = ConvShape { batch: 1, prefix: 1, grid: (1, 2), width: 1, kernel: 1 };
/// let (mut dx, mut dw) = ([0.0f32; 3], [0.0f32; 1]);
/// dtl_kernels::cpu::side::depthwise_conv_vjp(
///     &[5.0, 1.0, 2.0], &[2.0], &[1.0, 1.0, 3.0], s, &mut dx, &mut dw, false);
/// assert_eq!(dx, [1.0, 2.0, 6.0]);
/// assert_eq!(dw, [7.0]);
/// ```
#[allow(clippy::too_many_arguments)]
pub fn depthwise_conv_vjp(
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    s: ConvShape,
    dx: &mut [f32],
    dw: &mut [f32],
    accumulate_dw: bool,
) {
    let (n, d, kk) = (s.tokens(), s.width, s.kernel * s.kernel);
    let per = n * d;
    let len = s.batch * per;
    assert!(x.len() >= len && dy.len() >= len && dx.len() >= len);
    assert!(w.len() >= d * kk && dw.len() >= d * kk);
    if d * kk == 0 {
        dx[..len].copy_from_slice(&dy[..len]);
        return;
    }
    let plan = conv_plan(&s);
    let wt = taps_by_channel(w, d, kk);
    let prefix = s.prefix;
    if len > 0 {
        dx[..len]
            .par_chunks_mut(per)
            .zip(dy[..len].par_chunks(per))
            .for_each(|(gs, g)| conv_dx_sample(g, &wt, &plan, prefix, d, gs));
    }
    // the weight gradient: a block of channels per task, each channel summed in the order
    // samples, patches, taps
    let threads = rayon::current_num_threads().max(1);
    let per_task = d.div_ceil(threads).max(1);
    dw[..d * kk]
        .par_chunks_mut(per_task * kk)
        .enumerate()
        .for_each(|(ti, dwc)| {
            let (c0, cw) = (ti * per_task, dwc.len() / kk);
            let mut acc = vec![0f32; kk * cw];
            conv_dw_block(x, dy, &plan, s, c0, cw, &mut acc);
            for c in 0..cw {
                for t in 0..kk {
                    let v = acc[t * cw + c];
                    if accumulate_dw {
                        dwc[c * kk + t] += v;
                    } else {
                        dwc[c * kk + t] = v;
                    }
                }
            }
        });
}

/// `out (batch, d)`: the mean of tokens `from..to` of `x (batch, tokens, d)`, summed in token
/// order and scaled once by `1 / (to - from)`.
///
/// ```
/// let mut m = [0.0f32; 1];
/// dtl_kernels::cpu::side::mean_tokens(&[9.0, 1.0, 3.0], 1, 3, 1, 1, 3, &mut m);
/// assert_eq!(m, [2.0]);
/// ```
pub fn mean_tokens(
    x: &[f32],
    batch: usize,
    tokens: usize,
    d: usize,
    from: usize,
    to: usize,
    out: &mut [f32],
) {
    assert!(from < to && to <= tokens);
    assert!(x.len() >= batch * tokens * d && out.len() >= batch * d);
    if batch * d == 0 {
        return;
    }
    let scale = 1.0 / (to - from) as f32;
    out[..batch * d]
        .par_chunks_mut(d)
        .enumerate()
        .for_each(|(b, o)| {
            o.fill(0.0);
            for t in from..to {
                let row = &x[(b * tokens + t) * d..][..d];
                for (a, v) in o.iter_mut().zip(row) {
                    *a += v;
                }
            }
            for a in o.iter_mut() {
                *a *= scale;
            }
        });
}

/// The VJP of [`mean_tokens`]: `dx (batch, tokens, d)` (overwritten) holds
/// `g / (to - from)` at tokens `from..to` and zero elsewhere.
///
/// ```
/// let mut dx = [9.0f32; 3];
/// dtl_kernels::cpu::side::mean_tokens_vjp(&[4.0], 1, 3, 1, 1, 3, &mut dx);
/// assert_eq!(dx, [0.0, 2.0, 2.0]);
/// ```
pub fn mean_tokens_vjp(
    g: &[f32],
    batch: usize,
    tokens: usize,
    d: usize,
    from: usize,
    to: usize,
    dx: &mut [f32],
) {
    assert!(from < to && to <= tokens);
    assert!(g.len() >= batch * d && dx.len() >= batch * tokens * d);
    if batch * tokens * d == 0 {
        return;
    }
    let scale = 1.0 / (to - from) as f32;
    dx[..batch * tokens * d]
        .par_chunks_mut(tokens * d)
        .enumerate()
        .for_each(|(b, xb)| {
            let gb = &g[b * d..][..d];
            for (t, row) in xb.chunks_mut(d).enumerate() {
                if (from..to).contains(&t) {
                    for (o, v) in row.iter_mut().zip(gb) {
                        *o = v * scale;
                    }
                } else {
                    row.fill(0.0);
                }
            }
        });
}

/// Soft-target cross entropy of `logits (batch x classes)` against `targets` (same shape),
/// in f64: returns `-sum(t * log_softmax(l)) / batch` and writes
/// `grad = (softmax(l) * sum(t) - t) / batch`.
///
/// ```
/// let mut g = [0.0f32; 2];
/// let loss = dtl_kernels::cpu::side::soft_cross_entropy(&[0.0, 0.0], &[1.0, 0.0], 1, 2, &mut g);
/// assert!((loss - std::f64::consts::LN_2).abs() < 1e-12);
/// assert_eq!(g, [-0.5, 0.5]);
/// ```
pub fn soft_cross_entropy(
    logits: &[f32],
    targets: &[f32],
    batch: usize,
    classes: usize,
    grad: &mut [f32],
) -> f64 {
    let len = batch * classes;
    assert!(logits.len() >= len && targets.len() >= len && grad.len() >= len);
    if len == 0 {
        return 0.0;
    }
    let mut loss = 0f64;
    for ((row, t), g) in logits[..len]
        .chunks_exact(classes)
        .zip(targets[..len].chunks_exact(classes))
        .zip(grad[..len].chunks_exact_mut(classes))
    {
        let m = row.iter().fold(f64::NEG_INFINITY, |a, &v| a.max(v as f64));
        let lse = m + row.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln();
        let tsum: f64 = t.iter().map(|&v| v as f64).sum();
        for j in 0..classes {
            let logp = row[j] as f64 - lse;
            loss -= t[j] as f64 * logp;
            g[j] = ((logp.exp() * tsum - t[j] as f64) / batch as f64) as f32;
        }
    }
    loss / batch as f64
}

/// Evaluation counts of one batch: `[top-1 hits, top-5 hits, sum of the cross entropy
/// against the hard labels, rows whose logits are not all finite]`.
///
/// A row is a top-k hit when fewer than k logits are strictly greater than its label's;
/// `labels` holds class indices as `f32`, and one that is not an integer in `0..classes` is
/// neither hit and has an infinite loss.
///
/// ```
/// let s = dtl_kernels::cpu::side::eval_stats(&[1.0, 3.0, 2.0, 0.0], &[1.0, 1.0], 2, 2);
/// assert_eq!((s[0], s[1], s[3]), (1.0, 2.0, 0.0));
/// ```
pub fn eval_stats(logits: &[f32], labels: &[f32], batch: usize, classes: usize) -> [f64; 4] {
    assert!(logits.len() >= batch * classes && labels.len() >= batch);
    let mut s = [0f64; 4];
    if classes == 0 {
        s[2] = if batch > 0 { f64::INFINITY } else { 0.0 };
        return s;
    }
    for (row, &lf) in logits[..batch * classes].chunks_exact(classes).zip(labels) {
        if row.iter().any(|v| !v.is_finite()) {
            s[3] += 1.0;
        }
        let valid = lf >= 0.0 && lf < classes as f32 && lf.fract() == 0.0;
        if !valid {
            s[2] += f64::INFINITY;
            continue;
        }
        let l = lf as usize;
        let above = row.iter().filter(|&&v| v > row[l]).count();
        s[0] += (above == 0) as u8 as f64;
        s[1] += (above < 5) as u8 as f64;
        let m = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
        let lse = m + row.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln();
        s[2] += lse - row[l] as f64;
    }
    s
}

/// `sum(x^2)` accumulated in f64, in a fixed order (chunks of the slice summed in order).
///
/// ```
/// assert_eq!(dtl_kernels::cpu::side::sum_squares(&[3.0, 4.0]), 25.0);
/// ```
pub fn sum_squares(x: &[f32]) -> f64 {
    let parts: Vec<f64> = x
        .par_chunks(CHUNK)
        .map(|c| c.iter().map(|&v| v as f64 * v as f64).sum::<f64>())
        .collect();
    parts.iter().sum()
}

/// PyTorch's `clip_grad_norm_` factor for a squared gradient norm `sq`:
/// `max_norm / (sqrt(sq) + 1e-6)` when that is below 1, else `None` (no clipping).
///
/// ```
/// assert_eq!(dtl_kernels::cpu::side::clip_factor(0.25, 1.0), None);
/// let c = dtl_kernels::cpu::side::clip_factor(25.0, 1.0).unwrap();
/// assert!((c - 0.2).abs() < 1e-6);
/// ```
pub fn clip_factor(sq: f32, max_norm: f32) -> Option<f32> {
    let coef = max_norm as f64 / ((sq as f64).sqrt() + 1e-6);
    (coef < 1.0).then_some(coef as f32)
}

/// One AdamW update (see [`AdamwStep`]) of `param` with gradient `grad` and moments `m`, `v`,
/// over the shortest slice; with `clip`, the gradient is first multiplied by it (see
/// [`clip_factor`]). Term by term as the CPU runner's optimizer computes it, in f32:
/// `m = m b1 + g (1 - b1)`, `v = v b2 + g^2 (1 - b2)`, `denom = sqrt(v) / bc2_sqrt + eps`,
/// `p = p (1 - lr wd)` when `wd != 0`, `p = p - (m step_size) / denom`.
///
/// ```
/// let step = dtl_kernels::AdamwStep::new(0.1, 0.9, 0.999, 1e-8, 0.0, 1);
/// let (mut p, mut m, mut v) = ([1.0f32], [0.0f32], [0.0f32]);
/// dtl_kernels::cpu::side::adamw(&mut p, &[0.5], &mut m, &mut v, &step, None);
/// assert!((p[0] - 0.9).abs() < 1e-6);
/// ```
pub fn adamw(
    param: &mut [f32],
    grad: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    step: &AdamwStep,
    clip: Option<f32>,
) {
    let (b1, b2) = (step.beta1, step.beta2);
    let (one_b1, one_b2) = (1.0 - b1, 1.0 - b2);
    let decay = (step.weight_decay != 0.0)
        .then_some((1.0 - step.lr as f64 * step.weight_decay as f64) as f32);
    let (step_size, bc2_sqrt, eps) = (step.step_size, step.bc2_sqrt, step.eps);
    param
        .par_chunks_mut(CHUNK)
        .zip(grad.par_chunks(CHUNK))
        .zip(m.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK)))
        .for_each(|((p, g), (m, v))| {
            for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
                let g = match clip {
                    Some(c) => g * c,
                    None => g,
                };
                *m = *m * b1 + g * one_b1;
                *v = *v * b2 + g * g * one_b2;
                let denom = v.sqrt() / bc2_sqrt + eps;
                if let Some(decay) = decay {
                    *p *= decay;
                }
                *p -= *m * step_size / denom;
            }
        });
}
