"""nn.LayerNorm (y = x̂ ⊙ γ + β) and nn.RMSNorm (y = x̂ ⊙ γ): g_γ,j = Σ_{i∈B_j} δ_i ⊙ x̂_i, g_β,j = Σ_{i∈B_j} δ_i,
x̂ recomputed; the perturbed pass computes x̂ ⊙ (γ + e_γ,j) + β + e_β,j (outside autocast; under it, the layer's output
plus x̂ ⊙ e_γ,j + e_β,j, in the dtype autocast gives the layer)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...ops import as_dtype
from ..registry import Rule, register_rule


def _normalized(module, x, dtype):
    """x̂, the norm's output without its affine parameters, in `dtype`."""
    if isinstance(module, nn.LayerNorm):
        return F.layer_norm(as_dtype(x, dtype), module.normalized_shape, None, None, module.eps)
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


def _norm_forward_at(module, x, e, pos):
    """The whole output at γ + e_γ,j, β + e_β,j: one normalization instead of the layer's and Δ's."""
    if torch.is_autocast_enabled(x.device.type) or not module.elementwise_affine:
        return None  # the Δ path keeps the dtype autocast gives the layer
    n = len(module.normalized_shape)
    x_hat = pos.grouped(_normalized(module, x, x.dtype))  # [k, r, *mid, *normalized]
    mid = [1] * (x_hat.dim() - 2 - n)

    def per_group(name):  # the parameter at w + e_j, [k, 1, *mid, *normalized], or at w, or None
        p = getattr(module, name, None)
        if p is None:
            return None
        p = p + e[name] if name in e else p.unsqueeze(0)
        return as_dtype(p, x.dtype).view(p.shape[0], 1, *mid, *p.shape[1:])

    weight, bias = per_group("weight"), per_group("bias")
    return pos.ungrouped(x_hat * weight if bias is None else torch.addcmul(bias, x_hat, weight))  # one pass, not two


register_rule(nn.LayerNorm, Rule(("weight", "bias"), _norm_group_grad, _norm_delta, forward_at=_norm_forward_at))
register_rule(nn.RMSNorm, Rule(("weight",), _norm_group_grad, _norm_delta, forward_at=_norm_forward_at))
