//! Shifted-window operations on the CPU (Swin): attention with an additive score bias,
//! window partition and merge of a token grid, and the 2 x 2 patch merging of a stage
//! transition.
//!
//! Attention runs one rayon task per window (sample of the attention batch), each writing its
//! own rows of the output through strided views, so no per-head scratch is needed; the
//! products go through [`matmul`]. Partition, merge and patch merging are gathers and
//! scatters, one task per output window or output grid row.
//!
//! ```
//! use dtl_kernels::{cpu::window, WindowShape};
//! // a 2 x 2 grid of width 1, one window of 2 x 2, shifted by one row and one column
//! let s = WindowShape { batch: 1, grid: (2, 2), width: 1, window: (2, 2), shift: (1, 1) };
//! let mut out = [0.0f32; 4];
//! window::window_partition(&[0.0, 1.0, 2.0, 3.0], s, &mut out);
//! assert_eq!(out, [3.0, 2.0, 1.0, 0.0]);
//! ```

use rayon::prelude::*;

use super::ops::{softmax_backward_rows, softmax_rows};
use super::strided::{matmul, Mat, MatMut};
use super::{dst, invalid, src, CpuBuf};
use crate::{checked_product, AttnShape, MergeShape, WindowShape};
use dtl_core::Result;

/// `P = softmax(q k^T * scale + bias)` of head `h` of attention sample `b` into `p`
/// (tokens x tokens); `bias` is the head's own tokens x tokens block.
fn probabilities(qkv: &[f32], s: AttnShape, b: usize, h: usize, bias: &[f32], p: &mut [f32]) {
    let (d, n, hd) = (s.width(), s.tokens, s.head_dim);
    let base = b * n * 3 * d + h * hd;
    let q = Mat::new(qkv, base, n, hd, 3 * d, 1);
    let k = Mat::new(qkv, base + d, n, hd, 3 * d, 1);
    let scale = 1.0 / (hd as f32).sqrt();
    matmul(MatMut::rows_of(p, n, n), q, k.t(), scale, false);
    for (v, &b) in p[..n * n].iter_mut().zip(bias) {
        *v += b;
    }
    softmax_rows(p, n);
}

/// The `tokens x tokens` bias block of head `h` for attention sample `b`.
fn bias_block(bias: &[f32], s: AttnShape, groups: usize, b: usize, h: usize) -> &[f32] {
    let tt = s.tokens * s.tokens;
    let g = b % groups;
    &bias[(g * s.heads + h) * tt..][..tt]
}

/// Multi-head attention with an additive score bias: head `h` of sample `b` is
/// `softmax(q k^T / sqrt(head_dim) + bias[b % groups, h]) v`, on the fused
/// `qkv (batch * tokens, 3 width)` (timm's `[q | k | v]`) into `out (batch * tokens, width)`.
/// `bias` holds `groups * heads * tokens * tokens` values.
///
/// ```
/// use dtl_kernels::{cpu::window, AttnShape};
/// // one token: the output is its value vector, whatever the bias
/// let s = AttnShape { batch: 1, tokens: 1, heads: 1, head_dim: 2 };
/// let mut out = [0.0f32; 2];
/// window::attention_bias(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], s, &[7.0], 1, &mut out);
/// assert_eq!(out, [5.0, 6.0]);
/// ```
pub fn attention_bias(qkv: &[f32], s: AttnShape, bias: &[f32], groups: usize, out: &mut [f32]) {
    let (d, n, hd) = (s.width(), s.tokens, s.head_dim);
    assert!(qkv.len() >= s.batch * n * 3 * d && out.len() >= s.batch * n * d);
    assert!(groups > 0 && bias.len() >= groups * s.heads * n * n);
    if s.batch * n * d == 0 {
        return;
    }
    out[..s.batch * n * d]
        .par_chunks_mut(n * d)
        .enumerate()
        .for_each_init(
            || vec![0.0f32; n * n],
            |p, (b, o)| {
                for h in 0..s.heads {
                    probabilities(qkv, s, b, h, bias_block(bias, s, groups, b, h), p);
                    let base = b * n * 3 * d + h * hd;
                    let v = Mat::new(qkv, base + 2 * d, n, hd, 3 * d, 1);
                    let dst = MatMut::new(o, h * hd, n, hd, d, 1);
                    matmul(dst, Mat::rows_of(p, n, n), v, 1.0, false);
                }
            },
        );
}

