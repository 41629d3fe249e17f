#!/usr/bin/env python3
"""PyTorch reference for `dtl bench --what train`: DTL / DTL+ / linear-probe training steps for a
timm ViT with random weights on synthetic batches, on the CPU (default) or a CUDA GPU, in fp32 or
with bf16 autocast, eager (`--setting official`) or compiled with bf16 weights (`--setting best`).

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
  python3 bench/reference/bench_dtl_train.py --model vit_base_patch16_224 --device cuda \
      --batch 32 128 --precision bf16 --setting official best --json ref.jsonl

Settings (--setting, one or both):

  official  eager PyTorch as the method's official code runs it: f32 weights, and with
            `--precision bf16` bf16 autocast around forward and loss (the default setting)
  best      the fastest way we know to run the same step in PyTorch: the frozen backbone cast to
            bfloat16 (weights and buffers), bf16 autocast, and torch.compile (mode "default"). The
            trainable side network and head, their gradients and the AdamW state stay float32, as
            PyTorch's automatic mixed precision keeps trainable parameters (master weights); the
            frozen weights need no master copy, so they are stored in bf16 only. `--compile regional`
            (default) compiles each transformer block and the side network's per-block operations
            once and reuses that code for every block (the same code for all twelve blocks, so a
            compile takes seconds); `--compile full` compiles the whole loss function (forward and
            loss; backward through AOTAutograd) as one graph, which can fuse across blocks but
            compiles far longer. Dynamic shapes are off: each batch size gets its own static
            compile. Compilation happens in the warm-up steps (at least 2), never in the timed ones.
            `best` runs in bf16 whatever --precision says (its rows say precision "bf16").

--batch and --precision take one or more values; every combination is measured for every
method, in one process (setting, then batch, then precision, then method: the official rows
first, so that an interrupted run keeps them). Prints one JSON line per measurement; with
--json PATH the same record, without the extra fields, is appended to PATH (one JSON object
per line) as soon as it is measured:

  method      dtl | dtlplus | linear
  model       the timm model name
  batch       images per step
  device      cpu | cuda
  precision   fp32 | bf16 (torch.autocast with dtype bfloat16 around forward and loss;
              gradients and AdamW state stay float32, and so do the weights in the official
              setting)
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
  setting     official | best
  weights     f32 | bf16: the frozen backbone's storage
  compile     null (eager) | regional | full
  warmup_s    wall seconds of the warm-up steps (for `best`: mostly compilation)
  torch       PyTorch's version
  error       only on a row that failed: why, in one line ("compile: ...", "out of memory: ...",
              "not run: ..."); its img_per_s and peak_mib are null. A failing row never stops
              the others; with --budget SECONDS, measurements that would start after that many
              seconds are written as "not run" rows instead

The stdout line adds: threads, trainable_params, peak_rss_mib, matmul_precision (PyTorch's
float32 matmul precision; "highest" means no TF32), the timm version, and the card.
"""

import argparse
import gc
import importlib
import json
import os
import resource
import sys
import time

import timm
import torch
import torch.nn.functional as F


def tap(x, a, b, z=None):
    """One tapped block's contribution to the side state, x A^T B^T, added to `z` when given."""
    t = x @ a.t() @ b.t()
    return t if z is None else z + t


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
        # The per-block side operations; `compile_regions` replaces them with compiled ones.
        self.tap_fn = tap
        self.inject_fn = self.inject

    def side_out(self, z):
        s = z * torch.sigmoid(self.beta * z)
        if self.conv is None:
            return s
        b, n, d = s.shape
        p = s[:, self.prefix:].transpose(1, 2).reshape(b, d, *self.grid)
        p = self.conv(p).reshape(b, d, -1).transpose(1, 2)
        return torch.cat([s[:, : self.prefix], p], 1)

    def inject(self, x, z):
        """The block output `x` with the side network's output for state `z` added."""
        return x + self.side_out(z)

    def compile_regions(self):
        """Compiles the per-block side operations once for every block (see `--compile`)."""
        self.tap_fn = torch.compile(tap)
        self.inject_fn = torch.compile(self.inject)

    def forward(self, x):
        v = self.vit
        x = v._pos_embed(v.patch_embed(x))
        z = None
        for i, blk in enumerate(v.blocks):
            if i in self.taps:
                z = self.tap_fn(x, self.a[str(i)], self.b[str(i)], z)
            x = blk(x)
            if i in self.injects:
                x = self.inject_fn(x, z)
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
SETTINGS = ["official", "best"]


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


