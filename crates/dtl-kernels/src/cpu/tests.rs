//! Every CPU kernel against a naive f64 reference (finite differences for the VJPs), with
//! buffers longer than needed, and short buffers refused.

#![allow(clippy::needless_range_loop, clippy::too_many_arguments)]

use super::*;
use crate::{AdamwStep, AttnShape, ConvShape, Kernels};

const K: CpuKernels = CpuKernels { _private: () };

/// Deterministic values in [-1, 1).
fn rnd(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// Values that must never be read: appended to every input and output buffer.
const SENTINEL: f32 = 12345.0;
const PAD: usize = 5;

/// A buffer holding `v` and then `PAD` sentinels.
fn buf(v: &[f32]) -> CpuBuf {
    let mut b = v.to_vec();
    b.extend([SENTINEL; PAD]);
    CpuBuf::from_vec(b)
}

/// A buffer of `n` values `init` and then `PAD` sentinels.
fn out(n: usize, init: f32) -> CpuBuf {
    buf(&vec![init; n])
}

/// The leading `n` values, checking that the sentinels after them are untouched.
fn lead(b: &CpuBuf, n: usize) -> Vec<f32> {
    assert!(
        b[n..].iter().all(|&v| v == SENTINEL),
        "values past the {n} an operation uses were written"
    );
    b[..n].to_vec()
}

fn close(got: &[f32], want: &[f64], tol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let scale = want.iter().fold(1e-6f64, |a, b| a.max(b.abs()));
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            ((*g as f64) - w).abs() <= tol * scale,
            "{what}[{i}]: {g} vs {w} (scale {scale})"
        );
    }
}

fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

fn dot(a: &[f64], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * *y as f64).sum()
}

/// Central finite difference of `f` along coordinate `i` of `x`, in f64.
fn fd(f: &dyn Fn(&[f64]) -> f64, x: &[f64], i: usize, h: f64) -> f64 {
    let (mut a, mut b) = (x.to_vec(), x.to_vec());
    a[i] += h;
    b[i] -= h;
    (f(&a) - f(&b)) / (2.0 * h)
}

fn err_names(e: dtl_core::Result<()>, op: &str, name: &str) {
    let e = e.unwrap_err().to_string();
    assert!(
        e.contains(op) && e.contains(&format!("`{name}`")),
        "{op}/{name}: {e}"
    );
}

// ---- products ---------------------------------------------------------------------------

fn naive_linear(x: &[f32], w: &[f32], b: Option<&[f32]>, m: usize, k: usize, n: usize) -> Vec<f64> {
    let mut y = vec![0f64; m * n];
    for i in 0..m {
        for j in 0..n {
            y[i * n + j] = b.map_or(0.0, |b| b[j] as f64)
                + (0..k)
                    .map(|l| x[i * k + l] as f64 * w[j * k + l] as f64)
                    .sum::<f64>();
        }
    }
    y
}

#[test]
fn linear_and_its_gradients_match_naive_products() {
    for &(m, k, n) in &[(37, 19, 23), (1, 5, 3), (300, 7, 2), (4, 3, 64)] {
        let x = rnd(m * k, 1);
        let w = rnd(n * k, 2);
        let b = rnd(n, 3);
        let y0 = rnd(m * n, 4);
        // overwrite, with and without bias
        for bias in [None, Some(&b[..])] {
            let mut y = out(m * n, 9.0);
            let bb = bias.map(buf);
            K.linear(&buf(&x), &buf(&w), bb.as_ref(), m, k, n, &mut y, false)
                .unwrap();
            close(
                &lead(&y, m * n),
                &naive_linear(&x, &w, bias, m, k, n),
                1e-5,
                "linear",
            );
            // accumulate
            let mut y = buf(&y0);
            K.linear(&buf(&x), &buf(&w), bb.as_ref(), m, k, n, &mut y, true)
                .unwrap();
            let want: Vec<f64> = naive_linear(&x, &w, bias, m, k, n)
                .iter()
                .zip(&y0)
                .map(|(a, b)| a + *b as f64)
                .collect();
            close(&lead(&y, m * n), &want, 1e-5, "linear accumulate");
        }
        // dx = dy w
        let dy = rnd(m * n, 5);
        let mut want = vec![0f64; m * k];
        for i in 0..m {
            for l in 0..k {
                want[i * k + l] = (0..n)
                    .map(|j| dy[i * n + j] as f64 * w[j * k + l] as f64)
                    .sum();
            }
        }
        let mut dx = out(m * k, 9.0);
        K.linear_vjp(&buf(&dy), &buf(&w), m, k, n, &mut dx, false)
            .unwrap();
        close(&lead(&dx, m * k), &want, 1e-5, "linear_vjp");
        let mut dx = out(m * k, 1.0);
        K.linear_vjp(&buf(&dy), &buf(&w), m, k, n, &mut dx, true)
            .unwrap();
        let want1: Vec<f64> = want.iter().map(|v| v + 1.0).collect();
        close(&lead(&dx, m * k), &want1, 1e-5, "linear_vjp accumulate");
        // dw = dy^T x
        let mut want = vec![0f64; n * k];
        for j in 0..n {
            for l in 0..k {
                want[j * k + l] = (0..m)
                    .map(|i| dy[i * n + j] as f64 * x[i * k + l] as f64)
                    .sum();
            }
        }
        let mut dw = out(n * k, 9.0);
        K.linear_wgrad(&buf(&dy), &buf(&x), m, k, n, &mut dw, false)
            .unwrap();
        close(&lead(&dw, n * k), &want, 1e-5, "linear_wgrad");
        let mut dw = out(n * k, -1.0);
        K.linear_wgrad(&buf(&dy), &buf(&x), m, k, n, &mut dw, true)
            .unwrap();
        let want1: Vec<f64> = want.iter().map(|v| v - 1.0).collect();
        close(&lead(&dw, n * k), &want1, 1e-5, "linear_wgrad accumulate");
        // db = column sums of dy
        let want: Vec<f64> = (0..n)
            .map(|j| (0..m).map(|i| dy[i * n + j] as f64).sum())
            .collect();
        let mut db = out(n, 9.0);
        K.sum_rows(&buf(&dy), m, n, &mut db, false).unwrap();
        close(&lead(&db, n), &want, 1e-5, "sum_rows");
        let mut db = out(n, 2.0);
        K.sum_rows(&buf(&dy), m, n, &mut db, true).unwrap();
        let want2: Vec<f64> = want.iter().map(|v| v + 2.0).collect();
        close(&lead(&db, n), &want2, 1e-5, "sum_rows accumulate");
    }
}

