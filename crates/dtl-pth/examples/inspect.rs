//! Lists the tensors of a `torch.save` checkpoint without executing it.
//!
//! ```sh
//! cargo run --release -p dtl-pth --example inspect -- swin_base_patch4_window7_224_22k.pth [ENTRY]
//! ```
//!
//! ENTRY is a key path such as `model`; without it the state dict is looked for under `model`,
//! then `state_dict`, then at the top level.

use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(path) = args.first() else {
        eprintln!("usage: inspect FILE.pth [ENTRY]");
        std::process::exit(2);
    };
    let t = Instant::now();
    let sd = match args.get(1) {
        Some(e) => dtl_pth::read(path, Some(e)),
        None => dtl_pth::read_state_dict(path),
    };
    let sd = match sd {
        Ok(sd) => sd,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    };
    let secs = t.elapsed().as_secs_f64();
    let mut bytes = 0usize;
    for (name, t) in sd.iter() {
        println!("{name}\t{}\t{:?}", t.dtype.name(), t.shape);
        bytes += t.data.len();
    }
    eprintln!(
        "{} tensors, {:.1} MiB, read in {secs:.2} s",
        sd.len(),
        bytes as f64 / (1 << 20) as f64
    );
}
