"""Run by test_sync.py under `torchrun --nproc_per_node 2`: MSAMTrainer with --msam_sync_perturbation under DDP
(gloo), in several settings. Each rank saves, per setting, its start, the batches of its training steps, its end
and the start-up line."""

import itertools
import logging
import sys

import torch
import torch.distributed as dist
from reference import MLP, host_syncs, mlp_dataset
from test_no_host_sync import TokenLM

from hf_msam import MicroBatchSAM, MSAMTrainer, MSAMTrainingArguments

SETTINGS = {
    "even": dict(per_device_train_batch_size=4, msam_micro_batch_size=2, gradient_accumulation_steps=1),
    "uneven_ga": dict(per_device_train_batch_size=4, msam_micro_batch_size=3, gradient_accumulation_steps=2),
    "fsam": dict(per_device_train_batch_size=4, msam_micro_batch_size=2, gradient_accumulation_steps=1,
                 msam_method="fsam", msam_fsam_lambda=0.6, msam_fsam_sigma=0.8),
    # A token-level loss over num_items_in_batch: the ranks' micro-batches hold different numbers of label tokens.
    "tokens": dict(per_device_train_batch_size=4, msam_micro_batch_size=2, gradient_accumulation_steps=1),
}
# Each setting on the sequential step (one pass per micro-batch) and on the vectorized one (every micro-batch of a
# rank in one forward and one backward per pass).
SETTINGS = {
    f"{name}{suffix}": dict(setting, msam_vectorize=vectorize)
    for name, setting in SETTINGS.items()
    for suffix, vectorize in (("", "off"), ("_vectorized", "on"))
}


def token_data(n, length=7, vocab=11):
    """Sequences whose label-token counts differ between micro-batches and between consecutive batches (so
    between the ranks, which take alternate batches)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (n, length), generator=g)
    labels = ids.clone()
    for i in range(n):
        labels[i, 2 + i % 3 + 2 * ((i // 4) % 2) :] = -100
    return [{"input_ids": ids[i], "labels": labels[i]} for i in range(n)]


class RecordingTrainer(MSAMTrainer):
    def training_step(self, model, inputs, num_items_in_batch=None):
        self.seen.append({k: v.detach().clone() for k, v in inputs.items()})
        self.num_items.append(num_items_in_batch)
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
        tokens = name.startswith("tokens")
        model = (TokenLM() if tokens else MLP()).double()
        initial = [p.detach().clone() for p in model.parameters()]
        data = token_data(32) if tokens else mlp_dataset(32)
        args = MSAMTrainingArguments(
            f"{out_dir}/{name}", max_steps=2, optim="sgd", learning_rate=0.5, lr_scheduler_type="constant",
            max_grad_norm=0.0, weight_decay=0.0, train_sampling_strategy="sequential", report_to="none", use_cpu=True,
            save_strategy="no", logging_strategy="no", disable_tqdm=True, msam_rho=0.3, ddp_backend="gloo",
            msam_sync_perturbation=True, **setting,
        )
        trainer = RecordingTrainer(model=model, args=args, train_dataset=data)
        trainer.seen, trainer.num_items = [], []
        lines.lines.clear()
        trainer.train()
        results[name] = {
            "initial": initial, "batches": trainer.seen, "final": [p.detach().clone() for p in model.parameters()],
            "perturbations_per_step": trainer.msam_perturbations_per_step, "log": list(lines.lines),
            "num_items": trainer.num_items, "path": trainer.msam_engine.path,
        }
        rank = trainer.args.process_index
    results["engine"] = engine_with_unequal_batches(rank)
    torch.save(results, f"{out_dir}/rank{rank}.pt")


def engine_with_unequal_batches(rank, rho=0.3):
    """MicroBatchSAM in a hand-written DDP step, rank 0 with 4 examples and rank 1 with 3 (micro-batches 2 + 2 and
    2 + 1), once with mean losses (sync_weight="size") and once with losses that are shares of a sum normalized by
    the count over both ranks, as the Trainer's under num_items_in_batch (sync_weight="share")."""
    gen = torch.Generator().manual_seed(7 + rank)
    n = 4 - rank
    batch = {"x": torch.randn(n, 6, generator=gen, dtype=torch.float64), "labels": torch.randint(0, 3, (n,), generator=gen)}
    total = torch.tensor(float(n), dtype=torch.float64)
    dist.all_reduce(total)  # 7 examples over both ranks
    out = {"batch": batch}
    for mode, vectorize in itertools.product(("size", "share"), ("off", "on")):
        torch.manual_seed(0)
        model = torch.nn.parallel.DistributedDataParallel(MLP().double())
        sam = MicroBatchSAM(model, rho=rho, micro_batch_size=2, sync_perturbation=True, vectorize=vectorize)

        def loss_fn(mb, info):
            if mode == "size":
                return model(**mb)["loss"]
            summed = torch.nn.functional.cross_entropy(model(x=mb["x"])["logits"], mb["labels"], reduction="sum")
            return summed / (total * info.weight)

        calls = []
        with host_syncs(calls):
            sam.backward(batch, loss_fn, sync_weight=mode)
        key = mode if vectorize == "off" else f"{mode}_vectorized"
        out[key] = [p.grad.clone() for p in model.parameters()]
        out[f"{key}_host_syncs"] = calls
        out[f"{key}_path"] = sam.path
    return out


if __name__ == "__main__":
    main(sys.argv[1])
    from hf_msam.launcher import end_process_group

    end_process_group()  # gloo (torch 2.14) may abort at interpreter exit with its process group alive
