//! Datasets and augmentations: what the loader pulls samples from and passes them through.

use rand::RngCore;

use crate::Result;

/// An 8-bit RGB image, row-major, channels interleaved (`HWC`).
///
/// ```
/// let img = dtl_core::RgbImage::new(2, 1, vec![255, 0, 0, 0, 255, 0]).unwrap();
/// assert_eq!(img.pixel(1, 0), [0, 255, 0]);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// `width * height * 3` bytes.
    pub data: Vec<u8>,
}

impl RgbImage {
    /// Wraps pixel data, checking its length.
    pub fn new(width: u32, height: u32, data: Vec<u8>) -> Result<Self> {
        let want = width as usize * height as usize * 3;
        if data.len() != want {
            return Err(crate::DtlError::shape(format!(
                "RGB image {width}x{height} needs {want} bytes, got {}",
                data.len()
            )));
        }
        Ok(RgbImage {
            width,
            height,
            data,
        })
    }

    /// The pixel at column `x`, row `y`.
    pub fn pixel(&self, x: u32, y: u32) -> [u8; 3] {
        let i = (y as usize * self.width as usize + x as usize) * 3;
        [self.data[i], self.data[i + 1], self.data[i + 2]]
    }
}

/// A float image in `CHW` layout, as it enters the network.
///
/// ```
/// let t = dtl_core::FloatImage::zeros(3, 2, 2);
/// assert_eq!(t.data.len(), 12);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct FloatImage {
    /// Channels.
    pub channels: usize,
    /// Rows.
    pub height: usize,
    /// Columns.
    pub width: usize,
    /// `channels * height * width` values.
    pub data: Vec<f32>,
}

impl FloatImage {
    /// An all-zero image.
    pub fn zeros(channels: usize, height: usize, width: usize) -> Self {
        FloatImage {
            channels,
            height,
            width,
            data: vec![0.0; channels * height * width],
        }
    }
}

/// A sample on its way through the augmentation chain: pixels first, a tensor after
/// normalisation.
#[derive(Debug, Clone, PartialEq)]
pub enum Sample {
    /// Decoded 8-bit pixels.
    Rgb(RgbImage),
    /// A normalised float tensor.
    Tensor(FloatImage),
}

/// One labelled item of a dataset.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    /// The decoded image.
    pub image: RgbImage,
    /// Class index in `0..num_classes`.
    pub label: usize,
}

/// A labelled image collection, indexable in any order from any thread.
///
/// ```
/// use dtl_core::{Dataset, Example, RgbImage, Result};
/// struct Solid;
/// impl Dataset for Solid {
///     fn len(&self) -> usize { 4 }
///     fn num_classes(&self) -> usize { 2 }
///     fn get(&self, i: usize) -> Result<Example> {
///         Ok(Example { image: RgbImage::new(1, 1, vec![i as u8; 3])?, label: i % 2 })
///     }
///     fn describe(&self, i: usize) -> String { format!("solid #{i}") }
/// }
/// assert_eq!(Solid.get(3).unwrap().label, 1);
/// ```
pub trait Dataset: Send + Sync {
    /// Number of items.
    fn len(&self) -> usize;
    /// Whether there are no items.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Number of classes; every label is below it.
    fn num_classes(&self) -> usize;
    /// Decodes item `index`.
    fn get(&self, index: usize) -> Result<Example>;
    /// Where item `index` comes from, for error messages (`list.txt:12 (images/a.jpg)`).
    fn describe(&self, index: usize) -> String;
    /// The label of item `index` without decoding it, where the layout knows it up front
    /// (every built-in layout does); `None` otherwise.
    fn label(&self, index: usize) -> Option<usize> {
        let _ = index;
        None
    }
    /// The files this split is read from (list files, CSV or IDX files), for the
    /// fingerprints a checkpoint records; empty where there is no such file.
    fn sources(&self) -> Vec<std::path::PathBuf> {
        Vec::new()
    }
}

