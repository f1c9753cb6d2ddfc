"""The mSAM step for a loss that compares the examples of a batch with each other (in-batch negatives, pairwise
ranking, batch-hard triplets): `MicroBatchSAM.backward_whole_batch`, the whole-batch strategy.

Such a loss is not the weighted sum of its micro-batches' losses: computed micro-batch by micro-batch, each anchor
would see only the negatives of its own micro-batch (MultipleNegativesRankingLoss over 8 pairs is ln 8 at chance,
over micro-batches of 4 it is ln 4). Here the loss is always the whole batch's, L(E) of the outputs E = (E_1, ...,
E_k) of the k micro-batches (embeddings, one row per example), and micro-batch j's rows are computed at w + e_j:

    g_j   = (1/c_j)·∇_w L(E_1(w), ..., E_k(w)) through E_j only      the micro-batch's part of the batch's gradient
    e_j   = the rule's perturbation from g_j                             (SAM: ρ·g_j/‖g_j‖)
    ∇    += ∇_w L(E_1(w + e_1), ..., E_k(w + e_k))                      each micro-batch's rows at its own w + e_j

which is what the vectorized step computes for one forward whose row group j sees w + e_j. For a loss that is the
weighted sum Σ_j c_j·L_j(E_j), g_j = ∇L_j(w) and the descent is Σ_j c_j·∇L_j(w + e_j): plain mSAM, exactly.

It is computed with cached output gradients (GradCache, Gao et al. 2021), so only one micro-batch's activations
are alive at a time: outputs without a graph first, the loss and ∂L/∂E on them, then each micro-batch again with a
graph, backpropagating ⟨E_j, ∂L/∂E_j⟩. Each replay draws the same dropout masks as the pass it repeats (the random
state is put back). Cost per micro-batch: four forward passes and two backward passes (plain mSAM: two and two);
memory: the k perturbations e_j are kept until the descent (k copies of the trainable weights, as the vectorized
step keeps them), and the outputs E.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch

from ..batches import batch_size_of, micro_batch_weights, split_batch
from ..methods.base import PerturbationRule
from ..methods.registry import REGISTRY, build_method
from .perturbation import own_gradient, perturb
from .state import modules_with_running_stats, running_stats_frozen
from .interface import Engine


__all__ = ["whole_batch_step"]


def whole_batch_methods() -> list[str]:
    """The registered methods whose rules this strategy takes (built with their defaults): a descent along the
    perturbed gradient, and a perturbation of the trainable parameters only."""
    names = []
    for name in REGISTRY:
        try:
            perturbation, descent = build_method(name)
        except Exception:  # noqa: BLE001 (a user's method that needs settings to be built: not a suggestion)
            continue
        if not (descent.explicit or descent.through_outputs) and (
            type(perturbation).perturbing is PerturbationRule.perturbing
        ):
            names.append(name)
    return names


def _rng_state(device: torch.device) -> tuple[torch.Tensor, Any]:
    """The CPU's and `device`'s random states (read on the host: no device sync)."""
    module = getattr(torch, device.type, None) if device.type != "cpu" else None
    return torch.get_rng_state(), (module.get_rng_state(device) if module is not None and hasattr(module, "get_rng_state") else None)


def _set_rng_state(state: tuple[torch.Tensor, Any], device: torch.device) -> None:
    cpu, other = state
    torch.set_rng_state(cpu)
    if other is not None:
        getattr(torch, device.type).set_rng_state(other, device)


def _flat(outputs: Any) -> list[torch.Tensor]:
    """A micro-batch's outputs as a list of tensors (one tensor, or a list/tuple of them: one per column)."""
    return [outputs] if isinstance(outputs, torch.Tensor) else list(outputs)


