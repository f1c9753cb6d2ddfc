"""nn.Linear (y = W x + b) and GPT-2's Conv1D (y = xᵀ W + b, the weight stored [in, out]):

    g_W,j = Σ_{i∈B_j} δ_i x_iᵀ (one bmm over groups),   g_b,j = Σ_{i∈B_j} δ_i

The perturbed pass computes the output directly as one bmm with W + e_j (`perturbed_matmul`)."""

from __future__ import annotations

import functools

from torch import nn

from ..matmul import _matmul_delta, _matmul_group_grad, _perturbed_matmul
from ..registry import Rule, register_rule


def _forward_at(module, x, e, pos, transposed: bool):
    if "weight" not in e:
        return None  # only the bias moves: Δ = e_b,j is cheap
    return _perturbed_matmul(x, module.weight, module.bias, e["weight"], e.get("bias"), pos, transposed=transposed)


def _group_grad(module, x, delta, pos, wanted, transposed: bool):
    out = {}
    if "weight" in wanted:
        out["weight"] = _matmul_group_grad(x, delta, pos, transposed=transposed)
    if "bias" in wanted:
        out["bias"] = pos.group_sum(delta, 1)
    return out


def _delta(module, x, out, e, pos, transposed: bool):
    return _matmul_delta(x, out, e.get("weight"), e.get("bias"), pos, transposed=transposed)


def matmul_rule(transposed: bool) -> Rule:
    """The rule of y = W x + b, with W stored [out, in], or [in, out] when `transposed` (GPT-2's Conv1D)."""
    parts = {f.__name__: functools.partial(f, transposed=transposed) for f in (_forward_at, _group_grad, _delta)}
    return Rule(("weight", "bias"), parts["_group_grad"], parts["_delta"], forward_at=parts["_forward_at"])


register_rule(nn.Linear, matmul_rule(transposed=False))
try:
    from transformers.pytorch_utils import Conv1D
except ImportError:  # transformers is a dependency, but the rules do not need it
    pass
else:
    register_rule(Conv1D, matmul_rule(transposed=True))
