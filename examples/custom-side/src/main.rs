//! A side network written in user code, registered under its own name and trained through an
//! ordinary pipeline, with nothing but the public traits.
//!
//! `gated-lowrank` taps every block like DTL (a rank-r map `x W_down W_up` summed into z),
//! but injects `gate * tanh(z)` with a learnt per-channel gate that starts at zero, so
//! training begins exactly at the frozen backbone.
//!
//! Run it with `cargo run --release -p dtl-example-custom-side`: it writes a tiny generated
//! image-folder dataset and a pipeline into a temporary folder, trains for ten short epochs on the
//! randomly initialised `vit_test_patch8_32` and prints the report.

use std::path::{Path, PathBuf};

use dfdx::prelude::*;
use dtl_core::config::SideConfig;
use dtl_core::registry::{registry, BuildContext, SideEntry};
use dtl_core::{
    Act, BackboneSpec, DtlError, Param, Parameters, PipelineConfig, Result, RunEnv, SideNetwork,
};
use rand::{Rng, SeedableRng};

// Link the crates whose registrations the pipeline names: the ViT variants and the runner's
// built-in heads.
use dtl_runner as _;
use dtl_vit as _;

type Tape = OwnedTape<f32, Cpu>;

/// Low-rank taps, injection `gate * tanh(z)`.
struct GatedLowRank {
    taps: Vec<usize>,
    injects: Vec<usize>,
    width: usize,
    rank: usize,
    /// `side.<i>.down` (D, r) and `side.<i>.up` (r, D) per tap, then `side.gate` (D).
    params: Vec<Param<Cpu>>,
}

impl GatedLowRank {
    fn new(cfg: &SideConfig, spec: &BackboneSpec, dev: &Cpu) -> Result<Self> {
        let (d, r) = (spec.width, cfg.rank);
        let taps = cfg.tap_blocks(spec.depth);
        let injects = cfg.inject_blocks(spec.depth);
        let mut params = Vec::new();
        for &i in &taps {
            let down: Tensor<(usize,), f32, Cpu> =
                dev.sample_like(&(d * r,), rand::distributions::Uniform::new(-0.1f32, 0.1));
            params.push(Param::from_vec(
                dev,
                &format!("side.{i}.down"),
                &[d, r],
                down.as_vec(),
            )?);
            let up: Tensor<(usize,), f32, Cpu> =
                dev.sample_like(&(r * d,), rand::distributions::Uniform::new(-0.1f32, 0.1));
            params.push(Param::from_vec(
                dev,
                &format!("side.{i}.up"),
                &[r, d],
                up.as_vec(),
            )?);
        }
        params.push(Param::zeros(dev, "side.gate", &[d]));
        Ok(GatedLowRank {
            taps,
            injects,
            width: d,
            rank: r,
            params,
        })
    }

    /// A parameter as a 2-d tensor on a fresh tape (its gradient is keyed by the parameter).
    fn matrix(
        &self,
        k: usize,
        rows: usize,
        cols: usize,
    ) -> Result<Tensor<(usize, usize), f32, Cpu, Tape>> {
        self.params[k]
            .value
            .retaped::<Tape>()
            .try_reshape_like(&(rows, cols))
            .map_err(|e| DtlError::Device(format!("{e:?}")))
    }
}

impl Parameters<Cpu> for GatedLowRank {
    fn params(&self) -> Vec<&Param<Cpu>> {
        self.params.iter().collect()
    }
    fn params_mut(&mut self) -> Vec<&mut Param<Cpu>> {
        self.params.iter_mut().collect()
    }
}

impl SideNetwork<Cpu> for GatedLowRank {
    fn taps(&self) -> &[usize] {
        &self.taps
    }
    fn injects(&self) -> &[usize] {
        &self.injects
    }
    fn tap(&self, block: usize, x: Act<Cpu>, z: Option<Act<Cpu>>) -> Result<Act<Cpu>> {
        let k = self
            .taps
            .iter()
            .position(|&t| t == block)
            .ok_or_else(|| DtlError::invalid(format!("block {block} is not tapped")))?;
        let down = self.matrix(2 * k, self.width, self.rank)?;
        let up = self.matrix(2 * k + 1, self.rank, self.width)?;
        let y = x.matmul(down).matmul(up);
        Ok(match z {
            Some(z) => z + y,
            None => y,
        })
    }
    fn inject(&self, _block: usize, z: &Act<Cpu>) -> Result<Act<Cpu>> {
        let shape = *z.shape();
        let gate = self
            .params
            .last()
            .expect("the gate is the last parameter")
            .value
            .retaped::<Tape>();
        Ok(z.with_empty_tape().tanh() * gate.broadcast_like::<_, Axes2<0, 1>>(&shape))
    }
}

