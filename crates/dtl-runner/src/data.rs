//! Where training and evaluation batches come from.
//!
//! The runner reads batches through [`BatchSource`]; [`open_pipeline`] adapts the data
//! crate's pipeline and [`SyntheticData`] generates a small learnable task in memory
//! (benchmarks, examples, tests).

use dtl_core::Result;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// One batch: images (n, 3, size, size) CHW normalised, labels, optional soft targets; the
/// data crate's loader yields it and the training step reads it as it is.
///
/// ```
/// let b = dtl_runner::data::Batch { images: vec![0.0; 2 * 3 * 4 * 4], labels: vec![0, 1], soft_targets: None, n: 2 };
/// assert_eq!(b.labels.len(), b.n);
/// ```
pub use dtl_data::Batch;

/// An iterator over batches that knows how many it will yield.
pub trait BatchIter: Iterator<Item = Result<Batch>> {
    /// Batches left to yield.
    fn batches(&self) -> usize;
}

/// A dataset as the runner sees it: seeded, shuffled training epochs resumable mid-epoch,
/// and an ordered test split.
///
/// ```
/// use dtl_runner::data::{BatchSource, SyntheticData};
/// let mut d = SyntheticData::new(3, 8, 12, 6, 4, 0);
/// assert_eq!(d.train_epoch(0, 1).unwrap().batches(), 2);
/// let first = d.test_loader().unwrap().next().unwrap().unwrap();
/// assert_eq!(first.n, 4);
/// ```
pub trait BatchSource {
    /// Number of classes.
    fn num_classes(&self) -> usize;
    /// Training images.
    fn train_len(&self) -> usize;
    /// Evaluation images.
    fn test_len(&self) -> usize;
    /// The batches of training epoch `epoch`, skipping the first `skip`.
    fn train_epoch(&mut self, epoch: usize, skip: usize) -> Result<Box<dyn BatchIter>>;
    /// The evaluation batches.
    fn test_loader(&mut self) -> Result<Box<dyn BatchIter>>;
    /// The files the data is read from, for the checkpoint's fingerprints (none by default).
    fn sources(&self) -> Vec<std::path::PathBuf> {
        Vec::new()
    }
}

/// A generated classification task: each class is a fixed random pattern, each image that
/// pattern plus noise. Deterministic in the seed; learnable in a few steps.
///
/// ```
/// use dtl_runner::data::{BatchSource, SyntheticData};
/// let mut d = SyntheticData::new(4, 8, 16, 8, 8, 1);
/// let b = d.train_epoch(0, 0).unwrap().next().unwrap().unwrap();
/// assert_eq!(b.images.len(), 8 * 3 * 8 * 8);
/// assert!(b.labels.iter().all(|&l| l < 4));
/// ```
#[derive(Debug, Clone)]
pub struct SyntheticData {
    classes: usize,
    size: usize,
    train: usize,
    test: usize,
    batch: usize,
    seed: u64,
    patterns: Vec<Vec<f32>>,
}

impl SyntheticData {
    /// `classes` patterns of `size x size` pixels; `train`/`test` images; batches of `batch`.
    pub fn new(
        classes: usize,
        size: usize,
        train: usize,
        test: usize,
        batch: usize,
        seed: u64,
    ) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5eed);
        let px = 3 * size * size;
        let patterns = (0..classes.max(1))
            .map(|_| (0..px).map(|_| rng.gen_range(-1.0f32..1.0)).collect())
            .collect();
        SyntheticData {
            classes: classes.max(1),
            size,
            train,
            test,
            batch: batch.max(1),
            seed,
            patterns,
        }
    }

    fn image(&self, split: u64, index: usize) -> (Vec<f32>, usize) {
        let label = index % self.classes;
        let mut rng = ChaCha8Rng::seed_from_u64(
            self.seed
                .wrapping_mul(31)
                .wrapping_add(split * 1_000_003 + index as u64),
        );
        let img = self.patterns[label]
            .iter()
            .map(|&p| p + rng.gen_range(-0.8f32..0.8))
            .collect();
        (img, label)
    }

    fn loader(&self, split: u64, order: Vec<usize>, skip: usize) -> Box<dyn BatchIter> {
        let chunks: Vec<Vec<usize>> = order
            .chunks(self.batch)
            .map(|c| c.to_vec())
            .skip(skip)
            .collect();
        Box::new(SyntheticIter {
            data: self.clone(),
            split,
            chunks,
            pos: 0,
        })
    }
}

