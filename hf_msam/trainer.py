"""`MSAMTrainer`: the `transformers.Trainer` with its training step delegated to `MicroBatchSAM`."""

from __future__ import annotations

import functools
import glob
import logging
import math
import os
from typing import Any

import torch
from torch import nn
from transformers import Trainer
from transformers.trainer_utils import get_last_checkpoint
from transformers.training_args import OptimizerNames

from .batches import SequenceBoundsRecorder, splitter_for, trl_bases
from .flatness import check_flatness_supported, evaluate_flatness, quantization_backend_name
from .integrations import transformers as transformers_adapter
from .methods import DescentRule, PerturbationRule, build_method, check_compatible
from .methods.sam import SAMPerturbation
from .engine import DEEPSPEED_REFUSAL, MicroBatch, MicroBatchSAM, MSAMStats, Schedule, check_trainable
from .integrations.hooks import integrations_for
from .training_args import MSAMArguments, check_msam_settings, msam_setting

__all__ = ["MSAMMixin", "MSAMTrainer"]

# TRL preference losses computed across the batch's pairs (AOT sorts the batch's log-ratios; the "sft" term is one
# token mean over the batch): the batch's loss is then not the weighted sum of its micro-batches' losses.
CROSS_EXAMPLE_LOSS_TYPES = {"aot", "aot_unpaired", "sft"}

logger = logging.getLogger("hf_msam")
if not logger.handlers:  # our own handler, in the Trainer's format: scripts need no logging set-up to see us
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("[%(levelname)s|%(name)s] %(message)s"))
    logger.addHandler(_handler)
    logger.propagate = False

MODEL_CARD_TAGS = ["msam", "sharpness-aware-minimization"]


def launched_apart(world_size: int, environ: Any = os.environ) -> str | None:
    """Why this process trains alone although a launcher started several (WORLD_SIZE or LOCAL_WORLD_SIZE above 1,
    world size 1: e.g. `accelerate launch --multi_gpu` or `torchrun` on a machine without GPUs and without
    `--use_cpu`), or None. Each such process is a run of its own, not a replica of one data-parallel run."""
    launched = max(int(environ.get(name) or 1) for name in ("WORLD_SIZE", "LOCAL_WORLD_SIZE"))
    if world_size != 1 or launched <= 1:
        return None
    return (
        f"The launcher started {launched} processes (WORLD_SIZE={environ.get('WORLD_SIZE')}, LOCAL_WORLD_SIZE="
        f"{environ.get('LOCAL_WORLD_SIZE')}), but this one trains alone (world size 1): they do not form one process "
        f"group, so they make {launched} separate runs, each on the whole data set, writing to the same output_dir. "
        "Without GPUs, pass the Trainer's --use_cpu to the script (accelerate launch --multi_gpu --num_processes "
        f"{launched} script.py --use_cpu ..., or torchrun --nproc_per_node {launched} script.py --use_cpu ...), which "
        "makes the processes one gloo group; with GPUs, check that each process sees one."
    )


def name_local_base_model(card_path: str, name_or_path: str | None) -> None:
    """TRL's and transformers' model cards name the base model only when it comes from the Hub: one loaded from a
    local directory gets "a fine-tuned version of [None](https://huggingface.co/None)" (TRL) or "trained from
    scratch" (transformers). Name the local directory instead (no link), or, with no name at all, leave it out."""
    if not os.path.isfile(card_path):
        return  # the base trainer wrote no card
    local = bool(name_or_path) and os.path.isdir(name_or_path)
    name = f"the local model `{os.path.basename(os.path.normpath(name_or_path))}`" if local else None
    with open(card_path, encoding="utf-8") as f:
        text = f.read()
    fixed = text.replace(
        "This model is a fine-tuned version of [None](https://huggingface.co/None)",
        f"This model is a fine-tuned version of {name}" if name else "This model was trained",
    )
    if name:
        fixed = fixed.replace("This model was trained from scratch on ", f"This model is a fine-tuned version of {name} on ")
    if fixed != text:
        with open(card_path, "w", encoding="utf-8") as f:
            f.write(fixed)


