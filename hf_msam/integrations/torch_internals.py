"""Private names of torch the engine relies on, each in one place.

Tested with torch 2.13.0 and 2.14.1.

- `GradScaler._get_scale_async()`: the loss scale as a device tensor (`get_scale()` would make the host wait).
- FSDP2 (`torch.distributed.fsdp.fully_shard`): `FSDPModule`, and each module's `_get_fsdp_state()` with its
  parameter groups (`_fsdp_param_groups`, a list since torch 2.12; `_fsdp_param_group` before), whose
  `reduce_grads`/`all_reduce_grads` flags say whether a backward reduce-scatters.
- The autograd engine's state: `torch._C._will_engine_execute_node` (whether the backward now running reaches a
  node), `torch._C._current_autograd_node` (whether a backward node is running), and
  `torch._C._autograd._top_saved_tensors_default_hooks` (whose pack hook is torch.utils.checkpoint's inside a
  non-reentrant checkpoint region).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

TESTED = {"torch": ("2.13.0", "2.14.1")}


def missing_upstream_names() -> list[str]:
    """The private names of torch this adapter relies on that the installed torch no longer has."""
    missing = []
    if not hasattr(torch.amp.GradScaler, "_get_scale_async"):
        missing.append("torch.amp.GradScaler._get_scale_async")
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return [*missing, "torch.distributed.fsdp.FSDPModule"]
    if not hasattr(FSDPModule, "_get_fsdp_state"):
        missing.append("torch.distributed.fsdp.FSDPModule._get_fsdp_state")
    for name in ("_will_engine_execute_node", "_current_autograd_node"):
        if not hasattr(torch._C, name):
            missing.append(f"torch._C.{name}")
    if not hasattr(torch._C._autograd, "_top_saved_tensors_default_hooks"):
        missing.append("torch._C._autograd._top_saved_tensors_default_hooks")
    return missing


def scale_of(scaler: Any) -> torch.Tensor:
    """The GradScaler's current scale as a tensor on its device, without a host sync."""
    return scaler._get_scale_async()


def inverse_scale(scaler: Any) -> torch.Tensor:
    """1/scale in float32, computed in float64 so that the reciprocal of a power of two stays exact."""
    return scale_of(scaler).double().reciprocal().float()


def is_fsdp2(model: nn.Module) -> bool:
    """True when `model` (or a submodule) was sharded with FSDP2's `fully_shard`."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2
        return False
    return any(isinstance(m, FSDPModule) for m in model.modules())


def _param_groups(fsdp_state: Any) -> list:
    """The parameter groups of one FSDP2 module's state: a list since torch 2.12, at most one group before."""
    groups = getattr(fsdp_state, "_fsdp_param_groups", None)
    if groups is None:
        group = getattr(fsdp_state, "_fsdp_param_group", None)
        groups = [] if group is None else [group]
    return list(groups)


@contextlib.contextmanager
def fsdp2_reduces_every_backward(model: nn.Module):
    """Inside, every backward of an FSDP2 model reduce-scatters its gradients, even inside a `no_sync` of the
    Trainer's gradient accumulation; the flags are put back after."""
    groups = [g for m in model.modules() if hasattr(m, "_get_fsdp_state") for g in _param_groups(m._get_fsdp_state())]
    saved = [(g.reduce_grads, g.all_reduce_grads) for g in groups]
    for g in groups:
        g.reduce_grads = g.all_reduce_grads = True
    try:
        yield
    finally:
        for g, (reduce_grads, all_reduce_grads) in zip(groups, saved):
            g.reduce_grads, g.all_reduce_grads = reduce_grads, all_reduce_grads


def will_compute_gradient(ctx: Any, i: int) -> bool:
    """In a custom autograd Function's backward: whether the backward now running uses the gradient of the
    Function's input i. `ctx.needs_input_grad[i]` only says the input requires grad; `torch.autograd.grad` with
    `inputs` runs part of the graph, and an input outside that part needs no gradient. Where torch cannot say, True.
    The inputs before i must be tensors: `ctx.next_functions` has an entry per tensor input only."""
    if not ctx.needs_input_grad[i]:
        return False
    try:
        node = ctx.next_functions[i][0]
        return node is None or torch._C._will_engine_execute_node(node)
    except (AttributeError, RuntimeError):
        return True


def in_backward() -> bool:
    """True while the autograd engine runs a backward node (a forward called now is activation checkpointing's
    recomputation of a region, not a new pass)."""
    return torch._C._current_autograd_node() is not None


def in_checkpoint_region() -> bool:
    """True inside torch.utils.checkpoint's non-reentrant region (its saved-tensor hooks are on top of the stack) or
    in its recomputation. Where torch's private function is missing, False outside a backward."""
    if in_backward():
        return True
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    try:
        hooks = top(True) if top is not None else None
    except TypeError:
        return False
    pack = hooks[0] if hooks else None
    return pack is not None and "_checkpoint_hook" in getattr(pack, "__qualname__", "")
