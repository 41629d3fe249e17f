//! A VTAB-1k-style folder made on the fly: loading, exact tensors, and every error case of
//! the list layouts with its message.

use std::path::{Path, PathBuf};

use dtl_core::PipelineConfig;
use dtl_data::image::{GrayImage, RgbImage};
use dtl_data::{Batch, DataPipeline};

/// Writes a `w x h` PNG of one colour.
fn solid_png(path: &Path, w: u32, h: u32, rgb: [u8; 3]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    RgbImage::from_fn(w, h, |_, _| dtl_data::image::Rgb(rgb))
        .save(path)
        .unwrap();
}

/// A task folder `<root>/oxford_iiit_pet` (37 classes) with PNG, greyscale PNG and JPEG
/// images and the four VTAB-1k lists.
fn vtab_root() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let task = tmp.path().join("oxford_iiit_pet");
    solid_png(&task.join("images/red.png"), 6, 4, [255, 0, 51]);
    solid_png(&task.join("images/blue.png"), 3, 5, [0, 0, 255]);
    solid_png(&task.join("images/mid.png"), 8, 8, [128, 64, 32]);
    std::fs::create_dir_all(task.join("images")).unwrap();
    GrayImage::from_fn(5, 5, |_, _| dtl_data::image::Luma([200]))
        .save(task.join("images/grey.png"))
        .unwrap();
    RgbImage::from_fn(16, 16, |_, _| dtl_data::image::Rgb([40, 120, 200]))
        .save(task.join("images/photo one.jpg"))
        .unwrap();
    let train = "images/red.png 0\nimages/blue.png 36\nimages/grey.png 5\nimages/photo one.jpg 7\n\nimages/mid.png 1\n";
    for list in ["train800val200", "train800", "val200"] {
        std::fs::write(task.join(format!("{list}.txt")), train).unwrap();
    }
    std::fs::write(
        task.join("test.txt"),
        "images/red.png 0\nimages/grey.png 5\nimages/photo one.jpg 7\n",
    )
    .unwrap();
    let root = tmp.path().to_path_buf();
    (tmp, root)
}

fn config(root: &Path, extra: &str) -> PipelineConfig {
    let text = format!(
        r#"
[run]
seed = 7
[backbone]
kind = "vit_tiny_patch16_224"
[data]
kind = "vtab-1k"
root = "{}"
task = "pets"
train = "train800val200"
test = "test"
batch_size = 2
workers = 2
{extra}
"#,
        root.display()
    );
    PipelineConfig::from_str(&text, &root.join("pipeline.toml"), &[]).unwrap()
}

fn collect(loader: dtl_data::Loader) -> Vec<Batch> {
    loader.map(|b| b.unwrap()).collect()
}

#[test]
fn vtab_folder_loads_with_exact_tensors() {
    let (_tmp, root) = vtab_root();
    let data = DataPipeline::new(&config(&root, ""), 8).unwrap();
    assert_eq!(data.num_classes(), 37);
    assert_eq!((data.train_len(), data.test_len()), (5, 3));

    let test = collect(data.test_loader().unwrap());
    assert_eq!(test.iter().map(|b| b.n).collect::<Vec<_>>(), vec![2, 1]);
    let labels: Vec<usize> = test.iter().flat_map(|b| b.labels.clone()).collect();
    assert_eq!(labels, vec![0, 5, 7]);
    let plane = 8 * 8;
    let img = |b: &Batch, i: usize, c: usize| -> Vec<f32> {
        b.images[(i * 3 + c) * plane..(i * 3 + c + 1) * plane].to_vec()
    };
    // Red (255, 0, 51) resized to 8x8 stays solid; with mean = std = 0.5 the values are
    // 255 -> 1, 0 -> -1, 51 -> (0.2 - 0.5) / 0.5 = -0.6.
    for (c, want) in [(0, 1.0f32), (1, -1.0), (2, -0.6)] {
        assert!(
            img(&test[0], 0, c).iter().all(|v| (v - want).abs() < 1e-6),
            "channel {c}"
        );
    }
    // Greyscale 200 becomes RGB (200, 200, 200): (200/255 - 0.5) / 0.5 = 0.568627...
    for c in 0..3 {
        assert!(img(&test[0], 1, c)
            .iter()
            .all(|v| (v - 0.568_627_4).abs() < 1e-6));
    }
    // The JPEG decodes within a few levels of its colour.
    for (c, v) in [(0, 40.0f32), (1, 120.0), (2, 200.0)] {
        let want = (v / 255.0 - 0.5) / 0.5;
        assert!(img(&test[1], 0, c)
            .iter()
            .all(|x| (x - want).abs() < 4.0 / 127.5));
    }
    assert!(test.iter().all(|b| b.soft_targets.is_none()));

    // Training: drop_last leaves 2 batches of 2, shuffled, every label from the list.
    let train = collect(data.train_epoch(0, 0).unwrap());
    assert_eq!(train.len(), 2);
    assert!(train
        .iter()
        .all(|b| b.n == 2 && b.images.len() == 2 * 3 * 64));
    let mut seen: Vec<usize> = train.iter().flat_map(|b| b.labels.clone()).collect();
    seen.sort_unstable();
    assert!(seen.iter().all(|l| [0, 1, 5, 7, 36].contains(l)));
}