#[test]
fn the_weight_gradient_is_reproducible_for_any_thread_count() {
    // many rows, few outputs: the rows are split into partial sums
    let (m, k, n) = (4000, 33, 2);
    let dy = rnd(m * n, 1);
    let x = rnd(m * k, 2);
    let run = || {
        let mut dw = K.alloc(n * k).unwrap();
        K.linear_wgrad(&buf(&dy), &buf(&x), m, k, n, &mut dw, false)
            .unwrap();
        dw.into_vec()
    };
    let a = run();
    assert_eq!(a, run(), "two runs on the same threads");
    let one = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    let three = rayon::ThreadPoolBuilder::new()
        .num_threads(3)
        .build()
        .unwrap();
    let b = one.install(run);
    let c = three.install(run);
    assert_eq!(c, three.install(run), "two runs on three threads");
    let naive: Vec<f64> = (0..n * k)
        .map(|e| {
            let (j, l) = (e / k, e % k);
            (0..m)
                .map(|i| dy[i * n + j] as f64 * x[i * k + l] as f64)
                .sum()
        })
        .collect();
    for v in [&a, &b, &c] {
        close(v, &naive, 1e-5, "linear_wgrad");
    }
}

// ---- transformer blocks ---------------------------------------------------------------

fn naive_ln(x: &[f64], g: &[f32], b: &[f32], d: usize, eps: f64) -> Vec<f64> {
    let mut y = vec![0f64; x.len()];
    for (yr, xr) in y.chunks_mut(d).zip(x.chunks(d)) {
        let mean = xr.iter().sum::<f64>() / d as f64;
        let var = xr.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / d as f64;
        for j in 0..d {
            yr[j] = (xr[j] - mean) / (var + eps).sqrt() * g[j] as f64 + b[j] as f64;
        }
    }
    y
}

#[test]
fn layer_norm_and_its_vjp_match_f64_and_finite_differences() {
    let (rows, d, eps) = (7, 13, 1e-6f32);
    let x = rnd(rows * d, 1);
    let g: Vec<f32> = rnd(d, 2).iter().map(|v| 1.0 + 0.3 * v).collect();
    let b = rnd(d, 3);
    let mut y = out(rows * d, 0.0);
    K.layer_norm(&buf(&x), &buf(&g), &buf(&b), rows, d, eps, &mut y)
        .unwrap();
    close(
        &lead(&y, rows * d),
        &naive_ln(&f64s(&x), &g, &b, d, eps as f64),
        1e-5,
        "layer_norm",
    );
    let dy = rnd(rows * d, 4);
    for acc in [false, true] {
        let mut dx = out(rows * d, if acc { 0.5 } else { 9.0 });
        K.layer_norm_vjp(&buf(&x), &buf(&g), &buf(&dy), rows, d, eps, &mut dx, acc)
            .unwrap();
        let dx = lead(&dx, rows * d);
        let f = |x: &[f64]| dot(&naive_ln(x, &g, &b, d, eps as f64), &dy);
        for i in (0..rows * d).step_by(5) {
            let want = fd(&f, &f64s(&x), i, 1e-4) + if acc { 0.5 } else { 0.0 };
            assert!(
                (dx[i] as f64 - want).abs() < 1e-4,
                "dx[{i}]: {} vs {want}",
                dx[i]
            );
        }
    }
}

