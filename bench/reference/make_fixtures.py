#!/usr/bin/env python3
"""The project's PyTorch + timm reference generator.

Writes the test fixtures of dtl from the method's equations (docs: DESIGN notes, section 1),
with every expected value computed in float64:

  dtl-reference/<case>_vit.safetensors   tiny timm ViT, float32, timm key names
  dtl-reference/<case>_vit.npz           the same weights in the Google/Flax layout, plus a
                                         `pre_logits` and a mismatched `head` a loader must skip
  dtl-reference/<case>_dtl.safetensors   init.* side/fusion/head parameters, input, labels,
                                         backbone_tokens, logits, loss, grad.*, train_losses,
                                         final.* (after 6 AdamW steps)
  dtl-reference/<case>.json              the configuration
  dtl-reference/cosine_schedule.json     the official schedule's lr per epoch
  vit-resample/pos_embed_resampled.safetensors
                                         a checkpoint's position embedding resampled by timm
                                         to other grids (bicubic, align_corners=False, no
                                         antialiasing)

Usage:
  python3 bench/reference/make_fixtures.py --out /tmp/fixtures            # everything, fresh
  python3 bench/reference/make_fixtures.py --out tests/fixtures --only resample
  python3 bench/reference/make_fixtures.py --check tests/fixtures/dtl-reference
      recompute every expected value from the stored weights, init and input of existing
      fixtures and report the largest difference

Needs torch, timm, numpy and safetensors.
"""

import argparse
import json
import math
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.numpy import load_file as np_load_st
from safetensors.torch import load_file, save_file

import timm
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer

CASES = {
    "dtl": dict(kernel=0),
    "dtlplus": dict(kernel=3),
}
VIT = dict(img_size=32, patch_size=8, in_chans=3, embed_dim=48, depth=4, num_heads=3,
           mlp_ratio=4.0, num_classes=0, global_pool="avg", fc_norm=False, class_token=True)
DTL = dict(rank=2, beta=100.0, taps=[0, 1, 2, 3], injects=[2, 3], classes=5, batch=3)
ADAMW = dict(lr=0.02, betas=[0.9, 0.999], eps=1e-8, weight_decay=0.05, steps=6)
SCHEDULE = dict(base_lr=0.001, t_initial=100, lr_min=1e-8, warmup_lr_init=1e-7, warmup_t=10,
                cycle_decay=0.5, epochs=110)


def make_vit():
    return VisionTransformer(**VIT)


# ---------------------------------------------------------------------------------------
# Google/Flax layout, the inverse of what timm's `_load_weights` reads


