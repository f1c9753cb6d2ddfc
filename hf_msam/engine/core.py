"""Micro-batch sharpness-aware minimization (mSAM, Behdin et al. 2023, arXiv 2302.09693): the engine.

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
import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..batches import batch_size_of, micro_batch_weights, split_batch
from ..integrations.torch_internals import fsdp2_reduces_every_backward, inverse_scale, is_fsdp2
from ..methods import DescentRule, PerturbationRule, check_compatible
from ..methods.functional import check_outputs
from ..methods.sam import SAMDescent, SAMPerturbation
from ..ops import local, unaliased, weighted
from .choose import choose_strategy
from .head import HeadStep
from .sequential import reuse_step, sequential_step
from .state import MSAMStats, check_trainable, with_info
from .vectorized import FellBack, VectorizedStep
from .whole_batch import whole_batch_step

logger = logging.getLogger("hf_msam")

__all__ = ["DEEPSPEED_REFUSAL", "MicroBatchSAM"]


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
        self.fsdp2 = is_fsdp2(model)
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
        self.vectorized = VectorizedStep(self)  # the vectorized strategy, with what it keeps across steps
        self.head = HeadStep(self)  # the output-layer strategy (logits-SAM)
        # Called when the vectorized step gives up after a pass whose loss `loss_fn` computed (the step then starts
        # again with one pass per micro-batch): a trainer undoes that pass's side effects there (TRL's metrics).
        self.on_discard: Callable[[], None] | None = None
        self.path: str | None = None  # "vectorized" or "sequential": what the last `backward` took
        self.path_reason: str | None = None  # why the last `backward` did not take the vectorized path
        self.path_line: str | None = None  # the latest path line logged (None before the first perturbed step)

    def _check_mesh(self) -> None:
        if self.fsdp2:
            meshes = {getattr(p, "device_mesh", None) for p in self.model.parameters() if p.requires_grad}
            if any(m is not None and m.ndim != 1 for m in meshes):
                raise NotImplementedError(
                    "mSAM under FSDP2 supports a one-dimensional device mesh (plain fully_shard), not HSDP or 2-D "
                    "meshes: shard over one mesh dimension, or use plain DDP."
                )

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
        the batch's gradient; see `hf_msam.engine.whole_batch`. Adds to `.grad`, returns the batch's clean loss
        (detached)."""
        with self._rolled_back_on_error():
            return whole_batch_step(self, batch, forward_fn, loss_fn, size_fn, split_fn, step=step, rho=rho)[0]

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
        loss_fn = with_info(loss_fn)
        with self._rolled_back_on_error(), fsdp2_reduces_every_backward(self.model) if self.fsdp2 else contextlib.nullcontext():
            micro_batches = (split_fn or split_batch)(batch, self.micro_batch_size)
            weights = [None] if len(micro_batches) == 1 else micro_batch_weights(micro_batches, size_fn)
            self.begin_call(step, len(micro_batches))
            choice = choose_strategy(self, micro_batches, layout, decomposable)
            if choice.strategy == "head":  # logits-SAM: the output layer alone perturbed, the body run once
                return self.head.step(micro_batches, batch, choice.layout, choice.reason, weights, loss_fn, size_fn,
                                      rho, sync_weight)
            if choice.strategy == "vectorized":
                sync = None  # synchronized scope: what each micro-batch weighs in the union (see sync_weight)
                if self.sync_perturbation:
                    sync = [(size_fn or batch_size_of)(mb) for mb in micro_batches] if sync_weight == "size" else weights
                try:
                    return self.vectorized.step(batch, choice.layout, weights, loss_fn, rho, sync)
                except FellBack:  # the vectorized ascent could not run this model: one pass per micro-batch, from
                    if self.on_discard is not None:  # the start; the caller undoes what its discarded pass recorded
                        self.on_discard()
            else:
                self.take_sequential(choice.reason)
            if self._mode == "reuse":
                return reuse_step(self, micro_batches, weights, loss_fn)
            return sequential_step(self, micro_batches, weights, loss_fn, size_fn, rho, sync_weight)

    def begin_call(self, step: Any, k: int) -> None:
        """A call's step bookkeeping: a new optimizer step (perturbed, or LookSAM's reuse) when `step` changes; this
        call's k micro-batches are micro-batches first..first+k-1 of the step (a rule that draws per micro-batch, as
        Flat-LoRA does, then draws anew in every accumulation call)."""
        if step is None or step != self._step:
            self._step, self._mode, self._taken = step, self.descent.begin_step(), 0
            self.stats.steps += self._mode == "perturbed"
        self._first, self._taken = self._taken, self._taken + k

    def take_sequential(self, reason: str) -> None:
        """This call runs one pass per micro-batch, because of `reason`: refused under vectorize="on"; logged when
        the path becomes sequential under "auto", and at the first step under "off"."""
        if self.vectorize == "on":
            raise ValueError(f"The vectorized mSAM step cannot run here: {reason}. Set --msam_vectorize auto or off.")
        changed = reason != self.path_reason and self.path != "sequential"
        if (self.vectorize == "auto" and changed) or (self.vectorize == "off" and self.path is None):
            self.log_path(f"one pass per micro-batch (sequential), because {reason}")
        self.path, self.path_reason = "sequential", reason

    def log_path(self, text: str) -> None:
        """Log the path line (at the first perturbed step and whenever the path or its reason changes) and keep it
        as `path_line` (the trainer's `msam_path`)."""
        self.path_line = text
        logger.info("mSAM step: %s.", text)

    @contextlib.contextmanager
    def _rolled_back_on_error(self):
        """When a pass raises, put the rules' state (F-SAM's EMA, LookSAM's g_v and counter), the step bookkeeping
        and the statistics back as they were before this call (the step restores the weights itself). Snapshots keep
        tensors by reference: nothing is copied on the normal path."""
        saved = (self.perturbation.snapshot(), self.descent.snapshot(), (self._step, self._mode, self._taken, self._first),
                 dict(vars(self.stats)))
        try:
            yield
        except BaseException:
            self.perturbation.restore(saved[0])
            self.descent.restore(saved[1])
            self._step, self._mode, self._taken, self._first = saved[2]
            vars(self.stats).update(saved[3])  # in place: the trainer shares this object
            raise

    # -- what the vectorized strategy keeps, under the names tests and logs read -------------------------------
    @property
    def _vectorizer(self):
        return self.vectorized.vectorizer

    def _memory_problem(self, params: list[torch.Tensor], k: int) -> str | None:
        return self.vectorized.memory_problem(params, k)

    # -- the strategies' interface: gradients without touching `.grad`, the backward, synchronization ----------
    def trainable_params(self) -> list[nn.Parameter]:
        """The parameters perturbed: `params` given at construction (e.g. the model's and those a loss module owns,
        as sentence-transformers' SoftmaxLoss classifier), else the model's, those that require a gradient."""
        return [p for p in (self.model.parameters() if self.params is None else self.params) if p.requires_grad]

    _trainable_params = trainable_params  # the name hf_msam used before the engine package

    def ascent_gradient(self, loss: torch.Tensor, params: list[torch.Tensor], retain_graph: bool = False) -> list[torch.Tensor]:
        """∇loss over `params`, through autograd.grad: `.grad` (maybe holding accumulated gradients) is untouched."""
        scaler = self.grad_scaler()
        if scaler is not None:  # fp16: scale so small gradients survive, then unscale before any norm
            grads = unaliased(torch.autograd.grad(scaler.scale(loss), params, retain_graph=retain_graph, allow_unused=True,
                                                  materialize_grads=True))
            torch._foreach_mul_(grads, inverse_scale(scaler))  # the scale as a tensor: get_scale() would sync
            return list(grads)
        return unaliased(torch.autograd.grad(loss, params, retain_graph=retain_graph, allow_unused=True, materialize_grads=True))

    def output_gradient(self, loss: torch.Tensor, outputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Functional-SAM: ∇_F loss over the model's outputs F, the graph kept for the ascent gradient that follows
        (this backward runs only from the loss to F: the loss head, not the network)."""
        check_outputs(outputs)
        scaler = self.grad_scaler()
        if scaler is None:
            return list(torch.autograd.grad(loss, outputs, retain_graph=True, allow_unused=True, materialize_grads=True))
        grads = torch.autograd.grad(scaler.scale(loss), outputs, retain_graph=True, allow_unused=True, materialize_grads=True)
        inverse = inverse_scale(scaler)
        return [t.float() * inverse for t in grads]  # unscaled in float32: in fp16 it would underflow

    def sharded_ascent_gradient(self, loss: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """FSDP2: ∇loss as this rank's shards of the gradient FSDP2 reduce-scatters (the mean over ranks).

        torch.autograd.grad does not reach FSDP2's sharded parameters, so this is a plain backward with the
        accumulated `.grad` set aside and put back afterwards (it is left exactly as it was)."""
        saved = [p.grad for p in params]
        for p in params:
            p.grad = None
        try:
            scaler = self.grad_scaler()
            (scaler.scale(loss) if scaler is not None else loss).backward()
            with torch.no_grad():
                g = [torch.zeros_like(local(p)) if p.grad is None else local(p.grad) for p in params]
            if scaler is not None:  # unscale before any norm, without a host sync
                torch._foreach_mul_(g, inverse_scale(scaler))
        finally:
            for p, s in zip(params, saved):
                p.grad = s
        return g

    def accumulate(self, d: list[torch.Tensor], params: list[torch.Tensor], c: float | torch.Tensor | None) -> None:
        """.grad += c·d, as a backward of the linear function c·⟨d, w⟩ (whose gradient is c·d): DDP's
        all-reduce, fp16 loss scaling and accelerate's accumulation scaling then treat d like any gradient."""
        self.backward_pass(weighted(_Linear.apply([t.detach() for t in d], *params), c))

    def group(self, params: list[torch.Tensor]) -> Any:
        """The process group to synchronize over, or None when this is a single process."""
        if self.fsdp2:
            mesh = next((p.device_mesh for p in params if hasattr(p, "device_mesh")), None)
            return None if mesh is None else mesh.get_group()
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(self.process_group) == 1:
            return None
        return self.process_group if self.process_group is not None else dist.group.WORLD

    def no_sync(self):
        """A context in which a backward does not synchronize gradients across devices (DDP, accelerate)."""
        if self.fsdp2:
            return contextlib.nullcontext()  # FSDP2 reduce-scatters every backward (see fsdp2_reduces_every_backward)
        if self.accelerator is not None:
            return self.accelerator.no_sync(self.model)
        if isinstance(self.model, nn.parallel.DistributedDataParallel):
            return self.model.no_sync()
        return contextlib.nullcontext()

    def backward_pass(self, loss: torch.Tensor) -> None:
        """loss.backward(), through the accelerator when there is one (fp16 scaling, accumulation scaling)."""
        if self.accelerator is not None:
            self.accelerator.backward(loss)
        else:
            loss.backward()

    def grad_scaler(self):
        scaler = getattr(self.accelerator, "scaler", None)
        return scaler if scaler is not None and scaler.is_enabled() else None
