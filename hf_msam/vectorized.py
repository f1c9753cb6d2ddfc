"""Every micro-batch's gradient, and every micro-batch's perturbed pass, in one forward and one backward.

mSAM cuts a device batch into k groups B_1..B_k (micro-batches) and needs, for each trainable parameter w,

    (1)  g_j = Σ_{i∈B_j} ∂ℓ_i/∂w (w)                   every group's own gradient, j = 1..k
    (2)  Σ_j Σ_{i∈B_j} ∂ℓ_i/∂w (w + e_j)               the descent pass: group j's positions see w + e_j

where i runs over positions (rows of the batch, or tokens of a packed row) and ℓ_i is position i's share of the
loss. The plain engine takes 2k passes for this; here each takes one forward and one backward over the whole batch.

**Per-group gradients (1).** A layer y = f(x; w) applied position by position has the gradient
∂L/∂w = Σ_i J_w f(x_i; w)ᵀ δ_i, with δ_i = ∂L/∂y_i its output gradient: a sum over positions of terms that
need only the layer's input and output gradient. Summing over the positions of each group instead of over all of them
gives g_j. So `Vectorizer.capture` records each layer call's input and the autograd edge of its output, and
`Capture.group_gradients` asks autograd for the δ of every recorded output (never for the weights' gradients:
`.grad` is untouched) and contracts per group, one rule per layer type (`Rule.group_grad`):

    nn.Linear        y = W x + b      g_W,j = Σ_{i∈B_j} δ_i x_iᵀ (one bmm over groups),  g_b,j = Σ_{i∈B_j} δ_i
    Conv1D (GPT-2)   y = xᵀ W + b     g_W,j = Σ_{i∈B_j} x_i δ_iᵀ
    nn.Embedding     y = W[id]        g_W,j[v] = Σ_{i∈B_j, id_i = v} δ_i (index_add into k·V rows)
    nn.LayerNorm     y = x̂ ⊙ γ + β    g_γ,j = Σ_{i∈B_j} δ_i ⊙ x̂_i,  g_β,j = Σ_{i∈B_j} δ_i  (x̂ recomputed)
    nn.RMSNorm       y = x̂ ⊙ γ        g_γ,j = Σ_{i∈B_j} δ_i ⊙ x̂_i
    Llama's RMSNorm  y = γ ⊙ x̂        g_γ,j = Σ_{i∈B_j} δ_i ⊙ x̂_i  (x̂ normalized in float32, cast to x's dtype)

The last is transformers' LlamaRMSNorm and every class whose forward is the same bytecode (Qwen2RMSNorm,
MistralRMSNorm, Qwen3RMSNorm and the many others transformers generates from Llama's code): it is chosen by what
the class's forward is, not by its name or type (`register_forward_rule`, `_computes_like_llama_rms_norm`), and
recomputes x̂ with the module's own operations, so bitwise the x̂ the module multiplies by. Gemma's RMSNorm
(x̂ ⊙ (1 + γ), rounded to x's dtype after the product) computes another formula and has no rule.

**Perturbed pass (2).** `Vectorizer.perturbed` routes each covered layer's forward so that group j's positions
see w + e_j. All the layers above are affine in their parameters, f(x; w + e) = f(x; w) + Δ(x; e), with Δ
independent of w: for Embedding, LayerNorm and nn.RMSNorm the layer runs as usual and Δ_{j(i)} is added (a row of
e_j, x̂ ⊙ e_γ,j + e_β,j). Llama's RMSNorm is computed directly as (γ + e_γ,j) ⊙ x̂, so that its input gradient
passes its float32 round trip as one product, rounded as in a pass at w + e_j. For Linear and Conv1D, Δ = e_j x_i would cost a second matmul forward and backward, so the
output is computed directly as one bmm of the group-major inputs with W + e_j; its backward gives W the sum over
groups with one matmul, as a plain layer would, and the k perturbed weights are rebuilt in the backward rather than
kept. Either way, a backward leaves in w.grad Σ_i J_w f(x_i)ᵀ δ_i, δ_i the output gradient of the perturbed
network: exactly (2). The weights are never written. (A rule that perturbs frozen weights, Flat-LoRA, routes those
layers itself for the pass, from the same `Positions`: see `PerturbationRule.perturbing_groups`.)

**Everything else** holding a trainable parameter directly (Gemma's RMSNorm, Conv2d, ViT's embeddings with their
cls_token, a custom layer), or a known layer type used in an unusual way (a subclass that overrides `forward`), is
run by a `torch.func` fallback for that module alone, its whole subtree included: its inputs are arranged by group,
`vmap` runs the module once per group through `functional_call` with parameters w + t_j, and the outputs go back to
their positions. For (2), t_j = e_j. For (1), t_j = z_j, a zero tensor of shape [k, *w.shape] that autograd
differentiates: ∂L/∂z_j is group j's gradient, from the same backward, with the same dropout masks as the forward.
Whole-model vmap fails on transformers' attention-mask code, which is why the fallback never goes above the module
that holds the parameters.

**Positions and padding.** A `GroupLayout` says which positions of the batch form group j: contiguous rows (dim 0),
preference pairs (rows a..b-1 with n+a..n+b-1), or token ranges of a packed one-row batch (dim 1). Groups are
arranged group-major as [k, r, ...], r the largest group. For the rules, a smaller group is padded with copies of
its first position (always finite inputs), and the output gradients of padding slots are zero, so padding adds
nothing: a rule computes position by position. The fallback runs a whole module, which may compute across the
positions of its call, so it never pads: with equal groups it runs one vmap over [k, r, ...]; with groups of
different sizes, one vmap per distinct size (a `Bucket` of the groups of that size, [n_b, s_b, ...], each with its
own rows t_j), whose outputs are put back at their positions. A layout with s distinct sizes costs s vmapped calls
of such a module instead of one (2 when only the last group is short; up to k for a packed batch, whose groups
rarely hold equal token counts); the buckets' indices are slices where consecutive, else index tensors built with
the layout's other ones, once per device.
A layer whose input does not carry the batch in its leading dims raises `NotVectorizable`: the caller then falls
back to one pass per group. An input of shape [1, ...] where rows are expected (BERT's and GPT-2's position ids) is
taken as broadcast over the batch: it and the layer's output are expanded to the batch (views), so that each row's
copy gets its own output gradient and its own group's perturbation.

**Activation checkpointing** (torch.utils.checkpoint, non-reentrant: transformers' default) recomputes a region's
forward in the backward to get its saved tensors back. The backwards therefore run inside the contexts, so that the
recomputation takes the routed forwards again and saves the same tensors; it records nothing (`_recomputing`).
Inside a region the capture does not keep the layer's input and output edge (that would keep the activations
checkpointing frees): the layer runs at w + z_j with probes z as in the fallback, and ∂L/∂z_j is g_j, computed in
the backward as it goes. Reentrant checkpointing runs its forward without autograd and refuses autograd.grad:
`why_not` refuses transformers' reentrant flag and `verify` finds a reentrant region.

**torch.compile.** The routed forwards run outside compilation (`_routed`): a compiled model breaks its graph at
each routed layer, the code between them stays compiled, and nothing is recompiled from one pass to the next.

**What it cannot see.** Rows must not meet inside the model: `why_not` refuses BatchNorm in train mode, but other
cross-row computations (a mixture-of-experts' load-balancing term, in-batch negatives) would make "group j's part"
differ from group j's own gradient. (Inside a module the fallback runs, positions meet within their group only,
exactly as in the sequential step's micro-batch, whatever the group sizes: a norm over the rows, or attention
across the rows or across the tokens of a packed row, inside such a module gives each group its own gradient.)
A weight read outside its layer's call (PEFT DoRA, `F.linear(x, child.weight)` in a parent, a penalty on the
weights) is invisible to the routed forwards: `Capture.verify` finds such reads in the autograd graph. `why_not`
reads the modules' states (train mode, checkpointing) each time it is called. `group_gradients` holds every
recorded output's gradient at once (about the size of the activations) and returns k copies of the parameters'
shapes.

Nothing here synchronizes with the host: layouts are Python ints, their index tensors are built once per device.
Rules compute in the dtype of the layer's output (bf16 under autocast, like autograd would).
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.graph import get_gradient_edge
from torch.utils import _pytree as pytree
from torch.utils import checkpoint as torch_checkpoint

from .integrations import hub_kernels
from .integrations.hub_kernels import hub_kernel_forward
from .integrations.patching import set_on_instance
from .ops import unaliased

__all__ = [
    "Capture", "GroupLayout", "NotVectorizable", "Positions", "Rule", "Vectorizer", "llama_rms_norm_rule",
    "register_forward_rule", "register_rule",
]


class NotVectorizable(RuntimeError):
    """The model or the batch cannot take the vectorized path; the caller should run one pass per group."""


# ---------------------------------------------------------------------------------------------
# Which positions belong to which group
# ---------------------------------------------------------------------------------------------


class GroupLayout:
    """Which positions of the device batch belong to group j (j = 0..k-1).

    `axis` is the batch dimension the groups are cut along: 0 (rows) or 1 (tokens of a one-row packed batch), and
    `extent` its length. Layouts are built from Python ints and cached: equal arguments give the same object, whose
    index tensors are then built once per device.
    """

    def __init__(self, kind: str, members: tuple[tuple[int, ...], ...], axis: int, extent: int, sizes: tuple[int, ...]):
        self.kind, self.members, self.axis, self.extent, self.sizes = kind, members, axis, extent, sizes
        self._positions: dict[torch.device, Positions] = {}

    @property
    def k(self) -> int:
        return len(self.members)

    def __repr__(self) -> str:
        return f"GroupLayout.{self.kind}({list(self.sizes)})"

    @classmethod
    def rows(cls, sizes: Sequence[int]) -> GroupLayout:
        """Contiguous rows along dim 0: group j is rows s_0+..+s_{j-1} .. s_0+..+s_j - 1 (as `split_batch` cuts)."""
        return _rows(tuple(_check_sizes(sizes)))

    @classmethod
    def pairs(cls, sizes: Sequence[int]) -> GroupLayout:
        """Preference batches of 2n rows (chosen rows 0..n-1, rejected rows n..2n-1): group j holds sizes[j] pairs,
        rows a..b-1 and n+a..n+b-1 (as `batches.split_pairs` cuts)."""
        return _pairs(tuple(_check_sizes(sizes)))

    @classmethod
    def tokens(cls, bounds: Sequence[int], sizes: Sequence[int] | int) -> GroupLayout:
        """A packed one-row batch [1, T] whose sequences start at `bounds` = [0, c_1, ..., T]: group j is the token
        range of its sequences, `sizes[j]` sequences each (an int m: m sequences a group, the last maybe fewer, as
        `batches.split_packed` cuts)."""
        bounds = tuple(int(b) for b in bounds)
        n_sequences = len(bounds) - 1
        if n_sequences < 1 or bounds[0] != 0 or any(b <= a for a, b in zip(bounds, bounds[1:])):
            raise ValueError(f"bounds must rise strictly from 0, got {list(bounds)[:4]}...")
        if isinstance(sizes, int):
            sizes = [min(sizes, n_sequences - a) for a in range(0, n_sequences, sizes)]
        sizes = tuple(_check_sizes(sizes))
        if sum(sizes) != n_sequences:
            raise ValueError(f"the groups hold {sum(sizes)} sequences, the batch has {n_sequences}")
        return _tokens(bounds, sizes)

    def positions(self, device: torch.device | str) -> Positions:
        """The index tensors of this layout on `device`, built on first use (one host-to-device copy)."""
        device = torch.device(device)
        found = self._positions.get(device)
        if found is None:
            found = self._positions[device] = Positions(self, device)
        return found


def _check_sizes(sizes: Sequence[int]) -> list[int]:
    sizes = [int(s) for s in sizes]
    if not sizes or min(sizes) < 1:
        raise ValueError(f"group sizes must be positive ints, got {sizes}")
    return sizes


def _starts(sizes: tuple[int, ...]) -> list[int]:
    starts = [0]
    for s in sizes:
        starts.append(starts[-1] + s)
    return starts


@functools.lru_cache(maxsize=64)
def _rows(sizes: tuple[int, ...]) -> GroupLayout:
    starts = _starts(sizes)
    members = tuple(tuple(range(a, b)) for a, b in zip(starts, starts[1:]))
    return GroupLayout("rows", members, axis=0, extent=starts[-1], sizes=sizes)


@functools.lru_cache(maxsize=64)
def _pairs(sizes: tuple[int, ...]) -> GroupLayout:
    starts = _starts(sizes)
    n = starts[-1]
    members = tuple((*range(a, b), *range(n + a, n + b)) for a, b in zip(starts, starts[1:]))
    return GroupLayout("pairs", members, axis=0, extent=2 * n, sizes=sizes)


@functools.lru_cache(maxsize=64)
def _tokens(bounds: tuple[int, ...], sizes: tuple[int, ...]) -> GroupLayout:
    first = _starts(sizes)  # sequence numbers where the groups start
    members = tuple(tuple(range(bounds[a], bounds[b])) for a, b in zip(first, first[1:]))
    return GroupLayout("tokens", members, axis=1, extent=bounds[-1], sizes=sizes)


class Positions:
    """A layout's index tensors on one device, and the three moves every rule is made of.

    Group-major slots: slot j·r + s holds position `members[j][s]` (s < n_j), or a copy of the group's first
    position (padding, s >= n_j). `gather` maps slots to positions, `slot` positions to slots, `group` positions
    to group ids, `real` marks the slots that are not padding. None stands for "the identity" (no copy needed).
    """

    def __init__(self, layout: GroupLayout, device: torch.device):
        self.layout, self.k, self.axis, self.extent = layout, layout.k, layout.axis, layout.extent
        self.r = r = max(len(m) for m in layout.members)
        gather = [m[s] if s < len(m) else m[0] for m in layout.members for s in range(r)]
        real = [s < len(m) for m in layout.members for s in range(r)]
        slot, group = [0] * self.extent, [0] * self.extent
        for j, m in enumerate(layout.members):
            for s, position in enumerate(m):
                slot[position], group[position] = j * r + s, j
        identity = gather == list(range(self.k * r))  # equal contiguous groups: [extent] is [k, r] as it is
        prefix = slot == list(range(self.extent))  # only the last group is short: positions are slots already
        self.gather = None if identity else _to_device(torch.tensor(gather), device)
        self.real = None if all(real) else _to_device(torch.tensor(real), device)
        self.slot = None if prefix else _to_device(torch.tensor(slot), device)
        self.group = _to_device(torch.tensor(group), device)
        self.buckets, self.unbucket = _buckets(layout, device) if self.real is not None else (None, None)

    # -- shapes ----------------------------------------------------------------------------------
    def carries_batch(self, x: torch.Tensor) -> bool:
        """True when x's leading dims are the batch's: [extent, ...] (rows), [1, extent, ...] (tokens)."""
        if self.axis == 0:
            return x.dim() >= 1 and x.shape[0] == self.extent
        return x.dim() >= 2 and x.shape[0] == 1 and x.shape[1] == self.extent

    def broadcasts(self, x: torch.Tensor) -> bool:
        """True for [1, ...] where rows [extent, ...] are expected: a tensor broadcast over the batch (position ids
        [1, T] of BERT and GPT-2)."""
        return self.axis == 0 and self.extent > 1 and x.dim() >= 1 and x.shape[0] == 1

    def check(self, x: torch.Tensor, where: str) -> None:
        if not self.carries_batch(x):
            want = f"[{self.extent}, ...]" if self.axis == 0 else f"[1, {self.extent}, ...]"
            raise NotVectorizable(
                f"{where} got an input of shape {list(x.shape)}, whose leading dims are not the batch's ({want} for "
                f"{self.layout}): the layer sees the batch reshaped, so its positions cannot be assigned to groups."
            )

    # -- the moves -------------------------------------------------------------------------------
    def grouped(self, x: torch.Tensor, zero_pad: bool = False) -> torch.Tensor:
        """[extent, *rest] (or [1, extent, *rest]) -> [k, r, *rest], group-major; padding slots repeat a real position
        of their group, or are zero with `zero_pad` (for output gradients: padding must add nothing)."""
        if self.axis == 1:
            x = x[0]
        if self.gather is None:
            return x.unflatten(0, (self.k, self.r))  # a view
        y = x.index_select(0, self.gather).unflatten(0, (self.k, self.r))
        if zero_pad and self.real is not None:
            y = y * self.real.view(self.k, self.r, *[1] * (y.dim() - 2)).to(y.dtype)
        return y

    def ungrouped(self, y: torch.Tensor) -> torch.Tensor:
        """[k, r, *rest] -> [extent, *rest] (or [1, extent, *rest]): each position's value back in its place; the
        padding slots are dropped (so they get a zero gradient)."""
        flat = y.flatten(0, 1)
        if self.slot is not None:
            flat = flat.index_select(0, self.slot)
        elif flat.shape[0] != self.extent:
            flat = flat[: self.extent]
        return flat.unsqueeze(0) if self.axis == 1 else flat

    def group_ids(self, ndim: int) -> torch.Tensor:
        """The group id of every position, shaped to broadcast against a tensor with `ndim` dims led by the batch."""
        if self.axis == 1:
            return self.group.view(1, self.extent, *[1] * (ndim - 2))
        return self.group.view(self.extent, *[1] * (ndim - 1))

    def group_sum(self, t: torch.Tensor, feature_ndim: int) -> torch.Tensor:
        """[batch dims, *mid, *features] -> [k, *features]: the sum over each group's positions."""
        g = self.grouped(t, zero_pad=True)
        mid = tuple(range(1, g.dim() - feature_ndim))
        return g.sum(mid) if mid else g

    # -- buckets of equal groups (uneven layouts only) -----------------------------------------------
    def bucketed(self, x: torch.Tensor) -> list[torch.Tensor]:
        """[extent, *rest] (or [1, extent, *rest]) -> one [n_b, s_b, *rest] per bucket: the positions of the bucket's
        groups, group-major, without padding."""
        if self.axis == 1:
            x = x[0]
        return [_take(x, b.positions).unflatten(0, (b.n, b.size)) for b in self.buckets]

    def unbucketed(self, ys: Sequence[torch.Tensor]) -> torch.Tensor:
        """The inverse of `bucketed`: one [n_b, s_b, *rest] per bucket -> [extent, *rest] (or [1, extent, *rest])."""
        flat = torch.cat([y.flatten(0, 1) for y in ys])  # the buckets' positions, one after another
        if self.unbucket is not None:
            flat = flat.index_select(0, self.unbucket)
        return flat.unsqueeze(0) if self.axis == 1 else flat


