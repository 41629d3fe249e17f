//! The input-only block VJP against central finite differences and against dfdx's own
//! autodiff of the same block written with dfdx ops (in f64), on the fixture geometry.

mod common;

use std::sync::Arc;

use common::{noise, reference};
use dfdx::prelude::*;
use dtl_core::{Backbone, DropPath};
use dtl_vit::variants::VitTestPatch8_32;
use dtl_vit::{BlockWeights, VitOf};

const N: usize = 17;
const D: usize = 48;
const HEADS: usize = 3;
const BATCH: usize = 2;

fn vit() -> VitOf<VitTestPatch8_32> {
    dtl_vit::load::<VitTestPatch8_32>(&reference("dtl_vit.safetensors"), "auto").unwrap()
}

/// Realistic block inputs: the fixture's images embedded and passed through `upto` blocks.
fn block_input(v: &VitOf<VitTestPatch8_32>, block: usize) -> Vec<f32> {
    let imgs = noise(BATCH * 3 * 32 * 32, 7);
    let mut x = v.embed_flat(&imgs, BATCH).unwrap();
    for i in 0..block {
        x = v.block_forward_flat(i, &x, BATCH, None).unwrap();
    }
    x
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum()
}

fn drop_path() -> DropPath {
    DropPath {
        attn: vec![0.0, 1.25],
        mlp: vec![1.25, 0.0],
    }
}

#[test]
fn block_vjp_matches_finite_differences() {
    let v = vit();
    for block in 0..4 {
        for drop in [None, Some(drop_path())] {
            let x = block_input(&v, block);
            let g = noise(x.len(), 100 + block as u64);
            let gx = v
                .block_vjp_flat(block, &x, &g, BATCH, drop.as_ref())
                .unwrap();
            let s = |x: &[f32]| {
                dot(
                    &v.block_forward_flat(block, x, BATCH, drop.as_ref())
                        .unwrap(),
                    &g,
                )
            };
            // random directions
            for seed in 0..3 {
                let dir = noise(x.len(), 1000 + seed);
                let h = 1e-2f32;
                let xp: Vec<f32> = x.iter().zip(&dir).map(|(a, d)| a + h * d).collect();
                let xm: Vec<f32> = x.iter().zip(&dir).map(|(a, d)| a - h * d).collect();
                let fd = (s(&xp) - s(&xm)) / (2.0 * h as f64);
                let an = dot(&gx, &dir);
                assert!(
                    (fd - an).abs() <= 2e-3 * an.abs().max(1.0),
                    "block {block} drop {:?} direction {seed}: finite differences {fd}, VJP {an}",
                    drop.is_some()
                );
            }
            // single coordinates, including a class-token entry
            for &i in &[0usize, 5, D + 3, N * D + 7, x.len() - 1] {
                let h = 1e-2f32;
                let mut xp = x.clone();
                xp[i] += h;
                let mut xm = x.clone();
                xm[i] -= h;
                let fd = (s(&xp) - s(&xm)) / (2.0 * h as f64);
                assert!(
                    (fd - gx[i] as f64).abs() <= 2e-3 * (gx[i] as f64).abs().max(1.0),
                    "block {block} coordinate {i}: finite differences {fd}, VJP {}",
                    gx[i]
                );
            }
        }
    }
}

type T2 = Tensor<(usize, usize), f64, Cpu, OwnedTape<f64, Cpu>>;

fn c64(dev: &Cpu, v: &[f32], rows: usize, cols: usize) -> Tensor<(usize, usize), f64, Cpu> {
    dev.tensor_from_vec(v.iter().map(|x| *x as f64).collect(), (rows, cols))
}

/// A vector repeated on every row.
fn rows64(dev: &Cpu, v: &[f32], rows: usize) -> Tensor<(usize, usize), f64, Cpu> {
    let cols = v.len();
    let mut out = Vec::with_capacity(rows * cols);
    for _ in 0..rows {
        out.extend(v.iter().map(|x| *x as f64));
    }
    dev.tensor_from_vec(out, (rows, cols))
}

