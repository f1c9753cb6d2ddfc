"""GSAM, surrogate gap guided SAM (Zhuang et al., ICLR 2022).

    e_j   = ρ · g_j / ‖g_j‖                                the ascent of SAM (or ASAM)
    g_⊥,j = g_j − (⟨g_j, g_p,j⟩ / ‖g_p,j‖²) · g_p,j          the clean gradient's part orthogonal to g_p,j
    ∇    += c_j · (g_p,j − α · g_⊥,j)                      descend along g_p, and lower the gap L(w + e) − L(w)

Subtracting g_⊥ lowers the surrogate gap h(w) = L(w + e) − L(w) without changing the descent along g_p. GSAM
schedules ρ with the learning rate: `--msam_rho_schedule lr`.
"""

from __future__ import annotations

import torch

from ..ops import dot
from .registry import MEASURED, is_finite, register_method, require
from .base import DescentRule
from .sam import SAMPerturbation


class GSAMDescent(DescentRule):
    """GSAM (Zhuang et al., ICLR 2022): D = g_p − α·g_⊥, g_⊥ = g − (⟨g, g_p⟩/‖g_p‖²)·g_p."""

    explicit = True
    # D is nonlinear in each device's own g_p: synchronizing (or sharding) the ascent does not make it the union's.
    supports_sync = False
    supports_fsdp2 = False

    def __init__(self, alpha: float = 0.1):
        self.alpha = alpha

    def __repr__(self) -> str:
        return f"GSAMDescent(alpha={self.alpha})"

    def descent(self, g, g_p, c=1.0):
        sq = dot(g_p, g_p)
        s = torch.where(sq > 0, dot(g, g_p) / sq, torch.zeros_like(sq))  # 0 when g_p = 0: then g_⊥ = g
        # g_p − α(g − s·g_p) = (1 + α·s)·g_p − α·g, computed in the storage of g_p
        torch._foreach_mul_(g_p, (1.0 + self.alpha * s).to(g_p[0].dtype))
        torch._foreach_add_(g_p, g, alpha=-self.alpha)
        return g_p


@register_method("gsam", paper="GSAM, Zhuang et al., ICLR 2022", cost="2 passes per micro-batch; 0.95x SAM" + MEASURED,
                 flags=("msam_rho", "msam_adaptive", "msam_adaptive_eta", "msam_eps"),
                 dedicated_flags={"alpha": "msam_gsam_alpha"})
def build(args, alpha: float = 0.1):
    require(is_finite(alpha, 0.0), "gsam", "alpha", alpha, "a finite number >= 0 (0 is SAM)")
    return SAMPerturbation(args.msam_rho, args.msam_adaptive, args.msam_adaptive_eta, args.msam_eps), GSAMDescent(alpha)