@dataclass(frozen=True)
class Bucket:
    """The groups of an uneven layout that have one same size: the fallback runs them together, unpadded.

    `groups` picks their rows of a [k, ...] tensor (a perturbation, a probe) and `positions` their positions along
    the batch axis, group after group; each is a slice where the indices are consecutive (a view, no copy), else
    an index tensor on the device."""

    n: int  # groups in the bucket
    size: int  # positions in each of them
    groups: slice | torch.Tensor
    positions: slice | torch.Tensor


def _take(x: torch.Tensor, index: slice | torch.Tensor) -> torch.Tensor:
    """x's rows at `index` (dim 0): a view for a slice, a copy for an index tensor (no host sync either way)."""
    return x[index] if isinstance(index, slice) else x.index_select(0, index)


def _index(values: list[int], device: torch.device) -> slice | torch.Tensor:
    """A slice when `values` are consecutive, else an index tensor on `device`."""
    if values == list(range(values[0], values[0] + len(values))):
        return slice(values[0], values[0] + len(values))
    return _to_device(torch.tensor(values), device)


def _buckets(layout: GroupLayout, device: torch.device) -> tuple[tuple[Bucket, ...], torch.Tensor | None]:
    """The layout's buckets (groups by size, in the order of each size's first group), and the permutation that
    takes their concatenated positions back to batch order (None when they are in batch order already: contiguous
    rows whose groups of one size come together, as when only the last group is short)."""
    by_size: dict[int, list[int]] = {}
    for j, m in enumerate(layout.members):
        by_size.setdefault(len(m), []).append(j)
    buckets, order = [], []
    for size, groups in by_size.items():
        positions = [q for j in groups for q in layout.members[j]]
        order += positions
        buckets.append(Bucket(len(groups), size, _index(groups, device), _index(positions, device)))
    inverse = [0] * len(order)
    for row, q in enumerate(order):
        inverse[q] = row
    unbucket = None if order == list(range(len(order))) else _to_device(torch.tensor(inverse), device)
    return tuple(buckets), unbucket


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cpu":
        return t
    if device.type == "cuda":
        t = t.pin_memory()  # from pinned memory the copy is asynchronous: no wait for the device
    return t.to(device, non_blocking=True)


