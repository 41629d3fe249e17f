//! Tape operations of the built-in side networks, written as custom dfdx operations.
//!
//! Each operation computes its forward pass on plain slices and registers one backward
//! closure that produces exactly the gradients it needs: the low-rank tap differentiates
//! its input only when the input carries a tape, so blocks before the first inject never
//! pay for a gradient nobody reads.

use dfdx::prelude::*;
use dfdx::tensor::Tape;
use dtl_core::{Act, DtlError, Param, Result};

/// Gradient tape on the CPU.
pub type CpuTape = OwnedTape<f32, Cpu>;

/// Checks a low-rank pair against activations of width `d` and returns the rank.
pub(crate) fn low_rank_rank<D: Device<f32>>(a: &Param<D>, b: &Param<D>, d: usize) -> Result<usize> {
    let (r, ad) = match a.shape.as_slice() {
        [r, ad] => (*r, *ad),
        s => {
            return Err(DtlError::shape(format!(
                "parameter `{}` must be (rank, width), got {s:?}",
                a.name
            )))
        }
    };
    if ad != d || b.shape != [d, r] || a.value.shape().0 != r * d || b.value.shape().0 != d * r {
        return Err(DtlError::shape(format!(
            "low-rank map `{}` {:?} / `{}` {:?} does not fit activations of width {d}",
            a.name, a.shape, b.name, b.shape
        )));
    }
    Ok(r)
}

/// Checks a depthwise kernel (d, 1, k, k) against `n` tokens of width `d` laid out as
/// `prefix` tokens plus a `grid`, and returns k.
pub(crate) fn conv_kernel<D: Device<f32>>(
    w: &Param<D>,
    d: usize,
    n: usize,
    prefix: usize,
    grid: (usize, usize),
) -> Result<usize> {
    let k = match w.shape.as_slice() {
        [wd, 1, k1, k2] if *wd == d && k1 == k2 && w.value.shape().0 == d * k1 * k1 => *k1,
        sh => {
            return Err(DtlError::shape(format!(
                "parameter `{}` must be ({d}, 1, k, k), got {sh:?}",
                w.name
            )))
        }
    };
    let (gh, gw) = grid;
    if n != prefix + gh * gw {
        return Err(DtlError::shape(format!(
            "depthwise conv: {n} tokens do not match {prefix} prefix tokens plus a {gh}x{gw} grid"
        )));
    }
    Ok(k)
}

/// Checks a linear layer's weight (c, d) and bias (c) against features of width `d`, and
/// returns c.
pub(crate) fn linear_classes<D: Device<f32>>(
    w: &Param<D>,
    bias: &Param<D>,
    d: usize,
) -> Result<usize> {
    let c = match w.shape.as_slice() {
        [c, wd] if *wd == d && w.value.shape().0 == c * d => *c,
        sh => {
            return Err(DtlError::shape(format!(
                "parameter `{}` must be (classes, {d}), got {sh:?}",
                w.name
            )))
        }
    };
    if bias.shape != [c] || bias.value.shape().0 != c {
        return Err(DtlError::shape(format!(
            "parameter `{}` must be ({c},), got {:?}",
            bias.name, bias.shape
        )));
    }
    Ok(c)
}

fn add_slice(dst: &mut [f32], src: &[f32]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d += *s;
    }
}

