//! The subcommands. Each returns the process exit code or an error printed as one line.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use std::collections::BTreeMap;

use dtl_core::config::{validate as validate_config, DeviceSpec, ValidationContext};
use dtl_core::{
    registry, BenchOptions, BuildContext, DtlError, Job, PipelineConfig, Registry, Result, RunEnv,
};
use dtl_runner::report::{BenchReport, EvalReport, TestSetReport, TrainReport};

fn device_check(d: DeviceSpec) -> std::result::Result<(), String> {
    match d {
        DeviceSpec::Cpu | DeviceSpec::Auto => Ok(()),
        DeviceSpec::Cuda(n) => dtl_cuda::check_device(n),
    }
}

/// The first usable GPU, or why there is none.
fn first_gpu() -> std::result::Result<usize, String> {
    dtl_cuda::first_usable().ok_or_else(|| {
        dtl_cuda::check_device(0)
            .err()
            .unwrap_or_else(|| "no usable CUDA device".to_string())
    })
}

/// The pipeline with `run.device = "auto"` replaced by the device it stands for on this
/// machine; says so on stderr when that is the CPU.
fn on_this_machine(cfg: &PipelineConfig) -> PipelineConfig {
    let mut c = cfg.clone();
    if let Some(notice) = c.resolve_device(first_gpu) {
        eprintln!("notice: {notice}");
    }
    c
}

/// Parses and validates one pipeline; every problem found is returned.
pub fn load_checked(
    reg: &Registry,
    file: &Path,
    overrides: &[String],
) -> std::result::Result<PipelineConfig, Vec<DtlError>> {
    let cfg = load_schema_checked(reg, file, overrides)?;
    // What `dtl run` would refuse before training, refused here with the same line.
    let spec = reg
        .backbone(&cfg.backbone.kind)
        .map_err(|e| vec![e])?
        .spec();
    crate::preflight::check(&cfg, &spec, file).map_err(|e| vec![e])?;
    for w in crate::preflight::warnings(&cfg, &spec, file) {
        eprintln!("warning: {w}");
    }
    Ok(cfg)
}

/// Parses one pipeline and checks the meaning of every key, without opening its data (what
/// `dtl bench`, which trains on generated batches, needs).
fn load_schema_checked(
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
    if !errs.is_empty() {
        return Err(errs);
    }
    Ok(cfg)
}

fn report_errors(errs: &[DtlError]) {
    for e in errs {
        eprintln!("error: {e}");
    }
}

/// Writes `contents` to `path` through a temporary file, an fsync and a rename.
pub use dtl_core::fsio::write_atomic;

fn build_job(reg: &Registry, cfg: &PipelineConfig, file: &Path) -> Result<Box<dyn Job>> {
    let entry = reg.backbone(&cfg.backbone.kind)?;
    (entry.build)(
        cfg,
        &BuildContext {
            pipeline_file: file.to_path_buf(),
        },
    )
}

fn fmt_pct(v: Option<f64>) -> String {
    v.map(|x| format!("{:.2}%", 100.0 * x))
        .unwrap_or_else(|| "-".into())
}

/// A report value as JSON prints it: the value, or `null` when the report has none.
fn show<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map(|x| x.to_string()).unwrap_or_else(|| "null".into())
}

/// One line per extra test set of a report (`"tests"`): name, top-1, top-5, images and the
/// classes it was scored over; empty when there is none.
fn test_lines(tests: Option<&BTreeMap<String, TestSetReport>>) -> String {
    let mut s = String::new();
    for (name, t) in tests.into_iter().flatten() {
        s.push_str(&format!(
            "  {name}: top-1 {}  top-5 {}  ({} images, {} classes)\n",
            fmt_pct(t.top1),
            fmt_pct(t.top5),
            show(t.images),
            show(t.classes)
        ));
    }
    s
}

fn fmt_num(v: Option<f64>, digits: usize) -> String {
    v.map(|x| format!("{x:.digits$}"))
        .unwrap_or_else(|| "-".into())
}

