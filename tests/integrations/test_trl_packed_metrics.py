"""TRL SFT with `packing=True` (issue 33, item 9): the first step's `mean_token_accuracy`, `entropy` and `num_tokens`
describe the whole batch, token-weighted over the real tokens of every packed sequence, whatever the micro-batches.
The reference runs each packed sequence through the model on its own (no packing machinery) at the starting
weights, where the step's clean passes are."""

from __future__ import annotations

import random

import pytest
import torch

pytest.importorskip("trl")

from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from trl_helpers import WORDS, write_tiny_llama  # noqa: E402

from hf_msam.trl import MSAMSFTConfig, MSAMSFTTrainer  # noqa: E402

SETTINGS = dict(
    max_steps=1, optim="sgd", learning_rate=0.5, lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0,
    bf16=False, report_to="none", use_cpu=True, save_strategy="no", logging_steps=1, disable_tqdm=True,
    train_sampling_strategy="sequential", per_device_train_batch_size=8, packing=True, max_length=32,
)  # fmt: skip


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def texts(n=64, seed=0):
    """Sequences of 2 to 40 words: some longer than a packed row (32 tokens)."""
    rng = random.Random(seed)
    return [{"text": " ".join(rng.choice(WORDS[3:]) for _ in range(rng.randint(2, 40)))} for _ in range(n)]


class Recording(MSAMSFTTrainer):
    def training_step(self, model, inputs, num_items_in_batch=None):
        self.seen = {k: v.clone() if torch.is_tensor(v) else v for k, v in inputs.items()}
        return super().training_step(model, inputs, num_items_in_batch)


def reference_metrics(llama_dir, batch):
    """Token accuracy and entropy over the label tokens of every sequence in the packed row, each sequence on its
    own through the model at the starting weights (float64)."""
    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float64)
    ids, labels, positions = batch["input_ids"][0], batch["labels"][0], batch["position_ids"][0]
    starts = [i for i in range(len(positions)) if positions[i] == 0] + [len(positions)]
    correct, valid, entropy = 0, 0, 0.0
    with torch.no_grad():
        for a, b in zip(starts, starts[1:]):
            logits = model(input_ids=ids[a:b][None]).logits[0, :-1]
            target = labels[a + 1 : b]
            mask = target.ne(-100)
            logp = torch.log_softmax(logits, -1)
            correct += int((logits.argmax(-1) == target)[mask].sum())
            valid += int(mask.sum())
            entropy += float(-(logp.exp() * logp).sum(-1)[mask].sum())
    assert len(starts) - 1 >= 8  # several sequences per packed row
    return correct / valid, entropy / valid


@pytest.mark.parametrize("micro_batch_size", [1, 2, None])
def test_packed_token_accuracy_is_the_whole_batch_one(llama_dir, tmp_path, micro_batch_size):
    trainer = Recording(
        model=AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float64),
        args=MSAMSFTConfig(str(tmp_path), **SETTINGS, msam_rho=0.05, msam_micro_batch_size=micro_batch_size),
        train_dataset=Dataset.from_list(texts()), processing_class=AutoTokenizer.from_pretrained(llama_dir),
    )  # fmt: skip
    trainer.train()
    batch = trainer.seen
    assert batch["input_ids"].shape[0] == 1  # the packed rows, flattened into one row
    accuracy, entropy = reference_metrics(llama_dir, batch)
    assert 0 < accuracy < 1
    logged = next(h for h in trainer.state.log_history if "loss" in h)
    if micro_batch_size is not None:
        assert logged["msam/micro_batches_per_step"] >= 8 // micro_batch_size  # cut at sequence boundaries
    assert logged["mean_token_accuracy"] == pytest.approx(accuracy, rel=1e-6)  # TRL divides in float32
    assert logged["entropy"] == pytest.approx(entropy, rel=1e-6)
    assert logged["num_tokens"] == batch["input_ids"].shape[1]
