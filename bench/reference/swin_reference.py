#!/usr/bin/env python3
"""PyTorch reference of DTL / DTL+ on a timm Swin Transformer, and the test data of `dtl-pth`.

The model follows the official DTL Swin code, written on timm 1.0's layout (patch merging at the
START of stages 1..3):

    t = 0                                         # blocks numbered globally over the stages
    for each stage s:
        x = layers[s].downsample(x)               # (B, H, W, C) tokens
        z = 0                                     # the side state is reset at every stage
        for each block of stage s:
            if t in taps:    z = z + x A_t^T B_t^T
            x = block(x)                          # frozen timm SwinTransformerBlock
            if t in injects: x = x + conv_s(z * sigmoid(beta z))   # conv_s only for DTL+:
            t += 1                                # depthwise k x k, padding 'same', no bias
    logits = head(mean over H, W of norm(x))      # final LayerNorm on every token, then the mean

Sub-commands:

  twins --out DIR     a tiny random Swin written twice: `model.safetensors` (timm 1.0 names, the
                      backbone only) and `model.pth`, a Microsoft-release-style checkpoint,
                      torch.save({'model': state_dict}) in the OLD layout (patch merging at the END
                      of stages 0..2, i.e. timm's `layers.<s+1>.downsample.*` saved as
                      `layers.<s>.downsample.*`, plus the `relative_position_index` and `attn_mask`
                      buffers and a `head`); `model.json` (the kwargs, the key map); `views.pth` /
                      `views.safetensors` (every dtype, strided and offset views of shared storages,
                      a Parameter, a 0-d and an empty tensor, and their contiguous copies);
                      `legacy.pth` (the pre-1.6 non-zip format); `os_system.pkl` (a pickle whose
                      loading would call os.system: never load it with pickle).
  check --fixture DIR recompute the logits, loss and gradients of the Swin fixtures in DIR
                      (`swin_dtl*`) from their stored weights and compare.
  info --model NAME   print the geometry, the official DTL settings scaled to the depth and the
                      number of trainable parameters of a timm Swin variant.

`bench_dtl_train.py --model swin_*` times the training step of this model.
"""

import argparse
import json
import math
import os
import pickle
import re
import sys

import torch
import torch.nn.functional as F

try:
    import timm
    from timm.models.swin_transformer import SwinTransformer
except ImportError as e:  # pragma: no cover - reported as a one-line error
    sys.exit("swin_reference.py needs timm (pip install timm): %s" % e)

# Official DTL settings for Swin-B (24 blocks): r = 4, beta = 100, taps 4-23, injects 14-23, DTL+ k = 5
# (github heekhero/DTL, train_scripts/swin/vtab/*/train_dtl.sh and train_dtl+.sh).
OFFICIAL = {"rank": 4, "beta": 100.0, "tap_start": 4, "inject_start": 14, "depth": 24, "kernel": 5}

# The tiny Swin of the twins (small enough to commit: about 38k parameters); 4 stages so that the
# old layout has patch merging at the end of stages 0..2, windows 4 so that shifted blocks (with
# attention masks) and stages at or below the window size both occur.
TWIN_KWARGS = {
    "img_size": 32, "patch_size": 2, "in_chans": 3, "embed_dim": 4, "depths": [2, 2, 2, 2],
    "num_heads": [1, 1, 2, 2], "window_size": 4, "mlp_ratio": 4.0, "num_classes": 0,
    "global_pool": "avg", "drop_path_rate": 0.0,
}
TWIN_HEAD_CLASSES = 3


def official_settings(depth):
    """The official taps / injects (4-23 and 14-23 on 24 blocks) scaled to `depth` blocks."""
    tap0 = round(OFFICIAL["tap_start"] * depth / OFFICIAL["depth"])
    inj0 = round(OFFICIAL["inject_start"] * depth / OFFICIAL["depth"])
    return list(range(tap0, depth)), list(range(inj0, depth))


def build_swin(model=None, kwargs=None, drop_path=0.0):
    """A timm Swin from a variant name or from SwinTransformer kwargs (a fixture json's `swin`)."""
    if kwargs is not None:
        kw = dict(kwargs)
        kw["drop_path_rate"] = kw.get("drop_path_rate", drop_path)
        for k in ("depths", "num_heads"):
            kw[k] = tuple(kw[k])
        return SwinTransformer(**kw)
    if not model.startswith("swin"):
        raise ValueError("%s is not a Swin Transformer variant" % model)
    return timm.create_model(model, pretrained=False, num_classes=0, drop_path_rate=drop_path)