def repeated_blocks(vit):
    """The backbone's transformer blocks (every stage's, for a Swin)."""
    if hasattr(vit, "blocks"):
        return list(vit.blocks)
    return [blk for layer in vit.layers for blk in layer.blocks]


def prepare_best(vit, mode):
    """Turns the shared frozen backbone into the `best` setting's: bf16 storage, and with
    `--compile regional` every block compiled in place (idempotent)."""
    vit.to(torch.bfloat16)
    if mode == "regional":
        for blk in repeated_blocks(vit):
            if getattr(blk, "_compiled_call_impl", None) is None:
                blk.compile()


def configure_compiler():
    """Static shapes (one compile per batch size) and room for every block variant."""
    cfg = importlib.import_module("torch._dynamo").config
    cfg.automatic_dynamic_shapes = False
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), 64))
    if hasattr(cfg, "inline_inbuilt_nn_modules"):
        # the same compiled code for every block: parameters are inputs, not constants
        cfg.inline_inbuilt_nn_modules = True


def one_line(e):
    """An exception as one line: its type and the first line of its message."""
    text = str(e).strip().splitlines()
    return "%s: %s" % (type(e).__name__, text[0][:300] if text else "")


def measure(args, method, vit, batch, precision, device, setting="official"):
    """Times one method at one batch size, precision and setting.

    Returns a dict: img_per_s, peak_mib, peak_reserved_mib (None on the CPU), trainable_params,
    warmup_s, warmup, and error (None, or why the measurement failed; then the figures are None).
    """
    torch.manual_seed(1)
    size = vit.patch_embed.img_size[0]
    cuda = device.type == "cuda"
    best = setting == "best"
    autocast = best or precision == "bf16"
    warmup = max(args.warmup, 2) if best else args.warmup
    out = {"img_per_s": None, "peak_mib": None, "peak_reserved_mib": None, "trainable_params": None,
           "warmup_s": None, "warmup": warmup, "error": None}
    stage = "setup"
    model = opt = x = y = None
    try:
        x = torch.randn(batch, 3, size, size).to(device)
        y = (torch.arange(batch) % args.classes).to(device)
        model = build(method, vit, args.classes, args.model).to(device)
        params = [p for p in model.parameters() if p.requires_grad]
        out["trainable_params"] = sum(p.numel() for p in params)
        decay = [p for n, p in model.named_parameters() if p.requires_grad and not n.endswith(".bias")]
        no_decay = [p for n, p in model.named_parameters() if p.requires_grad and n.endswith(".bias")]
        groups = [{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}]
        # `best` on a GPU: the fused AdamW kernel (one launch for every parameter)
        opt = torch.optim.AdamW(groups, lr=1e-3, **({"fused": True} if best and cuda else {}))
        del params, decay, no_decay, groups

        def loss_of(x, y):
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=autocast):
                return F.cross_entropy(model(x), y)

        if best:
            stage = "compile"
            if args.compile == "full":
                loss_of = torch.compile(loss_of)
            elif hasattr(model, "compile_regions"):
                model.compile_regions()

        def step():
            opt.zero_grad(set_to_none=True)
            loss = loss_of(x, y)
            loss.backward()
            opt.step()

        stage = "compile" if best else "warm-up"
        t = time.perf_counter()
        for _ in range(warmup):
            step()
        if cuda:
            torch.cuda.synchronize(device)
        out["warmup_s"] = time.perf_counter() - t
        stage = "timed steps"
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        t = time.perf_counter()
        for _ in range(args.steps):
            step()
        if cuda:
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t
        out["img_per_s"] = args.steps * batch / dt
        if cuda:
            out["peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
            out["peak_reserved_mib"] = torch.cuda.max_memory_reserved(device) / 2**20
        else:
            out["peak_mib"] = rss_mib()
    except Exception as e:  # a failing configuration is a row, never the end of the run
        kind = "out of memory" if "out of memory" in str(e).lower() else stage
        out.update(img_per_s=None, peak_mib=None, peak_reserved_mib=None, error="%s: %s" % (kind, one_line(e)))
        if best:
            importlib.import_module("torch._dynamo").reset()
    finally:
        model = opt = x = y = None  # free them before the next measurement
        gc.collect()
        if cuda:
            try:
                torch.cuda.synchronize(device)
                torch.cuda.empty_cache()
            except RuntimeError as e:  # a broken context: the next rows will say so too
                out["error"] = out["error"] or "after the timed steps: %s" % one_line(e)
    return out


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
    ap.add_argument("--setting", choices=SETTINGS, nargs="+", default=["official"],
                    help="official (eager, f32 weights; default) and/or best (bf16 weights, torch.compile)")
    ap.add_argument("--compile", choices=["regional", "full"], default="regional",
                    help="for --setting best: compile each block once (regional, default) or the whole step (full)")
    ap.add_argument("--budget", type=float, default=0, metavar="SECONDS",
                    help="write measurements that would start after SECONDS as \"not run\" rows (0: no limit)")
    ap.add_argument("--json", metavar="PATH", help="append one JSON object per measurement to PATH")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    t0 = time.perf_counter()
    if min(args.batch) < 1 or args.steps < 1 or args.warmup < 0 or args.classes < 2 or args.budget < 0:
        ap.error("--batch and --steps must be at least 1, --warmup and --budget at least 0, --classes at least 2")
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
    settings = [s for s in SETTINGS if s in args.setting]
    for setting in settings:
        best = setting == "best"
        if best:
            configure_compiler()
            prepare_best(vit, args.compile)
        for batch in args.batch:
            for precision in (["bf16"] if best else args.precision):
                for m in methods:
                    spent = time.perf_counter() - t0
                    if args.budget and spent > args.budget:
                        r = {"img_per_s": None, "peak_mib": None, "peak_reserved_mib": None,
                             "trainable_params": None, "warmup_s": None,
                             "warmup": max(args.warmup, 2) if best else args.warmup,
                             "error": "not run: the --budget of %g s was spent (%.1f s)" % (args.budget, spent)}
                    else:
                        r = measure(args, m, vit, batch, precision, device, setting)
                    record = {
                        "method": m, "model": args.model, "batch": batch, "device": args.device,
                        "precision": precision, "img_per_s": r["img_per_s"], "peak_mib": r["peak_mib"],
                        "peak_reserved_mib": r["peak_reserved_mib"], "steps": args.steps, "warmup": r["warmup"],
                        "setting": setting, "weights": "bf16" if best else "f32",
                        "compile": args.compile if best else None, "warmup_s": r["warmup_s"],
                        "torch": torch.__version__,
                    }
                    if r["error"]:
                        record["error"] = r["error"]
                    if args.json:
                        with open(args.json, "a") as f:
                            f.write(json.dumps(record) + "\n")
                    print(json.dumps(dict(record, **{
                        "threads": torch.get_num_threads(), "trainable_params": r["trainable_params"],
                        "peak_rss_mib": rss_mib(), "matmul_precision": torch.get_float32_matmul_precision(),
                        "timm": timm.__version__, "card": card,
                    })), flush=True)


if __name__ == "__main__":
    main()
