"""Micro-batch sharpness-aware minimization (mSAM, Behdin et al. 2023, arXiv 2302.09693), and its cousins.

For each micro-batch B_j of a (device-local) batch of n examples, n_j of them in B_j, c_j = n_j / n:

    g_j   = ∇L_{B_j}(w)                      clean (ascent) gradient, local to this device
    e_j   = ρ · g_j / ‖g_j‖                  the ascent: a PerturbationRule     (SAM, ASAM, F-SAM, Momentum-SAM)
    g_p,j = ∇L_{B_j}(w + e_j)                perturbed gradient
    ∇    += c_j · D(g_j, g_p,j)              the descent: a DescentRule         (SAM: D = g_p; GSAM; LookSAM)

and w comes back to exactly what it was after every micro-batch. SAM is the case of one micro-batch.
A `Schedule` says, per optimizer step, whether the step is perturbed at all (late-phase SAM, an interval)
and which ρ it uses (constant, or following the learning rate).

Across devices, each device perturbs with its own micro-batches by default (device-local scope). With
`sync_perturbation` (forced under FSDP2), g_j is the gradient of the union over all devices of their j-th
micro-batches, so every device applies the same e_j (synchronized scope; see `MicroBatchSAM`).

Nothing here synchronizes with the host: decisions that depend on a tensor's value (skip a zero or
non-finite ascent gradient, guard a division) are made with tensor ops, and micro-batch weights that
come from tensors (token counts) stay tensors.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "MicroBatchSAM",
    "PerturbationRule",
    "SAMPerturbation",
    "FriendlyPerturbation",
    "MomentumPerturbation",
    "DescentRule",
    "SAMDescent",
    "GSAMDescent",
    "LookSAMDescent",
    "Schedule",
    "METHODS",
    "build_method",
    "MSAMStats",
    "split_batch",
    "batch_size_of",
    "micro_batch_weights",
]

METHODS = ("sam", "gsam", "fsam", "looksam", "momentum")


# ---------------------------------------------------------------------------------------------
# Small tensor helpers (none of them leaves the device)
# ---------------------------------------------------------------------------------------------


# Under FSDP2 each rank holds a shard of every vector the rules see: the engine sets the process group the
# shards are spread over, and norms and dot products then sum over all shards (one all-reduce each). It also
# sets the sharded parameters themselves: the optimizer's state (Momentum-SAM's momentum) is keyed by those.
_SHARD_GROUP: contextvars.ContextVar[Any] = contextvars.ContextVar("msam_shard_group", default=None)
_SHARDED_PARAMS: contextvars.ContextVar[Any] = contextvars.ContextVar("msam_sharded_params", default=None)


def _sum_over_shards(x: torch.Tensor) -> torch.Tensor:
    group = _SHARD_GROUP.get()
    if group is not None:
        dist.all_reduce(x, group=group)  # a collective, not a host sync
    return x


def _global_norm(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """‖(t_1, ..., t_m)‖₂ over all tensors (all shards, under FSDP2), accumulated in at least float32."""
    dtype = functools.reduce(torch.promote_types, {t.dtype for t in tensors}, torch.float32)
    norms = torch._foreach_norm(tensors, 2, dtype=dtype)
    device = tensors[0].device
    norm = torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]))
    if _SHARD_GROUP.get() is None:
        return norm
    return _sum_over_shards(norm.square()).sqrt()  # ‖t‖² is the sum of the shards' ‖t_shard‖²


def _dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    """⟨a, b⟩ over all tensors (all shards, under FSDP2), accumulated in at least float32."""
    dtype = functools.reduce(torch.promote_types, {t.dtype for t in a}, torch.float32)
    device = a[0].device
    return _sum_over_shards(torch.stack([torch.sum(x.to(dtype) * y.to(dtype)).to(device) for x, y in zip(a, b)]).sum())


def _like(state: list[torch.Tensor], like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Saved state on the device and in the dtype of the tensors it goes with (a no-op once it is)."""
    return [s.to(device=t.device, dtype=t.dtype) for s, t in zip(state, like)]


def _usable(norm: torch.Tensor) -> torch.Tensor:
    """True (a 0-d tensor) when a gradient with this norm has a direction: finite and not zero (davda54/sam#14)."""
    return torch.isfinite(norm) & (norm > 0)


def _scale_to_radius(d: list[torch.Tensor], norm: torch.Tensor, rho: float | torch.Tensor, eps: float, ok: torch.Tensor) -> list[torch.Tensor]:
    """d ← ρ·d/(‖d‖ + eps) in place, or d ← 0 when `ok` is False: the perturbation, in the storage of d."""
    zero = torch.zeros((), dtype=norm.dtype, device=norm.device)
    scale = torch.where(ok, rho / (norm + eps), zero)  # never a division by zero, never a sync
    torch._foreach_mul_(d, scale)
    for t in d:  # a skipped d may hold inf/nan, and 0·inf is nan: make it exactly 0 (a no-op when ok)
        t.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
    return d


# ---------------------------------------------------------------------------------------------
# The ascent: g_j -> e_j
# ---------------------------------------------------------------------------------------------



def _param_groups(fsdp_state: Any) -> list:
    """The parameter groups of one FSDP2 module's state: a list since torch 2.12, at most one group before."""
    groups = getattr(fsdp_state, "_fsdp_param_groups", None)
    if groups is None:
        group = getattr(fsdp_state, "_fsdp_param_group", None)
        groups = [] if group is None else [group]
    return list(groups)

