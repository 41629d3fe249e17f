//! Sweeps and `dtl summarize` on tiny real runs: synthetic VTAB-1k folders and few-shot lists,
//! the random-weight `vit_test_patch8_32`, one epoch of a handful of images per run.

use std::path::{Path, PathBuf};

use serde_json::Value;

mod common;
use common::{dtl, ok, text};

/// Writes a 32x32 image whose colour depends on `label`, so a run can learn something.
fn image(path: &Path, label: usize, i: usize) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let img = dtl_data::image::RgbImage::from_fn(32, 32, |x, y| {
        let v = ((x + y) as usize * 3 + i * 7) as u8;
        if label == 0 {
            dtl_data::image::Rgb([200, v, 20])
        } else {
            dtl_data::image::Rgb([20, v, 200])
        }
    });
    img.save(path).unwrap();
}

/// `<root>/<task>/{train800val200,test}.txt` with 4 images each, labels 0 and 1.
fn vtab_task(root: &Path, task: &str) {
    let dir = root.join(task);
    for split in ["train800val200", "test"] {
        let mut list = String::new();
        for i in 0..4 {
            let rel = format!("images/{split}_{i}.png");
            image(&dir.join(&rel), i % 2, i);
            list.push_str(&format!("{rel} {}\n", i % 2));
        }
        std::fs::write(dir.join(format!("{split}.txt")), list).unwrap();
    }
}

fn pipeline(dir: &Path, file: &str, name: &str, out: &Path, data: &str) -> PathBuf {
    let p = dir.join(file);
    std::fs::write(
        &p,
        format!(
            r#"[run]
name = "{name}"
output_dir = "{}"
log_every = 1

[backbone]
kind = "vit_test_patch8_32"

[side]
kind = "dtl"
taps = "0-3"
injects = "2-3"

[head]
classes = 2

[optim]
lr = 0.01

[schedule]
kind = "constant"
epochs = 1
warmup_epochs = 0

[data]
batch_size = 2
workers = 1
{data}
"#,
            out.display()
        ),
    )
    .unwrap();
    p
}

