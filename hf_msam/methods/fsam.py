"""Friendly-SAM (Li et al., CVPR 2024).

    d_j = g_j − σ · m,        e_j = ρ · d_j / ‖d_j‖,        then   m ← λ · m + (1 − λ) · g_j
    ∇  += c_j · ∇L_{B_j}(w + e_j)

m, an EMA of past micro-batch gradients, estimates the full-batch gradient, whose component in the ascent does not
help generalization: F-SAM climbs along the batch-specific rest.
"""

from __future__ import annotations

import torch

from ..ops import blend, global_norm, like, scale_to_radius, usable
from .registry import MEASURED, is_finite, register_method, require
from .sam import SAMDescent, SAMPerturbation


class FriendlyPerturbation(SAMPerturbation):
    """Friendly-SAM: climb along the micro-batch gradient minus σ × an EMA of past ones.

    The first usable micro-batch only starts the EMA (m ← g, d = g), as in the authors' code. Every micro-batch (on
    each device, in every accumulation step) updates m once, in order; a skipped (zero or non-finite) g_j leaves it
    as it was. m (kept in at least float32) is state that crosses steps: `state_dict()` holds it.
    """

    def __init__(self, rho: float = 0.05, sigma: float = 1.0, lmbda: float = 0.95, eps: float = 1e-12):
        super().__init__(rho=rho, eps=eps)
        self.sigma, self.lmbda = sigma, lmbda
        self.m: list[torch.Tensor] | None = None
        self.started: torch.Tensor | None = None  # a 0-d bool: has a usable g_j started the EMA yet?

    def __repr__(self) -> str:
        return f"FriendlyPerturbation(rho={self.rho}, sigma={self.sigma}, lambda={self.lmbda}, eps={self.eps})"

    def perturb(self, params, grads, rho=None):
        ok = usable(global_norm(grads))  # judge g_j itself: a bad g_j must not enter m
        for g in grads:  # a skipped g_j may hold inf/nan: make it finite (a no-op when ok)
            g.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
        if self.m is None:  # m in at least float32: in bf16 most of each (1 − λ)·g_j would round away
            self.m = [torch.zeros_like(g, dtype=torch.promote_types(g.dtype, torch.float32)) for g in grads]
            self.started = torch.zeros((), dtype=torch.bool, device=grads[0].device)
        self.m = [m.to(g.device) for m, g in zip(self.m, grads)]  # a no-op once there (after a resume: moved once)
        started = self.started.to(grads[0].device)
        # Whole lists at a time (fused launches, not a few per tensor); g and m are finite here, so `blend` selects
        # exactly. The first usable g_j starts the EMA (m ← g_j); the ones after it update it: m ← λ·m + (1 − λ)·g_j.
        g_m = [g if g.dtype == m.dtype else g.to(m.dtype) for g, m in zip(grads, self.m)]
        ema = torch._foreach_mul(self.m, self.lmbda)
        torch._foreach_add_(ema, g_m, alpha=1.0 - self.lmbda)
        m_next = blend(started, ema, g_m)
        del ema, g_m
        torch._foreach_add_(grads, like(self.m, grads), alpha=-self.sigma)  # d_j = g_j − σ·m, m of before this micro-batch
        # A skipped g_j leaves m as it was. A new list, not changed in place: a snapshot keeps the old m.
        self.m = blend(ok, m_next, self.m)
        self.started = started | ok
        d_norm = global_norm(grads)
        ok = ok & usable(d_norm)  # d_j = 0 (g_j = σ·m) has no direction either: counted as skipped
        # g and m are finite, so d is too unless g − σ·m overflowed to ±inf (then d_norm is inf and ok False): clamp
        # to the largest finite value (a no-op when ok), so that the 0·d of a skip is exactly 0, in two launches.
        largest = [torch.finfo(t.dtype).max for t in grads]
        torch._foreach_clamp_min_(grads, [-x for x in largest])
        torch._foreach_clamp_max_(grads, largest)
        rho = self.rho if rho is None else rho
        return scale_to_radius(grads, d_norm, rho, self.eps, ok, finite=True), d_norm, ok

    def state_dict(self):
        if self.m is None:
            return {"m": None}
        return {"m": [t.detach().cpu() for t in self.m], "started": self.started.detach().cpu()}

    def load_state_dict(self, state):
        self.m = None if state.get("m") is None else [t.clone() for t in state["m"]]
        if self.m is not None:
            self.started = state["started"].clone() if "started" in state else torch.ones((), dtype=torch.bool)


@register_method("fsam", paper="Friendly-SAM, Li et al., CVPR 2024", cost="2 passes per micro-batch; 0.97x SAM" + MEASURED,
                 flags=("msam_rho", "msam_eps"),
                 dedicated_flags={"lambda": "msam_fsam_lambda", "sigma": "msam_fsam_sigma"})
def build(args, lambda_: float = 0.95, sigma: float = 1.0):
    require(is_finite(lambda_, 0.0, 1.0), "fsam", "lambda", lambda_, "a number in [0, 1)")
    require(is_finite(sigma, 0.0), "fsam", "sigma", sigma, "a finite number >= 0")
    return FriendlyPerturbation(args.msam_rho, sigma, lambda_, args.msam_eps), SAMDescent()