#[test]
fn gelu_and_its_vjp_match_the_erf_gelu() {
    let n = 20_000;
    let x: Vec<f32> = rnd(n, 1).iter().map(|v| v * 6.0).collect();
    let gelu = |v: f64| 0.5 * v * (1.0 + libm::erf(v / std::f64::consts::SQRT_2));
    let mut y = out(n, 0.0);
    K.gelu(&buf(&x), n, &mut y).unwrap();
    let want: Vec<f64> = x.iter().map(|&v| gelu(v as f64)).collect();
    close(&lead(&y, n), &want, 1e-6, "gelu");
    let g0 = rnd(n, 2);
    let mut g = buf(&g0);
    K.gelu_vjp(&buf(&x), n, &mut g).unwrap();
    let want: Vec<f64> = x
        .iter()
        .zip(&g0)
        .map(|(&v, &g)| {
            let v = v as f64;
            let pdf = (-0.5 * v * v).exp() / (2.0 * std::f64::consts::PI).sqrt();
            g as f64 * (0.5 * (1.0 + libm::erf(v / std::f64::consts::SQRT_2)) + v * pdf)
        })
        .collect();
    close(&lead(&g, n), &want, 1e-5, "gelu_vjp");
}

fn naive_attention(qkv: &[f64], s: AttnShape) -> Vec<f64> {
    let (n, hd, d) = (s.tokens, s.head_dim, s.width());
    let mut out = vec![0f64; s.rows() * d];
    let at = |b: usize, t: usize, part: usize, h: usize, c: usize| {
        qkv[(b * n + t) * 3 * d + part * d + h * hd + c]
    };
    for b in 0..s.batch {
        for h in 0..s.heads {
            for i in 0..n {
                let sc: Vec<f64> = (0..n)
                    .map(|j| {
                        (0..hd)
                            .map(|c| at(b, i, 0, h, c) * at(b, j, 1, h, c))
                            .sum::<f64>()
                            / (hd as f64).sqrt()
                    })
                    .collect();
                let m = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = sc.iter().map(|v| (v - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for c in 0..hd {
                    out[(b * n + i) * d + h * hd + c] =
                        (0..n).map(|j| e[j] / z * at(b, j, 2, h, c)).sum();
                }
            }
        }
    }
    out
}

#[test]
fn attention_and_its_vjp_match_f64_and_finite_differences() {
    let s = AttnShape {
        batch: 2,
        tokens: 5,
        heads: 3,
        head_dim: 4,
    };
    let (nqkv, nout) = (3 * s.rows() * s.width(), s.rows() * s.width());
    let qkv: Vec<f32> = rnd(nqkv, 1).iter().map(|v| 2.0 * v).collect();
    let mut scratch = out(K.attention_scratch(s), 0.0);
    let mut o = out(nout, 9.0);
    K.attention(&buf(&qkv), s, &mut o, &mut scratch).unwrap();
    close(
        &lead(&o, nout),
        &naive_attention(&f64s(&qkv), s),
        1e-5,
        "attention",
    );
    let dout = rnd(nout, 2);
    let mut dqkv = out(nqkv, 9.0);
    K.attention_vjp(&buf(&qkv), &buf(&dout), s, &mut dqkv, &mut scratch)
        .unwrap();
    let dqkv = lead(&dqkv, nqkv);
    let f = |q: &[f64]| dot(&naive_attention(q, s), &dout);
    for i in (0..nqkv).step_by(7) {
        let want = fd(&f, &f64s(&qkv), i, 1e-5);
        assert!(
            (dqkv[i] as f64 - want).abs() < 1e-4,
            "dqkv[{i}]: {} vs {want}",
            dqkv[i]
        );
    }
}

/// With several samples per thread the attention kernels run one task per sample and write
/// straight into their outputs; that path gives each sample what it gets on its own (which
/// runs one task per head).
#[test]
fn attention_by_sample_matches_one_sample_at_a_time() {
    let batch = 2 * rayon::current_num_threads().max(1) + 1;
    let s = AttnShape {
        batch,
        tokens: 7,
        heads: 2,
        head_dim: 8,
    };
    let one = AttnShape { batch: 1, ..s };
    let (nqkv, nout) = (3 * s.rows() * s.width(), s.rows() * s.width());
    let (pq, po) = (nqkv / batch, nout / batch);
    let qkv = rnd(nqkv, 11);
    let dout = rnd(nout, 12);
    let mut scratch = out(K.attention_scratch(s), 0.0);
    let (mut o, mut dqkv) = (out(nout, 9.0), out(nqkv, 9.0));
    K.attention(&buf(&qkv), s, &mut o, &mut scratch).unwrap();
    K.attention_vjp(&buf(&qkv), &buf(&dout), s, &mut dqkv, &mut scratch)
        .unwrap();
    let (o, dqkv) = (lead(&o, nout), lead(&dqkv, nqkv));
    for b in 0..batch {
        let q1 = buf(&qkv[b * pq..][..pq]);
        let mut s1 = out(K.attention_scratch(one), 0.0);
        let (mut o1, mut d1) = (out(po, 9.0), out(pq, 9.0));
        K.attention(&q1, one, &mut o1, &mut s1).unwrap();
        K.attention_vjp(&q1, &buf(&dout[b * po..][..po]), one, &mut d1, &mut s1)
            .unwrap();
        close(&o[b * po..][..po], &f64s(&lead(&o1, po)), 1e-6, "attention");
        close(
            &dqkv[b * pq..][..pq],
            &f64s(&lead(&d1, pq)),
            1e-6,
            "attention_vjp",
        );
    }
}

#[test]
fn kept_attention_probabilities_give_the_same_values() {
    // one task per sample and head (batch 1) and one per sample (a batch of two per thread)
    for batch in [1, 2 * rayon::current_num_threads().max(1) + 1] {
        let s = AttnShape {
            batch,
            tokens: 7,
            heads: 3,
            head_dim: 4,
        };
        let (nqkv, nout) = (3 * s.rows() * s.width(), s.rows() * s.width());
        let np = CpuKernels::attention_probs_len(s);
        assert_eq!(np, batch * 3 * 7 * 7);
        let qkv = buf(&rnd(nqkv, 21).iter().map(|v| 2.0 * v).collect::<Vec<_>>());
        let dout = buf(&rnd(nout, 22));
        let mut scratch = out(K.attention_scratch(s), 0.0);
        let (mut o, mut dqkv) = (out(nout, 9.0), out(nqkv, 9.0));
        K.attention(&qkv, s, &mut o, &mut scratch).unwrap();
        K.attention_vjp(&qkv, &dout, s, &mut dqkv, &mut scratch)
            .unwrap();
        // the probabilities after 3 values of something else, sentinels after them
        let mut probs = out(3 + np, 9.0);
        let (mut ok, mut dk) = (out(nout, 7.0), out(nqkv, 7.0));
        K.attention_keeping(&qkv, s, &mut ok, &mut scratch, &mut probs, 3)
            .unwrap();
        assert_eq!(lead(&ok, nout), lead(&o, nout), "batch {batch}");
        let p = lead(&probs, 3 + np);
        assert_eq!(&p[..3], &[9.0; 3]);
        assert_eq!(probs[3 + np], SENTINEL);
        for row in p[3..].chunks(7) {
            let sum: f32 = row.iter().sum();
            assert!(
                (sum - 1.0).abs() < 1e-5,
                "a row of probabilities sums to {sum}"
            );
        }
        K.attention_vjp_kept(&qkv, &probs, 3, &dout, s, &mut dk, &mut scratch)
            .unwrap();
        assert_eq!(lead(&dk, nqkv), lead(&dqkv, nqkv), "batch {batch}");
        // a buffer too short for the probabilities is refused, naming it
        let mut short = out(np, 0.0);
        let e = K
            .attention_keeping(&qkv, s, &mut ok, &mut scratch, &mut short, 3 + PAD)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("attention_keeping") && e.contains("probs"),
            "{e}"
        );
        let e = K
            .attention_vjp_kept(&qkv, &short, 3 + PAD, &dout, s, &mut dk, &mut scratch)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("attention_vjp_kept") && e.contains("probs"),
            "{e}"
        );
    }
}

