"""Is my model flatter? The Hessian, the (m)SAM sharpness and the loss landscape of a model's own loss.

Every function here takes `batches`, an iterable of model-input dicts (what a `DataLoader` yields,
`labels` included), and measures the size-weighted mean of the model's own `loss` over them,

    L(w) = Σ_b n_b L_b(w) / Σ_b n_b,

as a function of the trainable parameters w only (with PEFT: the adapter), n_b the examples of batch b or, with
`size_fn`, its label tokens (a token-level loss: `MSAMTrainer.evaluate` weighs causal-LM batches so):

- `hessian_top_eigenvalue`: λ_max of ∇²L, by power iteration on Hessian-vector products (PyHessian, Yao et al.
  2020);
- `hessian_trace`: tr ∇²L, by Hutchinson's estimator E[zᵀ∇²L z] with Rademacher z (Hutchinson 1989);
- `sharpness`: the mean over micro-batches of L_j(w + e_j) − L_j(w), e_j the (m)SAM perturbation: what mSAM minimizes;
- `loss_landscape`, `plot_loss_landscape`: L along filter-normalized random directions (Li et al. 2018).

They run the model in eval mode (no dropout, BatchNorm on its running statistics), so that L is a
function of w alone, on the device the model is on, and leave it bitwise as they found it, in the
train/eval mode each of its modules was in. Hessian-vector products are double backward passes
(`torch.autograd.grad` with `create_graph=True`), so the model must be twice differentiable.

A model sharded with FSDP2 (`fully_shard`) is measured on the union of all processes' batches, every process
getting the same numbers: there Hessian-vector products are central finite differences of the gradients FSDP2
reduce-scatters, every vector sharded like the weights, norms and dot products summed over the shards (see
docs/flatness.md). `loss_landscape` does not support FSDP2.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import math
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.distributed as dist
from accelerate.utils import send_to_device
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm

from .batches import batch_size_of, split_batch
from .methods.sam import SAMPerturbation
from .ops import SHARD_GROUP, dot, global_norm, local, scoped
from .training_args import msam_setting

SizeFn = Callable[[Mapping[str, Any]], "int | torch.Tensor"]  # a batch's weight n_b in the mean loss

__all__ = [
    "LossLandscape",
    "check_flatness_supported",
    "evaluate_flatness",
    "hessian_top_eigenvalue",
    "hessian_trace",
    "loss_landscape",
    "plot_loss_landscape",
    "quantization_backend_name",
    "quantization_sensitivity",
    "quantize_rows",
    "sharpness",
]

DEFAULT_RHO = 0.05  # the radius `sharpness` measures at by default
LANDSCAPE_JSON, LANDSCAPE_PNG = "loss_landscape.json", "loss_landscape.png"
_PROGRESS_DELAY_S = 2.0  # a progress bar appears only when a computation has run this long


# ---------------------------------------------------------------------------------------------
# The loss L(w) and its Hessian-vector products
# ---------------------------------------------------------------------------------------------


def _trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"{type(model).__name__} has no trainable parameters (requires_grad=True): nothing to measure")
    return params


def _materialize(
    batches: Iterable[Mapping[str, Any]], device: torch.device, size_fn: SizeFn | None = None
) -> list[tuple[Mapping[str, Any], int]]:
    """The batches, on `device`, with their weights n_b (`size_fn`, default their examples): read once, since they are
    used many times."""
    size_fn = size_fn or batch_size_of
    if isinstance(batches, Mapping):
        raise TypeError("`batches` must be an iterable of batches, got a single dict: pass [batch].")
    data = []
    for batch in batches:
        if not isinstance(batch, Mapping):
            raise TypeError(f"Each batch must be a dict of model inputs, got a {type(batch).__name__}")
        batch = send_to_device(batch, device)
        data.append((batch, int(size_fn(batch))))
    if not data:
        raise ValueError("`batches` is empty: give at least one batch of model inputs, labels included.")
    return data


def _loss(model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
    """The model's own `loss` on `batch`, a 0-d tensor."""
    output = model(**batch)
    loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
    if loss is None:
        raise ValueError(
            f"{type(model).__name__} returned no `loss` for a batch with keys {sorted(batch)}: the flatness "
            "measures need the model's own loss. Include the labels in each batch (e.g. `labels`)."
        )
    if loss.numel() != 1:
        raise ValueError(f"The model's `loss` must be a single number, got a tensor of shape {tuple(loss.shape)}.")
    return loss.reshape(())


def _accumulation_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def _mean_loss(model: nn.Module, data: list[tuple[Mapping[str, Any], int]]) -> float:
    """L(w) = Σ_b n_b L_b(w) / Σ_b n_b."""
    total = sum(n for _, n in data)
    return sum(n * _loss(model, batch).double().item() for batch, n in data) / total


def _hessian_vector_product(
    model: nn.Module, params: list[nn.Parameter], data: list[tuple[Mapping[str, Any], int]], v: list[torch.Tensor]
) -> list[torch.Tensor]:
    """∇²L(w) v = Σ_b (n_b / n) ∇(∇L_b(w) · v), one double backward pass per batch."""
    total = sum(n for _, n in data)
    hv = [torch.zeros_like(x) for x in v]
    # The fused attention kernels have no double backward: take the (exact, slower) math one.
    with sdpa_kernel(SDPBackend.MATH):
        for batch, n in data:
            loss = _loss(model, batch)
            g = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True, materialize_grads=True)
            gv = sum((g_i * v_i.to(g_i.dtype)).sum() for g_i, v_i in zip(g, v))
            if not gv.requires_grad:
                continue  # ∇L_b does not depend on w: L_b is linear in w, its Hessian 0
            h = torch.autograd.grad(gv, params, allow_unused=True, materialize_grads=True)
            torch._foreach_add_(hv, [h_i.to(x.dtype) for h_i, x in zip(h, v)], alpha=n / total)
    return hv


# ---------------------------------------------------------------------------------------------
# FSDP2: each rank holds a shard of w, and of every vector; Hessian-vector products by finite differences
# ---------------------------------------------------------------------------------------------


@dataclass
class _Sharding:
    """A model sharded with FSDP2 (`fully_shard`): the process group, its size, and N = Σ n_b over all ranks' batches.
    L is then the mean over the union of all ranks' batches, and every rank gets the same numbers."""

    group: Any
    world: int
    total: float


