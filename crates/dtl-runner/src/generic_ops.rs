//! Tape operations of the built-in side networks and head, for any dfdx device.
//!
//! The same six operations as [`crate::ops`] and [`crate::model::soft_cross_entropy`], with
//! the same semantics, shape checks and gradients, built only from tensor operations that
//! every dfdx [`Device`] provides (matmul, slice, concat, broadcast, reductions, elementwise
//! arithmetic). They therefore run unchanged on the CPU and on a GPU.
//!
//! Every operation is a custom operation on the tape: its forward pass runs tape-less tensor
//! operations, and one backward closure computes exactly the gradients it needs (again with
//! tape-less operations) and adds them into the gradient buffers with
//! [`AccumulateGrad::add_into`]. What a closure keeps alive is no more than its CPU
//! counterpart keeps: the low-rank tap keeps its input and the small `u = x A^T`, the
//! convolution keeps only its input, swish keeps only its input (the sigmoid is recomputed),
//! pooling keeps only shapes and a per-token weight on the host.

use dfdx::prelude::*;
use dfdx::tensor::Tape;
use dtl_core::{AccumulateGrad, Act, DtlError, Matrix, Param, Result};

use crate::device::dev_err;
use crate::ops::{conv_kernel, linear_classes, low_rank_rank, same_padding};

/// (batch, rows, cols, width): the token grid as an image with channels last.
type Grid<D> = Tensor<(usize, usize, usize, usize), f32, D>;

/// A (rows, cols) matrix seen transposed, without copying (a stride change).
fn transposed<D: Device<f32>>(
    m: Tensor<(usize, usize), f32, D>,
) -> Result<Tensor<(usize, usize), f32, D>, D::Err> {
    m.try_permute::<(usize, usize), Axes2<1, 0>>()
}

/// `y = x A^T B^T` over the last axis of `x` (batch, tokens, width), with `A` (rank, width)
/// and `B` (width, rank).
///
/// Gradients go to `a` and `b` (keyed by their parameter tensors) and, when `x_tape` is
/// `Some`, to `x`; the returned tensor carries `x_tape` (or a new tape) plus this operation.
/// Without `x_tape` no gradient buffer for `x` is ever allocated. The backward pass keeps
/// `x` (shared, not copied) and `u = x A^T` (batch * tokens, rank). Like every activation
/// the runner produces, `x` is expected to be contiguous: its gradient is added in logical
/// order.
///
/// ```
/// use dfdx::prelude::*;
/// use dtl_core::Param;
/// use dtl_runner::generic_ops::low_rank;
/// let dev = Cpu::default();
/// let a = Param::from_vec(&dev, "side.0.a", &[1, 2], vec![1.0, 1.0]).unwrap();
/// let b = Param::from_vec(&dev, "side.0.b", &[2, 1], vec![1.0, 2.0]).unwrap();
/// let x = dev.tensor_from_vec(vec![1.0, 2.0], (1, 1, 2));
/// let y = low_rank(&x, None, &a, &b).unwrap();
/// assert_eq!(y.as_vec(), vec![3.0, 6.0]);
/// let wrong = Param::from_vec(&dev, "side.0.b", &[3, 1], vec![0.0; 3]).unwrap();
/// assert!(low_rank(&x, None, &a, &wrong).is_err());
/// ```
pub fn low_rank<D>(
    x: &Tensor<(usize, usize, usize), f32, D>,
    x_tape: Option<OwnedTape<f32, D>>,
    a: &Param<D>,
    b: &Param<D>,
) -> Result<Act<D>>
where
    D: Device<f32> + AccumulateGrad,
{
    let (bs, n, d) = *x.shape();
    let r = low_rank_rank(a, b, d)?;
    let rows = bs * n;
    let a2 = a.value.clone().try_reshape_like(&(r, d)).map_err(dev_err)?;
    let b2 = b.value.clone().try_reshape_like(&(d, r)).map_err(dev_err)?;
    let forward = || -> Result<_, D::Err> {
        let x2 = x.clone().try_reshape_like(&(rows, d))?;
        let u = x2.try_matmul(transposed(a2.clone())?)?;
        let y = u.clone().try_matmul(transposed(b2.clone())?)?;
        Ok((u, y.try_reshape_like(&(bs, n, d))?))
    };
    let (u, out) = forward().map_err(dev_err)?;
    let want_gx = x_tape.is_some();
    let mut tape = x_tape.unwrap_or_default();
    let out_ghost = out.ghost();
    let x_ghost = x.ghost();
    let a_ghost = a.value.ghost();
    let b_ghost = b.value.ghost();
    // The input itself (shared, not copied) is kept for the backward pass.
    let x_kept = x.clone();
    tape.add_backward_op(move |grads| {
        grads.try_alloc_for(&out_ghost)?;
        let g = grads.get(&out_ghost).try_reshape_like(&(rows, d))?;
        let x2 = x_kept.try_reshape_like(&(rows, d))?;
        // gu = g B (rows, r); gB = g^T u (d, r); gA = gu^T x (r, d); gx = gu A (rows, d).
        let gu = g.clone().try_matmul(b2)?;
        let gb = transposed(g)?.try_matmul(u)?;
        D::add_into(grads.get_or_alloc_mut(&b_ghost)?, &gb)?;
        drop(gb);
        let ga = transposed(gu.clone())?.try_matmul(x2)?;
        D::add_into(grads.get_or_alloc_mut(&a_ghost)?, &ga)?;
        drop(ga);
        if want_gx {
            let gx = gu.try_matmul(a2)?;
            D::add_into(grads.get_or_alloc_mut(&x_ghost)?, &gx)?;
        }
        Ok(())
    });
    Ok(out.put_tape(tape))
}

