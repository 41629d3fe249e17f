//! The whole backbone (embedding, blocks, stage transitions, final norm) against timm's
//! `forward_features` in the Swin reference fixture, and deliberately wrong variants that
//! the tolerance must reject.

mod common;

use dtl_swin::{score_bias, SwinConfig, SwinOn, SwinWeights};

/// The tolerance relative to the largest expected entry (f32 against f64: 3.6e-7 measured by
/// the fixture's own f32 run).
const TOL: f64 = 1e-4;

struct Fixture {
    cfg: SwinConfig,
    weights: SwinWeights,
    input: Vec<f32>,
    tokens: Vec<f64>,
    batch: usize,
}

fn fixture() -> Option<Fixture> {
    let dir = common::fixtures()?;
    let cfg = dtl_swin::variant("swin_test_patch2_window4_32").unwrap();
    let weights =
        dtl_swin::load_weights(&cfg, &dir.join("swin_dtl_swin.safetensors"), "auto").unwrap();
    let t = common::read_f64(&dir.join("swin_dtl_dtl.safetensors"));
    let (ishape, input) = &t["input"];
    let (tshape, tokens) = &t["backbone_tokens"];
    assert_eq!(tshape, &vec![ishape[0], 2, 2, 128]);
    Some(Fixture {
        cfg,
        weights,
        input: input.iter().map(|&v| v as f32).collect(),
        tokens: tokens.clone(),
        batch: ishape[0],
    })
}

/// max |got - want| over max |want|.
fn rel_err(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let err = got
        .iter()
        .zip(want)
        .fold(0.0f64, |m, (g, w)| m.max((*g as f64 - w).abs()));
    err / scale
}

#[test]
fn tokens_match_timm_and_mistakes_do_not() {
    let Some(f) = fixture() else { return };
    let k = dtl_kernels::CpuKernels::new();
    let swin = SwinOn::from_weights(&f.cfg, f.weights.clone()).unwrap();
    let good = rel_err(&common::forward(&swin, &f.input, f.batch), &f.tokens);
    eprintln!("backbone_tokens: max error / max entry = {good:.3e}");
    assert!(
        good < TOL,
        "backbone tokens off by {good:.3e} of the largest entry"
    );

    // the relative-position index transposed: offset (i - j) read as (j - i), which reverses
    // every table along its offsets
    let mut w = f.weights.clone();
    for (i, b) in w.blocks.iter_mut().enumerate() {
        let heads = f.cfg.heads[f.cfg.locate(i).unwrap().0];
        let rows: Vec<Vec<f32>> = b
            .rel_table
            .chunks(heads)
            .rev()
            .map(<[f32]>::to_vec)
            .collect();
        b.rel_table = rows.concat();
    }
    let swin_t = SwinOn::from_weights(&f.cfg, w).unwrap();
    let transposed = rel_err(&common::forward(&swin_t, &f.input, f.batch), &f.tokens);

    // the shifted blocks without their -100 mask
    let mut swin_m = SwinOn::from_weights(&f.cfg, f.weights.clone()).unwrap();
    for i in 0..8 {
        if f.cfg.shift_of(i) > 0 {
            let (s, _) = f.cfg.locate(i).unwrap();
            let (bias, groups) = score_bias(
                &f.weights.blocks[i].rel_table,
                f.cfg.heads[s],
                f.cfg.resolution(s),
                f.cfg.stage_window(s),
                0,
            );
            swin_m.with_block_bias(&k, i, &bias, groups).unwrap();
        }
    }
    let unmasked = rel_err(&common::forward(&swin_m, &f.input, f.batch), &f.tokens);

    eprintln!("wrong variants: transposed index {transposed:.3e}, no mask {unmasked:.3e}");
    for (what, e) in [("transposed index", transposed), ("no mask", unmasked)] {
        assert!(
            e > 10.0 * TOL,
            "{what}: only {e:.3e} off, the tolerance cannot tell"
        );
    }
}
