//! A tiny self-contained backbone for tests, examples and documentation.
//!
//! 8x8 images, 4x4 patches (a 2x2 grid plus a class token), width 8, three residual blocks
//! `x + s * tanh(x W_i)` and a LayerNorm without affine. It implements [`Backbone`] exactly,
//! forward and input-only VJP, so the runner can be exercised without a real model.

use dfdx::prelude::*;
use dtl_core::{Backbone, BackboneSpec, DropPath, Images, Result};
use rand::{Rng, SeedableRng};

const W: usize = 8;
const N: usize = 5;
const DEPTH: usize = 3;
const PATCH_IN: usize = 3 * 4 * 4;

/// The toy backbone; see the module documentation.
///
/// ```
/// use dfdx::prelude::*;
/// use dtl_core::Backbone;
/// let dev = Cpu::default();
/// let bb = dtl_runner::toy::ToyBackbone::new(&dev, 7);
/// let x = bb.embed(&dev.zeros_like(&(2, Const::<3>, 8, 8))).unwrap();
/// assert_eq!(x.shape().0, 2);
/// assert_eq!(bb.depth(), 3);
/// ```
pub struct ToyBackbone {
    spec: BackboneSpec,
    dev: Cpu,
    embed_w: Vec<f32>,
    prefix: Vec<f32>,
    pos: Vec<f32>,
    blocks: Vec<Vec<f32>>,
}

impl ToyBackbone {
    /// Random weights from `seed`.
    pub fn new(dev: &Cpu, seed: u64) -> Self {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut draw =
            |n: usize, s: f32| (0..n).map(|_| rng.gen_range(-s..s)).collect::<Vec<f32>>();
        let embed_w = draw(PATCH_IN * W, 0.3);
        let prefix = draw(W, 1.0);
        let pos = draw(N * W, 0.5);
        let blocks = (0..DEPTH).map(|_| draw(W * W, 0.6)).collect();
        let mut spec = BackboneSpec::vit("toy_patch4_8", 8, 4, W, DEPTH, 1);
        spec.mlp_hidden = W;
        ToyBackbone {
            spec,
            dev: dev.clone(),
            embed_w,
            prefix,
            pos,
            blocks,
        }
    }

    /// The variant's numbers.
    pub fn spec_ref(&self) -> &BackboneSpec {
        &self.spec
    }

    fn tensor(&self, v: Vec<f32>, b: usize) -> Tensor<(usize, Const<N>, Const<W>), f32, Cpu> {
        self.dev.tensor_from_vec(v, (b, Const, Const))
    }

    /// `tanh(x W)` row by row.
    fn branch(&self, block: usize, xv: &[f32]) -> Vec<f32> {
        let w = &self.blocks[block];
        let mut out = vec![0f32; xv.len()];
        for (row, o) in xv.chunks_exact(W).zip(out.chunks_exact_mut(W)) {
            for j in 0..W {
                o[j] = (0..W).map(|k| row[k] * w[k * W + j]).sum::<f32>().tanh();
            }
        }
        out
    }
}

fn scale(drop: Option<&DropPath>, sample: usize) -> f32 {
    drop.map(|d| d.attn[sample]).unwrap_or(1.0)
}

impl Backbone<Cpu> for ToyBackbone {
    type Tokens = Const<N>;
    type Width = Const<W>;

    fn spec(&self) -> &BackboneSpec {
        &self.spec
    }

    fn embed(&self, images: &Images<Cpu>) -> Result<Tensor<(usize, Const<N>, Const<W>), f32, Cpu>> {
        let (b, _, h, w) = *images.shape();
        if h != 8 || w != 8 {
            return Err(dtl_core::DtlError::shape(format!(
                "toy backbone takes 8x8 images, got {h}x{w}"
            )));
        }
        let iv = images.as_vec();
        let mut out = vec![0f32; b * N * W];
        for s in 0..b {
            out[s * N * W..s * N * W + W].copy_from_slice(&self.prefix);
            for p in 0..4 {
                let (pi, pj) = (p / 2, p % 2);
                let mut patch = Vec::with_capacity(PATCH_IN);
                for c in 0..3 {
                    for y in 0..4 {
                        for x in 0..4 {
                            patch.push(iv[((s * 3 + c) * 8 + pi * 4 + y) * 8 + pj * 4 + x]);
                        }
                    }
                }
                let o = &mut out[(s * N + 1 + p) * W..(s * N + 2 + p) * W];
                for (j, oj) in o.iter_mut().enumerate() {
                    *oj = patch
                        .iter()
                        .enumerate()
                        .map(|(k, v)| v * self.embed_w[k * W + j])
                        .sum();
                }
            }
            for (o, p) in out[s * N * W..(s + 1) * N * W].iter_mut().zip(&self.pos) {
                *o += p;
            }
        }
        Ok(self.tensor(out, b))
    }