/// `y = x A^T B^T` over the last axis of `x` (batch, tokens, width), with `A` (rank, width)
/// and `B` (width, rank).
///
/// Gradients go to `a` and `b` (keyed by their parameter tensors) and, when `x_tape` is
/// `Some`, to `x`; the returned tensor carries `x_tape` (or a new tape) plus this operation.
///
/// ```
/// use dfdx::prelude::*;
/// use dtl_core::Param;
/// use dtl_runner::ops::low_rank;
/// let dev = Cpu::default();
/// let a = Param::from_vec(&dev, "side.0.a", &[1, 2], vec![1.0, 1.0]).unwrap();
/// let b = Param::from_vec(&dev, "side.0.b", &[2, 1], vec![1.0, 2.0]).unwrap();
/// let x = dev.tensor_from_vec(vec![1.0, 2.0], (1, 1, 2));
/// let y = low_rank(&x, None, &a, &b).unwrap();
/// assert_eq!(y.as_vec(), vec![3.0, 6.0]);
/// ```
pub fn low_rank(
    x: &Tensor<(usize, usize, usize), f32, Cpu>,
    x_tape: Option<CpuTape>,
    a: &Param<Cpu>,
    b: &Param<Cpu>,
) -> Result<Act<Cpu>> {
    let (bs, n, d) = *x.shape();
    let r = low_rank_rank(a, b, d)?;
    let rows = bs * n;
    let xv = x.as_vec();
    let av = a.value.as_vec();
    let bv = b.value.as_vec();
    let mut u = vec![0f32; rows * r];
    for (row, urow) in xv.chunks_exact(d).zip(u.chunks_exact_mut(r)) {
        for (j, uj) in urow.iter_mut().enumerate() {
            let arow = &av[j * d..(j + 1) * d];
            *uj = row.iter().zip(arow).map(|(p, q)| p * q).sum();
        }
    }
    let mut y = vec![0f32; rows * d];
    for (yrow, urow) in y.chunks_exact_mut(d).zip(u.chunks_exact(r)) {
        for (k, yk) in yrow.iter_mut().enumerate() {
            let brow = &bv[k * r..(k + 1) * r];
            *yk = urow.iter().zip(brow).map(|(p, q)| p * q).sum();
        }
    }
    let dev = x.device().clone();
    let out = dev.tensor_from_vec(y, (bs, n, d));
    let want_gx = x_tape.is_some();
    let mut tape = x_tape.unwrap_or_default();
    let out_ghost = out.ghost();
    let x_ghost = x.ghost();
    let a_ghost = a.value.ghost();
    let b_ghost = b.value.ghost();
    // Keep the input tensor itself (shared, not copied) for the backward pass.
    drop(xv);
    let x_kept = x.clone();
    tape.add_backward_op(move |grads| {
        grads.try_alloc_for(&out_ghost)?;
        let g = grads.get(&out_ghost).as_vec();
        let xv = x_kept.as_vec();
        // gu = g B  (rows, r); gB = g^T u (d, r); gA = gu^T x (r, d); gx = gu A.
        let mut gu = vec![0f32; rows * r];
        let mut gb = vec![0f32; d * r];
        for ((grow, gurow), urow) in g
            .chunks_exact(d)
            .zip(gu.chunks_exact_mut(r))
            .zip(u.chunks_exact(r))
        {
            for (k, &gk) in grow.iter().enumerate() {
                let brow = &bv[k * r..(k + 1) * r];
                for j in 0..r {
                    gurow[j] += gk * brow[j];
                    gb[k * r + j] += gk * urow[j];
                }
            }
        }
        let mut ga = vec![0f32; r * d];
        for (xrow, gurow) in xv.chunks_exact(d).zip(gu.chunks_exact(r)) {
            for j in 0..r {
                let s = gurow[j];
                for (gak, xk) in ga[j * d..(j + 1) * d].iter_mut().zip(xrow) {
                    *gak += s * xk;
                }
            }
        }
        add_slice(grads.get_or_alloc_mut(&a_ghost)?, &ga);
        add_slice(grads.get_or_alloc_mut(&b_ghost)?, &gb);
        if want_gx {
            let gx = grads.get_or_alloc_mut(&x_ghost)?;
            for (gxrow, gurow) in gx.chunks_exact_mut(d).zip(gu.chunks_exact(r)) {
                for j in 0..r {
                    let s = gurow[j];
                    for (o, ak) in gxrow.iter_mut().zip(&av[j * d..(j + 1) * d]) {
                        *o += s * ak;
                    }
                }
            }
        }
        Ok(())
    });
    Ok(out.put_tape(tape))
}