def stage_dims(swin):
    """Width of each stage."""
    return [layer.blocks[0].norm1.normalized_shape[0] for layer in swin.layers]


class SwinDtl(torch.nn.Module):
    """DTL (kernel 0) or DTL+ (kernel k) around a frozen timm Swin, the official method.

    Parameters: `side.<t>.a` (r, C_s), `side.<t>.b` (C_s, r) per tapped block t, `fusion.<s>.weight`
    (C_s, 1, k, k) for every stage (the official code allocates all four), `head.*`."""

    def __init__(self, swin, rank, beta, taps, injects, kernel, classes, init_scale=None):
        super().__init__()
        self.swin, self.beta, self.kernel = swin, beta, kernel
        self.taps, self.injects = set(taps), set(injects)
        dims = stage_dims(swin)
        self.block_stage = [s for s, layer in enumerate(swin.layers) for _ in layer.blocks]
        side = {}
        for t in sorted(self.taps):
            c = dims[self.block_stage[t]]
            a = torch.empty(rank, c)
            torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            side[str(t)] = torch.nn.ParameterDict({"a": torch.nn.Parameter(a),
                                                   "b": torch.nn.Parameter(torch.zeros(c, rank))})
        self.side = torch.nn.ModuleDict(side)
        if kernel:
            self.fusion = torch.nn.ModuleList(
                [torch.nn.Conv2d(c, c, kernel, padding="same", groups=c, bias=False) for c in dims])
        else:
            self.fusion = None
        self.head = torch.nn.Linear(dims[-1], classes)

    def side_out(self, z, stage):
        g = z * torch.sigmoid(self.beta * z)
        if self.fusion is None:
            return g
        return self.fusion[stage](g.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)

    def features(self, x):
        m = self.swin
        x = m.patch_embed(x)
        t = 0
        for s, layer in enumerate(m.layers):
            x = layer.downsample(x)
            z = None
            for blk in layer.blocks:
                if t in self.taps:
                    p = self.side[str(t)]
                    d = x @ p["a"].t() @ p["b"].t()
                    z = d if z is None else z + d
                x = blk(x)
                if t in self.injects and z is not None:  # z = 0 adds nothing
                    x = x + self.side_out(z, s)
                t += 1
        return m.norm(x).mean((1, 2))

    def forward(self, x):
        return self.head(self.features(x))


class SwinProbe(torch.nn.Module):
    """Linear probe: frozen Swin, final norm, mean over the tokens, trainable head."""

    def __init__(self, swin, classes):
        super().__init__()
        self.swin = swin
        self.head = torch.nn.Linear(stage_dims(swin)[-1], classes)

    def forward(self, x):
        with torch.no_grad():
            f = self.swin.forward_features(x).mean((1, 2))
        return self.head(f)


def build_method(method, swin, classes, rank=None, beta=None, kernel=None):
    """The trainable model of `method` (dtl, dtlplus, linear) with the official settings."""
    if method == "linear":
        return SwinProbe(swin, classes)
    depth = sum(len(layer.blocks) for layer in swin.layers)
    taps, injects = official_settings(depth)
    k = (kernel or OFFICIAL["kernel"]) if method == "dtlplus" else 0
    return SwinDtl(swin, rank or OFFICIAL["rank"], beta or OFFICIAL["beta"], taps, injects, k, classes)


def freeze(swin):
    swin.eval()
    for p in swin.parameters():
        p.requires_grad_(False)
    return swin


# ---------------------------------------------------------------------------------------------
# twins


