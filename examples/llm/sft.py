"""Supervised fine-tuning (SFT) of a causal language model with mSAM, through TRL, offline.

    python examples/llm/sft.py --model_name_or_path path/to/local/model \
        --train_file examples/llm/data/sft_train.jsonl --validation_file examples/llm/data/sft_validation.jsonl \
        --use_peft --lora_r 8 --lora_alpha 16 --output_dir runs/sft-msam \
        --msam_rho 0.05 --msam_micro_batch_size 2

Every flag of TRL's `SFTConfig` and `ModelConfig` works (`--packing`, `--padding_free`, `--completion_only_loss`,
`--gradient_accumulation_steps`, `--bf16`, ...), and so do the `--msam_*` flags of `MSAMSFTConfig`. Without a
bf16-capable GPU it trains in float32 (on the CPU without a GPU) unless --bf16/--fp16/--use_cpu say otherwise.
See README.md.
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
from hf_msam.trl import MSAMSFTConfig, MSAMSFTTrainer

# What sft.py and dpo.py share is in llm_common.py beside them (this folder goes on the path also when the file is
# loaded by path rather than run).
sys.path.insert(0, str(Path(__file__).resolve().parent))
from llm_common import device_defaults, load_local  # noqa: E402


@dataclass
class DataArguments:
    """Where the data is: local json/jsonl/csv/parquet files, nothing is downloaded."""

    train_file: str = field(metadata={"help": "Training data: `prompt` + `completion` columns, `messages`, or `text`."})
    validation_file: str | None = field(default=None, metadata={"help": "Evaluation data, same columns."})


def main() -> None:
    parser = TrlParser((DataArguments, MSAMSFTConfig, ModelConfig))
    data_args, config, model_args = parser.parse_args_and_config(device_defaults(sys.argv[1:]))

    dtype = model_args.dtype if model_args.dtype in (None, "auto") else getattr(torch, model_args.dtype)
    model = AutoModelForCausalLM.from_pretrained(
        model_args.model_name_or_path, dtype=dtype, attn_implementation=model_args.attn_implementation
    )
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
    train_dataset = load_local(data_args.train_file)
    eval_dataset = load_local(data_args.validation_file) if data_args.validation_file else None
    if config.eval_strategy != "no" and eval_dataset is None:
        raise ValueError(f"--eval_strategy {config.eval_strategy} needs --validation_file.")

    trainer = MSAMSFTTrainer(
        model=model,
        args=config,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),  # None without --use_peft
    )
    result = trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
    trainer.save_model(config.output_dir)
    trainer.log_metrics("train", result.metrics)
    trainer.save_metrics("train", result.metrics)
    trainer.save_state()
    if eval_dataset is not None:
        metrics = trainer.evaluate()  # with --msam_eval_flatness: also the Hessian and sharpness of the final model
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
    # The card is tagged `trl`, `sft`, `msam`, `sharpness-aware-minimization` and lists the mSAM settings.
    trainer.create_model_card(model_name=os.path.basename(os.path.normpath(config.output_dir)),
                              dataset_name=os.path.basename(data_args.train_file))  # fmt: skip


if __name__ == "__main__":
    main()
    end_process_group()  # under torchrun/accelerate on CPU: gloo may abort at exit with its group alive
