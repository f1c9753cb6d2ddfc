"""Code that reads covered parameters outside a routed layer's call and computes group by group itself (TRL's fused
LM head reads `lm_head.weight` directly): how it takes part in the vectorized step.

An integration registers an installer (`register_outside_reader`): while a `Vectorizer` context is active, its
hooks are in place, and the code they reach asks `active().outside_call(tensors)` what to add per group:

- in a perturbed pass, e_j (group j's rows must see w + e_j);
- in a capture pass, a probe z (zero, [k, *shape]) registered with the capture: ∂L/∂z_j is group j's gradient, so
  the code must give z's row j the gradient group j's rows give the parameter, and read w itself detached;
- nothing (None) when no context is active or none of the tensors is a covered parameter.

The code then records its call (`OutsideCall.record`) so that `Capture.verify` knows its reads are accounted for.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .layout import GroupLayout

__all__ = ["OutsideCall", "READERS", "active", "register_outside_reader"]

# Installers of integrations' hooks: each called when a context becomes active, returning the undo.
READERS: list[Callable[[], Callable[[], Any]]] = []
_ACTIVE: contextvars.ContextVar[Any] = contextvars.ContextVar("msam_active_vectorizer", default=None)


def register_outside_reader(install: Callable[[], Callable[[], Any]]) -> None:
    """`install()` puts an integration's hooks in place while a Vectorizer context is active; it returns the undo."""
    if install not in READERS:
        READERS.append(install)


def active() -> Any:
    """The Vectorizer whose context is active here, or None."""
    return _ACTIVE.get()


@dataclass
class OutsideCall:
    """What a computation outside the routed layers adds, group by group, to the parameters it reads."""

    layout: GroupLayout
    e: list[torch.Tensor | None]  # per tensor asked about: [k, *shape], row j added for group j (a perturbed pass)
    probes: list[torch.Tensor | None]  # per tensor: z, zero [k, *shape], whose row j must get group j's gradient
    capture: Any  # the Capture to record the call with, or None

    @property
    def detach(self) -> bool:
        """A capture pass: read the parameters detached (their per-group gradients go to the probes)."""
        return self.capture is not None

    def record(self, outputs: Sequence[torch.Tensor | None], inputs: Sequence[torch.Tensor | None]) -> None:
        """The call's outputs and its inputs from the rest of the graph, for `Capture.verify`."""
        if self.capture is None:
            return
        out = [t.grad_fn for t in outputs if isinstance(t, torch.Tensor) and t.grad_fn is not None]
        stops = {t.grad_fn for t in inputs if isinstance(t, torch.Tensor)}
        self.capture._regions.append((out, stops))
