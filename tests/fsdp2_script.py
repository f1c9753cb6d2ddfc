"""Run by test_fsdp2.py under `torchrun --nproc_per_node 2`: MicroBatchSAM on a model sharded with FSDP2's
`fully_shard` (gloo, CPU), in a hand-written loop of SGD steps with two accumulation calls each, for SAM,
Friendly-SAM and Momentum-SAM (the perturbation reads the optimizer's sharded momentum: SGD's `momentum_buffer`,
and Adam's `exp_avg` in "momentum-adam", which also steps with Adam).

Each rank saves its batches, the full weights it starts and ends with, and what it checked on its own shards:
restored bitwise after every call, and `.grad` holding the sum of the calls' contributions.
"""

import sys

import torch
import torch.distributed as dist
from reference import MLP, host_syncs
from torch.distributed.fsdp import fully_shard

from hf_msam import FriendlyPerturbation, MicroBatchSAM, MomentumPerturbation

MOMENTUM = 0.9  # of SGD, for Momentum-SAM
ADAM = dict(lr=0.05, betas=(0.9, 0.999), eps=1e-8)  # "momentum-adam"


def run(method, steps=2, accumulation=2, batch_size=4, micro_batch_size=3, rho=0.2, lr=0.5):
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = MLP().double()
    initial = [p.detach().clone() for p in model.parameters()]
    fully_shard(model.fc1)
    fully_shard(model.fc2)
    fully_shard(model)
    rule = None  # SAM
    if method == "fsam":
        rule = FriendlyPerturbation(rho=rho, sigma=0.8, lmbda=0.6)
    elif method.startswith("momentum"):
        rule = MomentumPerturbation(rho=rho)
    if method == "momentum-adam":
        optimizer = torch.optim.Adam(model.parameters(), foreach=False, **ADAM)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=MOMENTUM if method == "momentum" else 0.0)
    sam = MicroBatchSAM(model, rho=rho, micro_batch_size=micro_batch_size, perturbation=rule, optimizer=optimizer)
    gen = torch.Generator().manual_seed(100 + rank)  # each rank its own data
    batches, restored, accumulated, syncs = [], [], [], []
    for step in range(steps):
        for i in range(accumulation):
            batch = {"x": torch.randn(batch_size, 6, generator=gen, dtype=torch.float64),
                     "labels": torch.randint(0, 3, (batch_size,), generator=gen)}
            batches.append(batch)
            shards = [p.to_local().detach().clone() for p in model.parameters()]
            before = [None if p.grad is None else p.grad.to_local().clone() for p in model.parameters()]
            # As accelerate's no_sync does for all but the last accumulation step: the engine must reduce anyway.
            model.set_requires_gradient_sync(i == accumulation - 1)
            with host_syncs(syncs):
                sam.backward(batch, lambda mb: model(**mb)["loss"] / accumulation, step=step)
            model.set_requires_gradient_sync(True)
            restored.append(all(torch.equal(p.to_local(), s) for p, s in zip(model.parameters(), shards)))
            accumulated.append((before, [p.grad.to_local().clone() for p in model.parameters()]))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    final = [p.full_tensor().detach().clone() for p in model.parameters()]
    return {"initial": initial, "batches": batches, "final": final, "restored": restored, "accumulated": accumulated,
            "world_size": dist.get_world_size(), "sync": sam.sync_perturbation,
            "host_syncs": syncs}


def main(out_dir):
    dist.init_process_group("gloo")
    methods = ("sam", "fsam", "momentum", "momentum-adam")
    results = {method: run(method, steps=3 if method.startswith("momentum") else 2) for method in methods}
    torch.save(results, f"{out_dir}/rank{dist.get_rank()}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
