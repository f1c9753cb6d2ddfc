"""The torch.func fallback with groups of different sizes, for modules that mix the positions of their input.

A module the fallback runs (no grouped rule) may compute across the positions of a call: a mean over the rows,
attention across the rows or across the tokens of a packed row. The sequential step calls it on one micro-batch at
a time, so positions mix within their micro-batch only; the vectorized step must do the same when the micro-batches
have different sizes (no padding copies may enter the mix).

Every expectation here comes from a plain-PyTorch loop over the groups, independent of hf_msam.vectorized: each
group's positions as a batch of their own, `torch.autograd.grad` of the group's mean loss, on a deep copy holding
w + e_j for the perturbed pass. float64, to 1e-12 relative.
"""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from reference import host_syncs
from torch import nn

from hf_msam import MicroBatchSAM
from hf_msam.vectorized import GroupLayout, Vectorizer

RTOL = 1e-12
D_IN, D, CLASSES = 5, 6, 3


# ---------------------------------------------------------------------------------------------
# Modules that mix positions (no grouped rule: the fallback runs them), in models of nn.Linear layers
# ---------------------------------------------------------------------------------------------


class Centered(nn.Module):
    """y = (x - mean of x over `axis`) ⊙ w + b: a mean over the positions of the call (rows: axis 0; tokens of a
    packed row: axis 1)."""

    def __init__(self, axis: int):
        super().__init__()
        self.axis = axis
        self.w = nn.Parameter(1.0 + 0.3 * torch.randn(D))
        self.b = nn.Parameter(0.1 * torch.randn(D))

    def forward(self, x):
        return (x - x.mean(self.axis, keepdim=True)) * self.w + self.b


class Attention(nn.Module):
    """Softmax attention across the positions of the call along `axis`, with a learned sink logit s (a key whose
    value is zero): position i takes Σ_m a_im x_m, a_i = softmax over (x_i Q x_mᵀ/√d for every m, s). The sink
    makes the weights depend on how many positions there are, even identical ones."""

    def __init__(self, axis: int):
        super().__init__()
        self.axis = axis
        self.q = nn.Parameter(torch.randn(D, D) / math.sqrt(D))
        self.sink = nn.Parameter(torch.tensor(0.5))

    def forward(self, x):
        h = x.movedim(self.axis, -2)  # [..., positions, D]
        scores = h @ self.q @ h.transpose(-1, -2) / math.sqrt(D)
        sink = self.sink.expand(*scores.shape[:-1], 1)
        weights = torch.softmax(torch.cat([scores, sink], -1), -1)[..., :-1]
        return (h + weights @ h).movedim(-2, self.axis)


MIXERS = {"centered": Centered, "attention": Attention}


class Model(nn.Module):
    """Linear -> mixer -> tanh -> Linear: the Linears take their rules, the mixer the fallback."""

    def __init__(self, mixer: str, axis: int, checkpointed: bool = False):
        super().__init__()
        self.inp, self.mix, self.out = nn.Linear(D_IN, D), MIXERS[mixer](axis), nn.Linear(D, CLASSES)
        self.checkpointed = checkpointed

    def forward(self, x):
        h = self.inp(x)
        if self.checkpointed:  # non-reentrant activation checkpointing: the backward runs the mixer again
            h = torch.utils.checkpoint.checkpoint(self.mix, h, use_reentrant=False)
        else:
            h = self.mix(h)
        return self.out(torch.tanh(h))


def model_for(mixer: str, axis: int = 0) -> Model:
    torch.manual_seed(0)
    return Model(mixer, axis).double()


# ---------------------------------------------------------------------------------------------
# The reference: one autograd pass per group, the group as a batch of its own
# ---------------------------------------------------------------------------------------------