#[test]
fn residuals_scale_each_sample() {
    let (batch, per) = (3, 4);
    let x0 = rnd(batch * per, 1);
    let y = rnd(batch * per, 2);
    let sc = [0.0f32, 1.0, 2.5];
    for scales in [None, Some(&sc[..])] {
        let s = |b: usize| scales.map_or(1.0, |s| s[b]) as f64;
        let mut x = buf(&x0);
        K.add_scaled(&mut x, &buf(&y), batch, per, scales.map(buf).as_ref())
            .unwrap();
        let want: Vec<f64> = (0..batch * per)
            .map(|i| x0[i] as f64 + s(i / per) * y[i] as f64)
            .collect();
        close(&lead(&x, batch * per), &want, 1e-7, "add_scaled");
        let mut o = out(batch * per, 9.0);
        K.scaled(&buf(&y), batch, per, scales.map(buf).as_ref(), &mut o)
            .unwrap();
        let want: Vec<f64> = (0..batch * per).map(|i| s(i / per) * y[i] as f64).collect();
        close(&lead(&o, batch * per), &want, 1e-7, "scaled");
    }
}

#[test]
fn patch_embedding_layouts_match_a_conv() {
    let (batch, c, size, p, d) = (2, 3, 8, 4, 5);
    let g = size / p;
    let images = rnd(batch * c * size * size, 1);
    let w = rnd(d * c * p * p, 2);
    let bias = rnd(d, 3);
    let k = c * p * p;
    let mut cols = out(batch * g * g * k, 0.0);
    K.patchify(&buf(&images), batch, c, size, p, &mut cols)
        .unwrap();
    let mut patches = out(batch * g * g * d, 0.0);
    K.linear(
        &cols,
        &buf(&w),
        Some(&buf(&bias)),
        batch * g * g,
        k,
        d,
        &mut patches,
        false,
    )
    .unwrap();
    lead(&cols, batch * g * g * k);
    // the conv with stride = kernel = p, directly
    for b in 0..batch {
        for py in 0..g {
            for px in 0..g {
                for o in 0..d {
                    let mut acc = bias[o] as f64;
                    for ci in 0..c {
                        for y in 0..p {
                            for x in 0..p {
                                let iv =
                                    images[((b * c + ci) * size + py * p + y) * size + px * p + x];
                                acc += iv as f64 * w[((o * c + ci) * p + y) * p + x] as f64;
                            }
                        }
                    }
                    let got = patches[((b * g * g) + py * g + px) * d + o];
                    assert!((got as f64 - acc).abs() < 1e-5, "{got} vs {acc}");
                }
            }
        }
    }
    // tokens: class token and position embedding
    let prefix = 1;
    let cls = rnd(d, 4);
    let pos = rnd((prefix + g * g) * d, 5);
    let n = prefix + g * g;
    let mut x = out(batch * n * d, 9.0);
    K.assemble_tokens(
        &patches,
        &buf(&cls),
        &buf(&pos),
        batch,
        prefix,
        g * g,
        d,
        &mut x,
    )
    .unwrap();
    let x = lead(&x, batch * n * d);
    for b in 0..batch {
        for t in 0..n {
            for j in 0..d {
                let v = if t < prefix {
                    cls[t * d + j]
                } else {
                    patches[(b * g * g + t - prefix) * d + j]
                };
                assert_eq!(x[(b * n + t) * d + j], v + pos[t * d + j]);
            }
        }
    }
    let e = K
        .patchify(&buf(&images), batch, c, size, 3, &mut cols)
        .unwrap_err();
    assert!(e.to_string().contains("3-pixel patches"), "{e}");
}

