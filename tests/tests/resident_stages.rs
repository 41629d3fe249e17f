//! The device training step on a hierarchical backbone: a toy two-stage backbone written over
//! the CPU's kernels (stage 0: a 4 x 4 grid of width 4; a transition pooling 2 x 2 tokens and
//! doubling the width; stage 1: a 2 x 2 grid of width 8; no class token). Side gradients
//! against central finite differences of the loss, the side state starting again at every
//! stage, the parameters no gradient reaches left untouched by AdamW, and a bit-identical
//! resume from a checkpoint.

use std::sync::Arc;

use dtl_core::{BackboneSpec, PipelineConfig, Result, StageSpec};
use dtl_kernels::{CpuKernels, DropScales, KernelBackbone, Kernels};
use dtl_runner::model::smoothed_targets;
use dtl_runner::resident::ResidentModel;

type Buf = <CpuKernels as Kernels>::Buf;

const BATCH: usize = 3;
const CLASSES: usize = 5;
const IMAGE: usize = 8;
/// Stage 0: 4 x 4 tokens of width 4; stage 1: 2 x 2 tokens of width 8.
const W0: usize = 4;
const W1: usize = 8;
const T0: usize = 16;
const T1: usize = 4;

/// A small deterministic generator of values in (-scale, scale).
fn values(seed: u64, n: usize, scale: f32) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 33) as f32 / (1u64 << 31) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

/// Blocks `x + tanh(x W_i)`; the transition into stage 1 averages each 2 x 2 neighbourhood and
/// maps the width 4 -> 8 with a fixed matrix; the final norm is a LayerNorm without affine.
/// Everything is computed on the host (download, compute, upload).
struct TwoStage {
    spec: BackboneSpec,
    /// (12, 4): a 2 x 2 x 3 patch to a token.
    embed: Vec<f32>,
    /// Per block, (d, d).
    blocks: Vec<Vec<f32>>,
    /// (4, 8).
    widen: Vec<f32>,
}

impl TwoStage {
    fn new() -> Self {
        let stage = |blocks, width, grid| StageSpec {
            blocks,
            width,
            heads: 1,
            grid,
            prefix_tokens: 0,
        };
        let spec = BackboneSpec {
            width: W1,
            grid: (2, 2),
            prefix_tokens: 0,
            norm_eps: 1e-5,
            stages: vec![stage((0, 2), W0, (4, 4)), stage((2, 4), W1, (2, 2))],
            ..BackboneSpec::vit("two_stage_toy", IMAGE, 2, W1, 4, 1)
        };
        let widths = [W0, W0, W1, W1];
        TwoStage {
            spec,
            embed: values(1, 12 * W0, 0.6),
            blocks: widths
                .iter()
                .enumerate()
                .map(|(i, &d)| values(10 + i as u64, d * d, 0.8))
                .collect(),
            widen: values(2, W0 * W1, 0.7),
        }
    }

    fn width(&self, block: usize) -> usize {
        self.spec.stage(block).width
    }
}

/// `x (rows, i) @ w (i, o)`.
fn matmul(x: &[f32], w: &[f32], rows: usize, i: usize, o: usize) -> Vec<f32> {
    let mut y = vec![0.0f32; rows * o];
    for r in 0..rows {
        for a in 0..i {
            let xv = x[r * i + a];
            for b in 0..o {
                y[r * o + b] += xv * w[a * o + b];
            }
        }
    }
    y
}

/// `g (rows, o) @ w^T` for `w (i, o)`.
fn matmul_t(g: &[f32], w: &[f32], rows: usize, i: usize, o: usize) -> Vec<f32> {
    let mut y = vec![0.0f32; rows * i];
    for r in 0..rows {
        for a in 0..i {
            let mut s = 0.0;
            for b in 0..o {
                s += g[r * o + b] * w[a * o + b];
            }
            y[r * i + a] = s;
        }
    }
    y
}