class PerturbationRule:
    """Turns the ascent gradient g_j into the perturbation e_j. Subclass to change the rule.

    `perturb(params, grads, rho)` is called once per micro-batch with the trainable parameters w and
    their ascent gradients g (same order, already unscaled from any fp16 loss scale; None when
    `needs_gradient` is False). It returns e (tensors shaped like w; it may reuse the storage of g) or
    None for no perturbation, the norm it measured (0-d tensor, for logging), and `ok`, a 0-d bool
    tensor, False when the perturbation was skipped (then e must be zeros). It must not synchronize
    with the host. `rho` is the radius of this step (a schedule may change it), None for the rule's own.

    The older interface, `rule(params, grads) -> (e or None, grad_norm)`, still works both ways: a rule
    that only defines `__call__` is used through it (its host checks are then its own), and every rule
    can be called that way outside the training step (`hf_msam.flatness` does).

    `enabled` False tells the trainer to take the plain, single-pass step. `needs_gradient` False means
    e does not depend on the micro-batch (Momentum-SAM): no clean pass is made. Rules with state that
    crosses steps return it from `state_dict()`; the trainer saves it in each checkpoint.
    """

    enabled: bool = True
    needs_gradient: bool = True

    def perturb(self, params, grads, rho=None):
        e, grad_norm = self(params, grads)
        return e, grad_norm, torch.full((), e is not None, dtype=torch.bool, device=grad_norm.device)

    def __call__(self, params: list[torch.Tensor], grads: list[torch.Tensor]) -> tuple[list[torch.Tensor] | None, torch.Tensor]:
        if type(self).perturb is PerturbationRule.perturb:
            raise NotImplementedError("a PerturbationRule defines perturb() or __call__()")
        e, grad_norm, ok = self.perturb(params, grads)
        return (e if bool(ok) else None), grad_norm  # host-side, for use outside the training step

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


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
        grad_norm = _global_norm(grads)
        ok = _usable(grad_norm)
        if self.adaptive:
            self._scale_by_T(params, grads)  # g ← T² g
        return _scale_to_radius(grads, grad_norm, self.rho if rho is None else rho, self.eps, ok), grad_norm, ok


class FriendlyPerturbation(SAMPerturbation):
    """Friendly-SAM (Li et al., CVPR 2024): climb along the micro-batch gradient minus σ × an EMA of past ones,

        d_j = g_j − σ·m,   e_j = ρ·d_j/‖d_j‖,   then   m ← λ·m + (1 − λ)·g_j

    m estimates the full-batch gradient, whose component in the ascent does not help generalization; the
    first usable micro-batch only starts the EMA (m ← g, d = g), as in the authors' code. Every micro-batch (on
    each device, in every accumulation step) updates m once; a skipped (zero or non-finite) g_j leaves it
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
        ok = _usable(_global_norm(grads))  # judge g_j itself: a bad g_j must not enter m
        for g in grads:  # a skipped g_j may hold inf/nan: make it finite (a no-op when ok)
            g.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
        if self.m is None:  # m in at least float32: in bf16 most of each (1 − λ)·g_j would round away
            self.m = [torch.zeros_like(g, dtype=torch.promote_types(g.dtype, torch.float32)) for g in grads]
            self.started = torch.zeros((), dtype=torch.bool, device=grads[0].device)
        self.m = [m.to(g.device) for m, g in zip(self.m, grads)]  # a no-op once there (after a resume: moved once)
        started = self.started.to(grads[0].device)
        for g, m in zip(grads, self.m):
            # The first usable g_j starts the EMA (m ← g_j); the ones after it update it: m ← λ·m + (1 − λ)·g_j.
            m_next = torch.where(started, m * self.lmbda + g * (1.0 - self.lmbda), g.to(m.dtype))
            g.sub_(m, alpha=self.sigma)  # d_j = g_j − σ·m, with the m of before this micro-batch (0 before the start)
            m.copy_(torch.where(ok, m_next, m))  # a skipped g_j leaves m as it was
        self.started = started | ok
        d_norm = _global_norm(grads)
        ok = ok & _usable(d_norm)  # d_j = 0 (g_j = σ·m) has no direction either: counted as skipped
        rho = self.rho if rho is None else rho
        return _scale_to_radius(grads, d_norm, rho, self.eps, ok), d_norm, ok

    def state_dict(self):
        if self.m is None:
            return {"m": None}
        return {"m": [t.detach().cpu() for t in self.m], "started": self.started.detach().cpu()}

    def load_state_dict(self, state):
        self.m = None if state.get("m") is None else [t.clone() for t in state["m"]]
        if self.m is not None:
            self.started = state["started"].clone() if "started" in state else torch.ones((), dtype=torch.bool)


class MomentumPerturbation(PerturbationRule):
    """Momentum-SAM (Becker et al. 2024): perturb along the optimizer's negative momentum, e = −ρ·m/‖m‖.

    m is `exp_avg` of Adam-type optimizers or `momentum_buffer` of SGD, read from `optimizer.state`. e does
    not depend on the micro-batch: there is no clean pass, so a step costs one forward and one backward
    (at w + e), and the loss it reports is the loss at w + e. Before the optimizer has any momentum (the
    first step), e = 0: that step is a plain step.
    """

    needs_gradient = False

    def __init__(self, rho: float = 0.05, eps: float = 1e-12, optimizer: Any = None):
        self.rho, self.eps, self.optimizer = rho, eps, optimizer

    @property
    def enabled(self) -> bool:
        return self.rho != 0

    def __repr__(self) -> str:
        return f"MomentumPerturbation(rho={self.rho}, eps={self.eps})"

    def momentum(self, params) -> list[torch.Tensor] | None:
        if self.optimizer is None:
            raise ValueError("Momentum-SAM needs the optimizer: MomentumPerturbation(optimizer=...) or MicroBatchSAM(optimizer=...).")
        state = self.optimizer.state
        keys = _SHARDED_PARAMS.get() or params  # FSDP2: `params` are this rank's shards of these
        found = [state[p].get("exp_avg", state[p].get("momentum_buffer")) if p in state else None for p in keys]
        if all(m is None for m in found):
            if any(state.get(p) for p in keys):  # the optimizer has stepped, but keeps its momentum elsewhere
                raise ValueError(
                    f"--msam_method momentum reads the optimizer's momentum as `exp_avg` (Adam-type) or `momentum_buffer` "
                    f"(SGD), and {type(getattr(self.optimizer, 'optimizer', self.optimizer)).__name__} keeps neither (its state holds "
                    f"{sorted(next(state[p] for p in keys if state.get(p)))}): without it every step would be a plain "
                    "step. Choose such an optimizer (--optim adamw_torch, or sgd with momentum) or another --msam_method."
                )
            return None  # no momentum yet: the optimizer has not stepped
        return [torch.zeros_like(p) if m is None else _local(m) for p, m in zip(params, found)]  # FSDP2: m's shard

    def perturb(self, params, grads, rho=None):
        m = self.momentum(params)
        if m is None:
            zero = torch.zeros((), device=params[0].device)
            return None, zero, torch.zeros((), dtype=torch.bool, device=params[0].device)
        norm = _global_norm(m)
        ok = _usable(norm)
        e = [t.detach().neg().to(p.dtype) for t, p in zip(m, params)]  # −m: a fresh tensor, m stays the optimizer's
        return _scale_to_radius(e, norm, self.rho if rho is None else rho, self.eps, ok), norm, ok


# ---------------------------------------------------------------------------------------------
# The descent: (g_j, g_p,j) -> the micro-batch's contribution
# ---------------------------------------------------------------------------------------------


class DescentRule:
    """What micro-batch j adds to the gradient, from its clean gradient g_j and perturbed gradient g_p,j.

    `explicit` False: the contribution is g_p,j itself, accumulated by the perturbed pass's own backward
    (SAM; the cheapest). `explicit` True: `descent(g, g_p)` returns it (it may reuse the storage of both),
    and the engine adds c_j times it to `.grad` through a backward of ⟨D, w⟩, so DDP's all-reduce, fp16
    loss scaling and accelerate's accumulation scaling apply to it as to any gradient.

    `begin_step()` is called once per optimizer step and answers "perturbed" or "reuse"; on a "reuse" step
    there is no perturbation, and `reuse(g)` gives the contribution from the clean gradient alone (LookSAM).
    """

    explicit: bool = False

    def begin_step(self) -> str:
        return "perturbed"

    def descent(self, g: list[torch.Tensor], g_p: list[torch.Tensor], c: float | torch.Tensor = 1.0) -> list[torch.Tensor]:
        """D(g_j, g_p,j); c is the micro-batch's weight c_j, which the engine applies (a rule may record it)."""
        return g_p

    def reuse(self, g: list[torch.Tensor]) -> list[torch.Tensor]:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class SAMDescent(DescentRule):
    """SAM: descend along the perturbed gradient g_p."""

    def __repr__(self) -> str:
        return "SAMDescent()"


