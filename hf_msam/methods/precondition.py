"""Preconditioned SAM (Singh, Mobahi, Agarwala, Dauphin, ICML 2025, arXiv 2502.02407): `--msam_precondition adam`.

    P   = diag(1 / (√v̂ + ε))                 v̂ = v / (1 − β₂ᵗ): AdamW's bias-corrected second moment (`exp_avg_sq`;
                                            `max_exp_avg_sq` with amsgrad), β₂ and ε of the parameter's group
    e_j = ρ · P g_j / ‖P g_j‖                the ascent in the geometry the optimizer descends in

Before the optimizer's first step there is no v: e_j is SAM's, ρ · g_j / ‖g_j‖. Used by `sam` (registered here: its
ascent is SAM's, ASAM's or this) and `functional`.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from ..ops import global_norm, group_norms, scale_groups_to_radius, scale_to_radius, usable, weight_dtype
from .registry import MEASURED, register_method
from .sam import SAMDescent, SAMPerturbation


class AdamPreconditionedPerturbation(SAMPerturbation):
    """e = ρ·P g/(‖P g‖ + eps), P = diag(1/(√v̂ + ε)) read from `optimizer.state` (Adam-type optimizers)."""

    needs_optimizer_state = True
    supports_fsdp2 = False  # the optimizer's state of sharded weights is not read here: refused under FSDP2

    def __init__(self, rho: float = 0.05, eps: float = 1e-12, optimizer: Any = None):
        super().__init__(rho=rho, eps=eps)
        self.optimizer = optimizer

    def __repr__(self) -> str:
        return f"AdamPreconditionedPerturbation(rho={self.rho}, eps={self.eps})"

    def check_optimizer(self, optimizer):
        if "betas" not in optimizer.param_groups[0]:
            raise _keeps_no_second_moment(_name(optimizer))
        return None

    def check_optimizer_class(self, optimizer_cls: Any, kwargs: dict[str, Any]) -> None:
        """`check_optimizer` before the optimizer exists, from the class and keyword arguments `--optim` names (the
        trainer asks when it is built): an Adam-type optimizer takes `betas`, which its parameter groups then hold."""
        try:
            takes_betas = "betas" in inspect.signature(optimizer_cls).parameters
        except (TypeError, ValueError):  # no signature to read: the first step decides
            return
        if "betas" not in kwargs and not takes_betas:
            raise _keeps_no_second_moment(getattr(optimizer_cls, "__name__", repr(optimizer_cls)))

    def preconditioner(self, params) -> list[torch.Tensor | None] | None:
        """1/(√v̂ + ε) per parameter (None for one without state yet); None before the optimizer's first step."""
        if self.optimizer is None:
            raise ValueError(
                "--msam_precondition adam needs the optimizer: AdamPreconditionedPerturbation(optimizer=...) or "
                "MicroBatchSAM(optimizer=...)."
            )
        state = self.optimizer.state
        if not any(state.get(p) for p in params):
            return None  # the optimizer has not stepped: P = I
        groups = {p: group for group in self.optimizer.param_groups for p in group["params"]}
        inverse = []
        for p in params:
            s = state.get(p)
            if not s:
                inverse.append(None)
                continue
            group = groups[p]
            v = s.get("max_exp_avg_sq") if group.get("amsgrad") else s.get("exp_avg_sq")
            if v is None or "betas" not in group or "eps" not in group:
                raise ValueError(
                    f"--msam_precondition adam reads AdamW's second moment `exp_avg_sq` (with betas and eps in its group), "
                    f"and {_name(self.optimizer)} keeps none (its state holds {sorted(s)}): choose an Adam-type optimizer "
                    "(--optim adamw_torch) or --msam_precondition none."
                )
            step = s["step"]
            # 1 − β₂ᵗ as a tensor where the step is one (torch's AdamW): read on the device, never on the host
            bias = 1 - group["betas"][1] ** (step.to(weight_dtype(step.device)) if isinstance(step, torch.Tensor) else step)
            inverse.append(v.div(bias).sqrt_().add_(group["eps"]).reciprocal_())
        return inverse

    def _precondition(self, params, grads) -> None:
        """g ← P g in g's storage (g may be stacked [k, ...]: P broadcasts over j); nothing before the first step."""
        inverse = self.preconditioner(params)
        if inverse is not None:
            for g, p_inv in zip(grads, inverse):
                if p_inv is not None:
                    g.mul_(p_inv.to(g.dtype))

    def perturb(self, params, grads, rho=None):
        self._precondition(params, grads)
        norm = global_norm(grads)
        ok = usable(norm)
        return scale_to_radius(grads, norm, self.rho if rho is None else rho, self.eps, ok), norm, ok

    def perturb_groups(self, params, grads, rho=None):
        self._precondition(params, grads)
        norms = group_norms(grads)
        ok = usable(norms)
        return scale_groups_to_radius(grads, norms, self.rho if rho is None else rho, self.eps, ok), norms, ok


def _keeps_no_second_moment(name: str) -> ValueError:
    return ValueError(
        f"--msam_precondition adam perturbs along AdamW's preconditioned gradient, and {name} (--optim) keeps no second "
        "moment: use an Adam-type optimizer (e.g. --optim adamw_torch), or --msam_precondition none."
    )


def _name(optimizer: Any) -> str:
    """The class name of an optimizer (accelerate wraps it)."""
    return type(getattr(optimizer, "optimizer", optimizer)).__name__


def sam_ascent(args) -> SAMPerturbation:
    """The ascent of `sam` and `functional`: SAM/ASAM, or with `--msam_precondition adam` preconditioned SAM."""
    if args.msam_precondition == "adam":
        return AdamPreconditionedPerturbation(args.msam_rho, args.msam_eps)
    return SAMPerturbation(args.msam_rho, args.msam_adaptive, args.msam_adaptive_eta, args.msam_eps)


@register_method("sam", paper="SAM, Foret et al. 2021; ASAM, Kwon et al. 2021", cost="2 passes per micro-batch; 2.08x a plain Trainer step" + MEASURED,
                 flags=("msam_rho", "msam_adaptive", "msam_adaptive_eta", "msam_eps", "msam_precondition"))
def build(args):
    return sam_ascent(args), SAMDescent()  # SAM, ASAM, or with --msam_precondition adam preconditioned SAM