# ---------------------------------------------------------------------------------------------
# The rules, one per layer type
# ---------------------------------------------------------------------------------------------


ForwardAt = Callable[[nn.Module, torch.Tensor, Mapping[str, torch.Tensor], Positions], "torch.Tensor | None"]


@dataclass(frozen=True)
class Rule:
    """How one layer type takes part, for layers affine in their parameters (f(x; w + e) = f(x; w) + Δ(x; e)).

    `params`: the direct parameters the rule knows. `group_grad(module, x, delta, pos, wanted)`: from the layer's
    input x and output gradient delta, {name: [k, *param.shape]} for the names in `wanted`. `delta(module, x, out,
    e, pos)`: the extra output Δ (shaped like the layer's output `out`, in its dtype), e = {name: [k, *param.shape]}
    for the trainable parameters. `refuse(module)`: a reason this instance cannot be handled, or None.
    `forward_at(module, x, e, pos)`, optional: the whole output at w + e_j, in place of the layer's forward plus Δ
    (for layers where Δ costs as much as the layer itself); it may return None to take the Δ path after all.
    """

    params: tuple[str, ...]
    group_grad: Callable[[nn.Module, torch.Tensor, torch.Tensor, Positions, Collection[str]], dict[str, torch.Tensor]]
    delta: Callable[[nn.Module, torch.Tensor, torch.Tensor, Mapping[str, torch.Tensor], Positions], torch.Tensor]
    refuse: Callable[[nn.Module], str | None] | None = None
    forward_at: ForwardAt | None = None


