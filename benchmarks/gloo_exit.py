"""Do two-process CPU runs (gloo) exit 0? torch 2.14 with gloo sometimes aborts at interpreter exit, after the run
finished ("terminate called without an active exception", SIGABRT; upstream pytorch issue 190489), unless the
process group is torn down first (`torch.distributed.destroy_process_group()`), which hf-msam's launcher, examples
and two-process test scripts now do.

    python benchmarks/gloo_exit.py --runs 50                  # both modes: with the teardown, then without
    python benchmarks/gloo_exit.py --runs 20 --mode no-teardown --json out.json

Each run is `torchrun --nproc_per_node 2` of a tiny `MSAMTrainer` script (2 steps of mSAM on a linear regression,
`--use_cpu`, gloo, a checkpoint written at the end); the script ends with `hf_msam.launcher.end_process_group()`
(a barrier, then `destroy_process_group()`) unless the mode is `no-teardown`.
Prints one JSON object (exit codes per mode, counts, aborts seen in stderr) and a table.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORKER = '''
import sys

import torch
from torch import nn

from hf_msam import MSAMTrainer, MSAMTrainingArguments
from hf_msam.launcher import end_process_group


class Regressor(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 1)

    def forward(self, x, labels=None):
        out = self.linear(x).squeeze(-1)
        return {"loss": nn.functional.mse_loss(out, labels), "logits": out}


out_dir, teardown = sys.argv[1], sys.argv[2] == "teardown"
args = MSAMTrainingArguments(
    output_dir=out_dir, max_steps=2, per_device_train_batch_size=4, use_cpu=True, report_to="none",
    save_strategy="steps", save_steps=2, disable_tqdm=True, log_level="error", msam_rho=0.05, msam_micro_batch_size=2,
)  # a checkpoint at the end, as a user's run writes one
torch.manual_seed(0)
x = torch.randn(16, 4)
MSAMTrainer(model=Regressor(), args=args, train_dataset=[{"x": a, "labels": b} for a, b in zip(x, x.sum(-1))]).train()
if teardown:
    end_process_group()
'''

ABORT = "terminate called without an active exception"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_run(worker: Path, out_dir: Path, mode: str, timeout: float) -> dict:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
        str(worker), str(out_dir), mode,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCHELASTIC_ERROR_FILE": ""}
    started = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        code, stderr = proc.returncode, proc.stderr
    except subprocess.TimeoutExpired as error:
        code, stderr = "timeout", (error.stderr or b"").decode(errors="replace") if isinstance(error.stderr, bytes) else str(error.stderr or "")
    return {"exit_code": code, "abort_message": ABORT in stderr, "seconds": round(time.perf_counter() - started, 1),
            "stderr_tail": stderr[-400:] if code != 0 else ""}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=50, help="two-process runs per mode (default 50)")
    parser.add_argument("--mode", choices=["both", "teardown", "no-teardown"], default="both",
                        help="with the process group torn down at the end, without (the abort's setting), or both")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per run before it counts as hung")
    parser.add_argument("--json", help="also write the JSON here")
    args = parser.parse_args(argv)
    modes = ["teardown", "no-teardown"] if args.mode == "both" else [args.mode]
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        worker = Path(tmp) / "gloo_exit_worker.py"
        worker.write_text(WORKER, encoding="utf-8")
        for mode in modes:
            results[mode] = []
            for i in range(args.runs):
                results[mode].append(one_run(worker, Path(tmp) / f"{mode}-{i}", mode, args.timeout))
                print(f"{mode} run {i + 1}/{args.runs}: exit {results[mode][-1]['exit_code']}", file=sys.stderr, flush=True)
    import torch

    summary = {
        "torch": torch.__version__,
        "runs_per_mode": args.runs,
        "modes": {
            mode: {
                "exit_codes": dict(collections.Counter(str(r["exit_code"]) for r in runs)),
                "exited_0": sum(r["exit_code"] == 0 for r in runs),
                "abort_message_seen": sum(r["abort_message"] for r in runs),
                "mean_seconds": round(sum(r["seconds"] for r in runs) / max(len(runs), 1), 1),
                "failures": [r for r in runs if r["exit_code"] != 0][:3],
            }
            for mode, runs in results.items()
        },
    }
    print(json.dumps(summary, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2), encoding="utf-8")
    print("\n| mode | runs | exit 0 | other exit codes | 'terminate called' seen | mean s/run |")
    print("|---|---:|---:|---|---:|---:|")
    for mode, s in summary["modes"].items():
        others = ", ".join(f"{code}: {n}" for code, n in s["exit_codes"].items() if code != "0") or "none"
        print(f"| {mode} | {args.runs} | {s['exited_0']} | {others} | {s['abort_message_seen']} | {s['mean_seconds']} |")
    return 0 if all(s["exited_0"] == args.runs for mode, s in summary["modes"].items() if mode == "teardown") else 1


if __name__ == "__main__":
    sys.exit(main())