class GSAMDescent(DescentRule):
    """GSAM (Zhuang et al., ICLR 2022): D = g_p − α·g_⊥, g_⊥ = g − (⟨g, g_p⟩/‖g_p‖²)·g_p.

    g_⊥ is the part of the clean gradient orthogonal to the perturbed one: subtracting it lowers the
    surrogate gap h(w) = L(w + e) − L(w) without changing the descent along g_p.
    """

    explicit = True

    def __init__(self, alpha: float = 0.1):
        self.alpha = alpha

    def __repr__(self) -> str:
        return f"GSAMDescent(alpha={self.alpha})"

    def descent(self, g, g_p, c=1.0):
        sq = _dot(g_p, g_p)
        s = torch.where(sq > 0, _dot(g, g_p) / sq, torch.zeros_like(sq))  # 0 when g_p = 0: then g_⊥ = g
        # g_p − α(g − s·g_p) = (1 + α·s)·g_p − α·g, computed in the storage of g_p
        torch._foreach_mul_(g_p, (1.0 + self.alpha * s).to(g_p[0].dtype))
        torch._foreach_add_(g_p, g, alpha=-self.alpha)
        return g_p


class LookSAMDescent(DescentRule):
    """LookSAM (Liu et al., CVPR 2022): full SAM every k steps, and in between, reuse its direction.

    On a SAM step, each micro-batch descends along g_p,j and leaves g_v,j = g_p,j − (⟨g_j, g_p,j⟩/‖g_j‖²)·g_j,
    the part of g_p orthogonal to g; g_v = Σ c_j·g_v,j over the step's micro-batches (on each device,
    over its accumulation steps) is kept. The k − 1 steps after it make one pass per micro-batch and
    descend along g_j + α·(‖g_j‖/‖g_v‖)·g_v. g_v crosses steps: `state_dict()` holds it. The first step,
    and the first after a resume without saved state, is a SAM step.
    """

    explicit = True

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
        sq = _dot(g, g)
        s = torch.where(sq > 0, _dot(g, g_p) / sq, torch.zeros_like(sq))  # ‖g_p‖cos θ/‖g‖; 0 when g = 0
        g_v = [(gp - s.to(gp.dtype) * gj) * c for gj, gp in zip(g, g_p)]  # c_j·g_v,j
        if self._fresh:  # the first micro-batch of a SAM step replaces the old g_v
            self.g_v, self._fresh = g_v, False
        else:
            torch._foreach_add_(self.g_v, g_v)
        return g_p

    def reuse(self, g):
        self.g_v = _like(self.g_v, g)
        g_norm, v_norm = _global_norm(g), _global_norm(self.g_v)
        scale = torch.where(v_norm > 0, self.alpha * g_norm / v_norm, torch.zeros_like(v_norm))  # g_v = 0: plain g
        torch._foreach_add_(g, torch._foreach_mul(self.g_v, scale.to(g[0].dtype)))
        return g

    def state_dict(self):
        return {"g_v": None if self.g_v is None else [t.detach().cpu() for t in self.g_v], "reuses_left": self.reuses_left}

    def load_state_dict(self, state):
        self.g_v = None if state.get("g_v") is None else [t.clone() for t in state["g_v"]]
        self.reuses_left = int(state.get("reuses_left", 0))


