//! `backbone_tokens` (timm `forward_features`) of the reference fixtures, from both the timm
//! safetensors and the Google/Flax npz checkpoints.

mod common;

use common::{max_rel_err, read_st, reference};
use dfdx::prelude::*;
use dtl_core::Backbone;
use dtl_vit::variants::VitTestPatch8_32;
use dtl_vit::{Geometry, Vit, VitOf};

fn check(case: &str, file: &str) {
    let fx = read_st(&reference(&format!("{case}_dtl.safetensors")));
    let input = &fx["input"];
    let want = &fx["backbone_tokens"];
    let batch = input.shape[0];
    let images: Vec<f32> = input.data.iter().map(|v| *v as f32).collect();
    let vit: VitOf<VitTestPatch8_32> =
        dtl_vit::load::<VitTestPatch8_32>(&reference(file), "auto").unwrap();
    let got = vit.forward_features_flat(&images, batch).unwrap();
    let err = max_rel_err(&got, &want.data);
    assert!(err < 1e-4, "{case} from {file}: max relative error {err:e}");

    // the same through the Backbone trait on dfdx tensors
    let dev = Cpu::default();
    let x = dev.tensor_from_vec(images, (batch, Const::<3>, 32usize, 32usize));
    let mut t = vit.embed(&x).unwrap();
    for i in 0..vit.depth() {
        t = vit.block_forward(i, &t, None).unwrap();
    }
    let rows = t.as_vec();
    let flat = dev.tensor_from_vec(rows, (batch * 17, Const::<48>));
    let y = vit.norm_forward(&flat).unwrap();
    let err = max_rel_err(&y.as_vec(), &want.data);
    assert!(
        err < 1e-4,
        "{case} via the trait: max relative error {err:e}"
    );
}

#[test]
fn dtl_tokens_from_safetensors() {
    check("dtl", "dtl_vit.safetensors");
}

#[test]
fn dtl_tokens_from_npz() {
    check("dtl", "dtl_vit.npz");
}

#[test]
fn dtlplus_tokens_from_safetensors() {
    check(
        "dtlplus",
        "dtl_vit.safetensors".replace("dtl_", "dtlplus_").as_str(),
    );
}

#[test]
fn dtlplus_tokens_from_npz() {
    check("dtlplus", "dtlplus_vit.npz");
}

#[test]
fn npz_and_safetensors_give_the_same_weights() {
    let spec = VitTestPatch8_32::spec();
    let (a, ra) = dtl_vit::load_weights(&spec, &reference("dtl_vit.safetensors"), "auto").unwrap();
    let (b, rb) = dtl_vit::load_weights(&spec, &reference("dtl_vit.npz"), "npz").unwrap();
    assert_eq!((ra.layout, rb.layout), ("timm", "flax"));
    // the npz holds a mismatched head and pre_logits: skipped, not loaded
    assert!(rb.skipped.iter().any(|s| s.starts_with("head/")));
    assert!(rb.skipped.iter().any(|s| s.starts_with("pre_logits/")));
    let close = |x: &[f32], y: &[f32]| {
        x.iter()
            .zip(y)
            .all(|(p, q)| (p - q).abs() <= 1e-6 * (1.0 + q.abs()))
    };
    assert!(close(&a.patch_w, &b.patch_w), "patch embedding");
    for (i, (p, q)) in a.blocks.iter().zip(&b.blocks).enumerate() {
        assert!(close(&p.qkv_w, &q.qkv_w), "block {i} qkv");
        assert!(close(&p.qkv_b, &q.qkv_b), "block {i} qkv bias");
        assert!(close(&p.proj_w, &q.proj_w), "block {i} proj");
        assert!(close(&p.fc1_w, &q.fc1_w), "block {i} fc1");
        assert!(close(&p.fc2_w, &q.fc2_w), "block {i} fc2");
    }
    assert!(close(&a.pos_embed, &b.pos_embed));
    assert!(close(&a.cls_token, &b.cls_token));
    let _ = Vit::<Const<17>, Const<48>>::new(spec, a).unwrap();
}
