"""Run by test_methods.py under `torchrun --nproc_per_node 2`: three SGD steps of MSAMTrainer with a stateful
method (LookSAM, k=2: SAM, reuse, SAM) under DDP (gloo). Each rank saves its start, its batches and its end."""

import sys

import torch
from reference import MLP, mlp_dataset

from hf_msam import MSAMTrainer, MSAMTrainingArguments


class RecordingTrainer(MSAMTrainer):
    seen = []

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.seen.append({k: v.detach().clone() for k, v in inputs.items()})
        return super().training_step(model, inputs, num_items_in_batch)


def main(out_dir):
    torch.manual_seed(0)
    model = MLP().double()
    initial = [p.detach().clone() for p in model.parameters()]
    args = MSAMTrainingArguments(
        out_dir, per_device_train_batch_size=4, max_steps=3, optim="sgd", learning_rate=0.5,
        lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0, train_sampling_strategy="sequential",
        report_to="none", use_cpu=True, save_strategy="no", logging_strategy="no", msam_rho=0.2, msam_micro_batch_size=3,
        msam_method="looksam", msam_looksam_k=2, msam_looksam_alpha=0.7, ddp_backend="gloo", disable_tqdm=True,
    )
    trainer = RecordingTrainer(model=model, args=args, train_dataset=mlp_dataset(24))
    trainer.train()
    final = [p.detach().clone() for p in model.parameters()]
    torch.save(
        {"initial": initial, "batches": RecordingTrainer.seen, "final": final, "world_size": trainer.args.world_size},
        f"{out_dir}/rank{trainer.args.process_index}.pt",
    )


if __name__ == "__main__":
    main(sys.argv[1])
    from hf_msam.launcher import end_process_group

    end_process_group()  # gloo (torch 2.14) may abort at interpreter exit with its process group alive
