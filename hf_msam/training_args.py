"""`MSAMTrainingArguments`: `TrainingArguments` plus the `--msam_*` flags."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

from transformers import TrainingArguments

__all__ = ["MSAMTrainingArguments", "msam_setting"]


@dataclass
class MSAMTrainingArguments(TrainingArguments):
    r"""
    Configuration for [`MSAMTrainer`]: every argument of [`~transformers.TrainingArguments`], plus the
    micro-batch sharpness-aware minimization (mSAM) settings below. With `HfArgumentParser`, each
    appears on the command line as `--msam_*`.

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
        super().__post_init__()


_DEFAULTS = {f.name: f.default for f in fields(MSAMTrainingArguments) if f.name.startswith("msam_")}


def msam_setting(args: TrainingArguments, name: str):
    """`args.<name>`, or its `MSAMTrainingArguments` default when `args` is a plain `TrainingArguments`."""
    return getattr(args, name, _DEFAULTS[name])
