"""Micro-batch sharpness-aware minimization (mSAM, Behdin et al. 2023, arXiv 2302.09693): the step.

For each micro-batch B_j of a (device-local) batch of n examples, n_j of them in B_j, c_j = n_j / n:

    g_j   = ∇L_{B_j}(w)                      1. the clean (ascent) gradient, local to this device
    e_j   = ρ · g_j / ‖g_j‖                  2. the ascent: a PerturbationRule     (hf_msam.methods)
    g_p,j = ∇L_{B_j}(w + e_j)                3. the perturbed gradient, at w + e_j
    ∇    += c_j · D(g_j, g_p,j)              4. the descent: a DescentRule          (SAM: D = g_p)

and w comes back to exactly what it was after every micro-batch. SAM is the case of one micro-batch. The methods
(SAM, ASAM, GSAM, F-SAM, LookSAM, Momentum-SAM, and any registered with `hf_msam.register_method`) are pairs of
rules, one module each in `hf_msam.methods`. A `Schedule` says, per optimizer step, whether the step is perturbed
at all (late-phase SAM, an interval) and which ρ it uses (constant, or following the learning rate).

Across devices, each device perturbs with its own micro-batches by default (device-local scope). With
`sync_perturbation` (forced under FSDP2), g_j is the gradient of the union over all devices of their j-th
micro-batches, so every device applies the same e_j (synchronized scope; see `MicroBatchSAM`).

Nothing here synchronizes with the host: decisions that depend on a tensor's value (skip a zero or
non-finite ascent gradient, guard a division) are made with tensor ops, and micro-batch weights that
come from tensors (token counts) stay tensors.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .batches import batch_size_of, micro_batch_weights, split_batch
from .methods import (
    REGISTRY,
    Capabilities,
    DescentRule,
    PerturbationRule,
    build_method,
    check_compatible,
    register_method,
)
from .methods.fsam import FriendlyPerturbation
from .methods.functional import check_outputs, model_outputs
from .methods.gsam import GSAMDescent
from .methods.looksam import LookSAMDescent
from .methods.momentum import MomentumPerturbation
from .methods.sam import SAMDescent, SAMPerturbation
from .ops import SHARD_GROUP, SHARDED_PARAMS, copies, device_scalar, divide_where_positive, local, scoped, unaliased, weighted
from .vectorized import GroupLayout, NotVectorizable, Vectorizer

logger = logging.getLogger("hf_msam")

__all__ = [
    "MicroBatch",
    "MicroBatchSAM",
    "MSAMStats",
    "Schedule",
    # re-exported from hf_msam.methods and hf_msam.batches, where they live
    "Capabilities",
    "DescentRule",
    "FriendlyPerturbation",
    "GSAMDescent",
    "LookSAMDescent",
    "MomentumPerturbation",
    "PerturbationRule",
    "REGISTRY",
    "SAMDescent",
    "SAMPerturbation",
    "batch_size_of",
    "build_method",
    "micro_batch_weights",
    "register_method",
    "split_batch",
]


@dataclass(frozen=True)
class Schedule:
    """Per optimizer step t (1-based) of `max_steps`:

    - plain when t ≤ start·max_steps (late-phase SAM: Zhou et al., ICLR 2025), or when (t − 1) % interval ≠ 0;
    - otherwise perturbed, with ρ_t = ρ (`rho_schedule="constant"`) or ρ·lr_t/lr_max (`"lr"`, as GSAM does; 0 when
      lr_max is 0: a learning rate of 0 throughout perturbs nothing).
    """

    start: float = 0.0
    interval: int = 1
    rho_schedule: str = "constant"

    def perturbs(self, t: int, max_steps: int) -> bool:
        return t > self.start * max_steps and (t - 1) % self.interval == 0

    def rho(self, rho: float, lr: float | torch.Tensor, lr_max: float | torch.Tensor) -> float | torch.Tensor:
        if self.rho_schedule == "constant":
            return rho
        if isinstance(lr_max, torch.Tensor):  # ρ_t = 0 where lr_max = 0, decided on the device
            return divide_where_positive(rho * lr, lr_max)
        return rho * lr / lr_max if lr_max > 0 else 0.0 * lr


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


@dataclass(frozen=True)
class MicroBatch:
    """What a loss function is told about the pass it computes: `loss_fn(micro_batch, info)`.

    `index` is j (0-based) of `count` micro-batches; `weight` is c_j, the micro-batch's share of the batch (1.0 for
    a whole batch; a 0-d tensor when shares are token counts); `point` is where the pass is taken: "clean" (at w,
    the ascent), "perturbed" (at w + e_j) or "reuse" (at w, LookSAM between its SAM steps); `reported` is True for
    the pass whose loss `backward` reports (the clean one; at w + e for Momentum-SAM, which has no clean pass), so
    a trainer that records metrics in its loss function records each token once."""

    index: int
    count: int
    weight: float | torch.Tensor
    point: str
    reported: bool


def _with_info(loss_fn: Callable[..., torch.Tensor]) -> Callable[[Any, MicroBatch], torch.Tensor]:
    """`loss_fn` as a function of (micro-batch, info): it is given `info` when it takes a second argument."""
    try:
        inspect.signature(loss_fn).bind(None, None)
    except TypeError:
        return lambda micro_batch, info: loss_fn(micro_batch)
    except ValueError:  # no signature to read (a builtin): call it as documented first, with the batch alone
        return lambda micro_batch, info: loss_fn(micro_batch)
    return loss_fn


def check_trainable(model: nn.Module, who: str, fix: str = "") -> None:
    """Raise ValueError when no parameter of `model` requires grad: there would be nothing to perturb or train."""
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(
            f"{who}: no parameter of {type(model).__name__} requires grad, so there is nothing to perturb or train. "
            "Make the weights to train trainable (`param.requires_grad_(True)`; with PEFT, attach a trainable adapter, "
            f"e.g. `get_peft_model`){fix}."
        )


class _Linear(torch.autograd.Function):
    """⟨d, w⟩ as a 0 with gradient d: `_Linear.apply(d, *params)` returns a zero whose gradient with respect to
    params[i] is d[i] times the incoming gradient. Its backward adds c·d to `.grad` through AccumulateGrad (so DDP's
    hooks, the loss scale and accelerate's accumulation scaling apply), in one fused multiply, with no graph of a
    product and a sum per parameter."""

    @staticmethod
    def forward(ctx, d, *params):
        ctx.d = d  # detached tensors of the caller's: kept by reference until the backward
        return params[0].new_zeros((), dtype=torch.promote_types(params[0].dtype, torch.float32))  # c and the loss scale in ≥ float32

    @staticmethod
    def backward(ctx, grad_output):
        d, ctx.d = ctx.d, None
        return (None, *torch._foreach_mul(d, grad_output))


class _FellBack(Exception):
    """The vectorized step gave up before touching anything: the caller takes one pass per micro-batch."""


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    """The same tensors, by identity (== on tensors would compare their values)."""
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))


def _overrides(rule: Any, name: str) -> bool:
    """True when `rule`'s class defines its own `name` (PerturbationRule's default does nothing)."""
    return getattr(type(rule), name) is not getattr(PerturbationRule, name)


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


def _is_fsdp2(model: nn.Module) -> bool:
    """True when `model` (or a submodule) was sharded with FSDP2's `fully_shard`."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2
        return False
    return any(isinstance(m, FSDPModule) for m in model.modules())