RULES: dict[type, Rule] = {}


def register_rule(layer_type: type, rule: Rule) -> None:
    """Use `rule` for modules of exactly `layer_type` (subclasses that override `forward` take the fallback)."""
    RULES[layer_type] = rule


def _matmul_group_grad(x: torch.Tensor, delta: torch.Tensor, pos: Positions, transposed: bool) -> torch.Tensor:
    """Σ_{i∈B_j} δ_i x_iᵀ for every j ([k, out, in]), or its transpose ([k, in, out], GPT-2's Conv1D)."""
    a = pos.grouped(x.to(delta.dtype)).flatten(1, -2)  # [k, m, in], m = r · (positions per row)
    d = pos.grouped(delta, zero_pad=True).flatten(1, -2)  # [k, m, out]; padding slots are zero
    return torch.bmm(a.transpose(1, 2), d) if transposed else torch.bmm(d.transpose(1, 2), a)


def _matmul_delta(x: torch.Tensor, out: torch.Tensor, e_w, e_b, pos: Positions, transposed: bool) -> torch.Tensor:
    """Δ_i = e_W,j x_i + e_b,j for position i of group j (e_W stored [k, in, out] when `transposed`)."""
    xg = pos.grouped(x.to(out.dtype))  # [k, r, *mid, in]
    a = xg.flatten(1, -2)  # [k, m, in]
    d = a.new_zeros(()).expand(*a.shape[:2], out.shape[-1])
    if e_w is not None:
        e_w = e_w.to(out.dtype)
        d = torch.bmm(a, e_w if transposed else e_w.transpose(1, 2))  # [k, m, out]
    if e_b is not None:
        d = d + e_b.to(out.dtype).unsqueeze(1)
    return pos.ungrouped(d.reshape(*xg.shape[:-1], out.shape[-1]))


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul with input x runs in: autocast's, for the inputs autocast casts (not float64)."""
    device = x.device.type
    if x.is_floating_point() and x.dtype != torch.float64 and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


