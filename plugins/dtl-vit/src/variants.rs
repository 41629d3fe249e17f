//! The registered ViT variants (timm's names) as [`Geometry`](crate::Geometry) types.
//!
//! ```
//! use dtl_vit::{variants::VitTinyPatch16_224, Geometry};
//! let spec = VitTinyPatch16_224::spec();
//! assert_eq!((spec.tokens(), spec.width, spec.heads), (197, 192, 3));
//! ```

#![allow(non_camel_case_types)]

/// A variant registered by name with the `runner` feature, else only declared.
#[cfg(feature = "runner")]
macro_rules! variant {
    ($($t:tt)*) => { crate::vit_variant!($($t)*); };
}

/// A variant registered by name with the `runner` feature, else only declared.
#[cfg(not(feature = "runner"))]
macro_rules! variant {
    ($(#[$m:meta])* $ty:ident, $name:literal, $desc:literal, $($rest:tt)*) => {
        crate::vit_geometry!($(#[$m])* $ty, $name, $($rest)*);
    };
}

variant!(
    /// ViT-Ti/16 at 224 (timm `vit_tiny_patch16_224`): width 192, 12 blocks, 3 heads.
    VitTinyPatch16_224, "vit_tiny_patch16_224", "ViT-Ti/16, 224x224, width 192, 12 blocks, 3 heads",
    image: 224, patch: 16, width: 192, depth: 12, heads: 3
);
variant!(
    /// ViT-S/16 at 224 (timm `vit_small_patch16_224`): width 384, 12 blocks, 6 heads.
    VitSmallPatch16_224, "vit_small_patch16_224", "ViT-S/16, 224x224, width 384, 12 blocks, 6 heads",
    image: 224, patch: 16, width: 384, depth: 12, heads: 6
);
variant!(
    /// ViT-B/16 at 224 (timm `vit_base_patch16_224`, Google `ViT-B_16.npz`).
    VitBasePatch16_224, "vit_base_patch16_224", "ViT-B/16, 224x224, width 768, 12 blocks, 12 heads",
    image: 224, patch: 16, width: 768, depth: 12, heads: 12
);
variant!(
    /// ViT-L/16 at 224 (timm `vit_large_patch16_224`): width 1024, 24 blocks, 16 heads.
    VitLargePatch16_224, "vit_large_patch16_224", "ViT-L/16, 224x224, width 1024, 24 blocks, 16 heads",
    image: 224, patch: 16, width: 1024, depth: 24, heads: 16
);
variant!(
    /// ViT-B/32 at 224 (timm `vit_base_patch32_224`): 7x7 patches.
    VitBasePatch32_224, "vit_base_patch32_224", "ViT-B/32, 224x224, width 768, 12 blocks, 12 heads",
    image: 224, patch: 32, width: 768, depth: 12, heads: 12
);
variant!(
    /// ViT-B/16 at 384 (timm `vit_base_patch16_384`): 24x24 patches; 224 checkpoints are
    /// resampled.
    VitBasePatch16_384, "vit_base_patch16_384", "ViT-B/16, 384x384, width 768, 12 blocks, 12 heads",
    image: 384, patch: 16, width: 768, depth: 12, heads: 12
);
variant!(
    /// The test fixtures' geometry: image 32, patch 8, width 48, 4 blocks, 3 heads.
    VitTestPatch8_32, "vit_test_patch8_32", "test geometry, 32x32, patch 8, width 48, 4 blocks, 3 heads",
    image: 32, patch: 8, width: 48, depth: 4, heads: 3
);
variant!(
    /// The quickstart's backbone: image 28, patch 4, width 64, 4 blocks, 4 heads.
    VitMiniPatch4_28, "vit_mini_patch4_28", "mini ViT for 28x28 inputs (Fashion-MNIST), patch 4, width 64, 4 blocks, 4 heads",
    image: 28, patch: 4, width: 64, depth: 4, heads: 4
);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Geometry;
    use dfdx::prelude::ConstDim;

    fn check<G: Geometry>() {
        let s = G::spec();
        assert_eq!(s.name, G::NAME);
        assert_eq!(s.tokens(), <G::Tokens as ConstDim>::SIZE, "{}", G::NAME);
        assert_eq!(s.width, <G::Width as ConstDim>::SIZE, "{}", G::NAME);
        assert_eq!(s.width % s.heads, 0);
        assert_eq!(s.image_size % s.patch_size, 0);
    }

    crate::vit_geometry!(
        /// No class token, MLP ratio 2, a large LayerNorm eps.
        Plain, "test_plain_patch8_16",
        image: 16, patch: 8, width: 8, depth: 1, heads: 2,
        mlp_ratio: 2.0, class_token: false, norm_eps: 1e-2
    );

    #[test]
    fn optional_settings_reach_the_spec_and_the_model() {
        check::<Plain>();
        let s = Plain::spec();
        assert_eq!((s.tokens(), s.prefix_tokens, s.mlp_hidden), (4, 0, 16));
        assert_eq!(s.norm_eps, 1e-2);
        let vit = crate::random::<Plain>(0).unwrap();
        let w = vit.weights().clone();
        assert!(w.cls_token.is_empty());
        assert_eq!(w.blocks[0].fc1_w.len(), 16 * 8);
        let images: Vec<f32> = (0..3 * 16 * 16).map(|i| (i % 5) as f32 - 2.0).collect();
        let y = vit.forward_features_flat(&images, 1).unwrap();
        assert_eq!(y.len(), 4 * 8);
        // the same weights with timm's default eps give other features: the eps is used
        let tight = crate::vit_spec("tight", 16, 8, 8, 1, 2, 2.0, false, 1e-6);
        let other =
            crate::Vit::<<Plain as Geometry>::Tokens, <Plain as Geometry>::Width>::new(tight, w)
                .unwrap()
                .forward_features_flat(&images, 1)
                .unwrap();
        let diff = y
            .iter()
            .zip(&other)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            diff > 1e-3,
            "eps 1e-2 and 1e-6 give the same features ({diff})"
        );
    }

    #[test]
    fn dims_agree_with_specs() {
        check::<VitTinyPatch16_224>();
        check::<VitSmallPatch16_224>();
        check::<VitBasePatch16_224>();
        check::<VitLargePatch16_224>();
        check::<VitBasePatch32_224>();
        check::<VitBasePatch16_384>();
        check::<VitTestPatch8_32>();
        check::<VitMiniPatch4_28>();
    }
}
