"""The vectorized strategy: every micro-batch of the call in one forward and one backward per pass.

    1. g_j for every j from one forward and backward at w (`Vectorizer.capture`: per-group gradients, `.grad`
       untouched)
    2. e_j from g_j, micro-batch by micro-batch (`perturbation.perturb`), into one stacked [k, ...] buffer
    3. one forward in which micro-batch j's rows see w + e_j (`Vectorizer.perturbed`: the weights are never written)
    4. one backward: .grad += Σ_j c_j·∇L_j(w + e_j) (GSAM, LookSAM: Σ_j c_j·D(g_j, g_p,j))

The machinery that routes the layers is `hf_msam.vectorized`; this module decides nothing about whether it runs
(`hf_msam.engine.choose`) except what it learns at a forward: a model found unfit there (`NotVectorizable`) makes
the step start again sequentially (`FellBack`), nothing having been accumulated or perturbed.
"""

from __future__ import annotations

import contextlib
import functools

import torch

from ..integrations.torch_internals import inverse_scale
from ..methods.functional import model_outputs
from ..ops import copies
from ..vectorized import GroupLayout, NotVectorizable, Vectorizer
from .perturbation import forms_groups, per_micro_batch, perturb, perturb_groups, union_group_gradients
from .state import MicroBatch
from .interface import Engine


__all__ = ["FellBack", "VectorizedStep"]


class FellBack(Exception):
    """The vectorized step gave up before touching anything: the caller takes one pass per micro-batch."""


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    """The same tensors, by identity (== on tensors would compare their values)."""
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))