impl KernelBackbone<CpuKernels> for TwoStage {
    type Workspace = ();
    fn spec(&self) -> &BackboneSpec {
        &self.spec
    }
    fn workspace(&self, _k: &CpuKernels, _batch: usize) -> Result<()> {
        Ok(())
    }
    fn embed(
        &self,
        k: &CpuKernels,
        _ws: &mut (),
        images: &Buf,
        batch: usize,
        out: &mut Buf,
    ) -> Result<()> {
        let img = k.download(images, batch * 3 * IMAGE * IMAGE)?;
        let mut patches = vec![0.0f32; batch * T0 * 12];
        for b in 0..batch {
            for t in 0..T0 {
                let (pr, pc) = (t / 4, t % 4);
                for c in 0..3 {
                    for dy in 0..2 {
                        for dx in 0..2 {
                            let px = img[((b * 3 + c) * IMAGE + 2 * pr + dy) * IMAGE + 2 * pc + dx];
                            patches[(b * T0 + t) * 12 + c * 4 + dy * 2 + dx] = px;
                        }
                    }
                }
            }
        }
        k.upload(&matmul(&patches, &self.embed, batch * T0, 12, W0), out)
    }
    fn block_forward(
        &self,
        k: &CpuKernels,
        _ws: &mut (),
        block: usize,
        x: &Buf,
        batch: usize,
        _drop: Option<&DropScales<CpuKernels>>,
        out: &mut Buf,
    ) -> Result<()> {
        let d = self.width(block);
        let rows = batch * self.spec.stage(block).tokens();
        let xv = k.download(x, rows * d)?;
        let h = matmul(&xv, &self.blocks[block], rows, d, d);
        let y: Vec<f32> = xv.iter().zip(&h).map(|(a, b)| a + b.tanh()).collect();
        k.upload(&y, out)
    }
    fn block_vjp(
        &self,
        k: &CpuKernels,
        _ws: &mut (),
        block: usize,
        x: &Buf,
        dy: &Buf,
        batch: usize,
        _drop: Option<&DropScales<CpuKernels>>,
        dx: &mut Buf,
    ) -> Result<()> {
        let d = self.width(block);
        let rows = batch * self.spec.stage(block).tokens();
        let xv = k.download(x, rows * d)?;
        let g = k.download(dy, rows * d)?;
        let h = matmul(&xv, &self.blocks[block], rows, d, d);
        let dh: Vec<f32> = g
            .iter()
            .zip(&h)
            .map(|(g, h)| g * (1.0 - h.tanh() * h.tanh()))
            .collect();
        let back = matmul_t(&dh, &self.blocks[block], rows, d, d);
        let r: Vec<f32> = g.iter().zip(&back).map(|(a, b)| a + b).collect();
        k.upload(&r, dx)
    }
    fn stage_forward(
        &self,
        k: &CpuKernels,
        _ws: &mut (),
        stage: usize,
        x: &Buf,
        batch: usize,
        out: &mut Buf,
    ) -> Result<()> {
        assert_eq!(stage, 1);
        let xv = k.download(x, batch * T0 * W0)?;
        let mut pooled = vec![0.0f32; batch * T1 * W0];
        for b in 0..batch {
            for t in 0..T0 {
                let (r, c) = (t / 4, t % 4);
                let o = (r / 2) * 2 + c / 2;
                for ch in 0..W0 {
                    pooled[(b * T1 + o) * W0 + ch] += 0.25 * xv[(b * T0 + t) * W0 + ch];
                }
            }
        }
        k.upload(&matmul(&pooled, &self.widen, batch * T1, W0, W1), out)
    }
    fn stage_vjp(
        &self,
        k: &CpuKernels,
        _ws: &mut (),
        stage: usize,
        _x: &Buf,
        dy: &Buf,
        batch: usize,
        dx: &mut Buf,
    ) -> Result<()> {
        assert_eq!(stage, 1);
        let g = k.download(dy, batch * T1 * W1)?;
        let dp = matmul_t(&g, &self.widen, batch * T1, W0, W1);
        let mut r = vec![0.0f32; batch * T0 * W0];
        for b in 0..batch {
            for t in 0..T0 {
                let (row, c) = (t / 4, t % 4);
                let o = (row / 2) * 2 + c / 2;
                for ch in 0..W0 {
                    r[(b * T0 + t) * W0 + ch] = 0.25 * dp[(b * T1 + o) * W0 + ch];
                }
            }
        }
        k.upload(&r, dx)
    }
    fn norm_forward(&self, k: &CpuKernels, x: &Buf, rows: usize, out: &mut Buf) -> Result<()> {
        let xv = k.download(x, rows * W1)?;
        let mut y = vec![0.0f32; rows * W1];
        for r in 0..rows {
            let row = &xv[r * W1..(r + 1) * W1];
            let mean = row.iter().sum::<f32>() / W1 as f32;
            let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / W1 as f32;
            let inv = 1.0 / (var + 1e-5).sqrt();
            for j in 0..W1 {
                y[r * W1 + j] = (row[j] - mean) * inv;
            }
        }
        k.upload(&y, out)
    }
    fn norm_vjp(&self, k: &CpuKernels, x: &Buf, dy: &Buf, rows: usize, dx: &mut Buf) -> Result<()> {
        let xv = k.download(x, rows * W1)?;
        let g = k.download(dy, rows * W1)?;
        let mut r = vec![0.0f32; rows * W1];
        for i in 0..rows {
            let row = &xv[i * W1..(i + 1) * W1];
            let gr = &g[i * W1..(i + 1) * W1];
            let mean = row.iter().sum::<f32>() / W1 as f32;
            let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / W1 as f32;
            let inv = 1.0 / (var + 1e-5).sqrt();
            let xh: Vec<f32> = row.iter().map(|v| (v - mean) * inv).collect();
            let gm = gr.iter().sum::<f32>() / W1 as f32;
            let gxm = gr.iter().zip(&xh).map(|(a, b)| a * b).sum::<f32>() / W1 as f32;
            for j in 0..W1 {
                r[i * W1 + j] = inv * (gr[j] - gm - xh[j] * gxm);
            }
        }
        k.upload(&r, dx)
    }
}

