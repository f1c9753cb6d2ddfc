"""Two CPU processes (gloo) through torchrun: ranks stay in sync and equal the per-device mSAM reference."""

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import free_port, script_env, torchrun_ranks
import torch
from reference import MLP, flat, msam_gradient, unflat

HERE = Path(__file__).resolve().parents[1]  # tests/: the scripts and helpers


def mlp_at(weights) -> MLP:
    """The float64 MLP of tests/reference.py with the given weights (a rank's `initial`)."""
    model = MLP().double()
    with torch.no_grad():
        for p, w in zip(model.parameters(), weights):
            p.copy_(w)
    return model


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("vectorize, path", [("off", "sequential"), ("on", "vectorized")])
def test_two_process_ddp_matches_per_device_reference(tmp_path, vectorize, path):
    ranks = torchrun_ranks(tmp_path, "ddp_script.py", vectorize)
    assert ranks[0]["world_size"] == 2
    assert ranks[0]["path"] == ranks[1]["path"] == path
    assert ranks[0]["perturbations_per_step"] == 2 * 1 * 2  # devices x accumulation x ceil(4 / 3)

    # The ranks trained on different data and ended bitwise in sync.
    assert not torch.equal(ranks[0]["batches"][0]["x"], ranks[1]["batches"][0]["x"])
    for a, b in zip(ranks[0]["final"], ranks[1]["final"]):
        assert torch.equal(a, b)

    # Reference: each device perturbs with its own micro-batches; DDP averages the descent gradients.
    model = mlp_at(ranks[0]["initial"])
    for step in range(2):
        grads = [msam_gradient(model, r["batches"][step], 3, 0.2) for r in ranks]
        with torch.no_grad():
            for p, g0, g1 in zip(model.parameters(), *grads):
                p.sub_(0.5 * (g0 + g1) / 2)
    for p, w in zip(model.parameters(), ranks[0]["final"]):
        torch.testing.assert_close(w, p.detach(), rtol=1e-10, atol=1e-13)

    # The mSAM metrics are averaged across the processes: both ranks log the same values.
    assert ranks[0]["logs"] and ranks[0]["logs"] == ranks[1]["logs"]


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize(
    "vectorize, precondition, path",
    [("off", "none", "sequential"), ("on", "none", "vectorized"), ("off", "adam", "sequential"), ("on", "adam", "vectorized")],
)
def test_two_process_functional_sam_matches_the_union_reference(tmp_path, vectorize, precondition, path):
    """Functional-SAM under DDP (2 gloo processes, 4 examples each in micro-batches of 3 and 1): each device perturbs
    with its own micro-batches' gradients (no all-reduce of the ascent), the descents J_F(w + e_j)ᵀ ∇_F L_j(w) are
    all-reduced. The ranks end bitwise equal, and equal to the plain-PyTorch reference on the union of the two
    devices' batches: the mean of its four micro-batches' vector-Jacobian products, each weighted by its examples.
    With --msam_precondition adam (AdamW, three steps): e_j = ρ P g_j/‖P g_j‖, P = 1/(√v̂ + ε) computed here from
    the all-reduced gradients of the earlier steps (the plain gradient before the first)."""
    from test_functional_sam import adam_inverse_by_hand, functional_reference

    ranks = torchrun_ranks(tmp_path, "ddp_script.py", vectorize, "functional", precondition)
    steps = 3 if precondition == "adam" else 2
    assert ranks[0]["world_size"] == 2 and len(ranks[0]["batches"]) == steps
    assert ranks[0]["path"] == ranks[1]["path"] == path
    assert not torch.equal(ranks[0]["batches"][0]["x"], ranks[1]["batches"][0]["x"])
    for a, b in zip(ranks[0]["final"], ranks[1]["final"]):
        assert torch.equal(a, b)

    model = mlp_at(ranks[0]["initial"])
    params = list(model.parameters())
    optimizer = (
        torch.optim.AdamW(params, lr=0.05, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
        if precondition == "adam" else torch.optim.SGD(params, lr=0.5)
    )  # fmt: skip
    seen = []  # the all-reduced gradients AdamW was given
    for step in range(steps):
        P = adam_inverse_by_hand(seen) if precondition == "adam" and seen else None
        union = [r["batches"][step] for r in ranks]  # each device's 4 examples: micro-batches of 3 and 1
        # Σ over the union's micro-batches of (n_j / 8)·vjp_j: functional_reference gives Σ_j (n_j / 4)·vjp_j of a batch
        gradient = sum((b["labels"].shape[0] / 8) * functional_reference(model, b, 3, 0.2, precondition=P) for b in union)
        seen.append(gradient.detach().clone())
        for p, g in zip(params, unflat(gradient, params)):
            p.grad = g.clone()
        optimizer.step()
    got, expected = flat(ranks[0]["final"]), flat([p.detach() for p in params])
    initial = flat(ranks[0]["initial"])
    err = float((got - expected).abs().max() / (expected - initial).abs().max())
    assert err <= 1e-10, err


# What the README's CPU command leaves to the test: the script, its output and the steps (the SGD step the
# reference takes), and a free port (other jobs may hold accelerate's default one).
README_SCRIPT_ARGS = [
    "--per_device_train_batch_size", "16", "--max_steps", "2", "--optim", "sgd", "--learning_rate", "0.5",
    "--lr_scheduler_type", "constant", "--max_grad_norm", "0", "--weight_decay", "0",
    "--train_sampling_strategy", "sequential", "--report_to", "none", "--save_strategy", "no", "--logging_steps", "1",
]  # fmt: skip


def readme_cpu_command():
    """The CPU `accelerate launch` line of docs/multi-device.md, split into (launcher arguments, script arguments)."""
    readme = (HERE.parent / "docs" / "multi-device.md").read_text(encoding="utf-8")
    section = readme.split("# Multi-device", 1)[1].split("\n## ", 1)[0]
    (line,) = [x for x in section.splitlines() if x.startswith("accelerate launch") and "--use_cpu" in x]
    words = line.split()
    at = words.index("your_script.py")
    assert words[-1] == "..."
    return words[2:at], words[at + 1 : -1]


def launch(tmp_path, launcher_args, script_args):
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", *launcher_args, "--main_process_port", str(free_port()),
        str(HERE / "readme_ddp_script.py"), *script_args, "--output_dir", str(tmp_path), *README_SCRIPT_ARGS,
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=script_env(), capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, [torch.load(f) for f in sorted(tmp_path.glob("rank*.pt"))]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_readme_cpu_command_trains_two_processes_in_one_group(tmp_path):
    """The README's CPU command, as written (`accelerate launch --multi_gpu --num_processes 2 your_script.py --use_cpu
    --msam_rho 0.05 --msam_micro_batch_size 8`): 2 processes in one gloo group, equal to the per-device reference."""
    launcher_args, script_args = readme_cpu_command()
    assert launcher_args == ["--multi_gpu", "--num_processes", "2"] and "--use_cpu" in script_args
    proc, ranks = launch(tmp_path, launcher_args, script_args)
    assert len(ranks) == 2 and [r["world_size"] for r in ranks] == [2, 2]
    log = proc.stdout + proc.stderr
    assert "2 processes in one process group (data parallel)" in log
    assert "do not form one process group" not in log
    for a, b in zip(ranks[0]["final"], ranks[1]["final"]):
        assert torch.equal(a, b)
    assert not torch.equal(ranks[0]["batches"][0]["x"], ranks[1]["batches"][0]["x"])  # each its own data
    # Reference: per device, micro-batches of 8 of its 16 examples, rho 0.05; DDP averages the two descents.
    model = mlp_at(ranks[0]["initial"])
    for step in range(2):
        grads = [msam_gradient(model, r["batches"][step], 8, 0.05) for r in ranks]
        with torch.no_grad():
            for p, g0, g1 in zip(model.parameters(), *grads):
                p.sub_(0.5 * (g0 + g1) / 2)
    for p, w in zip(model.parameters(), ranks[0]["final"]):
        torch.testing.assert_close(w, p.detach(), rtol=1e-10, atol=1e-13)


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.skipif(torch.cuda.is_available(), reason="the processes form a group on GPUs")
def test_launch_without_use_cpu_on_a_cpu_machine_warns(tmp_path):
    """`--multi_gpu` without the script's --use_cpu on a machine without GPUs: 2 separate runs of world size 1. The
    trainer says so (once: the process with RANK 0), and its start-up line says 1 process."""
    proc, ranks = launch(tmp_path, ["--multi_gpu", "--num_processes", "2"], ["--msam_rho", "0.05", "--msam_micro_batch_size", "8"])
    assert [r["world_size"] for r in ranks] == [1, 1]
    log = proc.stdout + proc.stderr
    assert log.count("The launcher started 2 processes (WORLD_SIZE=2") == 1
    assert "do not form one process group" in log and "--use_cpu" in log
    assert "1 process (no data parallelism)" in log


# ---------------------------------------------------------------------------------------------
# Flat-LoRA under DDP: each rank draws its own noise (the rank is part of the seed), the descent is all-reduced
# ---------------------------------------------------------------------------------------------


def flat_lora_reference(ranks):
    """Three SGD steps of Flat-LoRA on the script's LoRA MLP, in plain PyTorch: for each rank and micro-batch j the
    loss at W + ε + s·BA per layer (the merged weight written out here), ε regenerated from the documented seed
    (seed, step, j, rank, layer) with the row scale σ_t·‖(W + s·BA)_i‖/√n computed here; the ranks' size-weighted
    gradients averaged (DDP), then w -= 0.5·g. Returns the final adapters by parameter name."""
    import math

    import torch.nn.functional as F

    from hf_msam.methods.flat_lora import flat_lora_seed, noise

    r0 = ranks[0]
    seed, sigma, steps = r0["seed"], r0["sigma"], r0["steps"]
    w = {n: t.clone() for n, t in r0["initial"].items()}
    layers = ["fc1", "fc2"]  # module order: the layer numbers of the seed
    scaling = 3 / 2  # lora_alpha / r

    def name(layer, part):
        return f"base_model.model.{layer}.{part}.weight" if part != "bias" else f"base_model.model.{layer}.base_layer.bias"

    trained = [name(layer, part) for layer in layers for part in ("lora_A.default", "lora_B.default")]
    for t in range(1, steps + 1):
        sigma_t = sigma * 0.5 * (1 - math.cos(math.pi * (t - 1) / steps))
        total = {n: torch.zeros_like(w[n]) for n in trained}
        for r in ranks:
            batch = r["batches"][t - 1]
            n_rows = batch["x"].shape[0]
            for j, start in enumerate(range(0, n_rows, 3)):
                x, labels = batch["x"][start : start + 3], batch["labels"][start : start + 3]
                params = {n: w[n].clone().requires_grad_(True) for n in trained}
                h = x
                for i, layer in enumerate(layers):
                    base = w[name(layer, "base_layer")]
                    a, b = params[name(layer, "lora_A.default")], params[name(layer, "lora_B.default")]
                    merged = base + scaling * (b @ a)
                    std = sigma_t * merged.detach().norm(dim=1) / math.sqrt(base.shape[1])
                    eps = noise(std, flat_lora_seed(seed, t, j, r["rank"], i), base)
                    h = h @ (merged + eps).T + w[name(layer, "bias")]
                    if i == 0:
                        h = torch.tanh(h)
                loss = F.cross_entropy(h, labels)
                grads = torch.autograd.grad(loss, [params[n] for n in trained])
                for n, g in zip(trained, grads):
                    total[n] += g * (x.shape[0] / n_rows) / len(ranks)
        for n in trained:
            w[n] = w[n] - 0.5 * total[n]
    return {n: w[n] for n in trained}


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("vectorize, path", [("off", "sequential"), ("auto", "vectorized")])
def test_two_process_ddp_flat_lora_matches_per_rank_noise_reference(tmp_path, vectorize, path):
    pytest.importorskip("peft")
    ranks = torchrun_ranks(tmp_path, "ddp_flat_lora_script.py", vectorize)
    assert [r["world_size"] for r in ranks] == [2, 2] and [r["rank"] for r in ranks] == [0, 1]
    assert ranks[0]["path"] == ranks[1]["path"] == path
    assert not torch.equal(ranks[0]["batches"][0]["x"], ranks[1]["batches"][0]["x"])  # each its own data

    # The ranks drew different noise and still end bitwise equal: the descent gradient is all-reduced.
    assert ranks[0]["final"].keys() == ranks[1]["final"].keys()
    for n in ranks[0]["final"]:
        assert torch.equal(ranks[0]["final"][n], ranks[1]["final"][n]), n

    expected = flat_lora_reference(ranks)
    for n, p in expected.items():
        torch.testing.assert_close(ranks[0]["final"][n], p, rtol=1e-10, atol=1e-13)
    # The frozen base weights did not move.
    for n, p in ranks[0]["final"].items():
        if n not in expected:
            assert torch.equal(p, ranks[0]["initial"][n]), n
    # The noise mattered, by far more than the tolerance: the same run without noise ends elsewhere, and so does one
    # where both ranks draw rank 0's noise.
    plain = flat_lora_reference([{**r, "sigma": 0.0} for r in ranks])
    same_rank = flat_lora_reference([{**r, "rank": 0} for r in ranks])
    for other in (plain, same_rank):
        assert max(float((expected[n] - other[n]).abs().max()) for n in expected) > 1e-6


# A script that knows nothing of process groups: it trains through the (swapped) Trainer and returns.
GLOO_EXIT_SCRIPT = '''
import sys

import torch
from torch import nn
from transformers import Trainer, TrainingArguments


class Regressor(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 1)

    def forward(self, x, labels=None):
        out = self.linear(x).squeeze(-1)
        return {"loss": nn.functional.mse_loss(out, labels), "logits": out}


args = TrainingArguments(output_dir=sys.argv[1], max_steps=2, per_device_train_batch_size=4, use_cpu=True,
                         report_to="none", save_strategy="no", disable_tqdm=True)
torch.manual_seed(0)
x = torch.randn(16, 4)
Trainer(model=Regressor(), args=args, train_dataset=[{"x": a, "labels": b} for a, b in zip(x, x.sum(-1))]).train()
import torch.distributed as dist
assert dist.is_initialized() and dist.get_world_size() == 2  # one gloo group of 2: the setting of the abort
'''


@pytest.mark.slow
@pytest.mark.multiprocess
def test_finished_two_process_runs_exit_0(tmp_path):
    """torch 2.14 with gloo sometimes aborts at interpreter exit after a finished run ("terminate called without an
    active exception", SIGABRT; pytorch issue 190489) while the process group is alive: `hf-msam run` tears it down
    when the script returns. Three runs, none retried: each must exit 0 without the abort's message (before the
    teardown about a third of runs aborted; benchmarks/gloo_exit.py measures it)."""
    script = tmp_path / "gloo_exit_script.py"
    script.write_text(GLOO_EXIT_SCRIPT, encoding="utf-8")
    for run in range(3):
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
            "--master_port", str(free_port()), "-m", "hf_msam", "run", str(script), str(tmp_path / f"out{run}"),
            "--msam_micro_batch_size", "2",
        ]  # fmt: skip
        proc = subprocess.run(cmd, env=script_env(), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"run {run}: exit {proc.returncode}\n" + proc.stderr[-3000:]
        assert "terminate called" not in proc.stderr and "SIGABRT" not in proc.stderr, proc.stderr[-3000:]