/// `swish_beta(z) = z * sigmoid(beta * z)`, elementwise.
///
/// ```
/// use dfdx::prelude::*;
/// let dev = Cpu::default();
/// let z = dev.tensor_from_vec(vec![0.0f32, 10.0], (1, 1, 2)).leaky_traced();
/// let y = dtl_runner::ops::swish(z, 1.0);
/// assert!((y.as_vec()[1] - 10.0 / (1.0 + (-10.0f32).exp())).abs() < 1e-5);
/// ```
pub fn swish(z: Act<Cpu>, beta: f32) -> Act<Cpu> {
    let (z, mut tape) = z.split_tape();
    let zv = z.as_vec();
    let sig: Vec<f32> = zv
        .iter()
        .map(|&v| 1.0 / (1.0 + (-beta * v).exp()))
        .collect();
    let y: Vec<f32> = zv.iter().zip(&sig).map(|(v, s)| v * s).collect();
    let out = z.device().tensor_from_vec(y, *z.shape());
    let out_ghost = out.ghost();
    let z_ghost = z.ghost();
    tape.add_backward_op(move |grads| {
        grads.try_alloc_for(&out_ghost)?;
        let g = grads.get(&out_ghost).as_vec();
        let gz = grads.get_or_alloc_mut(&z_ghost)?;
        for (((o, gi), s), v) in gz.iter_mut().zip(&g).zip(&sig).zip(&zv) {
            *o += gi * (s + beta * v * s * (1.0 - s));
        }
        Ok(())
    });
    out.put_tape(tape)
}

/// Padding before and after for a "same" convolution with kernel `k` (PyTorch's rule: the
/// extra pixel of an even kernel goes after).
///
/// ```
/// assert_eq!(dtl_runner::ops::same_padding(3), (1, 1));
/// assert_eq!(dtl_runner::ops::same_padding(4), (1, 2));
/// ```
pub fn same_padding(k: usize) -> (usize, usize) {
    let total = k.saturating_sub(1);
    (total / 2, total - total / 2)
}

/// Depthwise `k x k` convolution, no bias, "same" padding, over the patch grid of tokens
/// (batch, prefix + rows * cols, width); the first `prefix` tokens pass through unchanged.
/// `w` is (width, 1, k, k).
///
/// ```
/// use dfdx::prelude::*;
/// use dtl_core::Param;
/// let dev = Cpu::default();
/// // identity kernel: only the centre tap is 1
/// let mut w = vec![0.0; 9];
/// w[4] = 1.0;
/// let w = Param::from_vec(&dev, "fusion.weight", &[1, 1, 3, 3], w).unwrap();
/// let x = dev.tensor_from_vec(vec![7.0, 1.0, 2.0, 3.0, 4.0], (1, 5, 1)).leaky_traced();
/// let y = dtl_runner::ops::depthwise_conv_tokens(x, &w, 1, (2, 2)).unwrap();
/// assert_eq!(y.as_vec(), vec![7.0, 1.0, 2.0, 3.0, 4.0]);
/// ```
pub fn depthwise_conv_tokens(
    s: Act<Cpu>,
    w: &Param<Cpu>,
    prefix: usize,
    grid: (usize, usize),
) -> Result<Act<Cpu>> {
    let (bs, n, d) = *s.shape();
    let k = conv_kernel(w, d, n, prefix, grid)?;
    let (gh, gw) = grid;
    let (pad, _) = same_padding(k);
    let (s, mut tape) = s.split_tape();
    let sv = s.as_vec();
    let wv = w.value.as_vec();
    // Weights rearranged to (k*k, d) so that the inner loop runs over contiguous channels.
    let mut wt = vec![0f32; k * k * d];
    for c in 0..d {
        for t in 0..k * k {
            wt[t * d + c] = wv[c * k * k + t];
        }
    }
    let mut y = sv.clone();
    let taps = |i: usize, j: usize| {
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
    };
    let plan: Vec<Vec<(usize, usize)>> = (0..gh * gw).map(|p| taps(p / gw, p % gw)).collect();
    for b in 0..bs {
        let base = b * n * d;
        for (p, tp) in plan.iter().enumerate() {
            let o = base + (prefix + p) * d;
            let out = &mut y[o..o + d];
            out.fill(0.0);
            for &(t, q) in tp {
                let src = &sv[base + (prefix + q) * d..base + (prefix + q + 1) * d];
                for ((oc, sc), wc) in out.iter_mut().zip(src).zip(&wt[t * d..(t + 1) * d]) {
                    *oc += sc * wc;
                }
            }
        }
    }
    let out = s.device().tensor_from_vec(y, (bs, n, d));
    let out_ghost = out.ghost();
    let s_ghost = s.ghost();
    let w_ghost = w.value.ghost();
    tape.add_backward_op(move |grads| {
        grads.try_alloc_for(&out_ghost)?;
        let g = grads.get(&out_ghost).as_vec();
        let mut gs = vec![0f32; bs * n * d];
        let mut gwt = vec![0f32; k * k * d];
        for b in 0..bs {
            let base = b * n * d;
            gs[base..base + prefix * d].copy_from_slice(&g[base..base + prefix * d]);
            for (p, tp) in plan.iter().enumerate() {
                let o = base + (prefix + p) * d;
                let go = &g[o..o + d];
                for &(t, q) in tp {
                    let si = base + (prefix + q) * d;
                    let src = &sv[si..si + d];
                    for c in 0..d {
                        gwt[t * d + c] += go[c] * src[c];
                        gs[si + c] += go[c] * wt[t * d + c];
                    }
                }
            }
        }
        add_slice(grads.get_or_alloc_mut(&s_ghost)?, &gs);
        let gw = grads.get_or_alloc_mut(&w_ghost)?;
        for c in 0..d {
            for t in 0..k * k {
                gw[c * k * k + t] += gwt[t * d + c];
            }
        }
        Ok(())
    });
    Ok(out.put_tape(tape))
}

