//! Weight loading: error messages, half-precision safetensors and position-embedding
//! resampling against values computed by the reference script.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::{max_rel_err, read_st, reference, vit_tensors, write_st, Raw};
use dfdx::prelude::*;
use dtl_core::BackboneSpec;
use dtl_vit::variants::VitTestPatch8_32;
use dtl_vit::{Geometry, Vit};

fn load_err(path: &Path, format: &str) -> String {
    match dtl_vit::load::<VitTestPatch8_32>(path, format) {
        Ok(_) => panic!("loading {} should fail", path.display()),
        Err(e) => e.to_string(),
    }
}

fn assert_has(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "message `{msg}` lacks `{p}`");
    }
    assert_eq!(msg.lines().count(), 1, "message spans several lines: {msg}");
}

#[test]
fn missing_tensor_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("missing.safetensors");
    let mut t = vit_tensors("dtl_vit.safetensors");
    t.remove("blocks.2.mlp.fc1.bias");
    write_st(&path, &t);
    let msg = load_err(&path, "auto");
    assert_has(
        &msg,
        &["missing.safetensors", "`blocks.2.mlp.fc1.bias` is missing"],
    );
}

#[test]
fn wrong_shape_names_expected_and_found() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shape.safetensors");
    let mut t = vit_tensors("dtl_vit.safetensors");
    t.insert(
        "blocks.0.attn.qkv.weight".into(),
        Raw::f32(&[144, 40], &vec![0.0; 144 * 40]),
    );
    write_st(&path, &t);
    let msg = load_err(&path, "safetensors");
    assert_has(
        &msg,
        &[
            "shape.safetensors",
            "`blocks.0.attn.qkv.weight`",
            "expected shape [144, 48], found [144, 40]",
        ],
    );
}

#[test]
fn truncated_files_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["dtl_vit.safetensors", "dtl_vit.npz"] {
        let bytes = std::fs::read(reference(name)).unwrap();
        let path = dir.path().join(format!("cut_{name}"));
        std::fs::write(&path, &bytes[..bytes.len() - 1000]).unwrap();
        let msg = load_err(&path, "auto");
        assert_has(&msg, &[&format!("cut_{name}"), "truncated or corrupt"]);
    }
    // a file shorter than any header
    let path = dir.path().join("tiny.safetensors");
    std::fs::write(&path, b"\x10\x00").unwrap();
    assert_has(
        &load_err(&path, "auto"),
        &["tiny.safetensors", "truncated or corrupt"],
    );
}

#[test]
fn unsupported_dtype_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dtype.safetensors");
    let mut t = vit_tensors("dtl_vit.safetensors");
    t.insert(
        "norm.weight".into(),
        Raw {
            dtype: "I64".into(),
            shape: vec![48],
            bytes: vec![0; 48 * 8],
        },
    );
    write_st(&path, &t);
    let msg = load_err(&path, "auto");
    assert_has(
        &msg,
        &[
            "dtype.safetensors",
            "`norm.weight`",
            "dtype I64 is not supported",
            "F32, F16, BF16",
        ],
    );
}

#[test]
fn other_bad_inputs_give_one_line_errors() {
    let dir = tempfile::tempdir().unwrap();
    // unknown format name
    let msg = load_err(&reference("dtl_vit.safetensors"), "pth");
    assert_has(&msg, &["`pth` is not a weights format", "\"safetensors\""]);
    // a safetensors file read as npz
    let msg = load_err(&reference("dtl_vit.safetensors"), "npz");
    assert_has(&msg, &["dtl_vit.safetensors", "not a valid npz"]);
    // not a ViT
    let path = dir.path().join("other.safetensors");
    let mut t = BTreeMap::new();
    t.insert("conv1.weight".to_string(), Raw::f32(&[2], &[1.0, 2.0]));
    write_st(&path, &t);
    assert_has(
        &load_err(&path, "auto"),
        &["other.safetensors", "not a ViT checkpoint"],
    );
    // a file that does not exist
    let msg = load_err(&dir.path().join("absent.npz"), "auto");
    assert_has(&msg, &["absent.npz"]);
    // a checkpoint of another width
    let msg = match dtl_vit::load::<dtl_vit::variants::VitMiniPatch4_28>(
        &reference("dtl_vit.npz"),
        "auto",
    ) {
        Ok(_) => panic!("a width-48 checkpoint must not load into a width-64 model"),
        Err(e) => e.to_string(),
    };
    assert_has(
        &msg,
        &[
            "dtl_vit.npz",
            "`embedding/kernel`",
            "expected shape [4, 4, 3, 64], found [8, 8, 3, 48]",
        ],
    );
}

