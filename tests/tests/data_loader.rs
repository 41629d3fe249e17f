//! The loader: seeded augmentation identical for any worker count, resuming mid-epoch,
//! shuffling, drop_last, limits and batch-level mixing.

use std::path::{Path, PathBuf};

use dtl_core::PipelineConfig;
use dtl_data::image::{Rgb, RgbImage};
use dtl_data::{Batch, DataPipeline};

/// An image-folder tree with 3 classes of 5 small patterned images each, in train and test.
fn folder_root() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    for split in ["train", "test"] {
        for c in 0..3u32 {
            let dir = tmp.path().join(split).join(format!("class{c}"));
            std::fs::create_dir_all(&dir).unwrap();
            for i in 0..5u32 {
                let img = RgbImage::from_fn(12 + i, 10, |x, y| {
                    Rgb([
                        (x * 20 + c * 60) as u8,
                        (y * 25 + i * 10) as u8,
                        ((x + y) * 9) as u8,
                    ])
                });
                img.save(dir.join(format!("{i}.png"))).unwrap();
            }
        }
    }
    let root = tmp.path().to_path_buf();
    (tmp, root)
}

const AUGMENT: &str = r#"
[augment]
train = [
  { op = "random_resized_crop", size = 8, interpolation = "bicubic" },
  { op = "hflip" },
  { op = "color_jitter", brightness = 0.4, contrast = 0.4, saturation = 0.4, hue = 0.1 },
  { op = "rand_augment", config = "rand-m9-mstd0.5-inc1" },
  { op = "normalize" },
  { op = "random_erasing", prob = 0.5, mode = "pixel" },
]
test = [{ op = "resize", size = 9 }, { op = "center_crop", size = 8 }]
batch = [{ op = "mixup", alpha = 0.8, cutmix_alpha = 1.0, label_smoothing = 0.1 }]
"#;

fn config(root: &Path, workers: usize, extra: &str) -> PipelineConfig {
    let text = format!(
        r#"
[run]
seed = 3
[backbone]
kind = "vit_tiny_patch16_224"
[data]
kind = "image-folder"
root = "{}"
batch_size = 4
workers = {workers}
prefetch = 2
{extra}
"#,
        root.display()
    );
    PipelineConfig::from_str(&text, &root.join("p.toml"), &[]).unwrap()
}

fn epoch(data: &DataPipeline, e: usize, skip: usize) -> Vec<Batch> {
    data.train_epoch(e, skip)
        .unwrap()
        .map(|b| b.unwrap())
        .collect()
}

#[test]
fn batches_are_identical_whatever_the_worker_count() {
    let (_tmp, root) = folder_root();
    let one = DataPipeline::new(&config(&root, 1, AUGMENT), 8).unwrap();
    let three = DataPipeline::new(&config(&root, 3, AUGMENT), 8).unwrap();
    let inline = DataPipeline::new(&config(&root, 0, AUGMENT), 8).unwrap();
    for e in 0..2 {
        let a = epoch(&one, e, 0);
        assert_eq!(a.len(), 3, "15 items, batch 4, drop_last");
        assert_eq!(a, epoch(&three, e, 0), "epoch {e}: 1 vs 3 workers");
        assert_eq!(a, epoch(&inline, e, 0), "epoch {e}: 1 worker vs inline");
        for b in &a {
            let t = b.soft_targets.as_ref().expect("mixup sets soft targets");
            assert_eq!(t.len(), b.n * 3);
            for row in t.chunks(3) {
                assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5);
                assert!(row.iter().all(|&v| v >= 0.1 / 3.0 - 1e-6));
            }
        }
    }
    let test1: Vec<Batch> = one.test_loader().unwrap().map(|b| b.unwrap()).collect();
    let test3: Vec<Batch> = three.test_loader().unwrap().map(|b| b.unwrap()).collect();
    assert_eq!(test1, test3);
    assert_eq!(test1.iter().map(|b| b.n).sum::<usize>(), 15);
    // The test split is in order: 5 items of class 0, then 1, then 2.
    let labels: Vec<usize> = test1.iter().flat_map(|b| b.labels.clone()).collect();
    assert_eq!(labels, [0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2]);
}