def _perturbed_weight(w: torch.Tensor, e: torch.Tensor, transposed: bool, dtype: torch.dtype) -> torch.Tensor:
    """W + e_j for every j, as [k, in, out] (the right operand of x_j @ ·), in the compute dtype."""
    w_e = (w + e).to(dtype)
    return w_e if transposed else w_e.transpose(1, 2)


class _PerturbedMatmul(torch.autograd.Function):
    """y_j = x_j (W + e_j)ᵀ for all groups j in one bmm; x: [k, m, in], W: [out, in] ([in, out] when `transposed`).

    Autograd would keep the k perturbed copies W + e_j alive until the backward; this keeps W and e and adds them
    again there. The gradient for W is Σ_j y_jᵀ-gradient · x_j over all groups: one matmul, as for a plain layer.
    """

    @staticmethod
    def forward(ctx, x, w, e, transposed, dtype):
        ctx.save_for_backward(x, w, e)
        ctx.transposed, ctx.dtype = transposed, dtype
        return torch.bmm(x, _perturbed_weight(w, e, transposed, dtype))

    @staticmethod
    def backward(ctx, dy):
        x, w, e = ctx.saved_tensors
        dx = dw = de = None
        if ctx.needs_input_grad[0]:
            dx = torch.bmm(dy, _perturbed_weight(w, e, ctx.transposed, ctx.dtype).transpose(1, 2))
        if _engine_uses(ctx, 1):  # not in a capture, whose autograd.grad asks for the groups' parts only
            dy_flat, x_flat = dy.flatten(0, 1), x.flatten(0, 1)  # padding slots have dy = 0: they add nothing
            dw = (x_flat.t().mm(dy_flat) if ctx.transposed else dy_flat.t().mm(x_flat)).to(w.dtype)
        if _engine_uses(ctx, 2):  # e requiring grad: its gradient is each group's own
            de = (torch.bmm(x.transpose(1, 2), dy) if ctx.transposed else torch.bmm(dy.transpose(1, 2), x)).to(e.dtype)
        return dx, dw, de, None, None


def _engine_uses(ctx, i: int) -> bool:
    """Whether the backward now running will use the gradient of input i of this Function (autograd.grad with
    `inputs` skips the rest of the graph; `needs_input_grad` only says the input requires grad). Where torch cannot
    say, it is computed."""
    if not ctx.needs_input_grad[i]:
        return False
    try:
        node = ctx.next_functions[i][0]
        return node is None or torch._C._will_engine_execute_node(node)
    except (AttributeError, RuntimeError):
        return True


def _perturbed_matmul(x, w, b, e_w, e_b, pos: Positions, transposed: bool) -> torch.Tensor:
    """The output at w + e_j of a Linear (or Conv1D): (W + e_j) x_i + b + e_b,j for position i of group j, at the cost
    of the plain layer (Δ = e_j x_i alone would cost as much as the layer again, forward and backward)."""
    dtype = _compute_dtype(x)
    xg = pos.grouped(x).to(dtype)  # [k, r, *mid, in]; padding repeats a real position, its output is dropped
    y = _PerturbedMatmul.apply(xg.flatten(1, -2), w, e_w, transposed, dtype)  # [k, m, out]
    if b is not None:
        bias = b if e_b is None else b + e_b  # [out], or [k, out]
        y = y + bias.to(dtype).unsqueeze(-2)
    return pos.ungrouped(y.reshape(*xg.shape[:-1], y.shape[-1]))


