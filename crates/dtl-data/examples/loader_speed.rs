//! Times the data pipeline: opening the splits, then one pass over the test split and one
//! training epoch, at a given image size and worker count.
//!
//! ```text
//! cargo run --release -p dtl-data --example loader_speed -- <pipeline.toml> <image size> [key=value ...]
//! ```

use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 2 {
        eprintln!("usage: loader_speed <pipeline.toml> <image size> [key=value ...]");
        std::process::exit(2);
    }
    let size: usize = args[1].parse().unwrap_or_else(|_| {
        eprintln!("image size must be an integer, got `{}`", args[1]);
        std::process::exit(2)
    });
    let run = || -> dtl_core::Result<()> {
        let cfg = dtl_core::PipelineConfig::load(args[0].as_ref(), &args[2..])?;
        let t = Instant::now();
        let data = dtl_data::DataPipeline::new(&cfg, size)?;
        println!(
            "open: {:.2} s ({} train, {} test items, {} classes)",
            t.elapsed().as_secs_f64(),
            data.train_len(),
            data.test_len(),
            data.num_classes()
        );
        // Each loader starts its workers when it is created, so create one at a time.
        for name in ["test pass", "train epoch"] {
            let t = Instant::now();
            let loader = if name == "test pass" {
                data.test_loader()?
            } else {
                data.train_epoch(0, 0)?
            };
            let mut n = 0;
            for b in loader {
                n += b?.n;
            }
            let s = t.elapsed().as_secs_f64();
            println!("{name}: {n} images in {s:.2} s = {:.0} img/s", n as f64 / s);
        }
        Ok(())
    };
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
