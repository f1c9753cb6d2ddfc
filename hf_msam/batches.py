"""Cutting a batch into micro-batches: along dim 0, packed (padding-free) rows, and preference pairs.

`MicroBatchSAM` cuts a batch along dim 0 by default (`split_batch`), and weighs micro-batch j by its share of the
examples (`micro_batch_weights`). Two batch shapes of LLM fine-tuning need other cuts:

- **Packed / padding-free rows** (TRL `padding_free=True` or `packing=True`, transformers'
  `DataCollatorWithFlattening`): one row of shape (1, T) holds many sequences, delimited by `position_ids` restarting
  at 0 and, when present, by `cu_seq_lens_q`/`cu_seq_lens_k`. A micro-batch is then a run of whole sequences: the
  row is cut at sequence boundaries, `msam_micro_batch_size` sequences per micro-batch, and each micro-batch's
  boundary tensors are rebuilt relative to its own start. A packed row is never taken as one example.
- **Preference pairs** (TRL `DPOTrainer`, `RewardTrainer`): rows 0..n-1 hold the chosen answers and rows n..2n-1 the
  rejected ones. A micro-batch takes pairs: chosen rows a..b-1 together with rejected rows n+a..n+b-1, and the rows
  of per-pair tensors (`ref_chosen_logps`, `margin`, ...) a..b-1.

The cut points of a packed row are Python ints. The collator knows them on the CPU; once the batch is on an
accelerator, reading them back would stall the device. `SequenceBoundsRecorder` wraps the training collator and
stores them in the batch under `SEQUENCE_BOUNDS_KEY` (a tuple of ints, which device placement leaves alone);
`Splitter.for_batch` takes them out again before the model sees the batch. Without them, boundaries are read from
the batch's CPU tensors, or, as a last resort, copied from the device once per step.

Nothing here imports TRL: trainers are recognized by the names of the classes they derive from.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .ops import divide_where_positive, weight_dtype

__all__ = [
    "BatchCut",
    "SEQUENCE_BOUNDS_KEY",
    "SequenceBoundsRecorder",
    "Splitter",
    "is_packed",
    "label_token_count",
    "sequence_bounds",
    "split_packed",
    "split_pairs",
    "splitter_for",
    "split_batch",
    "batch_size_of",
    "micro_batch_weights",
    "trl_bases",
]

SEQUENCE_BOUNDS_KEY = "msam_sequence_bounds"

# TRL trainers whose batches mSAM knows how to cut, by class name (module `trl.*`): dim-0 rows, or pairs.
_ROW_TRAINERS = {"SFTTrainer"}
_PAIR_TRAINERS = {"DPOTrainer", "RewardTrainer"}


# ---------------------------------------------------------------------------------------------
# Along dim 0
# ---------------------------------------------------------------------------------------------


def _first_tensor(batch: Any) -> torch.Tensor | None:
    if isinstance(batch, torch.Tensor):
        return batch if batch.dim() > 0 else None
    if isinstance(batch, Mapping):
        if isinstance(batch.get("labels"), torch.Tensor) and batch["labels"].dim() > 0:
            return batch["labels"]
        batch = list(batch.values())
    if isinstance(batch, (list, tuple)):
        for value in batch:
            t = _first_tensor(value)
            if t is not None:
                return t
    return None


def batch_size_of(batch: Any) -> int:
    """Number of examples in a batch: dim 0 of `labels` if present, else of the first tensor."""
    t = _first_tensor(batch)
    if t is None:
        raise ValueError(
            "mSAM cannot split this batch into micro-batches: it holds no tensor with a batch dimension "
            f"(got {type(batch).__name__}). Pass a tensor, or a dict/list/tuple of tensors."
        )
    return t.shape[0]


def _slice(batch: Any, n: int, start: int, stop: int) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch[start:stop] if batch.dim() > 0 and batch.shape[0] == n else batch
    if isinstance(batch, Mapping):
        return type(batch)({k: _slice(v, n, start, stop) for k, v in batch.items()})
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(_slice(v, n, start, stop) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(_slice(v, n, start, stop) for v in batch)
    return batch


def split_batch(batch: Any, micro_batch_size: int | None) -> list[Any]:
    """Split along dim 0 every tensor whose first dimension is the batch size; pass the rest through.

    The last micro-batch is smaller when the batch does not divide evenly.
    """
    n = batch_size_of(batch)
    if micro_batch_size is None or micro_batch_size >= n:
        return [batch]
    return [_slice(batch, n, start, min(start + micro_batch_size, n)) for start in range(0, n, micro_batch_size)]


def micro_batch_weights(
    micro_batches: list[Any], size_fn: Callable[[Any], int | torch.Tensor] | None = None
) -> list[float] | list[torch.Tensor]:
    """c_j = size(B_j) / Σ_i size(B_i).

    Sizes given as Python numbers (example counts) give Python floats; sizes given as tensors (label-token
    counts, say) give 0-d float64 tensors on their device, computed there: no transfer to the host. Both
    are exact in double precision, whatever the loss dtype. A batch whose tensor sizes are all 0 (no label token in
    a whole accumulation batch) gives c_j = 0, not 0/0: it contributes nothing.
    """
    sizes = [(size_fn or batch_size_of)(mb) for mb in micro_batches]
    device = next((n.device for n in sizes if isinstance(n, torch.Tensor)), None)
    if device is None:
        total = float(sum(sizes))
        return [float(n) / total for n in sizes]
    dtype = weight_dtype(device)
    sizes_t = torch.stack([torch.as_tensor(n, device=device).to(dtype).reshape(()) for n in sizes])
    return list(divide_where_positive(sizes_t, sizes_t.sum()).unbind())


# ---------------------------------------------------------------------------------------------
# Packed rows
# ---------------------------------------------------------------------------------------------


def is_packed(batch: Mapping[str, Any]) -> bool:
    """A padding-free batch: sequence boundaries given (`cu_seq_lens_*`), or `position_ids` with no attention mask."""
    if not isinstance(batch, Mapping):
        return False
    if isinstance(batch.get("cu_seq_lens_q"), torch.Tensor) or isinstance(batch.get("cu_seq_lens_k"), torch.Tensor):
        return True
    return isinstance(batch.get("position_ids"), torch.Tensor) and "attention_mask" not in batch


def _bounds_from_tensors(batch: Mapping[str, Any], allow_device_copy: bool) -> list[int] | None:
    """Cumulative sequence lengths [0, c_1, ..., T] of a one-row packed batch, from its own tensors."""
    cu = batch.get("cu_seq_lens_q")
    if not isinstance(cu, torch.Tensor):
        cu = batch.get("cu_seq_lens_k")
    if isinstance(cu, torch.Tensor):
        if cu.device.type != "cpu" and not allow_device_copy:
            return None
        return [int(x) for x in cu.tolist()]
    position_ids = batch["position_ids"]
    if position_ids.device.type != "cpu" and not allow_device_copy:
        return None
    row = position_ids.reshape(-1)
    starts = (row == 0).nonzero().flatten().tolist()
    if not starts or starts[0] != 0:
        starts = [0, *starts]
    return [*starts, row.numel()]


def sequence_bounds(batch: Mapping[str, Any], allow_device_copy: bool = True) -> list[int] | None:
    """[0, c_1, ..., T]: where the sequences of a one-row packed batch start, and its length.

    From a recorded `SEQUENCE_BOUNDS_KEY` entry if there is one, else from `cu_seq_lens_q`/`cu_seq_lens_k`, else
    from `position_ids` (a sequence starts where they are 0). Reading device tensors costs one host transfer;
    with `allow_device_copy=False` the answer is then None.
    """
    recorded = batch.get(SEQUENCE_BOUNDS_KEY)
    if recorded is not None:
        return list(recorded)
    return _bounds_from_tensors(batch, allow_device_copy)


def _check_one_row(batch: Mapping[str, Any]) -> int:
    ids = batch.get("input_ids")
    if not isinstance(ids, torch.Tensor):
        ids = batch.get("position_ids")
    if ids.dim() < 2 or ids.shape[0] != 1:
        raise ValueError(
            "mSAM cannot cut this packed batch into micro-batches: it has position_ids without an attention_mask "
            f"(a padding-free batch) but {ids.shape[0]} rows, and mSAM cuts packed batches only when all sequences "
            "are flattened into one row (TRL's padding_free=True / packing=True collators, transformers' "
            "DataCollatorWithFlattening). Use one of them, or set --msam_micro_batch_size None (one perturbation "
            "per device), or turn off --padding_free/--packing."
        )
    return ids.shape[1]


def _slice_packed(batch: Mapping[str, Any], bounds: list[int], first: int, last: int, length: int) -> dict[str, Any]:
    """Sequences first..last-1 of a one-row packed batch (bounds = cumulative lengths), as a batch of their own."""
    start, stop = bounds[first], bounds[last]
    lengths = [b - a for a, b in zip(bounds[first:last], bounds[first + 1 : last + 1])]
    out: dict[str, Any] = {}
    for key, value in batch.items():
        if key == SEQUENCE_BOUNDS_KEY:
            continue
        if key in ("cu_seq_lens_q", "cu_seq_lens_k") and isinstance(value, torch.Tensor):
            out[key] = value[first : last + 1] - value[first]
        elif key in ("max_length_q", "max_length_k") and isinstance(value, int):
            out[key] = max(lengths)
        elif key == "seq_idx" and isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[1] == length:
            out[key] = value[:, start:stop] - first  # sequence numbers from 0 in each micro-batch
        elif isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[0] == 1 and value.shape[1] == length:
            out[key] = value[:, start:stop]  # input_ids, labels, shift_labels, position_ids, inputs_embeds, ...
        else:
            out[key] = value
    return out


def split_packed(batch: Mapping[str, Any], micro_batch_size: int | None, bounds: Sequence[int] | None = None) -> list[Any]:
    """Cut a one-row packed batch into micro-batches of `micro_batch_size` whole sequences (the last may hold fewer).

    `bounds` are the cumulative sequence lengths [0, c_1, ..., T] (default: `sequence_bounds(batch)`). Returns
    `[batch]` itself when there is nothing to cut.
    """
    length = _check_one_row(batch)
    if bounds is None:
        bounds = sequence_bounds(batch)
    bounds = list(bounds)
    if bounds[-1] != length or bounds[0] != 0:
        raise ValueError(
            f"The sequence boundaries of this packed batch ({bounds[:3]}...{bounds[-1:]}) do not span its {length} "
            "tokens: cu_seq_lens_q/position_ids disagree with input_ids. Check the data collator."
        )
    n_sequences = len(bounds) - 1
    if micro_batch_size is None or micro_batch_size >= n_sequences:
        if SEQUENCE_BOUNDS_KEY in batch:
            return [{k: v for k, v in batch.items() if k != SEQUENCE_BOUNDS_KEY}]
        return [batch]
    return [
        _slice_packed(batch, bounds, first, min(first + micro_batch_size, n_sequences), length)
        for first in range(0, n_sequences, micro_batch_size)
    ]


class SequenceBoundsRecorder:
    """Wraps a data collator: each packed batch it makes also carries its sequence boundaries as Python ints, under
    `SEQUENCE_BOUNDS_KEY`, computed on the CPU where the collator runs. Other batches pass through unchanged."""

    def __init__(self, collator: Callable[[list[Any]], Any]):
        self.collator = collator

    def __call__(self, features: list[Any]) -> Any:
        batch = self.collator(features)
        if is_packed(batch):
            ids = batch.get("input_ids", batch.get("position_ids"))
            if isinstance(ids, torch.Tensor) and ids.dim() >= 2 and ids.shape[0] == 1:
                bounds = _bounds_from_tensors(batch, allow_device_copy=False)
                if bounds is not None:
                    batch[SEQUENCE_BOUNDS_KEY] = tuple(bounds)
        return batch

    def __getattr__(self, name: str) -> Any:  # padding_free, tokenizer, ... of the wrapped collator
        if name.startswith("__") or name == "collator":  # copy/pickle probe before __init__ ran: no recursion
            raise AttributeError(name)
        return getattr(self.__dict__["collator"], name)


# ---------------------------------------------------------------------------------------------
# Preference pairs
# ---------------------------------------------------------------------------------------------


def _pair_count(batch: Mapping[str, Any]) -> int:
    ids = batch.get("input_ids")
    if not isinstance(ids, torch.Tensor) or ids.dim() == 0 or ids.shape[0] % 2:
        shape = None if not isinstance(ids, torch.Tensor) else tuple(ids.shape)
        raise ValueError(
            "mSAM expected a preference batch (input_ids with the chosen answers in the first half of the rows and "
            f"the rejected ones in the second), got input_ids of shape {shape}."
        )
    return ids.shape[0] // 2


def split_pairs(batch: Mapping[str, Any], micro_batch_size: int | None) -> list[Any]:
    """Cut a preference batch into micro-batches of `micro_batch_size` pairs, each chosen row kept with its rejected
    row. Tensors with 2n rows are cut as pairs, tensors with n rows (per-pair values) as rows, the rest passed on."""
    n = _pair_count(batch)
    if micro_batch_size is None or micro_batch_size >= n:
        return [batch]
    micro_batches = []
    for a in range(0, n, micro_batch_size):
        b = min(a + micro_batch_size, n)
        mb = {}
        for key, value in batch.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == 2 * n:
                mb[key] = torch.cat([value[a:b], value[n + a : n + b]])
            elif isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == n:
                mb[key] = value[a:b]
            else:
                mb[key] = value
        micro_batches.append(mb)
    return micro_batches


def pair_count(batch: Mapping[str, Any]) -> int:
    """Pairs in a preference (micro-)batch: what its loss is a mean over."""
    return _pair_count(batch)


# ---------------------------------------------------------------------------------------------
# Label tokens
# ---------------------------------------------------------------------------------------------


def label_token_count(batch: Mapping[str, Any], shifted: bool = True) -> torch.Tensor:
    """Label tokens a causal-LM loss is a mean over: `shift_labels` != -100 if given, else `labels[..., 1:]` (or
    all of `labels` with `shifted=False`) != -100; without labels, the tokens of the attention mask or the row.
    A tensor on the batch's device (no host transfer)."""
    if isinstance(batch.get("shift_labels"), torch.Tensor):
        return batch["shift_labels"].ne(-100).sum()
    if isinstance(batch.get("labels"), torch.Tensor):
        labels = batch["labels"]
        return (labels[..., 1:] if shifted else labels).ne(-100).sum()
    if isinstance(batch.get("attention_mask"), torch.Tensor):
        return batch["attention_mask"].sum()
    return torch.tensor(batch["input_ids"].numel())


