"""TRL's fused LM head (the SFT and DPO defaults) on the vectorized step (hf_msam/integrations/trl_fused_head.py):
the same update as one pass per micro-batch (`--msam_vectorize off`), TRL's logged metrics unchanged, and never k
perturbed copies of the head alive.

Llama's RMSNorm and eager attention compute parts of a float64 model in float32; those casts are patched out for
both paths (see test_vectorized_arch.py). TRL's fused head itself computes in float32 whatever the model's dtype
(its tiles, and the upstream gradient `grad_logprobs.float()`): the vectorized capture gives it the whole batch's
per-token gradient (1/N) where the sequential step gives micro-batch j's (1/N_j), rounded to float32 before the
product, so the two paths differ by float32 roundings in the head (measured: 1.6e-8 on head updates of 0.12, the
other layers 1e-10 to 1e-8). The tolerances are test_trl.py's (set for the same float32 head), and the test checks
that they tell the mSAM update from SAM's.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("trl")

from datasets import Dataset  # noqa: E402
from test_trl import COMMON, dpo_common, load, trainable  # noqa: E402
from test_vectorized_arch import without_float32_casts  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402
from trl_helpers import PREFERENCES, PROMPT_COMPLETION, write_tiny_llama  # noqa: E402

from hf_msam.integrations import trl_fused_head  # noqa: E402
from hf_msam.trl import MSAMDPOConfig, MSAMDPOTrainer, MSAMSFTConfig, MSAMSFTTrainer  # noqa: E402

TIGHT = dict(rtol=1e-6, atol=1e-7)  # see the module docstring


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def logged(trainer, keys):
    return [{k: h[k] for k in keys if k in h} for h in trainer.state.log_history if "loss" in h]


def sft(llama_dir, tmp_path, vectorize, **kwargs):
    model = load(llama_dir)
    vectorize, name = ("off", vectorize) if vectorize == "sam" else (vectorize, vectorize)
    args = MSAMSFTConfig(str(tmp_path / name), **{**COMMON, "max_steps": 2, "per_device_train_batch_size": 5,
                         "msam_rho": 0.1, "msam_micro_batch_size": 2, "msam_vectorize": vectorize, **kwargs})  # fmt: skip
    trainer = MSAMSFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(PROMPT_COMPLETION[:10]),
                             processing_class=AutoTokenizer.from_pretrained(llama_dir))  # fmt: skip
    trainer.train()
    return trainer


def test_upstream_names_are_there():
    assert not trl_fused_head.missing_upstream_names(), trl_fused_head.missing_upstream_names()


@pytest.mark.parametrize("method", [{}, {"msam_method": "gsam"}], ids=["sam", "gsam"])
def test_sft_with_the_fused_head_takes_the_vectorized_step(llama_dir, tmp_path, monkeypatch, method):
    without_float32_casts(monkeypatch)
    on, off = sft(llama_dir, tmp_path, "on", **method), sft(llama_dir, tmp_path, "off", **method)
    assert on.msam_engine.path == "vectorized" and on.args.use_liger_kernel is False
    start = trainable(load(llama_dir))
    assert max((a - b).abs().max().item() for a, b in zip(trainable(off.model).values(), start.values())) > 1e-3
    for name, a in trainable(on.model).items():
        torch.testing.assert_close(a, trainable(off.model)[name], **TIGHT, msg=name)
    sam = trainable(sft(llama_dir, tmp_path, "sam", **{**method, "msam_micro_batch_size": None}).model)
    assert max((sam[k] - a).abs().max().item() for k, a in trainable(off.model).items()) > 100 * TIGHT["atol"]
    keys = ("loss", "entropy", "mean_token_accuracy", "num_tokens", "msam/sharpness")
    for a, b in zip(logged(on, keys), logged(off, keys)):
        assert a.keys() == b.keys() and all(a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6) for k in a), (a, b)


def test_dpo_with_the_fused_head_takes_the_vectorized_step(llama_dir, tmp_path, monkeypatch):
    without_float32_casts(monkeypatch)
    runs = {}
    for vectorize in ("on", "off"):
        model = load(llama_dir)
        args = MSAMDPOConfig(**dpo_common(tmp_path / vectorize, max_steps=2, per_device_train_batch_size=3),
                             msam_rho=0.1, msam_micro_batch_size=1, msam_vectorize=vectorize)  # fmt: skip
        runs[vectorize] = MSAMDPOTrainer(model=model, ref_model=load(llama_dir), args=args,
                                         train_dataset=Dataset.from_list(PREFERENCES),
                                         processing_class=AutoTokenizer.from_pretrained(llama_dir))  # fmt: skip
        runs[vectorize].train()
    assert runs["on"].msam_engine.path == "vectorized"
    for name, a in trainable(runs["on"].model).items():
        torch.testing.assert_close(a, trainable(runs["off"].model)[name], **TIGHT, msg=name)
    keys = ("loss", "rewards/chosen", "rewards/rejected", "logps/chosen", "msam/sharpness")
    for a, b in zip(logged(runs["on"], keys), logged(runs["off"], keys)):
        assert a.keys() == b.keys() and all(a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6) for k in a), (a, b)


def test_the_hooks_are_off_outside_the_step(llama_dir, tmp_path):
    import trl.trainer.utils as utils

    found = utils._ChunkedLogProbFunction
    sft(llama_dir, tmp_path, "on")
    assert utils._ChunkedLogProbFunction is found and utils._use_triton.__module__.startswith("trl")
