"""hf-msam: micro-batch sharpness-aware minimization (mSAM) for the Hugging Face Trainer."""

from .msam import (
    DescentRule,
    FriendlyPerturbation,
    GSAMDescent,
    LookSAMDescent,
    MicroBatchSAM,
    MomentumPerturbation,
    MSAMStats,
    PerturbationRule,
    SAMDescent,
    SAMPerturbation,
    Schedule,
    build_method,
    split_batch,
)
from .trainer import MSAMMixin, MSAMTrainer
from .training_args import MSAMArguments, MSAMTrainingArguments

__version__ = "0.1.0"

__all__ = [
    "MSAMMixin",
    "MSAMTrainer",
    "MSAMArguments",
    "MSAMTrainingArguments",
    "MicroBatchSAM",
    "MSAMStats",
    "PerturbationRule",
    "SAMPerturbation",
    "FriendlyPerturbation",
    "MomentumPerturbation",
    "DescentRule",
    "SAMDescent",
    "GSAMDescent",
    "LookSAMDescent",
    "Schedule",
    "build_method",
    "split_batch",
]