fn pipeline(kind: &str, injects: &str, extra: &str) -> PipelineConfig {
    let text = format!(
        "[run]\nseed = 3\n{extra}\n[backbone]\nkind = \"two_stage_toy\"\n\
         [side]\nkind = \"{kind}\"\nrank = 2\nbeta = 4.0\ntaps = [0, 1, 2, 3]\ninjects = [{injects}]\n\
         [head]\nclasses = {CLASSES}\n\
         [data]\nkind = \"image-folder\"\nroot = \".\"\nbatch_size = {BATCH}\n\
         [optim]\nlr = 0.02\nweight_decay = 0.05\n"
    );
    PipelineConfig::from_str(&text, "stages.toml".as_ref(), &[]).unwrap()
}

struct Case {
    model: ResidentModel<CpuKernels, TwoStage>,
    images: Vec<f32>,
    targets: Vec<f32>,
}

/// The model with every parameter drawn at random (the maps B included, so that every
/// gradient is informative).
fn case(kind: &str, injects: &str) -> Case {
    case_with(&pipeline(kind, injects, ""))
}

fn case_with(cfg: &PipelineConfig) -> Case {
    let mut model =
        ResidentModel::from_config(cfg, CpuKernels::new(), Arc::new(TwoStage::new()), CLASSES)
            .unwrap();
    let init: Vec<Vec<f32>> = model
        .params()
        .iter()
        .enumerate()
        .map(|(i, p)| values(100 + i as u64, p.numel(), 0.5))
        .collect();
    model.set_params(&init).unwrap();
    let images = values(7, BATCH * 3 * IMAGE * IMAGE, 1.0);
    let targets = smoothed_targets(&[0, 3, 4], CLASSES, 0.0);
    Case {
        model,
        images,
        targets,
    }
}

fn values_of(model: &ResidentModel<CpuKernels, TwoStage>) -> Vec<Vec<f32>> {
    model
        .host_params()
        .unwrap()
        .iter()
        .map(|p| p.value.as_vec())
        .collect()
}

fn loss_at(c: &mut Case, values: &[Vec<f32>]) -> f64 {
    c.model.set_params(values).unwrap();
    c.model
        .forward_backward(&c.images, BATCH, &c.targets, &[])
        .unwrap();
    c.model.read_loss().unwrap() as f64
}

#[test]
fn stage_params_are_named_and_sized_by_stage() {
    let c = case("dtl+", "1, 3");
    let got: Vec<(String, Vec<usize>)> = c
        .model
        .params()
        .iter()
        .map(|p| (p.name.clone(), p.shape.clone()))
        .collect();
    let want: Vec<(String, Vec<usize>)> = [
        ("side.0.a", vec![2, 4]),
        ("side.0.b", vec![4, 2]),
        ("side.1.a", vec![2, 4]),
        ("side.1.b", vec![4, 2]),
        ("side.2.a", vec![2, 8]),
        ("side.2.b", vec![8, 2]),
        ("side.3.a", vec![2, 8]),
        ("side.3.b", vec![8, 2]),
        ("fusion.0.weight", vec![4, 1, 3, 3]),
        ("fusion.1.weight", vec![8, 1, 3, 3]),
        ("head.weight", vec![5, 8]),
        ("head.bias", vec![5]),
    ]
    .into_iter()
    .map(|(n, s)| (n.to_string(), s))
    .collect();
    assert_eq!(got, want);
}

