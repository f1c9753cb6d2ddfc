"""The grouped matmuls of Linear-like layers: per-group gradients Σ_{i∈B_j} δ_i x_iᵀ, the extra output e_j x_i, and
the perturbed matmul y_j = x_j (W + e_j)ᵀ for every group in one bmm, at the cost of the plain layer (its backward
rebuilds W + e_j instead of keeping k copies). Flat-LoRA's per-group noisy base layers use the same matmul."""

from __future__ import annotations

import torch

from ..integrations.torch_internals import will_compute_gradient
from ..ops import as_dtype
from .layout import Positions

__all__ = ["compute_dtype", "perturbed_matmul"]


def _matmul_group_grad(x: torch.Tensor, delta: torch.Tensor, pos: Positions, transposed: bool) -> torch.Tensor:
    """Σ_{i∈B_j} δ_i x_iᵀ for every j ([k, out, in]), or its transpose ([k, in, out], GPT-2's Conv1D)."""
    a = pos.as_groups(as_dtype(x, delta.dtype))  # [k, m, in], m = r · (positions per row)
    d = pos.as_groups(delta, zero_pad=True)  # [k, m, out]; padding slots are zero
    return torch.bmm(a.transpose(1, 2), d) if transposed else torch.bmm(d.transpose(1, 2), a)


def _matmul_delta(x: torch.Tensor, out: torch.Tensor, e_w, e_b, pos: Positions, transposed: bool) -> torch.Tensor:
    """Δ_i = e_W,j x_i + e_b,j for position i of group j (e_W stored [k, in, out] when `transposed`)."""
    a = pos.as_groups(as_dtype(x, out.dtype))  # [k, m, in]
    d = a.new_zeros(()).expand(*a.shape[:2], out.shape[-1])
    if e_w is not None:
        e_w = e_w.to(out.dtype)
        d = torch.bmm(a, e_w if transposed else e_w.transpose(1, 2))  # [k, m, out]
    if e_b is not None:
        d = d + e_b.to(out.dtype).unsqueeze(1)
    return pos.from_groups(d, x)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul with input x runs in: autocast's, for the inputs autocast casts (not float64)."""
    device = x.device.type
    if x.is_floating_point() and x.dtype != torch.float64 and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


def _perturbed_weight(w: torch.Tensor, e, transposed: bool, dtype: torch.dtype) -> torch.Tensor:
    """W + e_j for every j, as [k, in, out] (the right operand of x_j @ ·), in the compute dtype. `e` is the stacked
    [k, *W.shape] perturbation, or a callable that forms the stacked W + e_j itself in W's dtype (Flat-LoRA's noise,
    drawn again from its seeds)."""
    w_e = as_dtype(w + e if isinstance(e, torch.Tensor) else e(w), dtype)
    return w_e if transposed else w_e.transpose(1, 2)


# On a CPU, where adding W + e_j again is a pass through memory as long as the matmul itself on a mid-size layer,
# a layer keeps its stacked W + e_j for the backward when they take at most this many bytes. On a GPU, where
# memory is what limits and the addition is nearly free, it always forms them again.
KEEP_ON_CPU_BYTES = 64 << 20


class _PerturbedMatmul(torch.autograd.Function):
    """y_j = x_j (W + e_j)ᵀ for all groups j in one bmm; x: [k, m, in], W: [out, in] ([in, out] when `transposed`).

    Autograd would keep the k perturbed copies W + e_j alive until the backward; this keeps W and e and adds them
    again there (on a CPU, see `KEEP_ON_CPU_BYTES`, it keeps them). The gradient for W is Σ_j y_jᵀ-gradient · x_j
    over all groups: one matmul, as for a plain layer. x is kept only when a gradient for W or e will need it (a
    frozen base layer under LoRA keeps none).
    """

    @staticmethod
    def forward(ctx, x, w, e, transposed, dtype, b=None, e_b=None):
        keep_x = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        tensor_e = isinstance(e, torch.Tensor)
        w_e = _perturbed_weight(w, e, transposed, dtype)
        keep = ctx.needs_input_grad[0] and w.device.type == "cpu" and w_e.numel() * w_e.element_size() <= KEEP_ON_CPU_BYTES
        ctx.save_for_backward(x if keep_x else None, w, e if tensor_e else None, w_e if keep else None)
        ctx.transposed, ctx.dtype, ctx.form = transposed, dtype, None if tensor_e else e
        if b is None:
            return torch.bmm(x, w_e)
        # the bias (b, or b + e_b,j for group j, added in b's dtype) added by the matmul itself: one pass less
        ctx.b_dtype, ctx.e_b_dtype = b.dtype, None if e_b is None else e_b.dtype
        bias = as_dtype(b if e_b is None else b + e_b, dtype)
        return torch.baddbmm(bias.view(-1, 1, bias.shape[-1]), x, w_e)

    @staticmethod
    def backward(ctx, dy):
        x, w, e, w_e = ctx.saved_tensors
        e = e if ctx.form is None else ctx.form
        dx = dw = de = db = de_b = None
        if ctx.needs_input_grad[0]:
            if w_e is None:
                w_e = _perturbed_weight(w, e, ctx.transposed, ctx.dtype)
            dx = torch.bmm(dy, w_e.transpose(1, 2))
        if will_compute_gradient(ctx, 1):  # not in a capture, whose autograd.grad asks for the groups' parts only
            dy_flat, x_flat = dy.flatten(0, 1), x.flatten(0, 1)  # padding slots have dy = 0: they add nothing
            dw = as_dtype(x_flat.t().mm(dy_flat) if ctx.transposed else dy_flat.t().mm(x_flat), w.dtype)
        if will_compute_gradient(ctx, 2):  # e requiring grad: its gradient is each group's own
            de = (torch.bmm(x.transpose(1, 2), dy) if ctx.transposed else torch.bmm(dy.transpose(1, 2), x)).to(e.dtype)
        if ctx.needs_input_grad[5]:
            db = as_dtype(dy.sum((0, 1)), ctx.b_dtype)  # padding slots have dy = 0
        if ctx.needs_input_grad[6]:  # e_b requiring grad (a probe): each group's own
            de_b = as_dtype(dy.sum(1), ctx.e_b_dtype)
        return dx, dw, de, None, None, db, de_b


def _perturbed_matmul(x, w, b, e_w, e_b, pos: Positions, transposed: bool) -> torch.Tensor:
    """The output at w + e_j of a Linear (or Conv1D): (W + e_j) x_i + b + e_b,j for position i of group j, at the cost
    of the plain layer (Δ = e_j x_i alone would cost as much as the layer again, forward and backward)."""
    dtype = _compute_dtype(x)
    xg = as_dtype(pos.as_groups(x), dtype)  # [k, m, in]; padding repeats a real position, its output is dropped
    return pos.from_groups(_PerturbedMatmul.apply(xg, w, e_w, transposed, dtype, b, e_b), x)  # e_b: only with b


compute_dtype = _compute_dtype
perturbed_matmul = _perturbed_matmul
