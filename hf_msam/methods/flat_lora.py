"""Flat-LoRA (Li, He, Li, Wang, Shang, Huang, ICML 2025, arXiv 2409.14396): a random perturbation of the merged LoRA
weight, in the full weight space, at one forward and one backward per step.

For each LoRA layer with frozen base weight W (out × n, n the input dimension), adapters A (r × n), B (out × r) and
scaling s, the pass of micro-batch j at optimizer step t runs at the merged weight

    W' = W + s·BA + ε,    ε_i ~ N(0, (σ_t²/n)·‖(W + s·BA)_i‖² · I_n)    (row i of the merged weight, independently)
    σ_t = σ · ½(1 − cos(π·(t − 1)/T))    (--msam_flat_lora_schedule cosine: σ rises from 0 to σ over the T steps)
    σ_t = σ                               (--msam_flat_lora_schedule constant)
    ∇  += c_j · ∇_{A,B} L_{B_j}(W + ε + s·BA)

so the gradient reaches A and B through W + ε + s·BA; the row scale is taken at the current weights and not
differentiated (as in the paper). ε is never stored: each layer's is drawn from a generator seeded with
(seed, t, j, rank, layer), j counting the device's micro-batches over the step's accumulation calls (each draws its
own), in the forward and again in the backward. The base weights are never written (the noisy
weight is formed per layer, used and freed), so they are bitwise what they were after every pass, also when it raises.

On the vectorized path (one forward and one backward for all k micro-batches, `--msam_vectorize`), Flat-LoRA has no
ascent and moves no trainable weight, so the step is that one pass with `perturbing_groups` entered around it: each
LoRA layer's base linear arranges its input by group (micro-batch j's rows or tokens are group j) and computes
x_j (W + ε_j)ᵀ + b for every group in one bmm, ε_j drawn from the same seed as on the sequential path (so the step's
gradient is the sequential one, up to rounding in the matmuls), and drawn again in the backward. The adapters A, B take
their ordinary route, so their gradient sums over all rows. Memory: the k noisy weights W + ε_j of one layer exist
together, and only while that layer's forward (or backward) runs: k times the largest LoRA base weight, transiently.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..integrations.patching import set_on_instance
from ..vectorized import Positions, perturbed_matmul
from .registry import MEASURED, is_finite, register_method, require
from .base import PerturbationRule
from .sam import SAMDescent


SCHEDULES = ("cosine", "constant")


def flat_lora_sigma(sigma: float, schedule: str, t: int, max_steps: int | None) -> float:
    """σ_t of optimizer step t (1-based) of `max_steps`: σ·½(1 − cos(π(t − 1)/T)) for "cosine", σ for "constant"."""
    if schedule == "constant":
        return float(sigma)
    if schedule != "cosine":
        raise ValueError(f"--msam_flat_lora_schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}.")
    if not max_steps:
        raise ValueError(
            "--msam_flat_lora_schedule cosine needs the number of optimizer steps: the trainer sets it; in a hand-written "
            "loop set FlatLoRAPerturbation(max_steps=...) or use schedule='constant'."
        )
    return float(sigma) * 0.5 * (1.0 - math.cos(math.pi * min(max(t - 1, 0), max_steps) / max_steps))


def flat_lora_seed(seed: int, step: int, index: int, rank: int, layer: int) -> int:
    """The seed of one layer's noise: a 63-bit hash of (seed, optimizer step, micro-batch index, rank, layer number)."""
    digest = hashlib.blake2b(repr(("flat_lora", int(seed), int(step), int(index), int(rank), int(layer))).encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "little") & ((1 << 63) - 1)


def _compute_dtype(weight: torch.Tensor) -> torch.dtype:
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def row_std(layer: nn.Module, sigma_t: float) -> torch.Tensor:
    """σ_t·‖(W + s·BA)_i‖/√n for every row i of a LoRA layer (summed over its active adapters), in float32 (float64
    for float64 weights), without a graph."""
    with torch.no_grad():
        weight = layer.base_layer.weight
        dtype = _compute_dtype(weight)
        merged = weight.to(dtype).clone()
        for name in _active(layer):
            a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
            merged.addmm_(b.to(dtype), a.to(dtype), alpha=float(layer.scaling[name]))
        return torch.linalg.vector_norm(merged, dim=1) * (sigma_t / math.sqrt(weight.shape[1]))


