"""`your_script.py` of the README's multi-device commands, run by test_multiprocess.py: an HfArgumentParser script
that trains the reference MLP with MSAMTrainer and saves, per rank, the batches it trained on, its start and end
weights and its world size."""

import os

import torch
from reference import MLP, mlp_dataset
from transformers import HfArgumentParser

from hf_msam import MSAMTrainer, MSAMTrainingArguments


class RecordingTrainer(MSAMTrainer):
    seen = []

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.seen.append({k: v.detach().clone() for k, v in inputs.items()})
        return super().training_step(model, inputs, num_items_in_batch)


def main():
    (args,) = HfArgumentParser(MSAMTrainingArguments).parse_args_into_dataclasses()
    torch.manual_seed(0)
    model = MLP().double()
    initial = [p.detach().clone() for p in model.parameters()]
    trainer = RecordingTrainer(model=model, args=args, train_dataset=mlp_dataset(64))
    trainer.train()
    torch.save(
        {"initial": initial, "batches": RecordingTrainer.seen, "final": [p.detach().clone() for p in model.parameters()],
         "world_size": trainer.args.world_size, "pid": os.getpid()},
        os.path.join(args.output_dir, f"rank{trainer.args.process_index}_{os.getpid()}.pt"),
    )  # fmt: skip


if __name__ == "__main__":
    main()
    from hf_msam.launcher import end_process_group

    end_process_group()  # gloo (torch 2.14) may abort at interpreter exit with its process group alive
