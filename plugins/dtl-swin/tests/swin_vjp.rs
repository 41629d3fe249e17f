//! Every block's and every stage transition's input-only VJP against central finite
//! differences of the forward (a dot-product test `<J v, w> = <v, J^T w>`), on the fixture
//! geometry with random weights that make windows, shifts and masks matter.

mod common;

use common::noise;
use dtl_kernels::{CpuKernels, DropScales, KernelBackbone, Kernels};
use dtl_swin::{SwinOn, SwinWeights};

const BATCH: usize = 2;

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum()
}

/// The test geometry with random weights whose attention is far from uniform.
fn swin() -> SwinOn<CpuKernels> {
    let cfg = dtl_swin::variant("swin_test_patch2_window4_32").unwrap();
    let mut w = SwinWeights::random(&cfg, 3);
    for b in &mut w.blocks {
        b.qkv_w.iter_mut().for_each(|v| *v *= 6.0);
        b.rel_table.iter_mut().for_each(|v| *v *= 30.0);
        b.fc1_w.iter_mut().for_each(|v| *v *= 5.0);
        b.fc2_w.iter_mut().for_each(|v| *v *= 5.0);
        b.proj_w.iter_mut().for_each(|v| *v *= 10.0);
    }
    for m in &mut w.merges {
        m.reduction_w.iter_mut().for_each(|v| *v *= 10.0);
    }
    SwinOn::from_weights(&cfg, w).unwrap()
}

/// `<v, d/dt f(x + t v)>` at 0 from central differences, Richardson-extrapolated.
/// The step is `h` times the root mean square of `x` (at least `h`), so that f32 rounding of
/// large activations does not swamp the difference.
fn directional(f: &dyn Fn(&[f32]) -> Vec<f32>, x: &[f32], v: &[f32], w: &[f32], h: f32) -> f64 {
    let rms = (dot(x, x) / x.len() as f64).sqrt() as f32;
    let h = h * rms.max(1.0);
    eprintln!("  step {h:.3e} (rms of the input {rms:.3e})");
    let at = |t: f32| {
        let xs: Vec<f32> = x.iter().zip(v).map(|(a, b)| a + t * b).collect();
        dot(&f(&xs), w)
    };
    let d = |h: f32| (at(h) - at(-h)) / (2.0 * h as f64);
    (4.0 * d(h / 2.0) - d(h)) / 3.0
}

fn check(what: &str, jv: f64, vjtw: f64) {
    let err = (jv - vjtw).abs() / jv.abs().max(vjtw.abs()).max(1e-3);
    eprintln!("{what}: <Jv, w> = {jv:.6e}, <v, J^T w> = {vjtw:.6e}, rel {err:.2e}");
    assert!(err < 2e-3, "{what}: <Jv, w> = {jv} but <v, J^T w> = {vjtw}");
}

