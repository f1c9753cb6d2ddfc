"""The vectorized step's two passes against plain ones, in one process: what the routing itself costs, and a before/after
of the library that a drifting machine does not blur.

    python benchmarks/pass_cost.py                                  # BERT, Llama, ViT at hidden 8: the fixed cost
    python benchmarks/pass_cost.py --size small --models bert       # trainer_cost.py's sizes
    python benchmarks/pass_cost.py --base f18533c --size small      # before/after, passes alternated in one process
    python benchmarks/pass_cost.py --layer 64                       # one nn.Linear, piece by piece

Default: for each model (built as in trainer_cost.py, batch 32 in k = 8 groups of 4), the median time of a plain
ascent (forward + autograd.grad), a plain descent (forward + backward), the vectorized capture pass (forward +
every group's gradient) and the perturbed pass (forward at w + e_j + backward); "extra" is what the two vectorized
passes cost over the two plain ones.

--base REV: the library of that revision, unpacked under another package name, and this tree's, each with its own
Vectorizer on the same model; their capture and perturbed passes run in turn, and the figure is the median of the
paired ratios (this tree / REV) with the check that both give the same numbers. Separate processes on a shared
machine differ by ±20%; alternated passes in one process do not.

--layer H: one nn.Linear(H, H) on 32 × 16 tokens, forward + backward: plain; the grouped matmul's autograd Function
alone; through `perturbed_matmul`; routed by a Vectorizer. Prints JSON and a table.
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import trainer_cost  # noqa: E402  (build, examples, SIZES)

ROOT = Path(__file__).resolve().parent.parent
K, BATCH = 8, 32


def _median_ms(f, n: int) -> float:
    for _ in range(max(3, n // 20)):  # warm-up
        f()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def _passes(vectorized, model, batch, params) -> dict:
    """The capture and perturbed passes of one library's Vectorizer on `model`, as functions."""
    vec, layout = vectorized.Vectorizer(model, params), vectorized.GroupLayout.rows([BATCH // K] * K)

    def capture():
        with vec.routing(), vec.capture(layout) as c:
            return c.group_gradients(model(**batch).loss)

    e = [0.01 * g for g in capture()]

    def perturbed():
        for p in params:
            p.grad = None
        with vec.routing(), vec.perturbed(layout, e):
            model(**batch).loss.backward()
        return [p.grad for p in params]

    return {"capture": capture, "perturbed": perturbed}


def _model(name: str, size: dict):
    from transformers import default_data_collator

    model = trainer_cost.build(name, size).train()
    data = trainer_cost.examples(name, size, BATCH)
    batch = default_data_collator([data[i] for i in range(BATCH)])
    return model, batch, [p for p in model.parameters() if p.requires_grad]


def passes(name: str, size: dict, n: int) -> dict:
    import hf_msam.vectorized as vectorized

    model, batch, params = _model(name, size)
    fs = _passes(vectorized, model, batch, params)

    def ascent():
        torch.autograd.grad(model(**batch).loss, params)

    def descent():
        for p in params:
            p.grad = None
        model(**batch).loss.backward()

    row = {"model": name, "plain_ascent_ms": _median_ms(ascent, n), "plain_descent_ms": _median_ms(descent, n),
           "capture_ms": _median_ms(fs["capture"], n), "perturbed_ms": _median_ms(fs["perturbed"], n)}  # fmt: skip
    row["extra_ms"] = row["capture_ms"] + row["perturbed_ms"] - row["plain_ascent_ms"] - row["plain_descent_ms"]
    return row


def base_package(rev: str, into: Path) -> str:
    """hf_msam of `rev` unpacked as the package `hf_msam_base` under `into` (the package imports itself relatively)."""
    archive = subprocess.run(["git", "archive", rev, "hf_msam"], cwd=ROOT, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    (into / "hf_msam").rename(into / "hf_msam_base")
    sys.path.insert(0, str(into))
    return "hf_msam_base"


def versus(name: str, size: dict, base: str, rounds: int) -> dict:
    import hf_msam.vectorized as head

    old = importlib.import_module(f"{base}.vectorized")
    model, batch, params = _model(name, size)
    a, b = _passes(old, model, batch, params), _passes(head, model, batch, params)
    row = {"model": name}
    for which in ("capture", "perturbed"):
        same = max(float((x - y).abs().max()) for x, y in zip(a[which](), b[which]()))
        ta, tb = [], []
        for r in range(rounds):
            for f, acc in ((a[which], ta), (b[which], tb)) if r % 2 else ((b[which], tb), (a[which], ta)):
                t0 = time.perf_counter()
                f()
                acc.append(time.perf_counter() - t0)
        row[which] = {"base_ms": 1000 * statistics.median(ta), "head_ms": 1000 * statistics.median(tb),
                      "ratio": statistics.median(y / x for x, y in zip(ta, tb)), "max_abs_difference": same}  # fmt: skip
    return row


def layer(h: int, n: int) -> dict:
    from hf_msam.vectorized import GroupLayout, Vectorizer, perturbed_matmul
    from hf_msam.vectorized.matmul import _PerturbedMatmul

    torch.manual_seed(0)
    lin = torch.nn.Linear(h, h)
    x = torch.randn(BATCH, 16, h, requires_grad=True)
    r = torch.randn(BATCH, 16, h)  # a real output gradient (a plain .sum() gives a zero-stride one)
    params = list(lin.parameters())
    vec, layout = Vectorizer(lin, params), GroupLayout.rows([BATCH // K] * K)
    e = [1e-3 * torch.randn(K, *p.shape) for p in params]
    pos = layout.positions(x.device)

    def plain():
        (lin(x) * r).sum().backward()

    def function():
        y = _PerturbedMatmul.apply(x.view(K, -1, h), lin.weight, e[0], False, torch.float32, lin.bias, e[1])
        (y * r.view(K, -1, h)).sum().backward()

    def through_perturbed_matmul():
        (perturbed_matmul(x, lin.weight, lin.bias, e[0], e[1], pos, False) * r).sum().backward()

    def routed():
        with vec.routing(), vec.perturbed(layout, e):
            (lin(x) * r).sum().backward()

    return {"hidden": h, **{f.__name__ + "_us": 1000 * _median_ms(f, n) for f in
                            (plain, function, through_perturbed_matmul, routed)}}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=trainer_cost.MODELS, default=["bert", "llama", "vit"])
    parser.add_argument("--size", choices=list(trainer_cost.SIZES), default="overhead")
    parser.add_argument("--base", help="a revision to compare with, passes alternated in this process")
    parser.add_argument("--rounds", type=int, default=150, help="timed calls per pass (--base: per library)")
    parser.add_argument("--layer", type=int, metavar="H", help="time one nn.Linear(H, H) piece by piece instead")
    parser.add_argument("--threads", type=int, default=1)
    opts = parser.parse_args()
    torch.set_num_threads(opts.threads)
    size = trainer_cost.SIZES[opts.size]
    result = {"torch": torch.__version__, "threads": opts.threads, "size": opts.size}
    if opts.layer:
        row = layer(opts.layer, max(opts.rounds, 1000))
        result["layer"] = row
        print(json.dumps(result, indent=1))
        print("\n| hidden | plain (µs) | Function (µs) | perturbed_matmul (µs) | routed (µs) |\n|---|---|---|---|---|")
        print(f"| {row['hidden']} | {row['plain_us']:.0f} | {row['function_us']:.0f} | "
              f"{row['through_perturbed_matmul_us']:.0f} | {row['routed_us']:.0f} |")  # fmt: skip
        return
    if opts.base:
        with tempfile.TemporaryDirectory(prefix="pass_cost_") as tmp:
            name = base_package(opts.base, Path(tmp))
            rows = [versus(m, size, name, opts.rounds) for m in opts.models]
        result.update(base=opts.base, rows=rows)
        print(json.dumps(result, indent=1))
        print(f"\n| model | pass | {opts.base} (ms) | this tree (ms) | paired ratio | max difference |\n|---|---|---|---|---|---|")
        for row in rows:
            for which in ("capture", "perturbed"):
                c = row[which]
                print(f"| {row['model']} | {which} | {c['base_ms']:.2f} | {c['head_ms']:.2f} | {c['ratio']:.3f} | "
                      f"{c['max_abs_difference']:.1e} |")  # fmt: skip
        return
    rows = [passes(m, size, opts.rounds) for m in opts.models]
    result["rows"] = rows
    print(json.dumps(result, indent=1))
    print("\n| model | plain ascent | plain descent | capture | perturbed | extra (ms) |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['plain_ascent_ms']:.2f} | {r['plain_descent_ms']:.2f} | {r['capture_ms']:.2f} | "
              f"{r['perturbed_ms']:.2f} | {r['extra_ms']:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