/// `sigmoid(beta z)`, tape-less.
fn sigmoid_scaled<D: Device<f32>>(
    z: &Act<D, NoneTape>,
    beta: f32,
) -> Result<Act<D, NoneTape>, D::Err> {
    z.clone().try_mul(beta)?.try_sigmoid()
}

/// `swish_beta(z) = z * sigmoid(beta * z)`, elementwise.
///
/// The backward pass keeps only `z` and recomputes the sigmoid; the gradient is
/// `s + beta z s (1 - s)` with `s = sigmoid(beta z)`.
///
/// ```
/// use dfdx::prelude::*;
/// let dev = Cpu::default();
/// let z = dev.tensor_from_vec(vec![0.0f32, 10.0], (1, 1, 2)).leaky_traced();
/// let y = dtl_runner::generic_ops::swish(z, 1.0).unwrap();
/// assert!((y.as_vec()[1] - 10.0 / (1.0 + (-10.0f32).exp())).abs() < 1e-5);
/// ```
pub fn swish<D>(z: Act<D>, beta: f32) -> Result<Act<D>>
where
    D: Device<f32> + AccumulateGrad,
{
    let (z, mut tape) = z.split_tape();
    let out = sigmoid_scaled(&z, beta)
        .and_then(|s| z.clone().try_mul(s))
        .map_err(dev_err)?;
    let out_ghost = out.ghost();
    let z_ghost = z.ghost();
    tape.add_backward_op(move |grads| {
        grads.try_alloc_for(&out_ghost)?;
        let g = grads.get(&out_ghost);
        let s = sigmoid_scaled(&z, beta)?;
        // s + beta z s (1 - s)
        let one_minus_s = s.clone().try_negate()?.try_add(1.0)?;
        let slope = z
            .try_mul(beta)?
            .try_mul(s.clone())?
            .try_mul(one_minus_s)?
            .try_add(s)?;
        let gz = g.try_mul(slope)?;
        D::add_into(grads.get_or_alloc_mut(&z_ghost)?, &gz)
    });
    Ok(out.put_tape(tape))
}

/// Pads the two grid axes of `x` (batch, rows, cols, width) with zeros: `before` rows and
/// columns in front, `after` behind.
fn pad_grid<D: Device<f32>>(x: Grid<D>, before: usize, after: usize) -> Result<Grid<D>, D::Err> {
    let dev = x.device().clone();
    let mut x = x;
    if before > 0 {
        let (b, _, w, c) = *x.shape();
        let z: Grid<D> = dev.try_zeros_like(&(b, before, w, c))?;
        x = (z, x).try_concat_along(Axis::<1>)?;
        let (b, h, _, c) = *x.shape();
        let z: Grid<D> = dev.try_zeros_like(&(b, h, before, c))?;
        x = (z, x).try_concat_along(Axis::<2>)?;
    }
    if after > 0 {
        let (b, _, w, c) = *x.shape();
        let z: Grid<D> = dev.try_zeros_like(&(b, after, w, c))?;
        x = (x, z).try_concat_along(Axis::<1>)?;
        let (b, h, _, c) = *x.shape();
        let z: Grid<D> = dev.try_zeros_like(&(b, h, after, c))?;
        x = (x, z).try_concat_along(Axis::<2>)?;
    }
    Ok(x)
}

