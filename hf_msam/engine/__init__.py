"""The mSAM engine: `MicroBatchSAM` and the strategies that compute its step.

- `core`: `MicroBatchSAM`, the public engine: construction and checks, `backward` (choose a strategy, run it, fall
  back), `backward_whole_batch`, the step's bookkeeping, and the interface the strategies use (gradients that leave
  `.grad` untouched, the accelerator's backward, `no_sync`, the process group).
- `choose`: `choose_strategy`, the one decision between the strategies, with its reason (the log's path line).
- `perturbation`: forming e_j (the rule, FSDP2's sharded norms, the synchronized scope's union gradients,
  statistics), written once for every strategy.
- `sequential`: one pass per micro-batch. `vectorized`: all micro-batches in one forward and backward per pass
  (through `hf_msam.vectorized`). `whole_batch`: a loss over the whole batch (in-batch negatives).
- `state`: `Schedule`, `MSAMStats`, `MicroBatch` and the checks shared by the entry points.
"""

from .choose import Choice, choose_strategy
from .core import DEEPSPEED_REFUSAL, MicroBatchSAM
from .state import MicroBatch, MSAMStats, Schedule, check_trainable

__all__ = ["DEEPSPEED_REFUSAL", "Choice", "MSAMStats", "MicroBatch", "MicroBatchSAM", "Schedule", "check_trainable",
           "choose_strategy"]  # fmt: skip