def to_flax(sd, heads, head_classes=11):
    """timm state dict (float32 tensors) -> dict of numpy arrays in the Flax layout."""
    d = sd["cls_token"].shape[-1]
    hd = d // heads
    t = lambda k: sd[k].detach().cpu().numpy().astype(np.float32)
    out = {
        "embedding/kernel": t("patch_embed.proj.weight").transpose(2, 3, 1, 0),  # OIHW -> HWIO
        "embedding/bias": t("patch_embed.proj.bias"),
        "cls": t("cls_token"),
        "Transformer/posembed_input/pos_embedding": t("pos_embed"),
        "Transformer/encoder_norm/scale": t("norm.weight"),
        "Transformer/encoder_norm/bias": t("norm.bias"),
        # tensors a backbone loader must skip
        "pre_logits/kernel": np.random.RandomState(1).randn(d, d).astype(np.float32),
        "pre_logits/bias": np.zeros(d, np.float32),
        "head/kernel": np.random.RandomState(2).randn(d, head_classes).astype(np.float32),
        "head/bias": np.zeros(head_classes, np.float32),
    }
    i = 0
    while f"blocks.{i}.norm1.weight" in sd:
        p = f"blocks.{i}."
        b = f"Transformer/encoderblock_{i}/"
        a = b + "MultiHeadDotProductAttention_1/"
        qkv_w = t(p + "attn.qkv.weight")  # (3d, d)
        qkv_b = t(p + "attn.qkv.bias")
        out[b + "LayerNorm_0/scale"] = t(p + "norm1.weight")
        out[b + "LayerNorm_0/bias"] = t(p + "norm1.bias")
        for j, name in enumerate(["query", "key", "value"]):
            w = qkv_w[j * d:(j + 1) * d]  # (out, in)
            out[a + f"{name}/kernel"] = w.T.reshape(d, heads, hd)
            out[a + f"{name}/bias"] = qkv_b[j * d:(j + 1) * d].reshape(heads, hd)
        out[a + "out/kernel"] = t(p + "attn.proj.weight").T.reshape(heads, hd, d)
        out[a + "out/bias"] = t(p + "attn.proj.bias")
        out[b + "LayerNorm_2/scale"] = t(p + "norm2.weight")
        out[b + "LayerNorm_2/bias"] = t(p + "norm2.bias")
        out[b + "MlpBlock_3/Dense_0/kernel"] = t(p + "mlp.fc1.weight").T
        out[b + "MlpBlock_3/Dense_0/bias"] = t(p + "mlp.fc1.bias")
        out[b + "MlpBlock_3/Dense_1/kernel"] = t(p + "mlp.fc2.weight").T
        out[b + "MlpBlock_3/Dense_1/bias"] = t(p + "mlp.fc2.bias")
        i += 1
    return out


# ---------------------------------------------------------------------------------------
# the method, in float64


def swish(z, beta):
    return z * torch.sigmoid(beta * z)


def fusion_conv(z, weight, prefix, grid):
    """Depthwise k x k conv over the patch-token grid, PyTorch padding='same'."""
    b, n, d = z.shape
    k = weight.shape[-1]
    pre, patches = z[:, :prefix], z[:, prefix:]
    img = patches.transpose(1, 2).reshape(b, d, grid, grid)
    lo = (k - 1) // 2
    hi = k - 1 - lo
    img = F.pad(img, (lo, hi, lo, hi))
    img = F.conv2d(img, weight, groups=d)
    patches = img.reshape(b, d, n - prefix).transpose(1, 2)
    return torch.cat([pre, patches], dim=1)


def dtl_forward(vit, params, x, cfg):
    """Logits of the DTL (or DTL+) model: the frozen ViT plus the Compact Side Network."""
    prefix = vit.num_prefix_tokens
    grid = vit.patch_embed.grid_size[0]
    h = vit._pos_embed(vit.patch_embed(x))
    h = vit.norm_pre(h)
    z = None
    for i, blk in enumerate(vit.blocks):
        if i in cfg["taps"]:
            a, b = params[f"side.{i}.a"], params[f"side.{i}.b"]
            zi = h @ a.T @ b.T
            z = zi if z is None else z + zi
        h = blk(h)
        if i in cfg["injects"]:
            g = swish(z, cfg["beta"])
            if "fusion.weight" in params:
                g = fusion_conv(g, params["fusion.weight"], prefix, grid)
            h = h + g
    feats = vit.norm(h[:, prefix:].mean(dim=1))
    return feats @ params["head.weight"].T + params["head.bias"]


def init_params(cfg, kernel, d, seed):
    g = torch.Generator().manual_seed(seed)
    p = {}
    bound_a = 1.0 / math.sqrt(d)  # kaiming_uniform(a=sqrt 5) on fan_in = d
    for i in cfg["taps"]:
        p[f"side.{i}.a"] = (torch.rand(cfg["rank"], d, generator=g) * 2 - 1) * bound_a
        # B starts at zero in the method; a small value keeps every gradient informative
        p[f"side.{i}.b"] = (torch.rand(d, cfg["rank"], generator=g) * 2 - 1) * 0.05
    if kernel:
        bound = 1.0 / math.sqrt(kernel * kernel)
        p["fusion.weight"] = (torch.rand(d, 1, kernel, kernel, generator=g) * 2 - 1) * bound
    bound = 1.0 / math.sqrt(d)
    p["head.weight"] = (torch.rand(cfg["classes"], d, generator=g) * 2 - 1) * bound
    p["head.bias"] = (torch.rand(cfg["classes"], generator=g) * 2 - 1) * bound
    return p


