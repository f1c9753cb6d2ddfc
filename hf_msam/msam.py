"""Micro-batch sharpness-aware minimization (mSAM, Behdin et al. 2023, arXiv 2302.09693).

For each micro-batch B_j of a (device-local) batch of n examples, n_j of them in B_j:

    g_j = ∇L_{B_j}(w)                       ascent gradient, local to this device
    e_j = ρ · g_j / ‖g_j‖                   SAM;  ASAM: e_j = ρ · T²g_j / ‖T g_j‖,  T = |w| + η
    ∇  += (n_j / n) · ∇L_{B_j}(w + e_j)     descent gradient, accumulated into .grad

and w comes back to exactly what it was after every micro-batch. SAM is the case of one micro-batch.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["MicroBatchSAM", "PerturbationRule", "SAMPerturbation", "MSAMStats", "split_batch", "batch_size_of", "micro_batch_weights"]


class PerturbationRule:
    """Turns the ascent gradient g_j into the perturbation e_j. Subclass to change the rule.

    A rule is called once per micro-batch, with the trainable parameters w and their ascent
    gradients g (same order, g already unscaled from any fp16 loss scale). It returns e, a list of
    tensors shaped like w (it may reuse the storage of g), or None to leave w unperturbed for this
    micro-batch, together with the gradient norm it measured (a 0-d tensor, for logging).
    `enabled` False tells the trainer to take the plain, single-pass step.
    """

    enabled: bool = True

    def __call__(self, params: list[torch.Tensor], grads: list[torch.Tensor]) -> tuple[list[torch.Tensor] | None, torch.Tensor]:
        raise NotImplementedError


def _global_norm(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """‖(t_1, ..., t_m)‖₂ over all tensors, accumulated in at least float32."""
    dtype = functools.reduce(torch.promote_types, {t.dtype for t in tensors}, torch.float32)
    norms = torch._foreach_norm(tensors, 2, dtype=dtype)
    device = tensors[0].device
    return torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]))


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

    def __call__(self, params, grads):
        if self.adaptive:
            # g ← T g in place (T recomputed per tensor: no extra copy of the model); later g ← T² g.
            for p, g in zip(params, grads):
                g.mul_(p.detach().abs().add_(self.eta))
        grad_norm = _global_norm(grads)
        norm = grad_norm.item()
        # A zero or non-finite gradient has no direction to climb in (davda54/sam#14): skip, never divide.
        if not math.isfinite(norm) or norm == 0.0:
            return None, grad_norm
        if self.adaptive:
            for p, g in zip(params, grads):
                g.mul_(p.detach().abs().add_(self.eta))
        torch._foreach_mul_(grads, self.rho / (norm + self.eps))  # e, in the storage of g
        return grads, grad_norm


@dataclass
class MSAMStats:
    """Running sums over the micro-batches seen since the last `reset()` (tensors stay on device: no sync)."""

    clean_loss: float | torch.Tensor = 0.0  # Σ of the clean losses `backward` returned
    perturbed_loss: float | torch.Tensor = 0.0  # the same sums at w + e
    ascent_grad_norm: float | torch.Tensor = 0.0  # Σ over micro-batches of ‖g_j‖ (ASAM: ‖T g_j‖)
    micro_batches: int = 0
    skipped: int = 0  # perturbations skipped: zero, non-finite or fp16-overflowed ascent gradient

    def reset(self) -> None:
        self.clean_loss = self.perturbed_loss = self.ascent_grad_norm = 0.0
        self.micro_batches = self.skipped = 0


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


def micro_batch_weights(micro_batches: list[Any], size_fn: Callable[[Any], int | torch.Tensor] | None = None) -> list[float]:
    """c_j = size(B_j) / Σ_i size(B_i), as Python floats (exact in double precision, whatever the loss dtype).

    Sizes given as tensors (label-token counts, say) come to the host in one transfer, not one per micro-batch.
    """
    sizes = [(size_fn or batch_size_of)(mb) for mb in micro_batches]
    device = next((n.device for n in sizes if isinstance(n, torch.Tensor)), None)
    if device is not None:
        sizes = torch.stack([torch.as_tensor(n, device=device) for n in sizes]).tolist()
    total = float(sum(sizes))
    return [float(n) / total for n in sizes]


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


class MicroBatchSAM:
    """The mSAM gradient, in one call: ``loss = sam.backward(batch, loss_fn)``.

    `backward` splits `batch` into micro-batches of `micro_batch_size` examples (None: one
    micro-batch), perturbs the weights separately for each from its own gradient, and ADDS the
    size-weighted mean of the perturbed gradients to `.grad` (accumulating like `loss.backward()`).
    It returns the clean loss at w of the whole batch, detached, and leaves w bitwise as it was,
    even when a pass raises.

    With an `accelerator` (or a model wrapped in DistributedDataParallel), the ascent passes and
    every perturbed pass but the last run without gradient synchronization: each device perturbs
    with its own micro-batches, and the descent gradient is all-reduced once, by the last backward,
    exactly as for a plain step. Backward goes through `accelerator.backward`, so fp16 loss scaling
    and accelerate's gradient-accumulation scaling apply as usual.
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
    ):
        if micro_batch_size is not None and micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be None or >= 1, got {micro_batch_size}.")
        self.model = model
        self.micro_batch_size = micro_batch_size
        self.accelerator = accelerator
        self.perturbation = perturbation if perturbation is not None else SAMPerturbation(rho, adaptive, adaptive_eta, eps)
        self.stats = MSAMStats()
        self.micro_batch_weight = 1.0  # c_j of the micro-batch `backward` is working on

    # -- the contexts and the backward the accelerator would use --------------------------------
    def _no_sync(self):
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
            torch._foreach_mul_(grads, 1.0 / scaler.get_scale())
            return list(grads)
        return list(torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True))

    # -- the method -----------------------------------------------------------------------------
    def backward(
        self,
        batch: Any,
        loss_fn: Callable[[Any], torch.Tensor],
        size_fn: Callable[[Any], int | torch.Tensor] | None = None,
        split_fn: Callable[[Any, int | None], list[Any]] | None = None,
    ) -> torch.Tensor:
        """Accumulate the mSAM gradient of `batch` into `.grad`; return the clean loss, detached.

        `loss_fn(micro_batch)` returns the mean loss over that micro-batch. Micro-batch j is weighted
        by size_fn(B_j) / size_fn(batch), by default its share of the examples, n_j / n.
        `split_fn(batch, micro_batch_size)` cuts the batch into micro-batches (default: `split_batch`, along dim 0).
        """
        params = [p for p in self.model.parameters() if p.requires_grad]  # frozen (PEFT) weights: never perturbed
        micro_batches = (split_fn or split_batch)(batch, self.micro_batch_size)
        if len(micro_batches) == 1:
            weights = [None]
        else:
            weights = micro_batch_weights(micro_batches, size_fn)

        norm_modules = _modules_with_running_stats(self.model)
        w = [p.detach().clone() for p in params]  # restore by copy: w + e - e is not w in floating point
        clean_total = perturbed_total = 0.0
        for j, (mb, c_j) in enumerate(zip(micro_batches, weights)):
            last = j == len(micro_batches) - 1
            self.micro_batch_weight = 1.0 if c_j is None else c_j  # for loss_fns that normalize by a global count
            try:
                # 1. Clean pass at w: the ascent gradient g_j, local to this device, .grad untouched.
                with self._no_sync():
                    clean_loss = loss_fn(mb)
                    g = self.ascent_gradient(clean_loss, params)
                # 2. e_j from g_j; None when g_j is zero, non-finite, or overflowed in fp16.
                e, grad_norm = self.perturbation(params, g)
                del g
                skipped = e is None
                # 3. Climb to w + e_j, and accumulate the weighted gradient there. Only the last
                #    micro-batch may synchronize: DDP all-reduces everything accumulated so far.
                if e is not None:
                    with torch.no_grad():
                        torch._foreach_add_(params, e)
                    del e
                    # Inside an enclosing autocast region, casts of w are cached: drop them, or the
                    # forward below would silently run at the stale, unperturbed w.
                    torch.clear_autocast_cache()
                with contextlib.nullcontext() if last else self._no_sync(), _running_stats_frozen(norm_modules):
                    perturbed_loss = loss_fn(mb)
                    self._backward(perturbed_loss if c_j is None else perturbed_loss * c_j)
            finally:
                # 4. Back to w, bitwise, whatever happened above.
                with torch.no_grad():
                    torch._foreach_copy_(params, w)
                torch.clear_autocast_cache()

            clean_loss, perturbed_loss = clean_loss.detach(), perturbed_loss.detach()
            clean_total = clean_total + (clean_loss if c_j is None else clean_loss * c_j)
            perturbed_total = perturbed_total + (perturbed_loss if c_j is None else perturbed_loss * c_j)
            self.stats.ascent_grad_norm = self.stats.ascent_grad_norm + grad_norm.detach()
            self.stats.micro_batches += 1
            self.stats.skipped += int(skipped)
        self.stats.clean_loss = self.stats.clean_loss + clean_total
        self.stats.perturbed_loss = self.stats.perturbed_loss + perturbed_total
        return clean_total