/// `features @ W^T + bias` for a (batch, width) input, `W` (classes, width).
///
/// ```
/// use dfdx::prelude::*;
/// use dtl_core::Param;
/// let dev = Cpu::default();
/// let w = Param::from_vec(&dev, "head.weight", &[1, 2], vec![1.0, -1.0]).unwrap();
/// let b = Param::from_vec(&dev, "head.bias", &[1], vec![0.5]).unwrap();
/// let f = dev.tensor_from_vec(vec![3.0, 1.0], (1, 2)).leaky_traced();
/// assert_eq!(dtl_runner::ops::linear(f, &w, &b).unwrap().as_vec(), vec![2.5]);
/// ```
pub fn linear(
    f: Tensor<(usize, usize), f32, Cpu, CpuTape>,
    w: &Param<Cpu>,
    bias: &Param<Cpu>,
) -> Result<Tensor<(usize, usize), f32, Cpu, CpuTape>> {
    let (bs, d) = *f.shape();
    let c = linear_classes(w, bias, d)?;
    let (f, mut tape) = f.split_tape();
    let fv = f.as_vec();
    let wv = w.value.as_vec();
    let bv = bias.value.as_vec();
    let mut y = vec![0f32; bs * c];
    for (frow, yrow) in fv.chunks_exact(d).zip(y.chunks_exact_mut(c)) {
        for (j, yj) in yrow.iter_mut().enumerate() {
            *yj = bv[j]
                + frow
                    .iter()
                    .zip(&wv[j * d..(j + 1) * d])
                    .map(|(p, q)| p * q)
                    .sum::<f32>();
        }
    }
    let out = f.device().tensor_from_vec(y, (bs, c));
    let out_ghost = out.ghost();
    let f_ghost = f.ghost();
    let w_ghost = w.value.ghost();
    let b_ghost = bias.value.ghost();
    tape.add_backward_op(move |grads| {
        grads.try_alloc_for(&out_ghost)?;
        let g = grads.get(&out_ghost).as_vec();
        let mut gw = vec![0f32; c * d];
        let mut gb = vec![0f32; c];
        let mut gf = vec![0f32; bs * d];
        for ((grow, frow), gfrow) in g
            .chunks_exact(c)
            .zip(fv.chunks_exact(d))
            .zip(gf.chunks_exact_mut(d))
        {
            for (j, &gj) in grow.iter().enumerate() {
                gb[j] += gj;
                let wrow = &wv[j * d..(j + 1) * d];
                for ((gwk, fk), (gfk, wk)) in gw[j * d..(j + 1) * d]
                    .iter_mut()
                    .zip(frow)
                    .zip(gfrow.iter_mut().zip(wrow))
                {
                    *gwk += gj * fk;
                    *gfk += gj * wk;
                }
            }
        }
        add_slice(grads.get_or_alloc_mut(&w_ghost)?, &gw);
        add_slice(grads.get_or_alloc_mut(&b_ghost)?, &gb);
        add_slice(grads.get_or_alloc_mut(&f_ghost)?, &gf);
        Ok(())
    });
    Ok(out.put_tape(tape))
}