def adamw(params, opt):
    """torch's AdamW over the named `params` with the fixture's settings `opt`: weight decay on
    every tensor but the biases (names ending in .bias)."""
    decay = [v for k, v in params.items() if not k.endswith(".bias")]
    no_decay = [v for k, v in params.items() if k.endswith(".bias")]
    return torch.optim.AdamW(
        [dict(params=decay, weight_decay=opt["weight_decay"]), dict(params=no_decay, weight_decay=0.0)],
        lr=opt["lr"], betas=tuple(opt["betas"]), eps=opt["eps"])


def expected(vit, init, x, labels, cfg, opt):
    """Every expected value, in float64, from float32 weights/init/input."""
    vit = vit.double().eval()
    for q in vit.parameters():
        q.requires_grad_(False)
    x = x.double()
    with torch.no_grad():
        tokens = vit.forward_features(x)
    params = {k: v.double().clone().requires_grad_(True) for k, v in init.items()}
    logits = dtl_forward(vit, params, x, cfg)
    loss = F.cross_entropy(logits, labels)
    grads = torch.autograd.grad(loss, list(params.values()))
    out = {"backbone_tokens": tokens, "logits": logits.detach(), "loss": loss.detach().reshape(1)}
    for (k, _), gk in zip(params.items(), grads):
        out[f"grad.{k}"] = gk
    optim = adamw(params, opt)
    losses = []
    for _ in range(opt["steps"]):
        optim.zero_grad()
        l = F.cross_entropy(dtl_forward(vit, params, x, cfg), labels)
        losses.append(l.item())
        l.backward()
        optim.step()
    out["train_losses"] = torch.tensor(losses, dtype=torch.float64)
    for k, v in params.items():
        out[f"final.{k}"] = v.detach()
    return out


def cosine_schedule():
    s = SCHEDULE
    lrs = []
    for t in range(s["epochs"]):
        if t < s["warmup_t"]:
            lr = s["warmup_lr_init"] + t * (s["base_lr"] - s["warmup_lr_init"]) / s["warmup_t"]
        else:
            i = t // s["t_initial"]
            t_i = s["t_initial"]
            t_curr = t - t_i * i
            gamma = s["cycle_decay"] ** i
            lr_max = s["base_lr"] * gamma
            if i == 0:
                lr = s["lr_min"] + 0.5 * (lr_max - s["lr_min"]) * (1 + math.cos(math.pi * t_curr / t_i))
            else:
                lr = s["lr_min"]
        lrs.append(lr)
    return dict(SCHEDULE, lr_per_epoch=lrs)


