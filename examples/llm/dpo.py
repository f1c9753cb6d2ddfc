"""Direct preference optimization (DPO) of a causal language model with mSAM, through TRL, offline.

    python examples/llm/dpo.py --model_name_or_path path/to/local/model \
        --train_file examples/llm/data/dpo_train.jsonl --use_peft --lora_r 8 --lora_alpha 16 --logging_steps 1 \
        --output_dir runs/dpo-msam --msam_rho 0.05 --msam_micro_batch_size 2

Every flag of TRL's `DPOConfig` and `ModelConfig` works, and so do the `--msam_*` flags of `MSAMDPOConfig`.
A micro-batch is made of whole preference pairs. With `--use_peft` the reference model is the base model with the
adapter switched off (no second copy); without it, a frozen copy of the starting model. Without a bf16-capable GPU
the script trains in float32 (on the CPU without a GPU) unless --bf16/--fp16/--use_cpu say otherwise. See README.md.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import ModelConfig, TrlParser, get_peft_config

from hf_msam.launcher import end_process_group
from hf_msam.trl import MSAMDPOConfig, MSAMDPOTrainer

# What sft.py and dpo.py share is in llm_common.py beside them (this folder goes on the path also when the file is
# loaded by path rather than run).
sys.path.insert(0, str(Path(__file__).resolve().parent))
from llm_common import device_defaults, load_local  # noqa: E402


@dataclass
class DataArguments:
    """Where the data is: local json/jsonl/csv/parquet files, nothing is downloaded."""

    train_file: str = field(metadata={"help": "Preference pairs: `prompt`, `chosen` and `rejected` columns."})
    validation_file: str | None = field(default=None, metadata={"help": "Evaluation pairs, same columns."})


def main() -> None:
    parser = TrlParser((DataArguments, MSAMDPOConfig, ModelConfig))
    data_args, config, model_args = parser.parse_args_and_config(device_defaults(sys.argv[1:]))

    dtype = model_args.dtype if model_args.dtype in (None, "auto") else getattr(torch, model_args.dtype)
    load = dict(dtype=dtype, attn_implementation=model_args.attn_implementation)
    model = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path, **load)
    peft_config = get_peft_config(model_args)
    ref_model = None if peft_config else AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path, **load)
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
    eval_dataset = load_local(data_args.validation_file) if data_args.validation_file else None

    trainer = MSAMDPOTrainer(
        model=model,
        ref_model=ref_model,
        args=config,
        train_dataset=load_local(data_args.train_file),
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    result = trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
    trainer.save_model(config.output_dir)
    trainer.log_metrics("train", result.metrics)
    trainer.save_metrics("train", result.metrics)
    trainer.save_state()
    if eval_dataset is not None:
        metrics = trainer.evaluate()
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
    trainer.create_model_card(model_name=os.path.basename(os.path.normpath(config.output_dir)),
                              dataset_name=os.path.basename(data_args.train_file))  # fmt: skip


if __name__ == "__main__":
    main()
    end_process_group()  # under torchrun/accelerate on CPU: gloo may abort at exit with its group alive
