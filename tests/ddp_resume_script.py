"""Run by test_methods.py under `torchrun --nproc_per_node 2`: for each stateful method (F-SAM, LookSAM, Momentum-SAM)
4 steps of SGD with momentum under DDP (gloo), saving at step 2, then the same run resumed from its checkpoint-2 on
2 processes; and a resume from the checkpoint a 1-process F-SAM run saved (argv[2]). Each rank saves what it saw."""

import logging
import sys

import torch
from reference import MLP, mlp_dataset

from transformers import TrainerCallback

from hf_msam import MSAMTrainer, MSAMTrainingArguments

METHODS = {"fsam": dict(msam_fsam_lambda=0.5), "looksam": dict(msam_looksam_k=3), "momentum": {}}


class RecordingTrainer(MSAMTrainer):
    def training_step(self, model, inputs, num_items_in_batch=None):
        self.seen.append({k: v.detach().clone() for k, v in inputs.items()})
        return super().training_step(model, inputs, num_items_in_batch)


def run(out_dir, method, seed, resume=None, max_steps=4):
    torch.manual_seed(seed)
    model = MLP().double()
    initial = [p.detach().clone() for p in model.parameters()]
    args = MSAMTrainingArguments(
        out_dir, per_device_train_batch_size=4, max_steps=max_steps, optim="sgd", optim_args="momentum=0.9",
        learning_rate=0.5, lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0,
        train_sampling_strategy="sequential", report_to="none", use_cpu=True, save_strategy="steps", save_steps=2,
        logging_strategy="no", msam_rho=0.2, msam_micro_batch_size=3, msam_method=method, ddp_backend="gloo",
        disable_tqdm=True, **METHODS[method],
    )
    trainer = RecordingTrainer(model=model, args=args, train_dataset=mlp_dataset(32))
    trainer.seen, trainer.state_at_start = [], []

    class StateAtStart(TrainerCallback):  # the method's state once the checkpoint is loaded, before any step
        def on_train_begin(self, *args, **kwargs):
            trainer.state_at_start.append(trainer.msam_perturbation.state_dict())

    trainer.add_callback(StateAtStart())
    trainer.train(resume_from_checkpoint=resume)
    return trainer, initial, [p.detach().clone() for p in model.parameters()]


def main(out_dir, one_process_checkpoint):
    messages = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: messages.append(record.getMessage())
    logging.getLogger("hf_msam").addHandler(handler)
    saved = {"initial": {}, "batches": {}, "whole": {}, "resumed": {}}
    for method in METHODS:
        trainer, saved["initial"][method], saved["whole"][method] = run(f"{out_dir}/{method}", method, seed=0)
        saved["batches"][method] = trainer.seen
        _, _, saved["resumed"][method] = run(f"{out_dir}/{method}-resumed", method, seed=1, resume=f"{out_dir}/{method}/checkpoint-2")
    saved["resume_warnings"] = list(messages)
    messages.clear()
    trainer, _, _ = run(f"{out_dir}/grown", "fsam", seed=1, resume=one_process_checkpoint, max_steps=2)  # no step left
    saved["grown_state"], saved["grown_warnings"] = trainer.state_at_start[0], messages
    saved["world_size"], rank = trainer.args.world_size, trainer.args.process_index
    torch.save(saved, f"{out_dir}/rank{rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    from hf_msam.launcher import end_process_group

    end_process_group()  # gloo (torch 2.14) may abort at interpreter exit with its process group alive
