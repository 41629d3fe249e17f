//! GPU tests of every safe function of `dtl-cuda` against host references (f64 where the
//! reference is computed here). They need a CUDA GPU: build them with
//! `cargo test -p dtl-tests --features cuda --no-run` and run them where a GPU is present
//! (scripts/gpu-check.sh packs and runs them).
#![cfg(feature = "cuda")]

use dtl_cuda::{Gpu, GpuVec, MatMul};

mod gpu_common;
use gpu_common::{gpu, rand_vec};

fn up(g: &Gpu, v: &[f32]) -> GpuVec {
    g.upload(v).unwrap()
}

fn down(g: &Gpu, v: &GpuVec) -> Vec<f32> {
    g.download(v).unwrap()
}

/// Largest absolute difference relative to the largest reference magnitude.
fn assert_close(got: &[f32], want: &[f64], tol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(0f64, |a, &b| a.max(b.abs())).max(1e-6);
    let err = got
        .iter()
        .zip(want)
        .map(|(&g, &w)| (g as f64 - w).abs())
        .fold(0f64, f64::max)
        / scale;
    assert!(err <= tol, "{what}: relative error {err:.3e} > {tol:.1e}");
}

fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

fn ln_ref(x: &[f32], gamma: &[f32], beta: &[f32], d: usize, eps: f64) -> Vec<f64> {
    let mut out = Vec::with_capacity(x.len());
    for r in x.chunks(d) {
        let m = r.iter().map(|&v| v as f64).sum::<f64>() / d as f64;
        let var = r.iter().map(|&v| (v as f64 - m).powi(2)).sum::<f64>() / d as f64;
        let rs = 1.0 / (var + eps).sqrt();
        for (i, &v) in r.iter().enumerate() {
            out.push((v as f64 - m) * rs * gamma[i] as f64 + beta[i] as f64);
        }
    }
    out
}

fn ln_vjp_ref(x: &[f32], gamma: &[f32], gy: &[f32], d: usize, eps: f64) -> Vec<f64> {
    let mut out = Vec::with_capacity(x.len());
    for (r, g) in x.chunks(d).zip(gy.chunks(d)) {
        let m = r.iter().map(|&v| v as f64).sum::<f64>() / d as f64;
        let var = r.iter().map(|&v| (v as f64 - m).powi(2)).sum::<f64>() / d as f64;
        let rs = 1.0 / (var + eps).sqrt();
        let xh: Vec<f64> = r.iter().map(|&v| (v as f64 - m) * rs).collect();
        let gg: Vec<f64> = (0..d).map(|i| g[i] as f64 * gamma[i] as f64).collect();
        let a = gg.iter().sum::<f64>() / d as f64;
        let c = gg.iter().zip(&xh).map(|(p, q)| p * q).sum::<f64>() / d as f64;
        for i in 0..d {
            out.push(rs * (gg[i] - a - xh[i] * c));
        }
    }
    out
}

#[test]
fn buffers_round_trip_and_copy() {
    let g = gpu();
    let host = rand_vec(1000, 1);
    let a = up(&g, &host);
    assert_eq!(a.len(), 1000);
    assert_eq!(down(&g, &a), host);
    let mut b = g.zeros(1000).unwrap();
    assert!(down(&g, &b).iter().all(|&v| v == 0.0));
    g.copy(&a, &mut b).unwrap();
    assert_eq!(down(&g, &b), host);
    let c = g.duplicate(&a).unwrap();
    assert_eq!(down(&g, &c), host);
    let other = rand_vec(1000, 2);
    g.upload_into(&other, &mut b).unwrap();
    assert_eq!(down(&g, &b), other);
    assert_eq!(down(&g, &a), host, "the copies are independent");
    assert!(g.upload_into(&other[..10], &mut b).is_err());
    let mut short = g.zeros(10).unwrap();
    assert!(g.copy(&a, &mut short).is_err());
    let (free, total) = g.memory_info().unwrap();
    assert!(free > 0 && free <= total);
    g.synchronize().unwrap();
}