# Why DeepSpeed is refused (the trainer and the engine say it the same way).
DEEPSPEED_REFUSAL = (
    "DeepSpeed (any ZeRO stage): DeepSpeed's engine owns the backward pass, the gradients and the optimizer step "
    "(accelerate's `backward` runs `engine.backward` and then `engine.step`, which clips, steps and zeroes the "
    "gradients; ZeRO-1 partitions the optimizer state, ZeRO-2 also the gradients, ZeRO-3 also the parameters), "
    "while mSAM takes an ascent gradient beside the accumulated ones, adds its descent to `.grad` over several "
    "backward passes per step, and perturbs and restores the weights between them"
)


def _is_deepspeed(model: nn.Module, accelerator: Any = None) -> bool:
    """True when `model` is wrapped by DeepSpeed (a `deepspeed` engine class), or `accelerator` runs DeepSpeed: read
    off class names and modules, so DeepSpeed need not be installed (nor imported) to tell."""
    engine = any(
        k.__name__ == "DeepSpeedEngine" or (k.__module__.split(".")[0] == "deepspeed" and k.__name__.endswith("Engine"))
        for k in type(model).__mro__
    )
    return engine or str(getattr(accelerator, "distributed_type", "")).endswith("DEEPSPEED")


def _param_groups(fsdp_state: Any) -> list:
    """The parameter groups of one FSDP2 module's state: a list since torch 2.12, at most one group before."""
    groups = getattr(fsdp_state, "_fsdp_param_groups", None)
    if groups is None:
        group = getattr(fsdp_state, "_fsdp_param_group", None)
        groups = [] if group is None else [group]
    return list(groups)