class MSAMMixin:
    """Micro-batch sharpness-aware minimization for any [`~transformers.Trainer`] subclass: put it first,
    `class MySFTTrainer(MSAMMixin, SFTTrainer)`. It replaces the gradient of `Trainer.training_step`, so a
    subclass's own `training_step` keeps working as long as it calls `super().training_step(...)` (TRL's do).

    Give it arguments that include [`MSAMArguments`] (plain ones get the mSAM defaults). Everything but the
    gradient of a training step is the base trainer's: optimizer, scheduler, clipping, gradient accumulation,
    mixed precision, DDP, logging, checkpoints. With `msam_rho=0` the step is the base trainer's own. All other
    arguments are those of the base trainer.

    Args:
        perturbation (`PerturbationRule`, *optional*):
            Replaces the rule that turns an ascent gradient into a perturbation. Defaults to the one of
            `--msam_method` (a registered method, see `hf_msam.register_method`) built from `args`.
        descent (`DescentRule`, *optional*):
            Replaces the rule that makes the descent contribution from the clean and perturbed gradients.
            Defaults to the one of `--msam_method`.
    """

    def __init__(
        self, *args: Any, perturbation: PerturbationRule | None = None, descent: DescentRule | None = None, **kwargs: Any
    ):
        super().__init__(*args, **kwargs)
        # The main process tells its settings (INFO) unless a --log_level was asked for; replicas follow the Trainer.
        passive = self.args.log_level == "passive" and self.args.should_log
        logger.setLevel(min(logging.INFO, self.args.get_process_log_level()) if passive else self.args.get_process_log_level())
        if not isinstance(self.args, MSAMArguments):
            logger.warning(
                "%s got arguments without the mSAM settings (%s): using the mSAM defaults (msam_rho=%s, "
                "msam_micro_batch_size=%s, msam_adaptive=%s). Pass MSAMTrainingArguments (or a config with MSAMArguments) to set them.",
                type(self).__name__,
                type(self.args).__name__,
                msam_setting(self.args, "msam_rho"),
                msam_setting(self.args, "msam_micro_batch_size"),
                msam_setting(self.args, "msam_adaptive"),
            )
        check_msam_settings(self.args)  # again: scripts and sweeps may change fields after the arguments are built
        check_flatness_supported(self)  # here, not at the first evaluation
        default_perturbation, default_descent = build_method(msam_setting(self.args, "msam_method"), self.args)
        self._default_perturbation = default_perturbation
        self.msam_perturbation = perturbation or default_perturbation
        self.msam_descent = descent or default_descent
        self.msam_schedule = Schedule(
            start=msam_setting(self.args, "msam_start"),
            interval=msam_setting(self.args, "msam_interval"),
            rho_schedule=msam_setting(self.args, "msam_rho_schedule"),
        )
        self.msam_micro_batch_size = msam_setting(self.args, "msam_micro_batch_size")
        # Synchronized perturbations: asked for, or forced by FSDP2 (sharded weights take one perturbation).
        self.msam_sync_perturbation = bool(msam_setting(self.args, "msam_sync_perturbation")) or self._msam_fsdp2()
        self._check_supported()
        self._msam_check_optimizer_class()
        # Integrations that take part in the step (sentence-transformers' losses: refused, or how they are perturbed);
        # found again at the first step, when a trainer built under `hf-msam run` has set what they read.
        self._msam_integrations = integrations_for(self)
        if self.msam_perturbation.enabled:
            for integration in self._msam_integrations:
                integration.check(self, self.msam_micro_batch_size)
        # How batches are cut into micro-batches: dim 0, packed rows at sequence boundaries, or preference pairs.
        self._msam_splitter = splitter_for(self, strict=self.msam_perturbation.enabled)
        self._msam: MicroBatchSAM | None = None
        self._msam_stats = MSAMStats()
        self._msam_last_logged_step = 0
        self._msam_announced = False
        self._msam_pass: MicroBatch | None = None  # the pass the mSAM step is computing a loss for, if any
        per_device = self.args.per_device_train_batch_size
        if self.msam_perturbation.enabled and self.msam_micro_batch_size and self.msam_micro_batch_size > per_device:
            logger.warning(
                "--msam_micro_batch_size %d is larger than the per-device batch (%d): each device's batch is one "
                "micro-batch of %d example(s), which is SAM on each device.",
                self.msam_micro_batch_size, per_device, per_device,
            )
        if (apart := launched_apart(self.args.world_size)) and os.environ.get("RANK", "0") == "0":
            logger.warning(apart)

    # -- what mSAM cannot do (yet) ----------------------------------------------------------------
    def _msam_fsdp2(self) -> bool:
        """True when accelerate shards the model with FSDP2 (`fsdp_version: 2`, or `dp_shard` of a parallelism config)."""
        plugin = getattr(self.accelerator.state, "fsdp_plugin", None)
        if getattr(self.accelerator, "is_fsdp2", False) or getattr(plugin, "fsdp_version", None) == 2:
            return True
        pc = getattr(self.accelerator, "parallelism_config", None)
        return bool(pc is not None and getattr(pc, "dp_shard_enabled", False))

    def _msam_check_optimizer_class(self) -> None:
        """Refuse, when the trainer is built, an optimizer the perturbation cannot read (`--msam_precondition adam` with
        `--optim sgd`): the one given (`optimizers=`), else the class `--optim` (or `optimizer_cls_and_kwargs`) names.
        Asked of rules that can tell from the class (`check_optimizer_class`); a custom `create_optimizer`'s optimizer
        is checked at the first step, as for every rule."""
        rule = self.msam_perturbation
        check = getattr(rule, "check_optimizer_class", None)
        if not rule.enabled or check is None:
            return
        if self.optimizer is not None:
            rule.check_optimizer(self.optimizer)
            return
        if type(self).create_optimizer is not Trainer.create_optimizer:
            return
        try:
            named = getattr(self, "optimizer_cls_and_kwargs", None)
            optimizer_cls, kwargs = named or self.get_optimizer_cls_and_kwargs(self.args, self.model)
        except Exception:  # an optimizer not to be named here (a package missing, ...): the first step decides
            return
        if isinstance(optimizer_cls, type) and issubclass(optimizer_cls, torch.optim.Optimizer):  # not a factory
            check(optimizer_cls, kwargs)

    def _check_supported(self) -> None:
        if not self.msam_perturbation.enabled:
            return  # msam_rho=0: the plain Trainer step, whatever the setup
        fsdp2 = self._msam_fsdp2()
        if self.is_deepspeed_enabled or getattr(self, "is_fsdp_xla_enabled", False) or (self.is_fsdp_enabled and not fsdp2):
            why = DEEPSPEED_REFUSAL if self.is_deepspeed_enabled else (
                "FSDP1 (and FSDP on XLA): mSAM perturbs each rank's shard of the weights and restores it between "
                "passes, which it does for FSDP2 only"
            )
            raise NotImplementedError(
                f"MSAMTrainer does not support {why}. Use FSDP2 (accelerate config `fsdp_version: 2`, or "
                "--fsdp_config with \"version\": 2), plain data parallelism (DDP, e.g. `accelerate launch --multi_gpu`), "
                "or set --msam_rho 0 to train without mSAM."
            )
        pc = getattr(self.accelerator, "parallelism_config", None)
        if pc is not None and any(getattr(pc, f"{kind}_enabled", False) for kind in ("tp", "cp", "sp", "dp_replicate" if fsdp2 else "dp_shard")):
            raise NotImplementedError(
                "MSAMTrainer does not support tensor, context or sequence parallelism, nor HSDP (dp_replicate with "
                "dp_shard), yet: each device must hold whole examples, and sharded weights one shard dimension. Use "
                "plain data parallelism or FSDP2 (dp_shard alone), or set --msam_rho 0."
            )
        check_compatible(
            self.msam_perturbation,
            self.msam_descent,
            method=msam_setting(self.args, "msam_method"),
            sync_perturbation=self.msam_sync_perturbation,
            fsdp2=fsdp2,
        )
        if (
            self.msam_sync_perturbation
            and self.args.world_size > 1
            and not getattr(self.accelerator, "even_batches", True)
            and not self.args.dataloader_drop_last
        ):
            raise ValueError(
                "--msam_sync_perturbation needs the same number of micro-batches on every device, and uneven last "
                "batches (accelerate's even_batches=False) can break that: set --dataloader_drop_last, or keep "
                "even_batches=True (the default)."
            )
        if self.msam_sync_perturbation and self.args.world_size > 1 and not getattr(self.args, "average_tokens_across_devices", True):
            raise ValueError(
                "--msam_sync_perturbation weighs each device's ascent gradient by its share of the label tokens counted "
                "over all devices, which --average_tokens_across_devices False does not count: keep it True (the "
                "default), or drop --msam_sync_perturbation."
            )
        if self.args.optim in (OptimizerNames.LOMO, OptimizerNames.ADALOMO):
            raise ValueError(
                f"--optim {self.args.optim.value} fuses the optimizer step into backward, which mSAM needs to run "
                "twice per step. Choose another optimizer (e.g. adamw_torch) or set --msam_rho 0."
            )
        if self.args.activation_checkpointing and (self.args.activation_checkpointing_kwargs or {}).get("use_reentrant"):
            raise ValueError(
                "mSAM computes its ascent gradient with torch.autograd.grad, which reentrant gradient checkpointing "
                "does not support. Drop use_reentrant=True from --gradient_checkpointing_kwargs (the default, "
                "non-reentrant checkpointing works)."
            )

    @property
    def msam_micro_batches_per_device(self) -> int:
        """Micro-batches each device cuts its batch into (in rows: packed rows hold several sequences each)."""
        mbs = self.msam_micro_batch_size
        return 1 if mbs is None else math.ceil(self.args.per_device_train_batch_size / mbs)

    @property
    def msam_perturbations_per_step(self) -> int:
        """Distinct perturbations per optimizer step: [devices ×] accumulation steps × micro-batches per device
        (devices only with device-local perturbations: synchronized ones are the same on every device)."""
        return self._msam_perturbing_devices * self.args.gradient_accumulation_steps * self.msam_micro_batches_per_device

    def msam_count(self, devices: str = "device(s)") -> str:
        """How `msam_perturbations_per_step` comes about, in words: "[W device(s) x ]A accumulation step(s) x M
        micro-batch(es)" (the start-up line, the launcher's line and the model card say it the same way; the
        launcher counts "process(es)")."""
        if not self.msam_sync_perturbation:
            devices = f"{self.args.world_size} {devices} x "
        elif devices == "process(es)":
            devices = f"the same on all {self.args.world_size} process(es): "
        else:
            devices = ""
        return (
            f"{devices}{self.args.gradient_accumulation_steps} accumulation step(s) x "
            f"{self.msam_micro_batches_per_device} micro-batch(es)"
        )

    @property
    def msam_count_caveat(self) -> str:
        """Empty, or why `msam_perturbations_per_step` is only a lower bound: TRL's `packing` makes each row a bin of
        several sequences, and micro-batches are cut by sequences, so their number depends on the data."""
        if getattr(self.args, "packing", False) and self.msam_micro_batch_size is not None:
            return (" (counted in packed rows: each holds one or more sequences and micro-batches are cut by "
                    "sequences, so a step makes at least as many; the logged msam/micro_batches_per_step is the count "
                    "per device)")  # fmt: skip
        return ""

    @property
    def _msam_perturbing_devices(self) -> int:
        return 1 if self.msam_sync_perturbation else self.args.world_size

    # -- hooks for trainers that subclass the mixin to integrate a library (hf_msam.trl) ------------------------
    msam_gathers_once_per_step: bool = False
    """True when the trainer's `compute_loss` gathers across devices only once per step (hf_msam.trl's trainers):
    devices may then cut their batches into different numbers of micro-batches. TRL's own gather once per call."""

    @property
    def msam_pass(self) -> MicroBatch | None:
        """The pass the mSAM step is computing a loss for (its index, weight, point, whether reported), or None."""
        return getattr(self, "_msam_pass", None)

    def msam_on_discard(self) -> None:
        """Called when the vectorized step gives up after a pass whose loss was computed (the step then starts again
        with one pass per micro-batch): undo what that pass recorded (hf_msam.trl: TRL's metrics). Nothing here."""

    @property
    def msam_engine(self) -> MicroBatchSAM | None:
        """The engine of the mSAM steps (built at the first perturbed step; None before): its `path` ("vectorized" or
        "sequential") and `path_reason` say how the last step ran, its `stats` what the logs report."""
        return self._msam

    @property
    def msam_path(self) -> str | None:
        """The latest path line the mSAM step logged: the path its steps take (vectorized, or one pass per
        micro-batch) and, when not the vectorized one, the module or setting that prevented it and why. None before
        the first perturbed step."""
        return None if self._msam is None else self._msam.path_line

    @property
    def msam_scope(self) -> str:
        """`device-local` (each device perturbs with its own micro-batches) or `synchronized` (one e_j for all)."""
        return "synchronized" if self.msam_sync_perturbation else "device-local"

    def _announce(self) -> None:
        self._msam_announced = True
        if not self.msam_perturbation.enabled:
            logger.info("mSAM is off (msam_rho=0): plain Trainer steps.")
            return
        if self.msam_schedule.rho_schedule == "lr" and not self.args.learning_rate > 0:
            logger.warning(
                "--msam_rho_schedule lr makes rho follow the learning rate, and --learning_rate is %s: rho is 0 on every "
                "step, so nothing is perturbed (each step still makes mSAM's passes). Set a learning rate > 0, or "
                "--msam_rho_schedule constant to perturb with --msam_rho.",
                self.args.learning_rate,
            )
        self._msam_integrations = integrations_for(self)
        for integration in self._msam_integrations:
            integration.check(self, self.msam_micro_batch_size)  # (a no-op when __init__ could check them)
        if self._msam_fsdp2() and not msam_setting(self.args, "msam_sync_perturbation"):
            logger.info("mSAM under FSDP2: perturbations are synchronized across devices (every rank perturbs its shard of the same e_j).")
        logger.info(
            "mSAM: %d distinct perturbations per optimizer step (%s of %d example(s) per device)%s; %s; scope: %s; "
            "rule: %s, %s; schedule: %s.",
            self.msam_perturbations_per_step,
            self.msam_count(),
            min(self.msam_micro_batch_size or math.inf, self.args.per_device_train_batch_size),
            self.msam_count_caveat,
            f"{self.args.world_size} processes in one process group (data parallel)" if self.args.world_size > 1
            else "1 process (no data parallelism)",
            f"synchronized (the same perturbations on all {self.args.world_size} device(s))"
            if self.msam_sync_perturbation
            else "device-local (each device perturbs with its own micro-batches)",
            self.msam_perturbation,
            self.msam_descent,
            self.msam_schedule,
        )

    # -- the step ---------------------------------------------------------------------------------
    def _item_count(self, batch: Any) -> int | torch.Tensor:
        """What `num_items_in_batch` counts, for one (micro-)batch: the label tokens that are not -100."""
        if "shift_labels" in batch:
            labels = batch["shift_labels"]
        else:
            labels = batch["labels"][..., 1:] if getattr(self, "_loss_shifts_labels", False) else batch["labels"]
        return labels.ne(-100).sum()

    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: torch.Tensor | int | None = None
    ) -> torch.Tensor:
        if not self._msam_announced:
            self._announce()
        cut = self._msam_splitter.for_batch(inputs)  # also takes recorded sequence boundaries out of `inputs`
        if (
            self.args.world_size > 1
            and self.msam_micro_batch_size
            and self.msam_perturbation.enabled
            and cut.packed  # packed rows are cut at sequence boundaries: the counts differ per device
            and (self.msam_sync_perturbation or self._msam_loss_has_collectives)
        ):
            raise ValueError(
                "Packed rows are cut into as many micro-batches as they hold sequences, so devices would make different "
                "numbers of "
                + ("synchronized perturbations (--msam_sync_perturbation)" if self.msam_sync_perturbation else "calls to a "
                   "loss that gathers metrics across devices (TRL's compute_loss, under a bare MSAMMixin)")
                + " and wait on each other forever. "
                + ("Drop --msam_sync_perturbation (device-local perturbations work with packed rows), pad instead of "
                   "packing (padding_free=False, packing=False)" if self.msam_sync_perturbation else "Use the ready "
                   "classes of hf_msam.trl (MSAMSFTTrainer), which gather TRL's metrics once per step, pad instead of "
                   "packing (padding_free=False, packing=False)")
                + ", train on one device, or set --msam_micro_batch_size None (one micro-batch per device)."
            )
        t = self.state.global_step + 1  # the optimizer step this call contributes to (1-based)
        if not self.msam_perturbation.enabled or not self.msam_schedule.perturbs(t, self.state.max_steps):
            return super().training_step(model, inputs, num_items_in_batch)  # a plain step, the base trainer's own
        # Trainer.training_step's first act, done before the engine routes any forward: a transformers model that
        # uses hub kernels re-kernelizes (replaces its layers' forwards) when its mode changes (integrations.hub_kernels).
        model.train()
        if self._msam is None or self._msam.model is not model:
            self._msam = self._msam_engine(model)
        inputs = transformers_adapter.prepare_inputs(self, inputs)
        for integration in self._msam_integrations:  # a loss comparing a batch's examples: the whole-batch strategy
            loss = integration.whole_batch_step(self, model, inputs, num_items_in_batch, cut.split, t, self._msam_rho_now())
            if loss is not None:
                return loss

        # With `num_items_in_batch` the loss is normalized by a count of label tokens: weight the micro-batches by
        # that count, and give each the count that makes its loss a mean over itself.
        size_fn = self._item_count if num_items_in_batch is not None and "labels" in inputs else self._msam_splitter.size_fn

        def loss_fn(micro_batch: dict[str, Any], info: MicroBatch) -> torch.Tensor:
            num_items = num_items_in_batch
            if num_items is not None and info.count > 1:
                num_items = num_items_in_batch * info.weight  # tensor × tensor: no host sync
                if isinstance(info.weight, torch.Tensor):  # a micro-batch without label tokens: loss 0/N = 0, not 0/0
                    num_items = torch.where(info.weight > 0, num_items, num_items_in_batch)
            self._msam_pass = info
            try:
                return self._msam_step_loss(model, micro_batch, num_items)
            finally:
                self._msam_pass = None

        # Synchronized perturbations: when the loss is normalized by num_items_in_batch (counted over all devices),
        # each micro-batch's loss is its share of that sum, so devices weigh by that share; otherwise (mean losses)
        # by their micro-batch's size.
        shares = size_fn == self._item_count and self._msam_loss_uses_num_items(num_items_in_batch)
        self._msam.on_discard = self.msam_on_discard  # hf_msam.trl: drop a discarded pass's metrics
        return self._msam.backward(
            inputs, loss_fn, size_fn=size_fn, split_fn=cut.split, step=t, rho=self._msam_rho_now(),
            sync_weight="share" if shares else "size", layout=cut.layout,
            decomposable=self._msam_decomposable(inputs, cut, size_fn, shares),
        )

    def _msam_decomposable(self, inputs: dict[str, Any], cut: Any, size_fn: Any, shares: bool) -> bool | None:
        """Whether the batch's loss is Σ_j c_j·L_j over its micro-batches (the vectorized step needs it): known for
        the losses of transformers, TRL and hf_msam; None (not known) for a `compute_loss` written elsewhere."""
        for integration in getattr(self, "_msam_integrations", ()):  # sentence-transformers: what its loss computes
            known = integration.decomposable(self, inputs)
            if known is not None:
                return known
        owner = next((c for c in type(self).__mro__ if "compute_loss" in vars(c)), Trainer)
        if owner.__module__.split(".")[0] not in ("transformers", "trl", "hf_msam"):
            return None
        loss_types = getattr(self.args, "loss_type", None)
        loss_types = [loss_types] if isinstance(loss_types, str) else list(loss_types or [])
        if set(loss_types) & CROSS_EXAMPLE_LOSS_TYPES or getattr(self, "aux_loss_enabled", False):
            return False  # the batch's loss reads all its examples at once: not a sum over micro-batches
        return shares or self._msam_loss_is_a_mean_over_units(inputs, cut, size_fn)

    def _msam_loss_is_a_mean_over_units(self, inputs: dict[str, Any], cut: Any, size_fn: Any) -> bool:
        """Whether the whole batch's loss is Σ_j c_j·L_j for the micro-batch weights c_j without a token count: a
        mean over preference pairs, over label tokens of packed rows, or over examples with one label (or a fixed
        number of label values) each. A token-level label tensor without `num_items_in_batch` is a mean over
        tokens weighed by examples: not (the vectorized step then falls back)."""
        if cut.layout in ("pairs", "packed"):
            return True
        labels = inputs.get("labels") if isinstance(inputs, dict) else None
        return isinstance(labels, torch.Tensor) and (labels.dim() == 1 or labels.is_floating_point())

    def _msam_step_loss(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any) -> torch.Tensor:
        """The loss `Trainer.training_step` would backpropagate for `inputs` (see the transformers adapter)."""
        return transformers_adapter.loss_of_training_step(self, model, inputs, num_items_in_batch)

    def _msam_loss_uses_num_items(self, num_items_in_batch: Any) -> bool:
        """Whether the loss is normalized by `num_items_in_batch` (`Trainer.training_step`'s own rule)."""
        return transformers_adapter.loss_is_normalized_by_num_items(self, num_items_in_batch)

    def _msam_engine(self, model: nn.Module) -> MicroBatchSAM:
        """The engine for `model`, built at the first perturbed step (the optimizer exists by then)."""
        for rule in (self.msam_perturbation, self.msam_descent):
            warning = rule.check_optimizer(self.optimizer)
            if warning and self.is_world_process_zero():
                logger.warning(warning)
        if getattr(self.msam_perturbation, "max_steps", False) is None:  # Flat-LoRA's σ schedule runs over the training
            self.msam_perturbation.max_steps = self.state.max_steps
        engine = MicroBatchSAM(
            model,
            micro_batch_size=self.msam_micro_batch_size,
            accelerator=self.accelerator,
            perturbation=self.msam_perturbation,
            descent=self.msam_descent,
            optimizer=self.optimizer,
            sync_perturbation=self.msam_sync_perturbation,
            vectorize=msam_setting(self.args, "msam_vectorize"),
            # with the parameters a loss owns (sentence-transformers' SoftmaxLoss)
            params=next((p for i in self._msam_integrations if (p := i.extra_parameters(self, model)) is not None), None),
        )
        engine.stats = self._msam_stats
        return engine

    @functools.cached_property
    def _msam_loss_has_collectives(self) -> bool:
        """TRL's trainers gather metrics across devices inside `compute_loss`, once per call (the ready classes of
        `hf_msam.trl` make those gathers once per step)."""
        return bool(trl_bases(self)) and not self.msam_gathers_once_per_step

    def _msam_rho_now(self) -> float | torch.Tensor | None:
        """ρ_t of `--msam_rho_schedule lr` (ρ·lr_t/lr_max, from the optimizer's first group); None: the rule's own ρ."""
        if self.msam_schedule.rho_schedule == "constant" or not hasattr(self.msam_perturbation, "rho"):
            return None
        group = self.optimizer.param_groups[0]
        return self.msam_schedule.rho(self.msam_perturbation.rho, group["lr"], group.get("initial_lr", group["lr"]))

    # -- state that crosses steps (F-SAM's EMA, LookSAM's g_v) goes into each checkpoint ------------
    def _msam_state_file(self, checkpoint: str) -> str:
        return os.path.join(checkpoint, f"msam_state_{self.args.process_index}.pt")  # per process: it is per device

    def _save_rng_state(self, output_dir: str) -> None:
        super()._save_rng_state(output_dir)  # called by every process for each checkpoint, like the RNG state
        state = {"perturbation": self.msam_perturbation.state_dict(), "descent": self.msam_descent.state_dict()}
        if any(state.values()):
            path = self._msam_state_file(output_dir)
            temporary = f"{path}.tmp"  # written whole, then renamed: a kill during the save never leaves half a file
            try:
                with open(temporary, "wb") as f:
                    torch.save({**state, "world_size": self.args.world_size}, f)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(temporary, path)
            finally:
                if os.path.exists(temporary):
                    os.remove(temporary)

    def _msam_load_state(self, checkpoint: str) -> None:
        """This process's method state from `checkpoint`; a warning when it restarts instead, an error when its file
        cannot be used."""
        rules = {"perturbation": self.msam_perturbation, "descent": self.msam_descent}
        stateful = [type(rule).__name__ for rule in rules.values() if rule.state_dict()]
        if not stateful:
            return  # a method without state (SAM, GSAM, Momentum-SAM: its momentum is the optimizer's)
        path, index, world = self._msam_state_file(checkpoint), self.args.process_index, self.args.world_size
        names = " and ".join(stateful)
        saved = len(glob.glob(os.path.join(glob.escape(checkpoint), "msam_state_*.pt")))
        if not os.path.isfile(path):
            by = f" (it holds the state of {saved} process(es), this run has {world})" if saved else ""
            logger.warning(
                "Checkpoint %s has no %s for process %d%s: the state of %s restarts on this process, as at the first step.",
                checkpoint, os.path.basename(path), index, by, names,
            )
            return
        delete = (f"Delete {path} to restart the method's state (that of {names}, as at the first step) and resume: the "
                  "weights, optimizer and scheduler still come from the checkpoint.")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)  # the rules move it to their device
        except Exception as err:
            raise ValueError(f"{path} cannot be read ({type(err).__name__}: {err}): it is truncated or corrupt. {delete}") from err
        problem = self._msam_state_problem(state, rules)
        if problem:
            raise ValueError(f"{path} is not a valid mSAM method state: {problem}. {delete}")
        saved = state.get("world_size", saved)
        if saved != world:
            if self.is_world_process_zero():
                logger.warning(
                    "Checkpoint %s holds the mSAM method state of %d process(es) (one msam_state_<process>.pt each), and "
                    "this run has %d: the state of one process cannot be given to another, so the state of %s restarts "
                    "on every process, as at the first step. Resume with %d process(es) to keep it.",
                    checkpoint, saved, world, names, saved,
                )
            return
        try:
            for key, rule in rules.items():
                rule.load_state_dict(state[key])
        except (TypeError, ValueError, RuntimeError) as err:
            raise ValueError(f"{path} is not a valid mSAM method state: {err}. {delete}") from err

    def _msam_state_problem(self, state: Any, rules: dict[str, Any]) -> str | None:
        """What is wrong with a loaded method state, or None: lists of tensors must have one finite tensor per
        trainable parameter, shaped like it (under FSDP2, like its shard: not checked here), other tensors be finite."""
        if not isinstance(state, dict) or not all(isinstance(state.get(key), dict) for key in rules):
            return f"it does not hold a state for each rule ({', '.join(rules)})"
        params = [p for p in self.model.parameters() if p.requires_grad]
        for key in rules:
            for name, value in state[key].items():
                where = f"{key} state {name!r}"
                tensors = value if isinstance(value, (list, tuple)) else [value]
                if isinstance(value, (list, tuple)):
                    if not all(isinstance(t, torch.Tensor) for t in value):
                        continue  # not a per-parameter list: the rule checks it
                    if len(value) != len(params):
                        return f"{where} has {len(value)} tensors for the model's {len(params)} trainable parameters"
                    if not self._msam_fsdp2():
                        shapes = [(i, tuple(t.shape), tuple(p.shape)) for i, (t, p) in enumerate(zip(value, params)) if t.shape != p.shape]
                        if shapes:
                            i, got, want = shapes[0]
                            return f"{where}[{i}] has shape {got}, its parameter {want}"
                for t in tensors:
                    if isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
                        return f"{where} has non-finite entries (NaN or inf)"
        return None

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
        checkpoint = resume_from_checkpoint
        if isinstance(checkpoint, bool):
            checkpoint = get_last_checkpoint(self.args.output_dir) if checkpoint else None
        if self.msam_perturbation.enabled and self.model is not None:
            check_trainable(self.model, type(self).__name__, ", or set --msam_rho 0 for the plain Trainer's step")
            self.msam_perturbation.check_model(self.model)  # Flat-LoRA: refused without LoRA layers, before any step
        if checkpoint is not None:
            self._msam_load_state(checkpoint)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def get_train_dataloader(self):
        """[`~transformers.Trainer.get_train_dataloader`]; when mSAM cuts batches, its collator also records the
        sequence boundaries of packed rows on the CPU (see `hf_msam.batches`), so cutting them needs no host sync."""
        if not (self.msam_perturbation.enabled and self.msam_micro_batch_size) or self.data_collator is None:
            return super().get_train_dataloader()
        collator = self.data_collator
        self.data_collator = SequenceBoundsRecorder(collator)
        try:
            return super().get_train_dataloader()
        finally:
            self.data_collator = collator

    # -- logging ----------------------------------------------------------------------------------
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the mSAM metrics of the logging window to each training log, averaged like `loss`."""
        stats = self._msam_stats
        if "loss" in logs and stats.micro_batches > 0:
            device = self.args.device
            window = torch.stack(
                [
                    torch.as_tensor(v, dtype=torch.float32, device=device).reshape(())
                    for v in (stats.clean_loss, stats.perturbed_loss, stats.ascent_grad_norm, stats.micro_batches, stats.skipped, stats.steps)
                ]
            )
            window = self.accelerator.reduce(window, reduction="sum")  # across processes
            clean, perturbed, grad_norm, micro_batches, skipped, steps = window.tolist()
            per_step = max(steps, 1)  # perturbed optimizer steps in the window, over all processes
            logs["msam/perturbed_loss"] = perturbed / per_step
            logs["msam/sharpness"] = (perturbed - clean) / per_step
            logs["msam/ascent_grad_norm"] = grad_norm / micro_batches
            logs["msam/skipped_perturbations"] = skipped / per_step
            # Measured, not derived from the batch size: a packed row (TRL `packing`) holds a data-dependent number
            # of sequences, so only the count of what was cut tells how many perturbations a step made.
            logs["msam/micro_batches_per_step"] = micro_batches / per_step
        if "loss" in logs:
            stats.reset()
            self._msam_last_logged_step = self.state.global_step
        super().log(logs, start_time)

    # -- model card -------------------------------------------------------------------------------
    def create_model_card(self, *args: Any, tags: str | list[str] | None = None, **kwargs: Any) -> None:
        """[`~transformers.Trainer.create_model_card`], tagged `msam` and `sharpness-aware-minimization`, with a
        "## mSAM settings" section (also what `push_to_hub` uploads: it writes the card through this method)."""
        tags = [tags] if isinstance(tags, str) else list(tags or [])
        tags += [t for t in MODEL_CARD_TAGS if t not in tags]
        super().create_model_card(*args, tags=tags, **kwargs)
        if not self.is_world_process_zero():
            return
        name_local_base_model(os.path.join(self.args.output_dir, "README.md"),
                              getattr(getattr(self.model, "config", None), "_name_or_path", None))  # fmt: skip
        rule = self.msam_perturbation
        per_device = self.args.per_device_train_batch_size
        micro_batch_size = min(self.msam_micro_batch_size or per_device, per_device)
        lines = ["", "## mSAM settings", ""]
        if not rule.enabled:
            lines.append("Trained without mSAM (`msam_rho=0`): plain optimizer steps, the baseline for (m)SAM runs.")
        else:
            lines += [
                "Trained with micro-batch sharpness-aware minimization (mSAM, [Behdin et al., 2023]"
                "(https://arxiv.org/abs/2302.09693)) with `hf-msam`:",
                "",
                f"- rho: {msam_setting(self.args, 'msam_rho')}",
                f"- micro-batch size: {micro_batch_size} example(s) per perturbation, per device"
                + ("" if micro_batch_size < per_device else " (the whole per-device batch: SAM on each device)"),
                f"- adaptive (ASAM): {msam_setting(self.args, 'msam_adaptive')}"
                + (f", eta {msam_setting(self.args, 'msam_adaptive_eta')}" if msam_setting(self.args, "msam_adaptive") else ""),
                f"- perturbation scope: {self.msam_scope} ("
                + (
                    "micro-batch j's perturbation from the union of all devices' j-th micro-batches, the same on every device"
                    if self.msam_sync_perturbation
                    else "each device perturbs with its own micro-batches"
                )
                + ")",
                f"- perturbations per optimizer step: {self.msam_perturbations_per_step} ({self.msam_count()} per device)"
                + self.msam_count_caveat,
            ]
            lines.append(f"- method: {msam_setting(self.args, 'msam_method')}")
            schedule = self.msam_schedule
            if schedule != Schedule():
                lines.append(
                    f"- schedule: plain steps up to {schedule.start:g} of max_steps, then every {schedule.interval} step(s) "
                    f"perturbed; rho {schedule.rho_schedule}"
                )
            if type(rule) not in (SAMPerturbation, type(self._default_perturbation)):
                lines.append(f"- perturbation rule: `{type(rule).__name__}`")
        lines += self._msam_flatness_card_lines()
        with open(os.path.join(self.args.output_dir, "README.md"), "a", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")

    def _msam_flatness_card_lines(self) -> list[str]:
        """A "## Flatness" section: the last evaluation's flatness and quantization measures, where it made any."""
        names = {
            "eval_hessian_top_eigenvalue": "Hessian top eigenvalue (λ_max)",
            "eval_hessian_trace": "Hessian trace",
            "eval_sharpness": f"SAM sharpness at rho {msam_setting(self.args, 'msam_flatness_rho')}",
            **{f"eval_int{b}_{what}_delta": f"{what} change with the linear weights rounded to {b} bits"
               for b in (8, 4, 3) for what in ("loss", "accuracy")},
        }  # fmt: skip
        last = {}
        for log in self.state.log_history:
            last.update({k: v for k, v in log.items() if k in names})
        if not last:
            return []
        lines = ["", "## Flatness", "", "Measured on the evaluation set at the last evaluation (`hf_msam.flatness`; "
                 "lower means flatter, or less changed by quantization):", "",
                 *(f"- {names[k]}: {last[k]:.6g}" for k in names if k in last)]  # fmt: skip
        if any(k.startswith("eval_int") for k in last):
            lines.append(f"- quantization backend: {quantization_backend_name(msam_setting(self.args, 'msam_quantization_backend'))}")
        return lines

    # -- flatness ---------------------------------------------------------------------------------
    def evaluate(
        self, eval_dataset: Any = None, ignore_keys: list[str] | None = None, metric_key_prefix: str = "eval"
    ) -> dict[str, float]:
        """[`~transformers.Trainer.evaluate`], plus, with `msam_eval_flatness`, the Hessian top eigenvalue, the Hessian
        trace and the sharpness, with `msam_eval_quantization` the quantization deltas, and with `msam_eval_landscape`,
        the loss landscape files (see
        [`hf_msam.flatness.evaluate_flatness`]). The flatness metrics are logged right after the evaluation's own
        and returned with them, so `save_metrics` puts them in `all_results.json`."""
        metrics = super().evaluate(eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        if isinstance(eval_dataset if eval_dataset is not None else self.eval_dataset, dict):
            return metrics  # super() evaluated each dataset through this method, flatness included
        quantization = bool(msam_setting(self.args, "msam_eval_quantization"))
        flatness = evaluate_flatness(
            self, eval_dataset, metric_key_prefix, quantization=quantization,
            quantization_backend=msam_setting(self.args, "msam_quantization_backend"),
        )  # fmt: skip
        if flatness:
            self.log(flatness)
            metrics.update(flatness)
        return metrics


class MSAMTrainer(MSAMMixin, Trainer):
    """A [`~transformers.Trainer`] that trains with micro-batch sharpness-aware minimization: [`MSAMMixin`] on the
    plain `Trainer`. Give it [`MSAMTrainingArguments`]. See [`MSAMMixin`] for what it changes and what it keeps."""