def build_method(
    method: str = "sam",
    rho: float = 0.05,
    adaptive: bool = False,
    adaptive_eta: float = 0.01,
    eps: float = 1e-12,
    gsam_alpha: float = 0.1,
    fsam_lambda: float = 0.95,
    fsam_sigma: float = 1.0,
    looksam_k: int = 5,
    looksam_alpha: float = 0.7,
    optimizer: Any = None,
) -> tuple[PerturbationRule, DescentRule]:
    """The (ascent, descent) pair of a method by name: sam, gsam, fsam, looksam or momentum."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}.")
    if adaptive and method in ("fsam", "momentum"):
        raise ValueError(f"ASAM (adaptive) does not combine with method {method!r}: use sam, gsam or looksam.")
    if method == "fsam":
        ascent: PerturbationRule = FriendlyPerturbation(rho=rho, sigma=fsam_sigma, lmbda=fsam_lambda, eps=eps)
    elif method == "momentum":
        ascent = MomentumPerturbation(rho=rho, eps=eps, optimizer=optimizer)
    else:
        ascent = SAMPerturbation(rho=rho, adaptive=adaptive, eta=adaptive_eta, eps=eps)
    descent = {"gsam": lambda: GSAMDescent(gsam_alpha), "looksam": lambda: LookSAMDescent(looksam_k, looksam_alpha)}
    return ascent, descent.get(method, SAMDescent)()


# ---------------------------------------------------------------------------------------------
# The schedule: which optimizer steps are perturbed, and with which ρ
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Schedule:
    """Per optimizer step t (1-based) of `max_steps`:

    - plain when t ≤ start·max_steps (late-phase SAM: Zhou et al., ICLR 2025), or when (t − 1) % interval ≠ 0;
    - otherwise perturbed, with ρ_t = ρ (`rho_schedule="constant"`) or ρ·lr_t/lr_max (`"lr"`, as GSAM does).
    """

    start: float = 0.0
    interval: int = 1
    rho_schedule: str = "constant"

    def perturbs(self, t: int, max_steps: int) -> bool:
        return t > self.start * max_steps and (t - 1) % self.interval == 0

    def rho(self, rho: float, lr: float | torch.Tensor, lr_max: float | torch.Tensor) -> float | torch.Tensor:
        return rho if self.rho_schedule == "constant" else rho * lr / lr_max


@dataclass
class MSAMStats:
    """Running sums over the micro-batches seen since the last `reset()` (tensors stay on device: no sync)."""

    clean_loss: float | torch.Tensor = 0.0  # Σ of the clean losses `backward` returned
    perturbed_loss: float | torch.Tensor = 0.0  # the same sums at w + e
    ascent_grad_norm: float | torch.Tensor = 0.0  # Σ over micro-batches of ‖g_j‖ (ASAM: ‖T g_j‖)
    micro_batches: int = 0
    skipped: int | torch.Tensor = 0  # perturbations skipped: zero, non-finite or fp16-overflowed ascent gradient
    steps: int = 0  # perturbed optimizer steps (LookSAM's reuse steps and plain steps are not counted)

    def reset(self) -> None:
        self.clean_loss = self.perturbed_loss = self.ascent_grad_norm = 0.0
        self.micro_batches = self.skipped = self.steps = 0


# ---------------------------------------------------------------------------------------------
# Splitting a batch into micro-batches
# ---------------------------------------------------------------------------------------------


def _first_tensor(batch: Any) -> torch.Tensor | None:
    if isinstance(batch, torch.Tensor):
        return batch if batch.dim() > 0 else None
    if isinstance(batch, Mapping):
        if isinstance(batch.get("labels"), torch.Tensor) and batch["labels"].dim() > 0:
            return batch["labels"]
        batch = list(batch.values())
    if isinstance(batch, (list, tuple)):
        for value in batch:
            t = _first_tensor(value)
            if t is not None:
                return t
    return None


def batch_size_of(batch: Any) -> int:
    """Number of examples in a batch: dim 0 of `labels` if present, else of the first tensor."""
    t = _first_tensor(batch)
    if t is None:
        raise ValueError(
            "mSAM cannot split this batch into micro-batches: it holds no tensor with a batch dimension "
            f"(got {type(batch).__name__}). Pass a tensor, or a dict/list/tuple of tensors."
        )
    return t.shape[0]


def _slice(batch: Any, n: int, start: int, stop: int) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch[start:stop] if batch.dim() > 0 and batch.shape[0] == n else batch
    if isinstance(batch, Mapping):
        return type(batch)({k: _slice(v, n, start, stop) for k, v in batch.items()})
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(_slice(v, n, start, stop) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(_slice(v, n, start, stop) for v in batch)
    return batch


def split_batch(batch: Any, micro_batch_size: int | None) -> list[Any]:
    """Split along dim 0 every tensor whose first dimension is the batch size; pass the rest through.

    The last micro-batch is smaller when the batch does not divide evenly.
    """
    n = batch_size_of(batch)
    if micro_batch_size is None or micro_batch_size >= n:
        return [batch]
    return [_slice(batch, n, start, min(start + micro_batch_size, n)) for start in range(0, n, micro_batch_size)]


def micro_batch_weights(
    micro_batches: list[Any], size_fn: Callable[[Any], int | torch.Tensor] | None = None
) -> list[float] | list[torch.Tensor]:
    """c_j = size(B_j) / Σ_i size(B_i).

    Sizes given as Python numbers (example counts) give Python floats; sizes given as tensors (label-token
    counts, say) give 0-d float64 tensors on their device, computed there: no transfer to the host. Both
    are exact in double precision, whatever the loss dtype.
    """
    sizes = [(size_fn or batch_size_of)(mb) for mb in micro_batches]
    device = next((n.device for n in sizes if isinstance(n, torch.Tensor)), None)
    if device is None:
        total = float(sum(sizes))
        return [float(n) / total for n in sizes]
    dtype = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
    sizes_t = torch.stack([torch.as_tensor(n, device=device).to(dtype).reshape(()) for n in sizes])
    return list((sizes_t / sizes_t.sum()).unbind())


def _weighted(loss: torch.Tensor, c: float | torch.Tensor | None) -> torch.Tensor:
    """c·loss in the loss's dtype (c None: the whole batch, weight 1)."""
    if c is None:
        return loss
    return loss * (c.to(loss.dtype) if isinstance(c, torch.Tensor) else c)


