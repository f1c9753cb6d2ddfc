"""The hooks through which an integration takes part in `MSAMMixin`'s step, declared once.

An integration for trainers that are not subclasses of ours (sentence-transformers' trainer with the mixin in front)
is a `TrainerIntegration` registered with `register_integration`; the mixin asks every registered one whether it
`applies` to it when it is built, and calls the hooks of those that do. Trainers that subclass the mixin (hf_msam.trl)
override the mixin's own hook methods instead (`msam_on_discard`, `msam_gathers_once_per_step`, and read
`msam_pass`). Neither side reads the other's private attributes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["INTEGRATIONS", "TrainerIntegration", "integrations_for", "register_integration"]


class TrainerIntegration:
    """The hooks, each a no-op by default."""

    name = "integration"

    def applies(self, trainer: Any) -> bool:
        """Whether this integration takes part in `trainer`'s steps (asked once, when the mixin is built)."""
        return False

    def check(self, trainer: Any, micro_batch_size: int | None) -> None:
        """Refuse, or say once, what mSAM does with this trainer's setup (at build time, and at the first step)."""

    def extra_parameters(self, trainer: Any, model: nn.Module) -> list[nn.Parameter] | None:
        """The parameters to perturb when there are more than the model's (a loss module's own); None: the model's."""
        return None

    def decomposable(self, trainer: Any, inputs: Any) -> bool | None:
        """Whether the batch's loss is the weighted sum of its micro-batches' losses (None: not known here)."""
        return None

    def whole_batch_step(self, trainer: Any, model: nn.Module, inputs: Any, num_items_in_batch: Any, split_fn: Any,
                         step: int, rho: Any) -> torch.Tensor | None:  # fmt: skip
        """Take this step over when its loss compares the batch's examples with each other (the whole-batch
        strategy); None: the ordinary step."""
        return None


INTEGRATIONS: list[TrainerIntegration] = []


def register_integration(integration: TrainerIntegration) -> TrainerIntegration:
    if all(type(i) is not type(integration) for i in INTEGRATIONS):
        INTEGRATIONS.append(integration)
    return integration


def integrations_for(trainer: Any) -> list[TrainerIntegration]:
    return [i for i in INTEGRATIONS if i.applies(trainer)]
