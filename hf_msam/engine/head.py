"""The output-layer strategy (logits-SAM, `hf_msam.methods.logits_sam`): only the output layer's weight W is perturbed,
so the body's forward and backward run once per group of micro-batches (once per micro-batch on the sequential form).

For the k micro-batches of a group (k = 1 on the sequential form), c_j their weights:

    1. one forward at w, the head routed (`Vectorizer.capture` of W alone): it records the head's input h and output
       edge, and the body's output; g_j = Σ_{i∈B_j} δ_i h_iᵀ for every j from ONE autograd.grad to the head's output
       (it does not reach the body; the body's graph is kept)
    2. e_j from g_j (the rule: ρ·g_j/(‖g_j‖ + ε), the norm over W)
    3. the loss again, the body's forward replaced by the output it returned in 1 (no second body forward), the head
       routed at W + e_j for group j's rows (`Vectorizer.perturbed`: one bmm, W never written)
    4. one backward of that loss: the head at W + e_j, then the body, once: .grad += Σ_j c_j·∇L_j(body at w, W + e_j)

The body is `base_model` of the transformers model (under PEFT, of its base model): a call of it in 3 whose tensor
arguments are not those of 1 (by storage, else by value for integer tensors) runs the body again, logged once (the
result is the same rule; only the saving is lost). With tied embeddings, only the head's use of W is routed: g_j is
that use's gradient and only it sees e_j (the embedding lookup is the body's, at W). TRL's fused LM head reads W
outside the head's call and takes part through `hf_msam.vectorized.outside`, as on the vectorized step.

DDP: the forward of 1 runs without gradient synchronization, that of 3 with it on the call's last group, and the one
backward (through 1's body graph) all-reduces what was accumulated.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from ..batches import batch_size_of
from ..integrations.patching import set_on_instance
from ..integrations.torch_internals import inverse_scale
from ..methods.logits_sam import body_of, output_layer
from ..ops import weighted
from ..vectorized import GroupLayout, OutsideCall, Vectorizer
from .interface import Engine
from .perturbation import per_micro_batch, perturb_groups, union_group_gradients
from .state import MicroBatch

logger = logging.getLogger("hf_msam")

__all__ = ["HeadStep", "perturbs_head"]


def perturbs_head(rule: Any) -> bool:
    """True for a rule that perturbs the output layer alone (`scope` "head")."""
    return getattr(rule, "scope", None) == "head"


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    """The tensors in a model output (ModelOutput, dict, tuple, list)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, Mapping):
        for v in value.values():
            yield from _tensors(v)
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _tensors(v)


def _key(value: Any) -> Any:
    """What a call argument is compared by: a tensor by its storage, shape and dtype (and its values, kept for integer
    tensors), a plain value by itself, anything else by identity."""
    if isinstance(value, torch.Tensor):
        return ("tensor", value.data_ptr(), tuple(value.shape), tuple(value.stride()), value.dtype, value.device)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (tuple, list)):
        return tuple(_key(v) for v in value)
    return ("object", id(value))


def _same_tensors(a: tuple, b: tuple, a_values: list, b_values: list) -> bool:
    """The calls' arguments match: equal keys, or tensors of equal shape that differ only in storage and are integer
    (ids, masks: compared by value, a host sync, only where the storage differs)."""
    if a == b:
        return True
    if len(a_values) != len(b_values) or len(a) != len(b):
        return False
    for x, y in zip(a_values, b_values):
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
            if x.data_ptr() == y.data_ptr() and x.shape == y.shape and x.stride() == y.stride():
                continue
            if x.is_floating_point() or x.shape != y.shape or x.dtype != y.dtype or not torch.equal(x, y):
                return False
        elif _key(x) != _key(y):
            return False
    return True


