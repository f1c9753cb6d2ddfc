"""Run by test_multiprocess.py under `torchrun --nproc_per_node 2`: three SGD steps of MSAMTrainer with
`--msam_method flat_lora` on a tiny LoRA-wrapped MLP under DDP (gloo), 4 examples a device in micro-batches of 3
(an uneven last one). Each rank saves its start, its batches, its end and the path its steps took."""

import sys

import torch
from peft import LoraConfig, get_peft_model
from reference import MLP, mlp_dataset

from hf_msam import MSAMTrainer, MSAMTrainingArguments

SEED, SIGMA, STEPS = 5, 0.3, 3


class RecordingTrainer(MSAMTrainer):
    seen = []

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.seen.append({k: v.detach().clone() for k, v in inputs.items()})
        return super().training_step(model, inputs, num_items_in_batch)


def main(out_dir, vectorize="off"):
    torch.manual_seed(0)
    model = get_peft_model(MLP().double(), LoraConfig(r=2, lora_alpha=3, lora_dropout=0.0, target_modules=["fc1", "fc2"],
                                                      init_lora_weights=False))
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = MSAMTrainingArguments(
        out_dir, per_device_train_batch_size=4, max_steps=STEPS, optim="sgd", learning_rate=0.5,
        lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0, train_sampling_strategy="sequential",
        report_to="none", use_cpu=True, save_strategy="no", logging_strategy="no", msam_method="flat_lora",
        msam_flat_lora_sigma=SIGMA, msam_flat_lora_schedule="cosine", msam_micro_batch_size=3, seed=SEED,
        ddp_backend="gloo", msam_vectorize=vectorize, disable_tqdm=True,
    )
    trainer = RecordingTrainer(model=model, args=args, train_dataset=mlp_dataset(8 * STEPS))
    trainer.train()
    final = {n: p.detach().clone() for n, p in model.named_parameters()}
    torch.save(
        {"initial": initial, "batches": RecordingTrainer.seen, "final": final, "world_size": trainer.args.world_size,
         "rank": trainer.args.process_index, "path": trainer.msam_engine.path, "seed": SEED, "sigma": SIGMA, "steps": STEPS},
        f"{out_dir}/rank{trainer.args.process_index}.pt",
    )


if __name__ == "__main__":
    main(*sys.argv[1:])
    from hf_msam.launcher import end_process_group

    end_process_group()  # gloo (torch 2.14) may abort at interpreter exit with its process group alive