/// (out, in) -> the (in, out) right operand of a matmul.
fn wt(dev: &Cpu, w: &[f32], out: usize, inp: usize) -> Tensor<(usize, usize), f64, Cpu> {
    let mut t = vec![0.0f64; w.len()];
    for o in 0..out {
        for i in 0..inp {
            t[i * out + o] = w[o * inp + i] as f64;
        }
    }
    dev.tensor_from_vec(t, (inp, out))
}

/// Per-row drop-path scales as a (rows, D) constant.
fn scale_rows(dev: &Cpu, s: &[f32]) -> Tensor<(usize, usize), f64, Cpu> {
    let mut v = Vec::new();
    for &si in s {
        v.extend(std::iter::repeat(si as f64).take(N * D));
    }
    dev.tensor_from_vec(v, (s.len() * N, D))
}

fn layer_norm(dev: &Cpu, x: T2, w: &[f32], b: &[f32], rows: usize) -> T2 {
    x.normalize::<Axis<1>>(1e-6) * rows64(dev, w, rows) + rows64(dev, b, rows)
}

fn linear(dev: &Cpu, x: T2, w: &[f32], b: &[f32], out: usize, inp: usize, rows: usize) -> T2 {
    x.matmul(wt(dev, w, out, inp)) + rows64(dev, b, rows)
}