#[test]
fn imagenet_statistics_and_explicit_ops() {
    let (_tmp, root) = vtab_root();
    let extra = r#"mean = [0.485, 0.456, 0.406]
std = [0.229, 0.224, 0.225]
[augment]
test = [{ op = "resize", size = 6 }, { op = "center_crop", size = 4 }, { op = "normalize" }]
"#;
    let data = DataPipeline::new(&config(&root, extra), 4).unwrap();
    let b = data.test_loader().unwrap().next().unwrap().unwrap();
    let want = [
        (1.0 - 0.485) / 0.229,
        (0.0 - 0.456) / 0.224,
        (0.2 - 0.406) / 0.225,
    ];
    for (c, w) in want.iter().enumerate() {
        let v = &b.images[c * 16..(c + 1) * 16];
        assert!(
            v.iter().all(|x| (x - *w as f32).abs() < 1e-5),
            "channel {c}: {v:?}"
        );
    }
}

#[test]
fn label_smoothing_sets_soft_targets_for_training_only() {
    let (_tmp, root) = vtab_root();
    let mut cfg = config(&root, "");
    cfg.optim.label_smoothing = 0.1;
    let data = DataPipeline::new(&cfg, 4).unwrap();
    let b = data.train_epoch(0, 0).unwrap().next().unwrap().unwrap();
    let t = b.soft_targets.unwrap();
    assert_eq!(t.len(), 2 * 37);
    for (i, &l) in b.labels.iter().enumerate() {
        let row = &t[i * 37..(i + 1) * 37];
        assert!((row[l] - (0.9 + 0.1 / 37.0)).abs() < 1e-6);
        assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5);
    }
    assert!(data
        .test_loader()
        .unwrap()
        .all(|b| b.unwrap().soft_targets.is_none()));
}

fn error_of(root: &Path, extra: &str) -> String {
    match DataPipeline::new(&config(root, extra), 8) {
        Ok(data) => {
            // Some errors only show when the images are decoded.
            for b in data
                .test_loader()
                .unwrap()
                .chain(data.train_epoch(0, 0).unwrap())
            {
                if let Err(e) = b {
                    return e.to_string();
                }
            }
            panic!("expected an error")
        }
        Err(e) => e.to_string(),
    }
}

#[test]
fn missing_image_names_list_and_line() {
    let (_tmp, root) = vtab_root();
    let list = root.join("oxford_iiit_pet/test.txt");
    std::fs::write(&list, "images/red.png 0\nimages/nope.png 3\n").unwrap();
    let e = error_of(&root, "");
    assert!(
        e.starts_with(&format!(
            "{}: line 2: image `images/nope.png` does not exist",
            list.display()
        )),
        "{e}"
    );
}

#[test]
fn unreadable_image_names_list_and_line() {
    let (_tmp, root) = vtab_root();
    let task = root.join("oxford_iiit_pet");
    std::fs::write(
        task.join("images/bad.png"),
        b"\x89PNG\r\n\x1a\nthis is not a png",
    )
    .unwrap();
    std::fs::write(task.join("images/text.jpg"), b"hello").unwrap();
    let list = task.join("test.txt");
    std::fs::write(&list, "images/red.png 0\n\nimages/bad.png 3\n").unwrap();
    let e = error_of(&root, "");
    assert!(
        e.starts_with(&format!(
            "{}: line 3: cannot read image `images/bad.png`: ",
            list.display()
        )),
        "{e}"
    );
    std::fs::write(&list, "images/text.jpg 3\n").unwrap();
    let e = error_of(&root, "");
    assert!(
        e.contains("line 1: cannot read image `images/text.jpg`: not a JPEG or PNG file"),
        "{e}"
    );
}

#[test]
fn label_out_of_range_names_list_and_line() {
    let (_tmp, root) = vtab_root();
    let list = root.join("oxford_iiit_pet/train800val200.txt");
    std::fs::write(&list, "images/red.png 0\nimages/blue.png 37\n").unwrap();
    let e = error_of(&root, "");
    assert_eq!(
        e,
        format!(
            "{}: line 2: label 37 is out of range: 37 classes (task `oxford_iiit_pet`) allow labels 0-36",
            list.display()
        )
    );
    // The class count can be set explicitly for folders with other names.
    std::fs::write(&list, "images/red.png 0\nimages/blue.png 3\n").unwrap();
    let e = error_of(&root, "[data.options]\nclasses = 3\n");
    assert!(
        e.ends_with(
            "line 2: label 3 is out of range: 3 classes (data.options.classes) allow labels 0-2"
        ),
        "{e}"
    );
}

