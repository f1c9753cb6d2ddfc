"""MSAMSFTTrainer with packed and padding-free rows under DDP (2 CPU processes, gloo): devices cut their rows into
different numbers of micro-batches, and the step equals a plain-PyTorch reference over both devices' sequences."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TEST_PATHS, free_port
import torch

pytest.importorskip("trl")

from transformers import AutoModelForCausalLM  # noqa: E402
from trl_helpers import msam_gradient, sgd_reference, token_nll_sum, write_tiny_llama  # noqa: E402

HERE = Path(__file__).resolve().parents[1]  # tests/: the scripts and helpers


def sequences_of(batch):
    """The (input_ids, labels) of each sequence of a one-row packed batch, read off position_ids in plain torch."""
    positions = batch["position_ids"][0]
    starts = [i for i in range(positions.numel()) if positions[i] == 0] + [positions.numel()]
    return [(batch["input_ids"][:, a:b], batch["labels"][:, a:b]) for a, b in zip(starts, starts[1:])]


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("layout", ["packing", "padding_free"])
def test_packed_rows_with_ddp_and_micro_batches_equal_the_reference(tmp_path, layout):
    model_dir = write_tiny_llama(tmp_path / "tiny-llama")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*TEST_PATHS, os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(free_port()), str(HERE / "trl_ddp_packed_script.py"), str(model_dir), str(tmp_path), layout,
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert ranks[0]["world_size"] == 2
    for name, w in ranks[0]["final"].items():
        assert torch.equal(w, ranks[1]["final"][name]), name

    # Each device: its row's sequences in micro-batches of 2 sequences.
    sequences = [sequences_of(r["batch"]) for r in ranks]
    groups = [[s[a : a + 2] for a in range(0, len(s), 2)] for s in sequences]
    if layout == "packing":
        assert len(groups[0]) != len(groups[1])  # the devices cut different numbers of micro-batches
    # DDP averages the devices' descents, each Σ_j c_j·∇L_j(w + e_j) with L_j normalized by the label tokens of
    # both devices times 2: together (1/N) Σ over both devices' micro-batches of ∇(Σ nll)(w + e_j).
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64)
    total = sum(int(labels[:, 1:].ne(-100).sum()) for s in sequences for _, labels in s)

    def loss_of(group):
        return lambda: sum(token_nll_sum(reference, ids, labels)[0] for ids, labels in group) / total

    micro_batches = [g for device in groups for g in device]
    gradient = msam_gradient(reference, [loss_of(g) for g in micro_batches], [1.0] * len(micro_batches), rho=0.1)
    expected = sgd_reference(reference, gradient, lr=0.5)
    for name, w in expected.items():
        torch.testing.assert_close(ranks[0]["final"][name], w, rtol=1e-6, atol=1e-7, msg=name)

    # TRL's metrics: of both devices' whole rows, at w.
    correct = valid = 0
    entropy = 0.0
    with torch.no_grad():
        for ids, labels in (s for device in sequences for s in device):
            logits = reference(input_ids=ids).logits[:, :-1]
            mask = labels[:, 1:].ne(-100)
            logp = torch.log_softmax(logits, -1)
            entropy += -(logp.exp() * logp).sum(-1)[mask].sum().item()
            correct += int((logits.argmax(-1) == labels[:, 1:])[mask].sum())
            valid += int(mask.sum())
    for rank in ranks:
        (logged,) = rank["logs"]
        assert logged["msam/micro_batches_per_step"] == (len(groups[0]) + len(groups[1])) / 2  # averaged over devices
        assert logged["num_tokens"] == sum(r["batch"]["input_ids"].shape[1] for r in ranks)
        assert logged["mean_token_accuracy"] == pytest.approx(correct / valid, rel=1e-6)
        assert logged["entropy"] == pytest.approx(entropy / valid, rel=1e-6)
