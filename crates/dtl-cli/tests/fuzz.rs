//! A stable-Rust fuzz harness for everything that reads untrusted bytes: the pipeline parser
//! and validator, the safetensors and npz weight readers, image decoding followed by the
//! augmentation chain, and the CSV and list dataset parsers.
//!
//! Each target takes bytes and must answer `Ok` or an error, never panic, hang or abort. The
//! inputs are the seeds named below plus `tests/fuzz/corpus/<target>/*`, then mutations of
//! them by a seeded mutator (bit flips, boundary bytes, inserted and deleted runs, splices,
//! huge and negative numbers in text). An input whose outcome (its error message with the
//! numbers taken out) has not been seen before is kept in the corpus when `DTL_FUZZ_SAVE=1`;
//! an input that panics is written to `tests/fuzz/crashes/<target>/`.
//!
//! In CI the test replays the corpus and a fixed number of mutations per target in a few
//! seconds. `scripts/fuzz.sh` runs each target for a set time:
//! `DTL_FUZZ_SECONDS=60 DTL_FUZZ_SAVE=1 cargo test --release -p dtl-cli --test fuzz -- --nocapture`.

use std::collections::BTreeSet;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use dtl_core::config::{validate, ValidationContext};
use dtl_core::{registry, PipelineConfig, Sample, Split};

// Link the plugins: their registrations are what the validator and the datasets look up.
use dtl_data as _;
use dtl_vit as _;

mod common;
use common::workspace;

/// xorshift64*: small, seeded, reproducible.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

const NUMBERS: &[&str] = &[
    "0",
    "-1",
    "4000000000",
    "4611686018427387904",
    "18446744073709551615",
    "1e309",
    "nan",
    "-inf",
    "30000",
    "99999999999999999999999",
];