fn read_json(p: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn top1(run: &Path) -> f64 {
    100.0
        * read_json(&run.join("report.json"))["top1"]
            .as_f64()
            .unwrap()
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-9
}

/// A VTAB-1k sweep of four tasks (two Natural, one Specialized, one Structured): the sweep
/// shows its progress, `--skip-done` skips the finished runs, resumes an interrupted one and
/// reruns a changed one, and `dtl summarize` gives the means computed here by hand, shows the
/// tasks not run as missing, draws the picture, and refuses a truncated report.
#[test]
fn vtab_sweep_resumes_and_summarizes() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("vtab");
    let runs = tmp.path().join("runs");
    let tasks = ["cifar", "dtd", "eurosat", "kitti"];
    let mut files = Vec::new();
    for t in tasks {
        vtab_task(&data, t);
        let spec = format!(
            "kind = \"vtab-1k\"\nroot = \"{}\"\ntask = \"{t}\"\ntrain = \"train800val200\"\n[data.options]\nclasses = 2",
            data.display()
        );
        files.push(pipeline(
            tmp.path(),
            &format!("{t}.toml"),
            &format!("vtab-{t}-dtl"),
            &runs,
            &spec,
        ));
    }
    let args: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
    let mut run_args: Vec<&str> = vec!["run", "--no-progress"];
    run_args.extend(args.iter().map(String::as_str));
    let err = ok(&dtl(&run_args));
    assert!(err.contains("sweep: run 1 of 4"), "{err}");
    assert!(
        err.contains("sweep: run 4 of 4") && err.contains("3 trained"),
        "{err}"
    );
    assert!(err.contains("ETA"), "{err}");

    // Everything is done: nothing runs again and no run directory is added.
    let mut skip = run_args.clone();
    skip.push("--skip-done");
    let err = ok(&dtl(&skip));
    assert_eq!(err.matches("done already, skipped").count(), 4, "{err}");
    assert_eq!(std::fs::read_dir(&runs).unwrap().count(), 4);

    // An interrupted run (checkpoint, no report) is resumed in its own directory.
    let dtd = runs.join("vtab-dtd-dtl");
    let before = top1(&dtd);
    std::fs::remove_file(dtd.join("report.json")).unwrap();
    let err = ok(&dtl(&skip));
    assert!(err.contains("interrupted, resuming"), "{err}");
    assert_eq!(err.matches("done already, skipped").count(), 3, "{err}");
    assert!(
        close(top1(&dtd), before),
        "the resumed run ends where it was"
    );
    assert_eq!(std::fs::read_dir(&runs).unwrap().count(), 4);

    // A run interrupted before its first checkpoint starts again in its own directory.
    std::fs::remove_file(dtd.join("report.json")).unwrap();
    std::fs::remove_file(dtd.join("last.safetensors")).unwrap();
    let err = ok(&dtl(&skip));
    assert!(err.contains("before its first checkpoint"), "{err}");
    assert!(
        close(top1(&dtd), before),
        "the same pipeline trains to the same result"
    );
    assert_eq!(std::fs::read_dir(&runs).unwrap().count(), 4);

    // A changed pipeline is a new run, in a new directory.
    let kitti = files[3].display().to_string();
    let err = ok(&dtl(&[
        "run",
        "--no-progress",
        "--skip-done",
        &kitti,
        "optim.lr=0.02",
    ]));
    assert!(!err.contains("skipped"), "{err}");
    assert!(runs.join("vtab-kitti-dtl-2").join("report.json").is_file());

    // Summarize the four tasks (the lr=0.02 rerun left aside).
    let out = tmp.path().join("summary");
    let dirs: Vec<String> = tasks
        .iter()
        .map(|t| runs.join(format!("vtab-{t}-dtl")).display().to_string())
        .collect();
    let mut sum_args: Vec<&str> = vec!["summarize", "--out", out.to_str().unwrap()];
    sum_args.extend(dirs.iter().map(String::as_str));
    let res = dtl(&sum_args);
    ok(&res);
    let acc: Vec<f64> = tasks
        .iter()
        .map(|t| top1(&runs.join(format!("vtab-{t}-dtl"))))
        .collect();
    let natural = (acc[0] + acc[1]) / 2.0;
    let (specialized, structured) = (acc[2], acc[3]);
    let s = read_json(&out.join("summary.json"));
    let col = &s["vtab"][0];
    assert_eq!(col["method"], "DTL");
    assert_eq!(col["tasks_run"], 4);
    assert!(close(col["tasks"]["cifar_100"].as_f64().unwrap(), acc[0]));
    assert!(
        col["tasks"].get("svhn").is_none(),
        "a task not run is absent"
    );
    let groups: Vec<f64> = col["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g[1].as_f64().unwrap())
        .collect();
    assert!(close(groups[0], natural), "{groups:?}");
    assert!(close(groups[1], specialized) && close(groups[2], structured));
    let mog = (natural + specialized + structured) / 3.0;
    assert!(close(col["mean_of_groups"].as_f64().unwrap(), mog));
    let mot = acc.iter().sum::<f64>() / 4.0;
    assert!(close(col["mean_of_tasks"].as_f64().unwrap(), mot));
    let md = std::fs::read_to_string(out.join("summary.md")).unwrap();
    assert!(md.contains("| Natural | svhn | - |"), "{md}");
    assert!(
        md.contains(&format!("| **Natural mean** | | {natural:.2} |")),
        "{md}"
    );
    assert!(
        md.contains(&format!("| **mean of the group means** | | {mog:.2} |")),
        "{md}"
    );
    assert!(md.contains("4 of 19"), "{md}");
    assert_eq!(text(&res.stdout), md, "stdout is the markdown");
    let png = std::fs::read(out.join("summary.png")).unwrap();
    assert_eq!(&png[1..4], b"PNG");
    let svg = std::fs::read_to_string(out.join("summary.svg")).unwrap();
    assert!(svg.contains("VTAB-1k") && svg.contains("cifar_100"));

    // A reference row: its value and the difference per task and per mean.
    let reference = tmp.path().join("ref.json");
    std::fs::write(
        &reference,
        r#"{"name": "ref", "tasks": {"cifar_100": 50.0, "dtd": 40.0, "eurosat": 30.0, "kitti": 20.0}}"#,
    )
    .unwrap();
    let mut ref_args = sum_args.clone();
    ref_args.extend(["--reference", reference.to_str().unwrap()]);
    ok(&dtl(&ref_args));
    let md = std::fs::read_to_string(out.join("summary.md")).unwrap();
    assert!(md.contains("| DTL | ref | DTL - ref |"), "{md}");
    assert!(
        md.contains(&format!(
            "| Natural | cifar_100 | {:.2} | 50.00 | {:+.2} |",
            acc[0],
            acc[0] - 50.0
        )),
        "{md}"
    );
    assert!(md.contains("| Natural | svhn | - | - | - |"), "{md}");
    let ref_mog = (45.0 + 30.0 + 20.0) / 3.0;
    assert!(
        md.contains(&format!(
            "| **mean of the group means** | | {mog:.2} | {ref_mog:.2} | {:+.2} |",
            mog - ref_mog
        )),
        "{md}"
    );
    std::fs::write(
        &reference,
        r#"{"name": "ref", "tasks": {"imagenet": 50.0}}"#,
    )
    .unwrap();
    let err = text(&dtl(&ref_args).stderr);
    assert!(
        err.contains("tasks.imagenet") && err.contains("cifar_100"),
        "{err}"
    );

    // A truncated report is refused, naming the run.
    let report = runs.join("vtab-eurosat-dtl").join("report.json");
    let full = std::fs::read_to_string(&report).unwrap();
    std::fs::write(&report, &full[..full.len() / 2]).unwrap();
    let res = dtl(&sum_args);
    let err = text(&res.stderr);
    assert_eq!(res.status.code(), Some(1), "{err}");
    assert!(
        err.contains("vtab-eurosat-dtl") && err.contains("corrupt"),
        "{err}"
    );
    // An unfinished run is refused too.
    std::fs::remove_file(&report).unwrap();
    let err = text(&dtl(&sum_args).stderr);
    assert!(
        err.contains("vtab-eurosat-dtl") && err.contains("unfinished"),
        "{err}"
    );
}

/// Few-shot lists for one dataset, two shot counts and two seeds: `dtl summarize` gives the
/// mean and standard deviation over the seeds per shot, as table and curve; plain runs get one
/// row each, sorted by a column.
#[test]
fn few_shot_runs_summarize_over_seeds() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("FGFS");
    let ann = root.join("few-shot_split/oxford-pets/annotations");
    std::fs::create_dir_all(&ann).unwrap();
    let mut test = String::new();
    for i in 0..4 {
        let rel = format!("images/test_{i}.png");
        image(&root.join("oxford-pets").join(&rel), i % 2, i);
        test.push_str(&format!("{rel} {}\n", i % 2));
    }
    std::fs::write(ann.join("test_meta.list"), &test).unwrap();
    std::fs::write(ann.join("val_meta.list"), &test).unwrap();
    let runs = tmp.path().join("runs");
    let mut files = Vec::new();
    for shots in [1usize, 2] {
        for seed in [0usize, 1] {
            let mut list = String::new();
            for c in 0..2 {
                for k in 0..shots {
                    let rel = format!("images/train_{shots}_{seed}_{c}_{k}.png");
                    image(&root.join("oxford-pets").join(&rel), c, k + seed * 3);
                    list.push_str(&format!("{rel} {c}\n"));
                }
            }
            std::fs::write(
                ann.join(format!("train_meta.list.num_shot_{shots}.seed_{seed}")),
                list,
            )
            .unwrap();
            let spec = format!(
                "kind = \"few-shot\"\nroot = \"{}\"\ntask = \"oxford-pets\"\n[data.options]\nshots = {shots}\nseed = {seed}\nclasses = 2",
                root.display()
            );
            files.push(pipeline(
                tmp.path(),
                &format!("fs-{shots}-{seed}.toml"),
                &format!("fs-pets-{shots}shot-seed{seed}"),
                &runs,
                &spec,
            ));
        }
    }
    let args: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
    let mut run_args: Vec<&str> = vec!["run", "--no-progress"];
    run_args.extend(args.iter().map(String::as_str));
    ok(&dtl(&run_args));
    let out = tmp.path().join("summary");
    ok(&dtl(&[
        "summarize",
        runs.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]));
    let s = read_json(&out.join("summary.json"));
    let curve = s["few_shot"]["oxford-pets"]["DTL"].as_array().unwrap();
    assert_eq!(curve.len(), 2);
    for (i, shots) in [1u64, 2].iter().enumerate() {
        let a = top1(&runs.join(format!("fs-pets-{shots}shot-seed0")));
        let b = top1(&runs.join(format!("fs-pets-{shots}shot-seed1")));
        let mean = (a + b) / 2.0;
        // Sample standard deviation of two values.
        let std = (a - b).abs() / 2f64.sqrt();
        assert_eq!(curve[i]["shots"], *shots);
        assert_eq!(curve[i]["seeds"], 2);
        assert!(close(curve[i]["mean"].as_f64().unwrap(), mean), "{curve:?}");
        assert!(close(curve[i]["std"].as_f64().unwrap(), std), "{curve:?}");
    }
    let md = std::fs::read_to_string(out.join("summary.md")).unwrap();
    assert!(md.contains("### oxford-pets") && md.contains("1-shot") && md.contains("2 seeds"));
    assert!(std::fs::metadata(out.join("summary.png")).unwrap().len() > 1000);

    // The same runs seen as plain runs (their pipelines without the few-shot data section):
    // one row per run, sorted by top-1 with the best first.
    for e in std::fs::read_dir(&runs).unwrap() {
        let p = e.unwrap().path().join("pipeline.toml");
        let t = std::fs::read_to_string(&p).unwrap();
        std::fs::write(
            &p,
            t.replace("kind = \"few-shot\"", "kind = \"image-folder\""),
        )
        .unwrap();
    }
    let res = dtl(&[
        "summarize",
        runs.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--sort",
        "top1",
    ]);
    ok(&res);
    let s = read_json(&out.join("summary.json"));
    let order: Vec<&str> = s["others"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(order.len(), 4);
    let accs: Vec<f64> = order.iter().map(|n| top1(&runs.join(n))).collect();
    assert!(accs.windows(2).all(|w| w[0] >= w[1]), "{order:?} {accs:?}");
    let res = dtl(&["summarize", runs.to_str().unwrap(), "--sort", "colour"]);
    let err = text(&res.stderr);
    assert_eq!(res.status.code(), Some(1), "{err}");
    assert!(
        err.contains("--sort colour") && err.contains("top1"),
        "{err}"
    );

    // The recipe's protocol: the train and test transforms of the few-shot recipes (at 32
    // pixels), evaluation on the validation list during training, and the test split
    // evaluated once with the checkpoint of the best validation top-1.
    let spec = format!(
        "kind = \"few-shot\"\nroot = \"{}\"\ntask = \"oxford-pets\"\n[data.options]\nshots = 2\nseed = 0\nclasses = 2\n\
[augment]\ntrain = [{{ op = \"random_resized_crop\", size = 32, interpolation = \"bicubic\" }}, {{ op = \"hflip\" }}, \
{{ op = \"rand_augment\", config = \"rand-m9-mstd0.5-inc1\" }}, {{ op = \"normalize\" }}]\n\
test = [{{ op = \"resize\", size = 36, interpolation = \"bicubic\" }}, {{ op = \"center_crop\", size = 32 }}, {{ op = \"normalize\" }}]\n\
[eval]\nval = \"val\"\nevery = 2",
        root.display()
    );
    let vruns = tmp.path().join("val-runs");
    let f = pipeline(tmp.path(), "fs-val.toml", "fs-val", &vruns, &spec);
    ok(&dtl(&[
        "run",
        "--no-progress",
        f.to_str().unwrap(),
        "schedule.epochs=4",
    ]));
    let dir = vruns.join("fs-val");
    let report = read_json(&dir.join("report.json"));
    // A validation split that does not exist is refused before training, naming the key.
    let res = dtl(&[
        "run",
        "--no-progress",
        f.to_str().unwrap(),
        "eval.val=nosuch",
        "run.name=fs-bad-val",
    ]);
    let err = text(&res.stderr);
    assert_eq!(res.status.code(), Some(1), "{err}");
    assert!(err.contains("eval.val = \"nosuch\""), "{err}");
    assert!(!vruns.join("fs-bad-val").join("metrics.jsonl").exists());
    assert_eq!(report["eval_split"], "val");
    assert_eq!(report["tested_checkpoint"], "best");
    assert!(report["best_val_top1"].is_number(), "{report}");
    let epochs: Vec<Value> = std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| v["kind"] == "epoch")
        .collect();
    assert_eq!(epochs.len(), 4);
    let evaluated: Vec<u64> = epochs
        .iter()
        .filter(|v| v["val_top1"].is_number())
        .map(|v| v["epoch"].as_u64().unwrap())
        .collect();
    assert_eq!(evaluated, [2, 4], "validation every 2 epochs");
    assert!(
        epochs.iter().all(|v| v.get("top1").is_none()),
        "no test evaluation during training"
    );
    // The reported test top-1 is the best checkpoint's, as `dtl eval` of the run finds.
    let out = dtl(&["eval", dir.to_str().unwrap()]);
    ok(&out);
    let shown = format!("top-1 {:.2}%", 100.0 * report["top1"].as_f64().unwrap());
    assert!(
        text(&out.stdout).contains(&shown),
        "{} vs {shown}",
        text(&out.stdout)
    );
    let md = std::fs::read_to_string(dir.join("report.md")).unwrap();
    assert!(
        md.contains("best val top-1") && md.contains("test top-1 (that checkpoint)"),
        "{md}"
    );
}

