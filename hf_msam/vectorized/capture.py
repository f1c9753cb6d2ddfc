"""`Capture`: what a forward inside `Vectorizer.capture` recorded (each routed layer's input and output edge, the
fallback's probes), turned into every group's gradient by one backward (`group_gradients`), and the check that the
loss reaches the weights only through the recorded calls (`verify`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.autograd.graph import get_gradient_edge

from ..ops import as_dtype, unaliased
from .layout import GroupLayout, NotVectorizable
from .units import _no_autocast, _Unit

__all__ = ["Capture"]


@dataclass(eq=False)
class _Call:
    """One recorded call of a layer with a rule."""

    unit: _Unit
    x: torch.Tensor  # its input, detached (shares the version counter)
    version: int
    edge: object  # the autograd edge of its output: unaffected by later in-place ops on the output
    view: bool  # the output was a view (in-place ops on it would cut the edge off the graph)


class Capture:
    """What a forward inside `Vectorizer.capture` recorded; `group_gradients(loss)` turns it into gradients."""

    def __init__(self, vectorizer, layout: GroupLayout):  # vectorizer: the Vectorizer that records into it
        self.vectorizer, self.layout = vectorizer, layout
        self._calls: list[_Call] = []
        self._probes: list[tuple[int, torch.Tensor]] = []  # fallback calls: (parameter index, z)
        self._regions: list[tuple[list, set]] = []  # (output nodes, input nodes) of every call, for `verify`

    def _record(self, unit: _Unit, x: torch.Tensor, out: torch.Tensor) -> None:
        self._calls.append(_Call(unit, x.detach(), x._version, get_gradient_edge(out), out._is_view()))
        self._regions.append(([out.grad_fn], {x.grad_fn}))

    def group_gradients(self, loss: torch.Tensor, retain_graph: bool = False) -> list[torch.Tensor]:
        """For each parameter, [k, *p.shape]: slice j is the part of ∇loss that group j's positions contribute
        (with a loss that sums each group's own loss, group j's own gradient). One backward, to the recorded layer
        outputs only: `.grad` is untouched and the full weight gradients are never formed. `retain_graph` as for
        `torch.autograd.grad` (keep it to call `loss.backward()` afterwards)."""
        self.vectorizer.check_routing()  # at every step, not only the verified first: a layer run unrouted has no part
        params = self.vectorizer.params
        calls, probes = self._calls, self._probes
        inputs = [c.edge for c in calls] + [z for _, z in probes]
        grads = torch.autograd.grad(loss, inputs, allow_unused=True, retain_graph=retain_graph) if inputs else ()
        total: list[torch.Tensor | None] = [None] * len(params)

        def add(i: int, g: torch.Tensor) -> None:
            g = as_dtype(g, params[i].dtype)
            total[i] = g if total[i] is None else total[i] + g

        with _no_autocast(loss.device.type):  # the contractions run in the dtype of each layer's output gradient
            for call, delta in zip(calls, grads):
                if delta is None:
                    if call.view:
                        raise NotVectorizable(
                            f"{call.unit.where}: its output (a view) did not reach the loss, or was modified in place "
                            "later, which cuts it off the graph"
                        )
                    continue  # an output the loss does not use: no gradient
                if call.x._version != call.version:
                    raise NotVectorizable(f"{call.unit.where}: its input was modified in place after the layer read it")
                pos = self.layout.positions(delta.device)
                found = call.unit.rule.group_grad(call.unit.module, call.x, delta, pos, call.unit.wanted.keys())
                for name, g in found.items():
                    add(call.unit.wanted[name], g)
            for (i, _), g in zip(probes, grads[len(calls) :]):
                if g is not None:
                    add(i, g)
        if not retain_graph:
            self._calls, self._probes, self._regions = [], [], []
        k = self.layout.k
        # gradients of the fallback's probes may share storage (see `ops.unaliased`); callers scale them in place
        return unaliased([p.new_zeros((k, *p.shape)) if g is None else g for p, g in zip(params, total)])

    def verify(self, loss: torch.Tensor) -> None:
        """Raise NotVectorizable if `loss` reaches a covered parameter other than through a recorded layer call:
        a weight read directly by other code (DoRA's norm, a parent module's F.linear(x, child.weight), a
        penalty on the weights), which neither the rules nor the perturbation would see. Walks the whole graph
        in Python: meant for a first step, before `group_gradients` (which frees the graph)."""
        self.vectorizer.check_routing()  # a layer whose routing someone took off: the clearer reason of the two
        index = self.vectorizer._index
        inside: set = set()
        roots: set = set()
        for outputs, stops in self._regions:
            stack = [n for n in outputs if n is not None]
            roots.update(stack)
            while stack:
                node = stack.pop()
                if node in inside or node in stops:
                    continue
                inside.add(node)
                stack.extend(n for n, _ in node.next_functions if n is not None)
        bad: list[str] = []
        seen: set = set()
        stack = [loss.grad_fn] if loss.grad_fn is not None else []
        while stack:
            node = stack.pop()
            if node in seen:
                continue
            seen.add(node)
            if node.name() == "CheckpointFunctionBackward":  # reentrant torch.utils.checkpoint: its forward ran
                bad.append("a torch.utils.checkpoint region (reentrant: its forward ran without autograd, so no "
                           "layer call inside it was seen)")
            for child, _ in node.next_functions:
                if child is None:
                    continue
                if node not in inside:
                    variable = getattr(child, "variable", None)
                    if variable is not None and id(variable) in index:
                        where = self.vectorizer.parameter_name(index[id(variable)])
                        bad.append(f"{where} {list(variable.shape)} (read by {node.name()})")
                    elif child in inside and child not in roots:
                        bad.append(f"an intermediate result of a layer (read by {node.name()})")
                stack.append(child)
        if bad:
            found = "; ".join(sorted(set(bad))[:5])
            raise NotVectorizable(f"the loss uses parameters outside the layer calls the vectorized path sees: {found}")