/// Input-only VJP of [`attention_bias`]: `dqkv (batch * tokens, 3 width)` (overwritten) from
/// the gradient `dout` of the output; the probabilities are recomputed, the bias is constant.
///
/// ```
/// use dtl_kernels::{cpu::window, AttnShape};
/// // one token: only the value vector gets a gradient
/// let s = AttnShape { batch: 1, tokens: 1, heads: 1, head_dim: 2 };
/// let mut dqkv = [9.0f32; 6];
/// window::attention_bias_vjp(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[1.0, -1.0], s, &[0.5], 1, &mut dqkv);
/// assert_eq!(dqkv, [0.0, 0.0, 0.0, 0.0, 1.0, -1.0]);
/// ```
pub fn attention_bias_vjp(
    qkv: &[f32],
    dout: &[f32],
    s: AttnShape,
    bias: &[f32],
    groups: usize,
    dqkv: &mut [f32],
) {
    let (d, n, hd) = (s.width(), s.tokens, s.head_dim);
    assert!(qkv.len() >= s.batch * n * 3 * d && dout.len() >= s.batch * n * d);
    assert!(dqkv.len() >= s.batch * n * 3 * d);
    assert!(groups > 0 && bias.len() >= groups * s.heads * n * n);
    if s.batch * n * d == 0 {
        return;
    }
    let scale = 1.0 / (hd as f32).sqrt();
    dqkv[..s.batch * n * 3 * d]
        .par_chunks_mut(n * 3 * d)
        .enumerate()
        .for_each_init(
            || (vec![0.0f32; n * n], vec![0.0f32; n * n]),
            |(p, dp), (b, g)| {
                for h in 0..s.heads {
                    probabilities(qkv, s, b, h, bias_block(bias, s, groups, b, h), p);
                    let base = b * n * 3 * d + h * hd;
                    let q = Mat::new(qkv, base, n, hd, 3 * d, 1);
                    let k = Mat::new(qkv, base + d, n, hd, 3 * d, 1);
                    let v = Mat::new(qkv, base + 2 * d, n, hd, 3 * d, 1);
                    let d_o = Mat::new(dout, b * n * d + h * hd, n, hd, d, 1);
                    let pm = Mat::rows_of(p, n, n);
                    // dV = P^T dO ; dP = dO V^T
                    matmul(
                        MatMut::new(g, h * hd + 2 * d, n, hd, 3 * d, 1),
                        pm.t(),
                        d_o,
                        1.0,
                        false,
                    );
                    matmul(MatMut::rows_of(dp, n, n), d_o, v.t(), 1.0, false);
                    // dS = P * (dP - rowsum(dP * P)) * scale
                    softmax_backward_rows(p, dp, n, scale);
                    let ds = Mat::rows_of(dp, n, n);
                    // dQ = dS K ; dK = dS^T Q
                    matmul(MatMut::new(g, h * hd, n, hd, 3 * d, 1), ds, k, 1.0, false);
                    matmul(
                        MatMut::new(g, h * hd + d, n, hd, 3 * d, 1),
                        ds.t(),
                        q,
                        1.0,
                        false,
                    );
                }
            },
        );
}

/// For window `w` of a sample (row-major over the windows) and its token `t`, the index of
/// the grid token (row-major) it holds.
#[inline]
fn grid_token(s: &WindowShape, w: usize, t: usize) -> usize {
    let (gh, gw) = s.grid;
    let (wh, ww) = s.window;
    let per_row = gw / ww;
    let r = ((w / per_row) * wh + t / ww + s.shift.0) % gh;
    let c = ((w % per_row) * ww + t % ww + s.shift.1) % gw;
    r * gw + c
}