def _linear_forward_at(module, x, e, pos):
    if "weight" not in e:
        return None  # only the bias moves: Δ = e_b,j is cheap
    return _perturbed_matmul(x, module.weight, module.bias, e["weight"], e.get("bias"), pos, transposed=False)


def _conv1d_forward_at(module, x, e, pos):
    if "weight" not in e:
        return None
    return _perturbed_matmul(x, module.weight, module.bias, e["weight"], e.get("bias"), pos, transposed=True)


def _linear_group_grad(module, x, delta, pos, wanted):
    out = {}
    if "weight" in wanted:
        out["weight"] = _matmul_group_grad(x, delta, pos, transposed=False)
    if "bias" in wanted:
        out["bias"] = pos.group_sum(delta, 1)
    return out


def _linear_delta(module, x, out, e, pos):
    return _matmul_delta(x, out, e.get("weight"), e.get("bias"), pos, transposed=False)


def _conv1d_group_grad(module, x, delta, pos, wanted):
    out = {}
    if "weight" in wanted:  # GPT-2's Conv1D keeps its weight as [in, out]
        out["weight"] = _matmul_group_grad(x, delta, pos, transposed=True)
    if "bias" in wanted:
        out["bias"] = pos.group_sum(delta, 1)
    return out


def _conv1d_delta(module, x, out, e, pos):
    return _matmul_delta(x, out, e.get("weight"), e.get("bias"), pos, transposed=True)


def _embedding_refuse(module: nn.Embedding) -> str | None:
    if module.max_norm is not None:
        return "max_norm renormalizes the weight in place during the forward"
    if module.scale_grad_by_freq:
        return "scale_grad_by_freq scales by token counts over the whole batch, not per group"
    return None


def _embedding_group_grad(module, ids, delta, pos, wanted):
    vocab, dim = module.num_embeddings, delta.shape[-1]
    rows = (ids + pos.group_ids(ids.dim()) * vocab).reshape(-1)  # row id_i of group j is row j·V + id_i of [k·V, d]
    d = delta.reshape(-1, dim)
    if module.padding_idx is not None:  # the padding row gets no gradient
        d = d * (ids != module.padding_idx).reshape(-1, 1).to(d.dtype)
    g = d.new_zeros(pos.k * vocab, dim).index_add_(0, rows, d)
    return {"weight": g.view(pos.k, vocab, dim)}


def _embedding_delta(module, ids, out, e, pos):
    vocab = module.num_embeddings
    rows = ids + pos.group_ids(ids.dim()) * vocab
    # The forward reads row padding_idx like any other, so w + e_j reads e_j's row there too.
    return F.embedding(rows, e["weight"].to(out.dtype).flatten(0, 1))


def _normalized(module, x, dtype):
    """x̂, the norm's output without its affine parameters, in `dtype`."""
    if isinstance(module, nn.LayerNorm):
        return F.layer_norm(x.to(dtype), module.normalized_shape, None, None, module.eps)
    return F.rms_norm(x.to(dtype), module.normalized_shape, None, module.eps)


def _norm_group_grad(module, x, delta, pos, wanted):
    n = len(module.normalized_shape)
    out = {}
    if "weight" in wanted:
        out["weight"] = pos.group_sum(delta * _normalized(module, x, delta.dtype), n)
    if "bias" in wanted:
        out["bias"] = pos.group_sum(delta, n)
    return out


def _norm_delta(module, x, out, e, pos):
    g = pos.group_ids(x.dim() - len(module.normalized_shape))  # e[g]: each position's e_j, over the normalized dims
    d = 0
    if "weight" in e:
        d = _normalized(module, x, out.dtype) * e["weight"].to(out.dtype)[g]
    if "bias" in e:
        d = d + e["bias"].to(out.dtype)[g]
    return d


def _llama_rms_normalized(module, x: torch.Tensor, dtype: torch.dtype, norm_dtype: torch.dtype | None) -> torch.Tensor:
    """x̂ bitwise as transformers' Llama-style RMSNorm forms it (the same ops in the same order, so the same
    roundings): normalized in `norm_dtype` (float32 in transformers; None: x's own), cast back to x's dtype; then
    in `dtype`, the dtype of the module's product `self.weight * x̂` (the promotion of the weight's and x's dtypes:
    autocast leaves `*`, `pow`, `mean` and `rsqrt` alone, and they run in float32 either way)."""
    h = x if norm_dtype is None else x.to(norm_dtype)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + module.variance_epsilon)
    return h.to(x.dtype).to(dtype)


def _llama_rms_group_grad(module, x, delta, pos, wanted, norm_dtype=torch.float32):
    # autograd's gradient of `weight * x̂` for the weight: δ ⊙ x̂ in the product's dtype (δ's), summed over positions
    return {"weight": pos.group_sum(delta * _llama_rms_normalized(module, x, delta.dtype, norm_dtype), 1)}


def _llama_rms_delta(module, x, out, e, pos, norm_dtype=torch.float32):
    g = pos.group_ids(x.dim() - 1)  # e[g]: each position's e_j, over the last dim
    return _llama_rms_normalized(module, x, out.dtype, norm_dtype) * e["weight"].to(out.dtype)[g]


def _llama_rms_forward_at(module, x, e, pos, norm_dtype=torch.float32):
    """The output at w + e_j as one product (w + e_j) ⊙ x̂, as the module computes it with w + e_j written into its
    weight (in the weight's dtype). The output gradient then reaches x̂, and through the module's float32 round trip
    x, as one product δ ⊙ (w + e_j), rounded to float32 once, as in a pass at w + e_j; the module's output plus Δ
    would round δ ⊙ w and δ ⊙ e_j separately (in a float64 model that left the input gradients 1e-7 apart from
    such a pass). It also forms x̂ once instead of twice."""
    g = pos.group_ids(x.dim() - 1)
    weight = module.weight + e["weight"].to(module.weight.dtype)  # [k, d]
    return weight[g] * _llama_rms_normalized(module, x, x.dtype, norm_dtype)