def to_old_layout(sd, swin, head):
    """timm 1.0 state dict -> the Microsoft release's layout and names (with its buffers)."""
    out = {}
    for k, v in sd.items():
        m = re.match(r"layers\.(\d+)\.downsample\.(.*)", k)
        if m:
            k = "layers.%d.downsample.%s" % (int(m.group(1)) - 1, m.group(2))
        out[k] = v
        am = re.match(r"(layers\.\d+\.blocks\.\d+)\.attn\.relative_position_bias_table", k)
        if am:
            s, j = [int(n) for n in re.findall(r"\d+", am.group(1))]
            blk = swin.layers[s].blocks[j]
            out[am.group(1) + ".attn.relative_position_index"] = blk.attn.relative_position_index.clone().long()
            if getattr(blk, "attn_mask", None) is not None:
                out[am.group(1) + ".attn_mask"] = blk.attn_mask.clone().float()
    out["head.weight"] = head.weight.detach().clone()
    out["head.bias"] = head.bias.detach().clone()
    # Microsoft's order: each stage's blocks, then its downsample; then norm and head.
    def rank(k):
        m = re.match(r"layers\.(\d+)\.(blocks|downsample)", k)
        if k.startswith("patch_embed"):
            return (0, 0, 0)
        if m:
            return (1, int(m.group(1)), 0 if m.group(2) == "blocks" else 1)
        return (2, 0, 0 if k.startswith("norm") else 1)
    from collections import OrderedDict
    return OrderedDict(sorted(out.items(), key=lambda kv: rank(kv[0])))


def views_case():
    """Tensors that exercise the reader: dtypes, strides, offsets, shared storages."""
    g = torch.Generator().manual_seed(7)
    base = torch.randn(6, 10, generator=g)
    ints = torch.arange(-40, 40, dtype=torch.int64).reshape(8, 10)
    t = {
        "f32.contiguous": base.clone(),
        "f32.transposed": base.t(),                      # strides (1, 10)
        "f32.offset_slice": base[2:5, 3:9],              # offset 23, strides (10, 1)
        "f32.step_slice": base[1:, ::3],                 # offset 10, strides (10, 3)
        "f32.row": base[4],                              # 1-d view at offset 40
        "f32.scalar": torch.tensor(3.25),
        "f32.empty": torch.zeros(0, 4),
        "f16": torch.randn(3, 5, generator=g).half(),
        "bf16.transposed": torch.randn(4, 3, generator=g).bfloat16().t(),
        "f64": torch.randn(2, 3, 2, generator=g, dtype=torch.float64),
        "i64.strided": ints[::2, 1::4],
        "i32": torch.arange(12, dtype=torch.int32).reshape(3, 4) * -7,
        "i16": torch.arange(-5, 5, dtype=torch.int16),
        "i8": torch.arange(-8, 8, dtype=torch.int8).reshape(4, 4).t(),
        "u8": torch.arange(250, 256, dtype=torch.uint8),
        "bool": torch.tensor([True, False, False, True]),
        "param": torch.nn.Parameter(torch.randn(2, 2, generator=g)),
    }
    return t


def cmd_twins(args):
    os.makedirs(args.out, exist_ok=True)
    from safetensors.torch import save_file
    torch.manual_seed(0)
    swin = build_swin(kwargs=TWIN_KWARGS).eval()
    with torch.no_grad():  # norms and biases away from 1/0, so a swapped tensor shows
        for n, p in swin.named_parameters():
            if n.endswith(".bias") or "norm" in n or "relative_position_bias_table" in n:
                p.add_(0.1 * torch.randn_like(p))
    head = torch.nn.Linear(stage_dims(swin)[-1], TWIN_HEAD_CLASSES)
    live = swin.state_dict()
    sd = {k: v.detach().clone().contiguous() for k, v in live.items()}
    save_file(sd, os.path.join(args.out, "model.safetensors"))
    old = to_old_layout(sd, swin, head)
    old._metadata = live._metadata  # as state_dict() has: pickled with BUILD
    torch.save({"model": old, "epoch": 30, "config": "tiny random Swin, old layout"},
               os.path.join(args.out, "model.pth"))
    key_map = {}
    for k in sd:
        m = re.match(r"layers\.(\d+)\.downsample\.(.*)", k)
        key_map[k] = "layers.%d.downsample.%s" % (int(m.group(1)) - 1, m.group(2)) if m else k
    with open(os.path.join(args.out, "model.json"), "w") as f:
        json.dump({"swin": TWIN_KWARGS, "head_classes": TWIN_HEAD_CLASSES,
                   "timm_to_old": key_map,
                   "old_only": sorted(set(old) - set(key_map.values())),
                   "torch": torch.__version__, "timm": timm.__version__}, f, indent=1)
        f.write("\n")
    views = views_case()
    torch.save({"state_dict": views}, os.path.join(args.out, "views.pth"))
    save_file({k: v.detach().contiguous().clone() for k, v in views.items()},
              os.path.join(args.out, "views.safetensors"))
    torch.save({"w": torch.ones(2)}, os.path.join(args.out, "legacy.pth"),
               _use_new_zipfile_serialization=False)

    class Exploit:
        def __reduce__(self):
            return (os.system, ("echo pwned",))
    with open(os.path.join(args.out, "os_system.pkl"), "wb") as f:
        pickle.dump({"model": Exploit()}, f, protocol=2)
    # Self-check: the old-layout checkpoint loads into timm (its own converter) identically.
    check = build_swin(kwargs=TWIN_KWARGS)
    from timm.models.swin_transformer import checkpoint_filter_fn
    conv = checkpoint_filter_fn(torch.load(os.path.join(args.out, "model.pth"), weights_only=True), check)
    conv = {k: v for k, v in conv.items() if not k.startswith("head.")}
    check.load_state_dict(conv)
    for k, v in check.state_dict().items():
        assert torch.equal(v, sd[k]), k
    print("wrote %s: %d timm keys, %d old-layout keys; timm's converter round-trips the .pth exactly"
          % (args.out, len(sd), len(old)))