/// The patch tokens of `x` (batch, prefix + rows * cols, width) as a zero-padded grid.
fn padded_patches<D: Device<f32>>(
    x: Act<D, NoneTape>,
    prefix: usize,
    grid_shape: (usize, usize, usize, usize),
    before: usize,
    after: usize,
) -> Result<Grid<D>, D::Err> {
    let patches = x.try_slice((.., prefix.., ..))?;
    pad_grid(patches.try_reshape_like(&grid_shape)?, before, after)
}

/// The first `prefix` tokens of `head_of` followed by the grid `grid` as tokens.
fn with_prefix<D: Device<f32>>(
    head_of: Act<D, NoneTape>,
    grid: Grid<D>,
    prefix: usize,
) -> Result<Act<D, NoneTape>, D::Err> {
    let (bs, gh, gw, d) = *grid.shape();
    let tokens = grid.try_reshape_like(&(bs, gh * gw, d))?;
    if prefix == 0 {
        Ok(tokens)
    } else {
        let head = head_of.try_slice((.., ..prefix, ..))?;
        (head, tokens).try_concat_along(Axis::<1>)
    }
}

/// `sum over taps (di, dj) of padded[:, off(di) .., off(dj) .., :] * w[:, di, dj]`, an
/// (batch, rows, cols, width) grid; `w2` is the kernel as (width, k * k).
fn shift_and_add<D: Device<f32>>(
    padded: &Grid<D>,
    w2: &Tensor<(usize, usize), f32, D>,
    k: usize,
    out_shape: (usize, usize, usize, usize),
    offset: impl Fn(usize) -> usize,
) -> Result<Grid<D>, D::Err> {
    let (_, gh, gw, d) = out_shape;
    let mut acc: Option<Grid<D>> = None;
    for di in 0..k {
        for dj in 0..k {
            let t = di * k + dj;
            let (oi, oj) = (offset(di), offset(dj));
            let shifted = padded
                .clone()
                .try_slice((.., oi..oi + gh, oj..oj + gw, ..))?;
            let wt = w2
                .clone()
                .try_slice((.., t..t + 1))?
                .try_reshape_like(&(d,))?
                .try_broadcast_like::<_, Axes3<0, 1, 2>>(&out_shape)?;
            let term = shifted.try_mul(wt)?;
            acc = Some(match acc {
                Some(acc) => acc.try_add(term)?,
                None => term,
            });
        }
    }
    match acc {
        Some(acc) => Ok(acc),
        // A 0 x 0 kernel: every output is an empty sum.
        None => padded.device().try_zeros_like(&out_shape),
    }
}