class _Body:
    """The body's calls in pass 1 (recorded), given back in pass 3 instead of running the body again."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.calls: list[tuple[Any, list, bool, Any]] = []  # (key, flat arguments, grad enabled, output)
        self.rerun: str | None = None  # why a pass-3 call ran the body again (this step)

    @staticmethod
    def _arguments(args, kwargs) -> tuple[Any, list]:
        flat = list(args) + [kwargs[k] for k in sorted(kwargs)]
        return (len(args), tuple(sorted(kwargs)), tuple(_key(v) for v in flat)), flat

    @contextlib.contextmanager
    def recording(self):
        inner = self.module.forward
        self.calls, self.rerun = [], None

        def forward(*args, **kwargs):
            out = inner(*args, **kwargs)
            self.calls.append((*self._arguments(args, kwargs), torch.is_grad_enabled(), out))
            return out

        undo = set_on_instance(self.module, "forward", forward)
        try:
            yield
        finally:
            undo()

    @contextlib.contextmanager
    def replaying(self):
        inner = self.module.forward
        pending = list(self.calls)

        def forward(*args, **kwargs):
            key, flat = self._arguments(args, kwargs)
            found = pending.pop(0) if pending else None
            if found is not None and found[2] == torch.is_grad_enabled() and _same_tensors(key, found[0], flat, found[1]):
                return found[3]
            self.rerun = ("the loss called the body more often in the perturbed pass than in the first" if found is None
                          else "the body was called with other arguments in the perturbed pass than in the first")
            return inner(*args, **kwargs)

        undo = set_on_instance(self.module, "forward", forward)
        try:
            yield
        finally:
            undo()
            self.calls = []

    def outputs(self) -> list[torch.Tensor]:
        """The tensors with a graph among the recorded outputs."""
        return [t for call in self.calls for t in _tensors(call[3]) if t.grad_fn is not None]


class HeadStep:
    """The output-layer strategy of one engine, with what it keeps across steps: the head, the Vectorizer of its weight
    alone, the body, and whether the first pass verified that the loss reads W only through the head and the body."""

    name = "head"

    def __init__(self, engine: Engine):
        self.engine = engine
        self.model: nn.Module | None = None
        self.head_name, self.head, self.body, self.vectorizer = "", None, None, None
        self.verified = False
        self.rerun_logged = False

    def _setup(self) -> None:
        model = self.engine.model
        if self.model is model and self.vectorizer is not None:
            return
        self.head_name, self.head = output_layer(model)
        body = body_of(model)
        if body is None:
            raise ValueError(
                f"--msam_method logits_sam runs the body once and the output layer twice, and "
                f"{type(model).__name__} has no body (`base_model`) apart from itself to run once."
            )
        self.body = _Body(body)
        # The head's own call routed, nothing else: a tied embedding reads W in the body, unperturbed.
        self.vectorizer = Vectorizer(self.head, [self.head.weight])
        self.model, self.verified = model, False

    def step(self, micro_batches, batch, layout: GroupLayout | None, reason: str | None, weights, loss_fn, size_fn,
             rho, sync_weight) -> torch.Tensor:
        """Steps 1-4 for each group: all k micro-batches at once (`layout`), or (`reason` why not) one at a time.
        Returns the clean loss (detached)."""
        engine = self.engine
        self._setup()
        k = len(micro_batches)
        if reason is not None and engine.vectorize == "on":
            raise ValueError(f"The vectorized mSAM step cannot run here: {reason}. Set --msam_vectorize auto or off.")
        path = "sequential" if reason is not None else "vectorized"
        if engine.path != path or engine.path_reason != reason:
            where = f"the output layer {self.head_name} perturbed per micro-batch (logits-SAM), the body run once per "
            engine.log_path(where + (f"group of {k} micro-batches (vectorized)" if reason is None
                                     else f"micro-batch (sequential), because {reason}"))
        engine.path, engine.path_reason = path, reason
        c = [1.0 if c_j is None else c_j for c_j in weights]
        sync = None
        if engine.sync_perturbation:
            sync = [(size_fn or batch_size_of)(mb) for mb in micro_batches] if sync_weight == "size" else c
        if reason is None:
            clean, perturbed = self._group(batch, layout, c, loss_fn, rho, sync, last=True, infos=(
                MicroBatch(0, 1, 1.0, "clean", True), MicroBatch(0, 1, 1.0, "perturbed", False)), weight=None)
        else:
            clean = perturbed = 0.0
            for j, mb in enumerate(micro_batches):
                one = GroupLayout.rows([batch_size_of(mb)])
                cl, pl = self._group(mb, one, [1.0], loss_fn, rho, None if sync is None else [sync[j]], last=j == k - 1,
                                     infos=(MicroBatch(j, k, c[j], "clean", True), MicroBatch(j, k, c[j], "perturbed", False)),
                                     weight=weights[j])
                clean, perturbed = clean + weighted(cl, weights[j]), perturbed + weighted(pl, weights[j])
        engine.stats.add_losses(clean, perturbed)
        return clean

    def _group(self, batch, layout: GroupLayout, c, loss_fn, rho, sync, last: bool, infos, weight):
        """Steps 1-4 for one group of micro-batches (one forward of the body); returns its clean and perturbed loss."""
        engine, vec, body = self.engine, self.vectorizer, self.body
        w = vec.params
        # 1. the forward at w; every g_j from one autograd.grad to the head's output, the body's graph kept.
        with engine.no_sync(), vec.capture(layout) as capture, body.recording():
            clean_loss = loss_fn(batch, infos[0])
            if not (capture._calls or capture._probes):  # neither the head's call nor TRL's fused head read W
                raise ValueError(
                    f"--msam_method logits_sam: the loss's pass did not call the output layer {self.head_name}, nor "
                    "read its weight through TRL's fused LM head: the loss must be computed from the model's logits."
                )
            if not self.verified:
                # The body reads what it reads (a tied embedding reads W there): its output is where the loss may
                # meet it; any other read of W outside the head is refused.
                OutsideCall(layout, [], [], capture).record(body.outputs(), [])
                capture.verify(clean_loss)
                self.verified = True
            parts = self._group_gradients(capture, clean_loss)
        del capture
        clean_loss = clean_loss.detach()
        g = per_micro_batch(parts, c)
        if sync is not None:
            g = union_group_gradients(engine, g, sync)
        # 2. e_j for all j at once.
        e = perturb_groups(engine, g, rho, w)
        del g, parts
        # 3-4. the loss with the body's output of 1 and the head at W + e_j; one backward through both.
        with (contextlib.nullcontext() if last else engine.no_sync()), body.replaying(), vec.perturbed(layout, e):
            perturbed_loss = loss_fn(batch, infos[1])
            vec.check_routing()
            engine.backward_pass(weighted(perturbed_loss, weight))
        if body.rerun and not self.rerun_logged:
            self.rerun_logged = True
            logger.warning("mSAM step (logits-SAM): %s, so the body ran again for it (the same rule, at the cost of "
                           "a second forward and backward of the body).", body.rerun)
        return clean_loss, perturbed_loss.detach()

    def _group_gradients(self, capture, loss: torch.Tensor) -> list[torch.Tensor]:
        """Every group's part of ∂loss/∂W, [k, *W.shape], the graph kept for step 4; fp16: scaled, then unscaled."""
        scaler = self.engine.grad_scaler()
        if scaler is None:
            return capture.group_gradients(loss, retain_graph=True)
        g = capture.group_gradients(scaler.scale(loss), retain_graph=True)
        torch._foreach_mul_(g, inverse_scale(scaler))
        return g
