"""TRL's trainers: the private names of theirs that hf_msam.trl reads.

Tested with trl 1.16.0.

- `trainer._metrics["train"]`: TRL's metrics of the logging window, a dict of lists its `compute_loss` appends to;
  `trainer._total_train_tokens`: the token count SFT logs as `num_tokens`. The mSAM step computes several losses per
  batch, so it takes a snapshot of both and puts it back for the passes whose metrics must not count.
- TRL's fused LM head: `hf_msam.integrations.trl_fused_head`.
"""

from __future__ import annotations

from typing import Any

TESTED = {"trl": ("1.16.0",)}


def missing_upstream_names() -> list[str]:
    """The TRL names hf_msam.trl relies on that the installed TRL no longer has (read off the trainers' source, since
    `_metrics` is made in __init__)."""
    import inspect

    try:
        from trl import DPOTrainer, SFTTrainer
    except ImportError:
        return []
    missing = []
    for cls in (SFTTrainer, DPOTrainer):
        if "self._metrics" not in inspect.getsource(cls):
            missing.append(f"trl.{cls.__name__}._metrics")
    if "_total_train_tokens" not in inspect.getsource(SFTTrainer):
        missing.append("trl.SFTTrainer._total_train_tokens")
    return missing


def train_metrics(trainer: Any) -> tuple[dict[str, list], Any]:
    """A snapshot of the trainer's training metrics and token count (copies of the lists)."""
    metrics = trainer._metrics["train"]
    return {key: list(values) for key, values in metrics.items()}, getattr(trainer, "_total_train_tokens", None)


def restore_train_metrics(trainer: Any, snapshot: tuple[dict[str, list], Any]) -> None:
    """Put a snapshot of `train_metrics` back (the dict is kept: TRL holds references to it)."""
    metrics = trainer._metrics["train"]
    metrics.clear()
    metrics.update({key: list(values) for key, values in snapshot[0].items()})
    if snapshot[1] is not None:
        trainer._total_train_tokens = snapshot[1]