/// A 32x32 image of one of four colours (the class), with a pattern that varies with `i`.
fn image4(path: &Path, label: usize, i: usize) {
    const COLOURS: [[u8; 3]; 4] = [[200, 40, 20], [20, 200, 40], [20, 40, 200], [200, 200, 20]];
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let c = COLOURS[label];
    let img = dtl_data::image::RgbImage::from_fn(32, 32, |x, y| {
        let v = ((x * 5 + y * 3) as usize + i * 11) as u8 / 4;
        dtl_data::image::Rgb([c[0].saturating_add(v), c[1], c[2].saturating_sub(v)])
    });
    img.save(path).unwrap();
}

const WNIDS: [&str; 4] = ["n01", "n02", "n03", "n04"];

/// A domain-generalisation folder: ImageNet-style training lists (2 shots, seeds 0 and 1) and
/// validation list over four WordNet-id classes, an ImageNet-R-style target list holding two of
/// the classes (labels 1 and 3, file names with spaces), and a sketch folder of one image per
/// class (`<root>/sketch/<wnid>/<image>`, no list).
fn dg_folder(root: &Path) {
    let inet = root.join("imagenet");
    let ann = inet.join("annotations");
    std::fs::create_dir_all(&ann).unwrap();
    for seed in 0..2 {
        let mut list = String::new();
        for (c, w) in WNIDS.iter().enumerate() {
            for k in 0..2 {
                let rel = format!("{w}/{w}_{seed}{k}.png");
                image4(&inet.join("images/train").join(&rel), c, k + 3 * seed);
                list.push_str(&format!("{rel} {c}\n"));
            }
        }
        std::fs::write(
            ann.join(format!("train_meta.list.num_shot_2.seed_{seed}")),
            list,
        )
        .unwrap();
    }
    let mut val = String::new();
    for (c, w) in WNIDS.iter().enumerate() {
        for k in 0..2 {
            let rel = format!("{w}/val_{k}.png");
            image4(&inet.join("images/val").join(&rel), c, 7 + k);
            val.push_str(&format!("{rel} {c}\n"));
        }
    }
    std::fs::write(ann.join("val_meta.list"), val).unwrap();
    let r = root.join("imagenet-rendition");
    std::fs::create_dir_all(r.join("annotations")).unwrap();
    let mut list = String::new();
    for c in [1usize, 3] {
        for k in 0..3 {
            let rel = format!("imagenet-r/{}/art {k}.png", WNIDS[c]);
            // Drawn in another class's colour, so that the subset decides the prediction.
            image4(&r.join(&rel), (c + 1) % 4, 20 + k);
            list.push_str(&format!("{rel} {c}\n"));
        }
    }
    std::fs::write(r.join("annotations/val_meta.list"), list).unwrap();
    for (c, w) in WNIDS.iter().enumerate() {
        image4(&root.join("sketch").join(w).join("s.png"), c, 30 + c);
    }
}

