"""Tensor helpers shared by the methods and the engine. None of them leaves the device.

Under FSDP2 each rank holds a shard of every vector a rule sees: the engine sets the process group the shards are
spread over (`SHARD_GROUP`), and norms and dot products then sum over all shards, one all-reduce each. It also sets
the sharded parameters themselves (`SHARDED_PARAMS`): the optimizer's state (Momentum-SAM's momentum) is keyed by
those.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

SHARD_GROUP: contextvars.ContextVar[Any] = contextvars.ContextVar("msam_shard_group", default=None)
SHARDED_PARAMS: contextvars.ContextVar[Any] = contextvars.ContextVar("msam_sharded_params", default=None)


@contextlib.contextmanager
def scoped(var: contextvars.ContextVar, value: Any):
    token = var.set(value)
    try:
        yield
    finally:
        var.reset(token)


def sum_over_shards(x: torch.Tensor) -> torch.Tensor:
    group = SHARD_GROUP.get()
    if group is not None:
        dist.all_reduce(x, group=group)  # a collective, not a host sync
    return x


def global_norm(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """‖(t_1, ..., t_m)‖₂ over all tensors (all shards, under FSDP2), accumulated in at least float32."""
    dtype = functools.reduce(torch.promote_types, {t.dtype for t in tensors}, torch.float32)
    norms = torch._foreach_norm(tensors, 2, dtype=dtype)
    device = tensors[0].device
    norm = torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]))
    if SHARD_GROUP.get() is None:
        return norm
    return sum_over_shards(norm.square()).sqrt()  # ‖t‖² is the sum of the shards' ‖t_shard‖²


def group_norms(stacked: Sequence[torch.Tensor]) -> torch.Tensor:
    """[k]: ‖(t_1[j], ..., t_m[j])‖₂ for every j of tensors stacked [k, ...] (one reduction per tensor, not k),
    accumulated in at least float32. Not for FSDP2 shards (the vectorized step never sees them)."""
    dtype = functools.reduce(torch.promote_types, {t.dtype for t in stacked}, torch.float32)
    k = stacked[0].shape[0]
    per_tensor = [torch.linalg.vector_norm(t.reshape(k, -1), dim=1, dtype=dtype) for t in stacked]
    return torch.linalg.vector_norm(torch.stack(per_tensor), dim=0)


def dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    """⟨a, b⟩ over all tensors (all shards, under FSDP2), accumulated in at least float32."""
    dtype = functools.reduce(torch.promote_types, {t.dtype for t in a}, torch.float32)
    device = a[0].device
    return sum_over_shards(torch.stack([torch.sum(x.to(dtype) * y.to(dtype)).to(device) for x, y in zip(a, b)]).sum())


def usable(norm: torch.Tensor) -> torch.Tensor:
    """True (a 0-d tensor) when a gradient with this norm has a direction: finite and not zero (davda54/sam#14)."""
    return torch.isfinite(norm) & (norm > 0)


def scale_to_radius(
    d: list[torch.Tensor], norm: torch.Tensor, rho: float | torch.Tensor, eps: float, ok: torch.Tensor,
    finite: bool = False,
) -> list[torch.Tensor]:
    """d ← ρ·d/(‖d‖ + eps) in place, or d ← 0 when `ok` is False: the perturbation, in the storage of d.
    `finite`: the caller knows d holds no inf or nan (then 0·d is 0 already)."""
    zero = torch.zeros((), dtype=norm.dtype, device=norm.device)
    scale = torch.where(ok, rho / (norm + eps), zero)  # never a division by zero, never a sync
    torch._foreach_mul_(d, scale)
    if not finite:
        # A skipped d may hold inf/nan, and 0·inf is nan: make it exactly 0 (a no-op when ok). One launch per
        # tensor: torch has no fused nan_to_num, and no fused arithmetic turns nan into 0.
        for t in d:
            t.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
    return d


def as_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t in `dtype`; t itself when it is already (no call into torch: the step calls this per tensor)."""
    return t if t.dtype == dtype else t.to(dtype)


class GroupFactor:
    """A [k] factor, broadcast against tensors stacked [k, ...]: `of(t)` is f in t's dtype, shaped [k, 1, ..., 1] for
    t's dims, formed once per (dtype, dims) rather than once per tensor."""

    def __init__(self, f: torch.Tensor):
        self.f, self._shaped = f, {}

    def of(self, t: torch.Tensor) -> torch.Tensor:
        key = (t.dtype, t.dim())
        found = self._shaped.get(key)
        if found is None:
            found = self._shaped[key] = as_dtype(self.f, t.dtype).view(-1, *[1] * (t.dim() - 1))
        return found


def scale_groups_to_radius(
    d: list[torch.Tensor], norms: torch.Tensor, rho: float | torch.Tensor, eps: float, ok: torch.Tensor
) -> list[torch.Tensor]:
    """`scale_to_radius` for every j of tensors stacked [k, ...] at once: d[j] ← ρ·d[j]/(‖d_j‖ + eps), or 0 where
    ok[j] is False (norms and ok of shape [k])."""
    scale = GroupFactor(torch.where(ok, rho / (norms + eps), torch.zeros_like(norms)))
    torch._foreach_mul_(d, [scale.of(t) for t in d])
    for t in d:
        t.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)  # a skipped d_j may hold inf/nan (see scale_to_radius)
    return d