/// Rolls a token grid by `-shift` and cuts it into windows (see [`WindowShape`]):
/// `x (batch, grid.0 * grid.1, width)` into `out (batch * windows, window tokens, width)`.
///
/// ```
/// use dtl_kernels::{cpu::window, WindowShape};
/// // a 2 x 4 grid of width 1 in two 2 x 2 windows, no shift
/// let s = WindowShape { batch: 1, grid: (2, 4), width: 1, window: (2, 2), shift: (0, 0) };
/// let mut out = [0.0f32; 8];
/// window::window_partition(&[0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0], s, &mut out);
/// assert_eq!(out, [0.0, 1.0, 4.0, 5.0, 2.0, 3.0, 6.0, 7.0]);
/// ```
pub fn window_partition(x: &[f32], s: WindowShape, out: &mut [f32]) {
    let (c, t, nw) = (s.width, s.window_tokens(), s.windows());
    let per_sample = s.grid.0 * s.grid.1 * c;
    assert!(x.len() >= s.len() && out.len() >= s.len());
    if s.is_empty() {
        return;
    }
    out[..s.len()]
        .par_chunks_mut(t * c)
        .enumerate()
        .for_each(|(bw, win)| {
            let (b, w) = (bw / nw, bw % nw);
            let sample = &x[b * per_sample..][..per_sample];
            for (ti, row) in win.chunks_mut(c).enumerate() {
                row.copy_from_slice(&sample[grid_token(&s, w, ti) * c..][..c]);
            }
        });
}

/// The inverse of [`window_partition`] (and its VJP): windows back into the grid, the roll
/// undone, `x (batch * windows, window tokens, width)` into `out (batch, grid tokens, width)`.
///
/// ```
/// use dtl_kernels::{cpu::window, WindowShape};
/// let s = WindowShape { batch: 1, grid: (2, 4), width: 1, window: (2, 2), shift: (1, 1) };
/// let x = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0];
/// let (mut w, mut back) = ([0.0f32; 8], [0.0f32; 8]);
/// window::window_partition(&x, s, &mut w);
/// window::window_merge(&w, s, &mut back);
/// assert_eq!(back, x);
/// ```
pub fn window_merge(x: &[f32], s: WindowShape, out: &mut [f32]) {
    let (c, t, nw) = (s.width, s.window_tokens(), s.windows());
    let (gh, gw) = s.grid;
    let (wh, ww) = s.window;
    assert!(x.len() >= s.len() && out.len() >= s.len());
    if s.is_empty() {
        return;
    }
    let per_row = gw / ww;
    // one task per grid row of a sample
    out[..s.len()]
        .par_chunks_mut(gw * c)
        .enumerate()
        .for_each(|(br, row)| {
            let (b, r) = (br / gh, br % gh);
            // the rolled-grid row that holds grid row r
            let rr = (r + gh - s.shift.0) % gh;
            for (col, dst) in row.chunks_mut(c).enumerate() {
                let rc = (col + gw - s.shift.1) % gw;
                let w = (rr / wh) * per_row + rc / ww;
                let ti = (rr % wh) * ww + rc % ww;
                dst.copy_from_slice(&x[((b * nw + w) * t + ti) * c..][..c]);
            }
        });
}

/// The input grid index of part `part` (0..4) of output token `(i, j)` of a patch merging:
/// parts in the order (row, column) = (0, 0), (1, 0), (0, 1), (1, 1).
#[inline]
fn merge_source(s: &MergeShape, i: usize, j: usize, part: usize) -> usize {
    let (dr, dc) = (part % 2, part / 2);
    (2 * i + dr) * s.grid.1 + 2 * j + dc
}

/// Swin's patch merging gather: `x (batch, grid.0 * grid.1, width)` into
/// `out (batch, grid.0 / 2 * grid.1 / 2, 4 width)` (see [`MergeShape`]).
///
/// ```
/// use dtl_kernels::{cpu::window, MergeShape};
/// // one 2 x 2 grid of width 1: (0,0)=0, (0,1)=1, (1,0)=2, (1,1)=3
/// let s = MergeShape { batch: 1, grid: (2, 2), width: 1 };
/// let mut out = [0.0f32; 4];
/// window::patch_merge(&[0.0, 1.0, 2.0, 3.0], s, &mut out);
/// assert_eq!(out, [0.0, 2.0, 1.0, 3.0]);
/// ```
pub fn patch_merge(x: &[f32], s: MergeShape, out: &mut [f32]) {
    let c = s.width;
    let (oh, ow) = s.out_grid();
    let per_sample = s.grid.0 * s.grid.1 * c;
    assert!(x.len() >= s.len() && out.len() >= s.len());
    if s.is_empty() {
        return;
    }
    out[..s.len()]
        .par_chunks_mut(ow * 4 * c)
        .enumerate()
        .for_each(|(bi, row)| {
            let (b, i) = (bi / oh, bi % oh);
            let sample = &x[b * per_sample..][..per_sample];
            for (j, tok) in row.chunks_mut(4 * c).enumerate() {
                for (part, dst) in tok.chunks_mut(c).enumerate() {
                    dst.copy_from_slice(&sample[merge_source(&s, i, j, part) * c..][..c]);
                }
            }
        });
}

