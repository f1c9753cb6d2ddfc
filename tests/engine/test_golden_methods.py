"""Every built-in method, trained 3 steps on a tiny BERT on both paths, against the parameters recorded by
tests/golden/record_methods.py on the code before the engine/integration restructuring (issue 30): a move that
changes what a method computes fails here. The values are fingerprints of the parameters (see `fingerprint`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")

import golden.record_methods as recorder  # noqa: E402

RECORDED = json.loads((Path(__file__).resolve().parents[1] / "golden" / "methods.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("key", sorted(RECORDED["cases"]))
def test_method_after_three_steps_equals_the_recorded_parameters(key):
    case, vectorize = key.split("/")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as recorded
    try:
        got = recorder.train(case, vectorize)
    finally:
        torch.set_num_threads(threads)
    want = RECORDED["cases"][key]
    assert got["path"] == want["path"]
    assert got["params"].keys() == want["params"].keys()
    for name in want["params"]:
        torch.testing.assert_close(torch.tensor(got["params"][name]), torch.tensor(want["params"][name]),
                                   rtol=1e-6, atol=1e-9, msg=f"{key}: {name}")  # fmt: skip
