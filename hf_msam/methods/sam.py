"""SAM (Foret et al., ICLR 2021) and ASAM (Kwon et al., ICML 2021).

    e_j = ρ · g_j / ‖g_j‖                         SAM: the steepest ascent within radius ρ
    e_j = ρ · T² g_j / ‖T g_j‖,  T = |w| + η      ASAM: the same in the scale-invariant geometry of T
    ∇  += c_j · ∇L_{B_j}(w + e_j)                 the descent along the perturbed gradient

With one micro-batch this is SAM; with k it is mSAM (Behdin et al. 2023). The `sam` method (these rules, or with
`--msam_precondition adam` preconditioned SAM's ascent, which builds on them) is registered in `precondition.py`.
"""

from __future__ import annotations

from ..ops import global_norm, group_norms, scale_groups_to_radius, scale_to_radius, usable
from .base import DescentRule, PerturbationRule


class SAMPerturbation(PerturbationRule):
    """e = ρ·g/(‖g‖ + eps) (Foret et al. 2021); with `adaptive`, ASAM (Kwon et al. 2021):
    e = ρ·T²g/(‖Tg‖ + eps) with T = |w| + η elementwise."""

    def __init__(self, rho: float = 0.05, adaptive: bool = False, eta: float = 0.01, eps: float = 1e-12):
        self.rho, self.adaptive, self.eta, self.eps = rho, adaptive, eta, eps

    @property
    def enabled(self) -> bool:
        return self.rho != 0

    def __repr__(self) -> str:
        asam = f", adaptive=True, eta={self.eta}" if self.adaptive else ""
        return f"{'ASAM' if self.adaptive else 'SAM'}Perturbation(rho={self.rho}{asam}, eps={self.eps})"

    def _scale_by_T(self, params, grads) -> None:
        for p, g in zip(params, grads):  # T recomputed per tensor: no extra copy of the model
            g.mul_(p.detach().abs().add_(self.eta))

    def perturb(self, params, grads, rho=None):
        if self.adaptive:
            self._scale_by_T(params, grads)  # g ← T g; the norm below is ‖T g‖
        grad_norm = global_norm(grads)
        ok = usable(grad_norm)
        if self.adaptive:
            self._scale_by_T(params, grads)  # g ← T² g
        return scale_to_radius(grads, grad_norm, self.rho if rho is None else rho, self.eps, ok), grad_norm, ok

    def perturb_groups(self, params, grads, rho=None):
        # The same rule for all k micro-batches at once, on g stacked [k, ...]: T broadcasts over j.
        if self.adaptive:
            self._scale_by_T(params, grads)
        norms = group_norms(grads)  # ‖g_j‖ (ASAM: ‖T g_j‖) for every j
        ok = usable(norms)
        if self.adaptive:
            self._scale_by_T(params, grads)
        return scale_groups_to_radius(grads, norms, self.rho if rho is None else rho, self.eps, ok), norms, ok


class SAMDescent(DescentRule):
    """SAM: descend along the perturbed gradient g_p."""

    def __repr__(self) -> str:
        return "SAMDescent()"
