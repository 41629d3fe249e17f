//! The IDX, CSV, few-shot and image-folder layouts, each on a tiny generated copy.

use std::path::Path;

use dtl_core::PipelineConfig;
use dtl_data::image::{Rgb, RgbImage};
use dtl_data::{Batch, DataPipeline};

fn config(root: &Path, kind: &str, extra: &str) -> PipelineConfig {
    let text = format!(
        "[backbone]\nkind = \"x\"\n[data]\nkind = \"{kind}\"\nroot = \"{}\"\nbatch_size = 2\ndrop_last = false\n{extra}\n",
        root.display()
    );
    PipelineConfig::from_str(&text, &root.join("p.toml"), &[]).unwrap()
}

/// Gzip with stored (uncompressed) deflate blocks, enough for the reader under test.
fn gz(data: &[u8]) -> Vec<u8> {
    let mut out = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 255];
    let chunks: Vec<&[u8]> = data.chunks(65535).collect();
    for (i, c) in chunks.iter().enumerate() {
        out.push(u8::from(i + 1 == chunks.len()));
        let len = c.len() as u16;
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&(!len).to_le_bytes());
        out.extend_from_slice(c);
    }
    out.extend_from_slice(&crc32(data).to_le_bytes());
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn idx_images(n: usize, side: usize, f: impl Fn(usize, usize) -> u8) -> Vec<u8> {
    let mut b = vec![0, 0, 8, 3];
    for v in [n, side, side] {
        b.extend_from_slice(&(v as u32).to_be_bytes());
    }
    for i in 0..n {
        for p in 0..side * side {
            b.push(f(i, p));
        }
    }
    b
}

fn idx_labels(labels: &[u8]) -> Vec<u8> {
    let mut b = vec![0, 0, 8, 1];
    b.extend_from_slice(&(labels.len() as u32).to_be_bytes());
    b.extend_from_slice(labels);
    b
}

fn all(loader: dtl_data::Loader) -> Vec<Batch> {
    loader.map(|b| b.unwrap()).collect()
}

#[test]
fn idx_gzip_and_raw() {
    let tmp = tempfile::tempdir().unwrap();
    let r = tmp.path();
    std::fs::write(
        r.join("train-images-idx3-ubyte.gz"),
        gz(&idx_images(3, 4, |i, _| (i * 100) as u8)),
    )
    .unwrap();
    std::fs::write(
        r.join("train-labels-idx1-ubyte.gz"),
        gz(&idx_labels(&[0, 1, 2])),
    )
    .unwrap();
    std::fs::write(
        r.join("t10k-images-idx3-ubyte"),
        idx_images(2, 4, |i, p| if p == 0 { 255 } else { (i * 51) as u8 }),
    )
    .unwrap();
    std::fs::write(r.join("t10k-labels-idx1-ubyte"), idx_labels(&[2, 9])).unwrap();
    let data = DataPipeline::new(&config(r, "idx", ""), 4).unwrap();
    assert_eq!(
        (data.train_len(), data.test_len(), data.num_classes()),
        (3, 2, 10)
    );
    let test = all(data.test_loader().unwrap());
    assert_eq!(test[0].labels, vec![2, 9]);
    // Image 1 of the test split: grey 51 everywhere (first pixel 255), copied to 3 channels;
    // 4x4 to 4x4 needs no resampling. (51/255 - 0.5) / 0.5 = -0.6.
    let img1 = &test[0].images[48..96];
    for c in 0..3 {
        assert!((img1[c * 16] - 1.0).abs() < 1e-6);
        assert!(img1[c * 16 + 1..c * 16 + 16]
            .iter()
            .all(|v| (v + 0.6).abs() < 1e-6));
    }

    // Held-out classes: keep labels 9 and 2 as classes 0 and 1.
    let data =
        DataPipeline::new(&config(r, "idx", "[data.options]\nkeep_labels = [9, 2]"), 4).unwrap();
    assert_eq!(
        (data.train_len(), data.test_len(), data.num_classes()),
        (1, 2, 2)
    );
    assert_eq!(all(data.test_loader().unwrap())[0].labels, vec![1, 0]);
    let e = DataPipeline::new(&config(r, "idx", "[data.options]\nkeep_labels = [7]"), 4)
        .unwrap_err()
        .to_string();
    assert!(
        e.ends_with("the split is empty: no item has a label in data.options.keep_labels = [7]"),
        "{e}"
    );
    let e = DataPipeline::new(&config(r, "idx", "[data.options]\nkeep_labels = [1, 1]"), 4)
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        "data.options.keep_labels: expected a list of distinct labels, e.g. [5, 6, 7, 8, 9]"
    );

    // Errors: a wrong magic number, a truncated file, a label past data.options.classes.
    std::fs::write(r.join("t10k-labels-idx1-ubyte"), idx_labels(&[2, 9, 1])).unwrap();
    let e = DataPipeline::new(&config(r, "idx", ""), 4)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("t10k-labels-idx1-ubyte: holds 3 labels but `"),
        "{e}"
    );
    std::fs::write(r.join("t10k-labels-idx1-ubyte"), idx_labels(&[2, 9])).unwrap();
    let e = DataPipeline::new(&config(r, "idx", "[data.options]\nclasses = 5"), 4)
        .unwrap_err()
        .to_string();
    assert!(e.contains("t10k-labels-idx1-ubyte: item 1: label 9 is out of range: 5 classes (data.options.classes) allow labels 0-4"), "{e}");
    let mut bad = idx_images(2, 4, |_, _| 0);
    bad.truncate(30);
    std::fs::write(r.join("t10k-images-idx3-ubyte"), bad).unwrap();
    let e = DataPipeline::new(&config(r, "idx", ""), 4)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("the header announces 2 images of 4x4 (32 bytes) but the file holds 14 bytes"),
        "{e}"
    );
    std::fs::write(r.join("t10k-images-idx3-ubyte"), b"not idx").unwrap();
    let e = DataPipeline::new(&config(r, "idx", ""), 4)
        .unwrap_err()
        .to_string();
    assert!(e.contains("not an IDX image file"), "{e}");
    let mut cfg = config(r, "idx", "");
    cfg.data.test = "val".into();
    let e = DataPipeline::new(&cfg, 4).unwrap_err().to_string();
    assert_eq!(
        e,
        "data.test: `val` is not an idx split; use \"train\" or \"test\""
    );
}

