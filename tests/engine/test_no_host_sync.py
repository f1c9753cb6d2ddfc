"""`MSAMTrainer.training_step` never synchronizes with the host: no .item(), .tolist(), float(), int() or bool() of
a tensor, for every method, with example-weighted and with token-weighted micro-batches."""

import pytest
import torch
import internals
from reference import MLP, SYNCING, mlp_dataset
from torch import nn

from hf_msam import MSAMTrainer, MSAMTrainingArguments

class SyncCounter:
    """Counts calls of the syncing tensor methods, only while `active`."""

    def __init__(self, monkeypatch):
        self.active, self.calls = False, []
        for name in SYNCING:
            original = getattr(torch.Tensor, name)

            def counted(t, *args, __name=name, __original=original, **kwargs):
                if self.active:
                    self.calls.append(__name)
                return __original(t, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, counted)


def counting_trainer(counter):
    class CountingTrainer(MSAMTrainer):
        def training_step(self, *args, **kwargs):
            counter.active = True
            try:
                return super().training_step(*args, **kwargs)
            finally:
                counter.active = False

    return CountingTrainer


class TokenLM(nn.Module):
    """A toy causal LM whose forward makes no host sync: token-sum cross-entropy over num_items_in_batch."""

    def __init__(self, vocab=11, dim=8):
        super().__init__()
        self.embed, self.head = nn.Embedding(vocab, dim), nn.Linear(dim, vocab)

    def forward(self, input_ids, labels=None, num_items_in_batch=None, **kwargs):
        logits = self.head(torch.tanh(self.embed(input_ids)))[:, :-1]
        out = {"logits": logits}
        if labels is not None:
            target = labels[:, 1:]
            loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100, reduction="sum")
            out["loss"] = loss / (num_items_in_batch if num_items_in_batch is not None else target.ne(-100).sum())
        return out


def token_data(n=8, length=6, vocab=11):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (n, length), generator=g)
    labels = ids.clone()
    for i in range(n):
        labels[i, 2 + i % 4 :] = -100
    return [{"input_ids": ids[i], "labels": labels[i]} for i in range(n)]


def args(tmp_path, **kwargs):
    return MSAMTrainingArguments(
        str(tmp_path), max_steps=3, learning_rate=1e-2, report_to="none", use_cpu=True, save_strategy="no",
        logging_strategy="no", disable_tqdm=True, **kwargs,
    )


def test_the_counter_sees_a_sync(monkeypatch):
    counter = SyncCounter(monkeypatch)
    counter.active = True
    torch.ones(2).sum().item(), bool(torch.ones(())), float(torch.ones(()))
    counter.active = False
    assert counter.calls == ["item", "__bool__", "__float__"]


METHODS = [
    dict(msam_method="sam"),
    dict(msam_method="sam", msam_adaptive=True, msam_rho_schedule="lr"),
    dict(msam_method="gsam"),
    dict(msam_method="fsam"),
    dict(msam_method="looksam", msam_looksam_k=2),
    dict(msam_method="momentum"),
    dict(msam_method="sam", msam_interval=2, msam_start=0.3),  # plain steps too: the base Trainer's own
    # the vectorized step (all micro-batches in one forward and backward per pass)
    dict(msam_method="sam", msam_vectorize="on"),
    dict(msam_method="gsam", msam_vectorize="on"),
    dict(msam_method="fsam", msam_vectorize="on"),
    dict(msam_method="looksam", msam_looksam_k=2, msam_vectorize="on"),
    # Functional-SAM, and preconditioned perturbations read from AdamW's state (after its first step)
    dict(msam_method="functional"),
    dict(msam_method="functional", msam_vectorize="on"),
    dict(msam_method="functional", msam_precondition="adam", optim="adamw_torch"),
    dict(msam_method="sam", msam_precondition="adam", optim="adamw_torch", msam_vectorize="on"),
]


@pytest.mark.parametrize("method", METHODS, ids=lambda m: "-".join(str(v) for v in m.values()))
def test_example_weighted_step_makes_no_host_sync(tmp_path, monkeypatch, method):
    counter = SyncCounter(monkeypatch)
    torch.manual_seed(0)
    trainer = counting_trainer(counter)(
        model=MLP(), args=args(tmp_path, per_device_train_batch_size=6, msam_micro_batch_size=4, **method),
        train_dataset=mlp_dataset(18, dtype=torch.float32),
    )
    trainer.train()
    assert internals.stats(trainer).micro_batches > 0  # the mSAM step ran
    assert counter.calls == []


@pytest.mark.parametrize("vectorize", ["off", "on"])
@pytest.mark.parametrize("method", ["sam", "gsam", "looksam", "functional"])
def test_token_weighted_step_makes_no_host_sync(tmp_path, monkeypatch, method, vectorize):
    counter = SyncCounter(monkeypatch)
    torch.manual_seed(0)
    trainer = counting_trainer(counter)(
        model=TokenLM(), args=args(tmp_path, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                                   msam_micro_batch_size=3, msam_method=method, msam_looksam_k=2,
                                   msam_vectorize=vectorize),
        train_dataset=token_data(16),
    )
    assert trainer.model_accepts_loss_kwargs  # so num_items_in_batch reaches the step: token weights
    trainer.train()
    assert internals.stats(trainer).micro_batches > 0
    assert counter.calls == []
