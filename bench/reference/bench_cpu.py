#!/usr/bin/env python3
"""PyTorch/timm side of the CPU frozen-backbone benchmark.

Times timm's ViT-Ti/16 at 224 (random weights, float32, eval mode) on the CPU:
  forward   frozen forward (forward_features under torch.no_grad), img/s
  block     one block's forward, and its input-only backward (autograd with respect to the
            block input, weights frozen), ms
  dtl       a DTL training step (r=2, taps all blocks, injects second half, frozen backbone),
            img/s, when --dtl is given

Usage:
  python3 bench/reference/bench_cpu.py [--batch 8] [--iters 10] [--warmup 2] [--threads N] [--dtl]
"""

import argparse
import time

import torch
import torch.nn.functional as F
import timm


CPU = {}


def timed(fn, iters, warmup, key=None):
    """Wall seconds per call; also records process CPU seconds per call under `key`."""
    for _ in range(warmup):
        fn()
    t = time.perf_counter()
    c = time.process_time()
    for _ in range(iters):
        fn()
    if key:
        CPU[key] = (time.process_time() - c) / iters
    return (time.perf_counter() - t) / iters


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vit_tiny_patch16_224")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--dtl", action="store_true", help="also time a DTL training step")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = timm.create_model(a.model, pretrained=False, num_classes=0).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    size = model.patch_embed.img_size
    x = torch.randn(a.batch, 3, *size)

    with torch.no_grad():
        fwd = timed(lambda: model.forward_features(x), a.iters, a.warmup, "forward")
        h = model._pos_embed(model.patch_embed(x))
        for blk in model.blocks[: len(model.blocks) // 2]:
            h = blk(h)
    mid = model.blocks[len(model.blocks) // 2]
    with torch.no_grad():
        blk_fwd = timed(lambda: mid(h), a.iters, a.warmup)
    g = torch.randn_like(h)

    def vjp():
        hi = h.detach().requires_grad_(True)
        y = mid(hi)
        (gx,) = torch.autograd.grad(y, hi, g)
        return gx

    blk_vjp = timed(vjp, a.iters, a.warmup)
    line = (f"{a.model} batch {a.batch} threads {torch.get_num_threads()} torch {torch.__version__} "
            f"timm {timm.__version__}: forward {fwd * 1e3:.1f} ms/batch = {a.batch / fwd:.1f} img/s; "
            f"(CPU time {CPU['forward'] * 1e3:.1f} ms/batch); "
            f"block forward {blk_fwd * 1e3:.2f} ms; block forward+VJP (autograd) {blk_vjp * 1e3:.2f} ms")

    if a.dtl:
        d = model.embed_dim
        depth = len(model.blocks)
        side_a = [(torch.rand(2, d) * 2 - 1).div(d ** 0.5).requires_grad_(True) for _ in range(depth)]
        side_b = [torch.zeros(d, 2, requires_grad=True) for _ in range(depth)]
        head = torch.nn.Linear(d, 10)
        params = side_a + side_b + list(head.parameters())
        opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05)
        labels = torch.randint(0, 10, (a.batch,))

        def step():
            hh = model._pos_embed(model.patch_embed(x))
            z = None
            for i, blk in enumerate(model.blocks):
                zi = hh @ side_a[i].T @ side_b[i].T
                z = zi if z is None else z + zi
                hh = blk(hh)
                if i >= depth // 2:
                    hh = hh + z * torch.sigmoid(100.0 * z)
            feats = model.norm(hh[:, model.num_prefix_tokens:].mean(1))
            loss = F.cross_entropy(head(feats), labels)
            opt.zero_grad()
            loss.backward()
            opt.step()

        tr = timed(step, a.iters, a.warmup)
        line += f"; DTL training {a.batch / tr:.1f} img/s"
    print(line)


if __name__ == "__main__":
    main()
