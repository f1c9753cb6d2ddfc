"""The two halves of every method: a `PerturbationRule` (the ascent, g_j → e_j) and a `DescentRule` (what micro-batch
j adds to the gradient, from g_j and g_p,j). Each rule also says what it can be combined with (its capabilities);
`registry.check_compatible` turns those into the one set of errors the arguments, the trainer and the engine raise.
This module imports nothing else of hf_msam."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch


class PerturbationRule:
    """Turns the ascent gradient g_j into the perturbation e_j. Subclass to change the rule.

    `perturb(params, grads, rho)` is called once per micro-batch with the trainable parameters w and
    their ascent gradients g (same order, already unscaled from any fp16 loss scale; None when
    `needs_gradient` is False). It returns e (tensors shaped like w; it may reuse the storage of g) or
    None for no perturbation, the norm it measured (0-d tensor, for logging), and `ok`, a 0-d bool
    tensor, False when the perturbation was skipped (then e must be zeros). It must not synchronize
    with the host. `rho` is the radius of this step (a schedule may change it), None for the rule's own.

    A rule may instead define `rule(params, grads) -> (e or None, grad_norm)`: it is then used through that
    call (its host checks are its own), and every rule can be called that way outside the training step
    (`hf_msam.flatness` does).

    `enabled` False tells the trainer to take the plain, single-pass step. `needs_gradient` False means
    e does not depend on the micro-batch (Momentum-SAM): no clean pass is made. Rules with state that
    crosses steps return it from `state_dict()`; the trainer saves it in each checkpoint (a list of tensors in it holds
    one per trainable parameter, shaped like it: the trainer checks that, and that tensors are finite, at a resume).

    Capabilities (class attributes; a subclass overrides what does not hold for it):
    `adaptive` (ASAM is in effect), `supports_sync` (the rule is the union's when the ascent gradient is),
    `supports_fsdp2` (it works on each rank's shards), `supports_vectorized` (it can run on each micro-batch's
    slice of a stacked gradient), `needs_optimizer_state` (it reads `optimizer.state`: set `optimizer`).
    """

    enabled: bool = True
    needs_gradient: bool = True
    adaptive: bool = False
    supports_sync: bool = True
    supports_fsdp2: bool = True
    supports_vectorized: bool = True
    needs_optimizer_state: bool = False

    def perturb_groups(self, params, grads, rho=None):
        """`perturb` for k micro-batches at once, on gradients stacked [k, *p.shape] (the vectorized step): returns e
        stacked the same way (it may reuse g's storage) or None, the k norms and the k `ok` flags ([k] tensors).
        Optional: a rule that does not define it gets `perturb` on each micro-batch's slice in turn. A rule defines it
        only where it computes exactly what `perturb` does, j by j; the engine uses it only while the class that
        defines it also defines `perturb` or inherits it unchanged (a subclass that changes `perturb` alone falls
        back to `perturb`, j by j)."""
        raise NotImplementedError

    def perturb(self, params, grads, rho=None):
        e, grad_norm = self(params, grads)
        return e, grad_norm, torch.full((), e is not None, dtype=torch.bool, device=grad_norm.device)

    def __call__(self, params: list[torch.Tensor], grads: list[torch.Tensor]) -> tuple[list[torch.Tensor] | None, torch.Tensor]:
        if type(self).perturb is PerturbationRule.perturb:
            raise NotImplementedError("a PerturbationRule defines perturb() or __call__()")
        e, grad_norm, ok = self.perturb(params, grads)
        return (e if bool(ok) else None), grad_norm  # host-side, for use outside the training step

    def check_optimizer(self, optimizer: Any) -> str | None:
        """Called once with the training optimizer before the first perturbed step: raise if the rule cannot work
        with it, or return a warning to log (None: nothing to say)."""
        return None

    def check_model(self, model: Any) -> None:
        """Called with the model when the engine is built (and when the trainer starts training): raise ValueError,
        naming the flag, if the rule cannot perturb this model (Flat-LoRA without LoRA layers)."""
        return None

    def perturbing(self, model: Any, step: Any, index: int, count: int) -> contextlib.AbstractContextManager:
        """Entered around the perturbed pass (forward and backward at w + e_j) of micro-batch `index` of optimizer
        step `step` (the engine's `step`; `index` counts this device's micro-batches over the step's accumulation
        calls, from 0), one of the `count` of this call. A rule that perturbs something other than the trainable
        parameters (Flat-LoRA: the frozen base weights of LoRA layers) does it here, and must leave everything
        bitwise as it found it when the context exits, also on an exception. Default: nothing."""
        return contextlib.nullcontext()

    def perturbing_groups(self, model: Any, step: Any, layout: Any, first: int = 0) -> contextlib.AbstractContextManager:
        """`perturbing` for the vectorized step: entered around its one perturbed pass (forward and backward), in which
        micro-batch `first` + j's positions are group j of `layout` (a `hf_msam.vectorized.GroupLayout`; `layout.positions(device)`
        arranges a layer's input by group, see `Positions`). A rule whose `perturbing` does something makes group j's
        positions see what micro-batch j would see there (Flat-LoRA: its own noise on each LoRA base weight), under the
        same rules; a layer input that does not carry the batch raises `hf_msam.vectorized.NotVectorizable`. The engine
        refuses the vectorized path for a rule that overrides `perturbing` but not this. Default: nothing."""
        return contextlib.nullcontext()

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def snapshot(self) -> dict[str, Any]:
        """The rule's attributes as they are, which `restore` puts back when a step raises (`MicroBatchSAM.backward`
        takes one per call). Tensors are kept by reference: a rule must replace its state tensors, not change them in
        place, or override this to clone what it changes in place."""
        return dict(vars(self))

    def restore(self, snapshot: dict[str, Any]) -> None:
        vars(self).clear()
        vars(self).update(snapshot)


class DescentRule:
    """What micro-batch j adds to the gradient, from its clean gradient g_j and perturbed gradient g_p,j.

    `explicit` False: the contribution is g_p,j itself, accumulated by the perturbed pass's own backward
    (SAM; the cheapest). `explicit` True: `descent(g, g_p)` returns it (it may reuse the storage of both),
    and the engine adds c_j times it to `.grad` through a backward of ⟨D, w⟩, so DDP's all-reduce, fp16
    loss scaling and accelerate's accumulation scaling apply to it as to any gradient.

    `begin_step()` is called once per optimizer step and answers "perturbed" or "reuse"; on a "reuse" step
    there is no perturbation, and `reuse(g)` gives the contribution from the clean gradient alone (LookSAM).

    `through_outputs` True (Functional-SAM): the engine records the model's outputs F in both passes, keeps
    ∇_F L(w) from the clean pass, and back-propagates `surrogate(outputs at w + e_j, ∇_F L(w))` of the perturbed
    pass (weighted by c_j) instead of its loss.

    Capabilities as for `PerturbationRule`, plus `supports_interval` (combines with `--msam_interval`).
    """

    explicit: bool = False
    through_outputs: bool = False
    supports_sync: bool = True
    supports_fsdp2: bool = True
    supports_vectorized: bool = True
    supports_interval: bool = True

    def begin_step(self) -> str:
        return "perturbed"

    def descent(self, g: list[torch.Tensor], g_p: list[torch.Tensor], c: float | torch.Tensor = 1.0) -> list[torch.Tensor]:
        """D(g_j, g_p,j); c is the micro-batch's weight c_j, which the engine applies (a rule may record it)."""
        return g_p

    def reuse(self, g: list[torch.Tensor]) -> list[torch.Tensor]:
        raise NotImplementedError

    def check_optimizer(self, optimizer: Any) -> str | None:
        """As `PerturbationRule.check_optimizer`."""
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    snapshot = PerturbationRule.snapshot
    restore = PerturbationRule.restore


@dataclass(frozen=True)
class Capabilities:
    """What a (perturbation, descent) pair combines with: each holds when both rules allow it."""

    adaptive: bool
    sync_perturbation: bool
    fsdp2: bool
    vectorized: bool
    interval: bool
    needs_optimizer_state: bool

    @classmethod
    def of(cls, perturbation: PerturbationRule, descent: DescentRule) -> Capabilities:
        return cls(
            adaptive=bool(getattr(perturbation, "adaptive", False)),
            sync_perturbation=perturbation.supports_sync and descent.supports_sync,
            fsdp2=perturbation.supports_fsdp2 and descent.supports_fsdp2,
            vectorized=perturbation.supports_vectorized and descent.supports_vectorized,
            interval=descent.supports_interval,
            needs_optimizer_state=perturbation.needs_optimizer_state,
        )
