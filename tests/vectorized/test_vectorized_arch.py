"""The exactness matrix of the vectorized mSAM step: per architecture, the gradient `MicroBatchSAM(vectorize="on")`
leaves in `.grad` against the sequential step's (`vectorize="off"`, one pass per micro-batch with the weights
written: an independent implementation), for SAM and ASAM, k = 2 and 4 micro-batches with an uneven last one.

float64 to 1e-10 relative: both paths then compute the same sums in different orders, ~1e-16 apart. transformers
casts some parts of its models to float32 even in a float64 model (Llama's and Qwen2's RMSNorm, eager attention's
softmax, `ForCausalLMLoss`); a float32 rounding turns the paths' 1e-16 differences into 1e-7 ones, so the float64
cases run with those casts patched out (`exact_float64`, applied to both paths alike) and use their own float64
losses. The patched RMSNorm forward is not transformers' code, so here those norms run through the torch.func
fallback; tests/vectorized/test_vectorized_rmsnorm.py runs the same matrix with them on their rule. float32 to 1e-5 relative: the paths' float32 roundings (~6e-8 per operation) accumulate over the two
passes and the rule's normalization; measured at most 2e-6 on these models (float64: at most 5e-15).

Every tolerance is per parameter, |Δ| <= rtol·|g| + floor, with floor = 1e-3·rtol·|whole gradient| for parameters
whose exact gradient is ~0 (attention's key bias), which both sides only approximate by roundoff.
"""

from __future__ import annotations

import copy
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from reference import msam_gradient

from hf_msam import MicroBatchSAM
from hf_msam.batches import label_token_count, pair_count, split_batch, split_packed, split_pairs
from hf_msam.ops import unaliased

VOCAB = 40
RTOL = {torch.float64: 1e-10, torch.float32: 1e-5}
# k = 2 and k = 4 micro-batches, the last one short: (examples, micro-batch size)
CUTS = {2: (5, 3), 4: (7, 2)}
METHODS = {"sam": dict(rho=0.1), "asam": dict(rho=0.5, adaptive=True)}


# ---------------------------------------------------------------------------------------------
# float64 without transformers' float32 islands
# ---------------------------------------------------------------------------------------------


def _rms_norm_in_input_dtype(self, hidden_states):
    """LlamaRMSNorm/Qwen2RMSNorm.forward without the float32 round trip (the same formula in the input's dtype)."""
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def without_float32_casts(monkeypatch) -> None:
    """Patch out transformers' float32 casts inside a float64 model (see the module docstring): Llama's and Qwen2's
    RMSNorm compute in the input's dtype, eager attention's softmax(..., dtype=torch.float32) keeps float64."""
    from transformers.models.llama import modeling_llama
    from transformers.models.qwen2 import modeling_qwen2

    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", _rms_norm_in_input_dtype)
    monkeypatch.setattr(modeling_qwen2.Qwen2RMSNorm, "forward", _rms_norm_in_input_dtype)
    softmax = F.softmax

    def softmax_keeping_float64(input, dim=None, _stacklevel=3, dtype=None):
        if input.dtype == torch.float64 and dtype == torch.float32:
            dtype = None
        return softmax(input, dim=dim, dtype=dtype)

    monkeypatch.setattr(F, "softmax", softmax_keeping_float64)


def causal_lm_loss_in_logits_dtype(logits, labels, vocab_size, num_items_in_batch=None, ignore_index=-100, **kwargs):
    """transformers' ForCausalLMLoss (shift by one, -100 ignored, a sum over num_items_in_batch or a mean), without
    its `logits.float()`: set as `model.loss_function` in float64 tests."""
    shifted = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = F.cross_entropy(logits.reshape(-1, vocab_size), shifted.reshape(-1).to(logits.device),
                           ignore_index=ignore_index, reduction=reduction)
    return loss if num_items_in_batch is None else loss / num_items_in_batch


@pytest.fixture
def exact_float64(monkeypatch):
    without_float32_casts(monkeypatch)


