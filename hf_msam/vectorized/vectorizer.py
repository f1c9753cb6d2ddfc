"""`Vectorizer`: routes the covered layers' forwards while a context is active, so that one forward computes every
group's gradient (`capture`) or every group's pass at its own w + e_j (`perturbed`); layers without a rule run
through the torch.func fallback (vmap over the groups of `functional_call` at w + t_j)."""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils import checkpoint as torch_checkpoint

from ..integrations import hub_kernels
from ..integrations.patching import set_on_instance
from ..integrations.torch_internals import in_backward, in_checkpoint_region
from .layout import GroupLayout, NotVectorizable, Positions, _take
from .outside import _ACTIVE, READERS, OutsideCall
from .capture import Capture
from .registry import Rule
from .registry import rule_for as _rule_for
from .units import _Unit

__all__ = ["Vectorizer"]


# ---------------------------------------------------------------------------------------------
# The model's layers, and what each one does while a context is active
# ---------------------------------------------------------------------------------------------


def _module_problem(module: nn.Module) -> str | None:
    """Why this module, trainable or not, breaks the per-position picture; None when it does not."""
    name = type(module).__name__
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and (module.training or module.running_mean is None):
        return (
            f"{name} in train mode (batch statistics mix the rows of all groups, and the running statistics must "
            "update once per micro-batch)"
        )
    if isinstance(module, nn.modules.batchnorm._NormBase) and module.training and module.track_running_stats:
        return f"{name} in train mode with running statistics (they must update once per micro-batch)"
    checkpoint = getattr(module, "_gradient_checkpointing_func", None)  # transformers' checkpointing of this layer
    if getattr(module, "gradient_checkpointing", False) is True and getattr(checkpoint, "keywords", {}).get("use_reentrant"):
        return (
            "reentrant gradient checkpointing (its forward runs without autograd, so no layer call inside is seen, and "
            "torch refuses autograd.grad through it): use gradient_checkpointing_kwargs={'use_reentrant': False}, "
            "transformers' default"
        )
    if getattr(module, "batch_first", True) is False:
        return f"{name} with batch_first=False (the batch is in dim 1 of its inputs)"
    if name.startswith("Dora"):
        return f"{name} (PEFT DoRA) reads the LoRA weights directly, outside the calls of their layers"
    return None


def _may_have_problem(module: nn.Module) -> bool:
    """Whether `_module_problem` can ever find something in this module (its type and attributes, not its state):
    `why_not` reads the state of these only, at every step."""
    return (
        isinstance(module, nn.modules.batchnorm._NormBase)
        or hasattr(module, "gradient_checkpointing")
        or hasattr(module, "batch_first")
        or type(module).__name__.startswith("Dora")
    )


def _has_forward(module: nn.Module) -> bool:
    return type(module).forward is not nn.Module.forward  # ParameterDict, ParameterList: their parent uses them


_TENSOR = object()  # marks where a fallback's output had a tensor
# torch.utils.checkpoint ends a recomputation early (once it has every tensor it saved) by raising this through the
# forward it is re-running: control flow, not a failure of the fallback, so it passes through unchanged.
_CHECKPOINT_STOP: tuple[type, ...] = tuple(
    e for e in [getattr(torch_checkpoint, "_StopRecomputationError", None)] if isinstance(e, type)
)


class _Bare(nn.Module):
    """Holds `module` and calls `forward` (its forward as it was before routing) with `module`'s parameters swapped
    by `functional_call`: the module's own forward hooks and pre-hooks run once, around the routed call, as for
    a layer with a rule (inside vmap, a hook such as transformers' `requires_grad_` on the input embeddings fails)."""

    def __init__(self, module: nn.Module, forward: Callable):
        super().__init__()
        self.module, self._forward = module, forward

    def forward(self, *args, **kwargs):
        return self._forward(*args, **kwargs)


def _probe(p: torch.Tensor, k: int) -> torch.Tensor:
    """z = 0 of shape [k, *p.shape] whose gradient autograd.grad can ask for: a zero-strided view of one zero that
    requires grad, so that no k copies of the parameter are allocated (the gradient with respect to the view is
    materialized, [k, *p.shape], and is each group's own)."""
    return torch.zeros((), dtype=p.dtype, device=p.device, requires_grad=True).expand(k, *p.shape)


