#!/usr/bin/env python3
"""PyTorch reference for `dtl bench --what train`: DTL / DTL+ / linear-probe training steps on
CPU for a timm ViT with random weights, synthetic batches, fp32.

The model follows the method's equations: z accumulates x_i A_i^T B_i^T over the tapped
blocks, swish_beta(z) (then, for DTL+, a depthwise k x k conv over the patch grid, class token
unconvolved) is added after each inject block, and the head is LayerNorm(mean of the patch
tokens) -> linear. The backbone is frozen (requires_grad False); stochastic depth is off.
A step is forward, cross entropy, backward and AdamW (weight decay 0.05, none on `.bias`).

  python3 bench/reference/bench_dtl_train.py --model vit_tiny_patch16_224 --batch 8 --steps 10

Prints one JSON line per method: img/s over the timed steps and the peak resident memory of
the process (ru_maxrss; a fresh process per method with --method).
"""

import argparse
import json
import resource
import time

import timm
import torch
import torch.nn.functional as F


class Dtl(torch.nn.Module):
    def __init__(self, vit, rank, beta, taps, injects, kernel, classes):
        super().__init__()
        self.vit, self.beta, self.taps, self.injects = vit, beta, taps, injects
        d = vit.embed_dim
        self.a = torch.nn.ParameterDict()
        self.b = torch.nn.ParameterDict()
        for i in taps:
            self.a[str(i)] = torch.nn.Parameter(torch.empty(rank, d).uniform_(-d ** -0.5, d ** -0.5))
            self.b[str(i)] = torch.nn.Parameter(torch.zeros(d, rank))
        self.conv = torch.nn.Conv2d(d, d, kernel, padding="same", groups=d, bias=False) if kernel else None
        self.head = torch.nn.Linear(d, classes)
        self.grid = vit.patch_embed.grid_size
        self.prefix = vit.num_prefix_tokens

    def side_out(self, z):
        s = z * torch.sigmoid(self.beta * z)
        if self.conv is None:
            return s
        b, n, d = s.shape
        p = s[:, self.prefix:].transpose(1, 2).reshape(b, d, *self.grid)
        p = self.conv(p).reshape(b, d, -1).transpose(1, 2)
        return torch.cat([s[:, : self.prefix], p], 1)

    def forward(self, x):
        v = self.vit
        x = v._pos_embed(v.patch_embed(x))
        z = None
        for i, blk in enumerate(v.blocks):
            if i in self.taps:
                t = x @ self.a[str(i)].t() @ self.b[str(i)].t()
                z = t if z is None else z + t
            x = blk(x)
            if i in self.injects:
                x = x + self.side_out(z)
        return self.head(v.norm(x[:, self.prefix:].mean(1)))


class Probe(torch.nn.Module):
    def __init__(self, vit, classes):
        super().__init__()
        self.vit = vit
        self.head = torch.nn.Linear(vit.embed_dim, classes)

    def forward(self, x):
        with torch.no_grad():
            v = self.vit
            h = v.blocks(v._pos_embed(v.patch_embed(x)))
            f = v.norm(h[:, v.num_prefix_tokens:].mean(1))
        return self.head(f)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="vit_tiny_patch16_224")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--method", choices=["dtl", "dtl+", "linear", "all"], default="all")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    vit = timm.create_model(args.model, pretrained=False, num_classes=0, drop_path_rate=0.0)
    vit.eval()
    for p in vit.parameters():
        p.requires_grad_(False)
    depth = len(vit.blocks)
    size = vit.patch_embed.img_size[0]
    methods = ["dtl", "dtl+", "linear"] if args.method == "all" else [args.method]
    x = torch.randn(args.batch, 3, size, size)
    y = torch.arange(args.batch) % args.classes
    for m in methods:
        if m == "linear":
            model = Probe(vit, args.classes)
        else:
            model = Dtl(vit, 2, 100.0, list(range(depth)), list(range(depth // 2, depth)), 3 if m == "dtl+" else 0, args.classes)
        params = [p for p in model.parameters() if p.requires_grad]
        decay = [p for n, p in model.named_parameters() if p.requires_grad and not n.endswith(".bias")]
        no_decay = [p for n, p in model.named_parameters() if p.requires_grad and n.endswith(".bias")]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}], lr=1e-3)

        def step():
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()

        for _ in range(args.warmup):
            step()
        t = time.perf_counter()
        for _ in range(args.steps):
            step()
        dt = time.perf_counter() - t
        print(json.dumps({
            "method": m, "model": args.model, "batch": args.batch, "threads": torch.get_num_threads(),
            "img_per_s": args.steps * args.batch / dt,
            "trainable_params": sum(p.numel() for p in params),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "torch": torch.__version__, "timm": timm.__version__,
        }), flush=True)


if __name__ == "__main__":
    main()