#[test]
fn block_and_transition_vjps_are_the_transposed_linearisations() {
    let k = CpuKernels::new();
    let swin = swin();
    let spec = swin.spec().clone();
    let mut ws = swin.workspace(&k, BATCH).unwrap();
    let big = BATCH * spec.stages[0].tokens() * spec.stages[0].width;
    let imgs = k.upload_new(&noise(BATCH * 3 * 32 * 32, 1)).unwrap();
    let mut x = k.alloc(big).unwrap();
    swin.embed(&k, &mut ws, &imgs, BATCH, &mut x).unwrap();
    let mut drop = DropScales::alloc(&k, BATCH).unwrap();
    drop.set(
        &k,
        &dtl_core::DropPath {
            attn: vec![0.0, 1.25],
            mlp: vec![1.25, 1.25],
        },
    )
    .unwrap();
    let mut checked = 0;
    for (s, st) in spec.stages.iter().enumerate() {
        let n_in = |stage: usize| {
            let st = &spec.stages[stage];
            BATCH * st.tokens() * st.width
        };
        if s > 0 {
            // the transition into stage s
            let (nx, ny) = (n_in(s - 1), n_in(s));
            let xh = k.download(&x, nx).unwrap();
            let fwd = |xs: &[f32]| {
                let mut ws = swin.workspace(&k, BATCH).unwrap();
                let mut y = k.alloc(ny).unwrap();
                let xb = k.upload_new(xs).unwrap();
                swin.stage_forward(&k, &mut ws, s, &xb, BATCH, &mut y)
                    .unwrap();
                k.download(&y, ny).unwrap()
            };
            let (v, w) = (noise(nx, 10 + s as u64), noise(ny, 20 + s as u64));
            let mut dx = k.alloc(nx).unwrap();
            swin.stage_vjp(
                &k,
                &mut ws,
                s,
                &x,
                &k.upload_new(&w).unwrap(),
                BATCH,
                &mut dx,
            )
            .unwrap();
            let vjtw = dot(&v, &k.download(&dx, nx).unwrap());
            check(
                &format!("transition into stage {s}"),
                directional(&fwd, &xh, &v, &w, 1e-2),
                vjtw,
            );
            checked += 1;
            let xb = k.upload_new(&fwd(&xh)).unwrap();
            x = xb;
        }
        let n = n_in(s);
        for b in st.blocks.0..st.blocks.1 {
            let xh = k.download(&x, n).unwrap();
            for d in [None, Some(&drop)] {
                if d.is_some() && b % 3 != 1 {
                    continue;
                }
                let fwd = |xs: &[f32]| {
                    let mut ws = swin.workspace(&k, BATCH).unwrap();
                    let mut y = k.alloc(n).unwrap();
                    let xb = k.upload_new(xs).unwrap();
                    swin.block_forward(&k, &mut ws, b, &xb, BATCH, d, &mut y)
                        .unwrap();
                    k.download(&y, n).unwrap()
                };
                let (v, w) = (noise(n, 30 + b as u64), noise(n, 40 + b as u64));
                let mut dx = k.alloc(n).unwrap();
                swin.block_vjp(
                    &k,
                    &mut ws,
                    b,
                    &x,
                    &k.upload_new(&w).unwrap(),
                    BATCH,
                    d,
                    &mut dx,
                )
                .unwrap();
                let vjtw = dot(&v, &k.download(&dx, n).unwrap());
                let what = format!(
                    "block {b} (shift {}, drop {})",
                    swin.config().shift_of(b),
                    d.is_some()
                );
                check(&what, directional(&fwd, &xh, &v, &w, 1e-2), vjtw);
                checked += 1;
            }
            let mut y = k.alloc(n).unwrap();
            swin.block_forward(&k, &mut ws, b, &x, BATCH, None, &mut y)
                .unwrap();
            x = y;
        }
    }
    assert_eq!(checked, 3 + 8 + 3);
    // the final norm
    let rows = BATCH * spec.tokens();
    let n = rows * spec.width;
    let xh = k.download(&x, n).unwrap();
    let fwd = |xs: &[f32]| {
        let mut y = k.alloc(n).unwrap();
        swin.norm_forward(&k, &k.upload_new(xs).unwrap(), rows, &mut y)
            .unwrap();
        k.download(&y, n).unwrap()
    };
    let (v, w) = (noise(n, 50), noise(n, 51));
    let mut dx = k.alloc(n).unwrap();
    swin.norm_vjp(&k, &x, &k.upload_new(&w).unwrap(), rows, &mut dx)
        .unwrap();
    check(
        "final norm",
        directional(&fwd, &xh, &v, &w, 1e-2),
        dot(&v, &k.download(&dx, n).unwrap()),
    );
}

/// Transitions exist only into stages 1.., and the workspace bounds the batch.
#[test]
fn misuse_is_an_error_naming_the_problem() {
    let k = CpuKernels::new();
    let swin = swin();
    let mut ws = swin.workspace(&k, 1).unwrap();
    let b = k.alloc(1 << 16).unwrap();
    let mut o = k.alloc(1 << 16).unwrap();
    let e = swin
        .stage_forward(&k, &mut ws, 0, &b, 1, &mut o)
        .unwrap_err()
        .to_string();
    assert!(e.contains("stage 0"), "{e}");
    let e = swin
        .stage_forward(&k, &mut ws, 4, &b, 1, &mut o)
        .unwrap_err()
        .to_string();
    assert!(e.contains("stage 4"), "{e}");
    let e = swin
        .block_forward(&k, &mut ws, 8, &b, 1, None, &mut o)
        .unwrap_err()
        .to_string();
    assert!(e.contains("block 8"), "{e}");
    let e = swin
        .block_forward(&k, &mut ws, 0, &b, 2, None, &mut o)
        .unwrap_err()
        .to_string();
    assert!(e.contains("batch of 2"), "{e}");
}