/// Depthwise `k x k` convolution, no bias, "same" padding, over the patch grid of tokens
/// (batch, prefix + rows * cols, width); the first `prefix` tokens pass through unchanged.
/// `w` is (width, 1, k, k).
///
/// Padding follows [`crate::ops::same_padding`] (an even kernel pads one before and two
/// after for `k = 4`). The backward pass keeps only the input.
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
/// let y = dtl_runner::generic_ops::depthwise_conv_tokens(x, &w, 1, (2, 2)).unwrap();
/// assert_eq!(y.as_vec(), vec![7.0, 1.0, 2.0, 3.0, 4.0]);
/// ```
pub fn depthwise_conv_tokens<D>(
    s: Act<D>,
    w: &Param<D>,
    prefix: usize,
    grid: (usize, usize),
) -> Result<Act<D>>
where
    D: Device<f32> + AccumulateGrad,
{
    let (bs, n, d) = *s.shape();
    let k = conv_kernel(w, d, n, prefix, grid)?;
    let (gh, gw) = grid;
    let (before, after) = same_padding(k);
    let grid_shape = (bs, gh, gw, d);
    let (s, mut tape) = s.split_tape();
    let w2 = w
        .value
        .clone()
        .try_reshape_like(&(d, k * k))
        .map_err(dev_err)?;
    let forward = || -> Result<Act<D, NoneTape>, D::Err> {
        let padded = padded_patches(s.clone(), prefix, grid_shape, before, after)?;
        let conv = shift_and_add(&padded, &w2, k, grid_shape, |i| i)?;
        drop(padded);
        with_prefix(s.clone(), conv, prefix)
    };
    let out = forward().map_err(dev_err)?;
    let out_ghost = out.ghost();
    let s_ghost = s.ghost();
    let w_ghost = w.value.ghost();
    tape.add_backward_op(move |grads| {
        grads.try_alloc_for(&out_ghost)?;
        let g = grads.get(&out_ghost);
        let g_grid = g
            .clone()
            .try_slice((.., prefix.., ..))?
            .try_reshape_like(&grid_shape)?;
        // Weight gradient: gw[c, di, dj] = sum over batch and grid of g * shifted input.
        let padded = padded_patches(s, prefix, grid_shape, before, after)?;
        let mut taps = Vec::with_capacity(k * k);
        for di in 0..k {
            for dj in 0..k {
                let shifted = padded
                    .clone()
                    .try_slice((.., di..di + gh, dj..dj + gw, ..))?;
                taps.push(
                    shifted
                        .try_mul(g_grid.clone())?
                        .try_sum::<(usize,), Axes3<0, 1, 2>>()?,
                );
            }
        }
        drop(padded);
        if !taps.is_empty() {
            // (k * k, d) stacked, stored as (d, k * k) like the parameter.
            let gwt = taps.try_stack()?;
            let gw_dk = transposed(gwt)?.try_contiguous()?;
            D::add_into(grads.get_or_alloc_mut(&w_ghost)?, &gw_dk)?;
        } else {
            grads.try_alloc_for(&w_ghost)?;
        }
        // Input gradient: the transposed convolution, i.e. the gradient padded the other way
        // round (`after` in front, `before` behind) and read at mirrored offsets.
        let g_padded = pad_grid(g_grid, after, before)?;
        let gs_grid = shift_and_add(&g_padded, &w2, k, grid_shape, |i| k - 1 - i)?;
        drop(g_padded);
        let gs = with_prefix(g, gs_grid, prefix)?;
        D::add_into(grads.get_or_alloc_mut(&s_ghost)?, &gs)
    });
    Ok(out.put_tape(tape))
}

/// `features @ W^T + bias` for a (batch, width) input, `W` (classes, width).
///
/// The backward pass keeps the input and the weight (both shared, not copied).
///
/// ```
/// use dfdx::prelude::*;
/// use dtl_core::Param;
/// let dev = Cpu::default();
/// let w = Param::from_vec(&dev, "head.weight", &[1, 2], vec![1.0, -1.0]).unwrap();
/// let b = Param::from_vec(&dev, "head.bias", &[1], vec![0.5]).unwrap();
/// let f = dev.tensor_from_vec(vec![3.0, 1.0], (1, 2)).leaky_traced();
/// assert_eq!(dtl_runner::generic_ops::linear(f, &w, &b).unwrap().as_vec(), vec![2.5]);
/// ```
pub fn linear<D>(f: Matrix<D>, w: &Param<D>, bias: &Param<D>) -> Result<Matrix<D>>
where
    D: Device<f32> + AccumulateGrad,
{
    let (bs, d) = *f.shape();
    let c = linear_classes(w, bias, d)?;
    let (f, mut tape) = f.split_tape();
    let w2 = w.value.clone().try_reshape_like(&(c, d)).map_err(dev_err)?;
    let forward = || -> Result<Tensor<(usize, usize), f32, D>, D::Err> {
        let bias_b = bias
            .value
            .clone()
            .try_broadcast_like::<_, Axis<0>>(&(bs, c))?;
        f.clone()
            .try_matmul(transposed(w2.clone())?)?
            .try_add(bias_b)
    };
    let out = forward().map_err(dev_err)?;
    let out_ghost = out.ghost();
    let f_ghost = f.ghost();
    let w_ghost = w.value.ghost();
    let b_ghost = bias.value.ghost();
    tape.add_backward_op(move |grads| {
        grads.try_alloc_for(&out_ghost)?;
        let g = grads.get(&out_ghost);
        // gW = g^T f (c, d); gb = column sums of g (c); gf = g W (bs, d).
        let gw = transposed(g.clone())?.try_matmul(f)?;
        D::add_into(grads.get_or_alloc_mut(&w_ghost)?, &gw)?;
        drop(gw);
        let gb = g.clone().try_sum::<(usize,), Axis<0>>()?;
        D::add_into(grads.get_or_alloc_mut(&b_ghost)?, &gb)?;
        let gf = g.try_matmul(w2)?;
        D::add_into(grads.get_or_alloc_mut(&f_ghost)?, &gf)
    });
    Ok(out.put_tape(tape))
}