# ---------------------------------------------------------------------------------------------
# Setups: a model, a batch of n examples, how the engine cuts and weighs it
# ---------------------------------------------------------------------------------------------


@dataclass
class Setup:
    model: torch.nn.Module
    batch: dict
    loss: Callable[[torch.nn.Module, dict], torch.Tensor]  # a (micro-)batch's mean loss, over what size_fn counts
    size_fn: Callable[[dict], Any] | None = None
    split_fn: Callable = split_batch
    layout: str = "rows"


def _ids(n: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(2, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


def _right_padded(n: int, length: int, pad_id: int = 0, seed: int = 0) -> dict:
    ids = _ids(n, length, seed)
    mask = torch.ones(n, length, dtype=torch.long)
    for i in range(0, n, 2):
        cut = length - 1 - (i % 4)
        mask[i, cut:], ids[i, cut:] = 0, pad_id
    return {"input_ids": ids, "attention_mask": mask}


def _classification(model, batch: dict, n: int, num_labels: int) -> Setup:
    batch = {**batch, "labels": torch.arange(n) % num_labels}
    return Setup(model, batch, lambda model, mb: model(**mb).loss)  # the models' own mean cross-entropy


def _bert(n, dtype):
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=24, max_position_embeddings=16, num_labels=3, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    batch = _right_padded(n, 10)
    batch["token_type_ids"] = (torch.arange(10) >= 5).long().expand(n, -1).clone()
    return _classification(BertForSequenceClassification(config), batch, n, 3)


def _roberta(n, dtype):
    from transformers import RobertaConfig, RobertaForSequenceClassification

    config = RobertaConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=24, max_position_embeddings=20, num_labels=2, pad_token_id=1,
                           hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    # padding id 1: RoBERTa's position ids skip padding (padding_idx in use)
    return _classification(RobertaForSequenceClassification(config), _right_padded(n, 10, pad_id=1), n, 2)


def _distilbert(n, dtype):
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    config = DistilBertConfig(vocab_size=VOCAB, dim=16, n_layers=2, n_heads=2, hidden_dim=24,
                              max_position_embeddings=16, num_labels=2, dropout=0.0, attention_dropout=0.0,
                              seq_classif_dropout=0.0)
    return _classification(DistilBertForSequenceClassification(config), _right_padded(n, 10), n, 2)


def _vit(n, dtype):
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(image_size=16, patch_size=8, num_channels=3, hidden_size=16, num_hidden_layers=2,
                       num_attention_heads=2, intermediate_size=24, num_labels=3, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0)
    pixels = torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(0), dtype=dtype)
    return _classification(ViTForImageClassification(config), {"pixel_values": pixels}, n, 3)


def _token_loss_sum(model, mb: dict) -> torch.Tensor:
    """Σ of next-token cross-entropy over the label tokens (labels -100 elsewhere), in the logits' dtype."""
    inputs = {k: v for k, v in mb.items() if k != "labels"}
    logits = model(**inputs, use_cache=False).logits[:, :-1]
    return F.cross_entropy(logits.transpose(1, 2), mb["labels"][:, 1:], ignore_index=-100, reduction="sum")


def _token_mean(model, mb: dict) -> torch.Tensor:
    return _token_loss_sum(model, mb) / label_token_count(mb)


def _sft_batch(n: int, length: int = 10) -> dict:
    """A padded SFT batch: a prompt of 1-4 tokens per row (labels -100), right padding (labels -100), so rows and
    micro-batches hold different numbers of label tokens."""
    batch = _right_padded(n, length)
    labels = batch["input_ids"].clone()
    labels[batch["attention_mask"] == 0] = -100
    for i in range(n):
        labels[i, : 1 + i % 4] = -100
    return {**batch, "labels": labels}


def _sft(model, n: int) -> Setup:
    """Token-weighted micro-batches: each micro-batch's loss is its mean over its own label tokens, and it weighs
    by its count of them (as the trainer does under num_items_in_batch)."""
    return Setup(model, _sft_batch(n), _token_mean, size_fn=label_token_count)


def _gpt2(n, dtype):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=16, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config)
    assert model.lm_head.weight is model.transformer.wte.weight  # tied: one parameter, two layers
    return _sft(model, n)


