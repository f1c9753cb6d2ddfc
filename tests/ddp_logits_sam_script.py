"""Run by test_logits_sam.py under `torchrun --nproc_per_node 2`: two SGD steps of MSAMTrainer with logits-SAM on a
tiny float64 Llama (tied embeddings) under DDP (gloo), for --msam_vectorize off and on, and on with
--msam_sync_perturbation. Each rank saves the start, and per run its batches and the end."""

import sys

import torch
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM

from hf_msam import MSAMTrainer, MSAMTrainingArguments

RUNS = {"off": dict(msam_vectorize="off"), "on": dict(msam_vectorize="on"),
        "sync": dict(msam_vectorize="on", msam_sync_perturbation=True)}  # fmt: skip


def llama():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=True)  # fmt: skip
    return LlamaForCausalLM(config).double()


class RecordingTrainer(MSAMTrainer):
    def training_step(self, model, inputs, num_items_in_batch=None):
        self.seen.append({k: v.detach().clone() for k, v in inputs.items()})
        return super().training_step(model, inputs, num_items_in_batch)


def main(out_dir):
    g = torch.Generator().manual_seed(3)
    rows = torch.randint(0, 40, (16, 6), generator=g).tolist()
    data = Dataset.from_list([{"input_ids": r, "labels": r} for r in rows])
    saved, rank, world = {"runs": {}}, 0, 1
    for name, settings in RUNS.items():
        model = llama()
        saved["initial"] = {n: p.detach().clone() for n, p in model.named_parameters()}
        args = MSAMTrainingArguments(
            f"{out_dir}/{name}", per_device_train_batch_size=4, max_steps=2, optim="sgd", learning_rate=0.5,
            lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0, train_sampling_strategy="sequential",
            report_to="none", use_cpu=True, save_strategy="no", logging_strategy="no", msam_method="logits_sam",
            msam_rho=0.5, msam_micro_batch_size=2, ddp_backend="gloo", disable_tqdm=True, **settings,
        )  # fmt: skip
        trainer = RecordingTrainer(model=model, args=args, train_dataset=data)
        trainer.seen = []
        trainer.train()
        saved["runs"][name] = {"batches": trainer.seen, "path": trainer.msam_engine.path,
                               "final": {n: p.detach().clone() for n, p in model.named_parameters()}}  # fmt: skip
        rank, world = trainer.args.process_index, trainer.args.world_size
    saved["world_size"] = world
    torch.save(saved, f"{out_dir}/rank{rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1])
    from hf_msam.launcher import end_process_group

    end_process_group()  # gloo (torch 2.14) may abort at interpreter exit with its process group alive
