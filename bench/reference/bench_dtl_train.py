#!/usr/bin/env python3
"""PyTorch reference for `dtl bench --what train`: DTL / DTL+ / linear-probe training steps for a
timm ViT with random weights on synthetic batches, on the CPU (default) or a CUDA GPU, in fp32 or
with bf16 autocast.

The model follows the method's equations: z accumulates x_i A_i^T B_i^T over the tapped
blocks, swish_beta(z) (then, for DTL+, a depthwise k x k conv over the patch grid, class token
unconvolved) is added after each inject block, and the head is LayerNorm(mean of the patch
tokens) -> linear. The backbone is frozen (requires_grad False); stochastic depth is off.
A step is forward, cross entropy, backward and AdamW (weight decay 0.05, none on `.bias`).
Settings: r = 2, beta = 100, taps = every block, injects = the second half, DTL+ kernel 3.

A Swin model (`--model swin_tiny_patch4_window7_224`, `swin_small_...`, `swin_base_patch4_window7_224`,
`swin_base_patch4_window12_384`, `swin_large_patch4_window7_224`) runs the official DTL Swin method
of swin_reference.py instead: blocks numbered over the stages, z reset at every stage, one
depthwise conv per stage for DTL+, final norm then the mean over all tokens; with the official
Swin-B settings r = 4, beta = 100, taps 4-23, injects 14-23 (scaled to the depth: 2-11 and 7-11 on
the 12 blocks of Swin-T), DTL+ kernel 5. The output format is the same.

  python3 bench/reference/bench_dtl_train.py --model vit_tiny_patch16_224 --batch 8 --steps 10
  python3 bench/reference/bench_dtl_train.py --model vit_base_patch16_224 --device cuda \
      --batch 32 128 --precision fp32 bf16 --steps 10 --warmup 3 --json ref.jsonl

--batch and --precision take one or more values; every combination is measured for every
method, in one process (batch, then precision, then method). Prints one JSON line per
measurement; with --json PATH the same record, without the extra fields, is appended to PATH
(one JSON object per line) as soon as it is measured:

  method      dtl | dtlplus | linear
  model       the timm model name
  batch       images per step
  device      cpu | cuda
  precision   fp32 | bf16 (torch.autocast with dtype bfloat16 around forward and loss;
              weights, gradients and AdamW state stay float32)
  img_per_s   batch * steps / wall seconds of the timed steps (on CUDA the device is
              synchronised before the clock starts and before it is read)
  peak_mib    on CUDA: torch.cuda.max_memory_allocated in MiB over the timed steps (the counter
              is reset after the warm-up steps; the frozen weights, the input batch, the
              AdamW state and every activation count). On the CPU: the process's peak
              resident set (ru_maxrss), which never goes down, so later measurements in the
              same process include earlier ones: run one --method per process for per-method
              CPU figures
  peak_reserved_mib  on CUDA: torch.cuda.max_memory_reserved in MiB over the timed steps (what
              the caching allocator held, freed blocks it keeps included); null on the CPU
  steps       timed steps; warmup: untimed steps before them

The stdout line adds: threads, trainable_params, peak_rss_mib, matmul_precision (PyTorch's
float32 matmul precision; "highest" means no TF32), torch and timm versions, and the card.
"""

import argparse
import gc
import json
import os
import resource
import sys
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


METHODS = ["dtl", "dtlplus", "linear"]


def is_swin(model):
    """Whether `--model` names a Swin Transformer (the official Swin method applies)."""
    return model.startswith("swin")