# ---------------------------------------------------------------------------------------------
# check


def cmd_check(args):
    from safetensors.torch import load_file
    names = sorted(f[:-5] for f in os.listdir(args.fixture) if f.startswith("swin") and f.endswith(".json"))
    if not names:
        sys.exit("check: no swin*.json in %s" % args.fixture)
    worst = 0.0
    for name in names:
        cfg = json.load(open(os.path.join(args.fixture, name + ".json")))
        d = cfg["dtl"]
        swin = build_swin(kwargs=cfg["swin"]).double()
        sd = load_file(os.path.join(args.fixture, name + "_swin.safetensors"))
        swin.load_state_dict({k: v.double() for k, v in sd.items()}, strict=False)
        freeze(swin)
        model = SwinDtl(swin, d["rank"], d["beta"], d["taps"], d["injects"], d["fusion_kernel"], d["classes"]).double()
        exp = load_file(os.path.join(args.fixture, name + "_dtl.safetensors"))
        params = dict(model.named_parameters())
        for k, v in exp.items():
            if k.startswith("init."):  # the fixture's names are the model's: side.<t>.a, fusion.<s>.weight
                params[k[5:]].data.copy_(v.double())
        logits = model(exp["input"].double())
        loss = F.cross_entropy(logits, exp["labels"])
        loss.backward()
        rel = lambda a, b: ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()
        res = {"logits": rel(logits.detach(), exp["logits"].double()),
               "loss": abs(loss.item() - exp["loss"].double().item())}
        g = 0.0
        for k, v in exp.items():
            if k.startswith("grad."):
                p = params[k[5:]]
                got = p.grad if p.grad is not None else torch.zeros_like(p)
                g = max(g, rel(got, v.double()) if v.abs().max() > 0 else got.abs().max().item())
        res["grad"] = g
        worst = max(worst, *res.values())
        print(json.dumps({"case": name, "max_rel_diff": res}))
    if worst > 1e-9:
        sys.exit("check: differences above 1e-9")


def cmd_info(args):
    swin = build_swin(args.model)
    depth = sum(len(layer.blocks) for layer in swin.layers)
    taps, injects = official_settings(depth)
    out = {"model": args.model, "depth": depth, "dims": stage_dims(swin),
           "depths": [len(layer.blocks) for layer in swin.layers],
           "taps": "%d-%d" % (taps[0], taps[-1]), "injects": "%d-%d" % (injects[0], injects[-1])}
    for method in ("dtl", "dtlplus"):
        m = build_method(method, swin, args.classes)
        out["trainable_" + method] = sum(p.numel() for n, p in m.named_parameters() if not n.startswith("swin."))
    print(json.dumps(out))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("twins", help="write the tiny Swin as safetensors and old-layout .pth, and the reader's test files")
    p.add_argument("--out", required=True)
    p = sub.add_parser("check", help="recompute the Swin fixtures' expected values")
    p.add_argument("--fixture", required=True)
    p = sub.add_parser("info", help="geometry and official settings of a Swin variant")
    p.add_argument("--model", default="swin_base_patch4_window7_224")
    p.add_argument("--classes", type=int, default=100)
    args = ap.parse_args()
    {"twins": cmd_twins, "check": cmd_check, "info": cmd_info}[args.cmd](args)


if __name__ == "__main__":
    main()