/// Pools tokens (batch, tokens, width) into (batch, width): the mean of the tokens from
/// `prefix` on (`mean`), or token 0 (`cls`).
///
/// Works with or without a tape; with one, the backward pass keeps only shapes and the
/// per-token weight (tokens,) on the host.
/// Errors when there is no token to pool (`prefix` not below the token count, or no token
/// at all for `cls`).
///
/// ```
/// use dfdx::prelude::*;
/// let dev = Cpu::default();
/// let x = dev.tensor_from_vec(vec![9.0, 1.0, 3.0], (1, 3, 1));
/// let m = dtl_runner::generic_ops::pool(x.clone(), 1, false).unwrap();
/// assert_eq!(m.as_vec(), vec![2.0]);
/// let c = dtl_runner::generic_ops::pool(x.clone(), 1, true).unwrap();
/// assert_eq!(c.as_vec(), vec![9.0]);
/// assert!(dtl_runner::generic_ops::pool(x, 3, false).is_err());
/// ```
pub fn pool<D, T: Tape<f32, D>>(
    x: Tensor<(usize, usize, usize), f32, D, T>,
    prefix: usize,
    cls: bool,
) -> Result<Tensor<(usize, usize), f32, D, T>>
where
    D: Device<f32> + AccumulateGrad,
{
    let (bs, n, d) = *x.shape();
    let (lo, hi) = if cls { (0, 1) } else { (prefix, n) };
    if hi > n || lo >= hi {
        return Err(DtlError::invalid(format!(
            "pool: {n} tokens leave nothing to pool ({}; prefix {prefix})",
            if cls { "cls" } else { "mean" }
        )));
    }
    let scale = 1.0 / (hi - lo) as f32;
    let (x, mut tape) = x.split_tape();
    let forward = || -> Result<Tensor<(usize, usize), f32, D>, D::Err> {
        x.clone()
            .try_slice((.., lo..hi, ..))?
            .try_sum::<(usize, usize), Axis<1>>()?
            .try_mul(scale)
    };
    let out = forward().map_err(dev_err)?;
    if T::OWNS_TAPE {
        let out_ghost = out.ghost();
        let x_ghost = x.ghost();
        drop(x);
        // Which tokens were pooled, times the mean's weight: (tokens,), on the host then copied.
        let mask: Vec<f32> = (0..n)
            .map(|t| if (lo..hi).contains(&t) { scale } else { 0.0 })
            .collect();
        tape.add_backward_op(move |grads| {
            grads.try_alloc_for(&out_ghost)?;
            let g = grads.get(&out_ghost);
            let dev = g.device().clone();
            let shape = (bs, n, d);
            let mask = dev
                .try_tensor_from_vec(mask, (n,))?
                .try_broadcast_like::<_, Axes2<0, 2>>(&shape)?;
            let gx = g.try_broadcast_like::<_, Axis<1>>(&shape)?.try_mul(mask)?;
            D::add_into(grads.get_or_alloc_mut(&x_ghost)?, &gx)
        });
    }
    Ok(out.put_tape(tape))
}

