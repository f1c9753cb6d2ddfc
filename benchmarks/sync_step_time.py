"""Step time and bytes communicated per step: device-local against synchronized perturbations, 2 processes.

Two CPU processes (gloo) train a small BERT (built from a config, random tokens) under DDP with `MicroBatchSAM` in
a hand-written AdamW loop, in five configurations: the plain step (one forward and backward), SAM and mSAM with
micro-batches of a quarter of the per-device batch, each with device-local and with synchronized perturbations.
The configurations take one step each in turn, in an order that rotates every round, so load from elsewhere on
the machine lands on all of them alike; the figure is the median step time over --steps rounds after --warmup.

Bytes are the payload all-reduced per step by each process, counted where it happens: DDP's gradient buckets
through a communication hook, and the engine's own collectives (the union's ascent gradient and its weights)
by wrapping `torch.distributed.all_reduce`. A ring all-reduce puts about 2(W-1)/W times the payload on the wire.

    python benchmarks/sync_step_time.py                # about 2 minutes on a 2-core CPU
    python benchmarks/sync_step_time.py --quick        # a smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from transformers import BertConfig, BertForSequenceClassification

from hf_msam import MicroBatchSAM
from hf_msam import msam as msam_module

CONFIGS = [  # name, micro-batch size as a fraction of the per-device batch (None: SAM), synchronized
    ("plain", "plain", False),
    ("SAM, device-local", None, False),
    ("SAM, synchronized", None, True),
    ("mSAM(batch/4), device-local", 4, False),
    ("mSAM(batch/4), synchronized", 4, True),
]


class Bytes:
    def __init__(self):
        self.ddp = self.engine = 0


def model_for(quick: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=1000, hidden_size=64 if quick else 128, num_hidden_layers=1 if quick else 2, num_attention_heads=2,
        intermediate_size=128 if quick else 512, max_position_embeddings=128, num_labels=2,
    )
    return BertForSequenceClassification(config)


def worker(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    counter = Bytes()
    all_reduce = dist.all_reduce

    def counted_all_reduce(tensor, *a, **k):  # every all-reduce, DDP's hook's included (subtracted below)
        counter.engine += tensor.numel() * tensor.element_size()
        return all_reduce(tensor, *a, **k)

    dist.all_reduce = counted_all_reduce  # the engine calls it through this module (msam_module.dist)
    assert msam_module.dist is dist

    def hook(state, bucket):  # DDP's gradient all-reduce
        counter.ddp += bucket.buffer().numel() * bucket.buffer().element_size()
        return default_hooks.allreduce_hook(None, bucket)

    runs = []
    for name, fraction, sync in CONFIGS:
        model = torch.nn.parallel.DistributedDataParallel(model_for(args.quick))
        model.register_comm_hook(None, hook)
        optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5)
        mbs = None if fraction in (None, "plain") else args.batch_size // fraction
        sam = None if fraction == "plain" else MicroBatchSAM(model, rho=0.05, micro_batch_size=mbs, sync_perturbation=sync)
        runs.append({"name": name, "model": model, "optimizer": optimizer, "sam": sam, "times": [], "ddp": [], "engine": []})
    n_params = sum(p.numel() for p in runs[0]["model"].parameters())
    gen = torch.Generator().manual_seed(rank)

    def loss_fn(model):
        return lambda mb: model(**mb).loss

    for round_ in range(args.warmup + args.steps):
        shift = round_ % len(runs)
        for run in runs[shift:] + runs[:shift]:
            batch = {
                "input_ids": torch.randint(0, 1000, (args.batch_size, args.seq_len), generator=gen),
                "labels": torch.randint(0, 2, (args.batch_size,), generator=gen),
            }
            dist.barrier()
            counter.ddp = counter.engine = 0
            start = time.perf_counter()
            if run["sam"] is None:
                run["model"](**batch).loss.backward()
            else:
                run["sam"].backward(batch, loss_fn(run["model"]))
            run["optimizer"].step()
            run["optimizer"].zero_grad(set_to_none=True)
            elapsed = time.perf_counter() - start
            if round_ >= args.warmup:
                run["times"].append(elapsed)
                run["ddp"].append(counter.ddp)
                run["engine"].append(counter.engine - counter.ddp)  # the engine's own: the union's ascent gradients
    if rank == 0:
        rows = [
            {"config": r["name"], "step_ms": 1000 * statistics.median(r["times"]), "ddp_bytes": statistics.median(r["ddp"]),
             "engine_bytes": statistics.median(r["engine"])}
            for r in runs
        ]
        with open(out, "w") as f:
            json.dump({"rows": rows, "trainable_params": n_params, "loadavg": os.getloadavg(), "args": vars(args)}, f, indent=1)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=16, help="per device")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.warmup, args.batch_size, args.seq_len = 3, 1, 8, 16
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = args.json or os.path.join(os.environ.get("TMPDIR", "/tmp"), f"sync_step_time_{os.getpid()}.json")
    load_before = os.getloadavg()
    mp.spawn(worker, args=(2, port, args, out), nprocs=2)
    with open(out) as f:
        result = json.load(f)
    params = result["trainable_params"]
    print(f"2 processes (gloo), {params:,} trainable parameters ({4 * params / 2**20:.2f} MiB fp32), per-device batch "
          f"{args.batch_size} x {args.seq_len} tokens; load average before {load_before[0]:.2f}, after {result['loadavg'][0]:.2f}")
    print("| configuration | step (ms) | DDP bytes/step | engine bytes/step | total, in copies of the gradient |")
    print("|---|---:|---:|---:|---:|")
    for r in result["rows"]:
        total = r["ddp_bytes"] + r["engine_bytes"]
        print(f"| {r['config']} | {r['step_ms']:.1f} | {r['ddp_bytes']:,.0f} | {r['engine_bytes']:,.0f} | {total / (4 * params):.2f} |")


if __name__ == "__main__":
    main()
