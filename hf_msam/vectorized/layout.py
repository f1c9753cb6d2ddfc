"""Which positions of a batch form micro-batch j (a `GroupLayout`), and where they are on a device (`Positions`):
group-major views [k, r, ...] of a layer's input and output, padding, per-group sums, and buckets of equal-size groups
for the fallback."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["Bucket", "GroupLayout", "NotVectorizable", "Positions"]


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
        found = self._positions.get(device)  # a torch.device, as layers pass x.device: found without converting
        if found is None:
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

    def check(self, x: torch.Tensor, where: str | object) -> None:
        """Raise NotVectorizable unless x carries the batch; `where` names the layer (an object with a `where`
        property, such as a unit, is read only when the check fails)."""
        if not self.carries_batch(x):
            want = f"[{self.extent}, ...]" if self.axis == 0 else f"[1, {self.extent}, ...]"
            where = where if isinstance(where, str) else where.where
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
            return x.view(self.k, self.r, *x.shape[1:])  # splitting dim 0: always a view
        y = x.index_select(0, self.gather).view(self.k, self.r, *x.shape[1:])
        if zero_pad and self.real is not None:
            y = y * self.real.view(self.k, self.r, *[1] * (y.dim() - 2)).to(y.dtype)
        return y

    def as_groups(self, x: torch.Tensor, zero_pad: bool = False) -> torch.Tensor:
        """[extent, *mid, f] (or [1, extent, *mid, f]) -> [k, m, f], m = r · prod(mid): `grouped` with the positions
        of each group in one dim, as the grouped matmuls take them (one view where the groups are the batch's rows
        as they are, which have no padding)."""
        if self.gather is None and self.axis == 0 and x.is_contiguous():
            return x.view(self.k, -1, x.shape[-1])
        return self.grouped(x, zero_pad).flatten(1, -2)

    def from_groups(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The inverse of `as_groups` for an output y [k, m, f'] of an input x: [extent, *mid, f'] (or [1, ...])."""
        if self.gather is None and self.axis == 0:  # rows in order: no padding, positions are slots
            return y.reshape(*x.shape[:-1], y.shape[-1])
        mid = x.shape[1:-1] if self.axis == 0 else x.shape[2:-1]
        return self.ungrouped(y.reshape(self.k, self.r, *mid, y.shape[-1]))

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