def llama_rms_norm_rule(norm_dtype: torch.dtype | None = torch.float32) -> Rule:
    """The rule for y = weight ⊙ (x̂ in x's dtype), x̂ = x · rsqrt(mean(x²) + variance_epsilon) computed in
    `norm_dtype` (None: x's dtype). transformers' Llama-style norms normalize in float32; the other value is for a
    forward without the float32 round trip (the float64 tests patch one in). The perturbed pass runs `forward_at`;
    `delta` (the module's output plus Δ, which `Rule` requires) is there for a caller that drops it."""
    return Rule(
        ("weight",),
        functools.partial(_llama_rms_group_grad, norm_dtype=norm_dtype),
        functools.partial(_llama_rms_delta, norm_dtype=norm_dtype),
        forward_at=functools.partial(_llama_rms_forward_at, norm_dtype=norm_dtype),
    )


RULES.update(
    {
        nn.Linear: Rule(("weight", "bias"), _linear_group_grad, _linear_delta, forward_at=_linear_forward_at),
        nn.Embedding: Rule(("weight",), _embedding_group_grad, _embedding_delta, _embedding_refuse),
        nn.LayerNorm: Rule(("weight", "bias"), _norm_group_grad, _norm_delta),
        nn.RMSNorm: Rule(("weight",), _norm_group_grad, _norm_delta),
    }
)
try:
    from transformers.pytorch_utils import Conv1D
except ImportError:  # transformers is a dependency, but the rules do not need it
    pass
else:
    RULES[Conv1D] = Rule(("weight", "bias"), _conv1d_group_grad, _conv1d_delta, forward_at=_conv1d_forward_at)


# Rules chosen by what a module's forward is rather than by its type: (predicate on the module, rule), tried in order
# for modules whose type has no rule in RULES.
FORWARD_RULES: list[tuple[Callable[[nn.Module], bool], Rule]] = []


def register_forward_rule(matches: Callable[[nn.Module], bool], rule: Rule) -> None:
    """Use `rule` for modules that `matches` accepts (and whose type, through its MRO, is not in RULES). The
    predicate must accept only modules whose forward is known to compute what the rule assumes."""
    FORWARD_RULES.append((matches, rule))


def _code_key(function) -> tuple | None:
    """What makes two plain functions compute the same, given the same globals: bytecode, constants, names. None for
    anything else (a wrapped or compiled forward, a closure)."""
    code = getattr(function, "__code__", None)
    if code is None or getattr(function, "__closure__", None) is not None:
        return None
    return code.co_code, code.co_consts, code.co_names, code.co_varnames, code.co_argcount, code.co_kwonlyargcount


_LLAMA_RMS_FORWARD: list[tuple] = []  # the reference's code key, once read


def _llama_rms_forward_key() -> tuple | None:
    """The code of transformers' LlamaRMSNorm.forward, as transformers ships it; None without transformers.

    Read on first use, and only from the function defined in modeling_llama.py itself: a forward patched onto the
    class by a test or a library (defined elsewhere) is not taken as the reference, and is not remembered either,
    so the reference is read again once the patch is gone."""
    if _LLAMA_RMS_FORWARD:
        return _LLAMA_RMS_FORWARD[0]
    try:
        from transformers.models.llama.modeling_llama import LlamaRMSNorm
    except ImportError:
        return None
    forward = LlamaRMSNorm.__dict__.get("forward")
    code = getattr(forward, "__code__", None)
    if code is None or not code.co_filename.endswith("modeling_llama.py") or code.co_qualname != "LlamaRMSNorm.forward":
        return None
    key = _code_key(forward)
    if key is not None:
        _LLAMA_RMS_FORWARD.append(key)
    return key


def _computes_like_llama_rms_norm(module: nn.Module) -> bool:
    """True for a module whose forward is, bytecode for bytecode, transformers' LlamaRMSNorm.forward (h = x in
    float32; h · rsqrt(mean(h²) + variance_epsilon); weight · h in x's dtype), with `torch` resolving to torch, a
    vector `weight` and a number `variance_epsilon`.

    Matched by code, not by name: transformers generates Qwen2RMSNorm, MistralRMSNorm, Qwen3RMSNorm and many more
    from Llama's code ("Copied from" / modular), so their forwards are the same bytecode in another file, while a
    class that computes something else (Gemma's (1 + weight), a forward patched onto the class, or overridden in a
    subclass, or set on the instance by someone) is not matched and takes the torch.func fallback. A hub kernel that
transformers' `kernelize` set on the instance for training is taken to compute the same (see
`hf_msam.integrations.hub_kernels`): the rule applies, and the capture's forward runs the kernel.
    The constants, names and variable names are compared along with the bytecode, so `keepdim`, the -1 dim and the
    attribute names are the same too."""
    forward = getattr(type(module), "forward", None)
    reference = _llama_rms_forward_key()
    if reference is None or _code_key(forward) != reference or forward.__globals__.get("torch") is not torch:
        return False
    if "forward" in module.__dict__ and not (hub_kernel_forward(module) and module.training):
        return False  # the instance computes with another forward (a hub kernel for this layer computes the same)
    weight, eps = getattr(module, "weight", None), getattr(module, "variance_epsilon", None)
    # A weight of another shape would broadcast differently from what the rule's sums over the last dim assume.
    return isinstance(weight, nn.Parameter) and weight.dim() == 1 and isinstance(eps, (int, float))