def _routed(unit: _Unit, forward: Callable, own: Callable | None) -> Callable:
    """What replaces `unit.module.forward` while a context is active: `forward(unit, inner, ...)`, inner the module's
    forward of before. The same object at every pass (while no one else replaces the module's forward): compiled
    code guards on it, and a new one at each pass would recompile the model at each pass. Once torch.compile has been
    imported (someone compiled something), it runs outside compilation (`torch.compiler.disable`): the routed
    forwards read Python state that compiled code would freeze, so the compiled model breaks its graph at each
    routed layer and compiles what lies between them."""
    compiling = "torch._dynamo" in sys.modules
    cached = unit.routed.get(forward.__name__)
    if cached is not None and cached[0] is own and cached[1] == compiling:
        return cached[2]
    routed = functools.partial(forward, unit, own if own is not None else unit.module.forward)
    if compiling:
        routed = torch.compiler.disable(routed)
    unit.routed[forward.__name__] = (own, compiling, routed)
    return routed


class Vectorizer:
    """Per-group gradients (`capture`) and per-group perturbed passes (`perturbed`) of `model`.

    `params` are the trainable parameters, in the caller's order: `group_gradients` answers in that order, and
    `perturbed` takes its e in that order. The covered modules' forwards are routed through this object only while
    a context is active; nothing is left on the model outside. `why_not()` says, before any forward, whether every
    parameter is covered. `allow_fallback=False` refuses layers without a rule instead of running them through
    torch.func. A layer that turns out, during a forward, not to fit the layout raises `NotVectorizable`.
    """

    def __init__(self, model: nn.Module, params: Sequence[nn.Parameter], allow_fallback: bool = True):
        self.model = model
        self.params = list(params)
        self.allow_fallback = allow_fallback
        self._index: dict[int, int] = {}
        for i, p in enumerate(self.params):
            if id(p) in self._index:
                raise ValueError(f"parameter {i} is listed twice (it is parameter {self._index[id(p)]})")
            self._index[id(p)] = i
        self._units, self._problems = self._scan()
        # the modules whose state `why_not` reads at each step (a full walk of the model at every pass costs more
        # than some small models' layers); a model that gains modules gets a new Vectorizer with its new parameters
        self._watched = [(n or "<model>", m) for n, m in model.named_modules() if _may_have_problem(m)]
        self._transformers_models = hub_kernels.transformers_models(model)  # whose hub kernels `settle` aligns
        # What the routed forwards read, set by the contexts:
        self._layout: GroupLayout | None = None
        self._e: list[torch.Tensor] | None = None
        self._capture: Capture | None = None
        self._suspended = 0  # > 0 inside a fallback's functional call: its subtree is its business
        self._undo: list[tuple[_Unit, Callable, Callable[[], bool]]] = []  # (unit, its routed forward, the undo)
        self._reader_undo: list[Callable[[], object]] = []  # the integrations' hooks (`outside.READERS`)
        self._installed = False

    # -- what is covered --------------------------------------------------------------------------
    def _scan(self) -> tuple[list[_Unit], list[str]]:
        problems: list[str] = []
        names = {id(m): n for n, m in self.model.named_modules()}
        parents = {id(c): m for m in self.model.modules() for c in m.children()}
        units: dict[int, _Unit] = {}
        covered: set[int] = set()
        for name, module in self.model.named_modules():
            where = f"{name or '<model>'} ({type(module).__name__})"
            direct = {n: self._index[id(p)] for n, p in module.named_parameters(recurse=False) if id(p) in self._index}
            if not direct:
                continue
            covered.update(direct.values())
            rule = _rule_for(module)
            if rule is not None and set(direct) <= set(rule.params):
                reason = rule.refuse(module) if rule.refuse is not None else None
                if reason:
                    problems.append(f"{where}: {reason}")
                else:
                    units[id(module)] = _Unit(name, module, rule, direct)
                continue
            if not self.allow_fallback:
                why = f"holds trainable parameter {next(iter(direct))} and its layer type has no grouped rule"
                problems.append(f"module {where} {why}")
                continue
            owner = module
            while not _has_forward(owner) and id(owner) in parents:  # a parameter container: its user is the parent
                owner = parents[id(owner)]
            if not _has_forward(owner):
                problems.append(f"{where} holds trainable parameters but no module computes with them")
                continue
            if isinstance(owner, nn.RNNBase):
                problems.append(f"{where}: recurrent layers have no vmap rule in torch.func, so no fallback")
                continue
            if id(owner) not in units:
                wanted = {n: self._index[id(p)] for n, p in owner.named_parameters() if id(p) in self._index}
                units[id(owner)] = _Unit(names[id(owner)], owner, None, wanted)
        missing = [i for i in range(len(self.params)) if i not in covered]
        if missing:
            problems.append(f"parameters {missing[:8]} of the list are not parameters of the model")
        return list(units.values()), problems

    def why_not(self) -> str | None:
        """None when every parameter is covered by a rule or the fallback and no module is in a state that breaks
        the per-position picture (read now: train mode, checkpointing and compilation can change after this object
        was built); otherwise the reasons, in one line."""
        problems = list(self._problems)
        for name, module in self._watched:
            problem = _module_problem(module)
            if problem:
                problems.append(f"{name} ({type(module).__name__}): {problem}")
        return "; ".join(problems) if problems else None

    def covered(self) -> list[tuple[str, nn.Module, Rule | None]]:
        """(name, module, its rule, or None for the torch.func fallback) of every module that takes part."""
        return [(u.name, u.module, u.rule) for u in self._units]

    def parameter_name(self, i: int) -> str:
        """params[i] by its name in the model, for messages: "lm_head.weight (parameter 20)"."""
        p = self.params[i]
        name = next((n for n, q in self.model.named_parameters(remove_duplicate=False) if q is p), None)
        return f"parameter {i}" if name is None else f"{name} (parameter {i})"

    def fallback_modules(self) -> list[str]:
        """The modules run through the torch.func fallback (outermost ones, by name), for logs."""
        fallbacks = [u for u in self._units if u.rule is None]
        return [u.where for u in fallbacks if not any(u.name.startswith(f"{v.name}.") for v in fallbacks if v is not u)]

    # -- the contexts -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def capture(self, layout: GroupLayout) -> Iterator[Capture]:
        """A forward inside records what `Capture.group_gradients` needs; it returns the same loss as without."""
        cap = Capture(self, layout)
        with self._active(layout, capture=cap):
            yield cap

    @contextlib.contextmanager
    def perturbed(self, layout: GroupLayout, e: Sequence[torch.Tensor]) -> Iterator[None]:
        """Inside, group j's positions see params[i] + e[i][j] (e[i] of shape [k, *params[i].shape]); the weights are
        never written. A backward inside (run the backward inside, for layers that recompute) puts into `.grad` the
        sum over groups of each group's part of the gradient at its own perturbed weights."""
        e = list(e)
        if len(e) != len(self.params):
            raise ValueError(f"e has {len(e)} tensors for {len(self.params)} parameters")
        for i, (p, t) in enumerate(zip(self.params, e)):
            if tuple(t.shape) != (layout.k, *p.shape):
                raise ValueError(f"e[{i}] has shape {list(t.shape)}, expected {[layout.k, *p.shape]}")
        with self._active(layout, e=e):
            yield

    @contextlib.contextmanager
    def routing(self) -> Iterator[None]:
        """Keeps the covered layers' forwards routed for its duration, so that the `capture` and `perturbed`
        contexts inside do not each route and restore them (a forward outside those contexts runs the layer as it
        is). What the contexts check at their end is checked here."""
        reason = self.why_not()
        if reason:
            raise NotVectorizable(reason)
        if self._installed:
            yield
            return
        self._install()
        try:
            yield
            self.check_routing()
        finally:
            self._uninstall()

    @contextlib.contextmanager
    def _active(self, layout: GroupLayout, e: list[torch.Tensor] | None = None, capture: Capture | None = None):
        reason = self.why_not()
        if reason:
            raise NotVectorizable(reason)
        if self._layout is not None and (self._layout.members, self._layout.axis) != (layout.members, layout.axis):
            raise ValueError(f"capture and perturbed must share a layout: {self._layout} is active, got {layout}")
        if (e is not None and self._e is not None) or (capture is not None and self._capture is not None):
            raise RuntimeError("this Vectorizer is already inside the same kind of context")
        saved = (self._layout, self._e, self._capture)
        self._layout = layout
        self._e = e if e is not None else self._e
        self._capture = capture if capture is not None else self._capture
        first = not self._installed
        token = _ACTIVE.set(self)
        try:
            if first:
                self._install()
            yield
            if first:
                self.check_routing()  # what ran unrouted computed no group's part: never a silent wrong answer
        finally:
            if first:
                self._uninstall()
            _ACTIVE.reset(token)
            self._layout, self._e, self._capture = saved

    def _install(self) -> None:
        self._installed = True
        hub_kernels.settle(self._transformers_models)  # a kernelization the pass's model.train() would run: now
        for unit in self._units:
            routed = _routed(unit, self._rule_forward if unit.rule is not None else self._fallback_forward,
                             unit.module.__dict__.get("forward"))
            self._undo.append((unit, routed, set_on_instance(unit.module, "forward", routed)))
        self._reader_undo = [install() for install in READERS]  # integrations' hooks (TRL's fused LM head)

    def _uninstall(self) -> None:
        """Every unit's forward back as it was found, or as someone who replaced ours in between left it; the
        integrations' hooks off. Never raises (it runs in `finally`); a routed forward left inside someone else's
        wrapper calls through."""
        while self._reader_undo:
            try:
                self._reader_undo.pop()()
            except Exception:  # noqa: BLE001 (an undo must not hide the exception on its way, nor stop the others)
                pass
        while self._undo:
            self._undo.pop()[2]()
        self._installed = False

    def outside_call(self, tensors: Sequence[torch.Tensor | None]) -> OutsideCall | None:
        """For code that reads some of `tensors` (covered parameters) outside a routed layer and computes group by
        group itself: what group j adds to each (see `hf_msam.vectorized.outside`), or None when no context is
        active, inside a fallback's functional call, or when none of `tensors` is covered."""
        if self._layout is None or self._suspended:
            return None
        found = [None if t is None else self._index.get(id(t)) for t in tensors]
        if all(i is None for i in found):
            return None
        capture = self._capture if torch.is_grad_enabled() and not in_backward() else None
        e = [None if i is None or self._e is None else self._e[i] for i in found]
        probes: list[torch.Tensor | None] = []
        for i in found:
            z = None
            if i is not None and capture is not None:
                z = _probe(self.params[i], self._layout.k)
                capture._probes.append((i, z))
            probes.append(z)
        return OutsideCall(self._layout, e, probes, capture)

    def routing_problem(self) -> str | None:
        """None while every routed forward is still in place; else which modules' forwards someone else replaced or
        removed since the context began (the layer then ran unrouted: its perturbation or its gradient is missing)."""
        changed = []
        for unit, routed, _ in self._undo:
            now = unit.module.__dict__.get("forward")
            if now is not routed:
                what = "removed" if now is None else f"replaced by {getattr(now, '__qualname__', type(now).__name__)}"
                changed.append(f"{unit.where}: its forward was {what}")
        if not changed:
            return None
        more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
        return ("the routed forwards changed during the pass (" + "; ".join(changed[:3]) + more + ")"
                + hub_kernels.explain_changed_forward(self.model))

    def check_routing(self) -> None:
        """Raise NotVectorizable if a routed forward was replaced or removed since the context began."""
        problem = self.routing_problem()
        if problem:
            raise NotVectorizable(problem)

    # -- a layer with a rule ----------------------------------------------------------------------
    def _rule_forward(self, unit: _Unit, inner: Callable, *args, **kwargs):
        if self._suspended or self._layout is None:  # inactive: left inside someone's wrapper after the context
            return inner(*args, **kwargs)
        if unit.rule.per_row:
            return self._per_row_forward(unit, inner, *args, **kwargs)
        x = args[0] if args else next(iter(kwargs.values()))
        pos = self._layout.positions(x.device)
        broadcast = pos.broadcasts(x)
        if broadcast:  # [1, ...] broadcast over the batch (position ids): every row uses it, one copy per row (views)
            x = x.expand(pos.extent, *x.shape[1:])
        pos.check(x, unit)
        capture = self._capture if torch.is_grad_enabled() else None
        e = None if self._e is None else {name: self._e[i] for name, i in unit.wanted.items()}
        # Inside activation checkpointing, the capture does not keep x and the output's edge (that would keep the
        # activations checkpointing frees): the layer runs at w + z_j, z a zero [k, ...] tensor autograd
        # differentiates, as the fallback does, and ∂L/∂z_j is group j's gradient. The recomputation in the backward
        # takes the same path (same saved tensors) and records nothing.
        probed = capture is not None and in_checkpoint_region()
        if probed:
            z = {name: _probe(self.params[i], pos.k) for name, i in unit.wanted.items()}
            e = z if e is None else {name: e[name] + z[name] for name in e}
        out = None
        if e is not None and unit.rule.forward_at is not None:
            out = unit.rule.forward_at(unit.module, x, e, pos)
        if out is None:
            out = inner(*args, **kwargs)
            if broadcast:  # each row's copy then gets its own output gradient, and its own group's perturbation
                out = out.expand(pos.extent, *out.shape[1:])
            if e is not None:
                out = out + unit.rule.delta(unit.module, x, out, e, pos)
        if capture is not None and out.requires_grad and not in_backward():
            if probed:
                capture._probes.extend((i, z[name]) for name, i in unit.wanted.items())
                capture._regions.append(([out.grad_fn], {x.grad_fn}))
            else:
                capture._record(unit, x, out)
        return out

    def _per_row_forward(self, unit: _Unit, inner: Callable, *args, **kwargs):
        """A rule with `per_row`: the layer's own forward, once, with parameter p replaced by [B, ...]: row i's
        p + t_j, t = e (perturbed), z (capture: a zero probe whose gradient is each group's part), or both."""
        capture = self._capture if torch.is_grad_enabled() else None
        if self._e is None and capture is None:
            return inner(*args, **kwargs)
        some = next(iter(unit.wanted.values()))
        pos = self._layout.positions(self.params[some].device)
        if pos.axis != 0:
            raise NotVectorizable(f"{unit.where}: its parameters are broadcast over rows, and the batch is packed")
        recording = capture is not None and not in_backward()
        rows = pos.group_ids(1)
        weights = {}
        for name, i in unit.wanted.items():
            p = self.params[i]
            if p.dim() < 1 or p.shape[0] != 1:
                raise NotVectorizable(f"{unit.where}: its parameter {name} {list(p.shape)} is not broadcast over rows")
            t = None if self._e is None else self._e[i]
            if capture is not None:
                z = _probe(p, pos.k)
                if recording:
                    capture._probes.append((i, z))
                t = z if t is None else t + z
            weights[f"module.{name}"] = (p + t).flatten(0, 1).index_select(0, rows)  # [B, *p.shape[1:]]
        try:
            out = torch.func.functional_call(_Bare(unit.module, inner), weights, args, kwargs)
        except (NotVectorizable, *_CHECKPOINT_STOP):
            raise
        except Exception as err:  # a use of the parameters other than broadcasting over rows
            raise NotVectorizable(f"{unit.where} with each row's own parameters failed: {type(err).__name__}: {err}") from err
        if recording:
            leaves = [v for v in pytree.tree_leaves((args, kwargs)) if isinstance(v, torch.Tensor)]
            outputs = [y.grad_fn for y in pytree.tree_leaves(out) if isinstance(y, torch.Tensor)]
            capture._regions.append((outputs, {v.grad_fn for v in leaves}))
        return out

    # -- a layer without one: torch.func ----------------------------------------------------------
    def _fallback_forward(self, unit: _Unit, inner: Callable, *args, **kwargs):
        capture = self._capture if torch.is_grad_enabled() else None
        if self._suspended or self._layout is None or (self._e is None and capture is None):
            return inner(*args, **kwargs)
        recomputing = in_backward()  # activation checkpointing's recomputation: the same computation, no records
        leaves, spec = pytree.tree_flatten((args, kwargs))
        some = next(iter(unit.wanted.values()))
        pos = self._layout.positions(self.params[some].device)
        batched = [i for i, v in enumerate(leaves) if isinstance(v, torch.Tensor) and pos.carries_batch(v)]
        if not batched:  # only inputs broadcast over the batch: every row uses them (see _rule_forward)
            for i, v in enumerate(leaves):
                if isinstance(v, torch.Tensor) and pos.broadcasts(v):
                    leaves[i] = v.expand(pos.extent, *v.shape[1:])
                    batched.append(i)
        if not batched:
            raise NotVectorizable(f"{unit.where}: none of its inputs carries the batch in its leading dims")
        # Group j runs with params + t_j: t = e (perturbed), z (capture: zeros autograd differentiates), or e + z.
        names, indices, ts = list(unit.wanted), list(unit.wanted.values()), []
        for i in indices:
            t = self._e[i] if self._e is not None else None
            if capture is not None:
                p = self.params[i]
                z = _probe(p, pos.k)
                if not recomputing:
                    capture._probes.append((i, z))
                t = z if t is None else t + z
            ts.append(t)

        def one_group(ts: list[torch.Tensor], grouped: list[torch.Tensor]):
            values = list(leaves)
            for i, g in zip(batched, grouped):
                values[i] = g
            group_args, group_kwargs = pytree.tree_unflatten(values, spec)
            weights = {f"module.{name}": self.params[i] + t for name, i, t in zip(names, indices, ts)}
            result = torch.func.functional_call(bare, weights, group_args, group_kwargs)
            # vmap returns tensors only: the output's structure and its other leaves (None, ints) are kept aside
            values, shape["spec"] = pytree.tree_flatten(result)
            shape["others"] = [_TENSOR if isinstance(v, torch.Tensor) else v for v in values]
            return [v for v in values if isinstance(v, torch.Tensor)]

        def run(ts: list[torch.Tensor], grouped: list[torch.Tensor]) -> list[torch.Tensor]:
            """vmap of one_group over the leading dim of ts and grouped ([n, s, ...]: n groups of s positions)."""
            if pos.axis == 1:
                grouped = [g.unsqueeze(1) for g in grouped]  # each group is a one-row batch [1, s, ...]
            self._suspended += 1  # our routed forwards in the subtree, and this one itself, stand aside
            try:
                return torch.func.vmap(one_group, randomness="different")(ts, grouped)
            except (NotVectorizable, *_CHECKPOINT_STOP):
                raise
            except Exception as err:
                failure = f"{type(err).__name__}: {err}"
                raise NotVectorizable(f"the torch.func fallback for {unit.where} failed: {failure}") from err
            finally:
                self._suspended -= 1

        shape: dict = {}
        bare = _Bare(unit.module, inner)  # the module's own forward: its hooks run once, around this call, not per group
        if pos.buckets is None:  # equal groups: all of them in one vmap, [k, r, ...]
            tensors = run(ts, [pos.grouped(leaves[i]) for i in batched])
            tensors = [self._back_to_positions(y, pos, unit, pos.k, pos.r) for y in tensors]
        else:
            # Groups of different sizes: padding a short group to r positions would let its copies of a position
            # enter whatever the module computes across positions (a mean over rows, attention), so each bucket of
            # equal groups runs in a vmap of its own, unpadded. ts[i][b.groups] is each group's own t_j: the
            # gradient of z reaches row j from group j's bucket only.
            per_bucket, structure = [], None
            for b, inputs in zip(pos.buckets, zip(*[pos.bucketed(leaves[i]) for i in batched])):
                ys = run([_take(t, b.groups) for t in ts], list(inputs))
                if structure is not None and structure != (shape["spec"], shape["others"]):
                    raise NotVectorizable(f"{unit.where}: its output's structure depends on the number of positions")
                structure = (shape["spec"], shape["others"])
                per_bucket.append([self._back_to_positions(y, pos, unit, b.n, b.size, keep_groups=True) for y in ys])
            tensors = [self._from_buckets(ys, pos, unit) for ys in zip(*per_bucket)]
        back = iter(tensors)
        out = pytree.tree_unflatten([next(back) if v is _TENSOR else v for v in shape["others"]], shape["spec"])
        if capture is not None and not recomputing:
            outputs = [y.grad_fn for y in pytree.tree_leaves(out) if isinstance(y, torch.Tensor)]
            capture._regions.append((outputs, {v.grad_fn for v in leaves if isinstance(v, torch.Tensor)}))
        return out

    @staticmethod
    def _back_to_positions(y: torch.Tensor, pos: Positions, unit: _Unit, n: int, size: int, keep_groups: bool = False):
        """One output of a vmap over n groups of `size` positions, back at the batch's positions ([n, size, ...]
        with `keep_groups`, for `_from_buckets`)."""
        expect = (n, size) if pos.axis == 0 else (n, 1, size)
        if tuple(y.shape[: len(expect)]) != expect:
            raise NotVectorizable(
                f"{unit.where}: an output of shape {list(y.shape[1:])} per group does not carry the group's positions"
            )
        y = y if pos.axis == 0 else y[:, 0]
        return y if keep_groups else pos.ungrouped(y)

    @staticmethod
    def _from_buckets(ys: Sequence[torch.Tensor], pos: Positions, unit: _Unit) -> torch.Tensor:
        """One output, from each bucket's [n_b, s_b, *rest], back at the batch's positions."""
        if len({tuple(y.shape[2:]) for y in ys}) > 1 or len({y.dtype for y in ys}) > 1:
            shapes = [list(y.shape[1:]) for y in ys]
            raise NotVectorizable(f"{unit.where}: outputs of shapes {shapes} per group do not line up across positions")
        return pos.unbucketed(ys)