// ---- side network, pooling, loss ------------------------------------------------------

#[test]
fn swish_and_its_vjp_match_f64_and_finite_differences() {
    let n = 300;
    let beta = 3.0f32;
    let z = rnd(n, 1);
    let sw = |v: f64| v / (1.0 + (-(beta as f64) * v).exp());
    let mut y = out(n, 9.0);
    K.swish(&buf(&z), n, beta, &mut y).unwrap();
    let want: Vec<f64> = z.iter().map(|&v| sw(v as f64)).collect();
    close(&lead(&y, n), &want, 1e-6, "swish");
    let dy = rnd(n, 2);
    for acc in [false, true] {
        let mut dz = out(n, if acc { 1.0 } else { 9.0 });
        K.swish_vjp(&buf(&z), &buf(&dy), n, beta, &mut dz, acc)
            .unwrap();
        let want: Vec<f64> = z
            .iter()
            .zip(&dy)
            .map(|(&v, &g)| {
                let v = v as f64;
                let d = (sw(v + 1e-6) - sw(v - 1e-6)) / 2e-6;
                g as f64 * d + if acc { 1.0 } else { 0.0 }
            })
            .collect();
        close(&lead(&dz, n), &want, 1e-5, "swish_vjp");
    }
}

/// Depthwise conv with PyTorch's `padding="same"` (before = (k - 1) / 2), in f64.
fn naive_conv(x: &[f64], w: &[f64], s: ConvShape) -> Vec<f64> {
    let (n, d, k) = (s.tokens(), s.width, s.kernel);
    let (gh, gw) = s.grid;
    let pad = (k as isize - 1) / 2;
    let mut y = x.to_vec();
    for b in 0..s.batch {
        for i in 0..gh {
            for j in 0..gw {
                for c in 0..d {
                    let mut acc = 0.0;
                    for di in 0..k {
                        for dj in 0..k {
                            let (si, sj) = (
                                i as isize + di as isize - pad,
                                j as isize + dj as isize - pad,
                            );
                            if si < 0 || sj < 0 || si >= gh as isize || sj >= gw as isize {
                                continue;
                            }
                            let t = s.prefix + si as usize * gw + sj as usize;
                            acc += x[(b * n + t) * d + c] * w[(c * k + di) * k + dj];
                        }
                    }
                    y[(b * n + s.prefix + i * gw + j) * d + c] = acc;
                }
            }
        }
    }
    y
}

#[test]
fn depthwise_conv_pads_like_pytorch_and_its_vjp_matches_finite_differences() {
    for k in [1, 3, 4, 5] {
        let s = ConvShape {
            batch: 2,
            prefix: 1,
            grid: (3, 4),
            width: 5,
            kernel: k,
        };
        let len = s.batch * s.tokens() * s.width;
        let x = rnd(len, 1);
        let w = rnd(s.weights(), 2);
        let mut y = out(len, 9.0);
        K.depthwise_conv(&buf(&x), &buf(&w), s, &mut y).unwrap();
        let want = naive_conv(&f64s(&x), &f64s(&w), s);
        close(
            &lead(&y, len),
            &want,
            1e-6,
            &format!("depthwise_conv k={k}"),
        );
        // prefix tokens pass through exactly
        for b in 0..s.batch {
            let at = b * s.tokens() * s.width;
            assert_eq!(y[at..at + s.width], x[at..at + s.width]);
        }
        let dy = rnd(len, 3);
        for acc in [false, true] {
            let mut dx = out(len, 9.0);
            let mut dw = out(s.weights(), if acc { 1.0 } else { 9.0 });
            K.depthwise_conv_vjp(&buf(&x), &buf(&w), &buf(&dy), s, &mut dx, &mut dw, acc)
                .unwrap();
            let (dx, dw) = (lead(&dx, len), lead(&dw, s.weights()));
            let fx = |xv: &[f64]| dot(&naive_conv(xv, &f64s(&w), s), &dy);
            for i in (0..len).step_by(3) {
                let want = fd(&fx, &f64s(&x), i, 1e-3);
                assert!(
                    (dx[i] as f64 - want).abs() < 1e-5,
                    "k={k} dx[{i}]: {} vs {want}",
                    dx[i]
                );
            }
            let fw = |wv: &[f64]| dot(&naive_conv(&f64s(&x), wv, s), &dy);
            for i in 0..s.weights() {
                let want = fd(&fw, &f64s(&w), i, 1e-3) + if acc { 1.0 } else { 0.0 };
                assert!(
                    (dw[i] as f64 - want).abs() < 1e-5,
                    "k={k} dw[{i}]: {} vs {want}",
                    dw[i]
                );
            }
        }
    }
}