/// The VJP (and inverse) of [`patch_merge`]: `dy (batch, out tokens, 4 width)` scattered back
/// into `dx (batch, grid tokens, width)` (overwritten).
///
/// ```
/// use dtl_kernels::{cpu::window, MergeShape};
/// let s = MergeShape { batch: 1, grid: (2, 2), width: 1 };
/// let mut dx = [9.0f32; 4];
/// window::patch_merge_vjp(&[0.0, 2.0, 1.0, 3.0], s, &mut dx);
/// assert_eq!(dx, [0.0, 1.0, 2.0, 3.0]);
/// ```
pub fn patch_merge_vjp(dy: &[f32], s: MergeShape, dx: &mut [f32]) {
    let c = s.width;
    let (gh, gw) = s.grid;
    let (oh, ow) = s.out_grid();
    assert!(dy.len() >= s.len() && dx.len() >= s.len());
    if s.is_empty() {
        return;
    }
    dx[..s.len()]
        .par_chunks_mut(gw * c)
        .enumerate()
        .for_each(|(br, row)| {
            let (b, r) = (br / gh, br % gh);
            for (col, dst) in row.chunks_mut(c).enumerate() {
                let (i, j) = (r / 2, col / 2);
                let part = (r % 2) + 2 * (col % 2);
                let from = (((b * oh + i) * ow + j) * 4 + part) * c;
                dst.copy_from_slice(&dy[from..][..c]);
            }
        });
}

// ---- checked entry points of `CpuKernels` ------------------------------------------------

/// Checks an attention shape with a bias and returns `(qkv, out, bias)` value counts.
fn bias_lens(op: &str, s: &AttnShape, groups: usize) -> Result<(usize, usize, usize)> {
    if groups == 0 {
        return Err(invalid(op, "the bias has 0 groups; use at least 1".into()));
    }
    let out = checked_product(op, &[s.batch, s.tokens, s.heads, s.head_dim])?;
    let qkv = checked_product(op, &[out, 3])?;
    let bias = checked_product(op, &[groups, s.heads, s.tokens, s.tokens])?;
    Ok((qkv, out, bias))
}

/// Checks a window shape: grid a whole number of windows, shift inside the window.
fn window_len(op: &str, s: &WindowShape) -> Result<usize> {
    let (gh, gw) = s.grid;
    let (wh, ww) = s.window;
    if wh == 0 || ww == 0 || gh % wh != 0 || gw % ww != 0 {
        return Err(invalid(
            op,
            format!(
                "the grid {gh}x{gw} is not a whole number of {wh}x{ww} windows (a window side must divide the grid's)"
            ),
        ));
    }
    if s.shift.0 >= wh || s.shift.1 >= ww {
        return Err(invalid(
            op,
            format!(
                "the shift {:?} is not smaller than the {wh}x{ww} window",
                s.shift
            ),
        ));
    }
    checked_product(op, &[s.batch, gh, gw, s.width])
}

/// Checks a patch-merging shape: an even grid.
fn merge_len(op: &str, s: &MergeShape) -> Result<usize> {
    if s.grid.0 % 2 != 0 || s.grid.1 % 2 != 0 {
        return Err(invalid(
            op,
            format!(
                "the grid {}x{} has an odd side; patch merging needs both even",
                s.grid.0, s.grid.1
            ),
        ));
    }
    checked_product(op, &[s.batch, s.grid.0, s.grid.1, s.width])
}

/// [`attention_bias`] on buffers, sizes checked (the CPU needs no scratch).
pub(super) fn attention_bias_op(
    qkv: &CpuBuf,
    shape: AttnShape,
    bias: &CpuBuf,
    groups: usize,
    out: &mut CpuBuf,
) -> Result<()> {
    const OP: &str = "attention_bias";
    let (nqkv, nout, nbias) = bias_lens(OP, &shape, groups)?;
    attention_bias(
        src(OP, "qkv", qkv, nqkv)?,
        shape,
        src(OP, "bias", bias, nbias)?,
        groups,
        dst(OP, "out", out, nout)?,
    );
    Ok(())
}

