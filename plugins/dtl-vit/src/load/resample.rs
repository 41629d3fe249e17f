//! Resampling a position embedding to another patch grid: bicubic, as timm's
//! `resample_abs_pos_embed` does.

/// PyTorch's cubic convolution weights for the four taps around fractional offset `t`
/// (A = -0.75).
fn cubic_weights(t: f64) -> [f64; 4] {
    const A: f64 = -0.75;
    let c1 = |x: f64| ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
    let c2 = |x: f64| ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A;
    [c2(t + 1.0), c1(t), c1(1.0 - t), c2(2.0 - t)]
}

/// Taps and weights of a 1-D bicubic resize from `inp` to `out` samples
/// (`align_corners=False`, no antialiasing, edge indices clamped).
fn cubic_plan(inp: usize, out: usize) -> Vec<([usize; 4], [f64; 4])> {
    let scale = inp as f64 / out as f64;
    (0..out)
        .map(|o| {
            let src = scale * (o as f64 + 0.5) - 0.5;
            let x0 = src.floor();
            let w = cubic_weights(src - x0);
            let mut idx = [0usize; 4];
            for (k, slot) in idx.iter_mut().enumerate() {
                let i = x0 as i64 - 1 + k as i64;
                *slot = i.clamp(0, inp as i64 - 1) as usize;
            }
            (idx, w)
        })
        .collect()
}

/// Resamples a position embedding `(prefix + old.0 * old.1, dim)` to the grid `new`:
/// prefix tokens are kept, the grid part is resized with bicubic interpolation
/// (`align_corners=False`, no antialiasing), as timm's `resample_abs_pos_embed` does.
///
/// ```
/// // A constant grid stays constant.
/// let pos = vec![1.0f32; (1 + 4) * 2];
/// let out = dtl_vit::resample_pos_embed(&pos, (2, 2), (3, 3), 1, 2);
/// assert_eq!(out.len(), (1 + 9) * 2);
/// assert!(out.iter().all(|v| (v - 1.0).abs() < 1e-6));
/// ```
pub fn resample_pos_embed(
    pos: &[f32],
    old: (usize, usize),
    new: (usize, usize),
    prefix: usize,
    dim: usize,
) -> Vec<f32> {
    let grid = &pos[prefix * dim..];
    let rows = cubic_plan(old.0, new.0);
    let cols = cubic_plan(old.1, new.1);
    let mut out = pos[..prefix * dim].to_vec();
    out.reserve(new.0 * new.1 * dim);
    // separable: first along columns for every old row, then along rows
    let mut tmp = vec![0.0f64; old.0 * new.1 * dim];
    for y in 0..old.0 {
        for (x, (idx, w)) in cols.iter().enumerate() {
            for c in 0..dim {
                let mut acc = 0.0;
                for k in 0..4 {
                    acc += w[k] * grid[(y * old.1 + idx[k]) * dim + c] as f64;
                }
                tmp[(y * new.1 + x) * dim + c] = acc;
            }
        }
    }
    for (idx, w) in rows.iter() {
        for x in 0..new.1 {
            for c in 0..dim {
                let mut acc = 0.0;
                for k in 0..4 {
                    acc += w[k] * tmp[(idx[k] * new.1 + x) * dim + c];
                }
                out.push(acc as f32);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cubic_weights_sum_to_one() {
        for t in [0.0, 0.25, 0.5, 0.9] {
            let s: f64 = cubic_weights(t).iter().sum();
            assert!((s - 1.0).abs() < 1e-12);
        }
        // identity resize reproduces the input
        let pos: Vec<f32> = (0..(1 + 9) * 2).map(|v| v as f32).collect();
        let out = resample_pos_embed(&pos, (3, 3), (3, 3), 1, 2);
        assert_eq!(out, pos);
    }
}