#[test]
fn mean_pooling_and_its_vjp() {
    let (batch, n, d) = (2, 5, 3);
    let x = rnd(batch * n * d, 1);
    let mut m = out(batch * d, 9.0);
    K.mean_tokens(&buf(&x), batch, n, d, 1, n, &mut m).unwrap();
    let want: Vec<f64> = (0..batch * d)
        .map(|e| {
            let (b, j) = (e / d, e % d);
            (1..n).map(|t| x[(b * n + t) * d + j] as f64).sum::<f64>() / (n - 1) as f64
        })
        .collect();
    close(&lead(&m, batch * d), &want, 1e-6, "mean_tokens");
    let g = rnd(batch * d, 2);
    let mut dx = out(batch * n * d, 9.0);
    K.mean_tokens_vjp(&buf(&g), batch, n, d, 1, n, &mut dx)
        .unwrap();
    let dx = lead(&dx, batch * n * d);
    for b in 0..batch {
        for t in 0..n {
            for j in 0..d {
                let want = if t == 0 {
                    0.0
                } else {
                    g[b * d + j] / (n - 1) as f32
                };
                assert_eq!(dx[(b * n + t) * d + j], want);
            }
        }
    }
    let e = K
        .mean_tokens(&buf(&x), batch, n, d, 3, 3, &mut m)
        .unwrap_err();
    assert!(e.to_string().contains("3..3"), "{e}");
    assert!(K
        .mean_tokens_vjp(&buf(&g), batch, n, d, 0, n + 1, &mut m)
        .is_err());
}

#[test]
fn soft_cross_entropy_matches_f64_and_its_gradient_finite_differences() {
    let (batch, c) = (3, 4);
    let l: Vec<f32> = rnd(batch * c, 1).iter().map(|v| 3.0 * v).collect();
    let t: Vec<f32> = rnd(batch * c, 2).iter().map(|v| 0.5 * (v + 1.0)).collect();
    let f = |l: &[f64]| {
        let mut loss = 0.0;
        for (row, tr) in l.chunks(c).zip(t.chunks(c)) {
            let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = m + row.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
            loss -= row
                .iter()
                .zip(tr)
                .map(|(v, t)| *t as f64 * (v - lse))
                .sum::<f64>();
        }
        loss / batch as f64
    };
    let mut loss = out(1, 9.0);
    let mut grad = out(batch * c, 9.0);
    K.soft_cross_entropy(&buf(&l), &buf(&t), batch, c, &mut loss, &mut grad)
        .unwrap();
    close(&lead(&loss, 1), &[f(&f64s(&l))], 1e-6, "loss");
    let grad = lead(&grad, batch * c);
    for i in 0..batch * c {
        let want = fd(&f, &f64s(&l), i, 1e-5);
        assert!(
            (grad[i] as f64 - want).abs() < 1e-6,
            "grad[{i}]: {} vs {want}",
            grad[i]
        );
    }
}

#[test]
fn eval_stats_count_hits_losses_and_broken_rows() {
    let c = 6;
    let logits = [
        [0.0f32, 5.0, 1.0, 2.0, 3.0, 4.0],        // label 1: top-1
        [6.0, 5.0, 4.0, 3.0, 2.0, 1.0],           // label 4: 4 above, top-5 only
        [6.0, 5.0, 4.0, 3.0, 2.0, 1.0],           // label 5: 5 above, neither
        [0.0, 1.0, f32::INFINITY, 0.0, 0.0, 0.0], // label 0: not finite
        [0.0, 1.0, 2.0, 3.0, 4.0, 5.0],           // label 7: out of range
    ];
    let flat: Vec<f32> = logits.iter().flatten().copied().collect();
    let labels = [1.0f32, 4.0, 5.0, 0.0, 7.0];
    let mut stats = buf(&[1.0, 1.0, 0.5, 0.0]);
    K.eval_stats(&buf(&flat), &buf(&labels), 3, c, &mut stats)
        .unwrap();
    let ce = |row: &[f32], l: usize| {
        let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
        m + row.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln() - row[l] as f64
    };
    let s = lead(&stats, 4);
    assert_eq!((s[0], s[1], s[3]), (2.0, 3.0, 0.0));
    let want = 0.5 + ce(&logits[0], 1) + ce(&logits[1], 4) + ce(&logits[2], 5);
    assert!((s[2] as f64 - want).abs() < 1e-5, "{} vs {want}", s[2]);
    let mut stats = out(4, 0.0);
    K.eval_stats(&buf(&flat), &buf(&labels), 5, c, &mut stats)
        .unwrap();
    let s = lead(&stats, 4);
    assert_eq!(s[3], 1.0);
    assert!(!s[2].is_finite() && s[0] <= 3.0);
}

// ---- optimizer ------------------------------------------------------------------------