def noise(std: torch.Tensor, seed: int, weight: torch.Tensor) -> torch.Tensor:
    """ε for a weight: a standard normal drawn in float32 from a generator seeded with `seed` on the weight's device,
    times the row's std, cast to the weight's dtype."""
    generator = torch.Generator(device=weight.device)
    generator.manual_seed(seed)
    z = torch.randn(weight.shape, generator=generator, device=weight.device, dtype=torch.float32)
    return (z.to(std.dtype) * std[:, None]).to(weight.dtype)


class _NoisyLinear(torch.autograd.Function):
    """y = x (W + ε)ᵀ + b with ε regenerated from its seed in the backward: nothing the size of W is kept."""

    @staticmethod
    def forward(ctx, x, weight, bias, std, seed):
        noisy = weight.detach() + noise(std, seed, weight)
        y = F.linear(x, noisy, bias)  # under autocast, cast like any linear
        ctx.seed, ctx.x_dtype = seed, x.dtype
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, weight, std)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, std = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        needs_x, needs_w, needs_b = ctx.needs_input_grad[:3]
        if needs_x or needs_w:
            noisy = weight.detach() + noise(std, ctx.seed, weight)
            if needs_x:
                grad_x = grad_y.matmul(noisy.to(grad_y.dtype)).to(ctx.x_dtype)
            del noisy
            if needs_w:
                g2, x2 = grad_y.reshape(-1, grad_y.shape[-1]), x.reshape(-1, x.shape[-1]).to(grad_y.dtype)
                grad_w = g2.t().matmul(x2).to(weight.dtype)
        if ctx.has_bias and needs_b:
            grad_b = grad_y.reshape(-1, grad_y.shape[-1]).sum(0)
        return grad_x, grad_w, grad_b, None, None


def _noisy_weights(std: torch.Tensor, seeds: tuple[int, ...]):
    """The stacked W + ε_j, one per seed, each sum in the weight's dtype (as `_NoisyLinear` forms it): what the
    grouped perturbed matmul forms in its forward and again in its backward, so no noise is kept between."""

    def form(weight: torch.Tensor) -> torch.Tensor:
        stacked = torch.empty((len(seeds), *weight.shape), dtype=weight.dtype, device=weight.device)
        for j, seed in enumerate(seeds):
            torch.add(weight.detach(), noise(std, seed, weight), out=stacked[j])
        return stacked

    return form


def _grouped_noisy_linear(x: torch.Tensor, base: nn.Linear, std: torch.Tensor, seeds: tuple[int, ...],
                          pos: Positions) -> torch.Tensor:
    """The base layer's output with group j's positions at W + ε_j (seed seeds[j]), by the vectorized step's grouped
    perturbed matmul; padding slots are dropped."""
    pos.check(x, "a Flat-LoRA base layer")
    return perturbed_matmul(x, base.weight, base.bias, _noisy_weights(std, seeds), None, pos, transposed=False)


def _active(layer: nn.Module) -> list[str]:
    return [name for name in layer.active_adapters if name in layer.lora_A]