def write_case(out_dir, case, seed):
    kernel = CASES[case]["kernel"]
    cfg = dict(DTL, fusion_kernel=kernel)
    torch.manual_seed(seed)
    vit = make_vit()
    with torch.no_grad():  # timm leaves LayerNorms and biases at 1/0: perturb them
        for name, q in vit.named_parameters():
            if q.dim() == 1:
                q.add_(torch.randn_like(q) * 0.1)
    sd = {k: v.detach().float().contiguous() for k, v in vit.state_dict().items()}
    save_file(sd, os.path.join(out_dir, f"{case}_vit.safetensors"))
    np.savez(os.path.join(out_dir, f"{case}_vit.npz"), **to_flax(sd, VIT["num_heads"]))
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(cfg["batch"], 3, VIT["img_size"], VIT["img_size"], generator=g)
    labels = torch.randint(0, cfg["classes"], (cfg["batch"],), generator=g)
    init = init_params(cfg, kernel, VIT["embed_dim"], seed + 2)
    exp = expected(vit, init, x, labels, cfg, ADAMW)
    tensors = {f"init.{k}": v.float().contiguous() for k, v in init.items()}
    tensors.update(input=x.float().contiguous(), labels=labels)
    tensors.update({k: v.contiguous() for k, v in exp.items()})
    save_file(tensors, os.path.join(out_dir, f"{case}_dtl.safetensors"))
    meta = dict(vit=VIT, dtl=cfg, adamw=dict(ADAMW, no_decay="names ending in .bias"),
                loss=exp["loss"].item(), train_losses=exp["train_losses"].tolist(),
                timm=timm.__version__, torch=torch.__version__)
    with open(os.path.join(out_dir, f"{case}.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print(f"{case}: loss {meta['loss']:.6f}, written to {out_dir}")


def check_case(ref_dir, case):
    """Recomputes a stored case's expected values from its stored inputs."""
    with open(os.path.join(ref_dir, f"{case}.json")) as f:
        meta = json.load(f)
    cfg = meta["dtl"]
    stored = load_file(os.path.join(ref_dir, f"{case}_dtl.safetensors"))
    vit = VisionTransformer(**meta["vit"])
    vit.load_state_dict(load_file(os.path.join(ref_dir, f"{case}_vit.safetensors")))
    # the npz must load into timm identically
    from timm.models.vision_transformer import _load_weights
    vit_npz = VisionTransformer(**meta["vit"])
    _load_weights(vit_npz, os.path.join(ref_dir, f"{case}_vit.npz"))
    npz_diff = max((a - b).abs().max().item() for a, b in
                   zip(vit.state_dict().values(), vit_npz.state_dict().values()))
    init = {k[len("init."):]: v for k, v in stored.items() if k.startswith("init.")}
    opt = dict(meta["adamw"])
    exp = expected(vit, init, stored["input"], stored["labels"], cfg, opt)
    worst = 0.0
    for k, v in exp.items():
        ref = stored[k].double()
        diff = (v - ref).abs().max().item() / max(ref.abs().max().item(), 1e-30)
        worst = max(worst, diff)
        print(f"  {case} {k:24s} max relative difference {diff:.2e}")
    print(f"{case}: npz vs safetensors weights differ by at most {npz_diff:.1e}; "
          f"largest relative difference of an expected value {worst:.2e}")
    return worst


def write_resample(out_dir, source):
    """timm's position-embedding resampling of a fixture checkpoint to 6x6 and 3x3 grids."""
    pos = load_file(source)["pos_embed"]
    out = {"source": pos.contiguous()}
    for g in (6, 3, 5):
        r = resample_abs_pos_embed(pos.double(), new_size=[g, g], num_prefix_tokens=1,
                                   interpolation="bicubic", antialias=False, align_corners=False)
        out[f"grid_{g}x{g}"] = r.contiguous()
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "pos_embed_resampled.safetensors")
    save_file(out, path)
    print(f"resample: {', '.join(f'{k} {tuple(v.shape)}' for k, v in out.items())} -> {path}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="fixture root to write (dtl-reference/ and vit-resample/ go under it)")
    ap.add_argument("--only", choices=["all", "dtl", "resample"], default="all")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--check", help="a dtl-reference folder whose expected values to recompute")
    a = ap.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    if a.check:
        worst = max(check_case(a.check, c) for c in CASES)
        sys.exit(0 if worst < 1e-9 else 1)
    if not a.out:
        ap.error("give --out DIR or --check DIR")
    ref = os.path.join(a.out, "dtl-reference")
    if a.only in ("all", "dtl"):
        os.makedirs(ref, exist_ok=True)
        for i, c in enumerate(CASES):
            write_case(ref, c, a.seed + 10 * i)
        with open(os.path.join(ref, "cosine_schedule.json"), "w") as f:
            json.dump(cosine_schedule(), f, indent=1)
    if a.only in ("all", "resample"):
        src = os.path.join(ref, "dtl_vit.safetensors")
        write_resample(os.path.join(a.out, "vit-resample"), src)


if __name__ == "__main__":
    main()