#[test]
fn sum_squares_accumulates_in_f64() {
    let n = 100_003;
    let x = rnd(n, 1);
    let mut acc = buf(&[2.0]);
    K.sum_squares(&buf(&x), n, &mut acc).unwrap();
    let want = 2.0 + x.iter().map(|&v| v as f64 * v as f64).sum::<f64>();
    assert_eq!(lead(&acc, 1)[0], want as f32);
}

/// The CPU runner's AdamW step on one value, term by term (f32, decay factor from f64).
fn reference_adamw(
    p: f32,
    g: f32,
    m: f32,
    v: f32,
    lr: f64,
    wd: f64,
    t: i32,
    coef: Option<f64>,
) -> (f32, f32, f32) {
    let (b1, b2, eps) = (0.9f64, 0.999f64, 1e-8f64);
    let g = match coef {
        Some(c) if c < 1.0 => g * c as f32,
        _ => g,
    };
    let (b1f, b2f) = (b1 as f32, b2 as f32);
    let m = m * b1f + g * (1.0 - b1f);
    let v = v * b2f + g * g * (1.0 - b2f);
    let step_size = (lr / (1.0 - b1.powi(t))) as f32;
    let bc2 = (1.0 - b2.powi(t)).sqrt() as f32;
    let denom = v.sqrt() / bc2 + eps as f32;
    let mut p = p;
    if wd != 0.0 {
        p *= (1.0 - (lr as f32) as f64 * (wd as f32) as f64) as f32;
    }
    (p - m * step_size / denom, m, v)
}

#[test]
fn adamw_is_the_runners_update_bit_for_bit() {
    let n = 40_000;
    let p0 = rnd(n, 1);
    let g = rnd(n, 2);
    for (wd, clip) in [
        (0.0, None),
        (0.05, None),
        (0.05, Some(0.5f32)),
        (0.0, Some(1e6f32)),
    ] {
        let (mut p, mut m, mut v) = (buf(&p0), out(n, 0.0), out(n, 0.0));
        let mut want: Vec<(f32, f32, f32)> = p0.iter().map(|&p| (p, 0.0, 0.0)).collect();
        let mut sq = out(1, 0.0);
        K.sum_squares(&buf(&g), n, &mut sq).unwrap();
        let coef = clip.map(|c| c as f64 / ((sq[0] as f64).sqrt() + 1e-6));
        for t in 1..=3 {
            let step = AdamwStep::new(1e-3, 0.9, 0.999, 1e-8, wd, t);
            let sqb = sq.clone();
            K.adamw(
                &mut p,
                &buf(&g),
                &mut m,
                &mut v,
                n,
                &step,
                clip.map(|c| (&sqb, c)),
            )
            .unwrap();
            for (w, &gi) in want.iter_mut().zip(&g) {
                *w = reference_adamw(w.0, gi, w.1, w.2, 1e-3, wd, t as i32, coef);
            }
        }
        let (p, m, v) = (lead(&p, n), lead(&m, n), lead(&v, n));
        for i in 0..n {
            assert_eq!(
                (p[i], m[i], v[i]),
                want[i],
                "value {i} wd {wd} clip {clip:?}"
            );
        }
    }
}

#[test]
fn clipping_scales_the_gradient_only_below_one() {
    let step = AdamwStep::new(1e-2, 0.9, 0.999, 1e-8, 0.0, 1);
    // |g| = 5, max norm 1: g -> g / 5; the first Adam step moves by lr whatever the scale,
    // so look at the moments
    let g = buf(&[3.0, 4.0]);
    let mut sq = out(1, 0.0);
    K.sum_squares(&g, 2, &mut sq).unwrap();
    let (mut p, mut m, mut v) = (out(2, 0.0), out(2, 0.0), out(2, 0.0));
    K.adamw(&mut p, &g, &mut m, &mut v, 2, &step, Some((&sq, 1.0)))
        .unwrap();
    let m = lead(&m, 2);
    assert!(
        (m[0] - 0.1 * 0.6).abs() < 1e-6 && (m[1] - 0.1 * 0.8).abs() < 1e-6,
        "{m:?}"
    );
    let (mut p, mut m, mut v) = (out(2, 0.0), out(2, 0.0), out(2, 0.0));
    K.adamw(&mut p, &g, &mut m, &mut v, 2, &step, Some((&sq, 10.0)))
        .unwrap();
    let one_b1 = 1.0f32 - 0.9f32;
    assert_eq!(lead(&m, 2), vec![3.0 * one_b1, 4.0 * one_b1]);
}

// ---- memory, lengths --------------------------------------------------------------------

#[test]
fn memory_operations_touch_only_their_prefix() {
    let mut a = out(3, 1.0);
    K.fill(&mut a, 3, 2.5).unwrap();
    assert_eq!(lead(&a, 3), vec![2.5; 3]);
    let mut b = out(3, 0.0);
    K.copy(&a, &mut b, 3).unwrap();
    K.add(&mut b, &a, 3).unwrap();
    assert_eq!(lead(&b, 3), vec![5.0; 3]);
    let mut c = out(4, 0.0);
    K.upload(&[1.0, 2.0], &mut c).unwrap();
    assert_eq!(K.download(&c, 3).unwrap(), vec![1.0, 2.0, 0.0]);
    assert_eq!(K.len(&c), 4 + PAD);
    assert_eq!(K.alloc(0).unwrap().len(), 0);
    let big = K.alloc(1 << 16).unwrap();
    assert!(big.iter().all(|&v| v == 0.0));
}

