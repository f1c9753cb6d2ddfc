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

import torch

try:
    from trl import DPOConfig, DPOTrainer, RewardConfig, RewardTrainer, SFTConfig, SFTTrainer
except ModuleNotFoundError as err:  # pragma: no cover - depends on the environment
    if err.name != "trl":
        raise
    raise ModuleNotFoundError(
        "hf_msam.trl needs TRL: pip install \"hf-msam[trl]\" (or pip install trl).", name="trl"
    ) from err

from .integrations import trl as trl_adapter
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


def _stacked(parts: list[Any]) -> Any:
    """The values one gather call of each micro-batch's pass received, joined as a gather across devices joins them:
    0-d tensors stacked, others concatenated along dim 0 (tuples, lists and dicts element by element)."""
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.stack(parts) if first.dim() == 0 else torch.cat(parts)
    if isinstance(first, dict):
        return type(first)({key: _stacked([p[key] for p in parts]) for key in first})
    if isinstance(first, (list, tuple)):
        return type(first)(_stacked(list(values)) for values in zip(*parts))
    return parts[-1]


def _detached(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, dict):
        return type(value)({key: _detached(v) for key, v in value.items()})
    if isinstance(value, (list, tuple)):
        return type(value)(_detached(v) for v in value)
    return value


def _gather_uneven(accelerator: Any, gather: Any, real: Any, value: Any, *args: Any, **kwargs: Any) -> Any:
    """`real(value)` (the accelerator's gather or gather_for_metrics) for a tensor whose dim 0 may differ across
    processes (packed rows make different numbers of micro-batches per device): padded to the longest, gathered,
    the padding dropped. The sizes are read on the host, as TRL reads every gathered metric right after (.item())."""
    if accelerator.num_processes == 1 or not isinstance(value, torch.Tensor):
        return real(value, *args, **kwargs)
    sizes = gather(torch.full((1,), value.shape[0], dtype=torch.long, device=value.device)).tolist()
    if len(set(sizes)) == 1:
        return real(value, *args, **kwargs)
    longest = max(sizes)
    padded = torch.cat([value, value.new_zeros((longest - value.shape[0], *value.shape[1:]))])
    gathered = gather(padded).reshape(len(sizes), longest, *value.shape[1:])
    return torch.cat([gathered[rank, :n] for rank, n in enumerate(sizes)])


@contextlib.contextmanager
def _micro_batch_gathers(accelerator: Any, record: list[Any], passes: list[list[Any]] | None):
    """Inside one pass of the mSAM step, the accelerator's `gather` and `gather_for_metrics` (TRL's metrics) make no
    collective: each records its (detached) value in `record` and returns it. With `passes` (the records of all
    the step's reported passes, this one last), each instead gathers across devices the values its call received
    in every one of those passes, joined as if each micro-batch were a process: TRL's sums and counts then cover
    the whole batch, and its means over pairs or examples all of them."""
    names = ("gather", "gather_for_metrics")
    own = {name: accelerator.__dict__.get(name) for name in names}  # instance attributes of someone else's
    real = {name: getattr(accelerator, name) for name in names}
    inside: list[bool] = []  # gather_for_metrics calls self.gather: that one is the real one

    def local(name: str) -> Any:
        def call(value: Any, *args: Any, **kwargs: Any) -> Any:
            if inside:
                return real[name](value, *args, **kwargs)
            position = len(record)
            record.append(_detached(value))
            if passes is None:
                return value
            inside.append(True)
            try:
                joined = _stacked([p[position] for p in passes])
                return _gather_uneven(accelerator, real["gather"], real[name], joined, *args, **kwargs)
            finally:
                inside.clear()

        return call

    for name in names:
        setattr(accelerator, name, local(name))
    try:
        yield
    finally:
        for name in names:
            if own[name] is None:
                delattr(accelerator, name)
            else:
                setattr(accelerator, name, own[name])


