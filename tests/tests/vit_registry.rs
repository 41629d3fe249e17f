//! The ViT plugin's registrations, as a binary linking it sees them.

use dtl_vit as _;

#[test]
fn every_vit_variant_is_registered_with_its_numbers() {
    let reg = dtl_core::registry().unwrap();
    let want = [
        ("vit_base_patch16_224", 224, 16, 768, 12, 12, 197),
        ("vit_base_patch16_384", 384, 16, 768, 12, 12, 577),
        ("vit_base_patch32_224", 224, 32, 768, 12, 12, 50),
        ("vit_large_patch16_224", 224, 16, 1024, 24, 16, 197),
        ("vit_mini_patch4_28", 28, 4, 64, 4, 4, 50),
        ("vit_small_patch16_224", 224, 16, 384, 12, 6, 197),
        ("vit_test_patch8_32", 32, 8, 48, 4, 3, 17),
        ("vit_tiny_patch16_224", 224, 16, 192, 12, 3, 197),
    ];
    for (name, image, patch, width, depth, heads, tokens) in want {
        let s = reg.backbone(name).unwrap().spec();
        assert_eq!(
            (
                s.image_size,
                s.patch_size,
                s.width,
                s.depth,
                s.heads,
                s.tokens(),
                s.mlp_hidden
            ),
            (image, patch, width, depth, heads, tokens, 4 * width),
            "{name}"
        );
        assert_eq!(s.norm_eps, 1e-6);
    }
    let names = reg.backbones.names();
    assert!(names.windows(2).all(|w| w[0] < w[1]), "registry is sorted");
}

#[test]
fn the_fixture_checkpoints_pass_the_weights_check() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/dtl-reference");
    for file in [
        "dtl_vit.safetensors",
        "dtl_vit.npz",
        "dtlplus_vit.safetensors",
        "dtlplus_vit.npz",
    ] {
        let r = dtl_vit::check_weights("vit_test_patch8_32", &dir.join(file), "auto").unwrap();
        // timm stores qkv fused (12 tensors a block), Flax as q, k, v and out (16 a block)
        let want = if r.layout == "timm" {
            6 + 4 * 12
        } else {
            6 + 4 * 16
        };
        assert_eq!(r.tensors, want, "{file}");
        assert_eq!(r.resampled_from, None);
    }
    // a checkpoint of the wrong family member is refused with the tensor named
    let e = dtl_vit::check_weights(
        "vit_tiny_patch16_224",
        &dir.join("dtl_vit.safetensors"),
        "auto",
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("patch_embed.proj.weight") && e.contains("expected shape [192, 3, 16, 16]"),
        "{e}"
    );
}