def _decoder(attn: str = "sdpa", tie: bool = False, qwen: bool = False):
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    config = (Qwen2Config if qwen else LlamaConfig)(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=32, tie_word_embeddings=tie,
    )
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tie
    return model


def _lora_llama(n, dtype):
    from peft import LoraConfig, get_peft_model

    # LoRA on the embedding keeps its A and B in ParameterDicts read by the LoRA layer: the torch.func fallback
    lora = LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_dropout=0.0,
                      target_modules=["embed_tokens", "q_proj", "v_proj"])
    model = get_peft_model(_decoder(), lora)
    for name, p in model.named_parameters():  # LoRA's B starts at 0: move it, so every adapter has a gradient
        if "lora_B" in name or "lora_embedding_B" in name:
            with torch.no_grad():
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
    return _sft(model, n)


def _packed(n, dtype):
    """One row holding n sequences, position_ids restarting at each (padding-free, as TRL's collators make it);
    each sequence's first label is -100, so no token predicts across a boundary. Micro-batches: runs of whole
    sequences (`split_packed`), weighted by their label tokens."""
    model = _decoder(tie=True)
    lengths = [3 + (2 * i) % 5 for i in range(n)]
    ids = _ids(1, sum(lengths), seed=2)
    labels = ids.clone()
    start = 0
    for i, length in enumerate(lengths):
        labels[0, start : start + 1 + i % 2] = -100
        start += length
    position_ids = torch.cat([torch.arange(length) for length in lengths]).unsqueeze(0)
    batch = {"input_ids": ids, "position_ids": position_ids, "labels": labels}
    return Setup(model, batch, _token_mean, size_fn=label_token_count, split_fn=split_packed, layout="packed")


