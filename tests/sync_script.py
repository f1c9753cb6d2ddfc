"""Run by test_sync.py under `torchrun --nproc_per_node 2`: MSAMTrainer with --msam_sync_perturbation under DDP
(gloo), in several settings. Each rank saves, per setting, its start, the batches of its training steps, its end
and the start-up line."""

import logging
import sys

import torch
from reference import MLP, mlp_dataset

from hf_msam import MSAMTrainer, MSAMTrainingArguments

SETTINGS = {
    "even": dict(per_device_train_batch_size=4, msam_micro_batch_size=2, gradient_accumulation_steps=1),
    "uneven_ga": dict(per_device_train_batch_size=4, msam_micro_batch_size=3, gradient_accumulation_steps=2),
    "fsam": dict(per_device_train_batch_size=4, msam_micro_batch_size=2, gradient_accumulation_steps=1,
                 msam_method="fsam", msam_fsam_lambda=0.6, msam_fsam_sigma=0.8),
}


class RecordingTrainer(MSAMTrainer):
    def training_step(self, model, inputs, num_items_in_batch=None):
        self.seen.append({k: v.detach().clone() for k, v in inputs.items()})
        return super().training_step(model, inputs, num_items_in_batch)


class Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def main(out_dir):
    lines = Lines()
    logging.getLogger("hf_msam").addHandler(lines)
    results = {}
    for name, setting in SETTINGS.items():
        torch.manual_seed(0)
        model = MLP().double()
        initial = [p.detach().clone() for p in model.parameters()]
        args = MSAMTrainingArguments(
            f"{out_dir}/{name}", max_steps=2, optim="sgd", learning_rate=0.5, lr_scheduler_type="constant",
            max_grad_norm=0.0, weight_decay=0.0, train_sampling_strategy="sequential", report_to="none", use_cpu=True,
            save_strategy="no", logging_strategy="no", disable_tqdm=True, msam_rho=0.3, ddp_backend="gloo",
            msam_sync_perturbation=True, **setting,
        )
        trainer = RecordingTrainer(model=model, args=args, train_dataset=mlp_dataset(32))
        trainer.seen = []
        lines.lines.clear()
        trainer.train()
        results[name] = {
            "initial": initial, "batches": trainer.seen, "final": [p.detach().clone() for p in model.parameters()],
            "perturbations_per_step": trainer.msam_perturbations_per_step, "log": list(lines.lines),
        }
        rank = trainer.args.process_index
    torch.save(results, f"{out_dir}/rank{rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1])