/// [`attention_bias_vjp`] on buffers, sizes checked (the CPU needs no scratch).
pub(super) fn attention_bias_vjp_op(
    qkv: &CpuBuf,
    dout: &CpuBuf,
    shape: AttnShape,
    bias: &CpuBuf,
    groups: usize,
    dqkv: &mut CpuBuf,
) -> Result<()> {
    const OP: &str = "attention_bias_vjp";
    let (nqkv, nout, nbias) = bias_lens(OP, &shape, groups)?;
    attention_bias_vjp(
        src(OP, "qkv", qkv, nqkv)?,
        src(OP, "dout", dout, nout)?,
        shape,
        src(OP, "bias", bias, nbias)?,
        groups,
        dst(OP, "dqkv", dqkv, nqkv)?,
    );
    Ok(())
}

/// [`window_partition`] (`merge` false) or [`window_merge`] on buffers, sizes checked.
pub(super) fn window_op(
    x: &CpuBuf,
    shape: WindowShape,
    out: &mut CpuBuf,
    merge: bool,
) -> Result<()> {
    let op = if merge {
        "window_merge"
    } else {
        "window_partition"
    };
    let n = window_len(op, &shape)?;
    let x = src(op, "x", x, n)?;
    let out = dst(op, "out", out, n)?;
    if merge {
        window_merge(x, shape, out);
    } else {
        window_partition(x, shape, out);
    }
    Ok(())
}