def _dpo_pairs(n, dtype):
    """A DPO-style preference batch: rows 0..n-1 chosen, n..2n-1 rejected; the loss is the mean over pairs of
    -log σ(β((log π(c) - log π(r)) - (ref(c) - ref(r)))), log π summed over each row's label tokens, the
    reference's log-probabilities given per row (as precomputed reference log-probs are)."""
    model = _decoder()
    batch = _sft_batch(2 * n)
    batch["ref_logps"] = -torch.linspace(5.0, 9.0, 2 * n, dtype=dtype)

    def loss(model, mb):
        logits = model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"], use_cache=False).logits[:, :-1]
        labels = mb["labels"][:, 1:]
        mask = labels != -100
        token_logps = torch.gather(logits.log_softmax(-1), 2, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        logps = (token_logps * mask).sum(1) - mb["ref_logps"]
        half = logps.shape[0] // 2
        return -F.logsigmoid(0.5 * (logps[:half] - logps[half:])).mean()

    return Setup(model, batch, loss, size_fn=pair_count, split_fn=split_pairs, layout="pairs")


def _checkpointed(arch: str) -> Callable[[int, torch.dtype], Setup]:
    """The architecture with transformers' activation checkpointing (non-reentrant, its default): the backward
    recomputes every layer, and with it the routed layers and, for Llama, the RMSNorms the fallback runs."""

    def setup(n, dtype):
        made = ARCHS[arch](n, dtype)
        made.model.activation_checkpointing_enable()
        return made

    return setup


ARCHS: dict[str, Callable[[int, torch.dtype], Setup]] = {
    "bert-padded": _bert,
    "roberta": _roberta,
    "distilbert": _distilbert,
    "vit": _vit,
    "gpt2-tied-sft": _gpt2,
    "llama-sdpa-sft": lambda n, dtype: _sft(_decoder("sdpa"), n),
    "llama-eager-tied-sft": lambda n, dtype: _sft(_decoder("eager", tie=True), n),
    "qwen2-sft": lambda n, dtype: _sft(_decoder(qwen=True), n),
    "lora-llama-sft": _lora_llama,
    "llama-packed": _packed,
    "llama-dpo-pairs": _dpo_pairs,
}
ARCHS.update({f"{arch}-checkpointing": _checkpointed(arch)
              for arch in ("bert-padded", "gpt2-tied-sft", "llama-sdpa-sft", "lora-llama-sft", "llama-packed")})


def build(arch: str, n: int, dtype: torch.dtype) -> Setup:
    torch.manual_seed(0)
    setup = ARCHS[arch](n, dtype)
    setup.model.to(dtype)
    setup.model.train()  # dropout is 0 everywhere: train mode changes nothing, and is what training runs in
    return setup


# ---------------------------------------------------------------------------------------------
# The comparison
# ---------------------------------------------------------------------------------------------


def msam_grads(setup: Setup, model: torch.nn.Module, vectorize: str, micro_batch_size: int, **method) -> list:
    """`.grad` of the trainable parameters after one mSAM backward of the setup's batch on `model`."""
    sam = MicroBatchSAM(model, micro_batch_size=micro_batch_size, vectorize=vectorize, **method)
    sam.backward(setup.batch, lambda mb: setup.loss(model, mb), size_fn=setup.size_fn, split_fn=setup.split_fn,
                 layout=setup.layout)
    assert sam.path == ("sequential" if vectorize == "off" else "vectorized"), sam.path_reason
    return [p.grad.detach().clone() for p in model.parameters() if p.requires_grad]


def relative_errors(got: list[torch.Tensor], want: list[torch.Tensor]) -> list[float]:
    """Per parameter |got - want| / (|want| + 1e-3 |whole want|)."""
    whole = torch.cat([w.flatten() for w in want]).norm().item()
    return [((g - w).norm() / (w.norm() + 1e-3 * whole)).item() for g, w in zip(got, want)]


def compare(arch: str, method: str, k: int, dtype: torch.dtype) -> float:
    """The largest per-parameter relative difference of the mSAM gradient, vectorized against sequential."""
    n, m = CUTS[k]
    setup = build(arch, n, dtype)
    twin = copy.deepcopy(setup.model)
    want = msam_grads(setup, twin, "off", m, **METHODS[method])
    got = msam_grads(setup, setup.model, "on", m, **METHODS[method])
    assert all(torch.isfinite(w).all() for w in want) and any(w.abs().sum() > 0 for w in want)
    return max(relative_errors(got, want))


@pytest.mark.parametrize("k", sorted(CUTS))
@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("arch", list(ARCHS))
def test_float64(arch, method, k, exact_float64):
    assert compare(arch, method, k, torch.float64) <= RTOL[torch.float64]


@pytest.mark.parametrize(
    "method, k",
    [("sam", 4), *(pytest.param(m, k, marks=pytest.mark.slow) for m in METHODS for k in CUTS if (m, k) != ("sam", 4))],
)
@pytest.mark.parametrize("arch", list(ARCHS))
def test_float32(arch, method, k):
    assert compare(arch, method, k, torch.float32) <= RTOL[torch.float32]


@pytest.mark.parametrize("vectorize", ["off", "on"])
@pytest.mark.parametrize("method", list(METHODS))
def test_vit_micro_batches_of_one_example_match_the_plain_reference(vectorize, method):
    """With one row, autograd returns ViT's cls_token gradient as a view into position_embeddings' (the sum over the
    batch of a broadcast is then no copy); the rules scale gradients in place, so the sequential step used to scale
    that storage twice (39% off on this model). Both paths against the plain loop of tests/reference.py."""
    setup = build("vit", 3, torch.float64)
    expected = msam_gradient(copy.deepcopy(setup.model), setup.batch, 1, **_reference_args(method))
    got = msam_grads(setup, setup.model, vectorize, 1, **METHODS[method])
    assert max(relative_errors(got, expected)) <= 1e-10


def _reference_args(method: str) -> dict:
    return {"rho": METHODS[method]["rho"], "adaptive": METHODS[method].get("adaptive", False)}


def test_unaliased_copies_only_what_shares_storage():
    base = torch.zeros(4, 3)
    a, b, c = base, base[1:], torch.ones(2)
    out = unaliased([a, b, c])
    assert out[0] is a and out[2] is c and out[1] is not b and torch.equal(out[1], b)
    assert out[1].untyped_storage().data_ptr() != base.untyped_storage().data_ptr()


# ---------------------------------------------------------------------------------------------
# What takes the torch.func fallback, what falls back to the sequential step, and why
# ---------------------------------------------------------------------------------------------


def test_fallback_modules_per_architecture():
    """Layers without a rule run through the per-module torch.func fallback, not the whole model."""
    from hf_msam.vectorized import Vectorizer

    def fallbacks(arch):
        model = build(arch, 2, torch.float64).model
        return Vectorizer(model, [p for p in model.parameters() if p.requires_grad]).fallback_modules()

    assert fallbacks("bert-padded") == [] and fallbacks("gpt2-tied-sft") == []  # rules cover every layer
    assert fallbacks("vit") == []  # ViTEmbeddings runs per row, its Conv2d on the conv rule
    # LlamaRMSNorm and Qwen2RMSNorm: the rule for transformers' Llama-style norms (tests/vectorized/test_vectorized_rmsnorm.py)
    assert fallbacks("llama-sdpa-sft") == [] and fallbacks("qwen2-sft") == []
    lora = fallbacks("lora-llama-sft")
    assert any("embed_tokens" in name for name in lora)  # LoRA's embedding keeps A and B in ParameterDicts


class Net(torch.nn.Module):
    """Embedding -> `middle` -> mean over positions -> Linear: the middle is the module under test."""

    def __init__(self, middle: torch.nn.Module | None = None, embedding: torch.nn.Module | None = None, width: int = 8):
        super().__init__()
        self.emb = embedding if embedding is not None else torch.nn.Embedding(VOCAB, width)
        self.middle = middle if middle is not None else torch.nn.Linear(width, width)
        self.head = torch.nn.Linear(width, 3)

    def forward(self, input_ids, labels):
        h = self.middle(self.emb(input_ids))
        logits = self.head(torch.tanh(h).mean(1))
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


class Checkpointed(torch.nn.Module):
    """A Linear inside torch.utils.checkpoint, without transformers' `gradient_checkpointing` flag."""

    def __init__(self, reentrant: bool, width: int = 8):
        super().__init__()
        self.inner, self.reentrant = torch.nn.Linear(width, width), reentrant

    def forward(self, x):
        return torch.utils.checkpoint.checkpoint(self.inner, x, use_reentrant=self.reentrant)


class DataDependent(torch.nn.Module):
    """A layer with a parameter and a branch on a value: vmap cannot run it, so its fallback fails at the forward."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(width))

    def forward(self, x):
        return x * self.scale if x.sum() > 0 else x * self.scale.square()


class RowMixer(torch.nn.Module):
    """Mixes the rows of its input: run by the fallback once per group, it mixes the rows of each micro-batch, as the
    sequential step does."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(width))

    def forward(self, x):
        return x + (x * self.scale).mean(0)


class BatchSummary(torch.nn.Module):
    """Returns one value for the whole batch ([T, d]): its per-group output lacks the group's rows."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(width))

    def forward(self, x):
        return (x * self.scale).mean(0)


class PlusSummary(torch.nn.Module):
    def __init__(self, width: int = 8):
        super().__init__()
        self.summary = BatchSummary(width)

    def forward(self, x):
        return x + self.summary(x)


class LearnedBias(torch.nn.Module):
    """A parameter module called without any input that carries the batch."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.bias = torch.nn.Parameter(torch.zeros(1, 1, width))

    def forward(self):
        return self.bias * 2


class WithBias(torch.nn.Module):
    def __init__(self, width: int = 8):
        super().__init__()
        self.lin, self.learned = torch.nn.Linear(width, width), LearnedBias(width)

    def forward(self, x):
        return self.lin(x) + self.learned()


class DirectRead(torch.nn.Module):
    """Reads its child's weight outside the child's call (as DoRA's norm does)."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.lin = torch.nn.Linear(width, width)

    def forward(self, x):
        return self.lin(x) + F.linear(x, self.lin.weight.square())


class Flattening(torch.nn.Module):
    """Gives its Linear the batch flattened away: [n, T, d] -> [n·T, d]."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.lin = torch.nn.Linear(width, width)

    def forward(self, x):
        return self.lin(x.reshape(-1, x.shape[-1])).view(x.shape)


def _dora_net():
    from peft import LoraConfig, get_peft_model

    net = Net()
    return get_peft_model(net, LoraConfig(r=2, target_modules=["middle"], use_dora=True))




def _llama_reentrant_checkpointing():
    model = _decoder()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    return model


def _without_stats_batchnorm():
    class PerChannel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = torch.nn.BatchNorm1d(8, track_running_stats=False)

        def forward(self, x):
            return self.norm(x.transpose(1, 2)).transpose(1, 2)

    return Net(PerChannel())


# name: (model builder, what the reason says). Each is refused before the step (`why_not`) or by the first step's
# forward or graph check; `auto` then runs the sequential step from the start, `on` raises naming the reason.
REFUSED = {
    "batchnorm-train": (lambda: Net(torch.nn.Sequential(Transposed(torch.nn.BatchNorm1d(8)))), "BatchNorm"),
    "batchnorm-train-no-running-stats": (_without_stats_batchnorm, "BatchNorm1d in train mode"),
    "instancenorm-running-stats": (
        lambda: Net(Transposed(torch.nn.InstanceNorm1d(8, affine=True, track_running_stats=True))), "running statistics"),
    "lstm": (lambda: Net(FirstOutput(torch.nn.LSTM(8, 8, batch_first=True))), "recurrent layers"),
    "batch-first-false": (lambda: Net(torch.nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0)), "batch_first=False"),
    "embedding-max-norm": (lambda: Net(embedding=torch.nn.Embedding(VOCAB, 8, max_norm=1.0)), "max_norm"),
    "embedding-scale-grad-by-freq": (
        lambda: Net(embedding=torch.nn.Embedding(VOCAB, 8, scale_grad_by_freq=True)), "scale_grad_by_freq"),
    "dora": (_dora_net, "DoRA"),
    "weight-read-outside-its-layer": (lambda: Net(DirectRead()), r"middle\.lin\.weight \(parameter \d+\) \[8, 8\] \(read by"),
    "input-reshaped": (lambda: Net(Flattening()), "leading dims are not the batch"),
    "fallback-fails-in-vmap": (lambda: Net(DataDependent()), "torch.func fallback for middle .DataDependent. failed"),
    "fallback-output-without-rows": (lambda: Net(PlusSummary()), "does not carry the group's positions"),
    "fallback-no-batched-input": (lambda: Net(WithBias()), "none of its inputs carries the batch"),
}


