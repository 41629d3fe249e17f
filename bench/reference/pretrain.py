#!/usr/bin/env python3
"""Pretrains the quickstart backbone `vit_mini_patch4_28` on Fashion-MNIST and measures how it
transfers to MNIST, in PyTorch + timm.

Two sub-commands (run from the repository root after `scripts/setup-data.sh`):

  pretrain   trains a timm VisionTransformer (image 28, patch 4, width 64, depth 4, 4 heads,
             class token, mean of the patch tokens -> LayerNorm -> linear) on Fashion-MNIST
             train, reports Fashion-MNIST test accuracy and writes the backbone (no head) as
             f32 safetensors in timm names plus a JSON recipe/provenance file next to it.
  transfer   trains a linear probe, DTL or DTL+ on the frozen backbone on data/mnist/*.csv
             and reports test accuracy and training time, for a grid of settings.

The final LayerNorm is applied after pooling (the DTL head: mean of patch tokens, then the
norm). In timm that is `global_pool="avg", fc_norm=True`, whose norm is called `fc_norm`; the
file stores it under the name `norm`, as the project's ViT loader and timm's class-token ViTs
name the final norm. To load the file into timm, rename `norm.*` to `fc_norm.*` and build the
model with `fc_norm=True` (see `build_model`).
"""

import os

# Deterministic cuBLAS when run on a GPU (must be set before CUDA starts), and timm's explicit
# attention (softmax(q k^T / sqrt(d)) v) instead of fused kernels with non-deterministic backward.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
os.environ.setdefault("TIMM_FUSED_ATTN", "0")

import argparse
import gzip
import hashlib
import json
import math
import platform
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import timm
from timm.models.vision_transformer import VisionTransformer

VARIANT = "vit_mini_patch4_28"
ARCH = dict(img_size=28, patch_size=4, in_chans=3, embed_dim=64, depth=4, num_heads=4, mlp_ratio=4.0)


def build_model(num_classes=10):
    """The backbone with a mean-pool -> LayerNorm -> linear head."""
    return VisionTransformer(
        **ARCH,
        num_classes=num_classes,
        class_token=True,
        global_pool="avg",
        fc_norm=True,
        qkv_bias=True,
    )


# ------------------------------------------------------------------------------------ data