#[test]
fn layer_norm_matches_reference_for_narrow_and_wide_rows() {
    let g = gpu();
    for (rows, d, seed) in [(5usize, 48usize, 3u64), (7, 300, 4), (3, 768, 5)] {
        let x: Vec<f32> = rand_vec(rows * d, seed)
            .iter()
            .map(|v| v * 3.0 + 0.5)
            .collect();
        let gamma: Vec<f32> = rand_vec(d, seed + 10)
            .iter()
            .map(|v| 1.0 + 0.3 * v)
            .collect();
        let beta = rand_vec(d, seed + 20);
        let mut y = g.zeros(rows * d).unwrap();
        g.layer_norm(
            &up(&g, &x),
            &up(&g, &gamma),
            &up(&g, &beta),
            d,
            1e-6,
            &mut y,
        )
        .unwrap();
        assert_close(
            &down(&g, &y),
            &ln_ref(&x, &gamma, &beta, d, 1e-6),
            1e-5,
            "layer_norm",
        );
    }
}

#[test]
fn layer_norm_vjp_matches_reference_and_finite_differences() {
    let g = gpu();
    let (rows, d, eps) = (6usize, 300usize, 1e-6);
    let x: Vec<f32> = rand_vec(rows * d, 31).iter().map(|v| v * 2.0).collect();
    let gamma: Vec<f32> = rand_vec(d, 32).iter().map(|v| 1.0 + 0.3 * v).collect();
    let beta = rand_vec(d, 33);
    let gy = rand_vec(rows * d, 34);
    let want = ln_vjp_ref(&x, &gamma, &gy, d, eps);

    // the reference itself against central differences of the forward
    let v = rand_vec(rows * d, 35);
    let h = 1e-3f32;
    let xp: Vec<f32> = x.iter().zip(&v).map(|(a, b)| a + h * b).collect();
    let xm: Vec<f32> = x.iter().zip(&v).map(|(a, b)| a - h * b).collect();
    let (yp, ym) = (
        ln_ref(&xp, &gamma, &beta, d, eps),
        ln_ref(&xm, &gamma, &beta, d, eps),
    );
    let fd: f64 = (0..rows * d)
        .map(|i| gy[i] as f64 * (yp[i] - ym[i]) / (2.0 * h as f64))
        .sum();
    let an: f64 = want.iter().zip(&v).map(|(a, &b)| a * b as f64).sum();
    assert!(
        (fd - an).abs() <= 1e-3 * an.abs().max(1.0),
        "reference VJP: {an} vs {fd}"
    );

    let (xg, gg, gyg) = (up(&g, &x), up(&g, &gamma), up(&g, &gy));
    let mut gx = g.zeros(rows * d).unwrap();
    g.layer_norm_vjp(&xg, &gg, &gyg, d, eps as f32, &mut gx, false)
        .unwrap();
    assert_close(&down(&g, &gx), &want, 1e-4, "layer_norm_vjp");
    // accumulate adds onto what is there
    let base = rand_vec(rows * d, 36);
    let mut acc = up(&g, &base);
    g.layer_norm_vjp(&xg, &gg, &gyg, d, eps as f32, &mut acc, true)
        .unwrap();
    let want_acc: Vec<f64> = want.iter().zip(&base).map(|(a, &b)| a + b as f64).collect();
    assert_close(
        &down(&g, &acc),
        &want_acc,
        1e-4,
        "layer_norm_vjp accumulate",
    );
}

#[test]
fn gelu_forward_fused_bias_and_vjp_match_the_erf_gelu() {
    let g = gpu();
    let (rows, d) = (9usize, 70usize);
    let x: Vec<f32> = rand_vec(rows * d, 41).iter().map(|v| v * 4.0).collect();
    let bias = rand_vec(d, 42);
    let gy = rand_vec(rows * d, 43);
    let xg = up(&g, &x);
    let mut y = g.zeros(rows * d).unwrap();
    g.gelu(&xg, &mut y).unwrap();
    let want: Vec<f64> = x
        .iter()
        .map(|&v| dtl_vit::kernels::gelu_scalar(v) as f64)
        .collect();
    assert_close(&down(&g, &y), &want, 1e-5, "gelu");

    let mut u = up(&g, &x);
    let mut act = g.zeros(rows * d).unwrap();
    g.bias_gelu(&mut u, &up(&g, &bias), d, &mut act).unwrap();
    let pre: Vec<f32> = x
        .iter()
        .enumerate()
        .map(|(i, &v)| v + bias[i % d])
        .collect();
    assert_close(
        &down(&g, &u),
        &f64s(&pre),
        1e-6,
        "bias_gelu keeps the pre-activation",
    );
    let want: Vec<f64> = pre
        .iter()
        .map(|&v| dtl_vit::kernels::gelu_scalar(v) as f64)
        .collect();
    assert_close(&down(&g, &act), &want, 1e-5, "bias_gelu");

    let mut gx = g.zeros(rows * d).unwrap();
    g.gelu_vjp(&xg, &up(&g, &gy), &mut gx).unwrap();
    let want: Vec<f64> = x
        .iter()
        .zip(&gy)
        .map(|(&v, &d)| (d * dtl_vit::kernels::gelu_grad_scalar(v)) as f64)
        .collect();
    assert_close(&down(&g, &gx), &want, 1e-5, "gelu_vjp");
}