/// Pools tokens (batch, tokens, width) into (batch, width): the mean of the tokens from
/// `prefix` on (`mean`), or token 0 (`cls`).
///
/// ```
/// use dfdx::prelude::*;
/// let dev = Cpu::default();
/// let x = dev.tensor_from_vec(vec![9.0, 1.0, 3.0], (1, 3, 1));
/// let (m, _) = dtl_runner::ops::pool(x.clone().leaky_traced(), 1, false).split_tape();
/// assert_eq!(m.as_vec(), vec![2.0]);
/// let (c, _) = dtl_runner::ops::pool(x.leaky_traced(), 1, true).split_tape();
/// assert_eq!(c.as_vec(), vec![9.0]);
/// ```
pub fn pool<T: Tape<f32, Cpu>>(
    x: Tensor<(usize, usize, usize), f32, Cpu, T>,
    prefix: usize,
    cls: bool,
) -> Tensor<(usize, usize), f32, Cpu, T> {
    let (bs, n, d) = *x.shape();
    let (x, mut tape) = x.split_tape();
    let xv = x.as_vec();
    let (lo, hi) = if cls { (0, 1) } else { (prefix, n) };
    let scale = 1.0 / (hi - lo) as f32;
    let mut y = vec![0f32; bs * d];
    for b in 0..bs {
        let yrow = &mut y[b * d..(b + 1) * d];
        for t in lo..hi {
            let row = &xv[(b * n + t) * d..(b * n + t + 1) * d];
            for (o, v) in yrow.iter_mut().zip(row) {
                *o += v;
            }
        }
        for o in yrow.iter_mut() {
            *o *= scale;
        }
    }
    let out = x.device().tensor_from_vec(y, (bs, d));
    if T::OWNS_TAPE {
        let out_ghost = out.ghost();
        let x_ghost = x.ghost();
        tape.add_backward_op(move |grads| {
            grads.try_alloc_for(&out_ghost)?;
            let g = grads.get(&out_ghost).as_vec();
            let gx = grads.get_or_alloc_mut(&x_ghost)?;
            for b in 0..bs {
                for t in lo..hi {
                    let o = (b * n + t) * d;
                    for (gxk, gk) in gx[o..o + d].iter_mut().zip(&g[b * d..(b + 1) * d]) {
                        *gxk += gk * scale;
                    }
                }
            }
            Ok(())
        });
    }
    out.put_tape(tape)
}

