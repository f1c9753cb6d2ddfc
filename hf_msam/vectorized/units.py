"""A module that takes part in the vectorized step (`_Unit`), and the context the contractions run in."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn

from .registry import Rule


@dataclass(eq=False)
class _Unit:
    """A module that takes part: through its rule, or (rule None) through the torch.func fallback."""

    name: str
    module: nn.Module
    rule: Rule | None
    wanted: dict[str, int]  # parameter name, relative to the module -> index in Vectorizer.params
    routed: dict = field(default_factory=dict)  # the routed forwards, kept across passes (see `_routed`)

    @property
    def where(self) -> str:
        return f"{self.name or '<model>'} ({type(self.module).__name__})"


def _no_autocast(device_type: str):
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()