def reference(model, groups, group_loss, e=None) -> list[torch.Tensor]:
    """Per parameter, [k, *p.shape]: group j's gradient of its mean loss, at w (e None) or at w + e_j."""
    per_group = []
    for j, batch in enumerate(groups):
        m = model
        if e is not None:
            m = copy.deepcopy(model)
            with torch.no_grad():
                for p, t in zip(m.parameters(), e):
                    p.add_(t[j])
        loss = group_loss(m, batch)
        per_group.append(torch.autograd.grad(loss, list(m.parameters()), materialize_grads=True))
    return [torch.stack(gs) for gs in zip(*per_group)]


def relative_errors(got: list[torch.Tensor], want: list[torch.Tensor]) -> list[float]:
    """Per parameter |got - want| / (|want| + 1e-3 |all of want|): the floor for gradients that are 0 but for roundoff
    (the first Linear's bias in front of `Centered`, which subtracts it out), which both sides only approximate."""
    whole = torch.cat([w.flatten() for w in want]).norm()
    return [((g - w).norm() / (w.norm() + 1e-3 * whole)).item() for g, w in zip(got, want)]


def check(model, batch, layout, groups, group_loss, whole_loss) -> None:
    """Per-group gradients (capture), the perturbed backward, and per-group gradients at w + e_j (both contexts), each
    against the reference; the worst relative error over the parameters must be at most RTOL."""
    params = list(model.parameters())
    vec = Vectorizer(model, params)
    assert vec.why_not() is None
    assert vec.fallback_modules() == [f"mix ({type(model.mix).__name__})"]
    g = torch.Generator().manual_seed(1)
    e = [0.05 * torch.randn((layout.k, *p.shape), generator=g, dtype=p.dtype) for p in params]
    want, want_e = reference(model, groups, group_loss), reference(model, groups, group_loss, e)

    with vec.capture(layout) as cap:
        loss = whole_loss(model, batch)
    cap.verify(loss)
    got = cap.group_gradients(loss)
    errors = relative_errors(got, want)
    assert max(errors) <= RTOL, f"per-group gradients: relative errors {errors}"

    with vec.perturbed(layout, e):
        whole_loss(model, batch).backward()
    errors = relative_errors([p.grad for p in params], [w.sum(0) for w in want_e])
    assert max(errors) <= RTOL, f"perturbed pass: relative errors {errors}"
    for p in params:
        p.grad = None

    with vec.perturbed(layout, e), vec.capture(layout) as cap:
        got = cap.group_gradients(whole_loss(model, batch))
    errors = relative_errors(got, want_e)
    assert max(errors) <= RTOL, f"per-group gradients at w + e_j: relative errors {errors}"