class VectorizedStep:
    """The vectorized strategy of one engine, with what it keeps across steps: the `Vectorizer` of the trainable
    parameters, whether its first pass verified the model, why a forward found the model unfit (kept: each try costs
    a pass), and whether k stacked copies fit in GPU memory."""

    name = "vectorized"

    def __init__(self, engine: Engine):
        self.engine = engine
        self.vectorizer: Vectorizer | None = None
        self.verified = False  # the first pass checks that the loss reaches the weights only through the layers
        self.refusal: str | None = None
        self.memory_verdicts: dict[int, str | None] = {}  # "auto" on a GPU: whether k stacked copies fit, per k

    def problem(self, params: list[torch.Tensor], k: int) -> str | None:
        """Why the model cannot take this strategy now (None: it can), read before any pass."""
        if self.vectorizer is None or not _same(self.vectorizer.params, params):
            self.vectorizer, self.verified, self.refusal = Vectorizer(self.engine.model, params), False, None
        return self.refusal or self.vectorizer.why_not() or self.memory_problem(params, k)

    def memory_problem(self, params: list[torch.Tensor], k: int) -> str | None:
        """"auto" on a GPU: the vectorized step holds k stacked copies of the trainable parameters (three for GSAM and
        LookSAM, whose descent needs g_j and g_p,j); it is taken only where they fit in half of the memory free at the
        first step with k micro-batches (the decision is kept, so the path does not change mid-run)."""
        engine = self.engine
        device = params[0].device
        if engine.vectorize != "auto" or device.type != "cuda":
            return None
        if k not in self.memory_verdicts:
            copies_ = k * (3 if engine.descent.explicit else 1)
            need = copies_ * sum(p.numel() * p.element_size() for p in params)
            free = torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
            self.memory_verdicts[k] = None if need <= free / 2 else (
                f"its {copies_} stacked copies of the trainable parameters ({need / 2**30:.1f} GiB) would take more than "
                f"half of the free GPU memory ({free / 2**30:.1f} GiB); fewer micro-batches, LoRA or --msam_vectorize on "
                "would take it"
            )
        return self.memory_verdicts[k]

    def _refuse(self, err: NotVectorizable) -> FellBack:
        self.refusal = str(err)
        self.engine.take_sequential(self.refusal)
        return FellBack()

    def step(self, batch, layout: GroupLayout, weights, loss_fn, rho, sync=None) -> torch.Tensor:
        """Steps 1-4 for all k micro-batches at once; returns the clean loss (detached). `sync`: each micro-batch's
        weight a_j in the union over devices (synchronized scope), None for device-local perturbations."""
        try:
            with self.vectorizer.routing():  # the layers routed once for both passes
                return self._step(batch, layout, weights, loss_fn, rho, sync)
        except NotVectorizable as err:  # found before any pass (the model's state), or when the routes came off
            if self.engine.path == "vectorized" or self.verified:
                raise
            raise self._refuse(err) from err

    def _step(self, batch, layout: GroupLayout, weights, loss_fn, rho, sync=None) -> torch.Tensor:
        engine = self.engine
        vec, k = self.vectorizer, layout.k
        params = vec.params
        c = [1.0 if c_j is None else c_j for c_j in weights]
        explicit, clean_pass = engine.descent.explicit, engine.perturbation.needs_gradient
        functional = engine.descent.through_outputs  # Functional-SAM: ∇_F L of the batch's loss, rows of B_j = c_j·∇_F L_j
        groups = functools.partial(engine.perturbation.perturbing_groups, engine.model, engine._step, first=engine._first)
        reuse = engine._mode == "reuse"
        if engine.path != "vectorized":
            engine.log_path(f"vectorized ({k} micro-batches share each forward and backward)")
        # 1. every g_j at w, `.grad` untouched.
        g = None
        if clean_pass or reuse:
            try:
                # A reuse step's only forward is this one: DDP must then all-reduce the backward that follows it.
                with contextlib.nullcontext() if reuse else engine.no_sync(), vec.capture(layout) as capture:
                    with model_outputs(engine.model, functional) as outputs:
                        clean_loss = loss_fn(batch, MicroBatch(0, 1, 1.0, "reuse" if reuse else "clean", True))
                    if not self.verified:
                        capture.verify(clean_loss)
                        self.verified = True
                    # the backwards run inside the capture: activation checkpointing recomputes routed layers there
                    grad_outputs = engine.output_gradient(clean_loss, outputs) if functional else None  # before the graph goes
                    parts = self._group_gradients(capture, clean_loss)
            except NotVectorizable as err:  # nothing was accumulated or perturbed: the step can start again
                raise self._refuse(err) from err
            engine.path, engine.path_reason = "vectorized", None
            g = per_micro_batch(parts, c)
            del parts
            if sync is not None:
                g = union_group_gradients(engine, g, sync)
        else:
            if not self.verified:  # Momentum-SAM, Flat-LoRA (no clean pass): check once, with a forward, that the
                try:               # routed layers see every use of the weights, and that the layers a rule perturbs
                    #                per group (Flat-LoRA's base layers) take the layout; nothing is accumulated yet
                    with engine.no_sync(), vec.capture(layout) as capture, groups(layout):
                        capture.verify(loss_fn(batch, MicroBatch(0, 1, 1.0, "clean", False)))
                    del capture  # its records hold that forward's graph: freed before the perturbed pass
                    self.verified = True
                except NotVectorizable as err:
                    raise self._refuse(err) from err
            engine.path, engine.path_reason = "vectorized", None
        if reuse:  # LookSAM between its SAM steps: descend from g_j alone
            d = [engine.descent.reuse([t[j] for t in g]) for j in range(k)]
            self._accumulate_stacked(d, params, c)
            return clean_loss.detach()
        # 2. e_j from g_j: for all j at once where the rule has that form (SAM, ASAM, preconditioned: one op per tensor,
        #    not k), else micro-batch by micro-batch (F-SAM's EMA runs over j in order) into one stacked buffer, made
        #    at the first e_j that is not None: a rule that never moves the trainable weights (Flat-LoRA) has none.
        together = g is not None and forms_groups(engine.perturbation)
        e = None if g is None or explicit else g
        if together:
            e = perturb_groups(engine, copies(g) if explicit else g, rho, params)
        for j in range(0 if together else k):
            g_j = None if g is None else [t[j] for t in g]
            if explicit and g_j is not None:
                g_j = copies(g_j)
            e_j = perturb(engine, params, g_j, rho, params)
            if e is None and e_j is not None:
                e = [torch.zeros((k, *p.shape), dtype=p.dtype, device=p.device) for p in params]
            if e is not None:
                slices = [t[j] for t in e]
                if e_j is None:
                    torch._foreach_zero_(slices)
                elif e_j[0] is not slices[0]:
                    torch._foreach_copy_(slices, e_j)
        # 3. micro-batch j's rows at w + e_j, in one forward; 4. its backward adds Σ_j c_j·g_p,j to `.grad`. The rule's
        #    own per-group perturbation (Flat-LoRA: noise ε_j on the LoRA base weights for group j's rows) is entered
        #    around both, as `perturbing` is around each micro-batch's pass on the sequential path.
        with vec.perturbed(layout, e) if e is not None else contextlib.nullcontext(), groups(layout):
            if explicit:
                with vec.capture(layout) as capture:
                    perturbed_loss = loss_fn(batch, MicroBatch(0, 1, 1.0, "perturbed", not clean_pass))
                    g_p = per_micro_batch(self._group_gradients(capture, perturbed_loss), c)
            else:
                with model_outputs(engine.model, functional) as outputs:
                    perturbed_loss = loss_fn(batch, MicroBatch(0, 1, 1.0, "perturbed", not clean_pass))
                vec.check_routing()  # before the backward: a layer that ran unrouted saw no e_j
                # Functional-SAM: Σ_j c_j·J_F(w + e_j)ᵀ∇_F L_j(w), each row's F at its own w + e_j
                engine.backward_pass(engine.descent.surrogate(outputs, grad_outputs) if functional else perturbed_loss)
                del outputs
        del e
        if explicit:  # GSAM, LookSAM: .grad += Σ_j c_j·D(g_j, g_p,j)
            d = [engine.descent.descent([t[j] for t in g], [t[j] for t in g_p], c[j]) for j in range(k)]
            self._accumulate_stacked(d, params, c)
        perturbed_loss = perturbed_loss.detach()
        clean_loss = clean_loss.detach() if clean_pass else perturbed_loss
        engine.stats.add_losses(clean_loss, perturbed_loss)
        return clean_loss

    def _group_gradients(self, capture, loss: torch.Tensor) -> list[torch.Tensor]:
        """Every micro-batch's part of ∇loss, stacked [k, ...] per parameter; fp16: scaled, then unscaled."""
        scaler = self.engine.grad_scaler()
        if scaler is None:
            return capture.group_gradients(loss)
        g = capture.group_gradients(scaler.scale(loss))
        torch._foreach_mul_(g, inverse_scale(scaler))
        return g

    def _accumulate_stacked(self, d: list[list[torch.Tensor]], params: list[torch.Tensor], c: list) -> None:
        """.grad += Σ_j c_j·d_j, in one backward (see `MicroBatchSAM.accumulate`)."""
        total = None
        for d_j, c_j in zip(d, c):
            d_j = [t if t.dtype == p.dtype else t.to(p.dtype) for t, p in zip(d_j, params)]
            term = torch._foreach_mul(d_j, c_j.to(d_j[0].dtype) if isinstance(c_j, torch.Tensor) else c_j)
            if total is None:
                total = term  # fresh tensors: the later terms are added into them
            else:
                torch._foreach_add_(total, term)
        self.engine.accumulate(total, params, None)