class Transposed(torch.nn.Module):
    """[n, T, d] -> a per-channel module on [n, d, T] -> [n, T, d]."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x.transpose(1, 2)).transpose(1, 2)


class FirstOutput(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)[0]


def _refused_setup(name: str):
    torch.manual_seed(0)
    model = REFUSED[name][0]().double()
    model.train()
    ids = torch.randint(0, VOCAB, (4, 5), generator=torch.Generator().manual_seed(0))
    return model, {"input_ids": ids, "labels": torch.arange(4) % 3}, lambda m, mb: m(**mb)["loss"], None


@pytest.mark.parametrize("name", list(REFUSED))
def test_auto_falls_back_with_the_reason_and_on_raises_it(name, caplog):
    """`auto`: the sequential step, its gradient bitwise the `off` one, the reason in `path_reason` and the log;
    `on`: a ValueError naming the reason; either way `.grad` and the weights are as the sequential step leaves them."""
    import logging

    model, batch, loss, size_fn = _refused_setup(name)
    twin, third = copy.deepcopy(model), copy.deepcopy(model)
    reason = REFUSED[name][1]
    grads = {}
    for vectorize, m in (("off", twin), ("auto", model)):
        sam = MicroBatchSAM(m, rho=0.1, micro_batch_size=2, vectorize=vectorize)
        with caplog.at_level(logging.INFO, logger="hf_msam"):
            sam.backward(batch, lambda mb: loss(m, mb), size_fn=size_fn)
        assert sam.path == "sequential"
        grads[vectorize] = [p.grad for p in m.parameters() if p.requires_grad]
    import re

    assert re.search(reason, sam.path_reason), sam.path_reason
    assert "one pass per micro-batch (sequential), because" in caplog.text
    for a, b in zip(grads["auto"], grads["off"]):
        assert torch.equal(a, b)
    before = copy.deepcopy(third.state_dict())
    sam = MicroBatchSAM(third, rho=0.1, micro_batch_size=2, vectorize="on")
    with pytest.raises(ValueError, match=reason):
        sam.backward(batch, lambda mb: loss(third, mb), size_fn=size_fn)
    assert all(p.grad is None for p in third.parameters())
    assert all(torch.equal(v, third.state_dict()[k]) for k, v in before.items())


def test_a_torch_checkpoint_region_in_a_users_model_vectorizes():
    """torch.utils.checkpoint (non-reentrant) around a Linear, in a model of one's own: the vectorized step runs,
    its gradient is the sequential one's, with uneven micro-batches, to 1e-12 (float64)."""
    torch.manual_seed(0)
    model = Net(Checkpointed(reentrant=False)).double()
    twin = copy.deepcopy(model)
    ids = torch.randint(0, VOCAB, (5, 4), generator=torch.Generator().manual_seed(0))
    setup = Setup(model, {"input_ids": ids, "labels": torch.arange(5) % 3}, lambda m, mb: m(**mb)["loss"])
    want = msam_grads(setup, twin, "off", 2, rho=0.1)
    got = msam_grads(setup, model, "on", 2, rho=0.1)
    assert max(relative_errors(got, want)) <= 1e-12