def build(method, vit, classes, model=""):
    """The trainable model of one method around the shared frozen `vit` (a ViT or a Swin)."""
    if is_swin(model):
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import swin_reference

        return swin_reference.build_method(method, vit, classes)
    if method == "linear":
        return Probe(vit, classes)
    depth = len(vit.blocks)
    kernel = 3 if method == "dtlplus" else 0
    return Dtl(vit, 2, 100.0, list(range(depth)), list(range(depth // 2, depth)), kernel, classes)


def measure(args, method, vit, batch, precision, device):
    """Times one method at one batch size and precision.

    Returns (img/s, peak MiB, peak reserved MiB or None on the CPU, trainable parameters)."""
    torch.manual_seed(1)
    size = vit.patch_embed.img_size[0]
    x = torch.randn(batch, 3, size, size).to(device)
    y = (torch.arange(batch) % args.classes).to(device)
    model = build(method, vit, args.classes, args.model).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for n, p in model.named_parameters() if p.requires_grad and not n.endswith(".bias")]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and n.endswith(".bias")]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}], lr=1e-3)
    cuda = device.type == "cuda"
    autocast = precision == "bf16"

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    for _ in range(args.warmup):
        step()
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    t = time.perf_counter()
    for _ in range(args.steps):
        step()
    if cuda:
        torch.cuda.synchronize(device)
    dt = time.perf_counter() - t
    if cuda:
        peak = torch.cuda.max_memory_allocated(device) / 2**20
        reserved = torch.cuda.max_memory_reserved(device) / 2**20
    else:
        peak, reserved = rss_mib(), None
    trainable = sum(p.numel() for p in params)
    del model, opt, params, decay, no_decay, x, y
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return args.steps * batch / dt, peak, reserved, trainable


def rss_mib():
    """Peak resident set of this process in MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vit_tiny_patch16_224")
    ap.add_argument("--batch", type=int, nargs="+", default=[8], help="one or more batch sizes (default 8)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--method", choices=METHODS + ["dtl+", "all"], default="all",
                    help="dtl, dtlplus (alias dtl+), linear or all (default)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--precision", choices=["fp32", "bf16"], nargs="+", default=["fp32"],
                    help="fp32 (default) and/or bf16 (autocast)")
    ap.add_argument("--json", metavar="PATH", help="append one JSON object per measurement to PATH")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if min(args.batch) < 1 or args.steps < 1 or args.warmup < 0 or args.classes < 2:
        ap.error("--batch and --steps must be at least 1, --warmup at least 0, --classes at least 2")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: PyTorch sees no CUDA device (torch %s, built for CUDA %s)" % (torch.__version__, torch.version.cuda))
    if args.json:
        try:
            open(args.json, "a").close()
        except OSError as e:
            ap.error("--json %s: cannot append to it (%s)" % (args.json, e.strerror))
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    torch.manual_seed(0)
    try:
        vit = timm.create_model(args.model, pretrained=False, num_classes=0, drop_path_rate=0.0)
    except RuntimeError as e:
        ap.error("--model %s: %s" % (args.model, str(e).splitlines()[0]))
    vit.eval()
    for p in vit.parameters():
        p.requires_grad_(False)
    vit.to(device)
    if args.method == "all":
        methods = METHODS
    else:
        methods = ["dtlplus" if args.method == "dtl+" else args.method]
    for batch in args.batch:
        for precision in args.precision:
            for m in methods:
                ips, peak, reserved, trainable = measure(args, m, vit, batch, precision, device)
                record = {
                    "method": m, "model": args.model, "batch": batch, "device": args.device,
                    "precision": precision, "img_per_s": ips, "peak_mib": peak,
                    "peak_reserved_mib": reserved, "steps": args.steps, "warmup": args.warmup,
                }
                if args.json:
                    with open(args.json, "a") as f:
                        f.write(json.dumps(record) + "\n")
                print(json.dumps(dict(record, **{
                    "threads": torch.get_num_threads(), "trainable_params": trainable,
                    "peak_rss_mib": rss_mib(), "matmul_precision": torch.get_float32_matmul_precision(),
                    "torch": torch.__version__, "timm": timm.__version__, "card": card,
                })), flush=True)


if __name__ == "__main__":
    main()