fn dg_pipeline(
    dir: &Path,
    name: &str,
    out: &Path,
    root: &Path,
    seed: usize,
    side: &str,
    tests: &str,
) -> PathBuf {
    let p = dir.join(format!("{name}.toml"));
    std::fs::write(
        &p,
        format!(
            r#"[run]
name = "{name}"
output_dir = "{out}"
log_every = 1

[backbone]
kind = "vit_test_patch8_32"

[side]
kind = "{side}"
taps = "0-3"
injects = "2-3"

[head]
classes = 4

[optim]
lr = 0.01

[schedule]
kind = "constant"
epochs = 2

[data]
kind = "domain-generalization"
root = "{root}"
task = "imagenet"
test = "test"
batch_size = 4
workers = 1

[data.options]
shots = 2
seed = {seed}
classes = 4
{tests}"#,
            out = out.display(),
            root = root.display()
        ),
    )
    .unwrap();
    p
}

const DG_TESTS: &str = r#"
[[eval.tests]]
name = "imagenet-r"
split = "imagenet-r"
classes = "present"
during_training = true

[[eval.tests]]
name = "sketch"
kind = "class-folder"
root = "dg/sketch"
options = { class_index = "../imagenet/annotations/train_meta.list.num_shot_2.seed_0" }
"#;

