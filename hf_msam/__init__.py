"""hf-msam: micro-batch sharpness-aware minimization (mSAM) for the Hugging Face Trainer.

Where things are: the methods, one module each, and their registry in `hf_msam.methods`; the step in
`hf_msam.msam` (`MicroBatchSAM`); the Trainer glue in `hf_msam.trainer` and `hf_msam.training_args`; cutting batches
into micro-batches in `hf_msam.batches`; TRL's trainers in `hf_msam.trl`; flatness measures in `hf_msam.flatness`.
"""

from .batches import split_batch
from .methods import Capabilities, DescentRule, PerturbationRule, build_method, method_names, register_method
from .methods.fsam import FriendlyPerturbation
from .methods.gsam import GSAMDescent
from .methods.looksam import LookSAMDescent
from .methods.momentum import MomentumPerturbation
from .methods.sam import SAMDescent, SAMPerturbation
from .engine import MicroBatch, MicroBatchSAM, MSAMStats, Schedule
from .integrations import trl_fused_head as _trl_fused_head  # noqa: F401  (TRL's fused LM head, vectorized)
from . import st as _st  # noqa: F401  (registers the sentence-transformers integration's hooks)
from .trainer import MSAMMixin, MSAMTrainer
from .training_args import MSAMArguments, MSAMTrainingArguments

__version__ = "0.1.0"

__all__ = [
    "MSAMMixin",
    "MSAMTrainer",
    "MSAMArguments",
    "MSAMTrainingArguments",
    "MicroBatchSAM",
    "MicroBatch",
    "MSAMStats",
    "PerturbationRule",
    "SAMPerturbation",
    "FriendlyPerturbation",
    "MomentumPerturbation",
    "DescentRule",
    "SAMDescent",
    "GSAMDescent",
    "LookSAMDescent",
    "Capabilities",
    "Schedule",
    "build_method",
    "method_names",
    "register_method",
    "split_batch",
]
