"""What the strategies read and call on the engine: the one interface between `MicroBatchSAM` (hf_msam.engine.core)
and the modules that compute its step (sequential, vectorized, whole_batch, perturbation). Declared here, so that the
strategies need not import the engine that imports them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import nn

from ..methods.base import DescentRule, PerturbationRule
from .state import MSAMStats


class Engine(Protocol):
    model: nn.Module
    perturbation: PerturbationRule
    descent: DescentRule
    stats: MSAMStats
    fsdp2: bool
    sync_perturbation: bool
    vectorize: str  # "auto", "on" or "off"
    micro_batch_size: int | None
    path: str | None
    path_reason: str | None
    _step: Any  # the optimizer step being accumulated
    _mode: str  # "perturbed", or "reuse" (LookSAM between its SAM steps)
    _first: int  # the number, within the step, of this call's first micro-batch

    def begin_call(self, step: Any, k: int) -> None: ...
    def trainable_params(self) -> list[nn.Parameter]: ...
    def ascent_gradient(self, loss: torch.Tensor, params: list[torch.Tensor], retain_graph: bool = False) -> list[torch.Tensor]: ...
    def sharded_ascent_gradient(self, loss: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]: ...
    def output_gradient(self, loss: torch.Tensor, outputs: list[torch.Tensor]) -> list[torch.Tensor]: ...
    def accumulate(self, d: list[torch.Tensor], params: list[torch.Tensor], c: Any) -> None: ...
    def backward_pass(self, loss: torch.Tensor) -> None: ...
    def no_sync(self) -> Any: ...
    def group(self, params: list[torch.Tensor]) -> Any: ...
    def grad_scaler(self) -> Any: ...
    def take_sequential(self, reason: str) -> None: ...
    def log_path(self, text: str) -> None: ...


LossFn = Callable[..., torch.Tensor]
