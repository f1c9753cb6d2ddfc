"""What sft.py and dpo.py share: reading a local data file, and precision flags chosen by device."""

from __future__ import annotations

import os
import sys

import torch
from datasets import load_dataset
from transformers.utils import is_torch_bf16_gpu_available


def load_local(path: str):
    kind = os.path.splitext(path)[1].lstrip(".")
    kind = {"jsonl": "json"}.get(kind, kind)
    return load_dataset(kind, data_files=path, split="train")


def device_defaults(argv: list[str]) -> list[str]:
    """TRL's configs default to bf16, which fails on a machine without a bf16-capable GPU. Unless the command line
    sets --bf16, --fp16, --use_cpu or a --config file, choose by device: nothing with such a GPU, float32
    (--bf16 false) on another GPU, the CPU in float32 (--use_cpu --bf16 false) without a GPU."""
    given = {arg.split("=", 1)[0] for arg in argv}
    if given & {"--bf16", "--fp16", "--use_cpu", "--config"} or is_torch_bf16_gpu_available():
        return argv
    extra = ["--bf16", "false"] if torch.cuda.is_available() else ["--use_cpu", "--bf16", "false"]
    print(f"{os.path.basename(sys.argv[0])}: no bf16-capable GPU, adding {' '.join(extra)} (set --bf16/--fp16/"
          "--use_cpu to choose yourself).", file=sys.stderr, flush=True)  # fmt: skip
    return [*argv, *extra]
