"""Functional-SAM (Singh, Mobahi, Agarwala, Dauphin, ICML 2025, arXiv 2502.02407).

    e_j = ρ · g_j / ‖g_j‖                              the ascent of SAM (or, with --msam_precondition adam, of
                                                       preconditioned SAM: see `precondition.py`)
    ∇  += c_j · J_F(w + e_j)ᵀ ∇_F L_{B_j}(w)            the descent: the loss's gradient with respect to the network
                                                       outputs F, taken at the clean point w, back-propagated through
                                                       the outputs computed at w + e_j

SAM's descent ∇L(w + e) = J_F(w + e)ᵀ ∇_F L(w + e) also moves ∇_F L to the perturbed point, and in language models
that mostly regularizes logit statistics (spurious sharpness); Functional-SAM perturbs only the network's function.
Same cost as SAM: ∇_F L(w) comes from the clean pass, and the perturbed pass back-propagates the surrogate
Σ⟨∇_F L(w), F(w + e_j)⟩, whose gradient with respect to w is J_F(w + e_j)ᵀ ∇_F L(w).

F are the outputs of the calls of the model given to the engine (a forward hook on it, on the wrapped module under
DDP, `model_outputs`): every
floating tensor it returns that requires grad, other than a `loss` field (for a tuple: other than 0-d tensors, a
loss by transformers' convention), i.e. the `logits` for transformers' models. The loss must reach the weights only
through them (a term on the weights themselves would be dropped from the descent).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
from torch import nn

from .registry import register_method
from .base import DescentRule
from .precondition import sam_ascent


class FunctionalDescent(DescentRule):
    """Functional-SAM: descend along J_F(w + e)ᵀ ∇_F L(w), through the surrogate ⟨∇_F L(w), F(w + e)⟩.

    `through_outputs`: the engine records the model's outputs in both passes (`model_outputs`), keeps ∇_F L(w) from
    the clean pass and back-propagates `surrogate(outputs, grads)` of the perturbed pass instead of its loss."""

    through_outputs = True
    supports_fsdp2 = False  # not checked on sharded weights: refused there
    supports_sync = False  # not tested with synchronized perturbations: refused there

    def __repr__(self) -> str:
        return "FunctionalDescent()"

    def surrogate(self, outputs: list[torch.Tensor], grads: list[torch.Tensor]) -> torch.Tensor:
        """Σ_i ⟨∇_{F_i} L(w), F_i(w + e)⟩: its gradient with respect to w is J_F(w + e)ᵀ ∇_F L(w)."""
        if len(outputs) != len(grads) or any(o.shape != g.shape for o, g in zip(outputs, grads)):
            raise RuntimeError(
                "--msam_method functional: the perturbed pass returned other outputs than the clean pass ("
                f"{[tuple(o.shape) for o in outputs]} against {[tuple(g.shape) for g in grads]}); the loss function must "
                "call the model the same way at w and at w + e."
            )
        total = 0.0
        for o, g in zip(outputs, grads):
            # in the wider dtype of the two: under fp16, ∇_F L is kept in float32 (unscaled, it would underflow)
            dtype = torch.promote_types(o.dtype, g.dtype)
            total = total + torch.sum(o.to(dtype) * g.to(dtype))
        return total


def _differentiable(value) -> list[torch.Tensor]:
    """The outputs F of one model call (see the module's docstring)."""
    if isinstance(value, torch.Tensor):
        found = [value]
    elif isinstance(value, Mapping):  # transformers' ModelOutput, a dict
        found = [v for k, v in value.items() if k != "loss" and isinstance(v, torch.Tensor)]
    elif isinstance(value, (tuple, list)):
        found = [v for v in value if isinstance(v, torch.Tensor) and v.dim() > 0]
    else:
        found = []
    return [t for t in found if t.is_floating_point() and t.requires_grad]


@contextlib.contextmanager
def model_outputs(model: nn.Module, on: bool = True) -> Iterator[list[torch.Tensor]]:
    """The outputs F of every call of `model` inside the block, in call order (empty when `on` is False).

    TRL's fused LM head returns per-token log-probabilities without the logits: F would then be log p(label), in
    which the SFT loss is linear (Functional-SAM would silently be SAM), so a call that returns them with a graph is
    refused. hf_msam.trl's `MSAMSFTTrainer` and `MSAMDPOTrainer` call the policy without the fused head for this
    method and compute the loss (SFT) or the log-probabilities (DPO) from the logits."""
    found: list[torch.Tensor] = []

    def hook(module, args, output):
        log_probs = output.get("log_probs") if isinstance(output, Mapping) else None
        if isinstance(log_probs, torch.Tensor) and log_probs.requires_grad and output.get("logits") is None:
            raise ValueError(
                "--msam_method functional back-propagates the loss's gradient with respect to the logits, and this "
                "model returned per-token log-probabilities without logits (TRL's fused LM head, "
                "`fused_lm_head=True`): use MSAMSFTTrainer or MSAMDPOTrainer (which compute the SFT loss, or DPO's "
                "log-probabilities, from the logits for this method), a loss on the logits, or another --msam_method."
            )
        found.extend(_differentiable(output))

    # Under DDP, the hook goes on the wrapped module: DDP passes the module's outputs through its `_DDPSink` when it
    # looks for unused parameters (transformers' default for models without gradient checkpointing), and the copies
    # it returns are not what a loss computed inside the model (its `loss` field) depends on.
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    handle = model.register_forward_hook(hook) if on else None
    try:
        yield found
    finally:
        if handle is not None:
            handle.remove()


def check_outputs(outputs: list[torch.Tensor]) -> None:
    """Refuse a pass that recorded no output: the loss was not computed from a call of the engine's model."""
    if not outputs:
        raise ValueError(
            "--msam_method functional found no output of the model that requires grad in the loss's pass: the loss must "
            "be computed from the outputs (e.g. the logits) of a call of the model given to MicroBatchSAM (the trainer's "
            "model), not of another module or a fused head that returns only the loss."
        )


@register_method("functional", paper="Functional-SAM, Singh et al., ICML 2025, arXiv 2502.02407",
                 cost="2 passes per micro-batch",
                 flags=("msam_rho", "msam_adaptive", "msam_adaptive_eta", "msam_eps", "msam_precondition"))
def build(args):
    return sam_ascent(args), FunctionalDescent()
