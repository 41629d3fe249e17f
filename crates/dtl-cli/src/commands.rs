//! The subcommands. Each returns the process exit code or an error printed as one line.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use dtl_core::config::{validate as validate_config, DeviceSpec, ValidationContext};
use dtl_core::{
    registry, BenchOptions, BuildContext, DtlError, Job, PipelineConfig, Registry, Result, RunEnv,
};

fn device_check(d: DeviceSpec) -> std::result::Result<(), String> {
    match d {
        DeviceSpec::Cpu => Ok(()),
        DeviceSpec::Cuda(n) => dtl_cuda::check_device(n),
    }
}

/// Parses and validates one pipeline; every problem found is returned.
pub fn load_checked(
    reg: &Registry,
    file: &Path,
    overrides: &[String],
) -> std::result::Result<PipelineConfig, Vec<DtlError>> {
    let cfg = PipelineConfig::load(file, overrides).map_err(|e| vec![e])?;
    let cx = ValidationContext {
        file,
        registry: reg,
        device_check: &device_check,
    };
    let errs = validate_config(&cfg, &cx);
    if errs.is_empty() {
        Ok(cfg)
    } else {
        Err(errs)
    }
}

fn report_errors(errs: &[DtlError]) {
    for e in errs {
        eprintln!("error: {e}");
    }
}

/// A run directory that does not exist yet: `<output_dir>/<name>`, then `<name>-2`, `<name>-3`, ...
fn fresh_run_dir(cfg: &PipelineConfig) -> PathBuf {
    let base = cfg.run.output_dir.join(&cfg.run.name);
    if !base.exists() {
        return base;
    }
    (2..)
        .map(|i| cfg.run.output_dir.join(format!("{}-{i}", cfg.run.name)))
        .find(|p| !p.exists())
        .expect("an unused run directory name exists")
}

/// Writes `contents` to `path` through a temporary file and a rename.
pub fn write_atomic(path: &Path, contents: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents).map_err(|e| DtlError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| DtlError::io(path, e))
}

fn build_job(reg: &Registry, cfg: &PipelineConfig, file: &Path) -> Result<Box<dyn Job>> {
    let entry = reg.backbone(&cfg.backbone.kind)?;
    (entry.build)(
        cfg,
        &BuildContext {
            pipeline_file: file.to_path_buf(),
        },
    )
}

fn fmt_pct(v: &serde_json::Value) -> String {
    v.as_f64()
        .map(|x| format!("{:.2}%", 100.0 * x))
        .unwrap_or_else(|| "-".into())
}

fn fmt_num(v: &serde_json::Value, digits: usize) -> String {
    v.as_f64()
        .map(|x| format!("{x:.digits$}"))
        .unwrap_or_else(|| "-".into())
}

