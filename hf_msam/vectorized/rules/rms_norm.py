"""transformers' Llama-style RMSNorm, y = γ ⊙ x̂, x̂ normalized in float32 and cast to x's dtype:
g_γ,j = Σ_{i∈B_j} δ_i ⊙ x̂_i; the perturbed pass computes (γ + e_γ,j) ⊙ x̂ as one product.

Chosen by what the class's forward is, not by its name or type: LlamaRMSNorm and every class whose forward is the
same bytecode (Qwen2RMSNorm, MistralRMSNorm, Qwen3RMSNorm and the many others transformers generates from Llama's
code). A hub kernel that transformers' `kernelize` set on the instance for training computes the same
(`hf_msam.integrations.hub_kernels`)."""

from __future__ import annotations

import functools

import torch
from torch import nn

from ...integrations.hub_kernels import hub_kernel_forward
from ..registry import Rule, register_forward_rule


def _llama_rms_normalized(module, x: torch.Tensor, dtype: torch.dtype, norm_dtype: torch.dtype | None) -> torch.Tensor:
    """x̂ bitwise as transformers' Llama-style RMSNorm forms it (the same ops in the same order, so the same
    roundings): normalized in `norm_dtype` (float32 in transformers; None: x's own), cast back to x's dtype; then
    in `dtype`, the dtype of the module's product `self.weight * x̂` (the promotion of the weight's and x's dtypes:
    autocast leaves `*`, `pow`, `mean` and `rsqrt` alone, and they run in float32 either way)."""
    h = x if norm_dtype is None else x.to(norm_dtype)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + module.variance_epsilon)
    return h.to(x.dtype).to(dtype)


def _llama_rms_group_grad(module, x, delta, pos, wanted, norm_dtype=torch.float32):
    # autograd's gradient of `weight * x̂` for the weight: δ ⊙ x̂ in the product's dtype (δ's), summed over positions
    return {"weight": pos.group_sum(delta * _llama_rms_normalized(module, x, delta.dtype, norm_dtype), 1)}


def _llama_rms_delta(module, x, out, e, pos, norm_dtype=torch.float32):
    g = pos.group_ids(x.dim() - 1)  # e[g]: each position's e_j, over the last dim
    return _llama_rms_normalized(module, x, out.dtype, norm_dtype) * e["weight"].to(out.dtype)[g]


def _llama_rms_forward_at(module, x, e, pos, norm_dtype=torch.float32):
    """The output at w + e_j as one product (w + e_j) ⊙ x̂, as the module computes it with w + e_j written into its
    weight (in the weight's dtype). The output gradient then reaches x̂, and through the module's float32 round trip
    x, as one product δ ⊙ (w + e_j), rounded to float32 once, as in a pass at w + e_j; the module's output plus Δ
    would round δ ⊙ w and δ ⊙ e_j separately (in a float64 model that left the input gradients 1e-7 apart from
    such a pass). It also forms x̂ once instead of twice."""
    g = pos.group_ids(x.dim() - 1)
    weight = module.weight + e["weight"].to(module.weight.dtype)  # [k, d]
    return weight[g] * _llama_rms_normalized(module, x, x.dtype, norm_dtype)


def llama_rms_norm_rule(norm_dtype: torch.dtype | None = torch.float32) -> Rule:
    """The rule for y = weight ⊙ (x̂ in x's dtype), x̂ = x · rsqrt(mean(x²) + variance_epsilon) computed in
    `norm_dtype` (None: x's dtype). transformers' Llama-style norms normalize in float32; the other value is for a
    forward without the float32 round trip (the float64 tests patch one in). The perturbed pass runs `forward_at`;
    `delta` (the module's output plus Δ, which `Rule` requires) is there for a caller that drops it."""
    return Rule(
        ("weight",),
        functools.partial(_llama_rms_group_grad, norm_dtype=norm_dtype),
        functools.partial(_llama_rms_delta, norm_dtype=norm_dtype),
        forward_at=functools.partial(_llama_rms_forward_at, norm_dtype=norm_dtype),
    )


def _code_key(function) -> tuple | None:
    """What makes two plain functions compute the same, given the same globals: bytecode, constants, names. None for
    anything else (a wrapped or compiled forward, a closure)."""
    code = getattr(function, "__code__", None)
    if code is None or getattr(function, "__closure__", None) is not None:
        return None
    return code.co_code, code.co_consts, code.co_names, code.co_varnames, code.co_argcount, code.co_kwonlyargcount


_LLAMA_RMS_FORWARD: list[tuple] = []  # the reference's code key, once read


def _llama_rms_forward_key() -> tuple | None:
    """The code of transformers' LlamaRMSNorm.forward, as transformers ships it; None without transformers.

    Read on first use, and only from the function defined in modeling_llama.py itself: a forward patched onto the
    class by a test or a library (defined elsewhere) is not taken as the reference, and is not remembered either,
    so the reference is read again once the patch is gone."""
    if _LLAMA_RMS_FORWARD:
        return _LLAMA_RMS_FORWARD[0]
    try:
        from transformers.models.llama.modeling_llama import LlamaRMSNorm
    except ImportError:
        return None
    forward = LlamaRMSNorm.__dict__.get("forward")
    code = getattr(forward, "__code__", None)
    if code is None or not code.co_filename.endswith("modeling_llama.py") or code.co_qualname != "LlamaRMSNorm.forward":
        return None
    key = _code_key(forward)
    if key is not None:
        _LLAMA_RMS_FORWARD.append(key)
    return key


def _computes_like_llama_rms_norm(module: nn.Module) -> bool:
    """True for a module whose forward is, bytecode for bytecode, transformers' LlamaRMSNorm.forward (h = x in
    float32; h · rsqrt(mean(h²) + variance_epsilon); weight · h in x's dtype), with `torch` resolving to torch, a
    vector `weight` and a number `variance_epsilon`.

    Matched by code, not by name: transformers generates Qwen2RMSNorm, MistralRMSNorm, Qwen3RMSNorm and many more
    from Llama's code ("Copied from" / modular), so their forwards are the same bytecode in another file, while a
    class that computes something else (Gemma's (1 + weight), a forward patched onto the class, or overridden in a
    subclass, or set on the instance by someone) is not matched and takes the torch.func fallback. A hub kernel that
transformers' `kernelize` set on the instance for training is taken to compute the same (see
`hf_msam.integrations.hub_kernels`): the rule applies, and the capture's forward runs the kernel.
    The constants, names and variable names are compared along with the bytecode, so `keepdim`, the -1 dim and the
    attribute names are the same too."""
    forward = getattr(type(module), "forward", None)
    reference = _llama_rms_forward_key()
    if reference is None or _code_key(forward) != reference or forward.__globals__.get("torch") is not torch:
        return False
    if "forward" in module.__dict__ and not (hub_kernel_forward(module) and module.training):
        return False  # the instance computes with another forward (a hub kernel for this layer computes the same)
    weight, eps = getattr(module, "weight", None), getattr(module, "variance_epsilon", None)
    # A weight of another shape would broadcast differently from what the rule's sums over the last dim assume.
    return isinstance(weight, nn.Parameter) and weight.dim() == 1 and isinstance(eps, (int, float))


register_forward_rule(_computes_like_llama_rms_norm, llama_rms_norm_rule())
