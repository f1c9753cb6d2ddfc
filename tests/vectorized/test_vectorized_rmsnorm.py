"""The grouped rule for transformers' Llama-style RMSNorm classes (LlamaRMSNorm, Qwen2RMSNorm, MistralRMSNorm, ...):
which modules it is chosen for, and what it computes, against independent references:

- the modules it is chosen for, by what their forward is (the same bytecode as LlamaRMSNorm.forward), and those it
  must leave to the torch.func fallback (a forward overridden, patched or computing another formula);
- one RMSNorm alone: its per-group gradients and its perturbed output and `.grad` against a plain PyTorch loop over
  the groups (autograd on each group's rows, the module's own forward at w + e_j), in float64 with the module's
  float32 normalization left in place; under bf16 autocast and with bf16 weights, against the fallback;
- whole models: `MicroBatchSAM(vectorize="on")`'s `.grad` against the sequential step's, as in
  test_vectorized_arch.py, for Llama, Qwen2 and Mistral with the norms on the rule (asserted).

The float64 model matrix patches the norms' float32 round trip out and registers the same rule normalizing in the
input's dtype for the patched forward (see `float64_rule_without_float32`).
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
import test_vectorized_arch as arch
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm

import internals
from hf_msam import vectorized
from hf_msam.vectorized import GroupLayout, Vectorizer
from hf_msam.vectorized.registry import rule_for

WIDTH = 16


# ---------------------------------------------------------------------------------------------
# Which modules take the rule
# ---------------------------------------------------------------------------------------------


def _decoder(family: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A tiny causal LM of the family from its Config class (no Hub), 2 layers."""
    import transformers

    config_class = getattr(transformers, f"{family}Config")
    extra = {"sliding_window": None} if family == "Mistral" else {}
    config = config_class(vocab_size=arch.VOCAB, hidden_size=WIDTH, intermediate_size=24, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32, **extra)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).to(dtype)
    with torch.no_grad():  # the norms start at weight 1: move them, so that a wrong x̂ or e would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.3, generator=torch.Generator().manual_seed(len(name)))
    return model


def _norm_rule():
    (rule,) = [r for matches, r in vectorized.FORWARD_RULES if matches is vectorized._computes_like_llama_rms_norm]
    return rule


FAMILIES = ["Llama", "Qwen2", "Mistral", "Qwen3"]


@pytest.mark.parametrize("family", FAMILIES)
def test_rule_is_chosen_for_the_llama_family_norms(family):
    model = _decoder(family)
    norms = [(name, m) for name, m in model.named_modules() if type(m).__name__ == f"{family}RMSNorm"]
    assert len(norms) >= 5  # 2 layers x 2 (Qwen3: and q_norm, k_norm), and the last
    rule = _norm_rule()
    assert all(rule_for(m) is rule for _, m in norms)
    vec = Vectorizer(model, [p for p in model.parameters() if p.requires_grad])
    assert vec.fallback_modules() == []  # every layer of these models now has a rule
    assert {name for name, _, r in vec.covered() if r is rule} == {name for name, _ in norms}


class OverridingForward(LlamaRMSNorm):
    """A subclass that computes something else in its own forward."""

    def forward(self, hidden_states):
        return super().forward(hidden_states) * 2


class SameFormulaOtherCode(nn.Module):
    """The Llama formula written another way (normalized in the input's dtype): not the known code, not matched."""

    def __init__(self, width: int = WIDTH, eps: float = 1e-6):
        super().__init__()
        self.weight, self.variance_epsilon = nn.Parameter(torch.ones(width)), eps

    def forward(self, hidden_states):
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


class InheritingForward(LlamaRMSNorm):
    """A subclass that keeps LlamaRMSNorm's forward: it computes the same, so it takes the rule."""