#[test]
fn empty_split_names_list() {
    let (_tmp, root) = vtab_root();
    let list = root.join("oxford_iiit_pet/test.txt");
    std::fs::write(&list, "\n\n").unwrap();
    let e = error_of(&root, "");
    assert_eq!(
        e,
        format!(
            "{}: the split is empty: the list has no `<image path> <label>` lines",
            list.display()
        )
    );
}

#[test]
fn malformed_lines_and_unknown_names() {
    let (_tmp, root) = vtab_root();
    let list = root.join("oxford_iiit_pet/test.txt");
    std::fs::write(&list, "images/red.png zero\n").unwrap();
    let e = error_of(&root, "");
    assert!(e.contains("test.txt: line 1: `zero` is not a class index; each line must be `<image path> <label>`"), "{e}");

    let text = format!(
        "[backbone]\nkind = \"x\"\n[data]\nkind = \"vtab-1k\"\nroot = \"{}\"\ntask = \"cifar_10\"\n",
        root.display()
    );
    let cfg = PipelineConfig::from_str(&text, &root.join("p.toml"), &[]).unwrap();
    let e = DataPipeline::new(&cfg, 8).unwrap_err().to_string();
    assert!(
        e.starts_with("data.task: `cifar_10` is not a VTAB-1k task"),
        "{e}"
    );
    assert!(e.contains("did you mean `cifar`?"), "{e}");

    let mut cfg2 = config(&root, "");
    cfg2.data.train = "train1000".into();
    let e = DataPipeline::new(&cfg2, 8).unwrap_err().to_string();
    assert!(
        e.starts_with("data.train: split `train1000` has no list file"),
        "{e}"
    );
    assert!(
        e.ends_with("VTAB-1k splits: train800val200, train800, val200, test"),
        "{e}"
    );
}

#[test]
fn op_errors_name_the_key_path() {
    let (_tmp, root) = vtab_root();
    let cases = [
        (
            "[augment]\ntrain = [{ op = \"hflip\" }, { op = \"resize\", sise = 8 }]\n",
            "augment.train[1].size: is required: give an integer (e.g. 224) or [height, width]; found `sise`, did you mean `size`?",
        ),
        (
            "[augment]\ntrain = [{ op = \"resize\", size = 8, antialias = true }]\n",
            "augment.train[0].antialias: unknown key for op `resize`; valid keys: interpolation, size",
        ),
        (
            "[augment]\ntrain = [{ op = \"resize\", size = 8, interpolation = \"lanczos\" }]\n",
            "augment.train[0].interpolation: `lanczos` is not an interpolation; use \"bicubic\", \"bilinear\" or \"nearest\"",
        ),
        (
            "[augment]\ntest = [{ op = \"hflip\", p = 2 }]\n",
            "augment.test[0].p: must be a probability in [0, 1], got 2",
        ),
        (
            "[augment]\ntrain = [{ op = \"mixup\" }]\n",
            "augment.train[0]: op `mixup` works on whole batches; list it under augment.batch",
        ),
        (
            "[augment]\nbatch = [{ op = \"hflip\" }]\n",
            "augment.batch[0]: op `hflip` works on single images; list it under augment.train or augment.test",
        ),
        (
            "[augment]\ntrain = [{ op = \"rand_augment\", config = \"rand-m9-x2\" }]\n",
            "augment.train[0].config: `x2` in `rand-m9-x2` is not understood",
        ),
    ];
    for (extra, want) in cases {
        let e = DataPipeline::new(&config(&root, extra), 8)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with(want), "got: {e}\nwant: {want}");
    }
    // Ops that leave the wrong size are caught on the first image.
    let e = error_of(
        &root,
        "[augment]\ntest = [{ op = \"resize\", size = [6, 6] }]\n",
    );
    assert!(
        e.starts_with("augment.test: the ops produce 3x6x6 images from "),
        "{e}"
    );
    assert!(
        e.ends_with(
            "but the backbone takes 3x8x8; end the list with `resize` or `center_crop` to size 8"
        ),
        "{e}"
    );
    // An op given the wrong kind of sample says where it belongs.
    let e = error_of(
        &root,
        "[augment]\ntest = [{ op = \"normalize\" }, { op = \"resize\", size = 8 }]\n",
    );
    assert!(e.contains("augment.test[1] (op `resize`) on "), "{e}");
    assert!(
        e.ends_with("works on pixels but got a tensor; put it before `to_tensor`/`normalize`"),
        "{e}"
    );
}
