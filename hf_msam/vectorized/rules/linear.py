"""nn.Linear (y = W x + b) and GPT-2's Conv1D (y = xᵀ W + b, the weight stored [in, out]):

    g_W,j = Σ_{i∈B_j} δ_i x_iᵀ (one bmm over groups),   g_b,j = Σ_{i∈B_j} δ_i

The perturbed pass computes the output directly as one bmm with W + e_j (`perturbed_matmul`)."""

from __future__ import annotations

from torch import nn

from ..matmul import _matmul_delta, _matmul_group_grad, _perturbed_matmul
from ..registry import Rule, register_rule


def _linear_forward_at(module, x, e, pos):
    if "weight" not in e:
        return None  # only the bias moves: Δ = e_b,j is cheap
    return _perturbed_matmul(x, module.weight, module.bias, e["weight"], e.get("bias"), pos, transposed=False)


def _conv1d_forward_at(module, x, e, pos):
    if "weight" not in e:
        return None
    return _perturbed_matmul(x, module.weight, module.bias, e["weight"], e.get("bias"), pos, transposed=True)


def _linear_group_grad(module, x, delta, pos, wanted):
    out = {}
    if "weight" in wanted:
        out["weight"] = _matmul_group_grad(x, delta, pos, transposed=False)
    if "bias" in wanted:
        out["bias"] = pos.group_sum(delta, 1)
    return out


def _linear_delta(module, x, out, e, pos):
    return _matmul_delta(x, out, e.get("weight"), e.get("bias"), pos, transposed=False)


def _conv1d_group_grad(module, x, delta, pos, wanted):
    out = {}
    if "weight" in wanted:  # GPT-2's Conv1D keeps its weight as [in, out]
        out["weight"] = _matmul_group_grad(x, delta, pos, transposed=True)
    if "bias" in wanted:
        out["bias"] = pos.group_sum(delta, 1)
    return out


def _conv1d_delta(module, x, out, e, pos):
    return _matmul_delta(x, out, e.get("weight"), e.get("bias"), pos, transposed=True)


register_rule(nn.Linear, Rule(("weight", "bias"), _linear_group_grad, _linear_delta, forward_at=_linear_forward_at))
try:
    from transformers.pytorch_utils import Conv1D
except ImportError:  # transformers is a dependency, but the rules do not need it
    pass
else:
    register_rule(Conv1D, Rule(("weight", "bias"), _conv1d_group_grad, _conv1d_delta, forward_at=_conv1d_forward_at))