def _compiled_steps(model, compiled, batch, loss, size_fn, steps: int) -> tuple[list[torch.Tensor], list[int]]:
    """`steps` vectorized backwards through the compiled model; .grad of the last one, and the number of graphs
    dynamo has compiled after each."""
    from torch._dynamo.utils import counters

    sam = MicroBatchSAM(model, rho=0.1, micro_batch_size=2, vectorize="on")
    graphs = []
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        sam.backward(batch, lambda mb: loss(compiled, mb), size_fn=size_fn)
        assert sam.path == "vectorized"
        graphs.append(counters["stats"]["unique_graphs"])
    return [p.grad.clone() for p in model.parameters() if p.requires_grad], graphs


@pytest.mark.parametrize("arch", ["net", "llama-sdpa-sft"])
def test_a_compiled_model_vectorizes_without_recompiling(arch, exact_float64):
    """torch.compile (eager backend: dynamo's tracing and guards without code generation): the routed layers run
    outside compilation (graph breaks), the pieces between them are compiled once, not at every pass (the routed
    forwards are the same objects at every pass). The gradient is the uncompiled sequential step's to 1e-12."""
    import torch._dynamo

    torch._dynamo.reset()
    if arch == "net":
        torch.manual_seed(0)
        model = Net().double().train()
        batch = {"input_ids": torch.randint(0, VOCAB, (5, 4), generator=torch.Generator().manual_seed(0)),
                 "labels": torch.arange(5) % 3}
        loss, size_fn = (lambda m, mb: m(**mb)["loss"]), None
    else:
        setup = build(arch, 5, torch.float64)
        model, batch, size_fn = setup.model, setup.batch, setup.size_fn
        loss = setup.loss
    twin = copy.deepcopy(model)
    sam = MicroBatchSAM(twin, rho=0.1, micro_batch_size=2, vectorize="off")
    sam.backward(batch, lambda mb: loss(twin, mb), size_fn=size_fn)
    want = [p.grad for p in twin.parameters() if p.requires_grad]
    got, graphs = _compiled_steps(model, torch.compile(model, backend="eager"), batch, loss, size_fn, steps=4)
    torch._dynamo.reset()
    assert graphs[0] > 0 and graphs[-1] == graphs[1], graphs  # compiled at the first two steps at most, then reused
    assert max(relative_errors(got, want)) <= 1e-12


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="inductor needs a C++ compiler")
def test_a_model_compiled_with_inductor_vectorizes():
    """The same with inductor, torch.compile's default backend (generated C++ on the CPU)."""
    import torch._dynamo

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Net().double().train()
    batch = {"input_ids": torch.randint(0, VOCAB, (5, 4), generator=torch.Generator().manual_seed(0)),
             "labels": torch.arange(5) % 3}
    twin = copy.deepcopy(model)
    sam = MicroBatchSAM(twin, rho=0.1, micro_batch_size=2, vectorize="off")
    sam.backward(batch, lambda mb: twin(**mb)["loss"])
    want = [p.grad for p in twin.parameters()]
    got, graphs = _compiled_steps(model, torch.compile(model), batch, lambda m, mb: m(**mb)["loss"], None, steps=3)
    torch._dynamo.reset()
    assert graphs[-1] == graphs[1], graphs
    assert max(relative_errors(got, want)) <= 1e-12