/// Rewrites the fixture with every float tensor stored as `dtype` (`BF16` or `F16`).
fn half_copy(path: &Path, dtype: &str) -> BTreeMap<String, Vec<f32>> {
    let src = read_st(&reference("dtl_vit.safetensors"));
    let mut rounded = BTreeMap::new();
    let mut out = BTreeMap::new();
    for (k, v) in src {
        let (bytes, vals): (Vec<u8>, Vec<f32>) = if dtype == "BF16" {
            let h: Vec<half::bf16> = v.data.iter().map(|x| half::bf16::from_f64(*x)).collect();
            (
                h.iter().flat_map(|x| x.to_le_bytes()).collect(),
                h.iter().map(|x| x.to_f32()).collect(),
            )
        } else {
            let h: Vec<half::f16> = v.data.iter().map(|x| half::f16::from_f64(*x)).collect();
            (
                h.iter().flat_map(|x| x.to_le_bytes()).collect(),
                h.iter().map(|x| x.to_f32()).collect(),
            )
        };
        rounded.insert(k.clone(), vals);
        out.insert(
            k,
            Raw {
                dtype: dtype.into(),
                shape: v.shape,
                bytes,
            },
        );
    }
    write_st(path, &out);
    rounded
}

#[test]
fn half_precision_safetensors_load() {
    let dir = tempfile::tempdir().unwrap();
    let fx = read_st(&reference("dtl_dtl.safetensors"));
    let images: Vec<f32> = fx["input"].data.iter().map(|v| *v as f32).collect();
    for (dtype, tol) in [("BF16", 5e-2), ("F16", 5e-3)] {
        let path = dir.path().join(format!("vit_{dtype}.safetensors"));
        let rounded = half_copy(&path, dtype);
        let spec = VitTestPatch8_32::spec();
        let (w, report) = dtl_vit::load_weights(&spec, &path, "auto").unwrap();
        assert_eq!(report.dtypes, vec![dtype.to_string()]);
        // the loaded values are exactly the stored half-precision values
        assert_eq!(w.blocks[1].qkv_w, rounded["blocks.1.attn.qkv.weight"]);
        assert_eq!(w.patch_w, rounded["patch_embed.proj.weight"]);
        assert_eq!(w.norm_b, rounded["norm.bias"]);
        let vit = Vit::<Const<17>, Const<48>>::new(spec, w).unwrap();
        let tokens = vit.forward_features_flat(&images, 3).unwrap();
        let err = max_rel_err(&tokens, &fx["backbone_tokens"].data);
        assert!(
            err < tol,
            "{dtype}: tokens differ from the f32 reference by {err:e}"
        );
    }
}

fn resample_fixture() -> BTreeMap<String, common::Stored> {
    read_st(&common::fixtures().join("vit-resample/pos_embed_resampled.safetensors"))
}

#[test]
fn position_embedding_resampling_matches_timm() {
    let fx = resample_fixture();
    let src: Vec<f32> = fx["source"].data.iter().map(|v| *v as f32).collect();
    for g in [6usize, 3, 5] {
        let want = &fx[&format!("grid_{g}x{g}")];
        let got = dtl_vit::resample_pos_embed(&src, (4, 4), (g, g), 1, 48);
        let err = max_rel_err(&got, &want.data);
        assert!(err < 1e-6, "grid {g}: max relative error {err:e}");
    }
}

#[test]
fn checkpoints_load_into_other_grids() {
    // the 4x4-grid fixture into a model for 48x48 images (6x6 grid), from both formats
    let fx = resample_fixture();
    let spec = BackboneSpec::vit("vit_test_patch8_48", 48, 8, 48, 4, 3);
    for file in ["dtl_vit.safetensors", "dtl_vit.npz"] {
        let (vit, report) =
            Vit::<Const<37>, Const<48>>::load_with_report(spec.clone(), &reference(file), "auto")
                .unwrap();
        assert_eq!(report.resampled_from, Some((4, 4)));
        let err = max_rel_err(&vit.weights().pos_embed, &fx["grid_6x6"].data);
        assert!(err < 1e-6, "{file}: max relative error {err:e}");
        // and it runs
        let x = dtl_core::Backbone::<Cpu>::embed(
            &vit,
            &Cpu::default().zeros_like(&(1, Const::<3>, 48, 48)),
        )
        .unwrap();
        assert_eq!(x.shape().1, Const::<37>);
    }
    // a wrong type for the spec is refused, not a panic
    let err = Vit::<Const<17>, Const<48>>::load(spec, &reference("dtl_vit.safetensors"), "auto")
        .unwrap_err();
    assert!(err.to_string().contains("37 tokens"), "{err}");
}

#[test]
fn registered_variant_weights_check() {
    let report =
        dtl_vit::check_weights("vit_test_patch8_32", &reference("dtlplus_vit.npz"), "auto")
            .unwrap();
    assert_eq!((report.layout, report.prefix.as_str()), ("flax", ""));
    assert_eq!(report.tensors, 6 + 4 * 16);
    assert_eq!(report.skipped.len(), 4);
    let err = dtl_vit::check_weights("vit_test_patch8_23", &reference("dtl_vit.npz"), "auto")
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("did you mean `vit_test_patch8_32`"),
        "{err}"
    );
}
