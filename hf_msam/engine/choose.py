"""Which strategy takes a call's micro-batches, and why: the one decision, read off the engine, the method's
rules, the model and the batch. Its reason is the text the log's path line prints (`mSAM step: ...`)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

from ..batches import batch_size_of
from ..methods import Capabilities, PerturbationRule
from ..vectorized import GroupLayout
from .head import perturbs_head
from .state import modules_with_running_stats
from .interface import Engine


__all__ = ["Choice", "choose_strategy"]


@dataclass(frozen=True)
class Choice:
    """"vectorized" with the groups of its layout, or "sequential" with the reason it was not vectorized; "head" (a rule
    that perturbs the output layer alone, logits-SAM) with the groups, or with the reason it takes one micro-batch at
    a time."""

    strategy: str
    layout: GroupLayout | None = None
    reason: str | None = None


def _overrides(rule: Any, name: str) -> bool:
    """True when `rule`'s class defines its own `name` (PerturbationRule's default does nothing)."""
    return getattr(type(rule), name) is not getattr(PerturbationRule, name)


def choose_strategy(engine: Engine, micro_batches: list[Any], layout: str, decomposable: bool | None) -> Choice:
    """The strategy for this call (see `MicroBatchSAM.backward` for `layout` and `decomposable`)."""
    reason = None
    head = perturbs_head(engine.perturbation)  # the head's strategy: the body once per group (or micro-batch)
    if engine.vectorize == "off":
        reason = "vectorize='off' (--msam_vectorize off)"
    elif len(micro_batches) == 1:
        reason = "one micro-batch per device: nothing to vectorize"
    elif engine.fsdp2:
        reason = "FSDP2 shards the weights the vectorized path would read whole"
    elif not head and not Capabilities.of(engine.perturbation, engine.descent).vectorized:
        reason = f"the method's rules ({engine.perturbation!r}, {engine.descent!r}) do not support it (supports_vectorized)"
    elif not head and _overrides(engine.perturbation, "perturbing") and not _overrides(engine.perturbation, "perturbing_groups"):
        reason = (f"the rule {engine.perturbation!r} perturbs in `perturbing` and has no `perturbing_groups` for one "
                  "pass over all micro-batches")
    elif decomposable is False:
        reason = "the batch's loss is not the weighted sum of its micro-batches' losses"
    elif decomposable is None and engine.vectorize == "auto":
        reason = ("the loss is the user's own: whether it is the weighted sum of its micro-batches' losses is not "
                  "known (--msam_vectorize on asserts it is)")
    elif modules_with_running_stats(engine.model):
        reason = "BatchNorm in train mode: its running statistics must update once per micro-batch"
    elif layout not in ("rows", "pairs", "packed"):
        reason = f"unknown batch layout {layout!r}"
    if reason is None and not head:  # the model itself, read now (train mode, checkpointing), and a refusal kept from a forward
        reason = engine.vectorized.problem(engine.trainable_params(), len(micro_batches))
    if reason is not None:
        return Choice("head" if head else "sequential", reason=reason)
    if layout == "rows":
        groups = GroupLayout.rows([batch_size_of(mb) for mb in micro_batches])
    elif layout == "pairs":
        groups = GroupLayout.pairs([batch_size_of(mb) // 2 for mb in micro_batches])
    else:
        lengths = [mb["input_ids"].shape[1] for mb in micro_batches]  # packed: each group one run of tokens
        groups = GroupLayout.tokens([0, *itertools.accumulate(lengths)], 1)
    return Choice("head" if head else "vectorized", layout=groups)