class _TRLStep:
    """What the ready classes add to [`MSAMMixin`] for TRL's trainers.

    - TRL wraps `Trainer.training_step` in its activation-offloading context. The mSAM step comes before TRL's in the
      method order and replaces it when mSAM is on, so it enters that context itself.
    - TRL's `compute_loss` records metrics (token count, accuracy, entropy, rewards, ...) on every call, gathering
      them across devices. The mSAM step calls it twice per micro-batch, clean at w then perturbed at w + e_j. Its
      gathers then make no collective (devices with packed rows cut different numbers of micro-batches); the
      metrics of every pass are dropped but those of the last pass whose loss the step reports
      (`MicroBatch.reported`: the clean ones; at w + e for Momentum-SAM, which has no clean pass), whose gathers
      collect the values of all the reported passes of the step, from every device. So the logged metrics are
      those of the whole batch, each token once: sums and counts (`num_tokens`, and the numerators and
      denominators of `entropy` and `mean_token_accuracy`) and means over pairs (`rewards/*`) as without
      micro-batches; a metric TRL gathers as a mean per call (the reward model's `accuracy` and `margin`,
      `aux_loss`) is the mean over the micro-batches, as TRL's is over devices.
    """

    msam_gathers_once_per_step = True  # so devices may cut packed rows into different numbers of micro-batches

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        current = self.msam_pass  # the pass the mSAM step is computing, if any
        if current is None:
            return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        if current.reported and current.index == 0:
            self._msam_reported_gathers = []  # a new step: the gathers of its reported passes
        record: list[Any] = []
        if current.reported:
            self._msam_reported_gathers.append(record)
        if current.reported and current.index == current.count - 1:  # the step's metrics, all passes together
            try:
                with _micro_batch_gathers(self.accelerator, record, self._msam_reported_gathers):
                    return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
            finally:
                self._msam_reported_gathers = []
        saved = trl_adapter.train_metrics(self)
        try:
            with _micro_batch_gathers(self.accelerator, record, None):
                return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        finally:
            trl_adapter.restore_train_metrics(self, saved)

    def training_step(self, *args: Any, **kwargs: Any):
        t = self.state.global_step + 1
        if not (self.msam_perturbation.enabled and self.msam_schedule.perturbs(t, self.state.max_steps)):
            return super().training_step(*args, **kwargs)  # a plain step: TRL's own, which enters the context itself
        # A vectorized step that gives up after its first pass (a model found not to fit at its first forward) starts
        # again with one pass per micro-batch: that pass's metrics are then dropped (`msam_on_discard`).
        self._trl_step_metrics = trl_adapter.train_metrics(self)
        try:
            with getattr(self, "maybe_activation_offload_context", None) or contextlib.nullcontext():
                return super().training_step(*args, **kwargs)
        finally:
            self._trl_step_metrics = None

    def msam_on_discard(self) -> None:
        """The metrics as they were when the step began, or they would count twice."""
        if getattr(self, "_trl_step_metrics", None) is not None:
            trl_adapter.restore_train_metrics(self, self._trl_step_metrics)


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

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if self.msam_descent.through_outputs and self.compute_loss_func is None and self.label_smoother is None:
            # Functional-SAM needs the logits the loss consumes; TRL's fused LM head gives only log p(label), in which
            # the SFT loss is linear (the method would be SAM). The loss on the logits is TRL's own `compute_loss_func`
            # path (its fused forward, without a graph, then only feeds the metrics: one more forward per pass).
            if self.args.loss_type != "nll":
                raise ValueError(
                    f"--msam_method functional computes the SFT loss from the logits, as loss_type 'nll'; loss_type "
                    f"{self.args.loss_type!r} is computed by TRL's fused LM head only. Use loss_type='nll' or another "
                    "--msam_method."
                )
            self.compute_loss_func = _token_cross_entropy