#[test]
fn bias_add_adds_per_column() {
    let g = gpu();
    let (rows, d) = (4usize, 33usize);
    let y0 = rand_vec(rows * d, 51);
    let bias = rand_vec(d, 52);
    let mut y = up(&g, &y0);
    g.bias_add(&mut y, &up(&g, &bias), d).unwrap();
    let want: Vec<f64> = y0
        .iter()
        .enumerate()
        .map(|(i, &v)| (v + bias[i % d]) as f64)
        .collect();
    assert_close(&down(&g, &y), &want, 1e-6, "bias_add");
    assert!(g.bias_add(&mut y, &up(&g, &bias[..5]), d).is_err());
}

#[test]
fn softmax_rows_and_vjp_match_reference() {
    let g = gpu();
    let (rows, n, scale) = (7usize, 197usize, 0.125f32);
    let s: Vec<f32> = rand_vec(rows * n, 61).iter().map(|v| v * 20.0).collect();
    let gp = rand_vec(rows * n, 62);
    let mut p_ref = Vec::new();
    for r in s.chunks(n) {
        let m = r
            .iter()
            .map(|&v| scale as f64 * v as f64)
            .fold(f64::MIN, f64::max);
        let e: Vec<f64> = r
            .iter()
            .map(|&v| (scale as f64 * v as f64 - m).exp())
            .collect();
        let z: f64 = e.iter().sum();
        p_ref.extend(e.iter().map(|v| v / z));
    }
    let mut p = up(&g, &s);
    g.softmax_rows(&mut p, n, scale).unwrap();
    let p_host = down(&g, &p);
    assert_close(&p_host, &p_ref, 1e-5, "softmax_rows");
    for r in p_host.chunks(n) {
        assert!((r.iter().sum::<f32>() - 1.0).abs() < 1e-5);
    }
    let mut want = Vec::new();
    for (pr, gr) in p_ref.chunks(n).zip(gp.chunks(n)) {
        let dot: f64 = pr.iter().zip(gr).map(|(a, &b)| a * b as f64).sum();
        want.extend(
            pr.iter()
                .zip(gr)
                .map(|(a, &b)| scale as f64 * a * (b as f64 - dot)),
        );
    }
    let mut gs = up(&g, &gp);
    g.softmax_rows_vjp(&p, &mut gs, n, scale).unwrap();
    assert_close(&down(&g, &gs), &want, 1e-4, "softmax_rows_vjp");
}

#[test]
fn residual_and_sample_scales_follow_the_per_sample_factors() {
    let g = gpu();
    let (batch, per) = (4usize, 50usize);
    let x = rand_vec(batch * per, 71);
    let br = rand_vec(batch * per, 72);
    let scales = [0.0f32, 1.25, 1.0, 2.0];
    let (xg, bg, sg) = (up(&g, &x), up(&g, &br), up(&g, &scales));
    let mut out = g.zeros(batch * per).unwrap();
    g.residual(&xg, &bg, &sg, &mut out).unwrap();
    let want: Vec<f64> = (0..batch * per)
        .map(|i| (x[i] + scales[i / per] * br[i]) as f64)
        .collect();
    assert_close(&down(&g, &out), &want, 1e-6, "residual");
    g.scale_samples(&bg, &sg, &mut out).unwrap();
    let want: Vec<f64> = (0..batch * per)
        .map(|i| (scales[i / per] * br[i]) as f64)
        .collect();
    assert_close(&down(&g, &out), &want, 1e-6, "scale_samples");
    let three = up(&g, &scales[..3]);
    assert!(
        g.residual(&xg, &bg, &three, &mut out).is_err(),
        "200 values over 3 samples"
    );
}