def test_transformers_reentrant_checkpointing_is_refused_before_the_step():
    """transformers' reentrant checkpointing is refused by `why_not`, before any forward: `on` raises with what to
    set. (The sequential step cannot run it either: torch refuses autograd.grad through reentrant checkpoints and
    says to set use_reentrant=False.)"""
    from hf_msam.vectorized import Vectorizer

    torch.manual_seed(0)
    model = _llama_reentrant_checkpointing().double().train()
    assert "use_reentrant': False" in Vectorizer(model, list(model.parameters())).why_not()
    sam = MicroBatchSAM(model, rho=0.1, micro_batch_size=2, vectorize="on")
    with pytest.raises(ValueError, match="reentrant gradient checkpointing"):
        sam.backward(_sft_batch(4), lambda mb: _token_mean(model, mb), size_fn=label_token_count)
    assert all(p.grad is None for p in model.parameters())


def test_verify_finds_reentrant_checkpointing():
    """Reentrant torch.utils.checkpoint runs its forward without autograd: no layer call inside is recorded, so the
    region's parameters would get zero per-group gradients. `verify` finds its node. (The sequential step cannot
    run it either: torch refuses .grad() through reentrant checkpoints.)"""
    from hf_msam.vectorized import GroupLayout, NotVectorizable, Vectorizer

    torch.manual_seed(0)
    model = Net(Checkpointed(reentrant=True)).double()
    vec = Vectorizer(model, list(model.parameters()))
    assert vec.why_not() is None
    ids = torch.randint(0, VOCAB, (4, 5), generator=torch.Generator().manual_seed(0))
    with vec.capture(GroupLayout.rows([2, 2])) as cap:
        loss = model(ids, torch.arange(4) % 3)["loss"]
    with pytest.raises(NotVectorizable, match="torch.utils.checkpoint region"):
        cap.verify(loss)


@pytest.mark.parametrize("n", [6, 7, 8], ids=lambda n: f"batch{n}")
def test_rows_mixed_inside_a_fallback_module_mix_per_micro_batch(n):
    """The fallback runs a module once per group, as a batch of its own: rows mixed inside it mix within each
    micro-batch, as in the sequential step, with even micro-batches (6 rows: 3 + 3) and uneven ones (7: 3 + 3 + 1;
    8: 3 + 3 + 2), whose groups of each size run unpadded (more cases in tests/vectorized/test_vectorized_uneven.py)."""
    torch.manual_seed(0)
    model = Net(RowMixer()).double()
    twin = copy.deepcopy(model)
    ids = torch.randint(0, VOCAB, (n, 4), generator=torch.Generator().manual_seed(0))
    setup = Setup(model, {"input_ids": ids, "labels": torch.arange(n) % 3}, lambda m, mb: m(**mb)["loss"])
    want = msam_grads(setup, twin, "off", 3, rho=0.1)
    got = msam_grads(setup, model, "on", 3, rho=0.1)
    assert max(relative_errors(got, want)) <= 1e-10