# ---------------------------------------------------------------------------------------------
# Which cut for which trainer
# ---------------------------------------------------------------------------------------------


def trl_bases(trainer: Any) -> list[str]:
    """The names of the TRL classes a trainer derives from (module `trl.*`), nearest first; [] for other trainers."""
    return [c.__name__ for c in type(trainer).__mro__ if c.__module__.split(".")[0] == "trl"]


@dataclass(frozen=True)
class BatchCut:
    """How one batch is cut: `split(batch, micro_batch_size)` gives the micro-batches, and `layout` says what they
    are: "rows" (dim 0), "packed" (runs of whole sequences of a one-row packed batch) or "pairs" (preference pairs)."""

    split: Callable[[Any, int | None], list[Any]]
    layout: str

    @property
    def packed(self) -> bool:
        return self.layout == "packed"


class Splitter:
    """How a trainer's batches are cut into micro-batches. `layout` is "rows" (dim 0, packed rows at sequence
    boundaries) or "pairs" (preference pairs). `for_batch(batch)` removes any recorded boundaries from the batch
    (the model must not see them) and returns its `BatchCut`."""

    def __init__(self, layout: str = "rows", shifted_labels: bool = True):
        if layout not in ("rows", "pairs"):
            raise ValueError(f"layout must be 'rows' or 'pairs', got {layout!r}")
        self.layout = layout
        self.shifted_labels = shifted_labels

    def __repr__(self) -> str:
        return f"Splitter(layout={self.layout!r})"

    def for_batch(self, batch: Any) -> BatchCut:
        recorded = batch.pop(SEQUENCE_BOUNDS_KEY, None) if isinstance(batch, MutableMapping) else None
        if self.layout == "pairs":
            return BatchCut(split_pairs, "pairs")
        if not is_packed(batch):
            return BatchCut(split_batch, "rows")
        return BatchCut(functools.partial(_split_packed_with, recorded=recorded), "packed")

    def size_fn(self, micro_batch: Any) -> int | torch.Tensor:
        """The weight of a micro-batch when the trainer gives no label-token count: pairs for preference batches,
        label tokens for packed rows, examples otherwise."""
        if self.layout == "pairs":
            return pair_count(micro_batch)
        if is_packed(micro_batch):
            return label_token_count(micro_batch, self.shifted_labels)
        return batch_size_of(micro_batch)