/// The erf GELU as a tape op with its analytic derivative `Phi(x) + x phi(x)`.
///
/// dfdx 0.13's `accurate_gelu` cannot serve as the reference: its backward omits the
/// `1/sqrt 2` factor of the inner derivative (it uses `x * 2/sqrt(pi) * exp(-x^2/2) / 2`
/// instead of `x * exp(-x^2/2) / sqrt(2 pi)`), so its gradients are wrong.
fn gelu_ref(u: T2) -> T2 {
    let (u, mut tape) = u.split_tape();
    let vals = u.as_vec();
    let f = |x: f64| 0.5 * x * (1.0 + libm::erf(x / std::f64::consts::SQRT_2));
    let df = |x: f64| {
        0.5 * (1.0 + libm::erf(x / std::f64::consts::SQRT_2))
            + x * (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt()
    };
    let y = u
        .device()
        .tensor_from_vec(vals.iter().map(|&x| f(x)).collect(), *u.shape());
    let (ug, yg) = (u.ghost(), y.ghost());
    tape.add_backward_op(move |grads| {
        grads.try_alloc_for(&yg)?;
        let gy = grads.get(&yg).as_vec();
        let gu = grads.get_or_alloc_mut(&ug)?;
        for ((a, b), &x) in gu.iter_mut().zip(&gy).zip(&vals) {
            *a += b * df(x);
        }
        Ok(())
    });
    y.put_tape(tape)
}

/// timm's block written with dfdx ops.
fn dfdx_block(dev: &Cpu, blk: &BlockWeights, x: T2, drop: Option<&DropPath>) -> T2 {
    let rows = BATCH * N;
    let hd = D / HEADS;
    let x_res = x.retaped::<OwnedTape<f64, Cpu>>();
    let h = layer_norm(dev, x, &blk.norm1_w, &blk.norm1_b, rows);
    let h_k = h.retaped::<OwnedTape<f64, Cpu>>();
    let h_v = h.retaped::<OwnedTape<f64, Cpu>>();
    let part = |t: T2, i: usize| {
        let w = &blk.qkv_w[i * D * D..(i + 1) * D * D];
        let b = &blk.qkv_b[i * D..(i + 1) * D];
        linear(dev, t, w, b, D, D, rows)
            .reshape_like(&(BATCH, N, HEADS, hd))
            .permute::<_, Axes4<0, 2, 1, 3>>()
    };
    let q = part(h, 0);
    let k = part(h_k, 1);
    let v = part(h_v, 2);
    let scores = q.matmul(k.permute::<_, Axes4<0, 1, 3, 2>>()) * (1.0 / (hd as f64).sqrt());
    let p = scores.softmax::<Axis<3>>();
    let o = p
        .matmul(v)
        .permute::<_, Axes4<0, 2, 1, 3>>()
        .reshape_like(&(rows, D));
    let mut a = linear(dev, o, &blk.proj_w, &blk.proj_b, D, D, rows);
    if let Some(d) = drop {
        a = a * scale_rows(dev, &d.attn);
    }
    let x1 = a + x_res;
    let x1_res = x1.retaped::<OwnedTape<f64, Cpu>>();
    let h2 = layer_norm(dev, x1, &blk.norm2_w, &blk.norm2_b, rows);
    let u = gelu_ref(linear(dev, h2, &blk.fc1_w, &blk.fc1_b, 4 * D, D, rows));
    let mut m = linear(dev, u, &blk.fc2_w, &blk.fc2_b, D, 4 * D, rows);
    if let Some(d) = drop {
        m = m * scale_rows(dev, &d.mlp);
    }
    m + x1_res
}

#[test]
fn block_forward_and_vjp_match_dfdx_autodiff() {
    let v = vit();
    let dev = Cpu::default();
    for block in 0..4 {
        for drop in [None, Some(drop_path())] {
            let x = block_input(&v, block);
            let g = noise(x.len(), 200 + block as u64);
            let x64 = c64(&dev, &x, BATCH * N, D);
            let y = dfdx_block(
                &dev,
                &v.weights().blocks[block],
                x64.clone().leaky_traced(),
                drop.as_ref(),
            );
            let ours = v
                .block_forward_flat(block, &x, BATCH, drop.as_ref())
                .unwrap();
            let y_ref = y.retaped::<NoneTape>().as_vec();
            let ferr = common::max_rel_err(&ours, &y_ref);
            assert!(
                ferr < 1e-5,
                "block {block}: forward max relative error {ferr:e}"
            );
            let loss = (y * c64(&dev, &g, BATCH * N, D)).sum();
            let grads = loss.backward();
            let want = grads.get(&x64).as_vec();
            let got = v
                .block_vjp_flat(block, &x, &g, BATCH, drop.as_ref())
                .unwrap();
            let err = common::max_rel_err(&got, &want);
            assert!(
                err < 1e-4,
                "block {block} drop {:?}: VJP max relative error {err:e}",
                drop.is_some()
            );
        }
    }
}

#[test]
fn final_norm_vjp_matches_dfdx_autodiff() {
    let v = vit();
    let dev = Cpu::default();
    let rows = 5;
    let x = noise(rows * D, 3)
        .iter()
        .map(|a| a * 0.02 + 0.5)
        .collect::<Vec<_>>();
    let g = noise(rows * D, 4);
    let x64 = c64(&dev, &x, rows, D);
    let w = v.weights();
    let y = layer_norm(&dev, x64.clone().leaky_traced(), &w.norm_w, &w.norm_b, rows);
    let loss = (y * c64(&dev, &g, rows, D)).sum();
    let want = loss.backward().get(&x64).as_vec();
    let got = v.norm_vjp_flat(&x, &g).unwrap();
    assert!(common::max_rel_err(&got, &want) < 1e-5);
}

#[test]
fn frozen_blocks_on_the_tape_backpropagate_through_the_vjp() {
    // Two frozen blocks as custom tape ops: dfdx's backward must equal VJP_0(VJP_1(g)).
    let v = Arc::new(vit());
    let dev = Cpu::default();
    let x = block_input(&v, 0);
    let g = noise(x.len(), 9);
    let xt = dev.tensor_from_vec(x.clone(), (BATCH, Const::<N>, Const::<D>));
    let gt = dev.tensor_from_vec(g.clone(), (BATCH, Const::<N>, Const::<D>));
    let drop = Arc::new(drop_path());
    let y0 = dtl_core::frozen_block(&v, 0, xt.clone().leaky_traced(), Some(drop.clone())).unwrap();
    let y1 = dtl_core::frozen_block(&v, 1, y0, None).unwrap();
    let grads = (y1 * gt.clone()).sum().backward();
    let got = grads.get(&xt).as_vec();
    let y0_plain = v.block_forward(0, &xt, Some(&drop)).unwrap();
    let g1 = v.block_vjp(1, &y0_plain, &gt, None).unwrap();
    let want = v.block_vjp(0, &xt, &g1, Some(&drop)).unwrap().as_vec();
    let want64: Vec<f64> = want.iter().map(|a| *a as f64).collect();
    assert!(common::max_rel_err(&got, &want64) < 1e-6);
}
