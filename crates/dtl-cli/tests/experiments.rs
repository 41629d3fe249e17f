//! Sweeps and `dtl summarize` on tiny real runs: synthetic VTAB-1k folders and few-shot lists,
//! the random-weight `vit_test_patch8_32`, one epoch of a handful of images per run.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn dtl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dtl"))
        .args(args)
        .output()
        .expect("the dtl binary runs")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn ok(out: &Output) -> String {
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}\n{}", text(&out.stdout));
    assert!(!err.contains("panicked"), "{err}");
    err
}

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
