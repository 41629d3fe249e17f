//! The weights loader: the fixture in timm 1.0's layout, the same tensors in the original
//! release's layout, half-precision files, resampled bias tables, and the errors for missing
//! and misshapen tensors.

mod common;

use std::collections::BTreeMap;

use dtl_swin::{HostTensor, SwinLayout, SwinWeights};

fn table() -> Option<BTreeMap<String, HostTensor>> {
    let dir = common::fixtures()?;
    Some(dtl_swin::read_safetensors(&dir.join("swin_dtl_swin.safetensors")).unwrap())
}

fn cfg() -> dtl_swin::SwinConfig {
    dtl_swin::variant("swin_test_patch2_window4_32").unwrap()
}

#[test]
fn the_original_layout_gives_the_same_weights() {
    let Some(t) = table() else { return };
    let (timm, layout) = SwinWeights::from_tensors_with_layout(&cfg(), t.clone(), "timm").unwrap();
    assert_eq!(layout, SwinLayout::Timm);
    // layers.<s>.downsample (s >= 1) -> layers.<s-1>.downsample, plus buffers the release kept
    let mut old = BTreeMap::new();
    for (k, v) in t {
        let k = match k.split_once(".downsample.") {
            Some((l, rest)) => {
                let s: usize = l.trim_start_matches("layers.").parse().unwrap();
                format!("layers.{}.downsample.{rest}", s - 1)
            }
            None => k,
        };
        old.insert(format!("module.{k}"), v);
    }
    old.insert(
        "module.layers.0.blocks.1.attn_mask".into(),
        HostTensor::new(vec![16, 16, 16], vec![0.0; 4096]),
    );
    old.insert(
        "module.layers.0.blocks.0.attn.relative_position_index".into(),
        HostTensor::new(vec![16, 16], vec![0.0; 256]),
    );
    let (w, layout) = SwinWeights::from_tensors_with_layout(&cfg(), old, "old").unwrap();
    assert_eq!(layout, SwinLayout::Original);
    assert_eq!(w, timm);
}

#[test]
fn missing_and_misshapen_tensors_are_named() {
    let Some(t) = table() else { return };
    let mut m = t.clone();
    m.remove("layers.2.blocks.1.mlp.fc1.bias");
    m.remove("layers.3.downsample.norm.weight");
    let e = SwinWeights::from_tensors(&cfg(), m, "ckpt.pth")
        .unwrap_err()
        .to_string();
    assert!(e.contains("ckpt.pth") && e.contains("2 tensor(s)"), "{e}");
    assert!(e.contains("`layers.2.blocks.1.mlp.fc1.bias`"), "{e}");
    assert!(e.contains("`layers.3.downsample.norm.weight`"), "{e}");
    let mut m = t.clone();
    m.insert(
        "layers.1.blocks.0.attn.proj.weight".into(),
        HostTensor::new(vec![32, 31], vec![0.0; 32 * 31]),
    );
    let e = SwinWeights::from_tensors(&cfg(), m, "ckpt")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("layers.1.blocks.0.attn.proj.weight")
            && e.contains("[32, 32]")
            && e.contains("[32, 31]"),
        "{e}"
    );
    // a table with the wrong number of heads cannot be resampled
    let mut m = t;
    m.insert(
        "layers.0.blocks.0.attn.relative_position_bias_table".into(),
        HostTensor::new(vec![49, 2], vec![0.0; 98]),
    );
    let e = SwinWeights::from_tensors(&cfg(), m, "ckpt")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("relative_position_bias_table")
            && e.contains("[49, 2]")
            && e.contains("[49, 1]"),
        "{e}"
    );
}

