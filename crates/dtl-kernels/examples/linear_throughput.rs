//! Throughput of the CPU kernel set's `linear` (`y = x w^T + b`) on the products of a ViT-S/16
//! step, for comparison with PyTorch's `torch.nn.functional.linear` on the same shapes
//! (`bench/reference/linear_throughput.py`). Fastest of 15 calls after 3 warm-up calls, on the
//! rayon pool (`RAYON_NUM_THREADS`, default: every core).
//!
//! ```text
//! cargo run --release -p dtl-kernels --example linear_throughput
//! ```

use std::time::Instant;

/// (rows, in, out): qkv, proj, fc1 and fc2 of ViT-S/16 at 224 for batch 8 (197 tokens per
/// image), then qkv and fc2 for batch 32.
const SHAPES: [(usize, usize, usize); 6] = [
    (1576, 384, 1152),
    (1576, 384, 384),
    (1576, 384, 1536),
    (1576, 1536, 384),
    (6304, 384, 1152),
    (6304, 1536, 384),
];

fn main() {
    println!(
        "dtl-kernels linear on {} threads (fastest of 15)",
        rayon::current_num_threads()
    );
    println!("| rows x in x out | ms | GFLOP/s |");
    println!("|---|---|---|");
    for &(m, k, n) in &SHAPES {
        let x: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let w: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.11).cos()).collect();
        let b = vec![0.1f32; n];
        let mut y = vec![0f32; m * n];
        let mut call = || dtl_kernels::cpu::ops::linear(&x, &w, Some(&b), m, k, n, &mut y, false);
        for _ in 0..3 {
            call();
        }
        let best = (0..15)
            .map(|_| {
                let t = Instant::now();
                call();
                t.elapsed().as_secs_f64()
            })
            .fold(f64::MAX, f64::min);
        let gflops = 2.0 * (m * k * n) as f64 / best / 1e9;
        println!("| {m} x {k} x {n} | {:.2} | {gflops:.0} |", best * 1e3);
    }
}