/// One to four random edits of `input`, sometimes splicing in part of `other`.
fn mutate(rng: &mut Rng, input: &[u8], other: &[u8]) -> Vec<u8> {
    let mut v = input.to_vec();
    for _ in 0..1 + rng.below(4) {
        let len = v.len();
        match rng.below(9) {
            0 if len > 0 => {
                let i = rng.below(len);
                v[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                v[i] = [0u8, 0xff, 0x7f, 0x80, b'\n', b'"', b'[', b','][rng.below(8)];
            }
            2 => {
                let i = rng.below(len + 1);
                let n = 1 + rng.below(16);
                let bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                v.splice(i..i, bytes);
            }
            3 if len > 0 => {
                let i = rng.below(len);
                let n = 1 + rng.below((len - i).min(64));
                v.drain(i..i + n);
            }
            4 if len > 0 => {
                let i = rng.below(len);
                let n = 1 + rng.below((len - i).min(64));
                let run = v[i..i + n].to_vec();
                v.splice(i..i, run);
            }
            5 if !other.is_empty() => {
                let i = rng.below(len + 1);
                let j = rng.below(other.len());
                let n = 1 + rng.below((other.len() - j).min(256));
                v.splice(i..i, other[j..j + n].iter().copied());
            }
            6 => {
                // Replace a run of digits with a number at a boundary.
                let digits: Vec<usize> = (0..len).filter(|&i| v[i].is_ascii_digit()).collect();
                if !digits.is_empty() {
                    let start = digits[rng.below(digits.len())];
                    let mut end = start;
                    while end < len && v[end].is_ascii_digit() {
                        end += 1;
                    }
                    let n = NUMBERS[rng.below(NUMBERS.len())];
                    v.splice(start..end, n.bytes());
                }
            }
            7 if len > 8 => {
                // Overwrite a little-endian integer (a header length, an offset, a size).
                let i = rng.below(len - 8);
                let x: u64 = [0, u64::MAX, u32::MAX as u64, 1 << 40, rng.next()][rng.below(5)];
                v[i..i + 8].copy_from_slice(&x.to_le_bytes());
            }
            _ => {
                if len > 1 {
                    v.truncate(rng.below(len));
                }
            }
        }
    }
    v
}

/// What a target made of one input: `Ok` or the error line.
type Outcome = Result<(), String>;

struct Target {
    name: &'static str,
    seeds: fn() -> Vec<Vec<u8>>,
    run: fn(&[u8], &Path) -> Outcome,
}

fn read(p: &str) -> Vec<u8> {
    std::fs::read(workspace().join(p)).unwrap_or_else(|e| panic!("{p}: {e}"))
}

fn pipeline(bytes: &[u8], scratch: &Path) -> Outcome {
    let text = String::from_utf8_lossy(bytes);
    let file = scratch.join("p.toml");
    let cfg = PipelineConfig::from_str(&text, &file, &[]).map_err(|e| e.to_string())?;
    let reg = registry().map_err(|e| e.to_string())?;
    let cx = ValidationContext {
        file: &file,
        registry: reg,
        device_check: &|_| Ok(()),
    };
    match validate(&cfg, &cx).first() {
        Some(e) => Err(e.to_string()),
        None => {
            let _ = cfg.to_toml();
            Ok(())
        }
    }
}

fn weights(bytes: &[u8], scratch: &Path, name: &str, format: &str) -> Outcome {
    let path = scratch.join(name);
    std::fs::write(&path, bytes).map_err(|e| e.to_string())?;
    let spec = registry()
        .and_then(|r| r.backbone("vit_test_patch8_32").map(|b| b.spec()))
        .map_err(|e| e.to_string())?;
    dtl_vit::load_weights(&spec, &path, format)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

fn safetensors(bytes: &[u8], scratch: &Path) -> Outcome {
    weights(bytes, scratch, "w.safetensors", "safetensors")
}

fn npz(bytes: &[u8], scratch: &Path) -> Outcome {
    weights(bytes, scratch, "w.npz", "npz")
}

fn image_and_augment(bytes: &[u8], _scratch: &Path) -> Outcome {
    let img = dtl_data::datasets::decode_bytes(bytes)?;
    let reg = registry().map_err(|e| e.to_string())?;
    let ops: toml::Value = toml::from_str(
        r#"ops = [
            { op = "random_resized_crop", size = 24 },
            { op = "hflip" },
            { op = "color_jitter", brightness = 0.4, contrast = 0.4, saturation = 0.4, hue = 0.1 },
            { op = "rand_augment", config = "rand-m9-mstd0.5-inc1" },
            { op = "resize", size = 20 },
            { op = "center_crop", size = 16 },
            { op = "normalize", mean = 0.5, std = 0.5 },
            { op = "random_erasing", prob = 1.0, mode = "pixel" },
        ]"#,
    )
    .map_err(|e| e.to_string())?;
    let mut sample = Sample::Rgb(img);
    let mut rng = rand::rngs::mock::StepRng::new(7, 0x9e37_79b9_7f4a_7c15);
    for (i, t) in ops["ops"].as_array().into_iter().flatten().enumerate() {
        let op: dtl_core::config::AugmentOp = t.clone().try_into().map_err(|e| format!("{e}"))?;
        let aug =
            (reg.augment(&op.op).map_err(|e| e.to_string())?.build)(&op, &format!("ops[{i}]"))
                .map_err(|e| e.to_string())?;
        sample = aug.apply(sample, &mut rng).map_err(|e| e.to_string())?;
    }
    Ok(())
}

fn open_both(scratch: &Path, data: &str) -> Outcome {
    let reg = registry().map_err(|e| e.to_string())?;
    let cfg =
        PipelineConfig::from_str(data, &scratch.join("p.toml"), &[]).map_err(|e| e.to_string())?;
    for split in [Split::Train, Split::Test] {
        let ds = reg
            .open_dataset(&cfg.data, split)
            .map_err(|e| e.to_string())?;
        for i in 0..ds.len().min(4) {
            let _ = ds.describe(i);
            let _ = ds.label(i);
            let _ = ds.get(i);
        }
        let _ = ds.num_classes();
    }
    Ok(())
}

fn csv(bytes: &[u8], scratch: &Path) -> Outcome {
    let root = scratch.join("csv");
    std::fs::create_dir_all(&root).map_err(|e| e.to_string())?;
    std::fs::write(root.join("train.csv"), bytes).map_err(|e| e.to_string())?;
    std::fs::write(root.join("test.csv"), bytes).map_err(|e| e.to_string())?;
    open_both(
        scratch,
        "[backbone]\nkind = \"vit_test_patch8_32\"\n[data]\nkind = \"csv\"\nroot = \"csv\"\n",
    )
}

fn list(bytes: &[u8], scratch: &Path) -> Outcome {
    let task = scratch.join("vtab/t");
    std::fs::create_dir_all(task.join("images")).map_err(|e| e.to_string())?;
    let png = read("tests/pipelines/data/train/circle/0.png");
    std::fs::write(task.join("images/a.png"), png).map_err(|e| e.to_string())?;
    std::fs::write(task.join("train.txt"), bytes).map_err(|e| e.to_string())?;
    std::fs::write(task.join("test.txt"), bytes).map_err(|e| e.to_string())?;
    open_both(
        scratch,
        "[backbone]\nkind = \"vit_test_patch8_32\"\n[data]\nkind = \"vtab-1k\"\nroot = \"vtab\"\ntask = \"t\"\ntrain = \"train\"\n",
    )
}

fn targets() -> Vec<Target> {
    vec![
        Target {
            name: "pipeline",
            seeds: || {
                let mut v = vec![
                    read("tests/pipelines/valid.toml"),
                    read("pipelines/quickstart.toml"),
                ];
                let mut broken: Vec<PathBuf> =
                    std::fs::read_dir(workspace().join("tests/pipelines/broken"))
                        .unwrap()
                        .map(|e| e.unwrap().path())
                        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
                        .collect();
                broken.sort();
                v.extend(broken.iter().map(|p| std::fs::read(p).unwrap()));
                v
            },
            run: pipeline,
        },
        Target {
            name: "safetensors",
            seeds: || vec![read("tests/fixtures/dtl-reference/dtl_vit.safetensors")],
            run: safetensors,
        },
        Target {
            name: "npz",
            seeds: || vec![read("tests/fixtures/dtl-reference/dtl_vit.npz")],
            run: npz,
        },
        Target {
            name: "image",
            seeds: || {
                let mut v = vec![read("tests/pipelines/data/train/circle/0.png")];
                let mut jpeg = Vec::new();
                let img = dtl_data::image::RgbImage::from_fn(12, 9, |x, y| {
                    dtl_data::image::Rgb([(x * 20) as u8, (y * 25) as u8, 128])
                });
                img.write_to(
                    &mut std::io::Cursor::new(&mut jpeg),
                    dtl_data::image::ImageFormat::Jpeg,
                )
                .unwrap();
                v.push(jpeg);
                v
            },
            run: image_and_augment,
        },
        Target {
            name: "csv",
            seeds: || {
                vec![
                    read("tests/pipelines/data-csv/train.csv"),
                    b"\xEF\xBB\xBF0,1,2,3,4\n1,5,6,7,8\n".to_vec(),
                ]
            },
            run: csv,
        },
        Target {
            name: "list",
            seeds: || vec![b"images/a.png 0\nimages/a.png 1\n\nimages/a.png 2\n".to_vec()],
            run: list,
        },
    ]
}

/// The outcome with its numbers taken out, as a crude measure of the paths an input reached.
fn feature(o: &Outcome) -> String {
    match o {
        Ok(()) => "ok".into(),
        Err(e) => {
            // Drop the file name, quoted text (it echoes the input) and numbers, and keep the
            // start of the message: that names the check that refused the input.
            let msg = e.split_once(": ").map_or(e.as_str(), |(_, m)| m);
            let mut out = String::new();
            let mut quoted = false;
            for c in msg.chars() {
                match c {
                    '`' | '"' => quoted = !quoted,
                    _ if quoted => {}
                    c if c.is_ascii_digit() => {
                        if !out.ends_with('#') {
                            out.push('#')
                        }
                    }
                    c => out.push(c),
                }
            }
            out.chars().take(60).collect()
        }
    }
}

fn corpus_dir(kind: &str, target: &str) -> PathBuf {
    workspace().join("tests/fuzz").join(kind).join(target)
}

fn load_corpus(target: &str) -> Vec<Vec<u8>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(corpus_dir("corpus", target))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    files.sort();
    files.iter().filter_map(|p| std::fs::read(p).ok()).collect()
}

