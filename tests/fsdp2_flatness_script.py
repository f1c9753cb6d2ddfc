"""Run by test_fsdp2.py under `torchrun --nproc_per_node 2`: hf_msam.flatness on an MLP sharded with FSDP2's
`fully_shard` (gloo, CPU, float64), each rank with its own batches. Each rank saves the numbers, its batches, the
full weights, and whether its shards and `.grad` came back bitwise after each measure."""

import sys

import torch
import torch.distributed as dist
from reference import MLP
from torch.distributed.fsdp import fully_shard

from hf_msam.flatness import hessian_top_eigenvalue, hessian_trace, sharpness

MEASURES = {
    "top_eigenvalue": lambda m, b: hessian_top_eigenvalue(m, b, iters=200, tol=1e-12, seed=3, progress_bar=False),
    "trace": lambda m, b: hessian_trace(m, b, samples=4, seed=5, progress_bar=False),
    "sharpness": lambda m, b: sharpness(m, b, rho=0.2, micro_batch_size=2, progress_bar=False),
    "asam_sharpness": lambda m, b: sharpness(m, b, rho=0.5, micro_batch_size=2, adaptive=True, progress_bar=False),
}


def main(out_dir):
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = MLP().double()
    initial = [p.detach().clone() for p in model.parameters()]
    fully_shard(model.fc1)
    fully_shard(model.fc2)
    fully_shard(model)
    gen = torch.Generator().manual_seed(200 + rank)  # each rank its own data: two batches of 4
    batches = [{"x": torch.randn(4, 6, generator=gen, dtype=torch.float64), "labels": torch.randint(0, 3, (4,), generator=gen)}
               for _ in range(2)]
    for p in model.parameters():  # gradients accumulated so far, which the measures must leave alone
        p.grad = torch.full_like(p, 0.25)
    results, restored = {}, {}
    for name, measure in MEASURES.items():
        shards = [p.to_local().detach().clone() for p in model.parameters()]
        grads = [p.grad.to_local().clone() for p in model.parameters()]
        results[name] = measure(model, batches)
        restored[name] = all(torch.equal(p.to_local(), s) for p, s in zip(model.parameters(), shards)) and all(
            torch.equal(p.grad.to_local(), g) for p, g in zip(model.parameters(), grads))
    torch.save({"initial": initial, "batches": batches, "results": results, "restored": restored},
               f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