def lora_layers(model: nn.Module) -> list[nn.Module]:
    """The PEFT LoRA layers of `model` whose base weights Flat-LoRA perturbs, in module order. Raises ValueError
    (naming --msam_method flat_lora and what to do) when there are none, or when one cannot be perturbed here."""
    try:
        from peft.tuners.lora import LoraLayer
        from peft.tuners.lora import Linear as LoraLinear
    except ImportError:
        LoraLayer = LoraLinear = None
    found = [m for m in model.modules() if LoraLayer is not None and isinstance(m, LoraLayer)]
    if not found:
        raise ValueError(
            f"--msam_method flat_lora perturbs the merged weights of LoRA layers, and {type(model).__name__} has none: "
            "wrap the model with PEFT LoRA (peft.get_peft_model(model, LoraConfig(...)), or --use_peft / peft_config in "
            "the examples and TRL), or choose another --msam_method (e.g. sam)."
        )
    layers = []
    for m in found:
        name = next((n for n, x in model.named_modules() if x is m), type(m).__name__)
        why = None
        if not isinstance(m, LoraLinear) or type(m.get_base_layer()) is not nn.Linear:
            why = f"a {type(m).__name__} on a {type(m.get_base_layer()).__name__} (only LoRA on torch.nn.Linear is supported)"
        elif getattr(m, "fan_in_fan_out", False):
            why = "fan_in_fan_out (GPT-2's Conv1D layout)"
        elif m.merged:
            why = "its adapters are merged into the base weight (unmerge them for training)"
        elif any(name_ in getattr(m, "lora_variant", {}) for name_ in _active(m)):
            why = "a LoRA variant (DoRA, ...) reads the base weight itself"
        elif "forward" in vars(m.get_base_layer()):
            why = "its base layer's forward is replaced by a hook (accelerate's device_map/offloading)"
        if why is not None:
            raise ValueError(
                f"--msam_method flat_lora cannot perturb the LoRA layer {name}: {why}. Target only torch.nn.Linear "
                "modules with plain LoRA (LoraConfig(target_modules=...), no DoRA), or choose another --msam_method."
            )
        if _active(m) and not m.disable_adapters:
            layers.append(m)
    if not layers:
        raise ValueError(
            "--msam_method flat_lora found LoRA layers but no active adapter in them: enable an adapter "
            "(model.set_adapter(...)) or choose another --msam_method."
        )
    return layers


class FlatLoRAPerturbation(PerturbationRule):
    """Flat-LoRA: each perturbed pass runs every LoRA layer at W + ε + s·BA, ε drawn per row with std
    σ_t·‖(W + s·BA)_i‖/√n from a seed (see the module docstring). The trainable parameters are not moved: `perturb`
    returns no e, and the noise is added inside `perturbing` (one pass per micro-batch) or `perturbing_groups` (the
    vectorized pass of all micro-batches), without writing any weight. One forward and one backward per micro-batch,
    or per device batch when vectorized (no clean pass); the loss a step reports is the loss at the noisy weights.

    `seed` (the run's `--seed`), `max_steps` (the trainer sets it) and `rank` (None: the process's rank) make the noise
    of a micro-batch a function of (seed, step, micro-batch index, rank, layer): a resumed run draws what the
    uninterrupted run drew, and micro-batches and devices draw independent noise."""

    needs_gradient = False
    supports_sync = False  # each device draws its own noise; the same noise on every device is not implemented
    supports_fsdp2 = False  # FSDP2's sharded base weights: not tried
    supports_vectorized = True  # `perturbing_groups`: group j's rows see W + ε_j in each base layer
    capability_notes = {
        "sync_perturbation": "each device draws its own noise (the rank is part of its seed); the same noise on every "
        "device is not implemented",
        "fsdp2": "its noise is added to the whole base weight of each LoRA layer, which FSDP2 shards; this has not been "
        "built or tested",
    }

    def __init__(self, sigma: float = 0.05, schedule: str = "cosine", seed: int = 0, max_steps: int | None = None,
                 rank: int | None = None):
        if schedule not in SCHEDULES:
            raise ValueError(f"--msam_flat_lora_schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}.")
        self.sigma, self.schedule, self.seed, self.max_steps, self.rank = sigma, schedule, seed, max_steps, rank
        self._layers: tuple[Any, list[nn.Module]] | None = None

    @property
    def enabled(self) -> bool:
        return self.sigma != 0

    def __repr__(self) -> str:
        return f"FlatLoRAPerturbation(sigma={self.sigma}, schedule={self.schedule!r}, seed={self.seed})"

    def check_model(self, model: nn.Module) -> None:
        self.layers_of(model)

    def layers_of(self, model: nn.Module) -> list[nn.Module]:
        if self._layers is None or self._layers[0] is not model:
            self._layers = (model, lora_layers(model))
        return self._layers[1]

    def sigma_at(self, step: int) -> float:
        return flat_lora_sigma(self.sigma, self.schedule, step, self.max_steps)

    def _rank(self) -> int:
        if self.rank is not None:
            return self.rank
        return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0

    def layer_seed(self, step: int, index: int, layer: int) -> int:
        return flat_lora_seed(self.seed, step, index, self._rank(), layer)

    def noise_of(self, model: nn.Module, step: int, index: int) -> list[torch.Tensor]:
        """ε of every LoRA layer for micro-batch `index` of optimizer step `step` at the current weights (for
        inspection: the training step never stores it)."""
        sigma_t = self.sigma_at(step)
        return [noise(row_std(m, sigma_t), self.layer_seed(step, index, i), m.base_layer.weight)
                for i, m in enumerate(self.layers_of(model))]

    def perturb(self, params, grads, rho=None):
        device = params[0].device
        return None, torch.zeros((), device=device), torch.ones((), dtype=torch.bool, device=device)

    @staticmethod
    def _check_step(step: Any) -> None:
        if isinstance(step, bool) or not isinstance(step, int):
            raise ValueError(
                f"--msam_method flat_lora draws its noise from the optimizer step, and the step is {step!r}: pass "
                "step=<int> (the 1-based optimizer step) to MicroBatchSAM.backward."
            )

    @contextlib.contextmanager
    def _forwards(self, model: nn.Module, make):
        """Each LoRA layer's base forward replaced by make(layer number, layer) inside; the class's outside."""
        undo = []
        try:
            for i, layer in enumerate(self.layers_of(model)):
                undo.append(set_on_instance(layer.base_layer, "forward", make(i, layer)))
            yield
        finally:
            for restore in reversed(undo):
                restore()  # the forward found, unless someone replaced ours in between

    def perturbing(self, model: nn.Module, step: Any, index: int, count: int):
        self._check_step(step)
        sigma_t = self.sigma_at(step)
        if sigma_t == 0:
            return contextlib.nullcontext()
        return self._forwards(model, lambda i, layer: _noisy_forward(layer, sigma_t, self.layer_seed(step, index, i)))

    def perturbing_groups(self, model: nn.Module, step: Any, layout: Any, first: int = 0):
        """The vectorized pass: group j of `layout` (micro-batch first + j of the step) sees W + ε_j in every base
        layer, ε_j from the seed that micro-batch's own pass would use (see the module docstring). At σ_t = 0 the base
        layers only check that their inputs carry the batch (so that the engine's first, checking forward finds a
        layout they cannot take)."""
        self._check_step(step)
        sigma_t = self.sigma_at(step)
        return self._forwards(model, lambda i, layer: _grouped_noisy_forward(
            layer, sigma_t, tuple(self.layer_seed(step, first + j, i) for j in range(layout.k)), layout))


