//! CPU frozen-backbone benchmark: ViT-Ti/16 at 224 (random weights), forward throughput and
//! block VJP time, through the `Backbone` trait as the runner calls it.
//!
//! ```text
//! cargo run --release -p dtl-vit --example bench_cpu -- [--batch 8] [--iters 10] [--warmup 2] [--variant tiny|small|base]
//! ```

use std::time::Instant;

use dfdx::prelude::*;
use dtl_core::{Backbone, DropPath};
use dtl_vit::variants::{VitBasePatch16_224, VitSmallPatch16_224, VitTinyPatch16_224};
use dtl_vit::{Geometry, VitOf};

struct Args {
    batch: usize,
    iters: usize,
    warmup: usize,
    variant: String,
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        batch: 8,
        iters: 10,
        warmup: 2,
        variant: "tiny".into(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut val = || it.next().ok_or(format!("`{k}` needs a value"));
        match k.as_str() {
            "--batch" => a.batch = val()?.parse().map_err(|_| "--batch takes a number")?,
            "--iters" => a.iters = val()?.parse().map_err(|_| "--iters takes a number")?,
            "--warmup" => a.warmup = val()?.parse().map_err(|_| "--warmup takes a number")?,
            "--variant" => a.variant = val()?,
            other => {
                return Err(format!(
                    "unknown argument `{other}`; use --batch, --iters, --warmup, --variant"
                ))
            }
        }
    }
    Ok(a)
}

/// CPU seconds used by this process so far (all threads), from `/proc/self/stat`.
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // fields after the command name, which is in parentheses
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

fn run<G: Geometry>(a: &Args) -> dtl_core::Result<()> {
    let vit: VitOf<G> = dtl_vit::random::<G>(0)?;
    let spec = vit.spec().clone();
    let dev = Cpu::default();
    let img = spec.image_size;
    let images = dev.sample_normal_like(&(a.batch, Const::<3>, img, img));
    let forward = || -> dtl_core::Result<_> {
        let mut x = vit.embed(&images)?;
        for i in 0..vit.depth() {
            x = vit.block_forward(i, &x, None)?;
        }
        let rows = a.batch * spec.tokens();
        let flat = dev.tensor_from_vec(x.as_vec(), (rows, G::Width::default()));
        vit.norm_forward(&flat)
    };
    for _ in 0..a.warmup {
        forward()?;
    }
    let t = Instant::now();
    let c0 = cpu_seconds();
    for _ in 0..a.iters {
        std::hint::black_box(forward()?);
    }
    let fwd = t.elapsed().as_secs_f64() / a.iters as f64;
    let fwd_cpu = match (c0, cpu_seconds()) {
        (Some(a0), Some(a1)) => format!("{:.1}", (a1 - a0) / a.iters as f64 * 1e3),
        _ => "n/a".into(),
    };

    // block VJP of the middle block, with and without stochastic depth
    let mut x = vit.embed(&images)?;
    for i in 0..vit.depth() / 2 {
        x = vit.block_forward(i, &x, None)?;
    }
    let g = dev.sample_normal_like(x.shape());
    let mid = vit.depth() / 2;
    let block_fwd = {
        let t = Instant::now();
        for _ in 0..a.iters {
            std::hint::black_box(vit.block_forward(mid, &x, None)?);
        }
        t.elapsed().as_secs_f64() / a.iters as f64
    };
    for _ in 0..a.warmup {
        vit.block_vjp(mid, &x, &g, None)?;
    }
    let t = Instant::now();
    for _ in 0..a.iters {
        std::hint::black_box(vit.block_vjp(mid, &x, &g, None)?);
    }
    let vjp = t.elapsed().as_secs_f64() / a.iters as f64;
    let drop = DropPath {
        attn: vec![1.0; a.batch],
        mlp: vec![1.0; a.batch],
    };
    let t = Instant::now();
    for _ in 0..a.iters {
        std::hint::black_box(vit.block_vjp(mid, &x, &g, Some(&drop))?);
    }
    let vjp_drop = t.elapsed().as_secs_f64() / a.iters as f64;

    println!(
        "{} batch {} threads {}: forward {:.1} ms/batch = {:.1} img/s (CPU time {} ms/batch); block forward {:.2} ms; block VJP {:.2} ms ({:.2} ms with drop path); VJP/forward {:.2}",
        spec.name,
        a.batch,
        rayon::current_num_threads(),
        fwd * 1e3,
        a.batch as f64 / fwd,
        fwd_cpu,
        block_fwd * 1e3,
        vjp * 1e3,
        vjp_drop * 1e3,
        vjp / block_fwd
    );
    Ok(())
}

fn main() {
    let a = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    let r = match a.variant.as_str() {
        "tiny" => run::<VitTinyPatch16_224>(&a),
        "small" => run::<VitSmallPatch16_224>(&a),
        "base" => run::<VitBasePatch16_224>(&a),
        other => {
            eprintln!("error: unknown variant `{other}`; use tiny, small or base");
            std::process::exit(2);
        }
    };
    if let Err(e) = r {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