/// Mean over the batch of the cross-entropy between `targets` (a distribution per row, such
/// as smoothed one-hot labels, row-major `batch x classes`) and `softmax(logits)`.
///
/// The gradient, `(softmax(logits) * sum(targets of the row) - targets) / batch`, is
/// computed in the forward pass and is the only thing the backward pass keeps, as in
/// [`crate::model::soft_cross_entropy`].
///
/// ```
/// use dfdx::prelude::*;
/// let dev = Cpu::default();
/// let logits = dev.tensor_from_vec(vec![0.0f32, 0.0], (1, 2)).leaky_traced();
/// let loss = dtl_runner::generic_ops::soft_cross_entropy(logits, &[1.0, 0.0]).unwrap();
/// assert!((loss.array() - std::f32::consts::LN_2).abs() < 1e-6);
/// let logits = dev.tensor_from_vec(vec![0.0f32, 0.0], (1, 2)).leaky_traced();
/// assert!(dtl_runner::generic_ops::soft_cross_entropy(logits, &[1.0]).is_err());
/// ```
pub fn soft_cross_entropy<D>(
    logits: Matrix<D>,
    targets: &[f32],
) -> Result<Tensor<Rank0, f32, D, OwnedTape<f32, D>>>
where
    D: Device<f32> + AccumulateGrad,
{
    let (bs, c) = *logits.shape();
    if c == 0 {
        return Err(DtlError::invalid(format!(
            "logits are {bs}x0: cross-entropy needs at least one class"
        )));
    }
    if targets.len() != bs * c {
        return Err(DtlError::invalid(format!(
            "targets hold {} values, logits are {bs}x{c}",
            targets.len()
        )));
    }
    let row_sums: Vec<f32> = targets
        .chunks_exact(c)
        .map(|t| t.iter().map(|&v| v as f64).sum::<f64>() as f32)
        .collect();
    let inv_bs = 1.0 / bs as f32;
    let (l, mut tape) = logits.split_tape();
    let dev = l.device().clone();
    let forward = || -> Result<_, D::Err> {
        let t = dev.try_tensor_from_vec(targets.to_vec(), (bs, c))?;
        let logp = l.clone().try_log_softmax::<Axis<1>>()?;
        let loss = logp
            .clone()
            .try_mul(t.clone())?
            .try_sum::<Rank0, Axes2<0, 1>>()?
            .try_mul(-inv_bs)?;
        let tsum = dev
            .try_tensor_from_vec(row_sums, (bs,))?
            .try_broadcast_like::<_, Axis<1>>(&(bs, c))?;
        let grad = logp.try_exp()?.try_mul(tsum)?.try_sub(t)?.try_mul(inv_bs)?;
        Ok((loss, grad))
    };
    let (out, grad) = forward().map_err(dev_err)?;
    let out_ghost = out.ghost();
    let l_ghost = l.ghost();
    drop(l);
    tape.add_backward_op(move |grads| {
        grads.try_alloc_for(&out_ghost)?;
        let go = grads
            .get(&out_ghost)
            .try_broadcast_like::<_, Axes2<0, 1>>(&(bs, c))?;
        let gl = grad.try_mul(go)?;
        D::add_into(grads.get_or_alloc_mut(&l_ghost)?, &gl)
    });
    Ok(out.put_tape(tape))
}

#[cfg(test)]
mod tests {
    //! Each generic operation, run on the CPU, against its CPU counterpart in [`crate::ops`]
    //! and [`crate::model`]: values and every gradient agree within 1e-5 of the largest
    //! magnitude of the reference tensor, and no more gradient buffers are allocated.

    use super::*;
    use crate::ops;
    use dfdx::tensor::Gradients;
    use rand::{Rng, SeedableRng};

    type Grads = Gradients<f32, Cpu>;
    type Tokens<T = NoneTape> = Tensor<(usize, usize, usize), f32, Cpu, T>;

    fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
        let mut r = rand::rngs::StdRng::seed_from_u64(seed);
        (0..n).map(|_| r.gen_range(-1.0f32..1.0)).collect()
    }

    fn tokens(shape: (usize, usize, usize), seed: u64) -> Tokens {
        let (b, n, d) = shape;
        Cpu::default().tensor_from_vec(rand_vec(b * n * d, seed), shape)
    }

    /// `got` equals `want` elementwise within 1e-5 of `want`'s largest magnitude, which must
    /// not be negligible (a vanishing reference would make the comparison vacuous).
    fn assert_close(what: &str, got: &[f32], want: &[f32]) {
        assert_eq!(got.len(), want.len(), "{what}: lengths differ");
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(scale > 1e-3, "{what}: reference is all but zero ({scale})");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g - w).abs() <= 1e-5 * scale,
                "{what}[{i}]: {g} vs {w} (scale {scale})"
            );
        }
    }

    /// Number of gradient buffers held (dfdx exposes no count; its debug form lists them).
    fn buffers(g: &Grads) -> usize {
        format!("{g:?}").matches("UniqueId(").count()
    }

    /// `sum(y * probe)` and its gradients, with `probe` fixed random weights.
    fn backward<S: Shape>(y: Tensor<S, f32, Cpu, OwnedTape<f32, Cpu>>, seed: u64) -> Grads {
        let shape = *y.shape();
        let probe = Cpu::default().tensor_from_vec(rand_vec(shape.num_elements(), seed), shape);
        (y * probe).sum::<Rank0, _>().backward()
    }

    fn grad<S: Shape>(g: &Grads, t: &Tensor<S, f32, Cpu>) -> Vec<f32> {
        g.get(t).as_vec()
    }

    fn low_rank_case(with_x: bool) -> usize {
        let dev = Cpu::default();
        let (bs, n, d, r) = (2, 5, 6, 3);
        let x = tokens((bs, n, d), 1);
        let a = Param::from_vec(&dev, "side.0.a", &[r, d], rand_vec(r * d, 2)).unwrap();
        let b = Param::from_vec(&dev, "side.0.b", &[d, r], rand_vec(d * r, 3)).unwrap();
        let tape = || with_x.then(|| x.clone().leaky_traced().split_tape().1);
        let want = ops::low_rank(&x, tape(), &a, &b).unwrap();
        let got = low_rank(&x, tape(), &a, &b).unwrap();
        assert_close("low_rank", &got.as_vec(), &want.as_vec());
        let (gw, gg) = (backward(want, 4), backward(got, 4));
        assert_close("low_rank da", &grad(&gg, &a.value), &grad(&gw, &a.value));
        assert_close("low_rank db", &grad(&gg, &b.value), &grad(&gw, &b.value));
        if with_x {
            assert_close("low_rank dx", &grad(&gg, &x), &grad(&gw, &x));
        }
        assert_eq!(buffers(&gg), buffers(&gw));
        buffers(&gg)
    }

    #[test]
    fn low_rank_matches_cpu_with_and_without_input_gradient() {
        let without = low_rank_case(false);
        let with = low_rank_case(true);
        // The only difference is the gradient buffer of `x`.
        assert_eq!(with, without + 1);
    }

    #[test]
    fn swish_matches_cpu() {
        for beta in [1.0f32, 100.0] {
            let z = tokens((2, 3, 4), 5);
            // Scale down so that beta = 100 still has inputs on the sigmoid's slope.
            let z = if beta > 10.0 { z * 0.05 } else { z };
            let want = ops::swish(z.leaky_trace(), beta);
            let got = swish(z.leaky_trace(), beta).unwrap();
            assert_close("swish", &got.as_vec(), &want.as_vec());
            let (gw, gg) = (backward(want, 6), backward(got, 6));
            assert_close("swish dz", &grad(&gg, &z), &grad(&gw, &z));
            assert_eq!(buffers(&gg), buffers(&gw));
        }
    }

    #[test]
    fn depthwise_conv_matches_cpu() {
        let dev = Cpu::default();
        let (bs, d, grid) = (2, 3, (3, 4));
        for k in [1, 3, 4, 5] {
            for prefix in [0, 1] {
                let n = prefix + grid.0 * grid.1;
                let s = tokens((bs, n, d), 7 + k as u64);
                let w = rand_vec(d * k * k, 8 + prefix as u64);
                let w = Param::from_vec(&dev, "fusion.weight", &[d, 1, k, k], w).unwrap();
                let want = ops::depthwise_conv_tokens(s.leaky_trace(), &w, prefix, grid).unwrap();
                let got = depthwise_conv_tokens(s.leaky_trace(), &w, prefix, grid).unwrap();
                let case = format!("conv k={k} prefix={prefix}");
                assert_close(&case, &got.as_vec(), &want.as_vec());
                let (gw, gg) = (backward(want, 9), backward(got, 9));
                assert_close(&format!("{case} ds"), &grad(&gg, &s), &grad(&gw, &s));
                let (gwg, gww) = (grad(&gg, &w.value), grad(&gw, &w.value));
                assert_close(&format!("{case} dw"), &gwg, &gww);
                assert_eq!(buffers(&gg), buffers(&gw), "{case}");
            }
        }
    }

    #[test]
    fn linear_matches_cpu() {
        let dev = Cpu::default();
        let (bs, d, c) = (3, 7, 4);
        let f = dev.tensor_from_vec(rand_vec(bs * d, 10), (bs, d));
        let w = Param::from_vec(&dev, "head.weight", &[c, d], rand_vec(c * d, 11)).unwrap();
        let b = Param::from_vec(&dev, "head.bias", &[c], rand_vec(c, 12)).unwrap();
        let want = ops::linear(f.leaky_trace(), &w, &b).unwrap();
        let got = linear(f.leaky_trace(), &w, &b).unwrap();
        assert_close("linear", &got.as_vec(), &want.as_vec());
        let (gw, gg) = (backward(want, 13), backward(got, 13));
        assert_close("linear df", &grad(&gg, &f), &grad(&gw, &f));
        assert_close("linear dw", &grad(&gg, &w.value), &grad(&gw, &w.value));
        assert_close("linear dbias", &grad(&gg, &b.value), &grad(&gw, &b.value));
        assert_eq!(buffers(&gg), buffers(&gw));
    }

    #[test]
    fn pool_matches_cpu_traced_and_untraced() {
        let x = tokens((2, 5, 3), 14);
        for (prefix, cls) in [(1, false), (0, false), (1, true)] {
            let case = format!("pool prefix={prefix} cls={cls}");
            let want = ops::pool(x.clone(), prefix, cls);
            let got = pool(x.clone(), prefix, cls).unwrap();
            assert_close(&case, &got.as_vec(), &want.as_vec());
            let want = ops::pool(x.leaky_trace(), prefix, cls);
            let got = pool(x.leaky_trace(), prefix, cls).unwrap();
            assert_close(&case, &got.as_vec(), &want.as_vec());
            let (gw, gg) = (backward(want, 15), backward(got, 15));
            assert_close(&format!("{case} dx"), &grad(&gg, &x), &grad(&gw, &x));
            assert_eq!(buffers(&gg), buffers(&gw), "{case}");
        }
    }

    #[test]
    fn soft_cross_entropy_matches_cpu_with_smoothed_targets() {
        let dev = Cpu::default();
        let (bs, c) = (4, 5);
        let logits = dev.tensor_from_vec(rand_vec(bs * c, 16), (bs, c)) * 3.0;
        let targets = crate::model::smoothed_targets(&[0, 3, 1, 4], c, 0.1);
        let want = crate::model::soft_cross_entropy(logits.leaky_trace(), &targets).unwrap();
        let got = soft_cross_entropy(logits.leaky_trace(), &targets).unwrap();
        assert_close("soft CE", &[got.array()], &[want.array()]);
        // A factor on the loss checks that the incoming gradient is applied.
        let gw = (want * 1.7).backward();
        let gg = (got * 1.7).backward();
        assert_close("soft CE dlogits", &grad(&gg, &logits), &grad(&gw, &logits));
        assert_eq!(buffers(&gg), buffers(&gw));
    }

    #[test]
    fn bad_shapes_are_errors_naming_the_parameter() {
        let dev = Cpu::default();
        let x = tokens((1, 5, 4), 17);
        let a = Param::from_vec(&dev, "side.0.a", &[2, 4], rand_vec(8, 18)).unwrap();
        let b = Param::from_vec(&dev, "side.0.b", &[3, 2], rand_vec(6, 19)).unwrap();
        let e = low_rank(&x, None, &a, &b).unwrap_err().to_string();
        assert!(e.contains("side.0.b") && e.contains("width 4"), "{e}");
        let flat = Param::from_vec(&dev, "side.0.a", &[8], rand_vec(8, 18)).unwrap();
        let e = low_rank(&x, None, &flat, &b).unwrap_err().to_string();
        assert!(e.contains("`side.0.a` must be (rank, width)"), "{e}");

        let w = Param::from_vec(&dev, "fusion.weight", &[4, 1, 3, 2], vec![0.0; 24]).unwrap();
        let e = depthwise_conv_tokens(x.leaky_trace(), &w, 1, (2, 2))
            .unwrap_err()
            .to_string();
        assert!(e.contains("`fusion.weight` must be (4, 1, k, k)"), "{e}");
        let w = Param::from_vec(&dev, "fusion.weight", &[4, 1, 3, 3], vec![0.0; 36]).unwrap();
        let e = depthwise_conv_tokens(x.leaky_trace(), &w, 0, (2, 2))
            .unwrap_err()
            .to_string();
        assert!(e.contains("5 tokens") && e.contains("2x2 grid"), "{e}");

        let f = dev.tensor_from_vec(rand_vec(8, 20), (2, 4));
        let w = Param::from_vec(&dev, "head.weight", &[3, 4], vec![0.0; 12]).unwrap();
        let bias = Param::from_vec(&dev, "head.bias", &[2], vec![0.0; 2]).unwrap();
        let e = linear(f.leaky_trace(), &w, &bias).unwrap_err().to_string();
        assert!(e.contains("`head.bias` must be (3,)"), "{e}");
        let e = linear(f.leaky_trace(), &bias, &bias)
            .unwrap_err()
            .to_string();
        assert!(e.contains("`head.bias` must be (classes, 4)"), "{e}");

        let e = pool(x.clone(), 5, false).unwrap_err().to_string();
        assert!(e.contains("5 tokens leave nothing to pool"), "{e}");
        let e = soft_cross_entropy(f.leaky_trace(), &[0.0; 3])
            .unwrap_err()
            .to_string();
        assert!(e.contains("targets hold 3 values, logits are 2x4"), "{e}");
    }
}
