"""nn.Conv2d (y = W ⋆ x + b), every group j in one convolution: the k groups side by side as the convolution's own
groups (rows [k, r, C, H, W] → [r, k·C, H, W], weights [k·O, C/g, kh, kw], groups = k·g):

    g_W,j = Σ_{i∈B_j} δ_i ⋆ x_i     (the weight gradient of that grouped convolution)
    g_b,j = Σ_{i∈B_j, pixels} δ_i
    y_i   = (W + e_j) ⋆ x_i + b + e_b,j   for row i of group j (one grouped convolution at w + e_j)

A ViT's patch embedding is such a layer."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import Rule, register_rule


def _conv_refuse(module: nn.Conv2d) -> str | None:
    if module.padding_mode != "zeros":
        return f"padding_mode={module.padding_mode!r} pads outside the convolution"
    if isinstance(module.padding, str):
        return f"padding={module.padding!r} (the rule takes numeric padding)"
    return None


def _side_by_side(x: torch.Tensor, pos) -> tuple[torch.Tensor, int]:
    """[B, C, H, W] → [r, k·C, H, W]: group j's rows in channels j·C..(j+1)·C - 1; and r."""
    xg = pos.grouped(x)  # [k, r, C, H, W]; padding slots repeat a real row
    k, r = xg.shape[:2]
    return xg.transpose(0, 1).reshape(r, k * xg.shape[2], *xg.shape[3:]), r


def _back_to_rows(y: torch.Tensor, pos, k: int) -> torch.Tensor:
    """[r, k·O, H', W'] → [B, O, H', W'] (the padding slots dropped)."""
    r = y.shape[0]
    return pos.ungrouped(y.view(r, k, -1, *y.shape[2:]).transpose(0, 1))


def _grouped_conv(module, x, weight, bias, pos) -> torch.Tensor:
    """Row i of group j convolved with weight[j] (+ bias[j]): weight [k, O, C/g, kh, kw], bias [k, O] or None."""
    k = weight.shape[0]
    xs, _ = _side_by_side(x.to(weight.dtype), pos)
    y = F.conv2d(xs, weight.flatten(0, 1), None if bias is None else bias.flatten(), module.stride, module.padding,
                 module.dilation, k * module.groups)  # fmt: skip
    return _back_to_rows(y, pos, k)


def _conv_forward_at(module, x, e, pos):
    if torch.is_autocast_enabled(x.device.type):
        return None  # the Δ path keeps the dtype autocast gives the layer
    weight = module.weight + e["weight"] if "weight" in e else module.weight.expand(pos.k, *module.weight.shape)
    bias = module.bias
    if bias is not None:
        bias = bias + e["bias"] if "bias" in e else bias.expand(pos.k, *bias.shape)
    return _grouped_conv(module, x, weight, bias, pos)


def _conv_delta(module, x, out, e, pos):
    d = 0
    if "weight" in e:
        d = _grouped_conv(module, x, e["weight"].to(out.dtype), None, pos)
    if "bias" in e:
        d = d + e["bias"].to(out.dtype)[pos.group_ids(1)].view(-1, out.shape[1], 1, 1)
    return d


def _conv_group_grad(module, x, delta, pos, wanted):
    out = {}
    k = pos.k
    if "weight" in wanted:
        xs, _ = _side_by_side(x.to(delta.dtype), pos)
        ds, _ = _side_by_side(delta, _ZeroPadded(pos))
        w = module.weight
        g = torch.nn.grad.conv2d_weight(xs, (k * w.shape[0], *w.shape[1:]), ds, module.stride, module.padding,
                                        module.dilation, k * module.groups)  # fmt: skip
        out["weight"] = g.view(k, *w.shape)
    if "bias" in wanted:
        out["bias"] = pos.group_sum(delta.sum((2, 3)), 1)
    return out


class _ZeroPadded:
    """`pos` whose `grouped` zero-pads (output gradients: a padding slot must add nothing)."""

    def __init__(self, pos):
        self.pos = pos

    def grouped(self, t):
        return self.pos.grouped(t, zero_pad=True)


register_rule(nn.Conv2d, Rule(("weight", "bias"), _conv_group_grad, _conv_delta, _conv_refuse, forward_at=_conv_forward_at))