def _token_cross_entropy(outputs: Any, labels: torch.Tensor, num_items_in_batch: Any = None) -> torch.Tensor:
    """The SFT loss from the logits: Σ over label tokens of −log p(label), over `num_items_in_batch` (else their
    count), as transformers' causal-LM loss computes it."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    logits = outputs.logits
    return ForCausalLMLoss(logits, labels, logits.shape[-1], num_items_in_batch=num_items_in_batch)


def fused_head_from_logits(logits: torch.Tensor, labels: torch.Tensor, log_sum_sq_probs: bool = False) -> Any:
    """What TRL's fused LM head (`model(..., labels=labels, fused_lm_head=True)`) returns, computed from the model's
    logits: per-token fields of the next-token distribution at positions 0..L-2 against the labels shifted by one,
    each zero where the label is -100. `log_probs` (and `loss`) keep the graph to the logits; `entropy`,
    `mean_logits`, `is_top1` and `log_sum_sq_probs` (only with `log_sum_sq_probs`) are computed without one (TRL's
    DPO reads them for its metrics and its WPO weights only, detached). In the logits' dtype, at least float32 (the
    fused head's is float32), with the fused head's own formulas: log p = z_label − (m + log Σ exp(z − m)), m the
    row's largest logit. Logits longer than the labels (prompt-learning PEFT prepends virtual tokens) are scored
    against labels padded with -100 in front, as PEFT pads them for the fused head."""
    from trl.trainer.utils import FusedCausalLMOutput

    if logits.shape[1] > labels.shape[1]:
        labels = torch.cat([labels.new_full((labels.shape[0], logits.shape[1] - labels.shape[1]), -100), labels], dim=1)
    labels = labels[:, 1:].to(logits.device)
    z = logits[:, :-1]
    z = z.to(torch.promote_types(z.dtype, torch.float32))
    mask = labels != -100
    target = labels.clamp(min=0).unsqueeze(-1)
    with torch.no_grad():
        m = z.amax(dim=-1)  # a constant shift: log Σ exp(z − m) + m is log Σ exp(z) for any m, and so is its gradient
    e = torch.exp(z - m.unsqueeze(-1))
    sum_exp = e.sum(dim=-1)
    log_z = m + torch.log(sum_exp)
    target_logit = z.gather(-1, target).squeeze(-1)
    log_probs = (target_logit - log_z).masked_fill(~mask, 0)
    with torch.no_grad():
        entropy = (log_z - (e * z).sum(dim=-1) / sum_exp).masked_fill(~mask, 0)
        mean_logits = (z.sum(dim=-1) / z.shape[-1]).masked_fill(~mask, 0)
        is_top1 = (z.argmax(dim=-1, keepdim=True) == target).squeeze(-1) & mask  # the first maximum, as the fused head
        log_sum_sq = (
            (torch.log((e * e).sum(dim=-1)) - 2 * torch.log(sum_exp)).masked_fill(~mask, 0) if log_sum_sq_probs else None
        )
    loss = -log_probs.sum() / mask.sum().clamp(min=1)
    return FusedCausalLMOutput(
        loss=loss, log_probs=log_probs, entropy=entropy, log_sum_sq_probs=log_sum_sq, mean_logits=mean_logits,
        is_top1=is_top1, label_mask=mask,
    )


class _FusedHeadFromLogits:
    """The policy as TRL's `_compute_loss` calls it, for Functional-SAM: a call with `fused_lm_head=True` and grad
    enabled calls the model without the fused head (its forward hook then records the logits as F) and serves the
    fused head's fields from the logits (`fused_head_from_logits`); every other call (the reference model's, under
    no_grad) goes to the model unchanged."""

    def __init__(self, model: Any, log_sum_sq_probs: bool):
        self.module = model
        self.log_sum_sq_probs = log_sum_sq_probs

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not (kwargs.get("fused_lm_head") and torch.is_grad_enabled()):
            return self.module(*args, **kwargs)
        kwargs.pop("fused_lm_head")
        labels = kwargs.pop("labels")
        outputs = self.module(*args, **kwargs)
        return fused_head_from_logits(outputs.logits, labels, self.log_sum_sq_probs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.module, name)


class MSAMDPOTrainer(_TRLStep, MSAMMixin, DPOTrainer):
    """TRL's `DPOTrainer` with micro-batch sharpness-aware minimization. Give it [`MSAMDPOConfig`].

    Micro-batches are made of whole preference pairs and weighted by their share of the pairs (the DPO loss is a
    mean over pairs). The reference model is never perturbed: only the trainable weights of the policy are.

    With `--msam_method functional`, the policy's forward in the mSAM step returns the logits (F, through which
    Functional-SAM descends), and the per-token log-probabilities the DPO loss consumes are computed from them as
    TRL's fused LM head computes them (`fused_head_from_logits`); the reference model's forward stays fused.
    """

    _tag_names = ["trl", "dpo", "msam", "sharpness-aware-minimization"]

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if self.msam_descent.through_outputs and self.msam_perturbation.enabled and self.aux_loss_enabled:
            raise ValueError(
                "--msam_method functional with a mixture-of-experts policy whose router loss is on "
                "(output_router_logits): the load-balancing loss reaches the weights through the router logits, not "
                "the LM logits, and is not supported. Turn the router loss off or use another --msam_method."
            )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.msam_descent.through_outputs and self.msam_pass is not None:
            # Functional-SAM: the DPO loss is a nonlinear function of the logits (through the log-softmax); F must be
            # the logits, which the fused head never builds
            model = _FusedHeadFromLogits(model, log_sum_sq_probs=self.use_weighting)
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)


class MSAMRewardTrainer(_TRLStep, MSAMMixin, RewardTrainer):
    """TRL's `RewardTrainer` with micro-batch sharpness-aware minimization. Give it [`MSAMRewardConfig`].

    Micro-batches are made of whole preference pairs, weighted by their share of the pairs.
    """

    _tag_names = ["trl", "reward-trainer", "msam", "sharpness-aware-minimization"]
