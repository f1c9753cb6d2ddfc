"""nn.LayerNorm (y = x̂ ⊙ γ + β) and nn.RMSNorm (y = x̂ ⊙ γ): g_γ,j = Σ_{i∈B_j} δ_i ⊙ x̂_i, g_β,j = Σ_{i∈B_j} δ_i,
x̂ recomputed; the perturbed pass adds x̂ ⊙ e_γ,j + e_β,j."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from ..registry import Rule, register_rule


def _normalized(module, x, dtype):
    """x̂, the norm's output without its affine parameters, in `dtype`."""
    if isinstance(module, nn.LayerNorm):
        return F.layer_norm(x.to(dtype), module.normalized_shape, None, None, module.eps)
    return F.rms_norm(x.to(dtype), module.normalized_shape, None, module.eps)


def _norm_group_grad(module, x, delta, pos, wanted):
    n = len(module.normalized_shape)
    out = {}
    if "weight" in wanted:
        out["weight"] = pos.group_sum(delta * _normalized(module, x, delta.dtype), n)
    if "bias" in wanted:
        out["bias"] = pos.group_sum(delta, n)
    return out


def _norm_delta(module, x, out, e, pos):
    g = pos.group_ids(x.dim() - len(module.normalized_shape))  # e[g]: each position's e_j, over the normalized dims
    d = 0
    if "weight" in e:
        d = _normalized(module, x, out.dtype) * e["weight"].to(out.dtype)[g]
    if "bias" in e:
        d = d + e["bias"].to(out.dtype)[g]
    return d


register_rule(nn.LayerNorm, Rule(("weight", "bias"), _norm_group_grad, _norm_delta))
register_rule(nn.RMSNorm, Rule(("weight",), _norm_group_grad, _norm_delta))