def read_idx(path):
    """Reads an IDX file (gzip or raw) into a uint8 array."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        sys.exit(f"{path}: not an unsigned-byte IDX file")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        sys.exit(f"{path}: header says {dims} but holds {data.size} bytes")
    return data.reshape(dims)


def load_fmnist(root):
    def pair(prefix):
        for ext in (".gz", ""):
            img = os.path.join(root, f"{prefix}-images-idx3-ubyte{ext}")
            lab = os.path.join(root, f"{prefix}-labels-idx1-ubyte{ext}")
            if os.path.isfile(img) and os.path.isfile(lab):
                return read_idx(img), read_idx(lab)
        sys.exit(f"{root}: no {prefix}-images-idx3-ubyte[.gz]; run scripts/setup-data.sh first")

    return pair("train"), pair("t10k")


def load_csv(path):
    if not os.path.isfile(path):
        sys.exit(f"{path} does not exist; run scripts/setup-data.sh first")
    arr = np.loadtxt(path, delimiter=",", dtype=np.int64)
    labels = arr[:, 0]
    side = int(round(math.sqrt(arr.shape[1] - 1)))
    return arr[:, 1:].astype(np.uint8).reshape(-1, side, side), labels


def to_input(images_u8):
    """uint8 (N, 28, 28) -> float (N, 3, 28, 28), grey replicated, mean = std = 0.5."""
    x = torch.from_numpy(np.array(images_u8, dtype=np.float32)).div_(255.0)
    x = (x - 0.5) / 0.5
    return x.unsqueeze(1).expand(-1, 3, -1, -1).contiguous()


def augment(x, gen, pad):
    """Random translation by up to `pad` pixels (filled with background) and horizontal flip.

    The random numbers come from the CPU generator `gen` whatever the device of `x`, so a run
    draws the same shifts and flips on CPU and GPU.
    """
    b, c, h, w = x.shape
    dev = x.device
    if pad > 0:
        xp = F.pad(x, (pad, pad, pad, pad), value=-1.0)
        dy = torch.randint(0, 2 * pad + 1, (b,), generator=gen).to(dev)
        dx = torch.randint(0, 2 * pad + 1, (b,), generator=gen).to(dev)
        ar_h = torch.arange(h, device=dev)
        ar_w = torch.arange(w, device=dev)
        rows = (dy[:, None] + ar_h[None, :])[:, None, :, None].expand(b, c, h, w + 2 * pad)
        cols = (dx[:, None] + ar_w[None, :])[:, None, None, :].expand(b, c, h, w)
        x = torch.gather(torch.gather(xp, 2, rows), 3, cols)
    flip = (torch.rand(b, generator=gen) < 0.5).to(dev)
    return torch.where(flip[:, None, None, None], x.flip(3), x)


# --------------------------------------------------------------------------- schedules


def cosine_lr(t, base, total, warmup, warmup_lr=1e-7, min_lr=1e-8):
    """timm CosineLRScheduler (cycle 1, warm-up overlapping the cosine) at step/epoch t."""
    if t < warmup:
        return warmup_lr + t * (base - warmup_lr) / warmup
    return min_lr + 0.5 * (base - min_lr) * (1 + math.cos(math.pi * min(t, total) / total))


def param_groups(named, wd):
    decay = [p for n, p in named if not n.endswith(".bias")]
    no_decay = [p for n, p in named if n.endswith(".bias")]
    return [dict(params=decay, weight_decay=wd), dict(params=no_decay, weight_decay=0.0)]


@torch.no_grad()
def accuracy(fn, x, y, device, batch=500):
    correct = 0
    for i in range(0, len(x), batch):
        logits = fn(x[i : i + batch].to(device))
        correct += (logits.argmax(1).cpu() == y[i : i + batch]).sum().item()
    return correct / len(x)


# ---------------------------------------------------------------------------- pretrain


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read())
    return h.hexdigest()


def backbone_state(model):
    """The backbone tensors in timm names, final norm as `norm.*`, no head."""
    out = {}
    for name, t in model.state_dict().items():
        if name.startswith("head."):
            continue
        if name.startswith("fc_norm."):
            name = "norm." + name[len("fc_norm.") :]
        out[name] = t.detach().to("cpu", torch.float32).contiguous()
    return out


def cmd_pretrain(a):
    from safetensors.torch import save_file

    torch.manual_seed(a.seed)
    np.random.seed(a.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    if a.threads:
        torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    (tr_x, tr_y), (te_x, te_y) = load_fmnist(a.data)
    xtr, ytr = to_input(tr_x).to(dev), torch.from_numpy(tr_y.astype(np.int64)).to(dev)
    xte, yte = to_input(te_x), torch.from_numpy(te_y.astype(np.int64))
    if a.limit_train:
        xtr, ytr = xtr[: a.limit_train], ytr[: a.limit_train]
    if a.limit_test:
        xte, yte = xte[: a.limit_test], yte[: a.limit_test]

    model = build_model(10).to(dev)
    opt = torch.optim.AdamW(param_groups(list(model.named_parameters()), a.weight_decay), lr=a.lr, betas=(0.9, 0.999))
    gen = torch.Generator().manual_seed(a.seed)
    steps_per_epoch = len(xtr) // a.batch_size
    total = a.epochs * steps_per_epoch
    warm = a.warmup_epochs * steps_per_epoch
    step = 0
    t0 = time.time()
    history = []
    for epoch in range(a.epochs):
        model.train()
        perm = torch.randperm(len(xtr), generator=gen)
        run_loss = torch.zeros((), device=dev)
        for i in range(steps_per_epoch):
            idx = perm[i * a.batch_size : (i + 1) * a.batch_size].to(dev)
            xb = augment(xtr[idx], gen, a.translate)
            yb = ytr[idx]
            for g in opt.param_groups:
                g["lr"] = cosine_lr(step, a.lr, total, warm)
            loss = F.cross_entropy(model(xb), yb, label_smoothing=a.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            run_loss += loss.detach()
            step += 1
        run_loss = run_loss.item()
        model.eval()
        acc = accuracy(model, xte, yte, dev)
        history.append(dict(epoch=epoch + 1, train_loss=round(run_loss / steps_per_epoch, 4), test_acc=acc))
        print(f"epoch {epoch + 1}/{a.epochs}  loss {run_loss / steps_per_epoch:.4f}  fmnist test acc {acc:.4f}  "
              f"({time.time() - t0:.0f} s)", flush=True)
        if a.save_epochs and (epoch + 1) in a.save_epochs and epoch + 1 != a.epochs:
            stem, ext = os.path.splitext(a.out)
            save_file(backbone_state(model), f"{stem}.e{epoch + 1}{ext}")
    seconds = time.time() - t0

    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    state = backbone_state(model)
    save_file(state, a.out, metadata={"format": "pt", "variant": VARIANT})
    meta = dict(
        variant=VARIANT,
        file=os.path.basename(a.out),
        sha256=sha256(a.out),
        bytes=os.path.getsize(a.out),
        dtype="float32",
        parameters=int(sum(t.numel() for t in state.values())),
        tensors=sorted(state),
        architecture=dict(ARCH, class_token=True, pool="mean of patch tokens, then norm", norm_eps=1e-6,
                          timm_equivalent="VisionTransformer(img_size=28, patch_size=4, in_chans=3, embed_dim=64, "
                          "depth=4, num_heads=4, global_pool='avg', fc_norm=True) with norm.* renamed to fc_norm.*"),
        recipe=dict(
            command="python3 bench/reference/pretrain.py pretrain " + " ".join(a.argv),
            data="Fashion-MNIST train (60,000), grey replicated to 3 channels, mean = std = 0.5",
            augmentation=f"random translation up to {a.translate} px (background padding), horizontal flip p=0.5",
            epochs=a.epochs, batch_size=a.batch_size, optimizer="AdamW", lr=a.lr, betas=[0.9, 0.999],
            weight_decay=a.weight_decay, no_weight_decay="names ending in .bias",
            schedule=f"cosine per step, {a.warmup_epochs} warm-up epoch(s) from 1e-7, floor 1e-8",
            label_smoothing=a.label_smoothing, seed=a.seed, device=str(dev),
            hardware=torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
            threads=torch.get_num_threads(),
        ),
        fmnist_test_accuracy=history[-1]["test_acc"],
        history=history,
        train_seconds=round(seconds, 1),
        versions=dict(python=platform.python_version(), torch=torch.__version__, timm=timm.__version__,
                      numpy=np.__version__),
        license="MIT OR Apache-2.0 (the project licence); trained on Fashion-MNIST, Copyright 2017 Zalando SE, MIT",
    )
    with open(os.path.splitext(a.out)[0] + ".json", "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")
    print(f"wrote {a.out} ({meta['bytes']} bytes, sha256 {meta['sha256']}); "
          f"fmnist test accuracy {meta['fmnist_test_accuracy']:.4f} after {seconds:.0f} s")


# ---------------------------------------------------------------------------- transfer


class Transfer(nn.Module):
    """Frozen backbone + (optional) DTL side network + mean-pool -> frozen norm -> linear head."""

    def __init__(self, backbone, side, rank, beta, kernel, taps, injects, classes):
        super().__init__()
        self.bb = backbone
        for p in self.bb.parameters():
            p.requires_grad_(False)
        d = backbone.embed_dim
        self.side, self.beta, self.taps, self.injects = side, beta, set(taps), set(injects)
        self.grid = backbone.patch_embed.grid_size[0]
        # The final norm that follows pooling: timm keeps it in `fc_norm` when fc_norm=True.
        self.final_norm = backbone.norm if isinstance(backbone.fc_norm, nn.Identity) else backbone.fc_norm
        if side != "linear":
            self.a = nn.ParameterDict()
            self.b = nn.ParameterDict()
            for i in taps:
                w = torch.empty(rank, d)
                nn.init.kaiming_uniform_(w, a=math.sqrt(5))
                self.a[str(i)] = nn.Parameter(w)
                self.b[str(i)] = nn.Parameter(torch.zeros(d, rank))
            self.conv = nn.Conv2d(d, d, kernel, groups=d, bias=False, padding="same") if kernel else None
        self.head = nn.Linear(d, classes)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def g(self, z):
        out = z * torch.sigmoid(self.beta * z)
        if self.side != "linear" and self.conv is not None:
            n = self.bb.num_prefix_tokens
            pre, patches = out[:, :n], out[:, n:]
            b, t, d = patches.shape
            grid = patches.transpose(1, 2).reshape(b, d, self.grid, self.grid)
            patches = self.conv(grid).reshape(b, d, t).transpose(1, 2)
            out = torch.cat([pre, patches], 1)
        return out

    def forward(self, x):
        bb = self.bb
        x = bb._pos_embed(bb.patch_embed(x))
        x = bb.norm_pre(x)
        z = None
        for i, blk in enumerate(bb.blocks):
            if self.side != "linear" and i in self.taps:
                u = x @ self.a[str(i)].t() @ self.b[str(i)].t()
                z = u if z is None else z + u
            x = blk(x)
            if self.side != "linear" and i in self.injects and z is not None:
                x = x + self.g(z)
        feats = self.final_norm(x[:, bb.num_prefix_tokens :].mean(1))
        return self.head(feats)


def load_backbone(path, dev):
    from safetensors.torch import load_file

    state = load_file(path)
    state = {("fc_norm." + k[5:] if k.startswith("norm.") else k): v for k, v in state.items()}
    model = build_model(10)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) != {"head.weight", "head.bias"}:
        sys.exit(f"{path}: unexpected tensors {unexpected} / missing {missing}")
    return model.to(dev).eval()


def run_transfer(backbone_path, xtr, ytr, xte, yte, side, lr, epochs, rank, kernel, beta, batch, warmup, seed,
                 dev, wd, taps, injects):
    torch.manual_seed(seed)
    bb = load_backbone(backbone_path, dev)
    model = Transfer(bb, side, rank, beta, kernel, taps, injects, 10).to(dev)
    model.eval()  # frozen backbone: no drop path / dropout (none are configured anyway)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    opt = torch.optim.AdamW(param_groups(named, wd), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    steps = len(xtr) // batch
    t0 = time.time()
    for epoch in range(epochs):
        for g in opt.param_groups:
            g["lr"] = cosine_lr(epoch, lr, epochs, warmup)
        perm = torch.randperm(len(xtr), generator=gen)
        for i in range(steps):
            idx = perm[i * batch : (i + 1) * batch]
            loss = F.cross_entropy(model(xtr[idx].to(dev)), ytr[idx].to(dev))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    train_s = time.time() - t0
    acc = accuracy(model, xte, yte, dev)
    trainable = sum(p.numel() for _, p in named)
    return acc, train_s, trainable


def parse_list(text, cast):
    return [cast(v) for v in text.split(",") if v]


def cmd_transfer(a):
    if a.threads:
        torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    tr_x, tr_y = load_csv(os.path.join(a.data, "train.csv"))
    te_x, te_y = load_csv(os.path.join(a.data, "test.csv"))
    xtr, ytr = to_input(tr_x), torch.from_numpy(tr_y)
    xte, yte = to_input(te_x), torch.from_numpy(te_y)
    depth = ARCH["depth"]
    taps = list(range(depth)) if a.taps == "all" else parse_list(a.taps, int)
    injects = list(range(depth // 2, depth)) if a.injects == "default" else parse_list(a.injects, int)
    results = []
    for weights in parse_list(a.weights, str):
        for limit in parse_list(a.limit_train, int):
            for side in parse_list(a.side, str):
                kinds = [("linear", 0)] if side == "linear" else [(side, k) for k in
                                                                   ([0] if side == "dtl" else parse_list(a.kernel, int))]
                for kind, k in kinds:
                    ranks = [0] if kind == "linear" else parse_list(a.rank, int)
                    for r in ranks:
                        for epochs in parse_list(a.epochs, int):
                            for lr in parse_list(a.lr, float):
                                acc, secs, n = run_transfer(weights, xtr[:limit], ytr[:limit], xte, yte, kind, lr,
                                                            epochs, r, k, a.beta, a.batch_size, a.warmup, a.seed,
                                                            dev, a.weight_decay, taps, injects)
                                row = dict(weights=os.path.basename(weights), train=limit, side=kind, rank=r,
                                           kernel=k, epochs=epochs, lr=lr, batch=a.batch_size, test_acc=acc,
                                           train_s=round(secs, 2), trainable=n)
                                results.append(row)
                                print(json.dumps(row), flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(results, f, indent=1)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    q = sub.add_parser("pretrain", help="pretrain on Fashion-MNIST and write the backbone")
    q.add_argument("--data", default="data/fashion-mnist")
    q.add_argument("--out", default="assets/vit_mini_patch4_28_fmnist.safetensors")
    q.add_argument("--epochs", type=int, default=15)
    q.add_argument("--batch-size", type=int, default=128)
    q.add_argument("--lr", type=float, default=2e-3)
    q.add_argument("--weight-decay", type=float, default=0.05)
    q.add_argument("--warmup-epochs", type=int, default=1)
    q.add_argument("--label-smoothing", type=float, default=0.0)
    q.add_argument("--translate", type=int, default=2, help="max random shift in pixels (0 = none)")
    q.add_argument("--limit-train", type=int, default=0, help="use only this many training images (0 = all)")
    q.add_argument("--limit-test", type=int, default=0, help="evaluate on only this many test images (0 = all)")
    q.add_argument("--save-epochs", type=lambda s: parse_list(s, int), default=[],
                   help="also save the backbone after these epochs (FILE.eN.safetensors)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--device", default="cpu")
    q.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch default)")

    t = sub.add_parser("transfer", help="linear probe / DTL / DTL+ on MNIST with a frozen backbone")
    t.add_argument("--weights", default="assets/vit_mini_patch4_28_fmnist.safetensors", help="comma list")
    t.add_argument("--data", default="data/mnist")
    t.add_argument("--side", default="linear,dtl+", help="comma list of linear, dtl, dtl+")
    t.add_argument("--rank", default="8", help="comma list")
    t.add_argument("--kernel", default="3", help="comma list (dtl+)")
    t.add_argument("--beta", type=float, default=100.0)
    t.add_argument("--taps", default="all")
    t.add_argument("--injects", default="default", help="comma list; default = second half of the blocks")
    t.add_argument("--epochs", default="3", help="comma list")
    t.add_argument("--lr", default="3e-2,1e-1", help="comma list")
    t.add_argument("--limit-train", default="4000", help="comma list")
    t.add_argument("--batch-size", type=int, default=32)
    t.add_argument("--warmup", type=int, default=0, help="warm-up epochs")
    t.add_argument("--weight-decay", type=float, default=0.05)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="cpu")
    t.add_argument("--threads", type=int, default=0)
    t.add_argument("--out", default="", help="write all results as JSON here")

    a = p.parse_args()
    a.argv = sys.argv[2:]
    {"pretrain": cmd_pretrain, "transfer": cmd_transfer}[a.cmd](a)


if __name__ == "__main__":
    main()
