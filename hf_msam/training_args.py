"""`MSAMTrainingArguments`: `TrainingArguments` plus the `--msam_*` flags."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

from transformers import TrainingArguments

__all__ = ["MSAMArguments", "MSAMTrainingArguments", "msam_setting"]


@dataclass
class MSAMArguments:
    r"""
    The micro-batch sharpness-aware minimization (mSAM) settings, as a dataclass mixin that goes in front of any
    `TrainingArguments` subclass: `MSAMTrainingArguments(MSAMArguments, TrainingArguments)`, or a TRL config,
    `MSAMSFTConfig(MSAMArguments, SFTConfig)`. With `HfArgumentParser`, each appears on the command line as
    `--msam_*`; they are validated before the base class's own `__post_init__` runs.

    Parameters:
        msam_rho (`float`, *optional*, defaults to `0.05`):
            Perturbation radius ρ. `0` turns mSAM off: the step is then exactly the plain `Trainer` step.
        msam_micro_batch_size (`int` or `None`, *optional*, defaults to `None`):
            Examples per perturbation on each device. `None`: the whole per-device batch is one micro-batch.
        msam_adaptive (`bool`, *optional*, defaults to `False`):
            ASAM: scale the perturbation by T = |w| + η elementwise.
        msam_adaptive_eta (`float`, *optional*, defaults to `0.01`):
            η of ASAM.
        msam_eps (`float`, *optional*, defaults to `1e-12`):
            Added to the gradient norm in the denominator of the perturbation.
        msam_eval_flatness (`bool`, *optional*, defaults to `False`):
            Every evaluation also reports `eval_hessian_top_eigenvalue`, `eval_hessian_trace` and `eval_sharpness`
            (see `hf_msam.flatness`), measured on the first `msam_flatness_batches` evaluation batches.
        msam_flatness_batches (`int`, *optional*, defaults to `8`):
            Evaluation batches the flatness metrics and the loss landscape are measured on.
        msam_flatness_rho (`float`, *optional*, defaults to `0.05`):
            Radius of `eval_sharpness`, the same for every run (SAM perturbation, one micro-batch per batch).
        msam_flatness_iters (`int`, *optional*, defaults to `100`):
            Power iterations for the top eigenvalue and Hutchinson probes for the trace.
        msam_eval_landscape (`bool`, *optional*, defaults to `False`):
            Every evaluation writes `loss_landscape.json` and `loss_landscape.png` to `output_dir`; the last stays.
    """

    msam_rho: float = field(
        default=0.05,
        metadata={
            "help": "Perturbation radius rho of (m)SAM. 0 turns it off: each step is then exactly the plain "
            "Trainer step (one forward and backward, bitwise-identical weights)."
        },
    )
    msam_micro_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Examples per perturbation on each device (the mSAM micro-batch). None: the whole "
            "per-device batch is one micro-batch, which is SAM on each device. A batch that does not divide "
            "evenly gets a smaller last micro-batch, weighted by its size."
        },
    )
    msam_adaptive: bool = field(
        default=False,
        metadata={"help": "Use ASAM (Kwon et al. 2021): e = rho * T^2 g / ||T g|| with T = |w| + eta elementwise."},
    )
    msam_adaptive_eta: float = field(
        default=0.01,
        metadata={"help": "eta of ASAM in T = |w| + eta. Used only with --msam_adaptive."},
    )
    msam_eps: float = field(
        default=1e-12,
        metadata={"help": "Added to the gradient norm in the denominator of the perturbation, for stability."},
    )
    msam_eval_flatness: bool = field(
        default=False,
        metadata={
            "help": "At every evaluation, also report eval_hessian_top_eigenvalue, eval_hessian_trace and "
            "eval_sharpness (hf_msam.flatness), measured on the first --msam_flatness_batches evaluation batches. "
            "eval_sharpness is the SAM sharpness at radius --msam_flatness_rho (each batch one micro-batch), whatever "
            "this run's --msam_rho and --msam_micro_batch_size, so plain and mSAM runs compare on equal footing. "
            "Costs up to 2 x --msam_flatness_iters double backward passes per batch."
        },
    )
    msam_flatness_batches: int = field(
        default=8,
        metadata={"help": "Evaluation batches the flatness metrics and the loss landscape are measured on."},
    )
    msam_flatness_rho: float = field(
        default=0.05,
        metadata={
            "help": "Radius at which eval_sharpness is measured (SAM perturbation, each evaluation batch one "
            "micro-batch). The same for every run whatever its training rho, so runs compare on equal footing."
        },
    )
    msam_flatness_iters: int = field(
        default=100,
        metadata={
            "help": "Power iterations for eval_hessian_top_eigenvalue and Hutchinson probes for eval_hessian_trace "
            "(each one Hessian-vector product, i.e. a double backward, per flatness batch). Lower it on large models."
        },
    )
    msam_eval_landscape: bool = field(
        default=False,
        metadata={
            "help": "At every evaluation, write loss_landscape.json and loss_landscape.png to output_dir: the loss "
            "along a filter-normalized random direction (Li et al. 2018) on the first --msam_flatness_batches "
            "evaluation batches. Each evaluation overwrites them: the last one stays."
        },
    )

    def __post_init__(self):
        if not (isinstance(self.msam_rho, (int, float)) and math.isfinite(self.msam_rho) and self.msam_rho >= 0):
            raise ValueError(
                f"--msam_rho must be a finite number >= 0 (0 turns mSAM off), got {self.msam_rho!r}. "
                "Typical values are 0.01 to 0.5 (SAM) or 0.5 to 2.0 (ASAM)."
            )
        if self.msam_micro_batch_size is not None and (
            isinstance(self.msam_micro_batch_size, bool)
            or not isinstance(self.msam_micro_batch_size, int)
            or self.msam_micro_batch_size < 1
        ):
            raise ValueError(
                f"--msam_micro_batch_size must be a whole number >= 1, or None for one micro-batch per device; "
                f"got {self.msam_micro_batch_size!r}."
            )
        if not (
            isinstance(self.msam_adaptive_eta, (int, float))
            and math.isfinite(self.msam_adaptive_eta)
            and self.msam_adaptive_eta >= 0
        ):
            raise ValueError(f"--msam_adaptive_eta must be a finite number >= 0, got {self.msam_adaptive_eta!r}.")
        if not (isinstance(self.msam_eps, (int, float)) and math.isfinite(self.msam_eps) and self.msam_eps >= 0):
            raise ValueError(f"--msam_eps must be a finite number >= 0, got {self.msam_eps!r}.")
        if (
            isinstance(self.msam_flatness_batches, bool)
            or not isinstance(self.msam_flatness_batches, int)
            or self.msam_flatness_batches < 1
        ):
            raise ValueError(f"--msam_flatness_batches must be a whole number >= 1, got {self.msam_flatness_batches!r}.")
        if isinstance(self.msam_flatness_iters, bool) or not isinstance(self.msam_flatness_iters, int) or self.msam_flatness_iters < 1:
            raise ValueError(f"--msam_flatness_iters must be a whole number >= 1, got {self.msam_flatness_iters!r}.")
        if not (isinstance(self.msam_flatness_rho, (int, float)) and math.isfinite(self.msam_flatness_rho) and self.msam_flatness_rho > 0):
            raise ValueError(f"--msam_flatness_rho must be a finite number > 0, got {self.msam_flatness_rho!r}.")
        super().__post_init__()


@dataclass
class MSAMTrainingArguments(MSAMArguments, TrainingArguments):
    r"""
    Configuration for [`MSAMTrainer`]: every argument of [`~transformers.TrainingArguments`], plus the
    mSAM settings of [`MSAMArguments`] (`--msam_*` with `HfArgumentParser`).
    """


_DEFAULTS = {f.name: f.default for f in fields(MSAMArguments)}


def msam_setting(args: TrainingArguments, name: str):
    """`args.<name>`, or its `MSAMTrainingArguments` default when `args` is a plain `TrainingArguments`."""
    return getattr(args, name, _DEFAULTS[name])
