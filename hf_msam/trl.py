"""mSAM for TRL: `MSAMSFTTrainer`, `MSAMDPOTrainer`, `MSAMRewardTrainer` and their configs.

Each trainer is [`MSAMMixin`] on the TRL trainer, and each config the TRL config with every `--msam_*` field of
[`MSAMArguments`], so `TrlParser`/`HfArgumentParser` scripts get the flags:

```python
from hf_msam.trl import MSAMSFTConfig, MSAMSFTTrainer

args = MSAMSFTConfig(output_dir="out", msam_rho=0.05, msam_micro_batch_size=2)
trainer = MSAMSFTTrainer(model="path/to/model", args=args, train_dataset=dataset)
```

This module needs `trl` (`pip install "hf-msam[trl]"`); nothing else in `hf_msam` imports it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

try:
    from trl import DPOConfig, DPOTrainer, RewardConfig, RewardTrainer, SFTConfig, SFTTrainer
except ModuleNotFoundError as err:  # pragma: no cover - depends on the environment
    if err.name != "trl":
        raise
    raise ModuleNotFoundError(
        "hf_msam.trl needs TRL: pip install \"hf-msam[trl]\" (or pip install trl).", name="trl"
    ) from err

from .trainer import MSAMMixin
from .training_args import MSAMArguments

__all__ = [
    "MSAMDPOConfig",
    "MSAMDPOTrainer",
    "MSAMRewardConfig",
    "MSAMRewardTrainer",
    "MSAMSFTConfig",
    "MSAMSFTTrainer",
]


class _TRLStep:
    """What the ready classes add to [`MSAMMixin`] for TRL's trainers.

    - TRL wraps `Trainer.training_step` in its activation-offloading context. The mSAM step comes before TRL's in the
      method order and replaces it when mSAM is on, so it enters that context itself.
    - TRL's `compute_loss` records metrics (token count, accuracy, entropy, rewards, ...) on every call. The mSAM step
      calls it twice per micro-batch, clean at w then perturbed at w + e_j: the metrics of the calls whose loss the
      step does not report (`MicroBatch.reported` False) are dropped, so the logged ones are those of the reported
      loss (the clean one; at w + e for Momentum-SAM, which has no clean pass), over each token once.
    """

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        current = getattr(self, "_msam_pass", None)  # set by the mSAM step around each pass it computes
        if current is None or current.reported:
            return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        metrics = self._metrics["train"]
        saved = ({key: list(values) for key, values in metrics.items()}, getattr(self, "_total_train_tokens", None))
        try:
            return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        finally:
            metrics.clear()
            metrics.update(saved[0])
            if saved[1] is not None:
                self._total_train_tokens = saved[1]

    def training_step(self, *args: Any, **kwargs: Any):
        t = self.state.global_step + 1
        if not (self.msam_perturbation.enabled and self.msam_schedule.perturbs(t, self.state.max_steps)):
            return super().training_step(*args, **kwargs)  # a plain step: TRL's own, which enters the context itself
        with getattr(self, "maybe_activation_offload_context", None) or contextlib.nullcontext():
            return super().training_step(*args, **kwargs)


@dataclass
class MSAMSFTConfig(MSAMArguments, SFTConfig):
    r"""
    Configuration for [`MSAMSFTTrainer`]: every argument of TRL's `SFTConfig`, plus the mSAM settings of
    [`MSAMArguments`] (`--msam_*`). `msam_micro_batch_size` counts sequences: with `padding_free=True` or
    `packing=True`, micro-batches are cut from the packed row at sequence boundaries.
    """


@dataclass
class MSAMDPOConfig(MSAMArguments, DPOConfig):
    r"""
    Configuration for [`MSAMDPOTrainer`]: every argument of TRL's `DPOConfig`, plus the mSAM settings of
    [`MSAMArguments`] (`--msam_*`). `msam_micro_batch_size` counts preference pairs (chosen and rejected answer
    stay in the same micro-batch).
    """


@dataclass
class MSAMRewardConfig(MSAMArguments, RewardConfig):
    r"""
    Configuration for [`MSAMRewardTrainer`]: every argument of TRL's `RewardConfig`, plus the mSAM settings of
    [`MSAMArguments`] (`--msam_*`). `msam_micro_batch_size` counts preference pairs.
    """


class MSAMSFTTrainer(_TRLStep, MSAMMixin, SFTTrainer):
    """TRL's `SFTTrainer` with micro-batch sharpness-aware minimization. Give it [`MSAMSFTConfig`].

    The loss of each micro-batch is normalized by its share of the batch's label tokens (completion-only and
    assistant-only masks included), exactly as the plain `SFTTrainer` normalizes the whole batch; packed and
    padding-free rows are cut at sequence boundaries. See [`MSAMMixin`].
    """

    _tag_names = ["trl", "sft", "msam", "sharpness-aware-minimization"]


class MSAMDPOTrainer(_TRLStep, MSAMMixin, DPOTrainer):
    """TRL's `DPOTrainer` with micro-batch sharpness-aware minimization. Give it [`MSAMDPOConfig`].

    Micro-batches are made of whole preference pairs and weighted by their share of the pairs (the DPO loss is a
    mean over pairs). The reference model is never perturbed: only the trainable weights of the policy are.
    """

    _tag_names = ["trl", "dpo", "msam", "sharpness-aware-minimization"]


class MSAMRewardTrainer(_TRLStep, MSAMMixin, RewardTrainer):
    """TRL's `RewardTrainer` with micro-batch sharpness-aware minimization. Give it [`MSAMRewardConfig`].

    Micro-batches are made of whole preference pairs, weighted by their share of the pairs.
    """

    _tag_names = ["trl", "reward-trainer", "msam", "sharpness-aware-minimization"]