/// [`patch_merge`] (`vjp` false) or [`patch_merge_vjp`] on buffers, sizes checked.
pub(super) fn merge_op(x: &CpuBuf, shape: MergeShape, out: &mut CpuBuf, vjp: bool) -> Result<()> {
    let op = if vjp {
        "patch_merge_vjp"
    } else {
        "patch_merge"
    };
    let n = merge_len(op, &shape)?;
    let (xn, on) = if vjp { ("dy", "dx") } else { ("x", "out") };
    let x = src(op, xn, x, n)?;
    let out = dst(op, on, out, n)?;
    if vjp {
        patch_merge_vjp(x, shape, out);
    } else {
        patch_merge(x, shape, out);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{CpuKernels, Kernels};

    fn ramp(n: usize, seed: u64) -> Vec<f32> {
        let mut state = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 33) as f64 / (1u64 << 31) as f64 * 2.0 - 1.0) as f32
            })
            .collect()
    }

    fn dot(a: &[f32], b: &[f32]) -> f64 {
        a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum()
    }

    /// Attention with a bias by the definition, in f64.
    fn naive_attention(qkv: &[f32], s: AttnShape, bias: &[f32], groups: usize) -> Vec<f64> {
        let (d, n, hd) = (s.width(), s.tokens, s.head_dim);
        let mut out = vec![0.0f64; s.batch * n * d];
        for b in 0..s.batch {
            for h in 0..s.heads {
                let at = |t: usize, part: usize, c: usize| {
                    qkv[(b * n + t) * 3 * d + part * d + h * hd + c] as f64
                };
                for i in 0..n {
                    let mut sc: Vec<f64> = (0..n)
                        .map(|j| {
                            let qk: f64 = (0..hd).map(|c| at(i, 0, c) * at(j, 1, c)).sum();
                            let g = b % groups;
                            qk / (hd as f64).sqrt()
                                + bias[((g * s.heads + h) * n + i) * n + j] as f64
                        })
                        .collect();
                    let m = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = sc
                        .iter_mut()
                        .map(|v| {
                            *v = (*v - m).exp();
                            *v
                        })
                        .sum();
                    for c in 0..hd {
                        out[(b * n + i) * d + h * hd + c] =
                            (0..n).map(|j| sc[j] / z * at(j, 2, c)).sum();
                    }
                }
            }
        }
        out
    }

    const S: AttnShape = AttnShape {
        batch: 6,
        tokens: 5,
        heads: 2,
        head_dim: 3,
    };

    #[test]
    fn attention_bias_matches_the_definition() {
        // 5 tokens: rows shorter than a vector; 19: full vectors and a remainder
        let long = AttnShape {
            batch: 4,
            tokens: 19,
            heads: 2,
            head_dim: 4,
        };
        for s in [S, long] {
            let groups = 2;
            let n = s.tokens;
            let qkv = ramp(s.rows() * 3 * s.width(), 1);
            let bias: Vec<f32> = ramp(groups * s.heads * n * n, 2)
                .iter()
                .map(|v| 3.0 * v)
                .collect();
            let mut out = vec![0.0f32; s.rows() * s.width()];
            attention_bias(&qkv, s, &bias, groups, &mut out);
            let want = naive_attention(&qkv, s, &bias, groups);
            for (g, w) in out.iter().zip(&want) {
                assert!((*g as f64 - w).abs() < 1e-5, "{g} vs {w}");
            }
        }
    }

    #[test]
    fn a_zero_bias_is_plain_attention() {
        let k = CpuKernels::new();
        let qkv = k.upload_new(&ramp(S.rows() * 3 * S.width(), 3)).unwrap();
        let bias = k.alloc(S.heads * 25).unwrap();
        let n = S.rows() * S.width();
        let (mut a, mut b) = (k.alloc(n).unwrap(), k.alloc(n).unwrap());
        let mut scratch = k.alloc(k.attention_scratch(S)).unwrap();
        k.attention(&qkv, S, &mut a, &mut scratch).unwrap();
        k.attention_bias(&qkv, S, &bias, 1, &mut b, &mut scratch)
            .unwrap();
        let (a, b) = (k.download(&a, n).unwrap(), k.download(&b, n).unwrap());
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() < 1e-6, "{x} vs {y}");
        }
        let (mut da, mut db) = (k.alloc(3 * n).unwrap(), k.alloc(3 * n).unwrap());
        let dout = k.upload_new(&ramp(n, 4)).unwrap();
        k.attention_vjp(&qkv, &dout, S, &mut da, &mut scratch)
            .unwrap();
        k.attention_bias_vjp(&qkv, &dout, S, &bias, 1, &mut db, &mut scratch)
            .unwrap();
        let (da, db) = (
            k.download(&da, 3 * n).unwrap(),
            k.download(&db, 3 * n).unwrap(),
        );
        for (x, y) in da.iter().zip(&db) {
            assert!((x - y).abs() < 1e-5, "{x} vs {y}");
        }
    }

    /// <J v, w> = <v, J^T w> against the f64 definition's central differences.
    #[test]
    fn attention_bias_vjp_is_the_transposed_linearisation() {
        let groups = 2;
        let qkv = ramp(S.rows() * 3 * S.width(), 5);
        let bias: Vec<f32> = ramp(groups * S.heads * 25, 6)
            .iter()
            .map(|v| 2.0 * v)
            .collect();
        let v = ramp(qkv.len(), 7);
        let w = ramp(S.rows() * S.width(), 8);
        let mut dqkv = vec![9.0f32; qkv.len()];
        attention_bias_vjp(&qkv, &w, S, &bias, groups, &mut dqkv);
        let eps = 1e-3f32;
        let shifted = |sign: f32| -> Vec<f64> {
            let x: Vec<f32> = qkv
                .iter()
                .zip(&v)
                .map(|(a, b)| a + sign * eps * b)
                .collect();
            naive_attention(&x, S, &bias, groups)
        };
        let (p, m) = (shifted(1.0), shifted(-1.0));
        let jv: f64 = p
            .iter()
            .zip(&m)
            .zip(&w)
            .map(|((a, b), c)| (a - b) / (2.0 * eps as f64) * *c as f64)
            .sum();
        let vjtw = dot(&v, &dqkv);
        assert!(
            (jv - vjtw).abs() < 1e-3 * jv.abs().max(1.0),
            "{jv} vs {vjtw}"
        );
    }

    #[test]
    fn partition_matches_roll_and_cut_loops_and_merge_inverts_it() {
        let k = CpuKernels::new();
        for shift in [(0, 0), (2, 1), (3, 3)] {
            let s = WindowShape {
                batch: 2,
                grid: (8, 12),
                width: 3,
                window: (4, 4),
                shift,
            };
            let x = ramp(s.len(), 9);
            let mut out = vec![0.0f32; s.len()];
            window_partition(&x, s, &mut out);
            // the loops: roll, then cut
            let (gh, gw) = s.grid;
            let mut want = vec![0.0f32; s.len()];
            for b in 0..2 {
                for wr in 0..gh / 4 {
                    for wc in 0..gw / 4 {
                        for tr in 0..4 {
                            for tc in 0..4 {
                                let (r, c) = (wr * 4 + tr, wc * 4 + tc);
                                let (sr, sc) = ((r + shift.0) % gh, (c + shift.1) % gw);
                                let w = b * (gh / 4) * (gw / 4) + wr * (gw / 4) + wc;
                                for ch in 0..3 {
                                    want[((w * 16) + tr * 4 + tc) * 3 + ch] =
                                        x[((b * gh + sr) * gw + sc) * 3 + ch];
                                }
                            }
                        }
                    }
                }
            }
            assert_eq!(out, want, "shift {shift:?}");
            let xb = k.upload_new(&x).unwrap();
            let mut wb = k.alloc(s.len()).unwrap();
            let mut back = k.alloc(s.len()).unwrap();
            k.window_partition(&xb, s, &mut wb).unwrap();
            k.window_merge(&wb, s, &mut back).unwrap();
            assert_eq!(k.download(&back, s.len()).unwrap(), x);
            // adjoint: <P x, y> = <x, M y>
            let y = ramp(s.len(), 10);
            let mut my = vec![0.0f32; s.len()];
            window_merge(&y, s, &mut my);
            assert!((dot(&out, &y) - dot(&x, &my)).abs() < 1e-9);
        }
    }

    #[test]
    fn patch_merge_matches_loops_and_its_vjp_is_the_adjoint() {
        let k = CpuKernels::new();
        let s = MergeShape {
            batch: 2,
            grid: (4, 6),
            width: 3,
        };
        let x = ramp(s.len(), 11);
        let mut out = vec![0.0f32; s.len()];
        patch_merge(&x, s, &mut out);
        let mut want = Vec::new();
        for b in 0..2 {
            for i in 0..2 {
                for j in 0..3 {
                    for (dr, dc) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
                        let t = (b * 4 + 2 * i + dr) * 6 + 2 * j + dc;
                        want.extend_from_slice(&x[t * 3..t * 3 + 3]);
                    }
                }
            }
        }
        assert_eq!(out, want);
        let y = ramp(s.len(), 12);
        let yb = k.upload_new(&y).unwrap();
        let mut dx = k.upload_new(&vec![5.0; s.len()]).unwrap();
        k.patch_merge_vjp(&yb, s, &mut dx).unwrap();
        let dx = k.download(&dx, s.len()).unwrap();
        assert!((dot(&out, &y) - dot(&x, &dx)).abs() < 1e-9);
        // a permutation: the VJP inverts it
        let mut back = vec![0.0f32; s.len()];
        patch_merge_vjp(&out, s, &mut back);
        assert_eq!(back, x);
    }

    #[test]
    fn bad_shapes_and_short_buffers_are_errors() {
        let k = CpuKernels::new();
        let b = k.alloc(1000).unwrap();
        let mut o = k.alloc(1000).unwrap();
        let s = WindowShape {
            batch: 1,
            grid: (6, 8),
            width: 2,
            window: (4, 4),
            shift: (0, 0),
        };
        let e = k.window_partition(&b, s, &mut o).unwrap_err().to_string();
        assert!(e.contains("window_partition") && e.contains("6x8"), "{e}");
        let s = WindowShape {
            batch: 1,
            grid: (8, 8),
            width: 2,
            window: (4, 4),
            shift: (4, 0),
        };
        let e = k.window_merge(&b, s, &mut o).unwrap_err().to_string();
        assert!(e.contains("shift"), "{e}");
        let m = MergeShape {
            batch: 1,
            grid: (3, 4),
            width: 2,
        };
        let e = k.patch_merge(&b, m, &mut o).unwrap_err().to_string();
        assert!(e.contains("odd"), "{e}");
        let m = MergeShape {
            batch: 4,
            grid: (8, 8),
            width: 8,
        };
        let e = k.patch_merge_vjp(&b, m, &mut o).unwrap_err().to_string();
        assert!(e.contains("`dy`") && e.contains("2048"), "{e}");
        let mut scratch = k.alloc(0).unwrap();
        let e = k
            .attention_bias(&b, S, &b, 0, &mut o, &mut scratch)
            .unwrap_err()
            .to_string();
        assert!(e.contains("0 groups"), "{e}");
        let short = k.alloc(S.heads * 25 - 1).unwrap();
        let e = k
            .attention_bias_vjp(&b, &b, S, &short, 1, &mut o, &mut scratch)
            .unwrap_err()
            .to_string();
        assert!(e.contains("`bias`"), "{e}");
    }
}
