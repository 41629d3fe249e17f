//! The registered ViT variants (timm's names) as [`Geometry`](crate::Geometry) types.
//!
//! ```
//! use dtl_vit::{variants::VitTinyPatch16_224, Geometry};
//! let spec = VitTinyPatch16_224::spec();
//! assert_eq!((spec.tokens(), spec.width, spec.heads), (197, 192, 3));
//! ```

#![allow(non_camel_case_types)]

crate::vit_variant!(
    /// ViT-Ti/16 at 224 (timm `vit_tiny_patch16_224`): width 192, 12 blocks, 3 heads.
    VitTinyPatch16_224, "vit_tiny_patch16_224", "ViT-Ti/16, 224x224, width 192, 12 blocks, 3 heads",
    image: 224, patch: 16, width: 192, depth: 12, heads: 3, tokens: 197
);
crate::vit_variant!(
    /// ViT-S/16 at 224 (timm `vit_small_patch16_224`): width 384, 12 blocks, 6 heads.
    VitSmallPatch16_224, "vit_small_patch16_224", "ViT-S/16, 224x224, width 384, 12 blocks, 6 heads",
    image: 224, patch: 16, width: 384, depth: 12, heads: 6, tokens: 197
);
crate::vit_variant!(
    /// ViT-B/16 at 224 (timm `vit_base_patch16_224`, Google `ViT-B_16.npz`).
    VitBasePatch16_224, "vit_base_patch16_224", "ViT-B/16, 224x224, width 768, 12 blocks, 12 heads",
    image: 224, patch: 16, width: 768, depth: 12, heads: 12, tokens: 197
);
crate::vit_variant!(
    /// ViT-L/16 at 224 (timm `vit_large_patch16_224`): width 1024, 24 blocks, 16 heads.
    VitLargePatch16_224, "vit_large_patch16_224", "ViT-L/16, 224x224, width 1024, 24 blocks, 16 heads",
    image: 224, patch: 16, width: 1024, depth: 24, heads: 16, tokens: 197
);
crate::vit_variant!(
    /// ViT-B/32 at 224 (timm `vit_base_patch32_224`): 7x7 patches.
    VitBasePatch32_224, "vit_base_patch32_224", "ViT-B/32, 224x224, width 768, 12 blocks, 12 heads",
    image: 224, patch: 32, width: 768, depth: 12, heads: 12, tokens: 50
);
crate::vit_variant!(
    /// ViT-B/16 at 384 (timm `vit_base_patch16_384`): 24x24 patches; 224 checkpoints are
    /// resampled.
    VitBasePatch16_384, "vit_base_patch16_384", "ViT-B/16, 384x384, width 768, 12 blocks, 12 heads",
    image: 384, patch: 16, width: 768, depth: 12, heads: 12, tokens: 577
);
crate::vit_variant!(
    /// The test fixtures' geometry: image 32, patch 8, width 48, 4 blocks, 3 heads.
    VitTestPatch8_32, "vit_test_patch8_32", "test geometry, 32x32, patch 8, width 48, 4 blocks, 3 heads",
    image: 32, patch: 8, width: 48, depth: 4, heads: 3, tokens: 17
);
crate::vit_variant!(
    /// The quickstart's backbone: image 28, patch 4, width 64, 4 blocks, 4 heads.
    VitMiniPatch4_28, "vit_mini_patch4_28", "mini ViT for 28x28 inputs (Fashion-MNIST), patch 4, width 64, 4 blocks, 4 heads",
    image: 28, patch: 4, width: 64, depth: 4, heads: 4, tokens: 50
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