    fn block_forward(
        &self,
        block: usize,
        x: &Tensor<(usize, Const<N>, Const<W>), f32, Cpu>,
        drop: Option<&DropPath>,
    ) -> Result<Tensor<(usize, Const<N>, Const<W>), f32, Cpu>> {
        let b = x.shape().0;
        let xv = x.as_vec();
        let t = self.branch(block, &xv);
        let y = xv
            .iter()
            .zip(&t)
            .enumerate()
            .map(|(i, (v, t))| v + scale(drop, i / (N * W)) * t)
            .collect();
        Ok(self.tensor(y, b))
    }

    fn block_vjp(
        &self,
        block: usize,
        x: &Tensor<(usize, Const<N>, Const<W>), f32, Cpu>,
        grad_out: &Tensor<(usize, Const<N>, Const<W>), f32, Cpu>,
        drop: Option<&DropPath>,
    ) -> Result<Tensor<(usize, Const<N>, Const<W>), f32, Cpu>> {
        let b = x.shape().0;
        let xv = x.as_vec();
        let g = grad_out.as_vec();
        let t = self.branch(block, &xv);
        let w = &self.blocks[block];
        let mut gx = g.clone();
        for (r, ((grow, trow), orow)) in g
            .chunks_exact(W)
            .zip(t.chunks_exact(W))
            .zip(gx.chunks_exact_mut(W))
            .enumerate()
        {
            let s = scale(drop, r / N);
            for j in 0..W {
                let gt = s * grow[j] * (1.0 - trow[j] * trow[j]);
                for k in 0..W {
                    orow[k] += gt * w[k * W + j];
                }
            }
        }
        Ok(self.tensor(gx, b))
    }

    fn norm_forward(
        &self,
        x: &Tensor<(usize, Const<W>), f32, Cpu>,
    ) -> Result<Tensor<(usize, Const<W>), f32, Cpu>> {
        let b = x.shape().0;
        let mut v = x.as_vec();
        for row in v.chunks_exact_mut(W) {
            let m = row.iter().sum::<f32>() / W as f32;
            let var = row.iter().map(|a| (a - m) * (a - m)).sum::<f32>() / W as f32;
            let inv = 1.0 / (var + 1e-6).sqrt();
            for a in row.iter_mut() {
                *a = (*a - m) * inv;
            }
        }
        Ok(self.dev.tensor_from_vec(v, (b, Const)))
    }

    fn norm_vjp(
        &self,
        x: &Tensor<(usize, Const<W>), f32, Cpu>,
        grad_out: &Tensor<(usize, Const<W>), f32, Cpu>,
    ) -> Result<Tensor<(usize, Const<W>), f32, Cpu>> {
        let b = x.shape().0;
        let xv = x.as_vec();
        let g = grad_out.as_vec();
        let mut out = vec![0f32; xv.len()];
        for ((row, grow), orow) in xv
            .chunks_exact(W)
            .zip(g.chunks_exact(W))
            .zip(out.chunks_exact_mut(W))
        {
            let m = row.iter().sum::<f32>() / W as f32;
            let var = row.iter().map(|a| (a - m) * (a - m)).sum::<f32>() / W as f32;
            let inv = 1.0 / (var + 1e-6).sqrt();
            let xhat: Vec<f32> = row.iter().map(|a| (a - m) * inv).collect();
            let gm = grow.iter().sum::<f32>() / W as f32;
            let gxm = grow.iter().zip(&xhat).map(|(a, b)| a * b).sum::<f32>() / W as f32;
            for k in 0..W {
                orow[k] = inv * (grow[k] - gm - xhat[k] * gxm);
            }
        }
        Ok(self.dev.tensor_from_vec(out, (b, Const)))
    }
}