def _sharding(model: nn.Module, params: list[nn.Parameter], data: list[tuple[Mapping[str, Any], int]]) -> _Sharding | None:
    from .integrations.torch_internals import is_fsdp2 as _is_fsdp2

    if not _is_fsdp2(model):
        return None
    meshes = {p.device_mesh for p in params if hasattr(p, "device_mesh")}
    if len(meshes) != 1 or next(iter(meshes)).ndim != 1:
        raise NotImplementedError(
            "The flatness measures under FSDP2 need every trainable parameter sharded over one one-dimensional mesh "
            "(plain fully_shard, not HSDP or a 2-D mesh)."
        )
    group = next(iter(meshes)).get_group()
    counts = torch.tensor([len(data), -len(data)], dtype=torch.int64, device=params[0].device)
    dist.all_reduce(counts, op=dist.ReduceOp.MAX, group=group)
    if counts[0].item() != -counts[1].item():
        raise ValueError(
            f"Under FSDP2 every rank must measure the same number of batches (each forward is a collective); this "
            f"rank has {len(data)}, another {counts[0].item() if counts[0].item() != len(data) else -counts[1].item()}."
        )
    return _Sharding(group, dist.get_world_size(group), _global_sum(sum(n for _, n in data), params[0].device, group))


def _global_sum(x: float, device: torch.device, group: Any) -> float:
    t = torch.full((), float(x), dtype=torch.float64, device=device)
    dist.all_reduce(t, group=group)
    return t.item()


def _shard_of(full: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """This rank's part of `full`, a whole vector shaped like the (sharded) parameter `p`; `full` itself otherwise."""
    if not hasattr(p, "device_mesh"):
        return full.to(p.device)
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(p.device), p.device_mesh, p.placements, src_data_rank=None).to_local()


def _sharded_gradient(
    model: nn.Module, params: list[nn.Parameter], data: list[tuple[Mapping[str, Any], int]], sharding: _Sharding
) -> list[torch.Tensor]:
    """∇L(w) as this rank's shards: a plain backward per batch (torch.autograd.grad does not reach FSDP2's sharded
    parameters), weighed by W·n_b/N so that FSDP2's reduce-scatter, a mean over the W ranks, sums to ∇L of the
    union. `.grad` is set aside and put back."""
    return _sharded_loss_and_gradient(model, params, data, sharding)[1]


def _sharded_loss_and_gradient(
    model: nn.Module, params: list[nn.Parameter], data: list[tuple[Mapping[str, Any], int]], sharding: _Sharding
) -> tuple[float, list[torch.Tensor]]:
    """`_sharded_gradient`, and Σ_b n_b L_b(w) over this rank's batches."""
    saved = [p.grad for p in params]
    for p in params:
        p.grad = None
    rank_sum = 0.0
    try:
        for batch, n in data:
            loss = _loss(model, batch)
            (loss * (sharding.world * n / sharding.total)).backward()
            rank_sum += n * loss.double().item()
        with torch.no_grad():
            return rank_sum, [torch.zeros_like(local(p)) if p.grad is None else local(p.grad).clone() for p in params]
    finally:
        for p, g in zip(params, saved):
            p.grad = g


def _finite_difference_hessian_vector_product(
    model: nn.Module,
    params: list[nn.Parameter],
    data: list[tuple[Mapping[str, Any], int]],
    v: list[torch.Tensor],
    sharding: _Sharding,
) -> list[torch.Tensor]:
    """∇²L(w) v ≈ (∇L(w + h v) − ∇L(w − h v)) / 2h, every vector this rank's shards, h = ε^⅓·(1 + ‖w‖)/‖v‖ (ε of the
    parameters' dtype: the step that balances the O(h²) truncation error against rounding). The shards come back
    bitwise."""
    with torch.no_grad():
        shards = [local(p) for p in params]
        w = [t.detach().clone() for t in shards]
    with scoped(SHARD_GROUP, sharding.group):
        w_norm, v_norm = global_norm(w).item(), global_norm(v).item()
    if v_norm == 0:
        return [torch.zeros_like(x) for x in v]
    h = torch.finfo(w[0].dtype).eps ** (1 / 3) * (1 + w_norm) / v_norm
    gradients = []
    try:
        for sign in (1.0, -1.0):
            with torch.no_grad():
                torch._foreach_copy_(shards, w)
                torch._foreach_add_(shards, [x.to(t.dtype) for x, t in zip(v, shards)], alpha=sign * h)
            gradients.append(_sharded_gradient(model, params, data, sharding))
    finally:
        with torch.no_grad():
            torch._foreach_copy_(shards, w)
    return [(a.to(x.dtype) - b.to(x.dtype)) / (2 * h) for a, b, x in zip(*gradients, v)]


def _over_shards(sharding: _Sharding | None):
    """Norms and dot products (hf_msam.ops) sum over all shards under FSDP2."""
    return scoped(SHARD_GROUP, None if sharding is None else sharding.group)


def _hvp(model, params, data, v, sharding: _Sharding | None) -> list[torch.Tensor]:
    if sharding is None:
        return _hessian_vector_product(model, params, data, v)
    return _finite_difference_hessian_vector_product(model, params, data, v, sharding)


