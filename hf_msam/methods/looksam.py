"""LookSAM (Liu et al., CVPR 2022): the full SAM step only every k optimizer steps, its direction reused between.

On a SAM step, for each micro-batch:
    ∇    += c_j · g_p,j                                         SAM's descent
    g_v  += c_j · (g_p,j − (⟨g_j, g_p,j⟩ / ‖g_j‖²) · g_j)         the part of g_p orthogonal to g, kept
On the k − 1 steps between, one pass per micro-batch:
    ∇    += c_j · (g_j + α · (‖g_j‖ / ‖g_v‖) · g_v)
"""

from __future__ import annotations

import torch

from ..ops import dot, global_norm, like
from .registry import MEASURED, is_finite, is_whole, register_method, require
from .base import DescentRule
from .sam import SAMPerturbation


class LookSAMDescent(DescentRule):
    """LookSAM's descent. g_v = Σ c_j·g_v,j over a SAM step's micro-batches (on each device, over its accumulation
    steps) crosses steps: `state_dict()` holds it. The first step, and the first after a resume without saved state,
    is a SAM step."""

    explicit = True
    # g_v is nonlinear in each device's own g_p: synchronizing (or sharding) the ascent does not make it the union's.
    supports_sync = False
    supports_fsdp2 = False
    supports_interval = False  # it has its own: k

    def __init__(self, k: int = 5, alpha: float = 0.7):
        self.k, self.alpha = k, alpha
        self.g_v: list[torch.Tensor] | None = None
        self.reuses_left = 0  # reuse steps before the next SAM step
        self._fresh = False  # True until the first micro-batch of a SAM step replaces g_v

    def __repr__(self) -> str:
        return f"LookSAMDescent(k={self.k}, alpha={self.alpha})"

    def begin_step(self) -> str:
        if self.g_v is None or self.reuses_left == 0:
            self.reuses_left, self._fresh = self.k - 1, True
            return "perturbed"
        self.reuses_left -= 1
        return "reuse"

    def descent(self, g, g_p, c=1.0):
        sq = dot(g, g)
        s = torch.where(sq > 0, dot(g, g_p) / sq, torch.zeros_like(sq))  # ‖g_p‖cos θ/‖g‖; 0 when g = 0
        g_v = torch._foreach_mul(g, -s.to(g[0].dtype))  # c_j·g_v,j = c_j·(g_p − s·g), in fused launches
        torch._foreach_add_(g_v, g_p)
        torch._foreach_mul_(g_v, c.to(g_v[0].dtype) if isinstance(c, torch.Tensor) else c)
        if not self._fresh:  # the first micro-batch of a SAM step replaces the old g_v; the others add to it
            torch._foreach_add_(g_v, self.g_v)  # into the new tensors, not g_v's: a snapshot keeps the old g_v
        self.g_v, self._fresh = g_v, False
        return g_p

    def reuse(self, g):
        self.g_v = like(self.g_v, g)
        g_norm, v_norm = global_norm(g), global_norm(self.g_v)
        scale = torch.where(v_norm > 0, self.alpha * g_norm / v_norm, torch.zeros_like(v_norm))  # g_v = 0: plain g
        torch._foreach_add_(g, torch._foreach_mul(self.g_v, scale.to(g[0].dtype)))
        return g

    def check_optimizer(self, optimizer):
        """The reuse term with the paper's alpha stalled AdamW in benchmarks/study/looksam_alpha.py (a ViT's loss stayed
        at ln 10 for alpha 0.2, 0.3 and 0.7; at 0.7 also with k = 2 and with lr 5e-4) and in the study; alpha 0.1
        trained. Adam-type: an optimizer whose parameter groups have `betas`."""
        if self.alpha > 0.1 and "betas" in optimizer.param_groups[0]:
            name = type(getattr(optimizer, "optimizer", optimizer)).__name__
            return (
                f"LookSAM with an Adam-type optimizer ({name}) and alpha {self.alpha}: in our measurements alpha >= 0.2 "
                "stalled AdamW training (a small ViT's loss stayed at ln(num_labels)) and alpha 0.1 trained (the "
                "default 0.7 is the paper's). Consider --msam_looksam_alpha 0.1 (see benchmarks/study/README.md)."
            )
        return None

    def state_dict(self):
        return {"g_v": None if self.g_v is None else [t.detach().cpu() for t in self.g_v], "reuses_left": self.reuses_left}

    def load_state_dict(self, state):
        reuses_left = state.get("reuses_left", 0)
        if isinstance(reuses_left, bool) or not isinstance(reuses_left, int) or reuses_left < 0:
            raise ValueError(f"LookSAM's reuses_left must be a whole number >= 0, got {reuses_left!r}")
        self.g_v = None if state.get("g_v") is None else [t.clone() for t in state["g_v"]]
        self.reuses_left = reuses_left


@register_method("looksam", paper="LookSAM, Liu et al., CVPR 2022",
                 cost="2 passes per micro-batch every k-th step, 1 on the steps between; 1.16-1.20x a plain step at k = 5" + MEASURED,
                 flags=("msam_rho", "msam_adaptive", "msam_adaptive_eta", "msam_eps"),
                 dedicated_flags={"k": "msam_looksam_k", "alpha": "msam_looksam_alpha"})
def build(args, k: int = 5, alpha: float = 0.7):
    require(is_whole(k), "looksam", "k", k, "a whole number >= 1 (1 is SAM)")
    require(is_finite(alpha, 0.0), "looksam", "alpha", alpha, "a finite number >= 0")
    perturbation = SAMPerturbation(args.msam_rho, args.msam_adaptive, args.msam_adaptive_eta, args.msam_eps)
    return perturbation, LookSAMDescent(k, alpha)
