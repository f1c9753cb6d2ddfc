"""The sequential strategy: one pass per micro-batch, in turn (the method exactly as written; any model, any loss
that is the weighted sum of its micro-batches' losses). For micro-batch j, c_j its weight:

    1. g_j = ∇L_j(w)              a backward that leaves `.grad` untouched (autograd.grad; FSDP2: set aside)
    2. e_j from g_j               `perturbation.perturb`
    3. w ← w + e_j, a pass, w ← w (restored by copy, bitwise, whatever happens in between)
    4. .grad += c_j·∇L_j(w + e_j) (GSAM, LookSAM: c_j·D(g_j, g_p,j); Functional-SAM: c_j·J_F(w + e_j)ᵀ∇_F L_j(w))

Only the last backward of the call may synchronize across devices (DDP all-reduces what was accumulated).
"""

from __future__ import annotations

import contextlib

import torch

from ..batches import batch_size_of
from ..methods.functional import model_outputs
from ..ops import copies, local, weighted
from .perturbation import ascent_gradient_of, perturb
from .state import MicroBatch, modules_with_running_stats, running_stats_frozen
from .interface import Engine


__all__ = ["reuse_step", "sequential_step"]


def sequential_step(engine: Engine, micro_batches, weights, loss_fn, size_fn, rho, sync_weight) -> torch.Tensor:
    """Steps 1-4 for each micro-batch in turn, w restored bitwise after each; returns the clean loss (detached)."""
    params = engine.trainable_params()  # frozen (PEFT) weights: never perturbed
    with torch.no_grad():  # the tensors perturbed and restored: under FSDP2, this rank's shards
        shards = [local(p) for p in params] if engine.fsdp2 else params
    explicit = engine.descent.explicit  # GSAM, LookSAM: the descent needs g_j and g_p,j themselves
    functional = engine.descent.through_outputs  # Functional-SAM: descend through the outputs F with ∇_F L(w)
    clean_pass = engine.perturbation.needs_gradient  # Momentum-SAM: e comes from the optimizer, no clean pass
    frozen_stats = modules_with_running_stats(engine.model) if clean_pass else []
    w = [p.detach().clone() for p in shards]  # restore by copy: w + e - e is not w in floating point
    k = len(micro_batches)
    clean_total = perturbed_total = 0.0
    for j, (mb, c_j) in enumerate(zip(micro_batches, weights)):
        c = 1.0 if c_j is None else c_j
        last = j == k - 1  # only the last backward may synchronize: DDP all-reduces everything accumulated
        # 1. g_j at w, `.grad` untouched.
        g = None
        if clean_pass:
            with engine.no_sync():
                with model_outputs(engine.model, functional) as outputs:
                    clean_loss = loss_fn(mb, MicroBatch(j, k, c, "clean", True))
                grad_outputs = engine.output_gradient(clean_loss, outputs) if functional else None
                a = None  # what this device's micro-batch weighs in the union (synchronized scope)
                if engine.sync_perturbation:
                    a = (size_fn or batch_size_of)(mb) if sync_weight == "size" else c
                g = ascent_gradient_of(engine, clean_loss, params, a)
        # 2. e_j from g_j, in g's storage (a copy of g_j is kept when the descent needs it); e_j = 0 (skipped) when
        #    g_j is zero, non-finite or overflowed in fp16.
        e = perturb(engine, shards, copies(g) if explicit else g, rho, params)
        if not explicit:
            g = None  # e lives in g's storage: no other reference may keep it alive past `del e`
        # 3. g_p,j at w + e_j, then back to w bitwise, whatever happens in between.
        try:
            if e is not None:
                with torch.no_grad():
                    torch._foreach_add_(shards, e)
                del e
                # Inside an enclosing autocast region, casts of w are cached: drop them, or the
                # forward below would silently run at the stale, unperturbed w.
                torch.clear_autocast_cache()
            with (contextlib.nullcontext() if last else engine.no_sync(), running_stats_frozen(frozen_stats),
                  engine.perturbation.perturbing(engine.model, engine._step, engine._first + j, k)):  # Flat-LoRA's noise
                with model_outputs(engine.model, functional) as outputs:
                    perturbed_loss = loss_fn(mb, MicroBatch(j, k, c, "perturbed", not clean_pass))
                if explicit:
                    g_p = engine.ascent_gradient(perturbed_loss, params)  # .grad untouched
                elif functional:  # 4. Functional-SAM: .grad += c_j·J_F(w + e_j)ᵀ∇_F L_j(w)
                    engine.backward_pass(weighted(engine.descent.surrogate(outputs, grad_outputs), c_j))
                    del outputs, grad_outputs
                else:
                    engine.backward_pass(weighted(perturbed_loss, c_j))  # 4. SAM: .grad += c_j·g_p,j
        finally:
            with torch.no_grad():
                torch._foreach_copy_(shards, w)
            torch.clear_autocast_cache()
        # 4. GSAM, LookSAM: .grad += c_j·D(g_j, g_p,j) (the forward above decided whether DDP syncs).
        if explicit:
            engine.accumulate(engine.descent.descent(g, g_p, c), params, c_j)
            del g, g_p

        perturbed_loss = perturbed_loss.detach()
        clean_loss = clean_loss.detach() if clean_pass else perturbed_loss  # Momentum-SAM: only w + e was seen
        clean_total = clean_total + weighted(clean_loss, c_j)
        perturbed_total = perturbed_total + weighted(perturbed_loss, c_j)
    engine.stats.add_losses(clean_total, perturbed_total)
    return clean_total


def reuse_step(engine: Engine, micro_batches, weights, loss_fn) -> torch.Tensor:
    """A reuse step (LookSAM between its SAM steps): one pass at w per micro-batch, descent from g_j alone."""
    params = engine.trainable_params()
    k, total = len(micro_batches), 0.0
    for j, (mb, c_j) in enumerate(zip(micro_batches, weights)):
        with contextlib.nullcontext() if j == k - 1 else engine.no_sync():
            loss = loss_fn(mb, MicroBatch(j, k, 1.0 if c_j is None else c_j, "reuse", True))
            g = engine.ascent_gradient(loss, params)
        engine.accumulate(engine.descent.reuse(g), params, c_j)
        total = total + weighted(loss.detach(), c_j)
    return total