def _rule_for(module: nn.Module) -> Rule | None:
    """The rule for this module: from RULES if it is exactly of a known type (a subclass might compute something
    else), else the first of FORWARD_RULES whose predicate accepts it."""
    for cls in type(module).__mro__:
        rule = RULES.get(cls)
        if rule is not None:
            return rule if type(module).forward is cls.forward else None
    for matches, rule in FORWARD_RULES:
        if matches(module):
            return rule
    return None


register_forward_rule(_computes_like_llama_rms_norm, llama_rms_norm_rule())


# ---------------------------------------------------------------------------------------------
# The model's layers, and what each one does while a context is active
# ---------------------------------------------------------------------------------------------


@dataclass(eq=False)
class _Unit:
    """A module that takes part: through its rule, or (rule None) through the torch.func fallback."""

    name: str
    module: nn.Module
    rule: Rule | None
    wanted: dict[str, int]  # parameter name, relative to the module -> index in Vectorizer.params
    routed: dict = field(default_factory=dict)  # the routed forwards, kept across passes (see `_routed`)

    @property
    def where(self) -> str:
        return f"{self.name or '<model>'} ({type(self.module).__name__})"


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


def _recomputing() -> bool:
    """True while autograd runs a backward node: a forward called now is activation checkpointing's recomputation
    of a region (its saved tensors), not a new pass, so it records nothing."""
    return torch._C._current_autograd_node() is not None


def _in_checkpoint() -> bool:
    """True inside torch.utils.checkpoint's non-reentrant region (its saved-tensor hooks are on top of the stack) or
    in its recomputation. Reads a private torch function; where it is missing, False."""
    if _recomputing():
        return True
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    try:
        hooks = top(True) if top is not None else None
    except TypeError:
        return False
    pack = hooks[0] if hooks else None
    return pack is not None and "_checkpoint_hook" in getattr(pack, "__qualname__", "")


def _no_autocast(device_type: str):
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


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
        # What the routed forwards read, set by the contexts:
        self._layout: GroupLayout | None = None
        self._e: list[torch.Tensor] | None = None
        self._capture: Capture | None = None
        self._suspended = 0  # > 0 inside a fallback's functional call: its subtree is its business
        self._undo: list[tuple[_Unit, Callable, Callable[[], bool]]] = []  # (unit, its routed forward, the undo)

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
        for name, module in self.model.named_modules():
            problem = _module_problem(module)
            if problem:
                problems.append(f"{name or '<model>'} ({type(module).__name__}): {problem}")
        return "; ".join(problems) if problems else None

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
        first = not self._undo
        try:
            if first:
                self._install()
            yield
            if first:
                self.check_routing()  # what ran unrouted computed no group's part: never a silent wrong answer
        finally:
            if first:
                self._uninstall()
            self._layout, self._e, self._capture = saved

    def _install(self) -> None:
        hub_kernels.settle(self.model)  # a kernelization the pass's model.train() would run: now, before routing
        for unit in self._units:
            routed = _routed(unit, self._rule_forward if unit.rule is not None else self._fallback_forward,
                             unit.module.__dict__.get("forward"))
            self._undo.append((unit, routed, set_on_instance(unit.module, "forward", routed)))

    def _uninstall(self) -> None:
        """Every unit's forward back as it was found, or as someone who replaced ours in between left it. Never
        raises (it runs in `finally`); a routed forward left inside someone else's wrapper calls through."""
        while self._undo:
            self._undo.pop()[2]()

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
        x = args[0] if args else next(iter(kwargs.values()))
        pos = self._layout.positions(x.device)
        broadcast = pos.broadcasts(x)
        if broadcast:  # [1, ...] broadcast over the batch (position ids): every row uses it, one copy per row (views)
            x = x.expand(pos.extent, *x.shape[1:])
        pos.check(x, unit.where)
        capture = self._capture if torch.is_grad_enabled() else None
        e = None if self._e is None else {name: self._e[i] for name, i in unit.wanted.items()}
        # Inside activation checkpointing, the capture does not keep x and the output's edge (that would keep the
        # activations checkpointing frees): the layer runs at w + z_j, z a zero [k, ...] tensor autograd
        # differentiates, as the fallback does, and ∂L/∂z_j is group j's gradient. The recomputation in the backward
        # takes the same path (same saved tensors) and records nothing.
        probed = capture is not None and _in_checkpoint()
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
        if capture is not None and out.requires_grad and not _recomputing():
            if probed:
                capture._probes.extend((i, z[name]) for name, i in unit.wanted.items())
                capture._regions.append(([out.grad_fn], {x.grad_fn}))
            else:
                capture._record(unit, x, out)
        return out

    # -- a layer without one: torch.func ----------------------------------------------------------
    def _fallback_forward(self, unit: _Unit, inner: Callable, *args, **kwargs):
        capture = self._capture if torch.is_grad_enabled() else None
        if self._suspended or self._layout is None or (self._e is None and capture is None):
            return inner(*args, **kwargs)
        recomputing = _recomputing()  # activation checkpointing's recomputation: the same computation, no records
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

    def __init__(self, vectorizer: Vectorizer, layout: GroupLayout):
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
            g = g.to(params[i].dtype)
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
                        bad.append(f"parameter {index[id(variable)]} {list(variable.shape)} (read by {node.name()})")
                    elif child in inside and child not in roots:
                        bad.append(f"an intermediate result of a layer (read by {node.name()})")
                stack.append(child)
        if bad:
            found = "; ".join(sorted(set(bad))[:5])
            raise NotVectorizable(f"the loss uses parameters outside the layer calls the vectorized path sees: {found}")
