"""Run by test_multiprocess.py under `torchrun --nproc_per_node 2`: two SGD steps of MSAMTrainer with DDP (gloo); with
`--msam_precondition adam` (argument `precondition`), three AdamW steps.

Each rank saves the weights it starts from, the batches it trained on, and the weights it ends with.
"""

import sys

import torch
from reference import MLP, mlp_dataset

from hf_msam import MSAMTrainer, MSAMTrainingArguments


class RecordingTrainer(MSAMTrainer):
    seen = []

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.seen.append({k: v.detach().clone() for k, v in inputs.items()})
        return super().training_step(model, inputs, num_items_in_batch)


def main(out_dir, vectorize="off", method="sam", precondition="none"):
    torch.manual_seed(0)
    model = MLP().double()
    initial = [p.detach().clone() for p in model.parameters()]
    adam = precondition == "adam"  # the preconditioner is AdamW's second moment
    steps = 3 if adam else 2
    args = MSAMTrainingArguments(
        out_dir, per_device_train_batch_size=4, max_steps=steps, optim="adamw_torch" if adam else "sgd",
        learning_rate=0.05 if adam else 0.5, lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0,
        train_sampling_strategy="sequential", report_to="none", use_cpu=True, save_strategy="no", logging_steps=1,
        msam_rho=0.2, msam_micro_batch_size=3, ddp_backend="gloo", msam_vectorize=vectorize, msam_method=method,
        msam_precondition=precondition,
    )
    trainer = RecordingTrainer(model=model, args=args, train_dataset=mlp_dataset(8 * steps))
    trainer.train()
    rank = trainer.args.process_index
    final = [p.detach().clone() for p in model.parameters()]
    logs = [h for h in trainer.state.log_history if "msam/sharpness" in h]
    torch.save(
        {"initial": initial, "batches": RecordingTrainer.seen, "final": final, "world_size": trainer.args.world_size,
         "perturbations_per_step": trainer.msam_perturbations_per_step, "logs": logs,
         "path": trainer.msam_engine.path},
        f"{out_dir}/rank{rank}.pt",
    )


if __name__ == "__main__":
    main(*sys.argv[1:])
    from hf_msam.launcher import end_process_group

    end_process_group()  # gloo (torch 2.14) may abort at interpreter exit with its process group alive