/// Top-1 and mean cross-entropy of `logits` (rows of `classes`) over the classes `keep`.
fn subset_scores(logits: &[f32], labels: &[usize], classes: usize, keep: &[usize]) -> (f64, f64) {
    let (mut hits, mut loss) = (0usize, 0f64);
    for (row, &l) in logits.chunks_exact(classes).zip(labels) {
        let best = keep
            .iter()
            .copied()
            .max_by(|&a, &b| row[a].total_cmp(&row[b]))
            .unwrap();
        hits += (best == l) as usize;
        let m = keep.iter().map(|&k| row[k] as f64).fold(f64::MIN, f64::max);
        let lse = m + keep
            .iter()
            .map(|&k| (row[k] as f64 - m).exp())
            .sum::<f64>()
            .ln();
        loss += lse - row[l] as f64;
    }
    (
        hits as f64 / labels.len() as f64,
        loss / labels.len() as f64,
    )
}

/// Two test sets in one run, one of them a class subset: both reported by name (report,
/// metrics, terminal) with their counts; the subset's top-1 and loss are those computed here
/// from the trained model's logits over its two classes; a label outside an explicit subset
/// and duplicate names are refused before training; `dtl summarize` gives the means over the
/// seeds per method and test set.
#[test]
fn domain_generalization_test_sets_and_summary() {
    use dtl_vit::__dfdx::prelude::*;

    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("dg");
    dg_folder(&root);
    let runs = tmp.path().join("runs");
    let mut files = Vec::new();
    for (seed, side) in [(0, "dtl"), (1, "dtl"), (0, "dtl+")] {
        let name = format!("dg-seed{seed}-{side}");
        files.push(dg_pipeline(
            tmp.path(),
            &name,
            &runs,
            &root,
            seed,
            side,
            DG_TESTS,
        ));
    }
    let args: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
    let mut run_args: Vec<&str> = vec!["run", "--no-progress"];
    run_args.extend(args.iter().map(String::as_str));
    let out = dtl(&run_args);
    ok(&out);
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("  imagenet-r: top-1 ") && stdout.contains("(6 images, 2 classes)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("  sketch: top-1 ") && stdout.contains("(4 images, 4 classes)"),
        "{stdout}"
    );

    let dir = runs.join("dg-seed0-dtl");
    let report = read_json(&dir.join("report.json"));
    assert_eq!(report["test_images"], 8);
    assert_eq!(report["test_classes"], 4);
    let r = &report["tests"]["imagenet-r"];
    assert_eq!(
        (r["images"].as_u64(), r["classes"].as_u64()),
        (Some(6), Some(2)),
        "{report}"
    );
    let s = &report["tests"]["sketch"];
    assert_eq!(
        (s["images"].as_u64(), s["classes"].as_u64()),
        (Some(4), Some(4)),
        "{report}"
    );
    let md = std::fs::read_to_string(dir.join("report.md")).unwrap();
    assert!(
        md.contains("| test (data.test) |")
            && md.contains("| imagenet-r | ")
            && md.contains(" | 6 | 2 |"),
        "{md}"
    );
    let metrics: Vec<Value> = std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let tests: Vec<&Value> = metrics.iter().filter(|v| v["kind"] == "test").collect();
    assert_eq!(tests.len(), 2);
    assert_eq!(
        (tests[0]["name"].as_str(), tests[1]["name"].as_str()),
        (Some("imagenet-r"), Some("sketch"))
    );
    assert!(close(
        tests[0]["top1"].as_f64().unwrap(),
        r["top1"].as_f64().unwrap()
    ));
    let epochs: Vec<&Value> = metrics.iter().filter(|v| v["kind"] == "epoch").collect();
    assert!(
        epochs
            .iter()
            .all(|e| e["tests"]["imagenet-r"]["top1"].is_number()
                && e["tests"].get("sketch").is_none()),
        "only the test set with during_training is evaluated during training: {epochs:?}"
    );

    // The subset's scores by hand: the trained model's logits (the tape-based CPU model of the
    // same backbone, loaded from the run's checkpoint), the best of classes 1 and 3.
    let cfg = dtl_core::PipelineConfig::load(&dir.join("pipeline.toml"), &[]).unwrap();
    let mut tcfg = cfg.clone();
    tcfg.data = cfg.eval.tests[0].data_config(&cfg.data);
    let data = dtl_data::DataPipeline::test_only(&tcfg, 32, 4).unwrap();
    let vit = std::sync::Arc::new(
        dtl_vit::random::<dtl_vit::variants::VitTestPatch8_32>(cfg.run.seed).unwrap(),
    );
    let dev = Cpu::default();
    let mut model = dtl_runner::step::build_model(&cfg, &vit, 4, &dev).unwrap();
    dtl_runner::checkpoint::load(&dir.join("last.safetensors"))
        .unwrap()
        .apply(model.params_mut())
        .unwrap();
    let (mut logits, mut labels) = (Vec::new(), Vec::new());
    for b in data.test_loader().unwrap() {
        let b = b.unwrap();
        let x = dev.tensor_from_vec(b.images.clone(), (b.n, Const::<3>, 32, 32));
        logits.extend(model.forward_eval(&x).unwrap().as_vec());
        labels.extend(b.labels);
    }
    assert_eq!(labels.len(), 6);
    let (top1_sub, loss_sub) = subset_scores(&logits, &labels, 4, &[1, 3]);
    let (top1_all, loss_all) = subset_scores(&logits, &labels, 4, &[0, 1, 2, 3]);
    assert!(
        close(r["top1"].as_f64().unwrap(), top1_sub),
        "{r} vs {top1_sub}"
    );
    let loss = r["loss"].as_f64().unwrap();
    assert!(
        (loss - loss_sub).abs() < 1e-3 * loss_sub.max(1.0),
        "{loss} vs {loss_sub}"
    );
    assert!(
        loss_all > loss_sub + 1e-6,
        "the subset's loss leaves the other classes out"
    );

    // Drawn in the colours of classes 0 and 2, the images are predicted right only among 1 and 3.
    assert!(top1_all < top1_sub, "{top1_all} vs {top1_sub}");
    // A label outside an explicit subset is refused before training, naming the item.
    let bad = dg_pipeline(
        tmp.path(),
        "dg-bad",
        &runs,
        &root,
        0,
        "dtl",
        "[[eval.tests]]\nname = \"imagenet-r\"\nsplit = \"imagenet-r\"\nclasses = [1]\n",
    );
    let res = dtl(&["run", "--no-progress", bad.to_str().unwrap()]);
    let err = text(&res.stderr);
    assert_eq!(res.status.code(), Some(1), "{err}");
    assert!(
        err.contains("eval.tests[0] (`imagenet-r`).classes")
            && err.contains("n04/art 0.png")
            && err.contains("label 3"),
        "{err}"
    );
    assert!(!runs.join("dg-bad").join("metrics.jsonl").exists());
    // Duplicate names, an unknown layout and a missing target are errors naming the key.
    let dup = dg_pipeline(
        tmp.path(),
        "dg-dup",
        &runs,
        &root,
        0,
        "dtl",
        "[[eval.tests]]\nname = \"a\"\nsplit = \"imagenet-r\"\n[[eval.tests]]\nname = \"a\"\nkind = \"folders\"\n",
    );
    let err = text(&dtl(&["validate", dup.to_str().unwrap()]).stderr);
    assert!(
        err.contains("eval.tests[1].name") && err.contains("used twice"),
        "{err}"
    );
    assert!(
        err.contains("eval.tests[1].kind") && err.contains("class-folder"),
        "{err}"
    );
    let missing = dg_pipeline(
        tmp.path(),
        "dg-missing",
        &runs,
        &root,
        0,
        "dtl",
        "[[eval.tests]]\nname = \"a\"\nsplit = \"imagenet-a\"\n",
    );
    let res = dtl(&["run", "--no-progress", missing.to_str().unwrap()]);
    let err = text(&res.stderr);
    assert_eq!(res.status.code(), Some(1), "{err}");
    assert!(
        err.contains("eval.tests[0] (`a`)") && err.contains("imagenet-adversarial"),
        "{err}"
    );

    // The summary: per method, per test set, the mean and standard deviation over the runs.
    let sum = tmp.path().join("summary");
    let dirs: Vec<String> = ["dg-seed0-dtl", "dg-seed1-dtl", "dg-seed0-dtl+"]
        .iter()
        .map(|n| runs.join(n).display().to_string())
        .collect();
    let mut sum_args: Vec<&str> = vec!["summarize", "--out", sum.to_str().unwrap()];
    sum_args.extend(dirs.iter().map(String::as_str));
    let res = dtl(&sum_args);
    ok(&res);
    let s = read_json(&sum.join("summary.json"));
    let dg = &s["domain_generalization"];
    assert_eq!(
        dg["sets"],
        serde_json::json!(["imagenet", "imagenet-sketch", "imagenet-rendition"])
    );
    let reports: Vec<Value> = ["dg-seed0-dtl", "dg-seed1-dtl"]
        .iter()
        .map(|n| read_json(&runs.join(n).join("report.json")))
        .collect();
    for (set, pick) in [
        (
            "imagenet",
            &(|r: &Value| r["top1"].as_f64().unwrap()) as &dyn Fn(&Value) -> f64,
        ),
        ("imagenet-rendition", &|r: &Value| {
            r["tests"]["imagenet-r"]["top1"].as_f64().unwrap()
        }),
        ("imagenet-sketch", &|r: &Value| {
            r["tests"]["sketch"]["top1"].as_f64().unwrap()
        }),
    ] {
        let (a, b) = (100.0 * pick(&reports[0]), 100.0 * pick(&reports[1]));
        let cell = &dg["methods"]["DTL"][set];
        assert_eq!(cell["runs"], 2, "{cell}");
        assert!(
            close(cell["mean"].as_f64().unwrap(), (a + b) / 2.0),
            "{set}: {cell}"
        );
        assert!(
            close(cell["std"].as_f64().unwrap(), (a - b).abs() / 2f64.sqrt()),
            "{set}: {cell}"
        );
    }
    assert_eq!(dg["methods"]["DTL+ (k=3)"]["imagenet"]["runs"], 1);
    let md = std::fs::read_to_string(sum.join("summary.md")).unwrap();
    assert!(
        md.contains("## Domain generalisation")
            && md.contains("| method | ImageNet | -Sketch | -R |"),
        "{md}"
    );
    assert!(
        md.contains("| DTL+ (k=3) |") && md.contains("(2 runs)"),
        "{md}"
    );
    assert_eq!(text(&res.stdout), md);
    assert!(std::fs::metadata(sum.join("summary.png")).unwrap().len() > 1000);
}