def _noisy_forward(layer: nn.Module, sigma_t: float, seed: int):
    base = layer.base_layer

    def forward(x: torch.Tensor) -> torch.Tensor:
        std = row_std(layer, sigma_t)  # at the weights as they are now (the same in the backward: nothing moves)
        return _NoisyLinear.apply(x, base.weight, base.bias, std, seed)

    return forward


def _grouped_noisy_forward(layer: nn.Module, sigma_t: float, seeds: tuple[int, ...], layout: Any):
    base = layer.base_layer

    def forward(x: torch.Tensor) -> torch.Tensor:
        pos = layout.positions(x.device)
        if sigma_t == 0:  # no noise: the plain layer, once its input is known to carry the batch
            pos.check(x, "a Flat-LoRA base layer")
            return F.linear(x, base.weight, base.bias)
        return _grouped_noisy_linear(x, base, row_std(layer, sigma_t), seeds, pos)

    return forward


@register_method(
    "flat_lora",
    paper="Flat-LoRA, Li et al., ICML 2025",
    cost="1 pass per micro-batch, no clean pass; 0.96-1.05x a plain LoRA step" + MEASURED,
    dedicated_flags={"sigma": "msam_flat_lora_sigma", "schedule": "msam_flat_lora_schedule"},
)
def build(args, sigma: float = 0.05, schedule: str = "cosine"):
    if getattr(args, "msam_rho_schedule", "constant") != "constant":
        raise ValueError(
            "--msam_rho_schedule does not apply to --msam_method flat_lora, whose noise has its own schedule: set "
            "--msam_flat_lora_schedule (cosine or constant) and leave --msam_rho_schedule constant."
        )
    require(is_finite(sigma, 0.0), "flat_lora", "sigma", sigma, "a finite number >= 0 (0.05 is the paper's; 0: off)")
    require(schedule in SCHEDULES, "flat_lora", "schedule", schedule, f"one of {', '.join(SCHEDULES)}")
    try:
        seed = args.seed
    except AttributeError:
        seed = 0
    return FlatLoRAPerturbation(sigma, schedule, int(seed)), SAMDescent()