fn hash(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h = (h ^ *b as u64).wrapping_mul(0x100_0000_01b3);
    }
    format!("{h:016x}")
}

/// New inputs kept per target and run (in memory, and in the corpus when saving).
const MAX_KEPT: usize = 200;

struct Stats {
    execs: usize,
    crashes: Vec<String>,
    kept: usize,
    features: usize,
}

fn fuzz(t: &Target, budget: Budget, save: bool) -> Stats {
    let scratch = tempfile::tempdir().unwrap();
    let mut inputs = (t.seeds)();
    inputs.extend(load_corpus(t.name));
    let mut seen = BTreeSet::new();
    let mut stats = Stats {
        execs: 0,
        crashes: Vec::new(),
        kept: 0,
        features: 0,
    };
    let exec = |input: &[u8], stats: &mut Stats, seen: &mut BTreeSet<String>| -> bool {
        stats.execs += 1;
        let r = catch_unwind(AssertUnwindSafe(|| (t.run)(input, scratch.path())));
        match r {
            Ok(o) => seen.insert(feature(&o)),
            Err(p) => {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                let dir = corpus_dir("crashes", t.name);
                let _ = std::fs::create_dir_all(&dir);
                let file = dir.join(hash(input));
                let _ = std::fs::write(&file, input);
                stats.crashes.push(format!("{}: {msg}", file.display()));
                false
            }
        }
    };
    for input in &inputs {
        exec(input, &mut stats, &mut seen);
    }
    let mut rng = Rng(0x5eed ^ (t.name.len() as u64 * 0x9e37_79b9));
    let start = Instant::now();
    let mut i = 0usize;
    while budget.more(i, start) {
        i += 1;
        let a = &inputs[rng.below(inputs.len())];
        let b = &inputs[rng.below(inputs.len())];
        let m = mutate(&mut rng, a, b);
        if exec(&m, &mut stats, &mut seen) && m.len() <= 64 << 10 && stats.kept < MAX_KEPT {
            if save {
                let dir = corpus_dir("corpus", t.name);
                let _ = std::fs::create_dir_all(&dir);
                let _ = std::fs::write(dir.join(hash(&m)), &m);
            }
            stats.kept += 1;
            inputs.push(m);
        }
    }
    stats.features = seen.len();
    stats
}

