"""transformers' Trainer and accelerate's Accelerator: every private name of theirs that hf_msam reads or calls.

Tested with transformers 5.24.0 and 5.25.0, accelerate 1.16.0.

- `Trainer._prepare_inputs(inputs)`: moves a batch to the device as `training_step` would.
- `Trainer.training_step`: computes the loss of a batch and hands it to `accelerator.backward` once; the mSAM
  step runs it per pass with that backward held back (`loss_of_training_step`), so that everything else it does
  (compute_loss, normalization for gradient accumulation and DataParallel, cache clearing) stays the Trainer's.
- `Trainer._save_rng_state(output_dir)`: called by every process for each checkpoint; MSAMMixin overrides it to
  save the method's state beside the RNG state.
- `Trainer.loss_is_scaled_for_ga`, `model_accepts_loss_kwargs`, `compute_loss_func`: whether `training_step`
  normalizes the loss by `num_items_in_batch` (`loss_is_normalized_by_num_items`).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

# transformers' own Trainer, taken when hf_msam is imported: `hf-msam run` later puts a subclass of ours under the name
# `transformers.Trainer`, and the mSAM step must run transformers' own training_step, not that class's.
from transformers import Trainer

from .patching import set_on_instance

TESTED = {"transformers": ("5.24.0", "5.25.0"), "accelerate": ("1.16.0",)}

# The names of transformers.Trainer this adapter relies on; `missing_upstream_names` reports any gone.
TRAINER_NAMES = ("_prepare_inputs", "_save_rng_state", "training_step", "compute_loss")


def missing_upstream_names() -> list[str]:
    """The names this adapter relies on that the installed transformers no longer has (empty when all are there)."""
    return [f"transformers.Trainer.{name}" for name in TRAINER_NAMES if not hasattr(Trainer, name)]


def prepare_inputs(trainer: Any, inputs: Any) -> Any:
    """The batch on the trainer's device, as `Trainer.training_step` prepares it."""
    return trainer._prepare_inputs(inputs)


def loss_of_training_step(trainer: Any, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any) -> torch.Tensor:
    """The loss `Trainer.training_step` would backpropagate for `inputs`, with its backward held back: the Trainer's
    own step (not a subclass's `training_step` override, which wraps the whole mSAM step once), run with the
    accelerator's `backward` replaced by one that keeps the loss."""
    held: list[torch.Tensor] = []

    def hold(loss: torch.Tensor, **kwargs: Any) -> None:
        held.append(loss)

    restore = set_on_instance(trainer.accelerator, "backward", hold)  # accelerate's own, or another's, after
    try:
        # compute_loss may pop "labels": give it a copy, the micro-batch is used twice.
        Trainer.training_step(trainer, model, copy.copy(inputs), num_items_in_batch)
    finally:
        restore()
    if len(held) != 1:
        raise RuntimeError(
            f"transformers.Trainer.training_step called accelerator.backward {len(held)} times for one batch (once "
            "expected): hf_msam.integrations.transformers.loss_of_training_step needs updating for this release."
        )
    return held[0]


def loss_is_normalized_by_num_items(trainer: Any, num_items_in_batch: Any) -> bool:
    """Whether the loss is normalized by `num_items_in_batch` (`Trainer.training_step`'s own rule)."""
    if getattr(trainer, "loss_is_scaled_for_ga", None) is not None:
        return trainer.loss_is_scaled_for_ga
    return (trainer.model_accepts_loss_kwargs and num_items_in_batch is not None) or trainer.compute_loss_func is not None
