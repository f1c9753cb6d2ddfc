"""The registry of layer rules: how a layer type takes part in the vectorized step (`Rule`), the table by type
(`RULES`, `register_rule`) and by what a module's forward is (`FORWARD_RULES`,
`register_forward_rule`), and `rule_for(module)`. It imports none of the rules: each registers itself where it is
defined, in `hf_msam.vectorized.rules`."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from .layout import Positions

__all__ = ["FORWARD_RULES", "RULES", "Rule", "register_forward_rule", "register_rule", "rule_for"]


ForwardAt = Callable[[nn.Module, torch.Tensor, Mapping[str, torch.Tensor], Positions], "torch.Tensor | None"]


@dataclass(frozen=True)
class Rule:
    """How one layer type takes part, for layers affine in their parameters (f(x; w + e) = f(x; w) + Δ(x; e)).

    `params`: the direct parameters the rule knows. `group_grad(module, x, delta, pos, wanted)`: from the layer's
    input x and output gradient delta, {name: [k, *param.shape]} for the names in `wanted`. `delta(module, x, out,
    e, pos)`: the extra output Δ (shaped like the layer's output `out`, in its dtype), e = {name: [k, *param.shape]}
    for the trainable parameters. `refuse(module)`: a reason this instance cannot be handled, or None.
    `forward_at(module, x, e, pos)`, optional: the whole output at w + e_j, in place of the layer's forward plus Δ
    (for layers where Δ costs as much as the layer itself); it may return None to take the Δ path after all.
    """

    params: tuple[str, ...]
    group_grad: Callable[[nn.Module, torch.Tensor, torch.Tensor, Positions, Collection[str]], dict[str, torch.Tensor]]
    delta: Callable[[nn.Module, torch.Tensor, torch.Tensor, Mapping[str, torch.Tensor], Positions], torch.Tensor]
    refuse: Callable[[nn.Module], str | None] | None = None
    forward_at: ForwardAt | None = None
    # True for a layer whose parameters are broadcast over the batch's rows ([1, ...] added to or concatenated with
    # [B, ...]: a ViT's class token and position embeddings): it runs its own forward once with each row's
    # parameters, p + e_j of the row's group, stacked [B, ...], and its group gradients come back through zero
    # probes (then `group_grad` and `delta` are not called). Only for layers whose forward uses the parameters by
    # broadcasting alone (a registered rule's predicate says so); rows layouts only.
    per_row: bool = False


RULES: dict[type, Rule] = {}


def register_rule(layer_type: type, rule: Rule) -> None:
    """Use `rule` for modules of exactly `layer_type` (subclasses that override `forward` take the fallback)."""
    RULES[layer_type] = rule


# Rules chosen by what a module's forward is rather than by its type: (predicate on the module, rule), tried in order
# for modules whose type has no rule in RULES.
FORWARD_RULES: list[tuple[Callable[[nn.Module], bool], Rule]] = []


def register_forward_rule(matches: Callable[[nn.Module], bool], rule: Rule) -> None:
    """Use `rule` for modules that `matches` accepts (and whose type, through its MRO, is not in RULES). The
    predicate must accept only modules whose forward is known to compute what the rule assumes."""
    FORWARD_RULES.append((matches, rule))


def rule_for(module: nn.Module) -> Rule | None:
    """The rule for this module: from RULES if it is exactly of a known type (a subclass might compute something
    else), else the first of FORWARD_RULES whose predicate accepts it."""
    for cls in type(module).__mro__:
        rule = RULES.get(cls)
        if rule is not None:
            return rule if type(module).forward is cls.forward else None
    for matches, rule in FORWARD_RULES:
        if matches(module):
            return rule
    return None