/// The shipped domain-generalisation recipes: 24, every one valid but for the data and the
/// weights a user brings.
#[test]
fn domain_generalization_recipes_validate() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../pipelines/domain-generalization");
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .map(|p| p.display().to_string())
        .collect();
    files.sort();
    assert_eq!(files.len(), 24);
    let mut args = vec!["validate"];
    args.extend(files.iter().map(String::as_str));
    let res = dtl(&args);
    let err = text(&res.stderr);
    let problems: Vec<&str> = err.lines().filter(|l| l.contains("error")).collect();
    assert!(
        !problems.is_empty(),
        "the data and weights are absent here: {err}"
    );
    for l in problems {
        assert!(
            l.contains("data.root") || l.contains("backbone.weights") || !l.contains(": "),
            "{l}"
        );
    }
    let cfg =
        dtl_core::PipelineConfig::load(&dir.join("dg-adversarial-seed2-dtl+.toml"), &[]).unwrap();
    assert_eq!(
        (cfg.optim.lr, cfg.side.kernel_size(), cfg.data.test.as_str()),
        (8e-5, 3, "imagenet-adversarial")
    );
    assert_eq!(
        cfg.eval.test_classes,
        Some(dtl_core::config::ClassSubset::Present)
    );
    assert_eq!(cfg.data.options["seed"].as_integer(), Some(2));
    let cfg = dtl_core::PipelineConfig::load(&dir.join("dg-imagenet-seed0-dtl.toml"), &[]).unwrap();
    assert_eq!((cfg.optim.lr, cfg.eval.tests.len()), (1e-4, 1));
    assert_eq!(cfg.eval.tests[0].split.as_deref(), Some("imagenetv2"));
}
