"""Private names of torch the engine relies on, each in one place.

Tested with torch 2.13.0 and 2.14.1.

- `GradScaler._get_scale_async()`: the loss scale as a device tensor (`get_scale()` would make the host wait).
- FSDP2 (`torch.distributed.fsdp.fully_shard`): `FSDPModule`, and each module's `_get_fsdp_state()` with its
  parameter groups (`_fsdp_param_groups`, a list since torch 2.12; `_fsdp_param_group` before), whose
  `reduce_grads`/`all_reduce_grads` flags say whether a backward reduce-scatters.
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
