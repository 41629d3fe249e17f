//! Datasets, decoding, augmentation and the data loader.
