"""What mSAM costs over SAM where users train: `MSAMTrainer` steps timed from `on_step_begin` to `on_step_end`.

For each model (BERT, GPT-2, Llama, ViT, Llama with LoRA adapters), SAM (one perturbation for the batch) and mSAM
with k micro-batches (default k = 8: batch 32 in micro-batches of 4) run with the default `--msam_vectorize auto`
and SGD, each in a fresh trainer. A round trains every (model, method) for --steps steps and keeps the median step
after --warmup; rounds alternate the order of the methods, and each figure is the best of --rounds rounds (a shared
machine's noise is about ±0.2 in the ratio with one round). The ratio is mSAM's best median over SAM's.

    python benchmarks/trainer_cost.py --lockstep               # SAM and mSAM step by step in turn (pip install greenlet)
    python benchmarks/trainer_cost.py                          # the small size: hidden 64, 2 layers, sequence 16
    python benchmarks/trainer_cost.py --size medium            # hidden 256, 4 layers, sequence 64
    python benchmarks/trainer_cost.py --models bert vit --rounds 3 --steps 20
    python benchmarks/trainer_cost.py --base 8bda81e           # before/after: a worktree of that revision, same run

With --base, two worker processes import hf_msam from the base revision's worktree and from this tree, and the
rounds alternate between them as between the methods (A B, B A, ...), so both revisions see the same machine.
With --lockstep (CPU), each round trains SAM and mSAM at once on one thread, a step of each in turn, and the ratio is
the median of mSAM's step i over SAM's step i: the measurement to trust on a machine that drifts over minutes (see
`measure_lockstep`). Prints a JSON object and a table; --json also writes the JSON to a file. Targets (issue 31):
mSAM(8) at most 1.3x SAM at the small size, at most 1.15x at the medium size.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SIZES = {
    # hidden, layers, sequence (ViT: patches), heads
    "small": dict(hidden=64, layers=2, seq=16, heads=4),
    "medium": dict(hidden=256, layers=4, seq=64, heads=4),
    "overhead": dict(hidden=8, layers=2, seq=4, heads=2),  # next to no arithmetic: what is left is fixed cost
}
TARGETS = {"small": 1.3, "medium": 1.15}
MODELS = ["bert", "gpt2", "llama", "vit", "lora-llama"]
VOCAB = 1000
RHO = 0.05
MARK = "trainer_cost:"  # the workers' answers, among whatever else they print


# ------------------------------------------------------------------------------------------------
# One measurement (runs in a worker)
# ------------------------------------------------------------------------------------------------


def build(model: str, size: dict):
    import torch
    from transformers import (BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                              LlamaForCausalLM, ViTConfig, ViTForImageClassification)  # fmt: skip

    torch.manual_seed(0)
    h, n, s, heads = size["hidden"], size["layers"], size["seq"], size["heads"]
    if model == "bert":
        config = BertConfig(vocab_size=VOCAB, hidden_size=h, num_hidden_layers=n, num_attention_heads=heads,
                            intermediate_size=4 * h, max_position_embeddings=s, num_labels=2,
                            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # fmt: skip
        return BertForSequenceClassification(config)
    if model == "gpt2":
        config = GPT2Config(vocab_size=VOCAB, n_embd=h, n_layer=n, n_head=heads, n_positions=s,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
        return GPT2LMHeadModel(config)
    if model in ("llama", "lora-llama"):
        config = LlamaConfig(vocab_size=VOCAB, hidden_size=h, num_hidden_layers=n, num_attention_heads=heads,
                             num_key_value_heads=heads, intermediate_size=4 * h, max_position_embeddings=s)  # fmt: skip
        llama = LlamaForCausalLM(config)
        if model == "llama":
            return llama
        from peft import LoraConfig, get_peft_model

        return get_peft_model(llama, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))
    if model == "vit":
        patch = 4
        side = patch * int(round(s**0.5))  # s patches
        config = ViTConfig(image_size=side, patch_size=patch, num_channels=3, hidden_size=h, num_hidden_layers=n,
                           num_attention_heads=heads, intermediate_size=4 * h, num_labels=10,
                           hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # fmt: skip
        return ViTForImageClassification(config)
    raise ValueError(f"unknown model {model!r}; choose from {MODELS}")


def examples(model: str, size: dict, n: int) -> list[dict]:
    import torch

    generator = torch.Generator().manual_seed(1)
    s = size["seq"]
    if model == "vit":
        side = 4 * int(round(s**0.5))
        pixels = torch.randn(n, 3, side, side, generator=generator)
        labels = torch.randint(0, 10, (n,), generator=generator)
        return [{"pixel_values": pixels[i], "labels": labels[i]} for i in range(n)]
    ids = torch.randint(0, VOCAB, (n, s), generator=generator)
    if model == "bert":
        labels = torch.randint(0, 2, (n,), generator=generator)
        return [{"input_ids": ids[i], "labels": labels[i]} for i in range(n)]
    return [{"input_ids": ids[i], "labels": ids[i]} for i in range(n)]


def measure(model: str, size_name: str, micro_batch_size: int | None, opts: dict) -> dict:
    """A fresh MSAMTrainer trains `steps + warmup` steps; the median step (after warmup) and the path it took."""
    import torch
    from transformers import TrainerCallback

    from hf_msam import MSAMTrainer, MSAMTrainingArguments

    size = SIZES[size_name]
    times: list[float] = []
    clock = time.thread_time if opts.get("clock") == "thread" else time.perf_counter

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if torch.cuda.is_available() and opts.get("device") == "cuda":
                torch.cuda.synchronize()
            self.t0 = clock()

        def on_step_end(self, args, state, control, **kwargs):
            if torch.cuda.is_available() and opts.get("device") == "cuda":
                torch.cuda.synchronize()
            times.append(clock() - self.t0)

    steps = opts["warmup"] + opts["steps"]
    cuda = opts.get("device") == "cuda" and torch.cuda.is_available()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory(prefix="trainer_cost_") as out:
        args = MSAMTrainingArguments(
            output_dir=out, per_device_train_batch_size=opts["batch_size"], max_steps=steps, optim="sgd",
            learning_rate=1e-3, logging_strategy="no", save_strategy="no", report_to="none", disable_tqdm=True,
            use_cpu=opts.get("device", "cpu") == "cpu", bf16=opts.get("bf16", False), seed=0, msam_rho=RHO,
            msam_micro_batch_size=micro_batch_size,
        )  # fmt: skip
        trainer = MSAMTrainer(model=build(model, size), args=args, callbacks=[Clock()],
                              train_dataset=examples(model, size, steps * opts["batch_size"]))  # fmt: skip
        trainer.train()
    path = getattr(trainer, "msam_path", None)
    del trainer
    return {"median_s": statistics.median(times[opts["warmup"] :]), "path": None if path is None else str(path),
            "threads": torch.get_num_threads(), "peak_bytes": torch.cuda.max_memory_allocated() if cuda else None}


def measure_lockstep(model: str, size_name: str, micro_batch_sizes: dict, opts: dict) -> dict:
    """--lockstep: one fresh MSAMTrainer per method, all trained at once on this thread, taking their steps in turn.

    Each trainer's `train()` runs in a greenlet (a coroutine on the same OS thread: one pool of torch threads, as
    in one training run) that hands control back at the start of every step; a round-robin resumes them one after
    another, so step i of every method runs within a few hundred milliseconds of the others and the ratio of two
    methods' step i cancels a shared machine's drift, which is minutes long. Returns each method's step times
    after the warmup, in order."""
    try:
        import greenlet
    except ImportError as err:
        raise SystemExit("--lockstep needs the greenlet package: pip install greenlet") from err
    import torch
    from transformers import TrainerCallback

    from hf_msam import MSAMTrainer, MSAMTrainingArguments

    size = SIZES[size_name]
    clock = time.thread_time if opts.get("clock") == "thread" else time.perf_counter
    scheduler = greenlet.getcurrent()
    times: dict[str, list[float]] = {name: [] for name in micro_batch_sizes}

    class Turn(TrainerCallback):
        def __init__(self, name):
            self.name = name

        def on_step_begin(self, args, state, control, **kwargs):
            scheduler.switch()  # the other methods take their step; this one's clock starts when it is resumed
            self.t0 = clock()

        def on_step_end(self, args, state, control, **kwargs):
            times[self.name].append(clock() - self.t0)

    steps = opts["warmup"] + opts["steps"]
    trainers = {}
    with tempfile.TemporaryDirectory(prefix="trainer_cost_") as out:
        for name, micro in micro_batch_sizes.items():
            args = MSAMTrainingArguments(
                output_dir=f"{out}/{name}", per_device_train_batch_size=opts["batch_size"], max_steps=steps,
                optim="sgd", learning_rate=1e-3, logging_strategy="no", save_strategy="no", report_to="none",
                disable_tqdm=True, use_cpu=True, seed=0, msam_rho=RHO, msam_micro_batch_size=micro,
            )  # fmt: skip
            trainers[name] = MSAMTrainer(model=build(model, size), args=args, callbacks=[Turn(name)],
                                         train_dataset=examples(model, size, steps * opts["batch_size"]))  # fmt: skip
        runs = {name: greenlet.greenlet(trainer.train) for name, trainer in trainers.items()}
        while any(not run.dead for run in runs.values()):
            for run in runs.values():
                if not run.dead:
                    run.switch()  # an exception in a trainer comes out here
    return {
        "times_s": {name: t[opts["warmup"] :] for name, t in times.items()},
        "path": {name: None if t.msam_path is None else str(t.msam_path) for name, t in trainers.items()},
        "threads": torch.get_num_threads(),
    }


def worker() -> None:
    """Answers one JSON request per line on stdin (model, size, micro_batch_size, opts) with one JSON line."""
    import torch

    torch.set_num_threads(int(os.environ.get("TRAINER_COST_THREADS", torch.get_num_threads())))
    import hf_msam

    print(MARK, json.dumps({"ready": True, "hf_msam": str(Path(hf_msam.__file__).parent)}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        if request.get("lockstep"):
            answer = measure_lockstep(request["model"], request["size"], request["micro_batch_sizes"], request["opts"])
            print(MARK, json.dumps(answer), flush=True)
            continue
        answer = measure(request["model"], request["size"], request["micro_batch_size"], request["opts"])
        print(MARK, json.dumps(answer), flush=True)


class Worker:
    def __init__(self, tree: Path, threads: int):
        env = {**os.environ, "PYTHONPATH": str(tree), "TRAINER_COST_THREADS": str(threads),
               "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
        self.process = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker"], cwd=tree, env=env,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
        self.where = self._answer()["hf_msam"]

    def _answer(self) -> dict:
        """The worker's next answer; what else it prints (the Trainer's summary) goes to stderr."""
        while True:
            line = self.process.stdout.readline()
            if not line:
                raise RuntimeError("a worker stopped (see its output above)")
            if line.startswith(MARK):
                return json.loads(line[len(MARK) :])
            print(line, end="", file=sys.stderr)

    def measure(self, **request) -> dict:
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        return self._answer()

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()


# ------------------------------------------------------------------------------------------------
# The rounds
# ------------------------------------------------------------------------------------------------


def run(opts: argparse.Namespace) -> dict:
    micro = opts.batch_size // opts.k
    methods = {"sam": None, f"msam{opts.k}": micro}
    request_opts = {"steps": opts.steps, "warmup": opts.warmup, "batch_size": opts.batch_size, "device": opts.device,
                    "bf16": opts.bf16, "clock": opts.clock}
    revisions: dict[str, Path] = {"head": ROOT}
    tmp = None
    if opts.base:
        tmp = tempfile.TemporaryDirectory(prefix="trainer_cost_base_")
        base_tree = Path(tmp.name) / "base"
        subprocess.run(["git", "worktree", "add", "--detach", str(base_tree), opts.base], cwd=ROOT, check=True,
                       stdout=subprocess.DEVNULL)  # fmt: skip
        revisions = {"base": base_tree, "head": ROOT}
    workers = {name: Worker(tree, opts.threads) for name, tree in revisions.items()}
    medians: dict[tuple, list[float]] = {}
    paths: dict[tuple, str | None] = {}
    peaks: dict[tuple, int | None] = {}
    started = time.perf_counter()
    try:
        if opts.lockstep:
            return lockstep_rounds(opts, methods, revisions, workers, request_opts, started)
        for r in range(opts.rounds):
            order = [(rev, m) for rev in revisions for m in methods]
            if r % 2:
                order.reverse()
            for model in opts.models:
                for rev, method in order:
                    result = workers[rev].measure(model=model, size=opts.size, micro_batch_size=methods[method],
                                                  opts=request_opts)  # fmt: skip
                    medians.setdefault((rev, model, method), []).append(result["median_s"])
                    paths[(rev, model, method)] = result["path"]
                    peaks[(rev, model, method)] = result.get("peak_bytes")
            print(f"round {r + 1}/{opts.rounds} done ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    finally:
        for w in workers.values():
            w.close()
        if tmp is not None:
            subprocess.run(["git", "worktree", "remove", "--force", str(base_tree)], cwd=ROOT, check=False)
            tmp.cleanup()
    rows = []
    for model in opts.models:
        for rev in revisions:
            best = {m: min(medians[(rev, model, m)]) for m in methods}
            sam, msam = best["sam"], best[f"msam{opts.k}"]
            rows.append({
                "model": model, "revision": rev, "sam_ms": 1000 * sam, f"msam{opts.k}_ms": 1000 * msam,
                "ratio": msam / sam, "target": TARGETS.get(opts.size), "meets": msam / sam <= TARGETS.get(opts.size, 9e9),
                "path": paths[(rev, model, f"msam{opts.k}")],
                "rounds_ms": {m: [round(1000 * t, 2) for t in medians[(rev, model, m)]] for m in methods},
                "peak_bytes": {m: peaks[(rev, model, m)] for m in methods},  # CUDA only
            })  # fmt: skip
    return summary(opts, rows, started)


def lockstep_rounds(opts, methods: dict, revisions: dict, workers: dict, request_opts: dict, started: float) -> dict:
    """--lockstep: each round trains SAM and mSAM at once in each revision's worker, a step of each in turn (the
    order alternating between rounds); the ratio is the median over all rounds' steps of mSAM's step i over SAM's
    step i, and each round's own median is kept (`rounds_ratio`) to show the spread."""
    msam = f"msam{opts.k}"
    steps: dict[tuple, dict[str, list[list[float]]]] = {}
    paths: dict[tuple, str | None] = {}
    for r in range(opts.rounds):
        order = list(methods)[:: 1 if r % 2 == 0 else -1]
        for model in opts.models:
            for rev in list(revisions)[:: 1 if r % 2 == 0 else -1]:
                result = workers[rev].measure(lockstep=True, model=model, size=opts.size, opts=request_opts,
                                              micro_batch_sizes={m: methods[m] for m in order})  # fmt: skip
                for m in methods:
                    steps.setdefault((rev, model), {}).setdefault(m, []).append(result["times_s"][m])
                paths[(rev, model)] = result["path"][msam]
        print(f"round {r + 1}/{opts.rounds} done ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    rows = []
    for model in opts.models:
        for rev in revisions:
            sam_rounds, msam_rounds = steps[(rev, model)]["sam"], steps[(rev, model)][msam]
            per_round = [[b / a for a, b in zip(sam, ms)] for sam, ms in zip(sam_rounds, msam_rounds)]
            ratio = statistics.median([x for one in per_round for x in one])
            rows.append({
                "model": model, "revision": rev, "ratio": ratio,
                "sam_ms": 1000 * statistics.median([t for one in sam_rounds for t in one]),
                f"{msam}_ms": 1000 * statistics.median([t for one in msam_rounds for t in one]),
                "target": TARGETS.get(opts.size), "meets": ratio <= TARGETS.get(opts.size, 9e9),
                "path": paths[(rev, model)], "rounds_ratio": [round(statistics.median(one), 3) for one in per_round],
            })  # fmt: skip
    return summary(opts, rows, started)


def summary(opts, rows: list[dict], started: float) -> dict:
    import torch
    import transformers

    return {
        "size": opts.size, **SIZES[opts.size], "device": opts.device, "bf16": opts.bf16, "batch_size": opts.batch_size,
        "k": opts.k, "steps": opts.steps, "clock": opts.clock, "lockstep": opts.lockstep,
        "warmup": opts.warmup, "rounds": opts.rounds, "threads": opts.threads, "base": opts.base,
        "torch": torch.__version__, "transformers": transformers.__version__, "rows": rows,
        "wall_s": round(time.perf_counter() - started, 1),
    }  # fmt: skip


def table(result: dict) -> str:
    k = result["k"]
    lines = [f"| model | revision | SAM ms | mSAM({k}) ms | ratio | target | path |", "|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        path = (row["path"] or "").split(" (")[0]
        mark = "" if row["meets"] else " ✗"
        lines.append(f"| {row['model']} | {row['revision']} | {row['sam_ms']:.1f} | {row[f'msam{k}_ms']:.1f} | "
                     f"{row['ratio']:.2f}{mark} | ≤ {row['target']} | {path} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    if argv is None and sys.argv[1:] == ["--worker"]:
        return worker()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    parser.add_argument("--size", choices=list(SIZES), default="small")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--k", type=int, default=8, help="micro-batches per batch (micro-batch size = batch / k)")
    parser.add_argument("--steps", type=int, default=30, help="steps per round (the median is taken after --warmup)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds; each figure is the best round's")
    parser.add_argument("--threads", type=int, default=2, help="torch threads in the workers")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="cuda: the first GPU (the Trainer's own choice); the step is timed after a synchronization")
    parser.add_argument("--bf16", action="store_true", help="the Trainer's --bf16 (autocast)")
    parser.add_argument("--base", help="also measure this revision (a git worktree of it), rounds alternating")
    parser.add_argument("--clock", choices=["wall", "thread"], default="wall",
                        help="wall: elapsed time (the issue's protocol); thread: the CPU time of the training thread "
                        "(with --threads 1 only), which other processes and a virtual machine's stolen time do not "
                        "enter: the work itself, steady where the wall clock of a shared machine is not")  # fmt: skip
    parser.add_argument("--lockstep", action="store_true",
                        help="train SAM and mSAM at once, a step of each in turn on one thread (greenlets: pip "
                        "install greenlet), and take the median of the per-step ratios: a shared machine's drift "
                        "cancels (CPU only)")  # fmt: skip
    parser.add_argument("--json", help="also write the JSON result to this path")
    opts = parser.parse_args(argv)
    if opts.lockstep and opts.device != "cpu":
        parser.error("--lockstep is for the CPU (a GPU does not drift like a shared CPU): leave it out with --device cuda")
    if opts.clock == "thread" and (opts.threads != 1 or opts.device != "cpu"):
        parser.error("--clock thread counts the training thread's CPU time alone: use it with --threads 1 on the CPU")
    result = run(opts)
    print(json.dumps(result, indent=1))
    print(table(result))
    if opts.json:
        Path(opts.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
