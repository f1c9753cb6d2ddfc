"""Momentum-SAM (Becker et al. 2024): the ascent along the optimizer's negative momentum, at no extra pass.

    e   = −ρ · m / ‖m‖            m: the optimizer's momentum (Adam's `exp_avg`, SGD's `momentum_buffer`)
    ∇  += c_j · ∇L_{B_j}(w + e)

e does not depend on the micro-batch, so there is no clean pass: a step costs one forward and one backward.
"""

from __future__ import annotations

from typing import Any

import torch

from ..ops import SHARDED_PARAMS, global_norm, local, scale_to_radius, usable
from .registry import MEASURED, register_method
from .base import PerturbationRule
from .sam import SAMDescent


class MomentumPerturbation(PerturbationRule):
    """Momentum-SAM: e = −ρ·m/‖m‖, m read from `optimizer.state`. The loss a step reports is the loss at w + e.
    Before the optimizer has any momentum (the first step), e = 0: that step is a plain step."""

    needs_gradient = False
    needs_optimizer_state = True

    def __init__(self, rho: float = 0.05, eps: float = 1e-12, optimizer: Any = None):
        self.rho, self.eps, self.optimizer = rho, eps, optimizer

    @property
    def enabled(self) -> bool:
        return self.rho != 0

    def __repr__(self) -> str:
        return f"MomentumPerturbation(rho={self.rho}, eps={self.eps})"

    def check_optimizer(self, optimizer):
        group = optimizer.param_groups[0]
        if "betas" not in group and not group.get("momentum", 0):
            raise ValueError(
                f"--msam_method momentum perturbs along the optimizer's momentum, and {_name(optimizer)} (--optim) keeps "
                'none: use an Adam-type optimizer (e.g. --optim adamw_torch) or SGD with momentum (--optim sgd '
                '--optim_args "momentum=0.9"), or another --msam_method.'
            )
        return None

    def momentum(self, params) -> list[torch.Tensor] | None:
        if self.optimizer is None:
            raise ValueError("Momentum-SAM needs the optimizer: MomentumPerturbation(optimizer=...) or MicroBatchSAM(optimizer=...).")
        state = self.optimizer.state
        keys = SHARDED_PARAMS.get() or params  # FSDP2: `params` are this rank's shards of these
        found = [state[p].get("exp_avg", state[p].get("momentum_buffer")) if p in state else None for p in keys]
        if all(m is None for m in found):
            if any(state.get(p) for p in keys):  # the optimizer has stepped, but keeps its momentum elsewhere
                raise ValueError(
                    f"--msam_method momentum reads the optimizer's momentum as `exp_avg` (Adam-type) or `momentum_buffer` "
                    f"(SGD), and {_name(self.optimizer)} keeps neither (its state holds "
                    f"{sorted(next(state[p] for p in keys if state.get(p)))}): without it every step would be a plain "
                    "step. Choose such an optimizer (--optim adamw_torch, or sgd with momentum) or another --msam_method."
                )
            return None  # no momentum yet: the optimizer has not stepped
        return [torch.zeros_like(p) if m is None else local(m) for p, m in zip(params, found)]  # FSDP2: m's shard

    def perturb(self, params, grads, rho=None):
        m = self.momentum(params)
        if m is None:
            zero = torch.zeros((), device=params[0].device)
            return None, zero, torch.zeros((), dtype=torch.bool, device=params[0].device)
        norm = global_norm(m)
        ok = usable(norm)
        e = torch._foreach_neg([t.detach() for t in m])  # −m: fresh tensors (one launch), m stays the optimizer's
        e = [t if t.dtype == p.dtype else t.to(p.dtype) for t, p in zip(e, params)]
        # m holds no nan (a nan in the momentum has already reached the weights through the optimizer's step), and
        # an inf is clamped to the largest finite value (a no-op when ok): 0·e of a skip is then exactly 0, in two
        # launches rather than one nan_to_num per tensor.
        largest = [torch.finfo(t.dtype).max for t in e]
        torch._foreach_clamp_min_(e, [-x for x in largest])
        torch._foreach_clamp_max_(e, largest)
        return scale_to_radius(e, norm, self.rho if rho is None else rho, self.eps, ok, finite=True), norm, ok


def _name(optimizer: Any) -> str:
    """The class name of an optimizer (accelerate wraps it)."""
    return type(getattr(optimizer, "optimizer", optimizer)).__name__


@register_method("momentum", paper="Momentum-SAM, Becker et al. 2024", flags=("msam_rho", "msam_eps"),
                 cost="1 pass per micro-batch, no clean pass; 1.02x a plain step" + MEASURED)
def build(args):
    return MomentumPerturbation(args.msam_rho, args.msam_eps), SAMDescent()