#[test]
fn split_and_merge_heads_are_inverse_permutations() {
    let g = gpu();
    let (b, n, h, hd) = (2usize, 5usize, 3usize, 4usize);
    let d = h * hd;
    let qkv = rand_vec(b * n * 3 * d, 81);
    let src = up(&g, &qkv);
    let mut parts = Vec::new();
    for part in 0..3 {
        let mut dst = g.zeros(b * h * n * hd).unwrap();
        g.split_heads(&src, &mut dst, b, n, h, hd, 3 * d, part * d)
            .unwrap();
        let got = down(&g, &dst);
        for s in 0..b {
            for head in 0..h {
                for t in 0..n {
                    for e in 0..hd {
                        let want = qkv[(s * n + t) * 3 * d + part * d + head * hd + e];
                        assert_eq!(got[((s * h + head) * n + t) * hd + e], want);
                    }
                }
            }
        }
        parts.push(dst);
    }
    let mut back = g.zeros(b * n * 3 * d).unwrap();
    for (part, p) in parts.iter().enumerate() {
        g.merge_heads(p, &mut back, b, n, h, hd, 3 * d, part * d)
            .unwrap();
    }
    assert_eq!(down(&g, &back), qkv);
    let mut dst = g.zeros(b * h * n * hd).unwrap();
    assert!(g
        .split_heads(&src, &mut dst, b, n, h, hd, 3 * d, 3 * d)
        .is_err());
}

#[test]
fn patchify_and_token_assembly_match_reference() {
    let g = gpu();
    let (b, c, img, p, d, prefix) = (2usize, 3usize, 8usize, 4usize, 5usize, 1usize);
    let gw = img / p;
    let npatch = gw * gw;
    let images = rand_vec(b * c * img * img, 91);
    let mut cols = g.zeros(b * npatch * c * p * p).unwrap();
    g.patchify(&up(&g, &images), &mut cols, b, c, img, img, p)
        .unwrap();
    let got = down(&g, &cols);
    let k = c * p * p;
    for s in 0..b {
        for py in 0..gw {
            for px in 0..gw {
                for ch in 0..c {
                    for y in 0..p {
                        for x in 0..p {
                            let want = images[((s * c + ch) * img + py * p + y) * img + px * p + x];
                            let row = s * npatch + py * gw + px;
                            assert_eq!(got[row * k + (ch * p + y) * p + x], want);
                        }
                    }
                }
            }
        }
    }
    let patches = rand_vec(b * npatch * d, 92);
    let bias = rand_vec(d, 93);
    let cls = rand_vec(prefix * d, 94);
    let pos = rand_vec((prefix + npatch) * d, 95);
    let tokens = prefix + npatch;
    let mut out = g.zeros(b * tokens * d).unwrap();
    g.assemble_tokens(
        &up(&g, &patches),
        &up(&g, &bias),
        &up(&g, &cls),
        &up(&g, &pos),
        &mut out,
        b,
        npatch,
        prefix,
        d,
    )
    .unwrap();
    let mut want = Vec::new();
    for s in 0..b {
        for t in 0..tokens {
            for j in 0..d {
                let v = if t < prefix {
                    cls[t * d + j]
                } else {
                    patches[(s * npatch + t - prefix) * d + j] + bias[j]
                };
                want.push((v + pos[t * d + j]) as f64);
            }
        }
    }
    assert_close(&down(&g, &out), &want, 1e-6, "assemble_tokens");
    let mut small = g.zeros(3).unwrap();
    assert!(g
        .patchify(&up(&g, &images), &mut small, b, c, img, img, 3)
        .is_err());
}