#[derive(Clone, Copy)]
enum Budget {
    Iterations(usize),
    Time(Duration),
}

impl Budget {
    fn more(self, done: usize, start: Instant) -> bool {
        match self {
            Budget::Iterations(n) => done < n,
            Budget::Time(d) => start.elapsed() < d,
        }
    }
}

/// Replays the corpus and a fixed number of mutations of every target; nothing may panic.
/// With `DTL_FUZZ_SECONDS` it fuzzes each target for that long instead (`scripts/fuzz.sh`).
#[test]
fn no_input_panics() {
    let save = std::env::var("DTL_FUZZ_SAVE").is_ok_and(|v| v == "1");
    let budget = match std::env::var("DTL_FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        Some(s) => Budget::Time(Duration::from_secs_f64(s)),
        None => Budget::Iterations(40),
    };
    let only = std::env::var("DTL_FUZZ_TARGET").ok();
    // Panics are expected to be caught and reported below, not printed one by one.
    std::panic::set_hook(Box::new(|_| {}));
    let mut failed = Vec::new();
    for t in targets() {
        if only.as_deref().is_some_and(|o| o != t.name) {
            continue;
        }
        let s = fuzz(&t, budget, save);
        println!(
            "fuzz {:<12} {:>8} execs {:>4} outcomes {:>4} new inputs {:>3} crashes",
            t.name,
            s.execs,
            s.features,
            s.kept,
            s.crashes.len()
        );
        failed.extend(s.crashes);
    }
    let _ = std::panic::take_hook();
    assert!(
        failed.is_empty(),
        "inputs that panic:\n{}",
        failed.join("\n")
    );
}
