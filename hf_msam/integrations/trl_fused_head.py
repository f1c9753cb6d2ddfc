"""TRL's fused LM head on the vectorized step: micro-batch j's tokens scored with the head at W + e_j.

Tested with trl 1.16.0.

TRL's trainers call the model with `fused_lm_head=True` (`trl.trainer.utils.add_fused_lm_head`): its forward runs
the backbone, then `_ChunkedLogProbFunction.apply(hidden, lm_head.weight, lm_head.bias, targets, ...)` (a name of
`trl.trainer.utils`, the class `trl.kernels.ChunkedLogProbFunction`), which computes per-token log-probabilities in
tiles without the [tokens, vocab] logits, reading the head's weight outside the head's call. While a Vectorizer
context is active, the hooks here replace that name with `GroupedHead`, which runs TRL's own function group by
group (its `forward` and `backward`, with a context of ours), so each group's numbers are TRL's for that group:

- a perturbed pass: group j's tokens with W + e_j, formed for one group at a time and rebuilt in the backward (never
  k copies alive); the backward returns Σ_j of each group's weight gradient, like a plain head;
- a capture pass: every group at W, and group j's weight gradient returned as the gradient of its probe z_j
  (`hf_msam.vectorized.outside`), one [V, H] at a time.

They also set `trl.trainer.utils._use_triton` to answer False, so that the fused forward scores every position
(`hidden.reshape(-1, H)`, rows in order) rather than only the labelled ones, whose grouping the hooks could not
know; the masked positions are zeroed afterwards either way, so the outputs are the same.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from ..vectorized import outside
from .torch_internals import will_compute_gradient

TESTED = {"trl": ("1.16.0",)}


def _trl_utils():
    import trl.trainer.utils as utils

    return utils


def missing_upstream_names() -> list[str]:
    """The names of TRL these hooks rely on that the installed TRL no longer has."""
    try:
        utils = _trl_utils()
    except ImportError:
        return []
    missing = [f"trl.trainer.utils.{n}" for n in ("_ChunkedLogProbFunction", "_use_triton") if not hasattr(utils, n)]
    function = getattr(utils, "_ChunkedLogProbFunction", None)
    if function is not None and not (hasattr(function, "forward") and hasattr(function, "backward")):
        missing.append("trl.kernels.ChunkedLogProbFunction.forward/backward")
    return missing


class _Context:
    """What TRL's ChunkedLogProbFunction reads and writes on its autograd context, for one group's call."""

    def __init__(self):
        self.saved_tensors: tuple = ()
        self.needs_input_grad: tuple = ()

    def set_materialize_grads(self, value: bool) -> None:
        pass

    def save_for_backward(self, *tensors) -> None:
        self.saved_tensors = tensors

    def mark_non_differentiable(self, *tensors) -> None:
        pass


def _group_slices(layout: Any, n_tokens: int) -> list[slice | torch.Tensor] | None:
    """Each group's tokens among the n_tokens of `hidden.reshape(-1, H)` (rows in order), as slices where they are
    contiguous, else index lists (made on the host); None when the tokens do not split evenly into the layout's
    positions (the caller then takes TRL's own path)."""
    per_position, rest = divmod(n_tokens, layout.extent if layout.axis == 0 else 1)
    if rest:
        return None
    if layout.axis == 1:  # one packed row: token t is position t (the last position, with no next token, is dropped)
        limit = n_tokens
        members = [[t for t in m if t < limit] for m in layout.members]
        per_position = 1
    else:
        members = [list(m) for m in layout.members]
    out: list[slice | torch.Tensor] = []
    for m in members:
        if m and m == list(range(m[0], m[0] + len(m))):
            out.append(slice(m[0] * per_position, (m[-1] + 1) * per_position))
        else:
            out.append(torch.tensor([p * per_position + s for p in m for s in range(per_position)], dtype=torch.long))
    return out


class _GroupedHeadFunction(torch.autograd.Function):
    """TRL's ChunkedLogProbFunction run once per group: group j with weight W + e_w[j] and bias b + e_b[j] (e None:
    at W); the probes z_w, z_b (capture) get each group's gradient in their row j."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, e_w, e_b, z_w, z_b, targets, groups, original, args):
        n = hidden.shape[0]
        outs: list[torch.Tensor | None] | None = None
        contexts = []
        for j, index in enumerate(groups):
            index = index if isinstance(index, slice) else index.to(hidden.device)
            w_j, b_j = _at(weight, e_w, j), _at(bias, e_b, j)  # one group's W + e_j at a time
            sub = _Context()
            part = original.forward(sub, hidden[index], w_j, b_j, targets[index], *args)
            saved = list(sub.saved_tensors)
            saved[1] = saved[2] = None  # W + e_j and b + e_j: rebuilt in the backward, never k of them alive
            sub.saved_tensors = tuple(saved)
            contexts.append((index, sub))
            if outs is None:
                outs = [None if t is None else t.new_zeros((n, *t.shape[1:])) for t in part]
            for o, t in zip(outs, part):
                if o is not None:
                    o[index] = t
        ctx.contexts, ctx.original, ctx.n_tokens = contexts, original, n
        ctx.save_for_backward(weight, bias, e_w, e_b)
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(*(t for t in outs[2:] if t is not None))
        return tuple(outs)

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy, *_):
        weight, bias, e_w, e_b = ctx.saved_tensors
        _, needs_w, needs_b, _, _, needs_zw, needs_zb = ctx.needs_input_grad[:7]
        # logits-SAM's autograd.grad to the probes alone uses no gradient of the hidden states, which TRL's backward
        # would compute (one more [tokens, vocab] x [vocab, H] product) because they require grad.
        needs_hidden = will_compute_gradient(ctx, 0)
        grad_hidden = grad_w = grad_b = grad_zw = grad_zb = None
        k = len(ctx.contexts)
        for j, (index, sub) in enumerate(ctx.contexts):
            saved = list(sub.saved_tensors)
            saved[1], saved[2] = _at(weight, e_w, j), _at(bias, e_b, j)
            sub.saved_tensors = tuple(saved)
            sub.needs_input_grad = (needs_hidden, needs_w or needs_zw, bias is not None and (needs_b or needs_zb))
            gl = None if grad_logprobs is None else grad_logprobs[index]
            ge = None if grad_entropy is None else grad_entropy[index]
            g_hidden, g_w, g_b = ctx.original.backward(sub, gl, ge)[:3]
            sub.saved_tensors = ()
            if g_hidden is not None:
                if grad_hidden is None:
                    grad_hidden = g_hidden.new_zeros((ctx.n_tokens, *g_hidden.shape[1:]))
                grad_hidden[index] = g_hidden
            if g_w is not None:
                grad_w = (g_w.clone() if grad_w is None else grad_w.add_(g_w)) if needs_w else None
                grad_zw = _stack_into(grad_zw, g_w, j, k) if needs_zw else None
            if g_b is not None:
                grad_b = (g_b.clone() if grad_b is None else grad_b.add_(g_b)) if needs_b else None
                grad_zb = _stack_into(grad_zb, g_b, j, k) if needs_zb else None
        ctx.contexts = None
        return grad_hidden, grad_w, grad_b, None, None, grad_zw, grad_zb, None, None, None, None


def _at(w: torch.Tensor | None, e: torch.Tensor | None, j: int) -> torch.Tensor | None:
    """w + e[j] (w when there is no e), in w's dtype."""
    return w if w is None or e is None else w + e[j].to(w.dtype)


def _stack_into(total: torch.Tensor | None, part: torch.Tensor, j: int, k: int) -> torch.Tensor:
    if total is None:
        total = part.new_zeros((k, *part.shape))
    total[j] = part
    return total


class GroupedHead:
    """Stands in for `trl.trainer.utils._ChunkedLogProbFunction` while a Vectorizer context is active."""

    original: Any = None

    @classmethod
    def apply(cls, hidden, weight, bias, targets, *args):
        vectorizer = outside.active()
        call = None if vectorizer is None else vectorizer.outside_call([weight, bias])
        groups = None if call is None else _group_slices(call.layout, hidden.shape[0])
        if groups is None:
            return cls.original.apply(hidden, weight, bias, targets, *args)
        (e_w, e_b), (z_w, z_b) = call.e, call.probes
        if call.detach:
            weight = weight.detach()
            bias = None if bias is None else bias.detach()
        outs = _GroupedHeadFunction.apply(hidden, weight, bias, e_w, e_b, z_w, z_b, targets, groups, cls.original, args)
        call.record([t for t in outs if t is not None and t.requires_grad], [hidden])
        return outs


def _install() -> Callable[[], None]:
    """Put the hooks in place in trl.trainer.utils (if TRL is imported); return the undo."""
    import sys

    utils = sys.modules.get("trl.trainer.utils")
    if utils is None or not hasattr(utils, "_ChunkedLogProbFunction") or not hasattr(utils, "_use_triton"):
        return lambda: None
    found_function, found_triton = utils._ChunkedLogProbFunction, utils._use_triton
    if found_function is GroupedHead:  # nested contexts: the outer one's hooks stay
        return lambda: None
    GroupedHead.original = found_function
    utils._ChunkedLogProbFunction = GroupedHead
    utils._use_triton = _never

    def undo() -> None:
        if utils._ChunkedLogProbFunction is GroupedHead:
            utils._ChunkedLogProbFunction = found_function
        if utils._use_triton is _never:
            utils._use_triton = found_triton

    return undo


@functools.wraps(lambda device: False)
def _never(device: Any) -> bool:
    return False


outside.register_outside_reader(_install)
