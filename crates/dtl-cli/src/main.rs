//! `dtl`: train, evaluate, validate and benchmark DTL pipelines.
//!
//! The binary is thin: parsing arguments and printing. Everything else lives in the library
//! crates; this is the one place that links the plugins.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

// Link the plugins: without these lines the linker drops their registrations.
use dtl_data as _;
use dtl_swin as _;
use dtl_vit as _;

mod commands;
mod preflight;

const EXAMPLES: &str = "\
Examples:
  dtl run pipelines/quickstart.toml
  dtl run pipelines/quickstart.toml optim.lr=3e-4 schedule.epochs=2
  dtl run pipelines/quickstart.toml pipelines/quickstart-linear.toml   # compare two runs
  dtl run pipelines/quickstart.toml --print-config
  dtl validate pipelines/*.toml
  dtl list backbones
  dtl eval runs/quickstart
  dtl run pipelines/vtab-1k/*.toml --skip-done      # a sweep that resumes where it stopped
  dtl summarize runs/ --out results
  dtl bench pipelines/quickstart.toml --batch 8 --batch 32";

/// Memory-efficient transfer learning of frozen vision backbones (Disentangled Transfer Learning).
#[derive(Parser, Debug)]
#[command(name = "dtl", version, about, after_help = EXAMPLES)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Train and evaluate one or more pipelines; several are compared side by side at the end.
    #[command(
        after_help = "Arguments containing `=` are overrides applied to every pipeline, \
e.g. `optim.lr=3e-4 data.batch_size=16`."
    )]
    Run {
        /// Pipeline files, then optional `section.key=value` overrides.
        #[arg(required = true, value_name = "PIPELINE.toml|KEY=VALUE")]
        args: Vec<String>,
        /// Print the resolved pipeline with every default filled in, then exit.
        #[arg(long)]
        print_config: bool,
        /// Resume from a checkpoint file or a run directory.
        #[arg(long, value_name = "PATH")]
        resume: Option<PathBuf>,
        /// Hide the progress bar.
        #[arg(long)]
        no_progress: bool,
        /// Skip a pipeline whose run directory already holds a report for the same resolved
        /// pipeline, and resume one that was interrupted (an interrupted sweep picks up where
        /// it stopped).
        #[arg(long)]
        skip_done: bool,
    },
    /// Turn finished runs into tables (markdown, JSON) and a picture (PNG, SVG): VTAB-1k
    /// group means, few-shot curves over shots, or one row per run.
    #[command(
        after_help = "Examples:\n  dtl summarize runs/vtab-*\n  dtl summarize runs/ --out results --sort top1\n  \
dtl summarize 'runs/vtab-*' --reference paper-dtl.json"
    )]
    Summarize {
        /// Run directories, glob patterns, or folders holding run directories.
        #[arg(required = true, value_name = "RUN_DIR|GLOB")]
        runs: Vec<String>,
        /// Where summary.md, summary.json, summary.png and summary.svg go.
        #[arg(long, default_value = "summary", value_name = "DIR")]
        out: PathBuf,
        /// Order the table of plain runs by a column: name, backbone, side, params, top1,
        /// top5, img_per_s, memory, wall.
        #[arg(long, value_name = "COLUMN")]
        sort: Option<String>,
        /// A reference row for the VTAB-1k table: JSON `{"name": "...", "tasks": {"cifar_100": 69.6, ...}}`
        /// (top-1 in percent); its value and the difference are shown per task.
        #[arg(long, value_name = "FILE.json")]
        reference: Option<PathBuf>,
    },
    /// Check pipeline files and report every error of every file.
    Validate {
        /// Pipeline files, then optional `section.key=value` overrides (applied to each).
        #[arg(required = true, value_name = "PIPELINE.toml|KEY=VALUE")]
        args: Vec<String>,
    },
    /// List registered components (sorted), with descriptions.
    List {
        /// Which kind of component (all when omitted).
        what: Option<commands::ListKind>,
    },
    /// Evaluate a trained run directory or checkpoint on its pipeline's test split.
    Eval {
        /// A run directory (uses its `best.safetensors`) or a checkpoint file.
        target: PathBuf,
        /// Overrides of the stored pipeline, e.g. `data.root=/data/vtab` `data.test=val200`.
        overrides: Vec<String>,
    },
    /// Measure training and forward throughput and peak memory of a pipeline.
    Bench {
        /// Pipeline file, then optional overrides.
        #[arg(required = true, value_name = "PIPELINE.toml|KEY=VALUE")]
        args: Vec<String>,
        /// Batch sizes to measure (repeatable).
        #[arg(long = "batch", default_values_t = [8usize])]
        batches: Vec<usize>,
        /// Timed steps per batch size.
        #[arg(long, default_value_t = 5)]
        steps: usize,
        /// Warm-up steps per batch size.
        #[arg(long, default_value_t = 1)]
        warmup: usize,
        /// What to measure (repeatable): forward, train, vjp.
        #[arg(long = "what", default_values_t = ["forward".to_string(), "train".to_string()])]
        what: Vec<String>,
        /// Print the measurements as JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Time every kernel, matrix product and copy of the timed steps with CUDA events and
        /// print where the GPU time goes, per row (top 25 labels and `other`; in the JSON
        /// under `profile`). `train` then measures only the pipeline's own side.kind at its
        /// run.activations. Needs a CUDA device; graphs are off meanwhile.
        #[arg(long)]
        profile: bool,
        /// With `--profile` (implied): also write the tables as markdown to this file.
        #[arg(long, value_name = "FILE.md")]
        profile_md: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run {
            args,
            print_config,
            resume,
            no_progress,
            skip_done,
        } => commands::run(&args, print_config, resume, !no_progress, skip_done),
        Command::Summarize {
            runs,
            out,
            sort,
            reference,
        } => commands::summarize(&runs, &out, sort.as_deref(), reference.as_deref()),
        Command::Validate { args } => {
            let (files, overrides) = split_args(&args);
            commands::validate(&files, &overrides)
        }
        Command::List { what } => commands::list(what),
        Command::Eval { target, overrides } => commands::eval(&target, &overrides),
        Command::Bench {
            args,
            batches,
            steps,
            warmup,
            what,
            json,
            profile,
            profile_md,
        } => commands::bench(
            &args,
            batches,
            steps,
            warmup,
            what,
            json,
            commands::ProfileFlags {
                on: profile || profile_md.is_some(),
                markdown: profile_md,
            },
        ),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Splits `run` arguments into pipeline files and overrides.
fn split_args(args: &[String]) -> (Vec<PathBuf>, Vec<String>) {
    let mut files = Vec::new();
    let mut overrides = Vec::new();
    for a in args {
        if a.contains('=') && !Path::new(a).exists() {
            overrides.push(a.clone());
        } else {
            files.push(PathBuf::from(a));
        }
    }
    (files, overrides)
}