struct SyntheticIter {
    data: SyntheticData,
    split: u64,
    chunks: Vec<Vec<usize>>,
    pos: usize,
}

impl Iterator for SyntheticIter {
    type Item = Result<Batch>;
    fn next(&mut self) -> Option<Result<Batch>> {
        let chunk = self.chunks.get(self.pos)?;
        self.pos += 1;
        let mut images = Vec::with_capacity(chunk.len() * 3 * self.data.size * self.data.size);
        let mut labels = Vec::with_capacity(chunk.len());
        for &i in chunk {
            let (img, l) = self.data.image(self.split, i);
            images.extend(img);
            labels.push(l);
        }
        Some(Ok(Batch {
            images,
            labels,
            soft_targets: None,
            n: chunk.len(),
        }))
    }
}

impl BatchIter for SyntheticIter {
    fn batches(&self) -> usize {
        self.chunks.len() - self.pos
    }
}

impl BatchSource for SyntheticData {
    fn num_classes(&self) -> usize {
        self.classes
    }
    fn train_len(&self) -> usize {
        self.train
    }
    fn test_len(&self) -> usize {
        self.test
    }
    fn train_epoch(&mut self, epoch: usize, skip: usize) -> Result<Box<dyn BatchIter>> {
        let mut order: Vec<usize> = (0..self.train).collect();
        let mut rng = ChaCha8Rng::seed_from_u64(
            self.seed
                .wrapping_add(epoch as u64)
                .wrapping_mul(0x9E37_79B9),
        );
        for i in (1..order.len()).rev() {
            order.swap(i, rng.gen_range(0..=i));
        }
        // drop the last incomplete batch, as training does by default
        order.truncate(self.train / self.batch * self.batch);
        Ok(self.loader(0, order, skip))
    }
    fn test_loader(&mut self) -> Result<Box<dyn BatchIter>> {
        Ok(self.loader(1, (0..self.test).collect(), 0))
    }
}

/// The data crate's pipeline as a [`BatchSource`].
struct Pipeline(dtl_data::DataPipeline);

struct PipelineIter(dtl_data::Loader);

impl Iterator for PipelineIter {
    type Item = Result<Batch>;
    fn next(&mut self) -> Option<Result<Batch>> {
        self.0.next()
    }
}

impl BatchIter for PipelineIter {
    fn batches(&self) -> usize {
        self.0.remaining()
    }
}

impl BatchSource for Pipeline {
    fn num_classes(&self) -> usize {
        self.0.num_classes()
    }
    fn train_len(&self) -> usize {
        self.0.train_len()
    }
    fn test_len(&self) -> usize {
        self.0.test_len()
    }
    fn train_epoch(&mut self, epoch: usize, skip: usize) -> Result<Box<dyn BatchIter>> {
        Ok(Box::new(PipelineIter(self.0.train_epoch(epoch, skip)?)))
    }
    fn test_loader(&mut self) -> Result<Box<dyn BatchIter>> {
        Ok(Box::new(PipelineIter(self.0.test_loader()?)))
    }
    fn sources(&self) -> Vec<std::path::PathBuf> {
        self.0.sources()
    }
}

/// Opens the data crate's pipeline for `cfg` at the backbone's input size.
pub fn open_pipeline(
    cfg: &dtl_core::PipelineConfig,
    image_size: usize,
) -> Result<Box<dyn BatchSource>> {
    Ok(Box::new(Pipeline(dtl_data::DataPipeline::new(
        cfg, image_size,
    )?)))
}

/// An extra test set of a run (`[[eval.tests]]`, or `data.test` scored over a class subset),
/// as [`open_test_set`] opens it.
pub struct TestSetSource {
    /// The data crate's pipeline of `data.test` alone, read with the test transforms.
    pub source: Box<dyn BatchSource>,
    /// The dataset behind it: labels and item names without decoding.
    pub dataset: std::sync::Arc<dyn dtl_core::Dataset>,
}

/// Opens `cfg.data.test` alone as a test set of a run whose head has `classes` classes (a
/// test split with more classes is refused); the training split is not opened.
pub fn open_test_set(
    cfg: &dtl_core::PipelineConfig,
    image_size: usize,
    classes: usize,
) -> Result<TestSetSource> {
    let p = dtl_data::DataPipeline::test_only(cfg, image_size, classes)?;
    let dataset = std::sync::Arc::clone(p.test_dataset());
    Ok(TestSetSource {
        source: Box::new(Pipeline(p)),
        dataset,
    })
}