#[test]
fn tables_for_another_window_are_resampled() {
    let Some(t) = table() else { return };
    // the same weights for window 2: every 7x7 table becomes 3x3 (stage 3 keeps its 3x3)
    let mut c = cfg();
    c.window = 2;
    c.name = "window2".into();
    let mut m = t;
    for (k, v) in m.iter_mut() {
        if k == "layers.0.blocks.0.attn.relative_position_bias_table" {
            v.data = vec![0.25; 49];
        }
    }
    let w = SwinWeights::from_tensors(&c, m, "w4").unwrap();
    assert_eq!(w.blocks[0].rel_table.len(), 9);
    assert!(w.blocks[0]
        .rel_table
        .iter()
        .all(|v| (v - 0.25).abs() < 1e-6));
    assert_eq!(w.blocks[2].rel_table.len(), 9 * 2);
}

#[test]
fn half_precision_files_load() {
    let Some(dir) = common::fixtures() else {
        return;
    };
    let t = dtl_swin::read_safetensors(&dir.join("swin_dtl_swin.safetensors")).unwrap();
    let full = SwinWeights::from_tensors(&cfg(), t.clone(), "f32").unwrap();
    let tmp =
        std::env::temp_dir().join(format!("dtl-swin-bf16-{}.safetensors", std::process::id()));
    let bytes: BTreeMap<String, (Vec<usize>, Vec<u8>)> = t
        .iter()
        .map(|(k, v)| {
            let b = v
                .data
                .iter()
                .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
                .collect();
            (k.clone(), (v.shape.clone(), b))
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = bytes
        .iter()
        .map(|(k, (s, b))| {
            (
                k.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::BF16, s.clone(), b)
                    .unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, &None, &tmp).unwrap();
    let half = dtl_swin::load_weights(&cfg(), &tmp, "auto").unwrap();
    std::fs::remove_file(&tmp).ok();
    for (a, b) in half.blocks[3].qkv_w.iter().zip(&full.blocks[3].qkv_w) {
        assert!((a - b).abs() <= b.abs() / 128.0 + 1e-30, "{a} vs {b}");
    }
    let e = dtl_swin::load_weights(&cfg(), &tmp, "npz")
        .unwrap_err()
        .to_string();
    assert!(e.contains("npz"), "{e}");
}

#[test]
fn a_broken_pytorch_checkpoint_is_an_error_with_a_way_out() {
    let tmp = std::env::temp_dir().join(format!("dtl-swin-{}.pth", std::process::id()));
    std::fs::write(&tmp, b"PK\x03\x04 not really a torch.save zip").unwrap();
    let e = dtl_swin::load_weights(&cfg(), &tmp, "auto")
        .unwrap_err()
        .to_string();
    assert!(e.contains(".pth") && e.contains("save_file"), "{e}");
    let e = dtl_swin::load_weights(&cfg(), &tmp, "npz")
        .unwrap_err()
        .to_string();
    std::fs::remove_file(&tmp).ok();
    assert!(e.contains("`npz`") && e.contains("\"pth\""), "{e}");
}

/// The twins written by `bench/reference/swin_reference.py twins`: a tiny random Swin saved by
/// timm as `model.safetensors` (timm 1.0 layout) and by `torch.save({'model': ...})` in the
/// original release's layout (`model.pth`, the file format the official DTL code loads).
#[test]
fn a_torch_save_checkpoint_loads_like_its_safetensors_twin() {
    let dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../crates/dtl-pth/tests/data");
    let cfg = dtl_swin::SwinConfig::new("swin_twin", 32, 2, 4, &[2, 2, 2, 2], &[1, 1, 2, 2], 4);
    let st = dtl_swin::load_weights(&cfg, &dir.join("model.safetensors"), "auto").unwrap();
    let pth = dtl_swin::load_weights(&cfg, &dir.join("model.pth"), "auto").unwrap();
    assert_eq!(pth, st);
    let named = dtl_swin::load_weights(&cfg, &dir.join("model.pth"), "pth").unwrap();
    assert_eq!(named, st);
    // the format named wrongly is an error naming the file
    let e = dtl_swin::load_weights(&cfg, &dir.join("model.pth"), "safetensors")
        .unwrap_err()
        .to_string();
    assert!(e.contains("model.pth"), "{e}");
}
