"""FSDP2 (`fully_shard`, two CPU processes with gloo): the mSAM engine equals a single-process reference whose
micro-batch j is the union of both ranks' j-th micro-batches; shards come back bitwise; `.grad` accumulates."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TEST_PATHS
import torch
from fsdp2_script import ADAM
from reference import MLP, flat, unflat
from conftest import free_port

HERE = Path(__file__).resolve().parents[1]  # tests/: the scripts and helpers


def torchrun(script, out_dir, *args):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*TEST_PATHS, os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(free_port()), str(HERE / script), str(out_dir), *map(str, args),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [torch.load(Path(out_dir) / f"rank{r}.pt") for r in range(2)]


def union(batches, micro_batch_size):
    """The ranks' batches interleaved by micro-batch: [B_0 of rank 0, B_0 of rank 1, B_1 of rank 0, ...]."""
    n = batches[0]["labels"].shape[0]
    parts = [{k: v[s : s + micro_batch_size] for k, v in b.items()} for s in range(0, n, micro_batch_size) for b in batches]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return torchrun("fsdp2_script.py", tmp_path_factory.mktemp("fsdp2"))


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("method", ["sam", "fsam", "momentum", "momentum-adam"])
def test_fsdp2_engine_matches_the_union_reference(two_ranks, method):
    from test_methods import Reference  # plain PyTorch, from the papers

    ranks = [r[method] for r in two_ranks]
    assert ranks[0]["world_size"] == 2 and ranks[0]["sync"]  # FSDP2 always synchronizes the perturbations
    assert not torch.equal(ranks[0]["batches"][0]["x"], ranks[1]["batches"][0]["x"])

    # Every call left this rank's shards bitwise as they were.
    assert all(ranks[0]["restored"]) and all(ranks[1]["restored"])
    # No host sync in the engine's calls (FSDP2's own hooks included).
    assert ranks[0]["host_syncs"] == [] and ranks[1]["host_syncs"] == []

    # Reference: one process; micro-batch j of a call = both ranks' j-th micro-batches (3 + 3, then 1 + 1 examples).
    model = MLP().double()
    with torch.no_grad():
        for p, w in zip(model.parameters(), ranks[0]["initial"]):
            p.copy_(w)
    ref = Reference(model, method.removesuffix("-adam"), 6, **(dict(lmbda=0.6, sigma=0.8) if method == "fsam" else {}))
    params = list(model.parameters())
    w = flat(params).detach().clone()
    calls, accumulation, rho, lr = len(ranks[0]["batches"]), 2, 0.2, 0.5
    buf = None  # Momentum-SAM: SGD's momentum buffer or Adam's exp_avg (None before the first step: a plain step)
    exp_avg_sq = torch.zeros_like(w)
    for step in range(calls // accumulation):
        total = torch.zeros_like(w)
        for i in range(step * accumulation, (step + 1) * accumulation):
            batch = union([r["batches"][i] for r in ranks], 3)
            contribution = ref.gradient(w, [batch], rho=rho, momentum=buf) / accumulation
            # .grad gained exactly this call's contribution (this rank's shard of it, dim-0 chunks), the rest kept.
            for r, saved in enumerate(ranks):
                before, after = saved["accumulated"][i]
                for b, a, c in zip(before, after, unflat(contribution, params)):
                    shard = torch.chunk(c, 2, dim=0)[r]
                    torch.testing.assert_close(a - (0 if b is None else b), shard, rtol=1e-9, atol=1e-12)
            total += contribution
        if method == "momentum":  # torch.optim.SGD: buf <- 0.9 buf + g (buf <- g at first); w <- w - lr buf
            buf = total.clone() if buf is None else 0.9 * buf + total
            total = buf
        if method == "momentum-adam":  # torch.optim.Adam (Kingma & Ba, Algorithm 1); its exp_avg is the direction
            (b1, b2), t = ADAM["betas"], step + 1  # in torch's order of operations, so that rounding agrees
            buf = torch.zeros_like(w) if buf is None else buf
            buf = buf + (1 - b1) * (total - buf)
            exp_avg_sq = b2 * exp_avg_sq + (1 - b2) * total * total
            denom = exp_avg_sq.sqrt() / (1 - b2**t) ** 0.5 + ADAM["eps"]
            w = w - ADAM["lr"] / (1 - b1**t) * (buf / denom)
        else:
            w = w - lr * total
    for w0, w1, expected in zip(ranks[0]["final"], ranks[1]["final"], unflat(w, params)):
        # Adam divides by sqrt(v): an entry with a tiny gradient turns last-bit differences of the ranks' reduction
        # order into ~1e-10 relative (measured); the gradients themselves agree at 1e-9 above.
        tol = dict(rtol=1e-9, atol=1e-11) if method == "momentum-adam" else dict(rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(w0, expected, **tol)
        assert torch.equal(w0, w1)


def test_param_groups_of_fsdp_state_old_and_new_torch():
    """torch 2.12+ keeps a list `_fsdp_param_groups`; torch 2.11 (seen on a GPU machine) one `_fsdp_param_group`
    or None. The engine must find the groups in both, or FSDP2 training stops at the first mSAM step."""
    from types import SimpleNamespace

    from internals import fsdp_param_groups as _param_groups

    a, b = object(), object()
    assert _param_groups(SimpleNamespace(_fsdp_param_groups=[a, b])) == [a, b]
    assert _param_groups(SimpleNamespace(_fsdp_param_group=a)) == [a]
    assert _param_groups(SimpleNamespace(_fsdp_param_group=None)) == []
    assert _param_groups(SimpleNamespace()) == []


@pytest.fixture(scope="module")
def flatness_ranks(tmp_path_factory):
    return torchrun("fsdp2_flatness_script.py", tmp_path_factory.mktemp("fsdp2_flatness"))


@pytest.mark.slow
@pytest.mark.multiprocess
def test_fsdp2_flatness_equals_the_unsharded_measures_of_the_union(flatness_ranks):
    """λ_max, the Hutchinson trace and the (ASAM) sharpness of a model sharded over 2 ranks equal those of the same
    model unsharded, on the union of the ranks' batches: against the exact Hessian (torch.autograd.functional.hessian
    of the flattened weights) and a plain-PyTorch sharpness, and against hf_msam.flatness's own unsharded (double
    backward) results. The finite differences are float64: their error is ~1e-9 relative."""
    from torch.func import functional_call

    from hf_msam.flatness import hessian_top_eigenvalue, hessian_trace

    r0, r1 = flatness_ranks
    assert r0["results"] == r1["results"]  # every rank gets the same numbers
    assert all(r0["restored"].values()) and all(r1["restored"].values())  # shards and .grad bitwise as they were
    model = MLP().double()
    with torch.no_grad():
        for p, w in zip(model.parameters(), r0["initial"]):
            p.copy_(w)
    names = [n for n, _ in model.named_parameters()]
    w0 = flat([p.detach() for p in model.parameters()])
    batches = r0["batches"] + r1["batches"]

    def loss(w, batch_list):
        params = dict(zip(names, unflat(w, list(model.parameters()))))
        n = sum(len(b["labels"]) for b in batch_list)
        return sum(len(b["labels"]) * functional_call(model, params, (), b)["loss"] for b in batch_list) / n

    hessian = torch.autograd.functional.hessian(lambda w: loss(w, batches), w0)
    eigenvalues = torch.linalg.eigvalsh(hessian)
    top = eigenvalues[eigenvalues.abs().argmax()].item()
    got = r0["results"]
    assert got["top_eigenvalue"] == pytest.approx(top, rel=1e-7)
    assert got["top_eigenvalue"] == pytest.approx(
        hessian_top_eigenvalue(model, batches, iters=200, tol=1e-12, seed=3, progress_bar=False), rel=1e-7)

    generator = torch.Generator().manual_seed(5)  # Hutchinson with the z_k the measure draws: ±1, parameter by parameter
    z = [flat([2 * torch.randint(0, 2, p.shape, generator=generator) - 1 for p in model.parameters()]).double() for _ in range(4)]
    assert got["trace"] == pytest.approx(sum(zk @ hessian @ zk for zk in z).item() / 4, rel=1e-7)
    assert got["trace"] == pytest.approx(hessian_trace(model, batches, samples=4, seed=5, progress_bar=False), rel=1e-7)

    # Micro-batch j: both ranks' j-th micro-batches of 2 (as the mSAM step under FSDP2 perturbs).
    halves = [{k: v[s : s + 2] for k, v in b.items()} for b in r0["batches"] for s in (0, 2)], [
        {k: v[s : s + 2] for k, v in b.items()} for b in r1["batches"] for s in (0, 2)]
    unions = [{k: torch.cat([a[k], b[k]]) for k in a} for a, b in zip(*halves)]
    for name, rho, adaptive in (("sharpness", 0.2, False), ("asam_sharpness", 0.5, True)):
        rise = 0.0
        for mb in unions:
            w = w0.clone().requires_grad_()
            clean = loss(w, [mb])
            (g,) = torch.autograd.grad(clean, w)
            t = w0.abs() + 0.01 if adaptive else torch.ones_like(w0)
            e = rho * t * t * g / ((t * g).norm() + 1e-12)
            rise += 4 * (loss(w0 + e, [mb]) - clean).item()
        assert got[name] == pytest.approx(rise / 16, rel=1e-9), name