/// Soft-target cross entropy averaged over the batch: `-sum(targets * log_softmax(logits)) / B`.
///
/// `targets` is (batch, classes) row-major; computed in f64.
///
/// ```
/// use dfdx::prelude::*;
/// let dev = Cpu::default();
/// let logits = dev.tensor_from_vec(vec![0.0f32, 0.0], (1, 2)).leaky_traced();
/// let loss = dtl_runner::ops::soft_cross_entropy(logits, &[1.0, 0.0]).unwrap();
/// assert!((loss.array() - std::f32::consts::LN_2).abs() < 1e-6);
/// ```
pub fn soft_cross_entropy(
    logits: Tensor<(usize, usize), f32, Cpu, CpuTape>,
    targets: &[f32],
) -> Result<Tensor<Rank0, f32, Cpu, CpuTape>> {
    let (bs, c) = *logits.shape();
    if targets.len() != bs * c {
        return Err(DtlError::shape(format!(
            "targets hold {} values, logits are {bs}x{c}",
            targets.len()
        )));
    }
    let (l, mut tape) = logits.split_tape();
    let lv = l.as_vec();
    let mut loss = 0f64;
    let mut grad = vec![0f32; bs * c];
    for ((row, t), g) in lv
        .chunks_exact(c)
        .zip(targets.chunks_exact(c))
        .zip(grad.chunks_exact_mut(c))
    {
        let m = row.iter().fold(f64::NEG_INFINITY, |a, &v| a.max(v as f64));
        let lse = m + row.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln();
        let tsum: f64 = t.iter().map(|&v| v as f64).sum();
        for j in 0..c {
            let logp = row[j] as f64 - lse;
            loss -= t[j] as f64 * logp;
            g[j] = ((logp.exp() * tsum - t[j] as f64) / bs as f64) as f32;
        }
    }
    let dev = l.device().clone();
    let mut out: Tensor<Rank0, f32, Cpu> = dev
        .try_zeros()
        .map_err(|e| DtlError::Device(format!("{e:?}")))?;
    out.copy_from(&[(loss / bs as f64) as f32]);
    let out_ghost = out.ghost();
    let l_ghost = l.ghost();
    tape.add_backward_op(move |grads| {
        grads.try_alloc_for(&out_ghost)?;
        let go = grads.get(&out_ghost).as_vec()[0];
        let gl = grads.get_or_alloc_mut(&l_ghost)?;
        for (o, g) in gl.iter_mut().zip(&grad) {
            *o += go * g;
        }
        Ok(())
    });
    Ok(out.put_tape(tape))
}