#[test]
fn side_gradients_match_finite_differences() {
    for (kind, injects) in [("dtl+", "1, 3"), ("dtl", "0, 1, 3")] {
        let mut c = case(kind, injects);
        let base = values_of(&c.model);
        loss_at(&mut c, &base);
        let grads = c.model.read_grads().unwrap();
        let names: Vec<String> = c.model.params().iter().map(|p| p.name.clone()).collect();
        let eps = 1e-2f32;
        for (pi, g) in grads.iter().enumerate() {
            let scale = g.iter().fold(0.0f32, |m, v| m.max(v.abs())) as f64;
            assert!(
                scale > 1e-4,
                "{kind}: gradient of {} is all but zero",
                names[pi]
            );
            for (j, &gj) in g.iter().enumerate() {
                let mut up = base.clone();
                up[pi][j] += eps;
                let mut down = base.clone();
                down[pi][j] -= eps;
                let fd = (loss_at(&mut c, &up) - loss_at(&mut c, &down)) / (2.0 * eps as f64);
                assert!(
                    (fd - gj as f64).abs() <= 5e-3 * scale + 2e-5,
                    "{kind}: d loss / d {}[{j}]: step {gj} vs finite differences {fd}",
                    names[pi]
                );
            }
        }
    }
}

#[test]
fn side_state_starts_again_at_each_stage() {
    // Injects only in stage 1: the taps of stage 0 cannot change anything.
    let mut c = case("dtl", "3");
    c.model.forward_eval(&c.images, BATCH).unwrap();
    let logits = c.model.forward_eval(&c.images, BATCH).unwrap();
    let mut other = values_of(&c.model);
    let names: Vec<String> = c.model.params().iter().map(|p| p.name.clone()).collect();
    for (i, n) in names.iter().enumerate() {
        if n.starts_with("side.0.") || n.starts_with("side.1.") {
            other[i] = values(900 + i as u64, other[i].len(), 3.0);
        }
    }
    c.model.set_params(&other).unwrap();
    assert_eq!(c.model.forward_eval(&c.images, BATCH).unwrap(), logits);
    c.model
        .forward_backward(&c.images, BATCH, &c.targets, &[])
        .unwrap();
    for (p, g) in c.model.params().iter().zip(c.model.read_grads().unwrap()) {
        let zero = g.iter().all(|&v| v == 0.0);
        let unused = p.name.starts_with("side.0.") || p.name.starts_with("side.1.");
        assert_eq!(zero, unused, "gradient of {}: {g:?}", p.name);
    }
    // A tap of stage 1 does change the logits.
    let i = names.iter().position(|n| n == "side.2.b").unwrap();
    other[i][0] += 0.5;
    c.model.set_params(&other).unwrap();
    assert_ne!(c.model.forward_eval(&c.images, BATCH).unwrap(), logits);
}

#[test]
fn adamw_leaves_what_no_gradient_reaches() {
    // Injects at 3 only: the taps of stage 0 and its conv get nothing. Injects at 0 and 3:
    // tap 1 comes after stage 0's only inject.
    for (injects, unused) in [
        (
            "3",
            &[
                "side.0.a",
                "side.0.b",
                "side.1.a",
                "side.1.b",
                "fusion.0.weight",
            ][..],
        ),
        ("0, 3", &["side.1.a", "side.1.b"][..]),
    ] {
        let mut c = case("dtl+", injects);
        let init = values_of(&c.model);
        for _ in 0..6 {
            c.model
                .train_step(&c.images, BATCH, &c.targets, &[], 0.02, Some(1.0))
                .unwrap();
        }
        let fin = values_of(&c.model);
        let opt = c.model.host_optim().unwrap();
        let (m, v) = opt.moments();
        for (i, p) in c.model.params().iter().enumerate() {
            if unused.contains(&p.name.as_str()) {
                assert_eq!(fin[i], init[i], "injects {injects}: {} moved", p.name);
                assert!(m[i].iter().chain(&v[i]).all(|&x| x == 0.0), "{}", p.name);
            } else {
                assert_ne!(
                    fin[i], init[i],
                    "injects {injects}: {} did not move",
                    p.name
                );
            }
        }
    }
}

