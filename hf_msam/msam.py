"""The mSAM step: `MicroBatchSAM` and what it tells a loss function. The engine lives in `hf_msam.engine`; this
module keeps the import path `hf_msam.msam` (and the names it re-exported from `hf_msam.methods` and
`hf_msam.batches`) working."""

from .batches import batch_size_of, micro_batch_weights, split_batch
from .engine import DEEPSPEED_REFUSAL, MicroBatch, MicroBatchSAM, MSAMStats, Schedule, check_trainable
from .methods import REGISTRY, Capabilities, DescentRule, PerturbationRule, build_method, register_method
from .methods.fsam import FriendlyPerturbation
from .methods.gsam import GSAMDescent
from .methods.looksam import LookSAMDescent
from .methods.momentum import MomentumPerturbation
from .methods.sam import SAMDescent, SAMPerturbation

__all__ = [
    "MicroBatch",
    "MicroBatchSAM",
    "MSAMStats",
    "Schedule",
    # re-exported from hf_msam.methods and hf_msam.batches, where they live
    "Capabilities",
    "DescentRule",
    "FriendlyPerturbation",
    "GSAMDescent",
    "LookSAMDescent",
    "MomentumPerturbation",
    "PerturbationRule",
    "REGISTRY",
    "SAMDescent",
    "SAMPerturbation",
    "batch_size_of",
    "build_method",
    "micro_batch_weights",
    "register_method",
    "split_batch",
]
