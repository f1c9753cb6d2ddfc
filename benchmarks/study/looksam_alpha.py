#!/usr/bin/env python
"""LookSAM with AdamW: which alpha trains? A plain-PyTorch loop, independent of hf_msam's engine.

    python benchmarks/study/looksam_alpha.py            # the published grid (about 10 minutes on one core)
    python benchmarks/study/looksam_alpha.py --quick    # AdamW plain, SAM, LookSAM alpha 0.7 and 0.1, 2 epochs

A tiny ViT on clean sklearn digits (the model and training digits of `hf-msam demo`, built here), batch 64, AdamW
(no weight decay), rho 0.05. LookSAM (Liu et al., CVPR 2022): every k-th step a SAM step that keeps
g_v = g_p - (<g, g_p>/||g||^2) g, the part of the perturbed gradient orthogonal to the clean one; the k - 1 steps
between descend along g + alpha * ||g||/||g_v|| * g_v. `global` takes the projection and norms over all parameters
(the paper's Algorithm 1, and hf_msam's `LookSAMDescent`); `tensor` per parameter tensor (as the public
implementations do).
Prints the training loss and accuracy after each epoch, as JSON and a table.
"""

from __future__ import annotations

import argparse
import json
import math

import torch
from torch import nn


def digits(seed: int = 0, held_out: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 8x8 digits as (N, 1, 8, 8) pixels in [-1, 1] and their labels, less `held_out` of
    them (the first of a `seed` permutation): the 1,297 training digits of `hf-msam demo`, clean, in its order."""
    from sklearn.datasets import load_digits

    data = load_digits()
    pixels = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0  # gray levels 0..16
    pixels = (pixels - 0.5) / 0.5
    labels = torch.tensor(data.target, dtype=torch.long)
    train = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))[held_out:]
    return pixels[train], labels[train]


def tiny_vit(seed: int = 0):
    """A randomly initialized ViT for 8x8 grayscale digits: patches of 2x2, 2 layers of width 64, 4 heads (69k
    parameters; the demo's model)."""
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        image_size=8, patch_size=2, num_channels=1, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=10,
    )  # fmt: skip
    torch.manual_seed(seed)
    return ViTForImageClassification(config)


GRID = [
    {"method": "adamw"},
    {"method": "sam"},
    *({"method": "looksam", "norms": "global", "alpha": a} for a in (0.7, 0.3, 0.2, 0.1)),
    {"method": "looksam", "norms": "global", "alpha": 0.7, "k": 2},
    {"method": "looksam", "norms": "global", "alpha": 0.7, "lr": 5e-4},
    *({"method": "looksam", "norms": "tensor", "alpha": a} for a in (0.7, 0.3, 0.1)),
]
QUICK_GRID = [GRID[0], GRID[1], GRID[2], GRID[5]]


def _norm(ts):
    return torch.sqrt(sum((t * t).sum() for t in ts))


def train(x, y, method="adamw", norms="global", alpha=0.7, k=5, rho=0.05, lr=2e-3, epochs=3, seed=0) -> list[dict]:
    model = tiny_vit(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)

    def grad(idx):
        loss = nn.functional.cross_entropy(model(pixel_values=x[idx]).logits, y[idx])
        return list(torch.autograd.grad(loss, params))

    order, g_v, t, history = torch.Generator().manual_seed(seed), None, 0, []
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=order)
        for start in range(0, len(y) - 63, 64):
            idx = perm[start : start + 64]
            g = grad(idx)
            if method == "adamw":
                d = g
            elif method == "sam" or t % k == 0:  # a SAM step
                w = [p.detach().clone() for p in params]
                with torch.no_grad():
                    torch._foreach_add_(params, [rho * gi / _norm(g) for gi in g])
                g_p = grad(idx)
                with torch.no_grad():
                    torch._foreach_copy_(params, w)
                if norms == "global":
                    s = sum((a * b).sum() for a, b in zip(g, g_p)) / sum((a * a).sum() for a in g)
                    g_v = [b - s * a for a, b in zip(g, g_p)]
                else:
                    g_v = [b - (a * b).sum() / (a * a).sum().clamp_min(1e-30) * a for a, b in zip(g, g_p)]
                d = g_p
            elif norms == "global":  # a reuse step
                d = [a + alpha * _norm(g) / _norm(g_v) * v for a, v in zip(g, g_v)]
            else:
                d = [a + alpha * a.norm() / (v.norm() + 1e-8) * v for a, v in zip(g, g_v)]
            for p, di in zip(params, d):
                p.grad = di
            optimizer.step()
            t += 1
        with torch.no_grad():
            logits = model(pixel_values=x).logits
        history.append({"loss": nn.functional.cross_entropy(logits, y).item(), "accuracy": (logits.argmax(-1) == y).float().mean().item()})
    return history


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--epochs", type=int, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    x, y = digits()
    epochs = args.epochs or (2 if args.quick else 3)
    rows = []
    for setting in QUICK_GRID if args.quick else GRID:
        history = train(x, y, epochs=epochs, **setting)
        rows.append({**setting, "epochs": history})
        print(json.dumps(rows[-1]), flush=True)
    print(f"\nchance: loss ln 10 = {math.log(10):.3f}, accuracy ~0.10\n")
    print("| method | norms | α | k | lr | " + " | ".join(f"epoch {i + 1} loss / acc" for i in range(epochs)) + " |")
    print("| --- | --- | --- | --- | --- |" + " --- |" * epochs)
    for r in rows:
        looks = r["method"] == "looksam"
        cells = " | ".join(f"{h['loss']:.3f} / {h['accuracy']:.3f}" for h in r["epochs"])
        print(f"| {r['method']} | {r.get('norms', '–') if looks else '–'} | {r.get('alpha', 0.7) if looks else '–'} "
              f"| {r.get('k', 5) if looks else '–'} | {r.get('lr', 2e-3):g} | {cells} |")  # fmt: skip


if __name__ == "__main__":
    main()