def _not_matched_cases():
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm  # output * (1 + weight): another formula

    on_instance = LlamaRMSNorm(WIDTH)
    on_instance.forward = lambda hidden_states: hidden_states  # as kernels' kernelize sets a forward per instance
    matrix = LlamaRMSNorm(WIDTH)
    matrix.weight = nn.Parameter(torch.ones(2, WIDTH))  # broadcasts otherwise than a vector over the last dim
    return {
        "subclass-overriding-forward": OverridingForward(WIDTH),
        "same-formula-other-code": SameFormulaOtherCode(),
        "gemma": GemmaRMSNorm(WIDTH),
        "forward-set-on-the-instance": on_instance,
        "weight-not-a-vector": matrix,
        "torch-rmsnorm-is-its-own-rule": nn.RMSNorm(WIDTH),
    }


def test_rule_is_not_chosen_for_other_forwards(monkeypatch):
    rule = _norm_rule()
    cases = _not_matched_cases()
    for name, module in cases.items():
        assert rule_for(module) is not rule, name
    assert rule_for(cases["torch-rmsnorm-is-its-own-rule"]) is vectorized.RULES[nn.RMSNorm]
    assert rule_for(InheritingForward(WIDTH)) is rule
    # A forward patched onto the class itself (as test_vectorized_arch.py's float64 fixture does): not the known code
    from transformers.models.llama import modeling_llama

    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", SameFormulaOtherCode.forward)
    vectorized._LLAMA_RMS_FORWARD.clear()  # read the reference again, now under the patch
    assert internals.llama_rms_forward_key() is None
    assert rule_for(modeling_llama.LlamaRMSNorm(WIDTH)) is None
    monkeypatch.undo()
    assert rule_for(modeling_llama.LlamaRMSNorm(WIDTH)) is rule  # read again once the patch is gone


def test_fallback_still_runs_the_unmatched_norms():
    """A model whose norm overrides forward: the module takes the torch.func fallback."""
    net = arch.Net(OverridingForward(8))
    vec = Vectorizer(net, list(net.parameters()))
    assert vec.fallback_modules() == ["middle (OverridingForward)"]


# ---------------------------------------------------------------------------------------------
# One RMSNorm alone, against a plain loop over the groups
# ---------------------------------------------------------------------------------------------


LAYOUTS = {
    "rows-uneven": (lambda: GroupLayout.rows([3, 3, 1]), (7, 5)),
    "packed-tokens": (lambda: GroupLayout.tokens([0, 4, 9, 11, 16], [2, 1, 1]), (1, 16)),
}


def _group_slices(layout: GroupLayout):
    """Each group's positions as an index into the batch dim (rows) or the token dim (packed)."""
    return [torch.tensor(m) for m in layout.members]


def _take(t: torch.Tensor, layout: GroupLayout, index: torch.Tensor) -> torch.Tensor:
    return t.index_select(layout.axis, index)


def _norm_and_batch(key: str, dtype=torch.float64):
    make_layout, shape = LAYOUTS[key]
    torch.manual_seed(0)
    norm = LlamaRMSNorm(WIDTH, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.5)
    x = torch.randn(*shape, WIDTH, dtype=dtype) * 3
    weights = torch.randn(*shape, WIDTH, dtype=dtype)  # the loss: Σ weights ⊙ output
    return norm, x, weights, make_layout()


@pytest.mark.parametrize("key", list(LAYOUTS))
def test_group_gradients_of_one_norm_match_a_loop_over_groups(key):
    norm, x, weights, layout = _norm_and_batch(key)
    assert rule_for(norm) is _norm_rule()
    vec = Vectorizer(norm, [norm.weight])
    with vec.capture(layout) as cap:
        loss = (norm(x) * weights).sum()
    (got,) = cap.group_gradients(loss)
    assert norm.weight.grad is None
    for j, index in enumerate(_group_slices(layout)):
        ref_norm = copy.deepcopy(norm)
        (ref_norm(_take(x, layout, index)) * _take(weights, layout, index)).sum().backward()
        want = ref_norm.weight.grad
        assert (got[j] - want).norm() <= 1e-13 * want.norm(), j