/// `dtl run`.
pub fn run(
    args: &[String],
    print_config: bool,
    resume: Option<PathBuf>,
    progress: bool,
    skip_done: bool,
) -> Result<ExitCode> {
    let (files, overrides) = crate::split_args(args);
    if skip_done && resume.is_some() {
        return Err(DtlError::argument(
            "--skip-done finds the run directories itself; leave out --resume",
        ));
    }
    if files.is_empty() {
        return Err(DtlError::argument(
            "no pipeline file given; usage: dtl run <PIPELINE.toml>... [KEY=VALUE]...",
        ));
    }
    if resume.is_some() && files.len() > 1 {
        return Err(DtlError::argument("--resume takes exactly one pipeline"));
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
    let sweep_start = std::time::Instant::now();
    let mut sweep = dtl_runner::sweep::Progress::new(configs.len());
    for (k, (f, cfg)) in configs.iter().enumerate() {
        if configs.len() > 1 {
            eprintln!(
                "{}",
                sweep.line(k + 1, &f.display().to_string(), sweep_start.elapsed())
            );
        }
        let mut resume = resume.clone();
        let mut reuse = None;
        if skip_done {
            use dtl_runner::sweep::{find_previous, Previous};
            match find_previous(&cfg.run.output_dir, &cfg.run.name, &cfg.to_toml()) {
                Previous::Done(dir) => {
                    eprintln!(
                        "dtl: {} -> {}: done already, skipped",
                        f.display(),
                        dir.display()
                    );
                    sweep.skipped();
                    if let Some(r) = std::fs::read_to_string(dir.join("report.json"))
                        .ok()
                        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
                    {
                        results.push((cfg.clone(), TrainReport::from_json(&r)));
                    }
                    continue;
                }
                Previous::Interrupted(dir) => {
                    eprintln!(
                        "dtl: {} -> {}: interrupted, resuming",
                        f.display(),
                        dir.display()
                    );
                    resume = Some(dir.clone());
                    reuse = Some(dir);
                }
                Previous::Unstarted(dir) => {
                    eprintln!(
                        "dtl: {} -> {}: interrupted before its first checkpoint, starting again there",
                        f.display(),
                        dir.display()
                    );
                    let metrics = dir.join("metrics.jsonl");
                    if metrics.exists() {
                        std::fs::remove_file(&metrics).map_err(|e| DtlError::io(&metrics, e))?;
                    }
                    reuse = Some(dir);
                }
                Previous::None => {}
            }
        }
        let started = std::time::Instant::now();
        let run_dir = match (&reuse, &resume) {
            (Some(d), _) => d.clone(),
            (None, Some(r)) if r.is_dir() => r.clone(),
            (None, Some(r)) => r
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_else(|| PathBuf::from(".")),
            (None, None) => dtl_runner::lock::claim_run_dir(&cfg.run.output_dir, &cfg.run.name)?,
        };
        let fresh = reuse.is_none() && resume.is_none();
        std::fs::create_dir_all(&run_dir).map_err(|e| DtlError::io(&run_dir, e))?;
        // One writer per run directory, held until this run ends (the kernel drops it if
        // the process dies).
        let _lock = crate::preflight::enter_run_dir(&run_dir)?;
        write_atomic(&run_dir.join("pipeline.toml"), cfg.to_toml().as_bytes())?;
        let cfg = &on_this_machine(cfg);
        eprintln!(
            "dtl: {} -> {} ({} on {}, side {})",
            f.display(),
            run_dir.display(),
            cfg.backbone.kind,
            cfg.run.device,
            cfg.side.kind
        );
        let env = RunEnv {
            run_dir: run_dir.clone(),
            progress: progress && std::io::stderr().is_terminal(),
            resume: resume.clone(),
        };
        let report = match build_job(reg, cfg, f).and_then(|mut job| job.train(&env)) {
            Ok(r) => TrainReport::from_json(&r),
            Err(e) => {
                if fresh {
                    crate::preflight::tidy_failed(&run_dir);
                }
                return Err(e);
            }
        };
        println!(
            "{}: top-1 {}  top-5 {}  trainable params {}  wall {} s  -> {}",
            cfg.run.name,
            fmt_pct(report.top1),
            fmt_pct(report.top5),
            show(report.trainable_params),
            fmt_num(report.wall_s, 1),
            run_dir.display()
        );
        print!("{}", test_lines(report.tests.as_ref()));
        sweep.trained(started.elapsed());
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
                fmt_pct(r.top1),
                fmt_pct(r.top5),
                show(r.trainable_params),
                fmt_num(r.train_img_per_s, 1),
                fmt_num(r.wall_s, 1)
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `dtl validate`.
pub fn validate(files: &[PathBuf], overrides: &[String]) -> Result<ExitCode> {
    let reg = registry()?;
    if files.is_empty() {
        return Err(DtlError::argument(
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

/// What `dtl list` shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ListKind {
    /// Backbone variants with their shapes.
    Backbones,
    /// Side networks.
    Sides,
    /// Heads.
    Heads,
    /// Dataset layouts.
    Datasets,
    /// Augmentation ops.
    Augment,
}

/// `dtl list`: one kind of component, or every kind for `None`.
pub fn list(what: Option<ListKind>) -> Result<ExitCode> {
    let reg = registry()?;
    let want = |k: ListKind| what.map_or(true, |w| w == k);
    if want(ListKind::Backbones) {
        println!("backbones:");
        for b in reg.backbones.iter() {
            let s = b.spec();
            println!("  {:<26} {}", b.name, b.description);
            if s.is_hierarchical() {
                let join = |f: &dyn Fn(&dtl_core::StageSpec) -> usize| {
                    s.stages
                        .iter()
                        .map(|st| f(st).to_string())
                        .collect::<Vec<_>>()
                        .join("-")
                };
                println!(
                    "  {:<26} image {} patch {} stages {}, widths {}, heads {}, grids {}",
                    "",
                    s.image_size,
                    s.patch_size,
                    join(&|st| st.blocks.1 - st.blocks.0),
                    join(&|st| st.width),
                    join(&|st| st.heads),
                    join(&|st| st.grid.0)
                );
                continue;
            }
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
    if want(ListKind::Sides) {
        section("side networks", &reg.sides);
    }
    if want(ListKind::Heads) {
        section("heads", &reg.heads);
    }
    if want(ListKind::Datasets) {
        section("datasets", &reg.datasets);
    }
    if want(ListKind::Augment) {
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
    {
        let spec = reg.backbone(&cfg.backbone.kind)?.spec();
        let sources = crate::preflight::check(&cfg, &spec, &pipeline)?.sources;
        crate::preflight::eval_target(&pipeline, &checkpoint, &cfg, &sources)?;
    }
    let cfg = on_this_machine(&cfg);
    let mut job = build_job(reg, &cfg, &pipeline)?;
    let env = RunEnv {
        run_dir: pipeline.parent().unwrap_or(Path::new(".")).to_path_buf(),
        progress: std::io::stderr().is_terminal(),
        resume: None,
    };
    let report = EvalReport::from_json(&job.evaluate(&env, &checkpoint)?);
    println!(
        "{}: top-1 {}  top-5 {}  ({} images, {})",
        checkpoint.display(),
        fmt_pct(report.top1),
        fmt_pct(report.top5),
        show(report.images),
        cfg.data.test
    );
    print!("{}", test_lines(report.tests.as_ref()));
    Ok(ExitCode::SUCCESS)
}

/// The labels of a `dtl bench --profile` table: the longest ones, the rest summed as `other`.
pub const PROFILE_TOP: usize = 25;

/// `dtl bench --profile` and `--profile-md FILE`.
#[derive(Debug, Default)]
pub struct ProfileFlags {
    /// Time the kernels of the timed steps.
    pub on: bool,
    /// Also write the tables as markdown here.
    pub markdown: Option<PathBuf>,
}

/// `dtl bench`.
pub fn bench(
    args: &[String],
    batches: Vec<usize>,
    steps: usize,
    warmup: usize,
    what: Vec<String>,
    json: bool,
    profile: ProfileFlags,
) -> Result<ExitCode> {
    let (files, overrides) = crate::split_args(args);
    let [file] = files.as_slice() else {
        return Err(DtlError::argument(
            "dtl bench takes exactly one pipeline file",
        ));
    };
    if batches.contains(&0) || steps == 0 {
        return Err(DtlError::argument("--batch and --steps must be at least 1"));
    }
    let what: Vec<String> = dtl_runner::bench::parse_what(&what)?
        .into_iter()
        .map(|m| m.as_str().to_string())
        .collect();
    let reg = registry()?;
    let cfg = match load_schema_checked(reg, file, &overrides) {
        Ok(c) => c,
        Err(errs) => {
            report_errors(&errs);
            return Ok(ExitCode::FAILURE);
        }
    };
    let spec = reg.backbone(&cfg.backbone.kind)?.spec();
    crate::preflight::bench_batches(&cfg, &spec, &batches, file)?;
    let cfg = on_this_machine(&cfg);
    if profile.on {
        dtl_runner::bench::check_profile(&cfg)?;
    }
    if profile.on && cfg.run.device == DeviceSpec::Cpu {
        return Err(DtlError::argument(format!(
            "dtl bench: {}; {} runs on the CPU",
            dtl_runner::bench::PROFILE_NEEDS_CUDA,
            file.display()
        )));
    }
    let mut job = build_job(reg, &cfg, file)?;
    let report = job.bench(&BenchOptions {
        batches,
        steps,
        warmup,
        what,
        profile: profile.on,
    })?;
    if let Some(path) = &profile.markdown {
        write_profile_markdown(path, &cfg, &BenchReport::from_json(&report))?;
    }
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).unwrap_or_default()
        );
        return Ok(ExitCode::SUCCESS);
    }
    let report = BenchReport::from_json(&report);
    println!(
        "{} at {}x{} on {}, {} timed steps per row",
        cfg.backbone.kind,
        show(report.image_size),
        show(report.image_size),
        report
            .device
            .clone()
            .unwrap_or_else(|| cfg.run.device.to_string()),
        steps
    );
    let rows = &report.rows;
    // On a GPU the memory that matters is the GPU's; the process's resident memory follows.
    let gpu = rows.iter().any(|r| r.peak_gpu_mib.is_some());
    let mem_head = if gpu { "GPU MiB" } else { "peak MiB" };
    println!(
        "{:<8} {:<15} {:<11} {:>6} {:>10} {:>10} {:>10}{}",
        "what",
        "side",
        "activations",
        "batch",
        "img/s",
        mem_head,
        "trainable",
        if gpu { "  driver MiB     RSS MiB" } else { "" }
    );
    for r in rows {
        let mem = if gpu { r.peak_gpu_mib } else { r.peak_rss_mib };
        println!(
            "{:<8} {:<15} {:<11} {:>6} {:>10} {:>10} {:>10}{}",
            r.what.as_deref().unwrap_or("-"),
            r.side.as_deref().unwrap_or("-"),
            r.activations.as_deref().unwrap_or("-"),
            show(r.batch),
            fmt_num(r.img_per_s, 1),
            fmt_num(mem, 0),
            r.trainable_params
                .map(|v| v.to_string())
                .unwrap_or_else(|| "-".into()),
            if gpu {
                format!(
                    " {:>11} {:>11}",
                    fmt_num(r.gpu_driver_mib, 0),
                    fmt_num(r.peak_rss_mib, 0)
                )
            } else {
                String::new()
            }
        );
    }
    for r in rows {
        if let Some(p) = &r.profile {
            println!(
                "\nwhere the time goes: {}\n{}",
                profile_title(r),
                p.summary()
            );
            print!("{}", p.table(PROFILE_TOP));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `train dtl recompute, batch 32` for the heading of a row's profile.
fn profile_title(r: &dtl_runner::report::BenchRow) -> String {
    let mut t = format!(
        "{} {}",
        r.what.as_deref().unwrap_or("-"),
        r.side.as_deref().unwrap_or("-")
    );
    if let Some(a) = &r.activations {
        t.push(' ');
        t.push_str(a);
    }
    format!("{t}, batch {}", show(r.batch))
}

/// Writes the profile of every profiled row of `report` as markdown sections to `path`.
fn write_profile_markdown(path: &Path, cfg: &PipelineConfig, report: &BenchReport) -> Result<()> {
    let device = report
        .device
        .clone()
        .unwrap_or_else(|| cfg.run.device.to_string());
    let mut md = format!(
        "## Where the time goes: {} on {device}\n\n",
        cfg.backbone.kind
    );
    let mut any = false;
    for r in &report.rows {
        if let Some(p) = &r.profile {
            md.push_str(&p.markdown(&profile_title(r), PROFILE_TOP));
            md.push('\n');
            any = true;
        }
    }
    if !any {
        md.push_str("No row was profiled.\n");
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| DtlError::io(dir, e))?;
    }
    std::fs::write(path, md).map_err(|e| DtlError::io(path, e))
}

/// `dtl summarize`.
pub fn summarize(
    runs: &[String],
    out: &Path,
    sort: Option<&str>,
    reference: Option<&Path>,
) -> Result<ExitCode> {
    use dtl_runner::summary;
    let dirs = summary::expand_run_dirs(runs)?;
    let records = dirs
        .iter()
        .map(|d| summary::load_run(d))
        .collect::<Result<Vec<_>>>()?;
    let reference = reference.map(summary::Reference::load).transpose()?;
    let s = summary::summarize(records, reference, sort)?;
    s.write(out)?;
    print!("{}", s.markdown());
    eprintln!(
        "dtl: {} runs -> {} (summary.md, summary.json, summary.png, summary.svg)",
        s.runs.len(),
        out.display()
    );
    Ok(ExitCode::SUCCESS)
}
