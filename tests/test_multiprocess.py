"""Two CPU processes (gloo) through torchrun: ranks stay in sync and equal the per-device mSAM reference."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from reference import MLP, msam_gradient

HERE = Path(__file__).parent


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("vectorize, path", [("off", "sequential"), ("on", "vectorized")])
def test_two_process_ddp_matches_per_device_reference(tmp_path, vectorize, path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(free_port()), str(HERE / "ddp_script.py"), str(tmp_path), vectorize,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert ranks[0]["world_size"] == 2
    assert ranks[0]["path"] == ranks[1]["path"] == path
    assert ranks[0]["perturbations_per_step"] == 2 * 1 * 2  # devices x accumulation x ceil(4 / 3)

    # The ranks trained on different data and ended bitwise in sync.
    assert not torch.equal(ranks[0]["batches"][0]["x"], ranks[1]["batches"][0]["x"])
    for a, b in zip(ranks[0]["final"], ranks[1]["final"]):
        assert torch.equal(a, b)

    # Reference: each device perturbs with its own micro-batches; DDP averages the descent gradients.
    model = MLP().double()
    with torch.no_grad():
        for p, w in zip(model.parameters(), ranks[0]["initial"]):
            p.copy_(w)
    for step in range(2):
        grads = [msam_gradient(model, r["batches"][step], 3, 0.2) for r in ranks]
        with torch.no_grad():
            for p, g0, g1 in zip(model.parameters(), *grads):
                p.sub_(0.5 * (g0 + g1) / 2)
    for p, w in zip(model.parameters(), ranks[0]["final"]):
        torch.testing.assert_close(w, p.detach(), rtol=1e-10, atol=1e-13)

    # The mSAM metrics are averaged across the processes: both ranks log the same values.
    assert ranks[0]["logs"] and ranks[0]["logs"] == ranks[1]["logs"]
