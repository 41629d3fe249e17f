//! ViT backbones.