#[test]
fn epochs_differ_and_seeds_repeat() {
    let (_tmp, root) = folder_root();
    let data = DataPipeline::new(&config(&root, 2, AUGMENT), 8).unwrap();
    let e0 = epoch(&data, 0, 0);
    assert_eq!(e0, epoch(&data, 0, 0));
    assert_ne!(e0, epoch(&data, 1, 0));
    let other_seed = {
        let mut cfg = config(&root, 2, AUGMENT);
        cfg.run.seed = 4;
        DataPipeline::new(&cfg, 8).unwrap()
    };
    assert_ne!(e0, epoch(&other_seed, 0, 0));
}

#[test]
fn skip_batches_resumes_mid_epoch() {
    let (_tmp, root) = folder_root();
    let data = DataPipeline::new(&config(&root, 2, AUGMENT), 8).unwrap();
    let full = epoch(&data, 5, 0);
    let loader = data.train_epoch(5, 2).unwrap();
    assert_eq!((loader.batches(), loader.remaining()), (3, 1));
    let rest: Vec<Batch> = loader.map(|b| b.unwrap()).collect();
    assert_eq!(rest, full[2..].to_vec());
    assert_eq!(data.train_epoch(5, 9).unwrap().count(), 0);
}

#[test]
fn drop_last_and_limits() {
    let (_tmp, root) = folder_root();
    let keep =
        DataPipeline::new(&config(&root, 2, "drop_last = false\nlimit_test = 4"), 8).unwrap();
    let sizes: Vec<usize> = epoch(&keep, 0, 0).iter().map(|b| b.n).collect();
    assert_eq!(sizes, vec![4, 4, 4, 3]);
    assert_eq!(keep.test_len(), 4);
    assert_eq!(
        keep.test_loader()
            .unwrap()
            .map(|b| b.unwrap().n)
            .sum::<usize>(),
        4
    );
    // Every training item appears exactly once per epoch.
    let mut labels: Vec<usize> = epoch(&keep, 1, 0)
        .iter()
        .flat_map(|b| b.labels.clone())
        .collect();
    labels.sort_unstable();
    assert_eq!(labels, [0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2]);

    let limited = DataPipeline::new(&config(&root, 2, "limit_train = 9"), 8).unwrap();
    assert_eq!(limited.train_len(), 9);
    assert_eq!(limited.train_epoch(0, 0).unwrap().batches(), 2);

    let mut cfg = config(&root, 2, "");
    cfg.data.batch_size = 40;
    let e = DataPipeline::new(&cfg, 8).unwrap_err().to_string();
    assert!(
        e.starts_with("data.batch_size: 40 is more than the 15 training items"),
        "{e}"
    );
}

#[test]
fn dropping_a_loader_early_stops_its_workers() {
    let (_tmp, root) = folder_root();
    let mut cfg = config(&root, 3, "drop_last = false");
    cfg.data.batch_size = 1;
    let data = DataPipeline::new(&cfg, 8).unwrap();
    let mut loader = data.train_epoch(0, 0).unwrap();
    assert!(loader.next().unwrap().is_ok());
    drop(loader);
    assert_eq!(data.train_epoch(0, 0).unwrap().count(), 15);
}

#[test]
fn cutmix_pastes_boxes_and_weights_targets_by_area() {
    let (_tmp, root) = folder_root();
    let extra = "[augment]\nbatch = [{ op = \"cutmix\", alpha = 1.0 }]\n";
    let data = DataPipeline::new(&config(&root, 1, extra), 8).unwrap();
    for b in epoch(&data, 0, 0) {
        let t = b.soft_targets.unwrap();
        for (i, row) in t.chunks(3).enumerate() {
            // Without smoothing a row holds lam on its own label and 1 - lam on its partner's.
            let own = b.labels[i];
            let partner = b.labels[b.n - 1 - i];
            if own != partner {
                assert!((row[own] + row[partner] - 1.0).abs() < 1e-5);
            } else {
                assert!((row[own] - 1.0).abs() < 1e-5);
            }
        }
    }
}
