"""Run by test_trl_multiprocess.py under `torchrun --nproc_per_node 2`: one SGD step of MSAMSFTTrainer with packed
rows, DDP (gloo) and micro-batches of 2 sequences. The ranks' rows hold different numbers of sequences, so they cut
different numbers of micro-batches. Each rank saves the batch it trained on, its final weights and its logs."""

import sys

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl_helpers import PROMPT_COMPLETION

from hf_msam.trl import MSAMSFTConfig, MSAMSFTTrainer


class Recording(MSAMSFTTrainer):
    def training_step(self, model, inputs, num_items_in_batch=None):
        self.seen = getattr(self, "seen", [])
        self.seen.append({k: v.clone() if torch.is_tensor(v) else v for k, v in inputs.items()})
        return super().training_step(model, inputs, num_items_in_batch)


def main(model_dir, out_dir, layout):
    packing = {"packing": dict(packing=True, max_length=48, per_device_train_batch_size=1),
               "padding_free": dict(padding_free=True, max_length=None, per_device_train_batch_size=3)}[layout]  # fmt: skip
    args = MSAMSFTConfig(
        out_dir, max_steps=1, optim="sgd", learning_rate=0.5, lr_scheduler_type="constant", max_grad_norm=0.0,
        weight_decay=0.0, bf16=False, report_to="none", use_cpu=True, save_strategy="no", logging_steps=1,
        disable_tqdm=True, train_sampling_strategy="sequential", ddp_backend="gloo", msam_rho=0.1,
        msam_micro_batch_size=2, **packing,
    )  # fmt: skip
    trainer = Recording(
        model=AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64), args=args,
        train_dataset=Dataset.from_list(PROMPT_COMPLETION), processing_class=AutoTokenizer.from_pretrained(model_dir),
    )  # fmt: skip
    trainer.train()
    torch.save(
        {"batch": trainer.seen[0], "final": {n: p.detach().clone() for n, p in trainer.model.named_parameters()},
         "world_size": trainer.args.world_size, "logs": [h for h in trainer.state.log_history if "loss" in h]},
        f"{out_dir}/rank{trainer.args.process_index}.pt",
    )  # fmt: skip


if __name__ == "__main__":
    main(*sys.argv[1:])
    from hf_msam.launcher import end_process_group

    end_process_group()  # gloo (torch 2.14) may abort at interpreter exit with its process group alive