def inputs(n: int, *lead: int) -> torch.Tensor:
    return torch.randn(*lead, n, D_IN, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def summed_group_means(values: torch.Tensor, layout: GroupLayout) -> torch.Tensor:
    """Σ_j the mean of group j's values (values indexed by position)."""
    return sum(values[list(m)].mean() for m in layout.members)


# ---------------------------------------------------------------------------------------------
# The three layouts
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mixer", list(MIXERS))
@pytest.mark.parametrize("sizes", [(3, 3, 1), (2, 3, 2), (1, 4)], ids=lambda s: "-".join(map(str, s)))
def test_rows(mixer, sizes):
    """Rows [n, D_IN]; the mixer mixes the rows of its call."""
    model = model_for(mixer)
    layout = GroupLayout.rows(sizes)
    x = inputs(layout.extent)
    y = torch.arange(layout.extent) % CLASSES
    groups = [(x[list(m)], y[list(m)]) for m in layout.members]

    def group_loss(m, b):
        return F.cross_entropy(m(b[0]), b[1])

    def whole_loss(m, b):
        return summed_group_means(F.cross_entropy(m(b[0]), b[1], reduction="none"), layout)

    check(model, (x, y), layout, groups, group_loss, whole_loss)


@pytest.mark.parametrize("mixer", list(MIXERS))
@pytest.mark.parametrize("sizes", [(2, 1, 2), (1, 3)], ids=lambda s: "-".join(map(str, s)))
def test_pairs(mixer, sizes):
    """Preference pairs: rows 0..n-1 chosen, n..2n-1 rejected; group j holds its pairs' chosen and rejected rows,
    and the mixer mixes all of them (as in the sequential step, whose micro-batch is those rows)."""
    model = model_for(mixer)
    layout = GroupLayout.pairs(sizes)
    x = inputs(layout.extent)
    groups = [x[list(m)] for m in layout.members]  # chosen rows, then their rejected rows, as split_pairs cuts

    def pair_losses(m, rows):
        scores = m(rows)[:, 0]
        half = rows.shape[0] // 2
        return -F.logsigmoid(scores[:half] - scores[half:])

    def whole_loss(m, rows):
        losses = pair_losses(m, rows)
        return sum(losses[a : a + s].mean() for a, s in zip(itertools.accumulate(sizes, initial=0), sizes))

    check(model, x, layout, groups, lambda m, rows: pair_losses(m, rows).mean(), whole_loss)


@pytest.mark.parametrize("mixer", list(MIXERS))
@pytest.mark.parametrize("sizes", [(2, 1, 2), (1, 4), (2, 2, 1)], ids=lambda s: "-".join(map(str, s)))
def test_tokens_of_a_packed_row(mixer, sizes):
    """One packed row [1, T, D_IN] of sequences of lengths 4, 3, 5, 2, 4; group j is the token range of its sequences
    (token counts differ between groups), and the mixer mixes the tokens of its call (axis 1): the group's own
    tokens, as in the sequential step, whose micro-batch is the packed row of the group's sequences."""
    model = model_for(mixer, axis=1)
    lengths = [4, 3, 5, 2, 4]
    bounds = list(itertools.accumulate(lengths, initial=0))
    layout = GroupLayout.tokens(bounds, list(sizes))
    assert len({len(m) for m in layout.members}) > 1
    x = inputs(bounds[-1], 1)
    y = torch.arange(bounds[-1]) % CLASSES
    groups = [(x[:, m[0] : m[-1] + 1], y[m[0] : m[-1] + 1]) for m in layout.members]

    def group_loss(m, b):
        return F.cross_entropy(m(b[0])[0], b[1])

    def whole_loss(m, b):
        return summed_group_means(F.cross_entropy(m(b[0])[0], b[1], reduction="none"), layout)

    check(model, (x, y), layout, groups, group_loss, whole_loss)


def test_even_groups_take_one_vmap_and_uneven_ones_one_per_size(monkeypatch):
    """Even groups keep the single vmap over [k, r, ...]; uneven groups run one vmap per distinct size (a bucket),
    whose index tensors are built with the layout's positions, once per device (slices where consecutive)."""
    calls = []
    vmap = torch.func.vmap

    def counting_vmap(fn, *args, **kwargs):
        mapped = vmap(fn, *args, **kwargs)

        def run(ts, grouped):
            calls.append(tuple(tuple(g.shape[:2]) for g in grouped))
            return mapped(ts, grouped)

        return run

    model = model_for("attention")
    vec = Vectorizer(model, list(model.parameters()))
    x = inputs(7)
    monkeypatch.setattr(torch.func, "vmap", counting_vmap)
    for sizes in ([3, 4], [2, 3, 2], [7]):
        with vec.capture(GroupLayout.rows(sizes)):
            model(x)
    even = GroupLayout.rows([2, 2, 2])
    with vec.capture(even):
        model(x[:6])
    monkeypatch.undo()
    assert calls == [
        ((1, 3),), ((1, 4),),  # 3 + 4: two buckets of one group each
        ((2, 2),), ((1, 3),),  # 2 + 3 + 2: groups 0 and 2 together, then group 1
        ((1, 7),),  # one group
        ((3, 2),),  # even: [k, r]
    ]
    assert even.positions("cpu").buckets is None
    pos = GroupLayout.rows([2, 3, 2]).positions("cpu")
    assert [(b.n, b.size) for b in pos.buckets] == [(2, 2), (1, 3)]
    assert pos.buckets[1].groups == slice(1, 2) and pos.buckets[1].positions == slice(2, 5)
    assert pos.buckets[0].groups.tolist() == [0, 2] and pos.buckets[0].positions.tolist() == [0, 1, 5, 6]
    assert pos.unbucket.tolist() == [0, 1, 4, 5, 6, 2, 3]
    last_short = GroupLayout.rows([3, 3, 1]).positions("cpu")
    assert last_short.unbucket is None  # the buckets' positions are in batch order already: a plain cat
    assert all(isinstance(b.groups, slice) and isinstance(b.positions, slice) for b in last_short.buckets)


def test_no_host_sync_with_uneven_groups():
    """Pairs (2, 1, 2): buckets of non-consecutive groups, taken with index tensors; nothing waits for the device."""
    model = model_for("attention")
    params = list(model.parameters())
    vec = Vectorizer(model, params)
    layout = GroupLayout.pairs([2, 1, 2])
    layout.positions("cpu")  # built once per device, outside the hot path
    x = inputs(layout.extent)
    e = [0.01 * torch.randn(layout.k, *p.shape, dtype=p.dtype) for p in params]
    calls: list[str] = []
    with host_syncs(calls):
        with vec.capture(layout) as cap:
            loss = model(x).logsumexp(1).sum()
        cap.group_gradients(loss)
        with vec.perturbed(layout, e), vec.capture(layout) as cap:
            loss = model(x).logsumexp(1).sum()
            cap.group_gradients(loss, retain_graph=True)
            loss.backward()
    assert calls == []


# ---------------------------------------------------------------------------------------------
# End to end: the vectorized mSAM step against the sequential one
# ---------------------------------------------------------------------------------------------


class Classifier(nn.Module):
    def __init__(self, mixer: str, checkpointed: bool = False):
        super().__init__()
        self.net = Model(mixer, axis=0, checkpointed=checkpointed)

    def forward(self, x, labels):
        return {"loss": F.cross_entropy(self.net(x), labels)}


@pytest.mark.parametrize("n", [7, 6], ids=lambda n: f"batch{n}")
@pytest.mark.parametrize("checkpointed", [False, True], ids=["plain", "checkpointed"])
@pytest.mark.parametrize("mixer", list(MIXERS))
@pytest.mark.parametrize("method", [dict(rho=0.1), dict(rho=0.5, adaptive=True)], ids=["sam", "asam"])
def test_msam_step_with_uneven_micro_batches(mixer, method, checkpointed, n):
    """Batch 7, micro-batch size 3 (micro-batches 3, 3, 1; batch 6 for the even case): `vectorize="on"` leaves the
    `.grad` of `vectorize="off"` (one pass per micro-batch, the weights written), to 1e-12 relative; also with the
    mixer inside torch.utils.checkpoint (non-reentrant), whose recomputation in the backward runs the fallback again
    and stops early by raising through it."""
    torch.manual_seed(0)
    on = Classifier(mixer, checkpointed).double()
    off = copy.deepcopy(on)
    batch = {"x": inputs(n), "labels": torch.arange(n) % CLASSES}
    grads = {}
    for vectorize, model in (("on", on), ("off", off)):
        sam = MicroBatchSAM(model, micro_batch_size=3, vectorize=vectorize, **method)
        sam.backward(batch, lambda mb: sam.model(**mb)["loss"])
        assert sam.path == ("vectorized" if vectorize == "on" else "sequential"), sam.path_reason
        grads[vectorize] = [p.grad for p in model.parameters()]
    errors = relative_errors(grads["on"], grads["off"])
    assert max(errors) <= RTOL, f"relative errors {errors}"