#[test]
fn csv_with_header_gzip_and_rgb() {
    let tmp = tempfile::tempdir().unwrap();
    let r = tmp.path();
    let header = format!(
        "label,{}\n",
        (0..4)
            .map(|i| format!("px{i}"))
            .collect::<Vec<_>>()
            .join(",")
    );
    std::fs::write(
        r.join("train.csv"),
        format!("{header}1,0,0,0,0\n0,255,255,255,255\n3,10,20,30,40\n"),
    )
    .unwrap();
    std::fs::write(r.join("test.csv.gz"), gz(b"2,255,0,255,0\n")).unwrap();
    let data = DataPipeline::new(&config(r, "csv", ""), 2).unwrap();
    assert_eq!(
        (data.train_len(), data.test_len(), data.num_classes()),
        (3, 1, 4)
    );
    let b = &all(data.test_loader().unwrap())[0];
    assert_eq!(b.labels, vec![2]);
    assert_eq!(&b.images[..4], &[1.0, -1.0, 1.0, -1.0]);

    // RGB rows: 3 values per pixel, r,g,b interleaved.
    std::fs::write(
        r.join("train.csv"),
        "0,255,0,0,0,255,0,0,0,255,255,255,255\n",
    )
    .unwrap();
    std::fs::write(
        r.join("test.csv"),
        "1,255,0,0,0,255,0,0,0,255,255,255,255\n",
    )
    .unwrap();
    std::fs::remove_file(r.join("test.csv.gz")).unwrap();
    let data = DataPipeline::new(&config(r, "csv", "[data.options]\nchannels = 3"), 2).unwrap();
    let b = &all(data.test_loader().unwrap())[0];
    assert_eq!(&b.images[..4], &[1.0, -1.0, -1.0, 1.0], "red plane");
    assert_eq!(&b.images[4..8], &[-1.0, 1.0, -1.0, 1.0], "green plane");

    // Errors name the file and line.
    std::fs::write(r.join("train.csv"), "0,1,2,3,4\n1,1,2,3\n").unwrap();
    let e = DataPipeline::new(&config(r, "csv", ""), 2)
        .unwrap_err()
        .to_string();
    assert!(
        e.ends_with("train.csv: line 2: has 4 fields but the first row has 5"),
        "{e}"
    );
    std::fs::write(r.join("train.csv"), "0,1,2,3,400\n").unwrap();
    let e = DataPipeline::new(&config(r, "csv", ""), 2)
        .unwrap_err()
        .to_string();
    assert!(
        e.ends_with("train.csv: line 1: pixel 3 is 400; pixels must be in 0-255"),
        "{e}"
    );
    std::fs::write(r.join("train.csv"), "0,1,2,3\n").unwrap();
    let e = DataPipeline::new(&config(r, "csv", ""), 2)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("rows hold 3 pixel values, which is not greyscale for a square image"),
        "{e}"
    );
    std::fs::write(r.join("train.csv"), "label,a,b,c,d\n").unwrap();
    let e = DataPipeline::new(&config(r, "csv", ""), 2)
        .unwrap_err()
        .to_string();
    assert!(
        e.ends_with("train.csv: the split is empty: no `label,p0,p1,...` rows"),
        "{e}"
    );
    std::fs::write(r.join("train.csv"), "0,1,2,3,4\n7,1,2,3,4\n").unwrap();
    let e = DataPipeline::new(&config(r, "csv", "[data.options]\nclasses = 5"), 2)
        .unwrap_err()
        .to_string();
    assert!(e.ends_with("train.csv: line 2: label 7 is out of range: 5 classes (data.options.classes) allow labels 0-4"), "{e}");
    let e = DataPipeline::new(&config(r, "csv", "[data.options]\ncolumns = 5"), 2)
        .unwrap_err()
        .to_string();
    assert_eq!(e, "data.options.columns: unknown option for data.kind = \"csv\"; valid options: classes, channels, keep_labels");
}

