//! Datasets, decoding, augmentation and the data loader of dtl.
//!
//! - [`datasets`]: the registered layouts `vtab-1k`, `few-shot`, `image-folder`, `idx` and
//!   `csv`, and JPEG/PNG decoding; [`dg`]: `domain-generalization` and `class-folder`.
//! - [`resample`]: PIL-compatible resizing, crops, flips and affine warps.
//! - [`ops`], [`randaug`], [`mix`]: the registered `[augment]` ops.
//! - [`DataPipeline`] and [`Loader`]: seeded, shuffled, multi-threaded batches.
//!
//! Linking this crate registers its datasets and ops in [`dtl_core::registry()`]:
//!
//! ```
//! let reg = dtl_core::registry().unwrap();
//! assert!(reg.datasets.contains("vtab-1k"));
//! assert!(reg.augments.contains("rand_augment"));
//! # let _ = dtl_data::DataPipeline::new;
//! ```

#![warn(missing_docs)]

pub mod color;
pub mod datasets;
pub mod dg;
mod loader;
pub mod mix;
pub mod ops;
pub mod params;
pub mod randaug;
pub mod resample;
#[cfg(test)]
mod testdata;
pub mod text;

pub use loader::{Batch, DataPipeline, Loader};

/// The `image` crate this crate decodes with, for callers that write test images.
pub use image;