/// `dtl run`.
pub fn run(
    args: &[String],
    print_config: bool,
    resume: Option<PathBuf>,
    progress: bool,
) -> Result<ExitCode> {
    let (files, overrides) = crate::split_args(args);
    if files.is_empty() {
        return Err(DtlError::invalid(
            "no pipeline file given; usage: dtl run <PIPELINE.toml>... [KEY=VALUE]...",
        ));
    }
    if resume.is_some() && files.len() > 1 {
        return Err(DtlError::invalid("--resume takes exactly one pipeline"));
    }
    if let Some(r) = &resume {
        if !r.exists() {
            return Err(DtlError::file(
                r,
                "nothing to resume from: give a run directory written by `dtl run` or its last.safetensors",
            ));
        }
    }
    let reg = registry()?;
    let mut configs = Vec::new();
    let mut failed = false;
    for f in &files {
        match load_checked(reg, f, &overrides) {
            Ok(cfg) => configs.push((f.clone(), cfg)),
            Err(errs) => {
                report_errors(&errs);
                failed = true;
            }
        }
    }
    if failed {
        return Ok(ExitCode::FAILURE);
    }
    if print_config {
        for (f, cfg) in &configs {
            println!("# {} (resolved, every default filled in)", f.display());
            print!("{}", cfg.to_toml());
        }
        return Ok(ExitCode::SUCCESS);
    }
    let mut results = Vec::new();
    for (f, cfg) in &configs {
        let run_dir = match &resume {
            Some(r) if r.is_dir() => r.clone(),
            Some(r) => r
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_else(|| PathBuf::from(".")),
            None => fresh_run_dir(cfg),
        };
        std::fs::create_dir_all(&run_dir).map_err(|e| DtlError::io(&run_dir, e))?;
        write_atomic(&run_dir.join("pipeline.toml"), cfg.to_toml().as_bytes())?;
        eprintln!(
            "dtl: {} -> {} ({} on {}, side {})",
            f.display(),
            run_dir.display(),
            cfg.backbone.kind,
            cfg.run.device,
            cfg.side.kind
        );
        let mut job = build_job(reg, cfg, f)?;
        let env = RunEnv {
            run_dir: run_dir.clone(),
            progress: progress && std::io::stderr().is_terminal(),
            resume: resume.clone(),
        };
        let report = job.train(&env)?;
        println!(
            "{}: top-1 {}  top-5 {}  trainable params {}  wall {} s  -> {}",
            cfg.run.name,
            fmt_pct(&report["top1"]),
            fmt_pct(&report["top5"]),
            report["trainable_params"],
            fmt_num(&report["wall_s"], 1),
            run_dir.display()
        );
        results.push((cfg.clone(), report));
    }
    if results.len() > 1 {
        println!();
        println!(
            "{:<28} {:<8} {:>9} {:>9} {:>12} {:>9} {:>8}",
            "run", "side", "top-1", "top-5", "trainable", "img/s", "wall s"
        );
        for (cfg, r) in &results {
            println!(
                "{:<28} {:<8} {:>9} {:>9} {:>12} {:>9} {:>8}",
                cfg.run.name,
                cfg.side.kind,
                fmt_pct(&r["top1"]),
                fmt_pct(&r["top5"]),
                r["trainable_params"].to_string(),
                fmt_num(&r["train_img_per_s"], 1),
                fmt_num(&r["wall_s"], 1)
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `dtl validate`.
pub fn validate(files: &[PathBuf], overrides: &[String]) -> Result<ExitCode> {
    let reg = registry()?;
    if files.is_empty() {
        return Err(DtlError::invalid(
            "dtl validate: no pipeline file given (arguments containing `=` are overrides)",
        ));
    }
    let mut bad = 0;
    for f in files {
        match load_checked(reg, f, overrides) {
            Ok(_) => println!("{}: ok", f.display()),
            Err(errs) => {
                report_errors(&errs);
                bad += 1;
            }
        }
    }
    if bad > 0 {
        eprintln!("{bad} of {} pipeline(s) invalid", files.len());
        Ok(ExitCode::FAILURE)
    } else {
        Ok(ExitCode::SUCCESS)
    }
}

/// `dtl list`.
pub fn list(what: Option<&str>) -> Result<ExitCode> {
    let reg = registry()?;
    let all = what.is_none();
    let want = |k: &str| all || what == Some(k);
    if want("backbones") {
        println!("backbones:");
        for b in reg.backbones.iter() {
            let s = b.spec();
            println!("  {:<26} {}", b.name, b.description);
            println!(
                "  {:<26} image {} patch {} width {} depth {} heads {} tokens {} params {:.1}M",
                "",
                s.image_size,
                s.patch_size,
                s.width,
                s.depth,
                s.heads,
                s.tokens(),
                s.parameter_count() as f64 / 1e6
            );
        }
    }
    fn section<E: dtl_core::registry::Entry>(title: &str, t: &dtl_core::registry::Table<E>) {
        println!("{title}:");
        for e in t.iter() {
            println!("  {:<26} {}", e.name(), e.description());
        }
    }
    if want("sides") {
        section("side networks", &reg.sides);
    }
    if want("heads") {
        section("heads", &reg.heads);
    }
    if want("datasets") {
        section("datasets", &reg.datasets);
    }
    if want("augment") {
        section("augmentation ops", &reg.augments);
    }
    Ok(ExitCode::SUCCESS)
}

/// `dtl eval`.
pub fn eval(target: &Path, overrides: &[String]) -> Result<ExitCode> {
    let reg = registry()?;
    let (pipeline, checkpoint) = if target.is_dir() {
        (
            target.join("pipeline.toml"),
            target.join("best.safetensors"),
        )
    } else if target.is_file() {
        let dir = target.parent().unwrap_or(Path::new("."));
        (dir.join("pipeline.toml"), target.to_path_buf())
    } else {
        return Err(DtlError::file(
            target,
            "no such run directory or checkpoint; give a folder written by `dtl run` or a .safetensors checkpoint",
        ));
    };
    if !pipeline.is_file() {
        return Err(DtlError::file(
            &pipeline,
            "missing: the run directory must hold the pipeline.toml written by `dtl run`",
        ));
    }
    let cfg = match load_checked(reg, &pipeline, overrides) {
        Ok(c) => c,
        Err(errs) => {
            report_errors(&errs);
            return Ok(ExitCode::FAILURE);
        }
    };
    let mut job = build_job(reg, &cfg, &pipeline)?;
    let env = RunEnv {
        run_dir: pipeline.parent().unwrap_or(Path::new(".")).to_path_buf(),
        progress: std::io::stderr().is_terminal(),
        resume: None,
    };
    let report = job.evaluate(&env, &checkpoint)?;
    println!(
        "{}: top-1 {}  top-5 {}  ({} images, {})",
        checkpoint.display(),
        fmt_pct(&report["top1"]),
        fmt_pct(&report["top5"]),
        report["images"],
        cfg.data.test
    );
    Ok(ExitCode::SUCCESS)
}

/// `dtl bench`.
pub fn bench(
    args: &[String],
    batches: Vec<usize>,
    steps: usize,
    warmup: usize,
    what: Vec<String>,
    json: bool,
) -> Result<ExitCode> {
    let (files, overrides) = crate::split_args(args);
    let [file] = files.as_slice() else {
        return Err(DtlError::invalid(
            "dtl bench takes exactly one pipeline file",
        ));
    };
    if batches.contains(&0) || steps == 0 {
        return Err(DtlError::invalid("--batch and --steps must be at least 1"));
    }
    for w in &what {
        if !["forward", "train", "vjp"].contains(&w.as_str()) {
            return Err(DtlError::invalid(format!(
                "--what `{w}` is not a measurement; use forward, train or vjp"
            )));
        }
    }
    let reg = registry()?;
    let cfg = match load_checked(reg, file, &overrides) {
        Ok(c) => c,
        Err(errs) => {
            report_errors(&errs);
            return Ok(ExitCode::FAILURE);
        }
    };
    let mut job = build_job(reg, &cfg, file)?;
    let report = job.bench(&BenchOptions {
        batches,
        steps,
        warmup,
        what,
    })?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).unwrap_or_default()
        );
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{} at {}x{} on {}, {} timed steps per row",
        cfg.backbone.kind, report["image_size"], report["image_size"], cfg.run.device, steps
    );
    let rows: Vec<&serde_json::Value> = report["rows"].as_array().into_iter().flatten().collect();
    // On a GPU the memory that matters is the GPU's; the process's resident memory follows.
    let gpu = rows.iter().any(|r| r["peak_gpu_mib"].is_number());
    let mem_head = if gpu { "GPU MiB" } else { "peak MiB" };
    println!(
        "{:<8} {:<15} {:>6} {:>10} {:>10} {:>10}{}",
        "what",
        "side",
        "batch",
        "img/s",
        mem_head,
        "trainable",
        if gpu { "     RSS MiB" } else { "" }
    );
    for r in rows {
        let mem = if gpu {
            &r["peak_gpu_mib"]
        } else {
            &r["peak_rss_mib"]
        };
        println!(
            "{:<8} {:<15} {:>6} {:>10} {:>10} {:>10}{}",
            r["what"].as_str().unwrap_or("-"),
            r["side"].as_str().unwrap_or("-"),
            r["batch"].to_string(),
            fmt_num(&r["img_per_s"], 1),
            fmt_num(mem, 0),
            r.get("trainable_params")
                .map(|v| v.to_string())
                .unwrap_or_else(|| "-".into()),
            if gpu {
                format!(" {:>11}", fmt_num(&r["peak_rss_mib"], 0))
            } else {
                String::new()
            }
        );
    }
    Ok(ExitCode::SUCCESS)
}