#[test]
fn resume_from_a_checkpoint_is_bit_identical() {
    for mode in ["recompute", "store"] {
        let cfg = pipeline("dtl+", "1, 3", &format!("activations = \"{mode}\""));
        let mut a = case_with(&cfg);
        for _ in 0..3 {
            a.model
                .train_step(&a.images, BATCH, &a.targets, &[], 0.02, None)
                .unwrap();
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("last.safetensors");
        let host = a.model.host_params().unwrap();
        let opt = a.model.host_optim().unwrap();
        dtl_runner::checkpoint::save(
            &path,
            &host.iter().collect::<Vec<_>>(),
            Some(&opt),
            "[run]\n",
            &serde_json::json!({ "optim_steps": a.model.optim_steps() }),
        )
        .unwrap();
        let ck = dtl_runner::checkpoint::load(&path).unwrap();
        let mut b = case_with(&cfg);
        b.model.load_checkpoint(&ck, true).unwrap();
        assert_eq!(b.model.optim_steps(), 3);
        assert_eq!(values_of(&b.model), values_of(&a.model));
        for step in 0..3 {
            for m in [&mut a, &mut b] {
                m.model
                    .train_step(&m.images, BATCH, &m.targets, &[], 0.02, None)
                    .unwrap();
            }
            assert_eq!(
                a.model.read_loss().unwrap(),
                b.model.read_loss().unwrap(),
                "{mode}: loss of step {step} after the resume"
            );
        }
        assert_eq!(values_of(&b.model), values_of(&a.model), "{mode}");
    }
}

/// A tape-path backbone claiming two stages (its blocks are never run).
struct TwoStageTape(BackboneSpec);

type Toks = dfdx::prelude::Tensor<
    (usize, dfdx::prelude::Const<4>, dfdx::prelude::Const<8>),
    f32,
    dfdx::prelude::Cpu,
>;
type Rows = dfdx::prelude::Tensor<(usize, dfdx::prelude::Const<8>), f32, dfdx::prelude::Cpu>;

impl dtl_core::Backbone<dfdx::prelude::Cpu> for TwoStageTape {
    type Tokens = dfdx::prelude::Const<4>;
    type Width = dfdx::prelude::Const<8>;
    fn spec(&self) -> &BackboneSpec {
        &self.0
    }
    fn embed(&self, images: &dtl_core::Images<dfdx::prelude::Cpu>) -> Result<Toks> {
        use dfdx::prelude::*;
        Ok(images
            .device()
            .zeros_like(&(images.shape().0, Const, Const)))
    }
    fn block_forward(&self, _: usize, x: &Toks, _: Option<&dtl_core::DropPath>) -> Result<Toks> {
        Ok(x.clone())
    }
    fn block_vjp(
        &self,
        _: usize,
        _: &Toks,
        g: &Toks,
        _: Option<&dtl_core::DropPath>,
    ) -> Result<Toks> {
        Ok(g.clone())
    }
    fn norm_forward(&self, x: &Rows) -> Result<Rows> {
        Ok(x.clone())
    }
    fn norm_vjp(&self, _: &Rows, g: &Rows) -> Result<Rows> {
        Ok(g.clone())
    }
}

#[test]
fn the_tape_path_refuses_a_hierarchical_backbone() {
    let cx = dtl_core::BuildContext {
        pipeline_file: "stages.toml".into(),
    };
    let spec = KernelBackbone::<CpuKernels>::spec(&TwoStage::new()).clone();
    let err = dtl_runner::build_job(&pipeline("dtl", "1, 3", ""), &cx, TwoStageTape(spec))
        .err()
        .expect("a hierarchical backbone has no tape path")
        .to_string();
    assert!(
        err.contains("2 stages") && err.contains("build_resident_job"),
        "{err}"
    );
}

#[test]
fn unreachable_taps_are_warned_about_and_class_pooling_refused() {
    let spec = KernelBackbone::<CpuKernels>::spec(&TwoStage::new()).clone();
    let w = dtl_core::config::stage_tap_warning(&pipeline("dtl", "1, 2", ""), &spec)
        .expect("tap 3 comes after stage 1's last inject");
    assert!(w.contains("block(s) 3 of `two_stage_toy`"), "{w}");
    assert!(dtl_core::config::stage_tap_warning(&pipeline("dtl", "1, 3", ""), &spec).is_none());
    assert!(dtl_core::config::stage_tap_warning(&pipeline("linear", "1, 2", ""), &spec).is_none());
    let cls = PipelineConfig::from_str(
        "[backbone]\nkind = \"two_stage_toy\"\n[head]\npool = \"cls\"\n\
         [data]\nkind = \"image-folder\"\nroot = \".\"\n",
        "cls.toml".as_ref(),
        &[],
    )
    .unwrap();
    let err = ResidentModel::from_config(&cls, CpuKernels::new(), Arc::new(TwoStage::new()), 5)
        .err()
        .expect("no class token to pool")
        .to_string();
    assert!(
        err.contains("head.pool") && err.contains("\"mean\""),
        "{err}"
    );
}