def _split_packed_with(batch: Any, micro_batch_size: int | None, recorded: Sequence[int] | None) -> list[Any]:
    if micro_batch_size is None:
        return [batch]
    return split_packed(batch, micro_batch_size, bounds=recorded)


def splitter_for(trainer: Any, strict: bool = True) -> Splitter:
    """The cut for `trainer`'s batches: pairs for TRL's `DPOTrainer`/`RewardTrainer`, rows (packed rows at sequence
    boundaries) for everything else. TRL trainers mSAM does not know (GRPO, KTO, ...) are refused when `strict`
    (mSAM on): their batches and steps differ in ways a row cut would get silently wrong."""
    trl = trl_bases(trainer)
    shifted = bool(getattr(trainer, "_loss_shifts_labels", True))
    if not trl:
        return Splitter("rows", shifted)
    if any(name in _PAIR_TRAINERS for name in trl):
        return Splitter("pairs", shifted)
    if any(name in _ROW_TRAINERS for name in trl):
        return Splitter("rows", shifted)
    if not strict:
        return Splitter("rows", shifted)
    known = sorted(_ROW_TRAINERS | _PAIR_TRAINERS)
    raise NotImplementedError(
        f"mSAM does not support the TRL trainer {trl[0]} yet (it supports {', '.join(known)}): its batches "
        "or its training step are built differently. Set --msam_rho 0 to train it without mSAM."
    )