def copies(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Copies of `tensors`, made by one `_foreach_copy_` (a fused launch on a GPU, not one per tensor)."""
    out = [torch.empty_like(t) for t in tensors]
    torch._foreach_copy_(out, list(tensors))
    return out


def blend(on: torch.Tensor, a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """`on ? a : b` for every tensor, `on` a 0-d bool on the device, in three fused launches instead of one
    `torch.where` per tensor: on·a + (1 − on)·b, which is a or b exactly when both are finite (x·1 + y·0 = x)."""
    weight = on.to(a[0].dtype)
    out = torch._foreach_mul(list(a), weight)
    torch._foreach_add_(out, torch._foreach_mul(list(b), 1 - weight))
    return out


def like(state: list[torch.Tensor], tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Saved state on the device and in the dtype of the tensors it goes with (a no-op once it is)."""
    return [s.to(device=t.device, dtype=t.dtype) for s, t in zip(state, tensors)]


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (a view that shares its storage); any other tensor as it is."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def weight_dtype(device: torch.device) -> torch.dtype:
    """The dtype micro-batch weights are computed in: float64, float32 on MPS (which has no float64)."""
    return torch.float32 if device.type == "mps" else torch.float64


def device_scalar(x: float | torch.Tensor, device: torch.device) -> torch.Tensor:
    """`x` (a Python number or a tensor with one element) as a 0-d tensor in `weight_dtype` on `device`. Python
    numbers go straight to float64 (through float32 they would round), with torch.full: torch.tensor would copy
    from the host and wait for the device."""
    dtype = weight_dtype(device)
    if isinstance(x, torch.Tensor):
        return x.to(device=device, dtype=dtype).reshape(())
    return torch.full((), float(x), dtype=dtype, device=device)


def divide_where_positive(a: float | torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a / b where b > 0, else 0, decided on the device (a zero count or weight gives 0, not 0/0)."""
    positive = b > 0
    return torch.where(positive, a / torch.where(positive, b, torch.ones_like(b)), torch.zeros_like(b))


def weighted(loss: torch.Tensor, c: float | torch.Tensor | None) -> torch.Tensor:
    """c·loss in the loss's dtype (c None: the whole batch, weight 1)."""
    if c is None:
        return loss
    return loss * (c.to(loss.dtype) if isinstance(c, torch.Tensor) else c)


def unaliased(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """`tensors`, each one that shares storage with an earlier one replaced by a copy.

    `torch.autograd.grad` may return gradients that alias each other: with a batch of one row, ViT's cls_token gets
    a view into the gradient it also returns for position_embeddings (the sum over the batch of a broadcast is then
    no copy). The rules scale gradients in place, which would then scale the shared storage twice. Reads storage
    addresses only (metadata): no host sync."""
    seen: set[int] = set()
    out = []
    for t in tensors:
        if type(t) is torch.Tensor and t.numel():  # tensor subclasses (DTensor) keep their own storage rules
            address = t.untyped_storage().data_ptr()
            if address in seen:
                t = t.clone()
            seen.add(address)
        out.append(t)
    return out