class MicroBatchSAM:
    """The mSAM gradient, in one call: ``loss = sam.backward(batch, loss_fn)``.

    `backward` splits `batch` into micro-batches of `micro_batch_size` examples (None: one
    micro-batch), perturbs the weights separately for each from its own gradient, and ADDS the
    size-weighted mean of the descent contributions to `.grad` (accumulating like `loss.backward()`).
    It returns the clean loss at w of the whole batch, detached, and leaves w bitwise as it was,
    even when a pass raises.

    The ascent rule (`perturbation`, default SAM/ASAM from `rho`, `adaptive`, ...) and the descent
    rule (`descent`, default SAM) are the method; `build_method(name)` makes the pair of a registered
    method. Rules that read the optimizer's state (Momentum-SAM) read it from `optimizer`.

    With an `accelerator` (or a model wrapped in DistributedDataParallel), the ascent passes and
    every perturbed pass but the last run without gradient synchronization: each device perturbs
    with its own micro-batches, and the descent gradient is all-reduced once, by the last backward,
    exactly as for a plain step. Backward goes through `accelerator.backward`, so fp16 loss scaling
    and accelerate's gradient-accumulation scaling apply as usual.

    `sync_perturbation` True synchronizes the perturbations: g_j becomes the gradient of the union over all
    devices of their j-th micro-batches, Σ_r a_r,j·g_r,j / Σ_r a_r,j (a_r,j the size of micro-batch j on
    device r, or its weight c_r,j: see `backward`'s `sync_weight`; micro-batches of unequal size or token
    count weigh as they would in the union; one all-reduce of the trainable gradients and one of a_r,j per
    micro-batch, no host sync), and every device applies the same e_j. All devices must then cut their
    batches into the same number of micro-batches (a device with fewer would wait forever for the others).
    Friendly-SAM's EMA then stays the same on every device; Momentum-SAM is the same in both scopes (its
    momentum already is). Methods whose descent is a nonlinear function of each device's own perturbed
    gradient (GSAM, LookSAM: `supports_sync` False) are refused.

    A model sharded with FSDP2 (`fully_shard`) is supported, and its perturbations are always
    synchronized (every rank must apply the same e to its shard). g_j comes from a backward whose
    gradients FSDP2 reduce-scatters (the mean over ranks, i.e. the union's gradient), with `.grad`
    set aside and put back around it; the norm sums the shards with one all-reduce; each rank perturbs
    and restores (by copy) only its own shards. Extra memory: two copies of the local shard. Momentum-SAM
    reads each rank's shard of the (sharded) optimizer momentum, its norm summed over the shards. Methods
    whose rules do not support FSDP2 (GSAM, LookSAM) are refused, and the mesh must be one-dimensional
    (plain FSDP, not HSDP).
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
        vectorize: str = "off",
        params: list[nn.Parameter] | None = None,
    ):
        if vectorize not in ("auto", "on", "off"):
            raise ValueError(f"vectorize must be 'auto', 'on' or 'off', got {vectorize!r}.")
        if micro_batch_size is not None and micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be None or >= 1, got {micro_batch_size}.")
        if _is_deepspeed(model, accelerator):
            raise NotImplementedError(
                f"MicroBatchSAM does not support {DEEPSPEED_REFUSAL}. Train without DeepSpeed: FSDP2 (`fully_shard`, "
                "or accelerate's `fsdp_version: 2`) to shard the model, plain DDP otherwise."
            )
        self.model = model
        self.params = None if params is None else list(params)  # None: the model's (see `_trainable_params`)
        self.micro_batch_size = micro_batch_size
        self.accelerator = accelerator
        self.perturbation = perturbation if perturbation is not None else SAMPerturbation(rho, adaptive, adaptive_eta, eps)
        self.descent = descent if descent is not None else SAMDescent()
        if optimizer is not None and getattr(self.perturbation, "optimizer", False) is None:
            self.perturbation.optimizer = optimizer  # Momentum-SAM reads the momentum from it
        self.fsdp2 = _is_fsdp2(model)
        self.sync_perturbation = bool(sync_perturbation) or self.fsdp2  # FSDP2: every rank applies the same e
        self.process_group = process_group  # the devices to synchronize over (None: all)
        check_compatible(self.perturbation, self.descent, sync_perturbation=self.sync_perturbation, fsdp2=self.fsdp2)
        check_trainable(model, "MicroBatchSAM")
        self.perturbation.check_model(model)  # Flat-LoRA: the model must have LoRA layers
        self._check_mesh()
        self.stats = MSAMStats()
        self._step: Any = object()  # the optimizer step `backward` last worked on
        self._taken = 0  # micro-batches this device has taken in that step, over its accumulation calls
        self._first = 0  # the number, within the step, of the current call's first micro-batch
        self._mode = "perturbed"
        self.vectorize = vectorize
        self._vectorizer: Vectorizer | None = None
        self._memory_verdicts: dict[int, str | None] = {}  # "auto" on a GPU: whether k stacked copies fit, per k
        self._verified = False  # the first vectorized pass checks the loss reaches the weights only through the layers
        self._refusal: str | None = None  # why a forward found the model unfit for the vectorized step (kept)
        # Called when the vectorized step gives up after a pass whose loss `loss_fn` computed (the step then starts
        # again with one pass per micro-batch): a trainer undoes that pass's side effects there (TRL's metrics).
        self.on_discard: Callable[[], None] | None = None
        self.path: str | None = None  # "vectorized" or "sequential": what the last `backward` took
        self.path_reason: str | None = None  # why the last `backward` did not take the vectorized path

    def _check_mesh(self) -> None:
        if self.fsdp2:
            meshes = {getattr(p, "device_mesh", None) for p in self.model.parameters() if p.requires_grad}
            if any(m is not None and m.ndim != 1 for m in meshes):
                raise NotImplementedError(
                    "mSAM under FSDP2 supports a one-dimensional device mesh (plain fully_shard), not HSDP or 2-D "
                    "meshes: shard over one mesh dimension, or use plain DDP."
                )

    def _trainable_params(self) -> list[nn.Parameter]:
        """The parameters perturbed: `params` given at construction (e.g. the model's and those a loss module owns,
        as sentence-transformers' SoftmaxLoss classifier), else the model's, those that require a gradient."""
        return [p for p in (self.model.parameters() if self.params is None else self.params) if p.requires_grad]

    # -- the method -----------------------------------------------------------------------------
    def backward_whole_batch(
        self,
        batch: Any,
        forward_fn: Callable[[Any], Any],
        loss_fn: Callable[[list[torch.Tensor]], torch.Tensor],
        size_fn: Callable[[Any], int | torch.Tensor] | None = None,
        split_fn: Callable[[Any, int | None], list[Any]] | None = None,
        *,
        step: Any = None,
        rho: float | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`backward` for a loss over the whole batch that is not the weighted sum of its micro-batches' losses (in-batch
        negatives): `forward_fn(micro_batch)` returns its outputs, a tensor or a list of tensors with one row per
        example (embeddings, one per column), and `loss_fn(outputs)` the batch's loss from the outputs of all
        micro-batches concatenated along the rows. Micro-batch j's rows are computed at w + e_j, e_j from its part of
        the batch's gradient; see `hf_msam.whole_batch`. Adds to `.grad`, returns the batch's clean loss (detached)."""
        from .whole_batch import whole_batch_backward

        return whole_batch_backward(self, batch, forward_fn, loss_fn, size_fn, split_fn, step=step, rho=rho)[0]

    def backward(
        self,
        batch: Any,
        loss_fn: Callable[..., torch.Tensor],
        size_fn: Callable[[Any], int | torch.Tensor] | None = None,
        split_fn: Callable[[Any, int | None], list[Any]] | None = None,
        *,
        step: Any = None,
        rho: float | torch.Tensor | None = None,
        sync_weight: str = "size",
        layout: str = "rows",
        decomposable: bool | None = True,
    ) -> torch.Tensor:
        """Accumulate the mSAM gradient of `batch` into `.grad`; return the clean loss, detached.

        `loss_fn(micro_batch)` returns the mean loss over that micro-batch; a `loss_fn(micro_batch, info)` is
        also told which pass it computes (a `MicroBatch`: its index, its weight c_j, at w or at w + e_j, and
        whether its loss is the one reported). Micro-batch j is weighted by size_fn(B_j) / size_fn(batch), by
        default its share of the examples, n_j / n.
        `split_fn(batch, micro_batch_size)` cuts the batch into micro-batches (default: `split_batch`, along dim 0).
        `step` names the optimizer step: calls with the same `step` are accumulation steps of one optimizer
        step (None: every call is a step of its own). `rho` overrides the rule's radius for this call.

        `sync_weight` says how devices weigh in a synchronized ascent gradient. "size": `loss_fn` returns the
        mean over the micro-batch (times a factor common to all devices), and device r weighs size_fn(B_r,j),
        which makes the average the gradient of the union's mean. "share": `loss_fn` returns the micro-batch's
        share of a sum normalized by a count common to all devices, divided by c_j (the Trainer's losses under
        `num_items_in_batch` counted over all devices), and device r weighs c_r,j, which makes the average
        the union's gradient up to a positive factor; e_j then has exactly the union's direction.

        With `vectorize` "auto" or "on" (see `MicroBatchSAM`), all micro-batches share each pass: `layout` says how
        `split_fn` cut the batch ("rows" along dim 0, "pairs" of a preference batch, "packed" runs of sequences of
        a one-row batch), and `decomposable` False says `loss_fn(batch)` is not Σ_j c_j·loss_fn(B_j) (a token mean
        weighed by example counts, in-batch negatives): the step then takes one pass per micro-batch. None: not
        known (a loss written by the user): "auto" then takes one pass per micro-batch, "on" the vectorized step.
        """
        if sync_weight not in ("size", "share"):
            raise ValueError(f"sync_weight must be 'size' or 'share', got {sync_weight!r}.")
        check_trainable(self.model, "MicroBatchSAM.backward")  # the model may have been frozen since
        loss_fn = _with_info(loss_fn)
        with self._rolled_back_on_error(), self._fsdp2_reduces_every_backward() if self.fsdp2 else contextlib.nullcontext():
            micro_batches = (split_fn or split_batch)(batch, self.micro_batch_size)
            weights = [None] if len(micro_batches) == 1 else micro_batch_weights(micro_batches, size_fn)
            if step is None or step != self._step:  # a new optimizer step: perturbed, or (LookSAM) reuse
                self._step, self._mode, self._taken = step, self.descent.begin_step(), 0
                self.stats.steps += self._mode == "perturbed"
            # micro-batch j of this call is micro-batch first + j of the step (a rule that draws per micro-batch, as
            # Flat-LoRA does, then draws anew in every accumulation call)
            self._first, self._taken = self._taken, self._taken + len(micro_batches)
            group_layout = self._vectorized_layout(micro_batches, layout, decomposable)
            if group_layout is not None:
                sync = None  # synchronized scope: what each micro-batch weighs in the union (see sync_weight)
                if self.sync_perturbation:
                    sync = [(size_fn or batch_size_of)(mb) for mb in micro_batches] if sync_weight == "size" else weights
                try:
                    return self._vectorized_step(batch, group_layout, weights, loss_fn, rho, sync)
                except _FellBack:  # the vectorized ascent could not run this model: one pass per micro-batch, from
                    if self.on_discard is not None:  # the start; the caller undoes what its discarded pass recorded
                        self.on_discard()
            if self._mode == "reuse":
                return self._reuse_step(micro_batches, weights, loss_fn)
            return self._perturbed_step(micro_batches, weights, loss_fn, size_fn, rho, sync_weight)

    @contextlib.contextmanager
    def _rolled_back_on_error(self):
        """When a pass raises, put the rules' state (F-SAM's EMA, LookSAM's g_v and counter), the step bookkeeping
        and the statistics back as they were before this call (the step restores the weights itself). Snapshots keep
        tensors by reference: nothing is copied on the normal path."""
        saved = (self.perturbation.snapshot(), self.descent.snapshot(), (self._step, self._mode, self._taken),
                 dict(vars(self.stats)))
        try:
            yield
        except BaseException:
            self.perturbation.restore(saved[0])
            self.descent.restore(saved[1])
            self._step, self._mode, self._taken = saved[2]
            vars(self.stats).update(saved[3])  # in place: the trainer shares this object
            raise

    def _perturbed_step(self, micro_batches, weights, loss_fn, size_fn, rho, sync_weight) -> torch.Tensor:
        """Steps 1-4 for each micro-batch in turn, w restored bitwise after each."""
        params = self._trainable_params()  # frozen (PEFT) weights: never perturbed
        with torch.no_grad():  # the tensors perturbed and restored: under FSDP2, this rank's shards
            shards = [local(p) for p in params] if self.fsdp2 else params
        explicit = self.descent.explicit  # GSAM, LookSAM: the descent needs g_j and g_p,j themselves
        functional = self.descent.through_outputs  # Functional-SAM: descend through the outputs F with ∇_F L(w)
        clean_pass = self.perturbation.needs_gradient  # Momentum-SAM: e comes from the optimizer, no clean pass
        frozen_stats = _modules_with_running_stats(self.model) if clean_pass else []
        shard_group = self._group(params) if self.fsdp2 else None  # FSDP2: the rules' norms sum over all shards
        w = [p.detach().clone() for p in shards]  # restore by copy: w + e - e is not w in floating point
        k = len(micro_batches)
        clean_total = perturbed_total = 0.0
        for j, (mb, c_j) in enumerate(zip(micro_batches, weights)):
            c = 1.0 if c_j is None else c_j
            last = j == k - 1  # only the last backward may synchronize: DDP all-reduces everything accumulated
            # 1. g_j at w, `.grad` untouched.
            g = None
            if clean_pass:
                with self._no_sync():
                    with model_outputs(self.model, functional) as outputs:
                        clean_loss = loss_fn(mb, MicroBatch(j, k, c, "clean", True))
                    grad_outputs = self._output_gradient(clean_loss, outputs) if functional else None
                    g = self._ascent_gradient_of(clean_loss, params, mb, size_fn, sync_weight, c)
            # 2. e_j from g_j, in g's storage (a copy of g_j is kept when the descent needs it); e_j = 0 and ok
            #    False when g_j is zero, non-finite or overflowed in fp16.
            with scoped(SHARD_GROUP, shard_group), scoped(SHARDED_PARAMS, params if self.fsdp2 else None):
                e, grad_norm, ok = self.perturbation.perturb(shards, copies(g) if explicit else g, rho)
            if not explicit:
                g = None  # e lives in g's storage: no other reference may keep it alive past `del e`
            # 3. g_p,j at w + e_j, then back to w bitwise, whatever happens in between.
            try:
                if e is not None:
                    with torch.no_grad():
                        torch._foreach_add_(shards, e)
                    del e
                    # Inside an enclosing autocast region, casts of w are cached: drop them, or the
                    # forward below would silently run at the stale, unperturbed w.
                    torch.clear_autocast_cache()
                with (contextlib.nullcontext() if last else self._no_sync(), _running_stats_frozen(frozen_stats),
                      self.perturbation.perturbing(self.model, self._step, self._first + j, k)):  # Flat-LoRA: its noise
                    with model_outputs(self.model, functional) as outputs:
                        perturbed_loss = loss_fn(mb, MicroBatch(j, k, c, "perturbed", not clean_pass))
                    if explicit:
                        g_p = self.ascent_gradient(perturbed_loss, params)  # .grad untouched
                    elif functional:  # 4. Functional-SAM: .grad += c_j·J_F(w + e_j)ᵀ∇_F L_j(w)
                        self._backward(weighted(self.descent.surrogate(outputs, grad_outputs), c_j))
                        del outputs, grad_outputs
                    else:
                        self._backward(weighted(perturbed_loss, c_j))  # 4. SAM: .grad += c_j·g_p,j
            finally:
                with torch.no_grad():
                    torch._foreach_copy_(shards, w)
                torch.clear_autocast_cache()
            # 4. GSAM, LookSAM: .grad += c_j·D(g_j, g_p,j) (the forward above decided whether DDP syncs).
            if explicit:
                self._accumulate(self.descent.descent(g, g_p, c), params, c_j)
                del g, g_p

            perturbed_loss = perturbed_loss.detach()
            clean_loss = clean_loss.detach() if clean_pass else perturbed_loss  # Momentum-SAM: only w + e was seen
            clean_total = clean_total + weighted(clean_loss, c_j)
            perturbed_total = perturbed_total + weighted(perturbed_loss, c_j)
            self._count(grad_norm, ok)
        self.stats.clean_loss = self.stats.clean_loss + clean_total
        self.stats.perturbed_loss = self.stats.perturbed_loss + perturbed_total
        return clean_total

    def _reuse_step(self, micro_batches, weights, loss_fn) -> torch.Tensor:
        """A reuse step (LookSAM between its SAM steps): one pass at w per micro-batch, descent from g_j alone."""
        params = self._trainable_params()
        k, total = len(micro_batches), 0.0
        for j, (mb, c_j) in enumerate(zip(micro_batches, weights)):
            with contextlib.nullcontext() if j == k - 1 else self._no_sync():
                loss = loss_fn(mb, MicroBatch(j, k, 1.0 if c_j is None else c_j, "reuse", True))
                g = self.ascent_gradient(loss, params)
            self._accumulate(self.descent.reuse(g), params, c_j)
            total = total + weighted(loss.detach(), c_j)
        return total

    def _count(self, grad_norm: torch.Tensor, ok: torch.Tensor) -> None:
        self.stats.ascent_grad_norm = self.stats.ascent_grad_norm + grad_norm.detach()
        self.stats.micro_batches += 1
        self.stats.skipped = self.stats.skipped + (~ok).to(torch.int64)  # a tensor: counting never syncs

    # -- the vectorized step: every micro-batch in one forward and one backward per pass -------------
    def _vectorized_layout(self, micro_batches: list[Any], layout: str, decomposable: bool | None) -> GroupLayout | None:
        """The groups of the vectorized step, or None (and `path_reason`) when this batch takes one pass each."""
        reason = None
        if self.vectorize == "off":
            reason = "vectorize='off' (--msam_vectorize off)"
        elif len(micro_batches) == 1:
            reason = "one micro-batch per device: nothing to vectorize"
        elif self.fsdp2:
            reason = "FSDP2 shards the weights the vectorized path would read whole"
        elif not Capabilities.of(self.perturbation, self.descent).vectorized:
            reason = f"the method's rules ({self.perturbation!r}, {self.descent!r}) do not support it (supports_vectorized)"
        elif _overrides(self.perturbation, "perturbing") and not _overrides(self.perturbation, "perturbing_groups"):
            reason = (f"the rule {self.perturbation!r} perturbs in `perturbing` and has no `perturbing_groups` for one "
                      "pass over all micro-batches")
        elif decomposable is False:
            reason = "the batch's loss is not the weighted sum of its micro-batches' losses"
        elif decomposable is None and self.vectorize == "auto":
            reason = ("the loss is the user's own: whether it is the weighted sum of its micro-batches' losses is not "
                      "known (--msam_vectorize on asserts it is)")
        elif _modules_with_running_stats(self.model):
            reason = "BatchNorm in train mode: its running statistics must update once per micro-batch"
        elif layout not in ("rows", "pairs", "packed"):
            reason = f"unknown batch layout {layout!r}"
        if reason is None:
            params = self._trainable_params()
            if self._vectorizer is None or not _same(self._vectorizer.params, params):
                self._vectorizer, self._verified, self._refusal = Vectorizer(self.model, params), False, None
            # a model found not to fit at a forward is not tried again (each try costs a pass)
            reason = self._refusal or self._vectorizer.why_not() or self._memory_problem(params, len(micro_batches))
        if reason is not None:
            return self._take_sequential(reason)
        if layout == "rows":
            return GroupLayout.rows([batch_size_of(mb) for mb in micro_batches])
        if layout == "pairs":
            return GroupLayout.pairs([batch_size_of(mb) // 2 for mb in micro_batches])
        lengths = [mb["input_ids"].shape[1] for mb in micro_batches]  # packed: each group one run of tokens
        return GroupLayout.tokens([0, *itertools.accumulate(lengths)], 1)

    def _memory_problem(self, params: list[torch.Tensor], k: int) -> str | None:
        """"auto" on a GPU: the vectorized step holds k stacked copies of the trainable parameters (three for GSAM and
        LookSAM, whose descent needs g_j and g_p,j); it is taken only where they fit in half of the memory free at the
        first step with k micro-batches (the decision is kept, so the path does not change mid-run)."""
        device = params[0].device
        if self.vectorize != "auto" or device.type != "cuda":
            return None
        if k not in self._memory_verdicts:
            copies = k * (3 if self.descent.explicit else 1)
            need = copies * sum(p.numel() * p.element_size() for p in params)
            free = torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
            self._memory_verdicts[k] = None if need <= free / 2 else (
                f"its {copies} stacked copies of the trainable parameters ({need / 2**30:.1f} GiB) would take more than "
                f"half of the free GPU memory ({free / 2**30:.1f} GiB); fewer micro-batches, LoRA or --msam_vectorize on "
                "would take it"
            )
        return self._memory_verdicts[k]

    def _take_sequential(self, reason: str) -> None:
        if self.vectorize == "on":
            raise ValueError(f"The vectorized mSAM step cannot run here: {reason}. Set --msam_vectorize auto or off.")
        if self.vectorize == "auto" and reason != self.path_reason and self.path != "sequential":
            logger.info("mSAM step: one pass per micro-batch (sequential), because %s.", reason)
        self.path, self.path_reason = "sequential", reason
        return None

    def _vectorized_step(self, batch, layout: GroupLayout, weights, loss_fn, rho, sync=None) -> torch.Tensor:
        """Steps 1-4 for all k micro-batches at once: g_j for every j from one forward and backward at w, the rule
        per micro-batch on its slice of the stacked gradients, then one forward in which micro-batch j's rows see
        w + e_j and one backward. The weights are never written. `sync`: each micro-batch's weight a_j in the
        union over devices (synchronized scope), None for device-local perturbations."""
        vec, k = self._vectorizer, layout.k
        params = vec.params
        c = [1.0 if c_j is None else c_j for c_j in weights]
        explicit, clean_pass = self.descent.explicit, self.perturbation.needs_gradient
        functional = self.descent.through_outputs  # Functional-SAM: ∇_F L of the batch's loss, rows of B_j = c_j·∇_F L_j
        groups = functools.partial(self.perturbation.perturbing_groups, self.model, self._step, first=self._first)
        if self.path != "vectorized":
            logger.info("mSAM step: vectorized (%d micro-batches share each forward and backward).", k)
        # 1. every g_j at w, `.grad` untouched.
        g = None
        if clean_pass or self._mode == "reuse":
            point = "reuse" if self._mode == "reuse" else "clean"
            try:
                # A reuse step's only forward is this one: DDP must then all-reduce the backward that follows it.
                with contextlib.nullcontext() if self._mode == "reuse" else self._no_sync(), vec.capture(layout) as capture:
                    with model_outputs(self.model, functional) as outputs:
                        clean_loss = loss_fn(batch, MicroBatch(0, 1, 1.0, point, True))
                    if not self._verified:
                        capture.verify(clean_loss)
                        self._verified = True
                    # the backwards run inside the capture: activation checkpointing recomputes routed layers there
                    grad_outputs = self._output_gradient(clean_loss, outputs) if functional else None  # before the graph goes
                    parts = self._group_gradients(capture, clean_loss)
            except NotVectorizable as err:  # nothing was accumulated or perturbed: the step can start again
                self._refusal = str(err)
                self._take_sequential(self._refusal)
                raise _FellBack from err
            self.path, self.path_reason = "vectorized", None
            g = self._per_micro_batch(parts, c)
            del parts
            if sync is not None:
                g = self._union_group_gradients(g, sync)
        else:
            if not self._verified:  # Momentum-SAM, Flat-LoRA (no clean pass): check once, with a forward, that the
                try:                # routed layers see every use of the weights, and that the layers a rule perturbs
                    #                 per group (Flat-LoRA's base layers) take the layout; nothing is accumulated yet
                    with self._no_sync(), vec.capture(layout) as capture, groups(layout):
                        capture.verify(loss_fn(batch, MicroBatch(0, 1, 1.0, "clean", False)))
                    del capture  # its records hold that forward's graph: freed before the perturbed pass
                    self._verified = True
                except NotVectorizable as err:
                    self._refusal = str(err)
                    self._take_sequential(self._refusal)
                    raise _FellBack from err
            self.path, self.path_reason = "vectorized", None
        if self._mode == "reuse":  # LookSAM between its SAM steps: descend from g_j alone
            d = [self.descent.reuse([t[j] for t in g]) for j in range(k)]
            self._accumulate_stacked(d, params, c)
            return clean_loss.detach()
        # 2. e_j from g_j, micro-batch by micro-batch (F-SAM's EMA runs over j in order), into one stacked buffer,
        #    made at the first e_j that is not None: a rule that never moves the trainable weights (Flat-LoRA) has none.
        e = None if g is None or explicit else g
        for j in range(k):
            g_j = None if g is None else [t[j] for t in g]
            if explicit and g_j is not None:
                g_j = copies(g_j)
            e_j, grad_norm, ok = self.perturbation.perturb(params, g_j, rho)
            if e is None and e_j is not None:
                e = [torch.zeros((k, *p.shape), dtype=p.dtype, device=p.device) for p in params]
            if e is not None:
                slices = [t[j] for t in e]
                if e_j is None:
                    torch._foreach_zero_(slices)
                elif e_j[0] is not slices[0]:
                    torch._foreach_copy_(slices, e_j)
            self._count(grad_norm, ok)
        # 3. micro-batch j's rows at w + e_j, in one forward; 4. its backward adds Σ_j c_j·g_p,j to `.grad`. The rule's
        #    own per-group perturbation (Flat-LoRA: noise ε_j on the LoRA base weights for group j's rows) is entered
        #    around both, as `perturbing` is around each micro-batch's pass on the sequential path.
        with vec.perturbed(layout, e) if e is not None else contextlib.nullcontext(), groups(layout):
            if explicit:
                with vec.capture(layout) as capture:
                    perturbed_loss = loss_fn(batch, MicroBatch(0, 1, 1.0, "perturbed", not clean_pass))
                    g_p = self._per_micro_batch(self._group_gradients(capture, perturbed_loss), c)
            else:
                with model_outputs(self.model, functional) as outputs:
                    perturbed_loss = loss_fn(batch, MicroBatch(0, 1, 1.0, "perturbed", not clean_pass))
                vec.check_routing()  # before the backward: a layer that ran unrouted saw no e_j
                # Functional-SAM: Σ_j c_j·J_F(w + e_j)ᵀ∇_F L_j(w), each row's F at its own w + e_j
                self._backward(self.descent.surrogate(outputs, grad_outputs) if functional else perturbed_loss)
                del outputs
        del e
        if explicit:  # GSAM, LookSAM: .grad += Σ_j c_j·D(g_j, g_p,j)
            d = [self.descent.descent([t[j] for t in g], [t[j] for t in g_p], c[j]) for j in range(k)]
            self._accumulate_stacked(d, params, c)
        perturbed_loss = perturbed_loss.detach()
        clean_loss = clean_loss.detach() if clean_pass else perturbed_loss
        self.stats.clean_loss = self.stats.clean_loss + clean_loss
        self.stats.perturbed_loss = self.stats.perturbed_loss + perturbed_loss
        return clean_loss

    def _union_group_gradients(self, g: list[torch.Tensor], a: list) -> list[torch.Tensor]:
        """Synchronized scope, all k at once: g_j ← Σ_r a_r,j·g_r,j / Σ_r a_r,j on every device, with one all-reduce
        of the k weights and one of the stacked gradients (as `_union_ascent_gradient` does for one j)."""
        group = self._group(g)
        if group is None:
            return g  # a single process: the union is this device's micro-batch
        a_t = torch.stack([device_scalar(w, g[0].device) for w in a])
        total = a_t.clone()
        dist.all_reduce(total, group=group)
        share = divide_where_positive(a_t, total)
        flat = torch.cat([(t * share.to(t.dtype).view(-1, *([1] * (t.dim() - 1)))).reshape(-1) for t in g])
        dist.all_reduce(flat, group=group)
        return [v.view_as(t) for v, t in zip(flat.split([t.numel() for t in g]), g)]

    def _group_gradients(self, capture, loss: torch.Tensor) -> list[torch.Tensor]:
        """Every micro-batch's part of ∇loss, stacked [k, ...] per parameter; fp16: scaled, then unscaled."""
        scaler = self._grad_scaler()
        if scaler is None:
            return capture.group_gradients(loss)
        g = capture.group_gradients(scaler.scale(loss))
        torch._foreach_mul_(g, scaler._get_scale_async().double().reciprocal().float())
        return g

    @staticmethod
    def _per_micro_batch(parts: list[torch.Tensor], c: list[float | torch.Tensor]) -> list[torch.Tensor]:
        """g_j = part_j / c_j: the whole batch's loss is Σ_j c_j·L_j, so micro-batch j's part of its gradient is
        c_j·g_j (a micro-batch with c_j = 0, no counted token, gets g_j = 0: its perturbation is skipped)."""
        c_t = torch.stack([device_scalar(w, parts[0].device) for w in c])
        inverse = divide_where_positive(torch.ones_like(c_t), c_t)
        for t in parts:
            t.mul_(inverse.to(t.dtype).view(-1, *([1] * (t.dim() - 1))))
        return parts

    def _accumulate_stacked(self, d: list[list[torch.Tensor]], params: list[torch.Tensor], c: list) -> None:
        """.grad += Σ_j c_j·d_j, in one backward (see `_accumulate`)."""
        total = None
        for d_j, c_j in zip(d, c):
            d_j = [t if t.dtype == p.dtype else t.to(p.dtype) for t, p in zip(d_j, params)]
            term = torch._foreach_mul(d_j, c_j.to(d_j[0].dtype) if isinstance(c_j, torch.Tensor) else c_j)
            if total is None:
                total = term  # fresh tensors: the later terms are added into them
            else:
                torch._foreach_add_(total, term)
        self._accumulate(total, params, None)

    # -- gradients without touching `.grad` -------------------------------------------------------
    def _ascent_gradient_of(self, loss, params, mb, size_fn, sync_weight, c) -> list[torch.Tensor]:
        """g_j: of this device's micro-batch, or (synchronized scope) of the union of all devices' j-th ones."""
        if not self.sync_perturbation:
            return self.ascent_gradient(loss, params)
        a = (size_fn or batch_size_of)(mb) if sync_weight == "size" else c
        return self._union_ascent_gradient(loss, params, a)

    def ascent_gradient(self, loss: torch.Tensor, params: list[torch.Tensor], retain_graph: bool = False) -> list[torch.Tensor]:
        """∇loss over `params`, through autograd.grad: `.grad` (maybe holding accumulated gradients) is untouched."""
        scaler = self._grad_scaler()
        if scaler is not None:  # fp16: scale so small gradients survive, then unscale before any norm
            grads = unaliased(torch.autograd.grad(scaler.scale(loss), params, retain_graph=retain_graph, allow_unused=True,
                                                  materialize_grads=True))
            scale = scaler._get_scale_async()  # the scale as a tensor: get_scale() would sync
            torch._foreach_mul_(grads, scale.double().reciprocal().float())
            return list(grads)
        return unaliased(torch.autograd.grad(loss, params, retain_graph=retain_graph, allow_unused=True, materialize_grads=True))

    def _output_gradient(self, loss: torch.Tensor, outputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Functional-SAM: ∇_F loss over the model's outputs F, the graph kept for the ascent gradient that follows
        (this backward runs only from the loss to F: the loss head, not the network)."""
        check_outputs(outputs)
        scaler = self._grad_scaler()
        if scaler is None:
            return list(torch.autograd.grad(loss, outputs, retain_graph=True, allow_unused=True, materialize_grads=True))
        grads = torch.autograd.grad(scaler.scale(loss), outputs, retain_graph=True, allow_unused=True, materialize_grads=True)
        inverse = scaler._get_scale_async().double().reciprocal().float()
        return [t.float() * inverse for t in grads]  # unscaled in float32: in fp16 it would underflow

    def _union_ascent_gradient(self, loss: torch.Tensor, params: list[torch.Tensor], a: int | float | torch.Tensor) -> list[torch.Tensor]:
        """Synchronized scope: g_j of the union over devices of their j-th micro-batches, on every device.

        Device r weighs a_r / Σ_r a_r (see `backward`'s `sync_weight`), so devices whose micro-batches differ in
        size or token count weigh as in the union. Under FSDP2 the returned tensors are this rank's shards;
        otherwise whole gradients, the same on every device."""
        group = self._group(params)
        if group is None and not self.fsdp2:
            return self.ascent_gradient(loss, params)  # a single process: the union is this micro-batch
        c = device_scalar(a, loss.device)
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
                g = [torch.zeros_like(local(p)) if p.grad is None else local(p.grad) for p in params]
            if scaler is not None:  # unscale before any norm, without a host sync
                torch._foreach_mul_(g, scaler._get_scale_async().double().reciprocal().float())
        finally:
            for p, s in zip(params, saved):
                p.grad = s
        return g

    def _accumulate(self, d: list[torch.Tensor], params: list[torch.Tensor], c: float | torch.Tensor | None) -> None:
        """.grad += c·d, as a backward of the linear function c·⟨d, w⟩ (whose gradient is c·d): DDP's
        all-reduce, fp16 loss scaling and accelerate's accumulation scaling then treat d like any gradient."""
        self._backward(weighted(_Linear.apply([t.detach() for t in d], *params), c))

    # -- the contexts and the backward the accelerator would use --------------------------------
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