fn matmul_ref(mm: &MatMul, a: &[f32], b: &[f32], c0: &[f32]) -> Vec<f64> {
    let mut c = f64s(c0);
    for bi in 0..mm.batch {
        for i in 0..mm.m {
            for j in 0..mm.n {
                let mut s = 0f64;
                for l in 0..mm.k {
                    let av = if mm.trans_a {
                        a[bi * mm.stride_a + l * mm.m + i]
                    } else {
                        a[bi * mm.stride_a + i * mm.k + l]
                    };
                    let bv = if mm.trans_b {
                        b[bi * mm.stride_b + j * mm.k + l]
                    } else {
                        b[bi * mm.stride_b + l * mm.n + j]
                    };
                    s += av as f64 * bv as f64;
                }
                let idx = bi * mm.stride_c + i * mm.n + j;
                c[idx] = mm.alpha as f64 * s + mm.beta as f64 * c[idx];
            }
        }
    }
    c
}

#[test]
fn matmul_handles_every_transpose_batches_alpha_and_beta() {
    let g = gpu();
    let (m, n, k, batch) = (7usize, 5usize, 9usize, 3usize);
    for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
        for bsz in [1usize, batch] {
            let mut mm = MatMul::new(m, n, k).batched(bsz).alpha(0.5).beta(2.0);
            mm.trans_a = ta;
            mm.trans_b = tb;
            let a = rand_vec(bsz * m * k, 101);
            let b = rand_vec(bsz * k * n, 102);
            let c0 = rand_vec(bsz * m * n, 103);
            let mut c = up(&g, &c0);
            g.matmul(&mm, &up(&g, &a), &up(&g, &b), &mut c).unwrap();
            assert_close(
                &down(&g, &c),
                &matmul_ref(&mm, &a, &b, &c0),
                1e-5,
                &format!("matmul ta={ta} tb={tb} batch={bsz}"),
            );
        }
    }
    let mm = MatMul::new(m, n, k).batched(batch);
    let short = g.zeros(m * k).unwrap();
    let mut c = g.zeros(batch * m * n).unwrap();
    let e = g
        .matmul(&mm, &short, &up(&g, &rand_vec(batch * k * n, 1)), &mut c)
        .unwrap_err()
        .to_string();
    assert!(e.contains("matmul") && e.contains("`a`"), "{e}");
}

#[test]
fn linear_and_its_input_vjp_match_reference() {
    let g = gpu();
    let (rows, inp, out) = (6usize, 40usize, 24usize);
    let x = rand_vec(rows * inp, 111);
    let w = rand_vec(out * inp, 112);
    let bias = rand_vec(out, 113);
    let gy = rand_vec(rows * out, 114);
    let mut y = g.zeros(rows * out).unwrap();
    g.linear(
        &up(&g, &x),
        &up(&g, &w),
        Some(&up(&g, &bias)),
        inp,
        out,
        &mut y,
    )
    .unwrap();
    let mut want = vec![0f64; rows * out];
    for r in 0..rows {
        for o in 0..out {
            want[r * out + o] = bias[o] as f64
                + (0..inp)
                    .map(|i| x[r * inp + i] as f64 * w[o * inp + i] as f64)
                    .sum::<f64>();
        }
    }
    assert_close(&down(&g, &y), &want, 1e-5, "linear");
    let base = rand_vec(rows * inp, 115);
    for accumulate in [false, true] {
        let mut gx = up(&g, &base);
        g.linear_vjp(&up(&g, &gy), &up(&g, &w), inp, out, &mut gx, accumulate)
            .unwrap();
        let mut want = vec![0f64; rows * inp];
        for r in 0..rows {
            for i in 0..inp {
                want[r * inp + i] = (0..out)
                    .map(|o| gy[r * out + o] as f64 * w[o * inp + i] as f64)
                    .sum::<f64>()
                    + if accumulate {
                        base[r * inp + i] as f64
                    } else {
                        0.0
                    };
            }
        }
        assert_close(&down(&g, &gx), &want, 1e-5, "linear_vjp");
    }
    let e = g
        .linear(
            &up(&g, &x[..rows * inp - 1]),
            &up(&g, &w),
            None,
            inp,
            out,
            &mut y,
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("linear") && e.contains("width 40"), "{e}");
}

#[test]
fn a_missing_device_ordinal_is_a_clear_error() {
    let n = Gpu::count().unwrap();
    assert!(n >= 1);
    let e = Gpu::new(n + 3).unwrap_err().to_string();
    assert!(
        e.contains(&format!("cuda:{}", n + 3)) && e.contains("present"),
        "{e}"
    );
    assert!(dtl_cuda::check_device(0).is_ok());
    assert!(dtl_cuda::check_device(n).is_err());
}