#[cfg(test)]
#[allow(clippy::type_complexity, clippy::too_many_arguments)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
        let mut r = rand::rngs::StdRng::seed_from_u64(seed);
        (0..n).map(|_| r.gen_range(-1.0f32..1.0)).collect()
    }

    /// Naive depthwise conv with explicit (before, after) padding over a (B, prefix + H*W, D) layout.
    fn naive_conv(
        x: &[f32],
        w: &[f32],
        b: usize,
        prefix: usize,
        h: usize,
        wd: usize,
        d: usize,
        k: usize,
        pad: usize,
    ) -> Vec<f32> {
        let n = prefix + h * wd;
        let mut y = x.to_vec();
        for s in 0..b {
            for i in 0..h {
                for j in 0..wd {
                    for c in 0..d {
                        let mut acc = 0.0;
                        for di in 0..k {
                            for dj in 0..k {
                                let (si, sj) = (
                                    i as isize + di as isize - pad as isize,
                                    j as isize + dj as isize - pad as isize,
                                );
                                if si < 0 || sj < 0 || si >= h as isize || sj >= wd as isize {
                                    continue;
                                }
                                let t = prefix + si as usize * wd + sj as usize;
                                acc += x[(s * n + t) * d + c] * w[(c * k + di) * k + dj];
                            }
                        }
                        y[(s * n + prefix + i * wd + j) * d + c] = acc;
                    }
                }
            }
        }
        y
    }

    #[test]
    fn even_kernel_pads_one_before_two_after() {
        let dev = Cpu::default();
        let (b, prefix, h, wd, d, k) = (2, 1, 3, 4, 5, 4);
        let n = prefix + h * wd;
        let x = rand_vec(b * n * d, 1);
        let w = rand_vec(d * k * k, 2);
        let wp = Param::from_vec(&dev, "fusion.weight", &[d, 1, k, k], w.clone()).unwrap();
        let xt = dev.tensor_from_vec(x.clone(), (b, n, d)).leaky_traced();
        let y = depthwise_conv_tokens(xt, &wp, prefix, (h, wd))
            .unwrap()
            .as_vec();
        let want = naive_conv(&x, &w, b, prefix, h, wd, d, k, 1);
        for (a, c) in y.iter().zip(&want) {
            assert!((a - c).abs() < 1e-5);
        }
        assert_eq!(same_padding(5), (2, 2));
    }

    /// Sum of `y * probe`, for finite differences.
    fn objective(
        f: &dyn Fn(&[f32], &[f32]) -> Vec<f32>,
        x: &[f32],
        w: &[f32],
        probe: &[f32],
    ) -> f64 {
        f(x, w)
            .iter()
            .zip(probe)
            .map(|(a, b)| (*a as f64) * (*b as f64))
            .sum()
    }

    fn check_grads(
        f: &dyn Fn(&[f32], &[f32]) -> Vec<f32>,
        taped: &dyn Fn(Tensor<(usize, usize, usize), f32, Cpu, CpuTape>, &Param<Cpu>) -> Act<Cpu>,
        shape: (usize, usize, usize),
        wshape: &[usize],
    ) {
        let dev = Cpu::default();
        let n = shape.0 * shape.1 * shape.2;
        let x = rand_vec(n, 3);
        let w = rand_vec(wshape.iter().product(), 4);
        let probe = rand_vec(n, 5);
        let wp = Param::from_vec(&dev, "w", wshape, w.clone()).unwrap();
        let xt = dev.tensor_from_vec(x.clone(), shape);
        let y = taped(xt.leaky_trace(), &wp);
        let p = dev.tensor_from_vec(probe.clone(), shape);
        let loss = (y * p).sum::<Rank0, _>();
        let mut grads = loss.backward();
        let gx = grads.get_or_alloc_mut(&xt).unwrap().to_vec();
        let gw = grads.get_or_alloc_mut(&wp.value).unwrap().to_vec();
        let eps = 1e-2f32;
        for i in (0..n).step_by(7) {
            let (mut a, mut b) = (x.clone(), x.clone());
            a[i] += eps;
            b[i] -= eps;
            let fd =
                (objective(f, &a, &w, &probe) - objective(f, &b, &w, &probe)) / (2.0 * eps as f64);
            assert!(
                (fd - gx[i] as f64).abs() < 2e-3 * (1.0 + fd.abs()),
                "dx[{i}]: {fd} vs {}",
                gx[i]
            );
        }
        for i in 0..w.len() {
            let (mut a, mut b) = (w.clone(), w.clone());
            a[i] += eps;
            b[i] -= eps;
            let fd =
                (objective(f, &x, &a, &probe) - objective(f, &x, &b, &probe)) / (2.0 * eps as f64);
            assert!(
                (fd - gw[i] as f64).abs() < 2e-3 * (1.0 + fd.abs()),
                "dw[{i}]: {fd} vs {}",
                gw[i]
            );
        }
    }

    #[test]
    fn conv_gradients_match_finite_differences() {
        let (b, prefix, h, wd, d, k) = (2, 1, 3, 3, 2, 4);
        let n = prefix + h * wd;
        check_grads(
            &|x, w| naive_conv(x, w, b, prefix, h, wd, d, k, 1),
            &|x, w| depthwise_conv_tokens(x, w, prefix, (h, wd)).unwrap(),
            (b, n, d),
            &[d, 1, k, k],
        );
    }

    #[test]
    fn swish_gradient_matches_finite_differences() {
        let beta = 3.0f32;
        check_grads(
            &|x, w| {
                x.iter()
                    .map(|&v| v * w[0] / (1.0 + (-beta * v).exp()))
                    .collect()
            },
            &|x, w| {
                let s = swish(x, beta);
                let shape = *s.shape();
                let wt = w
                    .value
                    .retaped::<CpuTape>()
                    .reshape_like(&())
                    .broadcast_like(&shape);
                s * wt
            },
            (2, 3, 4),
            &[1],
        );
    }

    #[test]
    fn low_rank_gradients_match_finite_differences() {
        let dev = Cpu::default();
        let b = Param::from_vec(&dev, "b", &[4, 2], rand_vec(8, 9)).unwrap();
        let bv = b.value.as_vec();
        check_grads(
            &|x, a| {
                let mut y = vec![0f32; x.len()];
                for (row, yrow) in x.chunks(4).zip(y.chunks_mut(4)) {
                    let u: Vec<f32> = (0..2)
                        .map(|j| (0..4).map(|k| row[k] * a[j * 4 + k]).sum())
                        .collect();
                    for k in 0..4 {
                        yrow[k] = (0..2).map(|j| u[j] * bv[k * 2 + j]).sum();
                    }
                }
                y
            },
            &|x, a| {
                let (x, tape) = x.split_tape();
                low_rank(&x, Some(tape), a, &b).unwrap()
            },
            (2, 3, 4),
            &[2, 4],
        );
    }
}