@contextlib.contextmanager
def _measuring(model: nn.Module):
    """Eval mode and autograd on (even under the caller's `torch.no_grad`); then each module back in its mode."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.enable_grad():
            yield
    finally:
        for module, training in modes:
            module.training = training


def _progress(total: int, desc: str, enabled: bool) -> tqdm:
    return tqdm(total=total, desc=desc, delay=_PROGRESS_DELAY_S, leave=False, disable=not enabled)


# ---------------------------------------------------------------------------------------------
# Hessian spectrum
# ---------------------------------------------------------------------------------------------


def hessian_top_eigenvalue(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    iters: int = 100,
    tol: float = 1e-4,
    seed: int = 0,
    *,
    progress_bar: bool = True,
    size_fn: SizeFn | None = None,
) -> float:
    r"""
    The top eigenvalue λ_max of the Hessian of the loss, by power iteration on Hessian-vector products.

    From a Gaussian v (drawn on the CPU from `seed`, so the same on any device), repeats
    λ ← vᵀHv, v ← Hv/‖Hv‖ until λ changes by at most `tol`·|λ| (as PyHessian, Yao et al. 2020). This
    is the eigenvalue of largest magnitude: λ_max at a minimum, where H is positive semi-definite.

    Args:
        model (`nn.Module`):
            Called as `model(**batch)`; must return its `loss`. Only the trainable parameters count.
        batches (iterable of `dict`):
            Model inputs with labels. The Hessian is that of the size-weighted mean loss over all of them.
        iters (`int`, *optional*, defaults to 100):
            At most this many Hessian-vector products (each a double backward pass over every batch).
        tol (`float`, *optional*, defaults to 1e-4):
            Relative change of λ at which to stop.
        seed (`int`, *optional*, defaults to 0):
            Seed of the starting vector.
        progress_bar (`bool`, *optional*, defaults to `True`):
            Show a progress bar when the computation takes more than a couple of seconds.
        size_fn (callable, *optional*):
            The weight n_b of a batch (or micro-batch) in the mean loss; default: its number of examples. For a
            token-level loss (a causal LM's), the number of label tokens makes L the mean over tokens, as the
            `Trainer`'s loss is (`MSAMTrainer.evaluate` passes that).

    Returns:
        `float`: the estimate of λ_max.
    """
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}.")
    params = _trainable_parameters(model)
    data = _materialize(batches, params[0].device, size_fn)
    sharding = _sharding(model, params, data)
    generator = torch.Generator().manual_seed(seed)
    v = [_shard_of(torch.randn(p.shape, generator=generator, dtype=_accumulation_dtype(p)), p) for p in params]
    eigenvalue = None
    with _measuring(model), _progress(iters, "Hessian top eigenvalue", progress_bar) as bar, _over_shards(sharding):
        norm = dot(v, v).sqrt()
        v = [x / norm for x in v]
        for _ in range(iters):
            hv = _hvp(model, params, data, v, sharding)
            rayleigh = dot(v, hv).item()  # vᵀHv, ‖v‖ = 1
            norm = dot(hv, hv).sqrt()
            bar.update()
            if norm == 0:
                return 0.0  # Hv = 0 for a random v: H = 0
            v = [x / norm for x in hv]
            converged = eigenvalue is not None and abs(rayleigh - eigenvalue) <= tol * (abs(eigenvalue) + 1e-6)
            eigenvalue = rayleigh
            if converged:
                break
    return eigenvalue


def hessian_trace(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    samples: int = 100,
    seed: int = 0,
    *,
    progress_bar: bool = True,
    size_fn: SizeFn | None = None,
) -> float:
    r"""
    The trace of the Hessian of the loss, by Hutchinson's estimator: tr H ≈ (1/m) Σ_k z_kᵀ H z_k.

    The z_k are Rademacher vectors (entries ±1, drawn on the CPU from `seed`), for which the estimate is
    unbiased with variance 2(‖H‖_F² − Σ_i H_ii²)/m: exact when H is diagonal.

    Args:
        model (`nn.Module`):
            Called as `model(**batch)`; must return its `loss`. Only the trainable parameters count.
        batches (iterable of `dict`):
            Model inputs with labels. The Hessian is that of the size-weighted mean loss over all of them.
        samples (`int`, *optional*, defaults to 100):
            m, the number of Hessian-vector products (each a double backward pass over every batch).
        seed (`int`, *optional*, defaults to 0):
            Seed of the z_k.
        progress_bar (`bool`, *optional*, defaults to `True`):
            Show a progress bar when the computation takes more than a couple of seconds.
        size_fn (callable, *optional*):
            The weight n_b of a batch (or micro-batch) in the mean loss; default: its number of examples. For a
            token-level loss (a causal LM's), the number of label tokens makes L the mean over tokens, as the
            `Trainer`'s loss is (`MSAMTrainer.evaluate` passes that).

    Returns:
        `float`: the estimate of tr H.
    """
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}.")
    params = _trainable_parameters(model)
    data = _materialize(batches, params[0].device, size_fn)
    sharding = _sharding(model, params, data)
    generator = torch.Generator().manual_seed(seed)
    estimates = []
    with _measuring(model), _progress(samples, "Hessian trace", progress_bar) as bar, _over_shards(sharding):
        for _ in range(samples):
            bits = [torch.randint(0, 2, p.shape, generator=generator) for p in params]
            z = [_shard_of((2 * b - 1).to(dtype=_accumulation_dtype(p)), p) for b, p in zip(bits, params)]  # ±1
            estimates.append(dot(z, _hvp(model, params, data, z, sharding)))
            bar.update()
    return torch.stack(estimates).mean().item()


# ---------------------------------------------------------------------------------------------
# Sharpness, as mSAM sees it
# ---------------------------------------------------------------------------------------------


def sharpness(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    rho: float = DEFAULT_RHO,
    micro_batch_size: int | None = None,
    adaptive: bool = False,
    adaptive_eta: float = 0.01,
    eps: float = 1e-12,
    *,
    progress_bar: bool = True,
    size_fn: SizeFn | None = None,
) -> float:
    r"""
    The sharpness mSAM minimizes: the mean over micro-batches B_j of L_j(w + e_j) − L_j(w).

    Each batch is split into micro-batches of `micro_batch_size` examples (`None`: the batch is one
    micro-batch), and each gets its own perturbation from its own gradient g_j, by the rule the trainer
    uses ([`SAMPerturbation`]): e_j = ρ·g_j/‖g_j‖, or with `adaptive` (ASAM) e_j = ρ·T²g_j/‖T g_j‖ with
    T = |w| + η. The mean weighs micro-batch j by its size n_j, as training does (the plain mean when
    they are all the same size); a micro-batch with a zero or non-finite gradient is not perturbed and
    adds 0, as in training.

    Args:
        model (`nn.Module`):
            Called as `model(**batch)`; must return its `loss`. Only the trainable parameters are perturbed.
        batches (iterable of `dict`):
            Model inputs with labels.
        rho (`float`, *optional*, defaults to 0.05):
            The perturbation radius ρ.
        micro_batch_size (`int` or `None`, *optional*, defaults to `None`):
            Examples per micro-batch; `None`: each batch is one micro-batch (SAM).
        adaptive (`bool`, *optional*, defaults to `False`):
            ASAM scaling of the perturbation.
        adaptive_eta (`float`, *optional*, defaults to 0.01):
            η of ASAM.
        eps (`float`, *optional*, defaults to 1e-12):
            Added to the gradient norm in the denominator of e_j.
        progress_bar (`bool`, *optional*, defaults to `True`):
            Show a progress bar when the computation takes more than a couple of seconds.
        size_fn (callable, *optional*):
            The weight n_b of a batch (or micro-batch) in the mean loss; default: its number of examples. For a
            token-level loss (a causal LM's), the number of label tokens makes L the mean over tokens, as the
            `Trainer`'s loss is (`MSAMTrainer.evaluate` passes that).

    Returns:
        `float`: the sharpness, in units of the loss.
    """
    if not (math.isfinite(rho) and rho >= 0):
        raise ValueError(f"rho must be a finite number >= 0, got {rho!r}.")
    if micro_batch_size is not None and micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be None or >= 1, got {micro_batch_size}.")
    perturbation = SAMPerturbation(rho=rho, adaptive=adaptive, eta=adaptive_eta, eps=eps)
    params = _trainable_parameters(model)
    size_fn = size_fn or batch_size_of  # micro-batches weigh as batches do
    data = _materialize(batches, params[0].device, size_fn)
    micro_batches = [mb for batch, _ in data for mb in split_batch(batch, micro_batch_size)]
    if _sharding(model, params, data) is not None:
        return _sharded_sharpness(model, params, micro_batches, perturbation, size_fn, progress_bar)
    w = [p.detach().clone() for p in params]  # restore by copy: w + e - e is not w in floating point
    rise, total = 0.0, 0
    with _measuring(model), _progress(len(micro_batches), "Sharpness", progress_bar) as bar:
        for mb in micro_batches:
            n_j = int(size_fn(mb))
            clean_loss = _loss(model, mb)
            g = list(torch.autograd.grad(clean_loss, params, allow_unused=True, materialize_grads=True))
            e, _ = perturbation(params, g)
            if e is not None:
                try:
                    with torch.no_grad():
                        torch._foreach_add_(params, e)
                        perturbed_loss = _loss(model, mb)
                finally:
                    with torch.no_grad():
                        torch._foreach_copy_(params, w)
                rise += n_j * (perturbed_loss.double().item() - clean_loss.double().item())
            total += n_j
            bar.update()
    return rise / total


def _sharded_sharpness(model, params, micro_batches, perturbation, size_fn, progress_bar) -> float:
    """FSDP2: micro-batch j is the union of all ranks' j-th micro-batches (its gradient reduce-scattered, its norm
    summed over the shards, as the mSAM step under FSDP2 perturbs); each rank perturbs and restores its shards."""
    sharding = _sharding(model, params, [(mb, 0) for mb in micro_batches])  # the same count of micro-batches
    device = params[0].device
    with torch.no_grad():
        shards = [local(p) for p in params]
        w = [t.detach().clone() for t in shards]
    rise, total = 0.0, 0.0
    with _measuring(model), _progress(len(micro_batches), "Sharpness", progress_bar) as bar, _over_shards(sharding):
        for mb in micro_batches:
            n_j = int(size_fn(mb))
            n = _global_sum(n_j, device, sharding.group)  # the union micro-batch's weight
            clean_sum, g = _sharded_loss_and_gradient(model, params, [(mb, n_j)], _Sharding(sharding.group, sharding.world, n))
            e, _ = perturbation(shards, g)
            if e is not None:
                try:
                    with torch.no_grad():
                        torch._foreach_add_(shards, e)
                        perturbed_sum = n_j * _loss(model, mb).double().item()
                finally:
                    with torch.no_grad():
                        torch._foreach_copy_(shards, w)
                rise += _global_sum(perturbed_sum - clean_sum, device, sharding.group)
            total += n
            bar.update()
    return rise / total


# ---------------------------------------------------------------------------------------------
# Loss landscape (Li et al. 2018)
# ---------------------------------------------------------------------------------------------


@dataclass
class LossLandscape:
    """The loss on a grid through the weights w, along filter-normalized random directions d₁ (and d₂).

    Attributes:
        directions (`int`): 1 or 2.
        coordinates (`list[float]`): the grid on each axis, from −span to span; α = 0 is w itself.
        losses (`list[float]` or `list[list[float]]`): 1-D: `losses[i]` = L(w + α_i d₁);
            2-D: `losses[i][j]` = L(w + α_i d₁ + α_j d₂).
        seed (`int`): the seed the directions were drawn from.
    """

    directions: int
    coordinates: list[float]
    losses: list[float] | list[list[float]]
    seed: int = 0

    def to_json(self, path: str | os.PathLike) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(asdict(self), f, indent=2)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> LossLandscape:
        """Read what `to_json` wrote; `ValueError` when the file is not a loss landscape."""
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        try:
            landscape = cls(**data)
            steps = len(landscape.coordinates)
            rows = [landscape.losses] if landscape.directions == 1 else landscape.losses
            valid = landscape.directions in (1, 2) and steps >= 2
            valid = valid and len(rows) == (1 if landscape.directions == 1 else steps)
            valid = valid and all(len(row) == steps and all(isinstance(x, (int, float)) for x in row) for row in rows)
        except TypeError as error:
            raise ValueError(f"{path} is not a loss landscape: {error}") from error
        if not valid:
            raise ValueError(
                f"{path} is not a loss landscape: expected 1 or 2 directions, and losses on the coordinates' grid."
            )
        return landscape


def _filter_normalized_direction(params: list[torch.Tensor], generator: torch.Generator) -> list[torch.Tensor]:
    """d ~ N(0, I), then d_f ← d_f·‖w_f‖/‖d_f‖ for each filter f (Li et al. 2018, §4).

    A filter is a slice along dim 0 (a convolution filter, the weights into one unit of a linear layer,
    an embedding row); a 1-D or 0-D tensor (a bias, a norm's scale) is one filter. A filter of zeros
    (e.g. LoRA's B at initialization) gets a zero direction.
    """
    direction = []
    for p in params:
        w = p.detach().to(_accumulation_dtype(p))
        d = torch.randn(p.shape, generator=generator, dtype=w.dtype).to(p.device)
        rows = p.shape[0] if p.dim() >= 2 else 1
        w_f, d_f = w.reshape(rows, -1), d.reshape(rows, -1)
        d_f = d_f * (w_f.norm(dim=1, keepdim=True) / (d_f.norm(dim=1, keepdim=True) + 1e-10))
        direction.append(d_f.reshape(p.shape).to(p.dtype))
    return direction


def loss_landscape(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    directions: int = 1,
    span: float = 1.0,
    steps: int = 21,
    seed: int = 0,
    *,
    progress_bar: bool = True,
    size_fn: SizeFn | None = None,
) -> LossLandscape:
    r"""
    The loss along filter-normalized random directions through the weights (Li et al. 2018).

    With `directions=1`, L(w + α d₁) for `steps` values of α evenly spaced in [−span, span]; with
    `directions=2`, L(w + α d₁ + β d₂) on the `steps` × `steps` grid. Filter normalization gives each
    filter of d the norm of the same filter of w, so α = 1 moves every filter by its own size, and
    landscapes of differently scaled networks can be compared. With an odd `steps`, α = 0 is on the
    grid, and the loss there is exactly L(w).

    Args:
        model (`nn.Module`):
            Called as `model(**batch)`; must return its `loss`. Only the trainable parameters move.
        batches (iterable of `dict`):
            Model inputs with labels; the loss is the size-weighted mean over them.
        directions (`int`, *optional*, defaults to 1):
            1 (a curve) or 2 (a surface).
        span (`float`, *optional*, defaults to 1.0):
            The grid covers [−span, span] on each axis.
        steps (`int`, *optional*, defaults to 21):
            Grid points on each axis.
        seed (`int`, *optional*, defaults to 0):
            Seed of the directions (drawn on the CPU, so the same on any device).
        progress_bar (`bool`, *optional*, defaults to `True`):
            Show a progress bar when the computation takes more than a couple of seconds.
        size_fn (callable, *optional*):
            The weight n_b of a batch (or micro-batch) in the mean loss; default: its number of examples. For a
            token-level loss (a causal LM's), the number of label tokens makes L the mean over tokens, as the
            `Trainer`'s loss is (`MSAMTrainer.evaluate` passes that).

    Returns:
        [`LossLandscape`]: the grid and the losses on it.
    """
    if directions not in (1, 2):
        raise ValueError(f"directions must be 1 or 2, got {directions!r}.")
    if steps < 2:
        raise ValueError(f"steps must be >= 2, got {steps}.")
    if not (math.isfinite(span) and span > 0):
        raise ValueError(f"span must be a finite number > 0, got {span!r}.")
    params = _trainable_parameters(model)
    data = _materialize(batches, params[0].device, size_fn)
    from .integrations.torch_internals import is_fsdp2 as _is_fsdp2

    if _is_fsdp2(model):
        raise NotImplementedError(
            "loss_landscape does not support a model sharded with FSDP2 yet (its filter normalization needs whole "
            "filters): draw the landscape of the saved, unsharded model (or drop --msam_eval_landscape)."
        )
    generator = torch.Generator().manual_seed(seed)
    d = [_filter_normalized_direction(params, generator) for _ in range(directions)]
    # span·(2i − (steps−1))/(steps−1): α = 0 exactly in the middle of an odd grid.
    coordinates = [span * (2 * i - (steps - 1)) / (steps - 1) for i in range(steps)]
    grid = list(itertools.product(coordinates, repeat=directions))
    w = [p.detach().clone() for p in params]
    losses = []
    with _measuring(model), torch.no_grad(), _progress(len(grid), "Loss landscape", progress_bar) as bar:
        try:
            for point in grid:
                torch._foreach_copy_(params, w)
                for alpha, d_k in zip(point, d):
                    torch._foreach_add_(params, d_k, alpha=alpha)
                losses.append(_mean_loss(model, data))
                bar.update()
        finally:
            torch._foreach_copy_(params, w)
    if directions == 2:
        losses = [losses[i * steps : (i + 1) * steps] for i in range(steps)]
    return LossLandscape(directions=directions, coordinates=coordinates, losses=losses, seed=seed)


def new_figure(**kwargs: Any) -> Any:
    """A matplotlib `Figure` with constrained layout, made without pyplot's global state."""
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError("Plotting needs matplotlib: pip install 'hf-msam[flatness]'.") from error
    return Figure(layout="constrained", **kwargs)


def plot_loss_landscape(landscape: LossLandscape, path: str | os.PathLike, title: str | None = None) -> None:
    """Draw `landscape` to the PNG `path`: a curve for 1 direction, filled contours for 2.

    Needs matplotlib (`pip install hf-msam[flatness]`).
    """
    alphas = landscape.coordinates
    fig = new_figure(figsize=(6.4, 4.8))
    ax = fig.subplots()
    if landscape.directions == 1:
        ax.plot(alphas, landscape.losses, marker="o", markersize=3, label="loss L(w + α·d)")
        ax.axvline(0.0, color="gray", linestyle=":", label="trained weights w (α = 0)")
        ax.set_xlabel("α: step along a filter-normalized random direction d")
        ax.set_ylabel("loss")
        ax.legend()
        ax.grid(alpha=0.3)
    else:
        contours = ax.contourf(alphas, alphas, list(zip(*landscape.losses)), levels=20, cmap="viridis")
        ax.contour(contours, colors="white", linewidths=0.4)
        fig.colorbar(contours, ax=ax, label="loss L(w + α·d₁ + β·d₂)")
        ax.plot([0.0], [0.0], marker="*", markersize=12, color="red", linestyle="none", label="trained weights w")
        ax.set_xlabel("α: along filter-normalized random direction d₁")
        ax.set_ylabel("β: along filter-normalized random direction d₂")
        ax.set_aspect("equal")
        ax.legend(loc="upper right")
    ax.set_title(title or f"Loss landscape around the weights w ({landscape.directions}-D, Li et al. 2018)")
    fig.savefig(path, dpi=120)


# ---------------------------------------------------------------------------------------------
# Quantization sensitivity
# ---------------------------------------------------------------------------------------------


def _quantizable_weights(model: nn.Module) -> list[tuple[str, torch.Tensor, int]]:
    """(name, weight, dim of its output rows) of every nn.Linear and Conv1D, the LM head included; each tensor once
    (a head tied to the input embeddings is quantized as the head, and so is that embedding)."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is a dependency; without it, only nn.Linear
        Conv1D = ()  # noqa: N806
    seen, found = set(), []
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or id(weight) in seen:
            continue
        if isinstance(module, nn.Linear):
            found.append((f"{name}.weight", weight, 0))  # [out, in]: a row per output
        elif Conv1D and isinstance(module, Conv1D):
            found.append((f"{name}.weight", weight, 1))  # GPT-2's Conv1D stores [in, out]: a column per output
        else:
            continue
        seen.add(id(weight))
    return found


def quantize_rows(w: torch.Tensor, bits: int, dim: int = 0) -> torch.Tensor:
    """w rounded to `bits` bits, symmetric, one scale per output row (along `dim`): s = max|w_row| / (2^(b−1) − 1),
    q = clamp(round(w/s), −(2^(b−1) − 1), 2^(b−1) − 1)·s; a row of zeros stays zero. Computed in float32 or wider."""
    if not isinstance(bits, int) or bits < 2:
        raise ValueError(f"bits must be an integer >= 2, got {bits!r}.")
    levels = 2 ** (bits - 1) - 1
    x = w.to(_accumulation_dtype(w))
    reduce = [d for d in range(x.dim()) if d != dim % x.dim()]
    s = x.abs().amax(dim=reduce, keepdim=True) / levels
    q = torch.where(s > 0, torch.clamp(torch.round(x / torch.where(s > 0, s, 1)), -levels, levels) * s, 0)
    return q.to(w.dtype)


def _is_causal_lm(model: nn.Module) -> bool:
    """A decoder-only language model (its labels are the inputs, shifted by one inside the loss): one that can
    generate and is not an encoder-decoder (whose decoder's logits line up with its labels)."""
    config = getattr(model, "config", None)
    can_generate = getattr(model, "can_generate", None)
    return callable(can_generate) and bool(can_generate()) and not getattr(config, "is_encoder_decoder", False)


def _loss_and_accuracy(model: nn.Module, data: list[tuple[Mapping[str, Any], int]]) -> tuple[float, float | None]:
    """The size-weighted mean loss, and the accuracy of the argmax over the labels that are not -100 (shifted by one
    for a causal LM's per-token labels), or None where the outputs have no logits matching the labels."""
    total = sum(n for _, n in data)
    loss, right, counted = 0.0, 0, 0
    accuracy_known = True
    for batch, n in data:
        output = model(**batch)
        value = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
        if value is None:
            raise ValueError(f"{type(model).__name__} returned no `loss`: include the labels in each batch.")
        loss += n * value.double().item()
        logits = output.get("logits") if isinstance(output, Mapping) else getattr(output, "logits", None)
        labels = batch.get("labels")
        if not (isinstance(logits, torch.Tensor) and isinstance(labels, torch.Tensor) and not labels.is_floating_point()
                and logits.shape[:-1] == labels.shape):  # fmt: skip
            accuracy_known = False
            continue
        if labels.dim() >= 2 and _is_causal_lm(model):  # position t predicts token t + 1
            logits, labels = logits[:, :-1], labels[:, 1:]
        mask = labels != -100
        right += int((logits.argmax(-1).eq(labels) & mask).sum())
        counted += int(mask.sum())
    accuracy = right / counted if accuracy_known and counted else None
    return loss / total, accuracy


QUANTIZATION_BACKENDS = ("simulated", "torchao")
_TORCHAO_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what torchao's quantize_affine takes


def _torchao() -> tuple[Any, str]:
    """(torchao.quantization, torchao's version), or ImportError saying how to install it."""
    needs = ("quantize_", "Int8WeightOnlyConfig", "IntxWeightOnlyConfig", "MappingType", "PerAxis", "PerRow")
    message = ('quantization_sensitivity(backend="torchao") needs torchao >= 0.18 (tested with 0.18.0): '
               'pip install "hf-msam[quantization]", or use backend="simulated".')  # fmt: skip
    try:
        import torchao  # first, so that a torchao hidden from sys.modules is missing even if a submodule is cached
        from torchao import quantization
    except ImportError as error:
        raise ImportError(message) from error
    version = getattr(torchao, "__version__", "unknown")
    if not all(hasattr(quantization, name) for name in needs):
        raise ImportError(f"{message} Found torchao {version}, which lacks some of {', '.join(needs)}.")
    return quantization, version


def _torchao_config(ao: Any, version: str, bits: int) -> tuple[Any, str]:
    """torchao's weight-only config that stores each nn.Linear weight as b-bit integers, symmetric, one scale per
    output row, and the name of what it does."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(
            f"backend='torchao' quantizes to 2 to 8 bits (Int8WeightOnlyConfig, IntxWeightOnlyConfig's torch.int2 to "
            f"torch.int7), got {bits!r}."
        )
    if bits == 8:  # the int8 weight-only config: int8 weights cast to the activations' dtype in the matmul, then scaled
        config = ao.Int8WeightOnlyConfig(granularity=ao.PerRow(), set_inductor_config=False)
        name = "Int8WeightOnlyConfig(granularity=PerRow())"
    else:  # int8 storage of b-bit values, dequantized (q − 0)·s at each call of F.linear
        config = ao.IntxWeightOnlyConfig(
            weight_dtype=getattr(torch, f"int{bits}"), granularity=ao.PerAxis(0), mapping_type=ao.MappingType.SYMMETRIC
        )
        name = f"IntxWeightOnlyConfig(weight_dtype=torch.int{bits}, granularity=PerAxis(0), mapping_type=SYMMETRIC)"
    low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return config, f"torchao {version} {name}: integers in [{low}, {high}], scale max|w_row|/{(high - low) / 2:g}"


def quantization_backend_name(backend: str) -> str:
    """One line on what `quantization_sensitivity(backend=...)` runs, for reports (torchao's version read from its
    installed metadata, without importing it)."""
    if backend == "simulated":
        return "simulated (each weight rounded in place with quantize_rows: integers in ±(2^(b−1) − 1))"
    if backend == "torchao":
        from importlib.metadata import PackageNotFoundError, version

        try:
            installed = version("torchao")
        except PackageNotFoundError:
            installed = "(not installed)"
        return (f"torchao {installed} (Int8WeightOnlyConfig for 8 bits, IntxWeightOnlyConfig below; integers in "
                "[−2^(b−1), 2^(b−1) − 1], symmetric per output row)")  # fmt: skip
    raise ValueError(f"backend must be one of {', '.join(map(repr, QUANTIZATION_BACKENDS))}, got {backend!r}.")


def _simulated_backend(bits: int) -> str:
    levels = 2 ** (bits - 1) - 1
    return f"simulated (quantize_rows): integers in [{-levels}, {levels}], scale max|w_row|/{levels}, in the weights' dtype"


def _torchao_quantized_copy(model: nn.Module, ao: Any, config: Any) -> tuple[nn.Module, int]:
    """A deep copy of `model` whose nn.Linear weights (each tensor once, a tied embedding sharing the head's quantized
    weight) torchao's `quantize_` has replaced with its quantized tensors; GPT-2's Conv1D layers are first turned into
    the nn.Linear they compute (weight transposed, bias kept), since torchao's tensors implement F.linear, not
    torch.addmm. Returns the copy and the number of Conv1D layers converted."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is a dependency; without it, only nn.Linear
        Conv1D = ()  # noqa: N806
    quantized = copy.deepcopy(model).eval()
    converted = 0
    for name, module in list(quantized.named_modules()):
        if Conv1D and isinstance(module, Conv1D):
            nx, nf = module.weight.shape
            linear = nn.Linear(nx, nf, bias=False, device="meta")  # no initialization: both are set here
            linear.weight = nn.Parameter(module.weight.detach().t().contiguous(), requires_grad=module.weight.requires_grad)
            linear.bias = module.bias
            parent, _, child = name.rpartition(".")
            setattr(quantized.get_submodule(parent), child, linear.train(module.training))
            converted += 1
    targets, originals = set(), {}
    for name, weight, _ in _quantizable_weights(quantized):
        module = quantized.get_submodule(name.removesuffix(".weight"))
        if isinstance(module, nn.modules.linear.NonDynamicallyQuantizableLinear):
            raise ValueError(
                f"backend='torchao' cannot quantize {name.removesuffix('.weight')} ({type(module).__name__}: the "
                "output projection of nn.MultiheadAttention, which reads its weight directly; torchao's quantize_ "
                "leaves it out). Use backend='simulated'."
            )
        if weight.dtype not in _TORCHAO_DTYPES:
            raise ValueError(
                f"backend='torchao' quantizes float32, bfloat16 or float16 weights (torchao's quantize_affine); {name} "
                f"is {weight.dtype}. Cast the model (e.g. model.float()) or use backend='simulated'."
            )
        targets.add(id(module))
        originals[id(module)] = weight
    ao.quantize_(quantized, config, filter_fn=lambda module, fqn: id(module) in targets)
    # quantize_ sets a new Parameter on each linear: a module that shared its weight (a tied input embedding) gets it.
    new = {id(originals[key]): module.weight for module in quantized.modules() if (key := id(module)) in originals}
    for module in quantized.modules():
        weight = module._parameters.get("weight")
        if weight is not None and id(weight) in new and weight is not new[id(weight)]:
            module.weight = new[id(weight)]
    return quantized, converted


def quantization_sensitivity(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    bits: Iterable[int] = (8, 4, 3),
    *,
    size_fn: SizeFn | None = None,
    backend: str = "simulated",
) -> dict[int, dict[str, Any]]:
    """How much the model's loss and accuracy change when its weights are rounded to few bits: {b: {"loss": Δloss,
    "accuracy": Δaccuracy or None, "backend": what was run}} for each b of `bits`, Δ = quantized − full precision.

    Every nn.Linear and Conv1D weight (the LM head included; embeddings, norms and biases excluded) is quantized
    symmetric, one scale per output row, as weight-only post-training quantization does; the model runs in eval
    mode on `batches` (see the module docstring for the mean loss) and is left bitwise as it was, in the train/eval
    mode each module was in. Accuracy is the argmax's over labels that are not -100 (None for outputs without logits
    of the labels' shape). Flatter minima are expected to lose less (sharpness-aware pretraining, arXiv 2605.02105).
    Not under FSDP2.

    `backend="simulated"` (default): each weight rounded in place with `quantize_rows` (integers in ±(2^(b−1) − 1),
    scale max|w_row|/(2^(b−1) − 1)) in the weights' own dtype, then restored; no quantized tensors, any b >= 2.
    `backend="torchao"` (`pip install "hf-msam[quantization]"`): real weight-only quantization with torchao's configs
    on a deep copy of the model (the caller's is not touched; it costs a copy's memory): b = 8
    `Int8WeightOnlyConfig(granularity=PerRow())`, b = 2..7 `IntxWeightOnlyConfig(weight_dtype=torch.int{b},
    granularity=PerAxis(0), mapping_type=SYMMETRIC)`, both with integers in [−2^(b−1), 2^(b−1) − 1] and scale
    max|w_row|/(2^(b−1) − ½), zero point 0, q = clamp(round(w·(1/s)))·s (so not `quantize_rows`' grid, on which a
    row's largest |w| is exact: here it lands half a step away). GPT-2's Conv1D layers are converted to the nn.Linear
    they compute in the copy first (their "backend" entry says how many); float32, bfloat16 or float16 weights only.
    """
    from .integrations.torch_internals import is_fsdp2

    if backend not in QUANTIZATION_BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, QUANTIZATION_BACKENDS))}, got {backend!r}.")
    if is_fsdp2(model):
        raise NotImplementedError("quantization_sensitivity does not support FSDP2: measure the unsharded model.")
    bits = list(bits)
    weights = _quantizable_weights(model)
    if not weights:
        raise ValueError(f"{type(model).__name__} has no nn.Linear or Conv1D weight to quantize.")
    if backend == "torchao":
        ao, version = _torchao()
        configs = {b: _torchao_config(ao, version, b) for b in bits}  # every b checked before any measure
    device = weights[0][1].device
    data = _materialize(batches, device, size_fn)
    result: dict[int, dict[str, Any]] = {}

    def entry(loss: float, accuracy: float | None, what: str) -> dict[str, Any]:
        known = accuracy is not None and base_accuracy is not None
        return {"loss": loss - base_loss, "accuracy": accuracy - base_accuracy if known else None, "backend": what}

    if backend == "torchao":
        with _measuring(model), torch.no_grad():
            base_loss, base_accuracy = _loss_and_accuracy(model, data)
            for b in bits:
                config, what = configs[b]
                try:
                    quantized, converted = _torchao_quantized_copy(model, ao, config)
                    loss, accuracy = _loss_and_accuracy(quantized, data)
                except ValueError:
                    raise
                except Exception as error:  # a device, dtype or layer torchao's tensors do not run on
                    raise RuntimeError(
                        f"torchao could not quantize or run {type(model).__name__} ({weights[0][1].dtype} on {device}) "
                        f"with {what.split(':')[0]}: {type(error).__name__}: {error}. Use backend='simulated'."
                    ) from error
                del quantized
                if converted:
                    what += f"; {converted} GPT-2 Conv1D layer(s) converted to nn.Linear (weight transposed) first"
                result[b] = entry(loss, accuracy, what)
        return result
    saved = [w.detach().clone() for _, w, _ in weights]
    with _measuring(model), torch.no_grad():
        base_loss, base_accuracy = _loss_and_accuracy(model, data)
        try:
            for b in bits:
                for (_, w, dim), original in zip(weights, saved):
                    w.copy_(quantize_rows(original, b, dim))
                loss, accuracy = _loss_and_accuracy(model, data)
                result[b] = entry(loss, accuracy, _simulated_backend(b))
        finally:
            for (_, w, _), original in zip(weights, saved):
                w.copy_(original)
    return result


# ---------------------------------------------------------------------------------------------
# In the Trainer
# ---------------------------------------------------------------------------------------------


def _first_batches(dataloader: Iterable[Any], count: int) -> list[Any]:
    batches = list(itertools.islice(dataloader, count))
    # An accelerate dataloader leaves the gradient state only when run to its end: leave it now.
    if hasattr(dataloader, "end"):
        dataloader.end()
    return batches


def check_flatness_supported(trainer: Any) -> None:
    """Raise NotImplementedError, naming the flags, when the trainer's `msam_eval_*` flags ask for measures its setup
    cannot take (ImportError when `--msam_quantization_backend torchao` finds no torchao): run when the trainer is
    built, so a run does not fail at its first evaluation."""
    args = trainer.args
    if msam_setting(args, "msam_eval_quantization") and msam_setting(args, "msam_quantization_backend") == "torchao":
        _torchao()  # ImportError, saying what to install, when the trainer is built rather than at its first evaluation
    flags = [f"--{name}" for name in ("msam_eval_flatness", "msam_eval_landscape") if msam_setting(args, name)]
    if not flags:
        return
    fsdp2 = trainer.is_fsdp_enabled and getattr(trainer, "_msam_fsdp2", lambda: False)()
    if fsdp2 and "--msam_eval_landscape" in flags:
        raise NotImplementedError(
            "--msam_eval_landscape does not support FSDP2 yet (the filter normalization of its directions needs whole "
            "filters): drop it (--msam_eval_flatness works under FSDP2), and draw the landscape of the saved model "
            "with hf_msam.flatness.loss_landscape after training."
        )
    if trainer.is_deepspeed_enabled or (trainer.is_fsdp_enabled and not fsdp2) or getattr(trainer, "is_fsdp_xla_enabled", False):
        what = "DeepSpeed" if trainer.is_deepspeed_enabled else "FSDP1 (FSDP2 is supported: fsdp_version 2)"
        raise NotImplementedError(
            f"{' and '.join(flags)} need the whole, unsharded trainable weights on each device: they do not work with "
            f"{what}. Drop {' and '.join(flags)} (and compute the measures after training with hf_msam.flatness on the "
            "saved model), or train without it."
        )


def evaluate_flatness(
    trainer: Any,
    eval_dataset: Any = None,
    metric_key_prefix: str = "eval",
    quantization: bool = False,
    quantization_backend: str = "simulated",
) -> dict[str, float]:
    """What [`MSAMTrainer.evaluate`] adds to an evaluation, per the trainer's `msam_eval_*` flags.

    With `msam_eval_flatness`, returns `{prefix}_hessian_top_eigenvalue`, `{prefix}_hessian_trace` and
    `{prefix}_sharpness`, measured on the unwrapped model (`trainer.model`) and the first
    `msam_flatness_batches` batches of the evaluation dataloader, with `msam_flatness_iters` power iterations
    and Hutchinson probes. The sharpness is the SAM one at radius `msam_flatness_rho`, each batch one
    micro-batch, whatever the run trained with: runs compare on equal footing. With
    `msam_eval_landscape`, writes `loss_landscape.json` and `loss_landscape.png` (1-D) to `output_dir`,
    overwriting those of the previous evaluation. With `quantization`, adds `{prefix}_int{b}_loss_delta` (and
    `{prefix}_int{b}_accuracy_delta` where the accuracy is known) for b = 8, 4, 3 (`quantization_sensitivity`, with
    its `backend=quantization_backend`: the trainer passes `msam_quantization_backend`).

    With several processes, every process measures its own shard's first batches, with no collective
    inside (the model is unwrapped); the three numbers are then averaged across processes, which all
    reach that one all-reduce. The main process alone draws the landscape, on its own batches. Under FSDP2 the
    measures are of the mean loss over all processes' batches (Hessian-vector products by finite differences of
    sharded gradients), the same on every process; the landscape is refused there.
    """
    args = trainer.args
    with_flatness, with_landscape = msam_setting(args, "msam_eval_flatness"), msam_setting(args, "msam_eval_landscape")
    if not (with_flatness or with_landscape or quantization):
        return {}
    check_flatness_supported(trainer)
    batches = _first_batches(trainer.get_eval_dataloader(eval_dataset), msam_setting(args, "msam_flatness_batches"))
    model, progress_bar = trainer.model, trainer.is_local_process_zero() and not args.disable_tqdm
    # A token-level loss (labels per token: causal or token-classification LMs) is a mean over label tokens:
    # weigh each batch by the tokens the Trainer counts (its num_items_in_batch), not by its examples.
    labels = batches[0].get("labels") if batches and isinstance(batches[0], Mapping) else None
    token_level = isinstance(labels, torch.Tensor) and labels.dim() >= 2 and hasattr(trainer, "_item_count")
    common = {"progress_bar": progress_bar, **({"size_fn": trainer._item_count} if token_level else {})}
    metrics = {}
    if with_flatness:
        values = [
            hessian_top_eigenvalue(model, batches, iters=msam_setting(args, "msam_flatness_iters"), **common),
            hessian_trace(model, batches, samples=msam_setting(args, "msam_flatness_iters"), **common),
            sharpness(model, batches, rho=msam_setting(args, "msam_flatness_rho"), **common),
        ]
        from .integrations.torch_internals import is_fsdp2 as _is_fsdp2

        if trainer.accelerator.num_processes > 1 and not _is_fsdp2(model):  # FSDP2: already over all ranks' batches
            values = trainer.accelerator.reduce(torch.tensor(values, device=args.device), reduction="mean").tolist()
        names = ("hessian_top_eigenvalue", "hessian_trace", "sharpness")
        metrics = {f"{metric_key_prefix}_{name}": value for name, value in zip(names, values)}
    if quantization:
        deltas = quantization_sensitivity(
            model, batches, backend=quantization_backend, **{k: v for k, v in common.items() if k == "size_fn"}
        )
        names = [f"{metric_key_prefix}_int{b}_{what}_delta" for b in deltas for what in ("loss", "accuracy")
                 if deltas[b][what] is not None]  # fmt: skip
        values = [deltas[b][what] for b in deltas for what in ("loss", "accuracy") if deltas[b][what] is not None]
        if trainer.accelerator.num_processes > 1:  # each process measured its own batches: their mean
            values = trainer.accelerator.reduce(torch.tensor(values, device=args.device), reduction="mean").tolist()
        metrics.update(zip(names, values))
    if with_landscape and trainer.is_world_process_zero():
        landscape = loss_landscape(model, batches, **common)
        os.makedirs(args.output_dir, exist_ok=True)
        landscape.to_json(os.path.join(args.output_dir, LANDSCAPE_JSON))
        plot_loss_landscape(
            landscape,
            os.path.join(args.output_dir, LANDSCAPE_PNG),
            title=f"Loss landscape at step {trainer.state.global_step}, on {len(batches)} evaluation batch(es)",
        )
    return metrics