# ---------------------------------------------------------------------------------------------
# The engine
# ---------------------------------------------------------------------------------------------


def _modules_with_running_stats(model: nn.Module) -> list[nn.Module]:
    return [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats and m.training
    ]


@contextlib.contextmanager
def _running_stats_frozen(modules: list[nn.Module]):
    """Leave BatchNorm-style running statistics as they are: only the clean pass may update them."""
    saved = [(m, {k: b.clone() for k, b in m.named_buffers(recurse=False) if b is not None}) for m in modules]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, buffers in saved:
                for k, b in buffers.items():
                    getattr(m, k).copy_(b)


@contextlib.contextmanager
def _scoped(var: contextvars.ContextVar, value: Any):
    token = var.set(value)
    try:
        yield
    finally:
        var.reset(token)


def _is_fsdp2(model: nn.Module) -> bool:
    """True when `model` (or a submodule) was sharded with FSDP2's `fully_shard`."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2
        return False
    return any(isinstance(m, FSDPModule) for m in model.modules())


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (a view that shares its storage); any other tensor as it is."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def _weight_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64


class MicroBatchSAM:
    """The mSAM gradient, in one call: ``loss = sam.backward(batch, loss_fn)``.

    `backward` splits `batch` into micro-batches of `micro_batch_size` examples (None: one
    micro-batch), perturbs the weights separately for each from its own gradient, and ADDS the
    size-weighted mean of the descent contributions to `.grad` (accumulating like `loss.backward()`).
    It returns the clean loss at w of the whole batch, detached, and leaves w bitwise as it was,
    even when a pass raises.

    The ascent rule (`perturbation`, default SAM/ASAM from `rho`, `adaptive`, ...) and the descent
    rule (`descent`, default SAM) are the method; `build_method` makes the pair for GSAM, F-SAM,
    LookSAM and Momentum-SAM. Momentum-SAM reads the momentum from `optimizer`.

    With an `accelerator` (or a model wrapped in DistributedDataParallel), the ascent passes and
    every perturbed pass but the last run without gradient synchronization: each device perturbs
    with its own micro-batches, and the descent gradient is all-reduced once, by the last backward,
    exactly as for a plain step. Backward goes through `accelerator.backward`, so fp16 loss scaling
    and accelerate's gradient-accumulation scaling apply as usual.

    `sync_perturbation` True synchronizes the perturbations: g_j becomes the gradient of the union over all
    devices of their j-th micro-batches, Σ_r a_r,j·g_r,j / Σ_r a_r,j (a_r,j the size of micro-batch j on
    device r, or its weight c_r,j: see `backward`'s `sync_weight`; micro-batches of unequal size or token
    count weigh as they would in the union; one all-reduce of the trainable gradients and one of a_r,j per
    micro-batch, no host sync), and every device
    applies the same e_j. All devices must then cut their batches into the same number of micro-batches
    (a device with fewer would wait forever for the others). Friendly-SAM's EMA then stays the same on
    every device; Momentum-SAM is the same in both scopes (its momentum already is). GSAM and LookSAM
    descend along a function of each device's own perturbed gradient, which synchronizing the ascent
    alone does not make the union's: they are refused.

    A model sharded with FSDP2 (`fully_shard`) is supported, and its perturbations are always
    synchronized (every rank must apply the same e to its shard). g_j comes from a backward whose
    gradients FSDP2 reduce-scatters (the mean over ranks, i.e. the union's gradient), with `.grad`
    set aside and put back around it; the norm sums the shards with one all-reduce; each rank perturbs
    and restores (by copy) only its own shards. Extra memory: two copies of the local shard. Momentum-SAM
    reads each rank's shard of the (sharded) optimizer momentum, its norm summed over the shards. Methods
    whose descent needs g_p,j itself (GSAM, LookSAM) are refused under FSDP2, and the mesh must be
    one-dimensional (plain FSDP, not HSDP).
    """

    def __init__(
        self,
        model: nn.Module,
        rho: float = 0.05,
        micro_batch_size: int | None = None,
        adaptive: bool = False,
        adaptive_eta: float = 0.01,
        eps: float = 1e-12,
        accelerator: Any = None,
        perturbation: PerturbationRule | None = None,
        descent: DescentRule | None = None,
        optimizer: Any = None,
        sync_perturbation: bool = False,
        process_group: Any = None,
    ):
        if micro_batch_size is not None and micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be None or >= 1, got {micro_batch_size}.")
        self.model = model
        self.micro_batch_size = micro_batch_size
        self.accelerator = accelerator
        self.perturbation = perturbation if perturbation is not None else SAMPerturbation(rho, adaptive, adaptive_eta, eps)
        self.descent = descent if descent is not None else SAMDescent()
        if optimizer is not None and getattr(self.perturbation, "optimizer", False) is None:
            self.perturbation.optimizer = optimizer  # Momentum-SAM reads the momentum from it
        self.fsdp2 = _is_fsdp2(model)
        self.sync_perturbation = bool(sync_perturbation) or self.fsdp2  # FSDP2: every rank applies the same e
        self.process_group = process_group  # the devices to synchronize over (None: all)
        self._check_scope()
        self.stats = MSAMStats()
        self.micro_batch_weight: float | torch.Tensor = 1.0  # c_j of the micro-batch `backward` is working on
        self._step: Any = object()  # the optimizer step `backward` last worked on
        self._mode = "perturbed"
        # False while loss_fn runs a pass whose loss `backward` does not report (the perturbed pass, when there is a
        # clean one): a trainer that records metrics inside its loss function can skip recording them then.
        self.reported_pass = True

    def _check_scope(self) -> None:
        if not self.sync_perturbation:
            return
        why = "under FSDP2 (whose perturbations are always synchronized)" if self.fsdp2 else "with sync_perturbation=True (--msam_sync_perturbation)"
        if self.descent.explicit:
            raise ValueError(
                f"{type(self.descent).__name__} (--msam_method gsam or looksam) is not supported {why}: its descent is a "
                "nonlinear function of each device's own perturbed gradient, so synchronizing the ascent alone does not "
                "give the union's method. Use --msam_method sam, fsam or momentum, or device-local perturbations "
                "(drop --msam_sync_perturbation; plain DDP instead of FSDP2)."
            )
        if self.fsdp2:
            meshes = {getattr(p, "device_mesh", None) for p in self.model.parameters() if p.requires_grad}
            if any(m is not None and m.ndim != 1 for m in meshes):
                raise NotImplementedError(
                    "mSAM under FSDP2 supports a one-dimensional device mesh (plain fully_shard), not HSDP or 2-D "
                    "meshes: shard over one mesh dimension, or use plain DDP."
                )

    def _group(self, params: list[torch.Tensor]) -> Any:
        """The process group to synchronize over, or None when this is a single process."""
        if self.fsdp2:
            mesh = next((p.device_mesh for p in params if hasattr(p, "device_mesh")), None)
            return None if mesh is None else mesh.get_group()
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(self.process_group) == 1:
            return None
        return self.process_group if self.process_group is not None else dist.group.WORLD

    @contextlib.contextmanager
    def _fsdp2_reduces_every_backward(self):
        """FSDP2: every backward of the step reduce-scatters, even inside the Trainer's `no_sync` for accumulation
        steps: the ascent gradient must be the union's, and gradients left unreduced by one backward would leak
        into the next ascent gradient. The accumulated (sharded) `.grad` is the same either way."""
        groups = [g for m in self.model.modules() if hasattr(m, "_get_fsdp_state") for g in _param_groups(m._get_fsdp_state())]
        saved = [(g.reduce_grads, g.all_reduce_grads) for g in groups]
        for g in groups:
            g.reduce_grads = g.all_reduce_grads = True
        try:
            yield
        finally:
            for g, (reduce_grads, all_reduce_grads) in zip(groups, saved):
                g.reduce_grads, g.all_reduce_grads = reduce_grads, all_reduce_grads

    # -- the contexts and the backward the accelerator would use --------------------------------
    def _no_sync(self):
        if self.fsdp2:
            return contextlib.nullcontext()  # FSDP2 reduce-scatters every backward (see _fsdp2_reduces_every_backward)
        if self.accelerator is not None:
            return self.accelerator.no_sync(self.model)
        if isinstance(self.model, nn.parallel.DistributedDataParallel):
            return self.model.no_sync()
        return contextlib.nullcontext()

    def _backward(self, loss: torch.Tensor) -> None:
        if self.accelerator is not None:
            self.accelerator.backward(loss)
        else:
            loss.backward()

    def _grad_scaler(self):
        scaler = getattr(self.accelerator, "scaler", None)
        return scaler if scaler is not None and scaler.is_enabled() else None

    def ascent_gradient(self, loss: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """∇loss over `params`, through autograd.grad: `.grad` (maybe holding accumulated gradients) is untouched."""
        scaler = self._grad_scaler()
        if scaler is not None:  # fp16: scale so small gradients survive, then unscale before any norm
            grads = torch.autograd.grad(scaler.scale(loss), params, allow_unused=True, materialize_grads=True)
            scale = scaler._get_scale_async()  # the scale as a tensor: get_scale() would sync
            torch._foreach_mul_(grads, scale.double().reciprocal().float())
            return list(grads)
        return list(torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True))

    def _union_ascent_gradient(self, loss: torch.Tensor, params: list[torch.Tensor], a: int | float | torch.Tensor) -> list[torch.Tensor]:
        """Synchronized scope: g_j of the union over devices of their j-th micro-batches, on every device.

        Device r weighs a_r / Σ_r a_r (see `backward`'s `sync_weight`), so devices whose micro-batches differ in
        size or token count weigh as in the union. Under FSDP2 the returned tensors are this rank's shards;
        otherwise whole gradients, the same on every device."""
        group = self._group(params)
        if group is None and not self.fsdp2:
            return self.ascent_gradient(loss, params)  # a single process: the union is this micro-batch
        device = loss.device
        dtype = _weight_dtype(device)  # Python numbers straight to float64: through float32 they would round
        # torch.full, not torch.tensor: a Python number copied to the device would wait for it (a host sync).
        c = (a.to(device=device, dtype=dtype) if isinstance(a, torch.Tensor) else torch.full((), float(a), dtype=dtype, device=device)).reshape(())
        total = c.clone()
        if group is not None:
            dist.all_reduce(total, group=group)
        if self.fsdp2:
            # FSDP2's reduce-scatter averages over the W ranks: weigh the loss by W·c_r/Σc so the mean is Σ c_r g_r / Σ c.
            world = dist.get_world_size(group) if group is not None else 1
            return self._sharded_ascent_gradient(loss * (c * world / total).to(loss.dtype), params)
        g = self.ascent_gradient(loss, params)
        flat = torch.cat([t.reshape(-1) for t in g])  # one all-reduce for all tensors
        flat.mul_((c / total).to(flat.dtype))
        dist.all_reduce(flat, group=group)
        torch._foreach_copy_(g, [v.view_as(t) for v, t in zip(flat.split([t.numel() for t in g]), g)])
        return g

    def _sharded_ascent_gradient(self, loss: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """FSDP2: ∇loss as this rank's shards of the gradient FSDP2 reduce-scatters (the mean over ranks).

        torch.autograd.grad does not reach FSDP2's sharded parameters, so this is a plain backward with the
        accumulated `.grad` set aside and put back afterwards (it is left exactly as it was)."""
        saved = [p.grad for p in params]
        for p in params:
            p.grad = None
        try:
            scaler = self._grad_scaler()
            (scaler.scale(loss) if scaler is not None else loss).backward()
            with torch.no_grad():
                g = [torch.zeros_like(_local(p)) if p.grad is None else _local(p.grad) for p in params]
            if scaler is not None:  # unscale before any norm, without a host sync
                torch._foreach_mul_(g, scaler._get_scale_async().double().reciprocal().float())
        finally:
            for p, s in zip(params, saved):
                p.grad = s
        return g

    def _accumulate(self, d: list[torch.Tensor], params: list[torch.Tensor], c: float | torch.Tensor | None) -> None:
        """.grad += c·d, as a backward of the linear function c·⟨d, w⟩ (whose gradient is c·d): DDP's
        all-reduce, fp16 loss scaling and accelerate's accumulation scaling then treat d like any gradient."""
        surrogate = sum(torch.sum(d_i.detach() * p) for d_i, p in zip(d, params))
        self._backward(_weighted(surrogate, c))

    # -- the method -----------------------------------------------------------------------------
    def backward(
        self,
        batch: Any,
        loss_fn: Callable[[Any], torch.Tensor],
        size_fn: Callable[[Any], int | torch.Tensor] | None = None,
        split_fn: Callable[[Any, int | None], list[Any]] | None = None,
        *,
        step: Any = None,
        rho: float | torch.Tensor | None = None,
        sync_weight: str = "size",
    ) -> torch.Tensor:
        """Accumulate the mSAM gradient of `batch` into `.grad`; return the clean loss, detached.

        `loss_fn(micro_batch)` returns the mean loss over that micro-batch. Micro-batch j is weighted
        by size_fn(B_j) / size_fn(batch), by default its share of the examples, n_j / n.
        `split_fn(batch, micro_batch_size)` cuts the batch into micro-batches (default: `split_batch`, along dim 0).
        `step` names the optimizer step: calls with the same `step` are accumulation steps of one optimizer
        step (None: every call is a step of its own). `rho` overrides the rule's radius for this call.

        `sync_weight` says how devices weigh in a synchronized ascent gradient. "size": `loss_fn` returns the
        mean over the micro-batch (times a factor common to all devices), and device r weighs size_fn(B_r,j),
        which makes the average the gradient of the union's mean. "share": `loss_fn` returns the micro-batch's
        share of a sum normalized by a count common to all devices, divided by c_j (the Trainer's losses under
        `num_items_in_batch` counted over all devices), and device r weighs c_r,j, which makes the average
        the union's gradient up to a positive factor; e_j then has exactly the union's direction.
        """
        if sync_weight not in ("size", "share"):
            raise ValueError(f"sync_weight must be 'size' or 'share', got {sync_weight!r}.")
        if self.fsdp2:
            with self._fsdp2_reduces_every_backward():
                return self._backward_all(batch, loss_fn, size_fn, split_fn, step, rho, sync_weight)
        return self._backward_all(batch, loss_fn, size_fn, split_fn, step, rho, sync_weight)

    def _backward_all(self, batch, loss_fn, size_fn, split_fn, step, rho, sync_weight) -> torch.Tensor:
        params = [p for p in self.model.parameters() if p.requires_grad]  # frozen (PEFT) weights: never perturbed
        with torch.no_grad():  # the tensors perturbed and restored: under FSDP2, this rank's shards
            local = [_local(p) for p in params] if self.fsdp2 else params
        shard_group = self._group(params) if self.fsdp2 else None  # FSDP2: the rules' norms sum over all shards
        micro_batches = (split_fn or split_batch)(batch, self.micro_batch_size)
        weights = [None] if len(micro_batches) == 1 else micro_batch_weights(micro_batches, size_fn)
        if step is None or step != self._step:  # a new optimizer step: perturbed, or (LookSAM) reuse
            self._step, self._mode = step, self.descent.begin_step()
            self.stats.steps += self._mode == "perturbed"
        if self._mode == "reuse":
            return self._reuse_backward(params, micro_batches, weights, loss_fn)

        explicit = self.descent.explicit  # GSAM, LookSAM: the descent needs g_j and g_p,j themselves
        clean_pass = self.perturbation.needs_gradient  # Momentum-SAM: e comes from the optimizer, no clean pass
        norm_modules = _modules_with_running_stats(self.model) if clean_pass else []
        w = [p.detach().clone() for p in local]  # restore by copy: w + e - e is not w in floating point
        clean_total = perturbed_total = 0.0
        for j, (mb, c_j) in enumerate(zip(micro_batches, weights)):
            last = j == len(micro_batches) - 1
            self.micro_batch_weight = 1.0 if c_j is None else c_j  # for loss_fns that normalize by a global count
            try:
                # 1. Clean pass at w: the ascent gradient g_j, .grad untouched. Device-local scope: of this
                #    device's micro-batch; synchronized: of the union of all devices' j-th micro-batches.
                g = None
                if clean_pass:
                    with self._no_sync():
                        clean_loss = loss_fn(mb)
                        if self.sync_perturbation:
                            a = (size_fn or batch_size_of)(mb) if sync_weight == "size" else (1.0 if c_j is None else c_j)
                            g = self._union_ascent_gradient(clean_loss, params, a)
                        else:
                            g = self.ascent_gradient(clean_loss, params)
                # 2. e_j from g_j (in g's storage, so keep a copy of g_j when the descent needs it);
                #    e_j = 0 and ok False when g_j is zero, non-finite or overflowed in fp16.
                with _scoped(_SHARD_GROUP, shard_group), _scoped(_SHARDED_PARAMS, params if self.fsdp2 else None):
                    e, grad_norm, ok = self.perturbation.perturb(local, [t.clone() for t in g] if explicit else g, rho)
                if not explicit:
                    g = None  # e lives in g's storage: no other reference may keep it alive past `del e`
                # 3. Climb to w + e_j, and take the gradient there. Only the last micro-batch may
                #    synchronize: DDP all-reduces everything accumulated so far.
                if e is not None:
                    with torch.no_grad():
                        torch._foreach_add_(local, e)
                    del e
                    # Inside an enclosing autocast region, casts of w are cached: drop them, or the
                    # forward below would silently run at the stale, unperturbed w.
                    torch.clear_autocast_cache()
                with contextlib.nullcontext() if last else self._no_sync(), _running_stats_frozen(norm_modules):
                    self.reported_pass = not clean_pass  # the loss at w + e is reported only without a clean pass
                    perturbed_loss = loss_fn(mb)
                    if explicit:
                        g_p = self.ascent_gradient(perturbed_loss, params)  # g_p,j; .grad untouched
                    else:
                        self._backward(_weighted(perturbed_loss, c_j))  # SAM: .grad += c_j·g_p,j
            finally:
                self.reported_pass = True
                # 4. Back to w, bitwise, whatever happened above.
                with torch.no_grad():
                    torch._foreach_copy_(local, w)
                torch.clear_autocast_cache()
            # 5. GSAM, LookSAM: .grad += c_j·D(g_j, g_p,j) (the forward above decided whether DDP syncs).
            if explicit:
                self._accumulate(self.descent.descent(g, g_p, 1.0 if c_j is None else c_j), params, c_j)
                del g, g_p

            perturbed_loss = perturbed_loss.detach()
            clean_loss = clean_loss.detach() if clean_pass else perturbed_loss  # Momentum-SAM: only w + e was seen
            clean_total = clean_total + _weighted(clean_loss, c_j)
            perturbed_total = perturbed_total + _weighted(perturbed_loss, c_j)
            self.stats.ascent_grad_norm = self.stats.ascent_grad_norm + grad_norm.detach()
            self.stats.micro_batches += 1
            self.stats.skipped = self.stats.skipped + (~ok).to(torch.int64)  # a tensor: counting never syncs
        self.stats.clean_loss = self.stats.clean_loss + clean_total
        self.stats.perturbed_loss = self.stats.perturbed_loss + perturbed_total
        return clean_total

    def _reuse_backward(self, params, micro_batches, weights, loss_fn) -> torch.Tensor:
        """A reuse step (LookSAM between its SAM steps): one pass at w per micro-batch, descent from g_j alone."""
        total = 0.0
        for j, (mb, c_j) in enumerate(zip(micro_batches, weights)):
            last = j == len(micro_batches) - 1
            self.micro_batch_weight = 1.0 if c_j is None else c_j
            with contextlib.nullcontext() if last else self._no_sync():
                loss = loss_fn(mb)
                g = self.ascent_gradient(loss, params)
            self._accumulate(self.descent.reuse(g), params, c_j)
            total = total + _weighted(loss.detach(), c_j)
        return total