fn png(path: &Path, rgb: [u8; 3]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    RgbImage::from_fn(4, 4, |_, _| Rgb(rgb)).save(path).unwrap();
}

#[test]
fn few_shot_lists() {
    let tmp = tempfile::tempdir().unwrap();
    let r = tmp.path();
    let ann = r.join("few-shot_split/oxford-pets/annotations");
    std::fs::create_dir_all(&ann).unwrap();
    png(&r.join("oxford-pets/images/a.png"), [255, 255, 255]);
    png(&r.join("oxford-pets/images/b c.png"), [0, 0, 0]);
    std::fs::write(
        ann.join("train_meta.list.num_shot_2.seed_1"),
        "images/a.png 3\nimages/b c.png 36\n",
    )
    .unwrap();
    std::fs::write(ann.join("test_meta.list"), "images/b c.png 36\n").unwrap();
    std::fs::write(ann.join("val_meta.list"), "images/a.png 3\n").unwrap();
    let extra = "task = \"pets\"\n[data.options]\nshots = 2\nseed = 1\n";
    let data = DataPipeline::new(&config(r, "few-shot", extra), 4).unwrap();
    assert_eq!(
        (data.train_len(), data.test_len(), data.num_classes()),
        (2, 1, 37)
    );
    let b = &all(data.test_loader().unwrap())[0];
    assert_eq!(b.labels, vec![36]);
    assert!(b.images.iter().all(|&v| v == -1.0));

    let extra = "task = \"pets\"\n[data.options]\nshots = 4\nseed = 1\n";
    let e = DataPipeline::new(&config(r, "few-shot", extra), 4)
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("data.options.shots/seed: list `"), "{e}");
    assert!(
        e.contains("train_meta.list.num_shot_4.seed_1` does not exist"),
        "{e}"
    );
    assert!(
        e.ends_with(
            "lists present: test_meta.list, train_meta.list.num_shot_2.seed_1, val_meta.list"
        ),
        "{e}"
    );
}

#[test]
fn image_folder_classes_come_from_the_training_split() {
    let tmp = tempfile::tempdir().unwrap();
    let r = tmp.path();
    png(&r.join("train/zebra/1.png"), [1, 2, 3]);
    png(&r.join("train/ant/1.PNG"), [1, 2, 3]);
    png(&r.join("train/ant/sub/2.jpg"), [1, 2, 3]);
    std::fs::write(r.join("train/ant/notes.txt"), "ignored").unwrap();
    png(&r.join("test/zebra/9.png"), [1, 2, 3]);
    let data = DataPipeline::new(&config(r, "image-folder", ""), 4).unwrap();
    assert_eq!(
        (data.train_len(), data.test_len(), data.num_classes()),
        (3, 1, 2)
    );
    assert_eq!(all(data.test_loader().unwrap())[0].labels, vec![1]);

    png(&r.join("test/bee/1.png"), [1, 2, 3]);
    let e = DataPipeline::new(&config(r, "image-folder", ""), 4)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("bee: class folder `bee` is not in the training split `"),
        "{e}"
    );
    assert!(e.ends_with("its classes are: ant, zebra"), "{e}");

    std::fs::remove_dir_all(r.join("test")).unwrap();
    std::fs::create_dir_all(r.join("test/ant")).unwrap();
    let e = DataPipeline::new(&config(r, "image-folder", ""), 4)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("the split is empty: no images with extension jpg/jpeg/png"),
        "{e}"
    );
}
