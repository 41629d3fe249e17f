"""Throughput of torch.nn.functional.linear (y = x w^T + b) on the products of a ViT-S/16 step,
the PyTorch side of `cargo run --release -p dtl-kernels --example linear_throughput`: the same
shapes, fastest of 15 calls after 3 warm-up calls.

    python3 bench/reference/linear_throughput.py --threads 2
"""

import argparse
import time

import torch

# (rows, in, out): qkv, proj, fc1, fc2 of ViT-S/16 at 224, batch 8; then qkv and fc2 at batch 32
SHAPES = [(1576, 384, 1152), (1576, 384, 384), (1576, 384, 1536), (1576, 1536, 384),
          (6304, 384, 1152), (6304, 1536, 384)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__} linear on {args.threads} threads (fastest of 15)")
    print("| rows x in x out | ms | GFLOP/s |")
    print("|---|---|---|")
    with torch.no_grad():
        for m, k, n in SHAPES:
            x, w, b = torch.randn(m, k), torch.randn(n, k), torch.randn(n)
            for _ in range(3):
                torch.nn.functional.linear(x, w, b)
            best = float("inf")
            for _ in range(15):
                t = time.perf_counter()
                torch.nn.functional.linear(x, w, b)
                best = min(best, time.perf_counter() - t)
            print(f"| {m} x {k} x {n} | {best * 1e3:.2f} | {2 * m * k * n / best / 1e9:.0f} |")


if __name__ == "__main__":
    main()
