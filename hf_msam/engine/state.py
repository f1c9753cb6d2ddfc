"""What the engine keeps and tells: the schedule of perturbed steps, the running statistics, what a loss function
is told about its pass, and the checks every entry point makes."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..ops import divide_where_positive

__all__ = ["MSAMStats", "MicroBatch", "Schedule", "check_trainable", "modules_with_running_stats",
           "running_stats_frozen", "with_info"]  # fmt: skip


@dataclass(frozen=True)
class Schedule:
    """Per optimizer step t (1-based) of `max_steps`:

    - plain when t ≤ start·max_steps (late-phase SAM: Zhou et al., ICLR 2025), or when (t − 1) % interval ≠ 0;
    - otherwise perturbed, with ρ_t = ρ (`rho_schedule="constant"`) or ρ·lr_t/lr_max (`"lr"`, as GSAM does; 0 when
      lr_max is 0: a learning rate of 0 throughout perturbs nothing).
    """

    start: float = 0.0
    interval: int = 1
    rho_schedule: str = "constant"

    def perturbs(self, t: int, max_steps: int) -> bool:
        return t > self.start * max_steps and (t - 1) % self.interval == 0

    def rho(self, rho: float, lr: float | torch.Tensor, lr_max: float | torch.Tensor) -> float | torch.Tensor:
        if self.rho_schedule == "constant":
            return rho
        if isinstance(lr_max, torch.Tensor):  # ρ_t = 0 where lr_max = 0, decided on the device
            return divide_where_positive(rho * lr, lr_max)
        return rho * lr / lr_max if lr_max > 0 else 0.0 * lr


@dataclass
class MSAMStats:
    """Running sums over the micro-batches seen since the last `reset()` (tensors stay on device: no sync)."""

    clean_loss: float | torch.Tensor = 0.0  # Σ of the clean losses `backward` returned
    perturbed_loss: float | torch.Tensor = 0.0  # the same sums at w + e
    ascent_grad_norm: float | torch.Tensor = 0.0  # Σ over micro-batches of ‖g_j‖ (ASAM: ‖T g_j‖)
    micro_batches: int = 0
    skipped: int | torch.Tensor = 0  # perturbations skipped: zero, non-finite or fp16-overflowed ascent gradient
    steps: int = 0  # perturbed optimizer steps (LookSAM's reuse steps and plain steps are not counted)

    def reset(self) -> None:
        self.clean_loss = self.perturbed_loss = self.ascent_grad_norm = 0.0
        self.micro_batches = self.skipped = self.steps = 0

    def count(self, grad_norm: torch.Tensor, ok: torch.Tensor) -> None:
        """One micro-batch's perturbation: its ascent norm, and whether it was skipped (a tensor: never a sync)."""
        self.ascent_grad_norm = self.ascent_grad_norm + grad_norm.detach()
        self.micro_batches += 1
        self.skipped = self.skipped + (~ok).to(torch.int64)

    def count_groups(self, grad_norms: torch.Tensor, ok: torch.Tensor) -> None:
        """`count` for k micro-batches at once (norms and ok of shape [k])."""
        self.ascent_grad_norm = self.ascent_grad_norm + grad_norms.detach().sum()
        self.micro_batches += grad_norms.shape[0]
        self.skipped = self.skipped + (~ok).to(torch.int64).sum()

    def add_losses(self, clean: float | torch.Tensor, perturbed: float | torch.Tensor) -> None:
        self.clean_loss = self.clean_loss + clean
        self.perturbed_loss = self.perturbed_loss + perturbed


@dataclass(frozen=True)
class MicroBatch:
    """What a loss function is told about the pass it computes: `loss_fn(micro_batch, info)`.

    `index` is j (0-based) of `count` micro-batches; `weight` is c_j, the micro-batch's share of the batch (1.0 for
    a whole batch; a 0-d tensor when shares are token counts); `point` is where the pass is taken: "clean" (at w,
    the ascent), "perturbed" (at w + e_j) or "reuse" (at w, LookSAM between its SAM steps); `reported` is True for
    the pass whose loss `backward` reports (the clean one; at w + e for Momentum-SAM, which has no clean pass), so
    a trainer that records metrics in its loss function records each token once."""

    index: int
    count: int
    weight: float | torch.Tensor
    point: str
    reported: bool


def with_info(loss_fn: Callable[..., torch.Tensor]) -> Callable[[Any, MicroBatch], torch.Tensor]:
    """`loss_fn` as a function of (micro-batch, info): it is given `info` when it takes a second argument."""
    try:
        inspect.signature(loss_fn).bind(None, None)
    except TypeError:
        return lambda micro_batch, info: loss_fn(micro_batch)
    except ValueError:  # no signature to read (a builtin): call it as documented first, with the batch alone
        return lambda micro_batch, info: loss_fn(micro_batch)
    return loss_fn


def check_trainable(model: nn.Module, who: str, fix: str = "") -> None:
    """Raise ValueError when no parameter of `model` requires grad: there would be nothing to perturb or train."""
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(
            f"{who}: no parameter of {type(model).__name__} requires grad, so there is nothing to perturb or train. "
            "Make the weights to train trainable (`param.requires_grad_(True)`; with PEFT, attach a trainable adapter, "
            f"e.g. `get_peft_model`){fix}."
        )


def modules_with_running_stats(model: nn.Module) -> list[nn.Module]:
    """BatchNorm-style modules in train mode that track running statistics."""
    return [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats and m.training
    ]


@contextlib.contextmanager
def running_stats_frozen(modules: list[nn.Module]):
    """Leave BatchNorm-style running statistics as they are: only the clean pass may update them."""
    saved = [(m, {k: b.clone() for k, b in m.named_buffers(recurse=False) if b is not None}) for m in modules]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, buffers in saved:
                for k, b in buffers.items():
                    getattr(m, k).copy_(b)