fn build(cfg: &SideConfig, spec: &BackboneSpec, dev: &Cpu) -> Result<Box<dyn SideNetwork<Cpu>>> {
    Ok(Box::new(GatedLowRank::new(cfg, spec, dev)?))
}

inventory::submit! {
    SideEntry {
        name: "gated-lowrank",
        description: "example: low-rank taps, gate * tanh(z) injected with a learnt per-channel gate",
        build_cpu: build,
        kernels: None,
        origin: module_path!(),
    }
}

/// Writes `<root>/{train,test}/<class>/<n>.png`: 32x32 images whose class decides which
/// quadrant is bright, plus noise.
fn write_dataset(root: &Path, classes: usize, train: usize, test: usize) -> Result<()> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    for (split, n) in [("train", train), ("test", test)] {
        for c in 0..classes {
            let dir = root.join(split).join(format!("class{c}"));
            std::fs::create_dir_all(&dir).map_err(|e| DtlError::io(&dir, e))?;
            for i in 0..n {
                let img = dtl_data::image::RgbImage::from_fn(32, 32, |x, y| {
                    let q = (x / 16 + 2 * (y / 16)) as usize;
                    let base = if q == c { 200.0 } else { 60.0 };
                    let mut v =
                        |s: f32| (base * s + rng.gen_range(-40.0..40.0)).clamp(0.0, 255.0) as u8;
                    dtl_data::image::Rgb([v(1.0), v(0.8), v(0.6)])
                });
                let path = dir.join(format!("{i}.png"));
                img.save(&path)
                    .map_err(|e| DtlError::file(&path, e.to_string()))?;
            }
        }
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    let work: PathBuf = std::env::temp_dir().join("dtl-custom-side-example");
    let _ = std::fs::remove_dir_all(&work);
    write_dataset(&work.join("data"), 4, 24, 8)?;
    let pipeline = work.join("pipeline.toml");
    let text = r#"
[run]
name = "custom-side"
seed = 0
output_dir = "runs"
log_every = 5

[backbone]
kind = "vit_test_patch8_32"     # random weights: no `weights` key

[side]
kind = "gated-lowrank"          # the side network registered above
rank = 4
taps = "0-3"
injects = "2-3"

[data]
kind = "image-folder"
root = "data"
batch_size = 8
workers = 1

[optim]
lr = 5e-2

[schedule]
epochs = 10
"#;
    std::fs::write(&pipeline, text).map_err(|e| DtlError::io(&pipeline, e))?;

    let reg = registry()?;
    let cfg = PipelineConfig::load(&pipeline, &[])?;
    let check = |_: dtl_core::config::DeviceSpec| Ok(());
    let errors = dtl_core::config::validate(
        &cfg,
        &dtl_core::config::ValidationContext {
            file: &pipeline,
            registry: reg,
            device_check: &check,
        },
    );
    if let Some(e) = errors.into_iter().next() {
        return Err(e);
    }
    let entry = reg.backbone(&cfg.backbone.kind)?;
    let mut job = (entry.build)(
        &cfg,
        &BuildContext {
            pipeline_file: pipeline.clone(),
        },
    )?;
    let run_dir = work.join("runs").join(&cfg.run.name);
    let env = RunEnv {
        run_dir: run_dir.clone(),
        progress: true,
        resume: None,
    };
    let report = job.train(&env)?;
    println!(
        "side network `{}`: {} trainable parameters, test top-1 {:.1} %, report in {}",
        cfg.side.kind,
        report["trainable_params"],
        100.0 * report["top1"].as_f64().unwrap_or(0.0),
        run_dir.join("report.md").display()
    );
    Ok(())
}