#[test]
fn short_buffers_are_errors_naming_the_buffer() {
    let b = |n: usize| CpuBuf::from_vec(vec![0.0; n]);
    let s = AttnShape {
        batch: 1,
        tokens: 2,
        heads: 1,
        head_dim: 2,
    };
    let cs = ConvShape {
        batch: 1,
        prefix: 1,
        grid: (2, 2),
        width: 2,
        kernel: 3,
    };
    err_names(K.copy(&b(2), &mut b(3), 3), "copy", "src");
    err_names(K.fill(&mut b(2), 3, 0.0), "fill", "dst");
    err_names(K.add(&mut b(3), &b(2), 3), "add", "x");
    err_names(K.upload(&[1.0; 3], &mut b(2)), "upload", "dst");
    err_names(K.download(&b(2), 3).map(|_| ()), "download", "src");
    err_names(
        K.linear(&b(6), &b(6), None, 2, 3, 2, &mut b(3), false),
        "linear",
        "y",
    );
    err_names(
        K.linear(&b(6), &b(6), Some(&b(1)), 2, 3, 2, &mut b(4), false),
        "linear",
        "bias",
    );
    err_names(
        K.linear_vjp(&b(4), &b(5), 2, 3, 2, &mut b(6), false),
        "linear_vjp",
        "w",
    );
    err_names(
        K.linear_wgrad(&b(4), &b(5), 2, 3, 2, &mut b(6), false),
        "linear_wgrad",
        "x",
    );
    err_names(K.sum_rows(&b(4), 2, 2, &mut b(1), false), "sum_rows", "db");
    err_names(
        K.layer_norm(&b(4), &b(1), &b(2), 2, 2, 1e-6, &mut b(4)),
        "layer_norm",
        "gamma",
    );
    err_names(
        K.layer_norm_vjp(&b(4), &b(2), &b(3), 2, 2, 1e-6, &mut b(4), false),
        "layer_norm_vjp",
        "dy",
    );
    err_names(K.gelu(&b(3), 4, &mut b(4)), "gelu", "x");
    err_names(K.gelu_vjp(&b(4), 4, &mut b(3)), "gelu_vjp", "g");
    err_names(
        K.attention(&b(11), s, &mut b(4), &mut b(12)),
        "attention",
        "qkv",
    );
    err_names(
        K.attention_vjp(&b(12), &b(4), s, &mut b(12), &mut b(3)),
        "attention_vjp",
        "scratch",
    );
    err_names(
        K.add_scaled(&mut b(4), &b(4), 2, 2, Some(&b(1))),
        "add_scaled",
        "scales",
    );
    err_names(K.scaled(&b(4), 2, 2, None, &mut b(3)), "scaled", "out");
    err_names(
        K.patchify(&b(10), 1, 1, 4, 2, &mut b(16)),
        "patchify",
        "images",
    );
    err_names(
        K.assemble_tokens(&b(4), &b(2), &b(5), 1, 1, 2, 2, &mut b(6)),
        "assemble_tokens",
        "pos",
    );
    err_names(K.swish(&b(3), 3, 1.0, &mut b(2)), "swish", "y");
    err_names(
        K.swish_vjp(&b(3), &b(2), 3, 1.0, &mut b(3), false),
        "swish_vjp",
        "dy",
    );
    err_names(
        K.depthwise_conv(&b(10), &b(17), cs, &mut b(10)),
        "depthwise_conv",
        "w",
    );
    err_names(
        K.depthwise_conv_vjp(&b(10), &b(18), &b(10), cs, &mut b(10), &mut b(17), false),
        "depthwise_conv_vjp",
        "dw",
    );
    err_names(
        K.mean_tokens(&b(5), 1, 3, 2, 1, 3, &mut b(2)),
        "mean_tokens",
        "x",
    );
    err_names(
        K.mean_tokens_vjp(&b(1), 1, 3, 2, 1, 3, &mut b(6)),
        "mean_tokens_vjp",
        "g",
    );
    err_names(
        K.soft_cross_entropy(&b(4), &b(4), 2, 2, &mut b(0), &mut b(4)),
        "soft_cross_entropy",
        "loss",
    );
    err_names(
        K.eval_stats(&b(4), &b(1), 2, 2, &mut b(4)),
        "eval_stats",
        "labels",
    );
    err_names(K.sum_squares(&b(4), 4, &mut b(0)), "sum_squares", "acc");
    let st = AdamwStep::new(1e-3, 0.9, 0.999, 1e-8, 0.0, 1);
    err_names(
        K.adamw(&mut b(4), &b(4), &mut b(4), &mut b(3), 4, &st, None),
        "adamw",
        "v",
    );
    err_names(
        K.adamw(
            &mut b(4),
            &b(4),
            &mut b(4),
            &mut b(4),
            4,
            &st,
            Some((&b(0), 1.0)),
        ),
        "adamw",
        "sq",
    );
    // sizes whose product overflows are errors too
    let e = K
        .linear(&b(1), &b(1), None, usize::MAX, 2, 1, &mut b(1), false)
        .unwrap_err();
    assert!(e.to_string().contains("overflow"), "{e}");
}
