#!/usr/bin/env python3
"""How far PyTorch's own bf16 training drifts from the float64 reference fixtures.

Runs the six AdamW steps of each tests/fixtures/dtl-reference case the way users run DTL in
PyTorch, on the CPU: `official` (float32 weights, bf16 autocast around forward and loss) and
`bf16 weights` (the frozen ViT cast to bfloat16, autocast on), and prints the relative
difference of each step's loss from the fixture's float64 `train_losses`. The bound of the
bf16 step's trajectory test (tests/tests/cuda_bf16.rs) is set against these figures.

  python3 bench/reference/autocast_drift.py [--fixtures tests/fixtures/dtl-reference]

Needs torch, timm and safetensors (the same as make_fixtures.py).
"""

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from timm.models.vision_transformer import VisionTransformer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_fixtures as mf  # noqa: E402  (the method's equations)


def trajectory(ref, case, bf16_weights):
    with open(os.path.join(ref, f"{case}.json")) as f:
        meta = json.load(f)
    cfg, opt = meta["dtl"], dict(meta["adamw"])
    stored = load_file(os.path.join(ref, f"{case}_dtl.safetensors"))
    vit = VisionTransformer(**meta["vit"])
    vit.load_state_dict(load_file(os.path.join(ref, f"{case}_vit.safetensors")))
    vit.eval()
    if bf16_weights:
        vit = vit.to(torch.bfloat16)
    for q in vit.parameters():
        q.requires_grad_(False)
    params = {k[len("init."):]: v.float().clone().requires_grad_(True)
              for k, v in stored.items() if k.startswith("init.")}
    x, labels = stored["input"].float(), stored["labels"]
    if bf16_weights:
        x = x.to(torch.bfloat16)
    optim = mf.adamw(params, opt)
    losses = []
    for _ in range(opt["steps"]):
        optim.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(mf.dtl_forward(vit, params, x, cfg).float(), labels)
        losses.append(loss.item())
        loss.backward()
        optim.step()
    ref_losses = stored["train_losses"].tolist()
    return [abs(a - b) / abs(b) for a, b in zip(losses, ref_losses)]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("--fixtures", default=os.path.join(here, "..", "..", "tests", "fixtures", "dtl-reference"))
    args = ap.parse_args()
    print(f"torch {torch.__version__}")
    for case in ["dtl", "dtlplus"]:
        for bf16_weights in [False, True]:
            rel = trajectory(args.fixtures, case, bf16_weights)
            setting = "bf16 weights" if bf16_weights else "official    "
            print(f"{case:8s} {setting}: largest {max(rel):.2e}; per step " + " ".join(f"{r:.1e}" for r in rel))


if __name__ == "__main__":
    main()
