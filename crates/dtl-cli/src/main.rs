//! `dtl`: train, evaluate, validate and benchmark DTL pipelines.
//!
//! The binary is thin: parsing arguments and printing. Everything else lives in the library
//! crates; this is the one place that links the plugins.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

// Link the plugins: without these lines the linker drops their registrations.
use dtl_data as _;
use dtl_vit as _;

mod commands;

const EXAMPLES: &str = "\
Examples:
  dtl run pipelines/quickstart.toml
  dtl run pipelines/quickstart.toml optim.lr=3e-4 schedule.epochs=2
  dtl run pipelines/quickstart.toml pipelines/quickstart-linear.toml   # compare two runs
  dtl run pipelines/quickstart.toml --print-config
  dtl validate pipelines/*.toml
  dtl list backbones
  dtl eval runs/quickstart
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
        what: Option<ListKind>,
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
    },
}

/// Component kinds for `dtl list`.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum ListKind {
    Backbones,
    Sides,
    Heads,
    Datasets,
    Augment,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run {
            args,
            print_config,
            resume,
            no_progress,
        } => commands::run(&args, print_config, resume, !no_progress),
        Command::Validate { args } => {
            let (files, overrides) = split_args(&args);
            commands::validate(&files, &overrides)
        }
        Command::List { what } => commands::list(what.map(|w| match w {
            ListKind::Backbones => "backbones",
            ListKind::Sides => "sides",
            ListKind::Heads => "heads",
            ListKind::Datasets => "datasets",
            ListKind::Augment => "augment",
        })),
        Command::Eval { target, overrides } => commands::eval(&target, &overrides),
        Command::Bench {
            args,
            batches,
            steps,
            warmup,
            what,
            json,
        } => commands::bench(&args, batches, steps, warmup, what, json),
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
