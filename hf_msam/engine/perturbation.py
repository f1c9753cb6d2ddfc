"""Forming e_j, written once for every strategy: the rule's perturbation from g_j (its norm, scaling, ASAM,
preconditioning: `PerturbationRule.perturb`), with FSDP2's sharded norms, the synchronized scope's union gradients,
and the step's statistics.

    g_j ← Σ_r a_r,j·g_r,j / Σ_r a_r,j      synchronized scope: the union over devices of their j-th micro-batches
    e_j  = rule(g_j, ρ)                     SAM: ρ·g_j/‖g_j‖; skipped (0) when g_j is zero, non-finite or overflowed
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from ..methods.base import PerturbationRule
from ..ops import GroupFactor, SHARD_GROUP, SHARDED_PARAMS, device_scalar, divide_where_positive, scoped
from .interface import Engine


__all__ = ["ascent_gradient_of", "own_gradient", "perturb", "perturb_groups", "per_micro_batch", "union_gradient",
           "union_group_gradients"]


def perturb(engine: Engine, targets: list[torch.Tensor], g: list[torch.Tensor] | None, rho: Any,
            params: list[torch.Tensor]) -> list[torch.Tensor] | None:  # fmt: skip
    """e_j for `targets` (the parameters, or under FSDP2 this rank's shards of them) from g_j (None for rules
    without a clean pass, Momentum-SAM); counted in the engine's statistics. May return e_j in g's storage."""
    fsdp2 = engine.fsdp2
    with scoped(SHARD_GROUP, engine.group(params) if fsdp2 else None), scoped(SHARDED_PARAMS, params if fsdp2 else None):
        e, grad_norm, ok = engine.perturbation.perturb(targets, g, rho)
    engine.stats.count(grad_norm, ok)
    return e


def forms_groups(rule: Any) -> bool:
    """True when the rule forms all k perturbations at once (`PerturbationRule.perturb_groups`) and that form belongs
    to its `perturb`: defined by the class that defines `perturb`,
    or by a subclass of it (a subclass that changes `perturb` alone must not inherit its parent's group rule)."""
    mro = type(rule).__mro__
    owner = {name: next(i for i, cls in enumerate(mro) if name in vars(cls)) for name in ("perturb", "perturb_groups")}
    return owner["perturb_groups"] <= owner["perturb"] and owner["perturb_groups"] < mro.index(PerturbationRule)


def perturb_groups(engine: Engine, g: list[torch.Tensor], rho: Any, params: list[torch.Tensor]) -> list[torch.Tensor] | None:
    """e_j for all k micro-batches at once from g stacked [k, ...], for a rule that `forms_groups`; counted in the
    statistics. May return e in g's storage."""
    e, norms, ok = engine.perturbation.perturb_groups(params, g, rho)
    engine.stats.count_groups(norms, ok)
    return e


def per_micro_batch(parts: list[torch.Tensor], c: list[float | torch.Tensor]) -> list[torch.Tensor]:
    """g_j = part_j / c_j, in place on tensors stacked [k, ...]: the whole batch's loss is Σ_j c_j·L_j, so micro-batch
    j's part of its gradient is c_j·g_j (a micro-batch with c_j = 0, no counted token, gets g_j = 0: skipped)."""
    c_t = torch.stack([device_scalar(w, parts[0].device) for w in c])
    inverse = GroupFactor(divide_where_positive(torch.ones_like(c_t), c_t))
    torch._foreach_mul_(parts, [inverse.of(t) for t in parts])  # one call: [k, 1, ..] broadcast against each tensor
    return parts


def own_gradient(part: list[torch.Tensor], c_j: float | torch.Tensor) -> list[torch.Tensor]:
    """g_j = part_j / c_j, in place, for one micro-batch's tensors (see `per_micro_batch`)."""
    c = device_scalar(c_j, part[0].device)
    inverse = divide_where_positive(torch.ones_like(c), c)
    torch._foreach_mul_(part, inverse.to(part[0].dtype))
    return part


def ascent_gradient_of(engine: Engine, loss: torch.Tensor, params: list[torch.Tensor], a: Any) -> list[torch.Tensor]:
    """g_j of one micro-batch: this device's own, or (synchronized scope) the union's, device r weighing a_r."""
    if not engine.sync_perturbation:
        return engine.ascent_gradient(loss, params)
    return union_gradient(engine, loss, params, a)


def union_gradient(engine: Engine, loss: torch.Tensor, params: list[torch.Tensor], a: Any) -> list[torch.Tensor]:
    """Synchronized scope: g_j of the union over devices of their j-th micro-batches, on every device.

    Device r weighs a_r / Σ_r a_r (see `MicroBatchSAM.backward`'s `sync_weight`), so devices whose micro-batches
    differ in size or token count weigh as in the union. Under FSDP2 the returned tensors are this rank's shards;
    otherwise whole gradients, the same on every device."""
    group = engine.group(params)
    if group is None and not engine.fsdp2:
        return engine.ascent_gradient(loss, params)  # a single process: the union is this micro-batch
    c = device_scalar(a, loss.device)
    total = c.clone()
    if group is not None:
        dist.all_reduce(total, group=group)
    if engine.fsdp2:
        # FSDP2's reduce-scatter averages over the W ranks: weigh the loss by W·c_r/Σc so the mean is Σ c_r g_r / Σ c.
        world = dist.get_world_size(group) if group is not None else 1
        return engine.sharded_ascent_gradient(loss * (c * world / total).to(loss.dtype), params)
    g = engine.ascent_gradient(loss, params)
    flat = torch.cat([t.reshape(-1) for t in g])  # one all-reduce for all tensors
    flat.mul_((c / total).to(flat.dtype))
    dist.all_reduce(flat, group=group)
    torch._foreach_copy_(g, [v.view_as(t) for v, t in zip(flat.split([t.numel() for t in g]), g)])
    return g


def union_group_gradients(engine: Engine, g: list[torch.Tensor], a: list) -> list[torch.Tensor]:
    """Synchronized scope, all k at once (stacked [k, ...]): g_j ← Σ_r a_r,j·g_r,j / Σ_r a_r,j on every device, with
    one all-reduce of the k weights and one of the stacked gradients (as `union_gradient` does for one j)."""
    group = engine.group(g)
    if group is None:
        return g  # a single process: the union is this device's micro-batch
    a_t = torch.stack([device_scalar(w, g[0].device) for w in a])
    total = a_t.clone()
    dist.all_reduce(total, group=group)
    share = divide_where_positive(a_t, total)
    flat = torch.cat([(t * share.to(t.dtype).view(-1, *([1] * (t.dim() - 1)))).reshape(-1) for t in g])
    dist.all_reduce(flat, group=group)
    return [v.view_as(t) for v, t in zip(flat.split([t.numel() for t in g]), g)]