@pytest.mark.parametrize("path", ["forward_at", "delta"])
@pytest.mark.parametrize("key", list(LAYOUTS))
def test_perturbed_pass_of_one_norm_matches_a_loop_over_groups(key, path, monkeypatch):
    """Group j's positions see w + e_j: the output at those positions, `.grad` and the input's gradient after the
    backward, against the module run on each group's positions with its weight set to w + e_j.

    The rule computes (w + e_j) ⊙ x̂ directly (`forward_at`), so the output gradient crosses the module's float32
    round trip as one product δ ⊙ (w + e_j), as in the loop: the input gradient is the loop's to float64 rounding.
    Its `delta` (the module's output plus e_j ⊙ x̂, checked here too) rounds δ ⊙ w and δ ⊙ e_j to float32 apart:
    the input gradient is then only float32-close (it left test_vectorized.py's float64 Llama 1e-7 off)."""
    if path == "delta":
        without = dataclasses.replace(_norm_rule(), forward_at=None)
        monkeypatch.setattr(vectorized.registry, "FORWARD_RULES", [(vectorized._computes_like_llama_rms_norm, without)])
    norm, x, weights, layout = _norm_and_batch(key)
    e = torch.randn(layout.k, WIDTH, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 0.1
    vec = Vectorizer(norm, [norm.weight])
    x.requires_grad_(True)
    with vec.perturbed(layout, [e]):
        out = norm(x)
        (out * weights).sum().backward()
    want_grad = torch.zeros_like(norm.weight)
    input_rtol = 1e-13 if path == "forward_at" else 1e-6
    for j, index in enumerate(_group_slices(layout)):
        ref_norm = copy.deepcopy(norm)
        with torch.no_grad():
            ref_norm.weight += e[j]
        ref_norm.weight.grad = None
        ref_x = _take(x, layout, index).detach().requires_grad_(True)
        ref_out = ref_norm(ref_x)
        (ref_out * _take(weights, layout, index)).sum().backward()
        want_grad += ref_norm.weight.grad
        assert (_take(out, layout, index) - ref_out).abs().max() <= 1e-13 * ref_out.abs().max(), j
        input_error = (_take(x.grad, layout, index) - ref_x.grad).norm() / ref_x.grad.norm()
        assert input_error <= input_rtol, (j, input_error.item())
    assert (norm.weight.grad - want_grad).norm() <= 1e-13 * want_grad.norm()


def _bf16_model(weights_dtype: torch.dtype) -> nn.Module:
    """Linear -> LlamaRMSNorm -> Linear: under autocast the norm gets a bf16 input (a Linear's output)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(WIDTH, WIDTH), LlamaRMSNorm(WIDTH), nn.Linear(WIDTH, 4)).to(weights_dtype)
    with torch.no_grad():
        model[1].weight.normal_(1.0, 0.5)
    return model


def _group_grads_and_grad(model, x, layout, e, autocast: bool):
    vec = Vectorizer(model, list(model.parameters()))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        with vec.capture(layout) as cap:
            loss = model(x).float().square().sum()
        grads = cap.group_gradients(loss)
        with vec.perturbed(layout, e):
            model(x).float().square().sum().backward()
    return [g.float() for g in grads], [p.grad.float() for p in model.parameters()], vec


@pytest.mark.parametrize("weights_dtype, autocast", [(torch.float32, True), (torch.bfloat16, False)])
def test_bf16_matches_the_fallback(weights_dtype, autocast, monkeypatch):
    """bf16 autocast (fp32 weights, the norm's input bf16: its output fp32) and bf16 weights (all bf16): the rule's
    per-group gradients and perturbed `.grad` as the torch.func fallback gives them, within bf16 rounding."""
    layout = GroupLayout.rows([3, 3, 1])
    x = torch.randn(7, 5, WIDTH, generator=torch.Generator().manual_seed(1)).to(weights_dtype)
    model = _bf16_model(weights_dtype)
    twin = copy.deepcopy(model)
    e = [torch.randn(layout.k, *p.shape, generator=torch.Generator().manual_seed(2)).to(p.dtype) * 0.05
         for p in model.parameters()]
    got = _group_grads_and_grad(model, x, layout, e, autocast)
    assert got[2].fallback_modules() == []
    monkeypatch.setattr(vectorized.registry, "FORWARD_RULES", [])  # no rule for the norm: the fallback runs it
    want = _group_grads_and_grad(twin, x, layout, e, autocast)
    assert want[2].fallback_modules() == ["1 (LlamaRMSNorm)"]
    for a, b in zip(got[0] + got[1], want[0] + want[1]):
        assert (a - b).norm() <= 2e-2 * b.norm()


# ---------------------------------------------------------------------------------------------
# Whole models: the vectorized step against the sequential one
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def float64_rule_without_float32(monkeypatch):
    """float64 without transformers' float32 islands, the norms still on the rule.

    The sequential and vectorized steps scale each micro-batch's output gradients differently before the norm's
    float32 round trip rounds them (a token mean, then a weight c_j, against one weighted sum), so that rounding
    differs at every element and the float64 paths end 1e-7 apart (measured on test_vectorized_arch.py's Llama,
    SAM, k = 2: 1.27e-7, with the rule as with the torch.func fallback before it). So, as in test_vectorized_arch.py, the norms' forward is patched to the same
    formula in the input's dtype (and eager attention's softmax keeps float64); that forward is not Llama's code, so
    the rule for it is registered here: the same rule, normalizing in the input's dtype. The float32 round trip of
    the shipped rule is checked bitwise-close above (one norm, float64) and by the float32 matrix below."""
    from transformers.models.mistral import modeling_mistral

    arch.without_float32_casts(monkeypatch)  # Llama's and Qwen2's norms, and the softmax
    monkeypatch.setattr(modeling_mistral.MistralRMSNorm, "forward", arch._rms_norm_in_input_dtype)

    def patched(module):
        return type(module).forward is arch._rms_norm_in_input_dtype and module.weight.dim() == 1

    monkeypatch.setattr(vectorized.registry, "FORWARD_RULES", [(patched, vectorized.llama_rms_norm_rule(None))])


def _compare(family: str, method: str, k: int, dtype: torch.dtype) -> float:
    n, m = arch.CUTS[k]
    model = _decoder(family, dtype)
    model.train()
    assert Vectorizer(model, list(model.parameters())).fallback_modules() == []  # the norms are on the rule
    setup = arch._sft(model, n)
    twin = copy.deepcopy(model)
    want = arch.msam_grads(setup, twin, "off", m, **arch.METHODS[method])
    got = arch.msam_grads(setup, model, "on", m, **arch.METHODS[method])
    norm_grads = [w for (name, _), w in zip(model.named_parameters(), want) if "norm" in name]
    assert all(w.abs().sum() > 0 for w in norm_grads)
    return max(arch.relative_errors(got, want))


@pytest.mark.parametrize("k", sorted(arch.CUTS))
@pytest.mark.parametrize("method", list(arch.METHODS))
@pytest.mark.parametrize("family", ["Llama", "Qwen2", "Mistral"])
def test_float64(family, method, k, float64_rule_without_float32):
    assert _compare(family, method, k, torch.float64) <= arch.RTOL[torch.float64]


@pytest.mark.parametrize("k", sorted(arch.CUTS))
@pytest.mark.parametrize("method", list(arch.METHODS))
@pytest.mark.parametrize("family", ["Llama", "Qwen2", "Mistral"])
def test_float32(family, method, k):
    assert _compare(family, method, k, torch.float32) <= arch.RTOL[torch.float32]