/// One augmentation or preprocessing op.
///
/// ```
/// use dtl_core::{Augment, Result, Sample};
/// struct Identity;
/// impl Augment for Identity {
///     fn apply(&self, s: Sample, _rng: &mut dyn rand::RngCore) -> Result<Sample> { Ok(s) }
/// }
/// ```
pub trait Augment: Send + Sync {
    /// Transforms one sample; all randomness comes from `rng`.
    fn apply(&self, sample: Sample, rng: &mut dyn RngCore) -> Result<Sample>;

    /// The batch-level form of this op, for ops that work on whole batches (mixup, cutmix).
    /// Such ops belong in `augment.batch`; per-sample ops return `None`.
    fn as_batch(&self) -> Option<&dyn BatchAugment> {
        None
    }
}

/// A batch of equally sized float images (`n x channels x height x width`, `CHW` per image)
/// with their labels, as batch-level ops such as mixup and cutmix see it.
///
/// ```
/// let b = dtl_core::data::TensorBatch::new(vec![0.0; 2 * 3 * 4 * 4], 3, 4, 4, vec![0, 1], 2).unwrap();
/// assert_eq!(b.n(), 2);
/// assert_eq!(b.image_len(), 48);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct TensorBatch {
    /// `n * channels * height * width` values.
    pub images: Vec<f32>,
    /// Channels per image.
    pub channels: usize,
    /// Rows per image.
    pub height: usize,
    /// Columns per image.
    pub width: usize,
    /// One class index per image.
    pub labels: Vec<usize>,
    /// `n * num_classes` target probabilities once a batch op has mixed the labels.
    pub soft_targets: Option<Vec<f32>>,
    /// Number of classes (the width of a soft-target row).
    pub num_classes: usize,
}

impl TensorBatch {
    /// Wraps images and labels, checking that the sizes agree.
    pub fn new(
        images: Vec<f32>,
        channels: usize,
        height: usize,
        width: usize,
        labels: Vec<usize>,
        num_classes: usize,
    ) -> Result<Self> {
        let per = channels * height * width;
        if images.len() != per * labels.len() {
            return Err(crate::DtlError::value_count(
                &format!(
                    "a batch of {} images of {channels}x{height}x{width}",
                    labels.len()
                ),
                per * labels.len(),
                images.len(),
            ));
        }
        Ok(TensorBatch {
            images,
            channels,
            height,
            width,
            labels,
            soft_targets: None,
            num_classes,
        })
    }

    /// Number of images.
    pub fn n(&self) -> usize {
        self.labels.len()
    }

    /// Values per image.
    pub fn image_len(&self) -> usize {
        self.channels * self.height * self.width
    }
}

/// An op on a whole batch (mixup, cutmix): it may mix images and sets soft targets.
///
/// ```
/// use dtl_core::data::{BatchAugment, TensorBatch};
/// struct OneHot;
/// impl BatchAugment for OneHot {
///     fn apply_batch(&self, b: &mut TensorBatch, _rng: &mut dyn rand::RngCore) -> dtl_core::Result<()> {
///         let mut t = vec![0.0; b.n() * b.num_classes];
///         for (i, &l) in b.labels.iter().enumerate() { t[i * b.num_classes + l] = 1.0; }
///         b.soft_targets = Some(t);
///         Ok(())
///     }
/// }
/// let mut b = TensorBatch::new(vec![0.0; 2], 1, 1, 1, vec![1, 0], 2).unwrap();
/// OneHot.apply_batch(&mut b, &mut rand::rngs::mock::StepRng::new(0, 1)).unwrap();
/// assert_eq!(b.soft_targets.unwrap(), vec![0.0, 1.0, 1.0, 0.0]);
/// ```
pub trait BatchAugment: Send + Sync {
    /// Transforms the batch in place; all randomness comes from `rng`.
    fn apply_batch(&self, batch: &mut TensorBatch, rng: &mut dyn RngCore) -> Result<()>;
}