def _as_leaves(parts: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    """Output i of every micro-batch, concatenated along the rows, as a leaf whose gradient is ∂L/∂E_i."""
    return [torch.cat([p[i] for p in parts]).detach().requires_grad_() for i in range(len(parts[0]))]


def _surrogate(outputs: list[torch.Tensor], grads: list[torch.Tensor]) -> torch.Tensor:
    """⟨E_j, ∂L/∂E_j⟩: its gradient with respect to w is ∂L/∂E_j · ∂E_j/∂w."""
    return sum(torch.sum(o * g.to(o.dtype)) for o, g in zip(outputs, grads))


def whole_batch_step(
    engine: Engine,
    batch: Any,
    forward_fn: Callable[[Any], Any],
    loss_fn: Callable[[list[torch.Tensor]], torch.Tensor],
    size_fn: Callable[[Any], int | torch.Tensor] | None = None,
    split_fn: Callable[[Any, int | None], list[Any]] | None = None,
    *,
    step: Any = None,
    rho: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole-batch strategy (see `MicroBatchSAM.backward_whole_batch`); returns the clean and the perturbed loss, detached."""
    if engine.fsdp2 or engine.sync_perturbation:
        raise NotImplementedError(
            "A loss over the whole batch (in-batch negatives) is perturbed per device, not with synchronized "
            "perturbations or under FSDP2: drop --msam_sync_perturbation, shard with plain DDP, or set "
            "--msam_micro_batch_size None (one micro-batch per device: SAM, exact for any loss)."
        )
    if engine.descent.explicit or engine.descent.through_outputs:
        raise NotImplementedError(
            f"A loss over the whole batch (in-batch negatives) takes the descent of SAM-like methods only, not "
            f"{engine.descent!r}, which needs each micro-batch's own perturbed gradient: choose --msam_method "
            f"{' or '.join(whole_batch_methods())}, or set --msam_micro_batch_size None."
        )
    if type(engine.perturbation).perturbing is not PerturbationRule.perturbing:
        raise NotImplementedError(
            f"A loss over the whole batch (in-batch negatives) perturbs the trainable parameters only, and "
            f"{engine.perturbation!r} perturbs other weights (--msam_method flat_lora: the LoRA base weights): set "
            "--msam_micro_batch_size None (one micro-batch per device), or choose another --msam_method."
        )
    micro_batches = (split_fn or split_batch)(batch, engine.micro_batch_size)
    k = len(micro_batches)
    weights = [1.0] if k == 1 else micro_batch_weights(micro_batches, size_fn or batch_size_of)
    engine.begin_call(step, k)
    params = engine.trainable_params()
    device = params[0].device
    clean_pass = engine.perturbation.needs_gradient  # Momentum-SAM: e from the optimizer, no clean pass
    frozen = modules_with_running_stats(engine.model)  # only the first pass at w may update running statistics

    def outputs_of(j: int, grad: bool) -> list[torch.Tensor]:
        with torch.enable_grad() if grad else torch.no_grad():
            return _flat(forward_fn(micro_batches[j]))

    def loss_and_output_grads(parts: list[list[torch.Tensor]]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        leaves = _as_leaves(parts)
        with torch.enable_grad():
            loss = loss_fn(leaves)
            grads = torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True)
        sizes = [p[0].shape[0] for p in parts]  # the rows of each micro-batch, on the host
        return loss.detach(), [list(t) for t in zip(*(g.split(sizes) for g in grads))]  # [j][i]

    # 1. E_j(w) without a graph; L(E) and ∂L/∂E.
    e: list[list[torch.Tensor] | None] = []
    clean_loss = None
    if clean_pass:
        states, parts = [], []
        with engine.no_sync():
            for j in range(k):
                states.append(_rng_state(device))
                parts.append(outputs_of(j, grad=False))  # the one pass that updates running statistics
        clean_loss, grads = loss_and_output_grads(parts)
        del parts
        # 2. g_j: micro-batch j again with a graph (its dropout masks replayed), its part of the batch's gradient / c_j.
        after = _rng_state(device)
        with engine.no_sync(), running_stats_frozen(frozen):
            for j in range(k):
                _set_rng_state(states[j], device)
                g = engine.ascent_gradient(_surrogate(outputs_of(j, grad=True), grads[j]), params)
                own_gradient(g, weights[j])  # a micro-batch of weight 0: g_j = 0, skipped
                e.append(perturb(engine, params, g, rho, params))
        _set_rng_state(after, device)
        del grads
    else:
        for _ in range(k):
            e.append(perturb(engine, params, None, rho, params))

    w = [p.detach().clone() for p in params]  # restore by copy: w + e - e is not w in floating point

    @contextlib.contextmanager
    def at(j: int):
        try:
            if e[j] is not None:
                with torch.no_grad():
                    torch._foreach_add_(params, e[j])
                torch.clear_autocast_cache()  # an enclosing autocast region must not reuse casts of w
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(params, w)
            torch.clear_autocast_cache()

    # 3. E_j(w + e_j) without a graph; L and ∂L/∂E there.
    states, parts = [], []
    with engine.no_sync(), running_stats_frozen(frozen if clean_pass else []):  # Momentum-SAM: the first pass
        for j in range(k):
            states.append(_rng_state(device))
            with at(j):
                parts.append(outputs_of(j, grad=False))
    perturbed_loss, grads = loss_and_output_grads(parts)
    del parts
    # 4. .grad += Σ_j ∂L/∂E_j · ∂E_j/∂w at w + e_j, replaying each pass; only the last backward may synchronize (DDP).
    after = _rng_state(device)
    with running_stats_frozen(frozen):
        for j in range(k):
            _set_rng_state(states[j], device)
            with at(j), contextlib.nullcontext() if j == k - 1 else engine.no_sync():
                engine.backward_pass(_surrogate(outputs_of(j, grad=True), grads[j]))
            e[j] = None
    _set_rng_state(after, device)
    clean_loss = perturbed_loss if clean_loss is None else clean_loss
    engine.stats.add_losses(clean_loss, perturbed_loss)
    return clean_loss, perturbed_loss
