"""Step time and peak memory of MSAM-SFT and MSAM-DPO against plain TRL on a small causal LM (CPU or GPU).

    python benchmarks/trl_step_time.py --trainer sft --steps 12 --batch 8 --micro_batch 2
    python benchmarks/trl_step_time.py --trainer both --json trl.json   # SFT and DPO

Builds a Llama from a config (random weights, no download), random token data, and times optimizer steps (median over
the steps after the first `--warmup`, from `on_step_begin` to `on_step_end`) of, for each trainer:

    plain                   TRL's SFTTrainer / DPOTrainer (TRL's defaults: the fused LM head)
    rho=0                   the MSAM trainer without perturbation: must cost what plain costs
    SAM                     one micro-batch per device: two passes, the floor of any (m)SAM step
    mSAM sequential         --micro_batch rows (DPO: pairs) per perturbation, one pass per micro-batch
    mSAM vectorized         the same micro-batches, every one in one forward and one backward per pass
    logits-SAM              --msam_method logits_sam on the same micro-batches: the output layer perturbed per
                            micro-batch, the body run once per step (its default vectorized form)

Each configuration runs in a fresh process (its own peak memory: on CUDA `max_memory_allocated`, on CPU the peak
resident set size, which also counts the interpreter and libraries, the same in every process). Prints a table and
JSON (and writes it with --json), with the load average (the CPU may be shared).
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing
import os
import resource
import statistics
import tempfile
import time

import torch

ROWS = {
    "plain": {},
    "rho=0": {"msam_rho": 0.0},
    "SAM": {"msam_rho": 0.05},
    "mSAM sequential": {"msam_rho": 0.05, "msam_vectorize": "off"},
    "mSAM vectorized": {"msam_rho": 0.05, "msam_vectorize": "on"},
    "logits-SAM": {"msam_rho": 0.05, "msam_method": "logits_sam"},
}


def tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<eos>", "<unk>"] + [f"w{i}" for i in range(vocab_size - 3)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def dataset(kind: str, n: int, seq_len: int, vocab: int):
    from datasets import Dataset

    g = torch.Generator().manual_seed(0)

    def words(length: int) -> str:
        return " ".join(f"w{int(i) - 3}" for i in torch.randint(3, vocab, (length,), generator=g))

    rows = []
    for _ in range(n):
        length = int(torch.randint(seq_len // 2, seq_len, (1,), generator=g))
        cut = length // 3
        if kind == "sft":
            rows.append({"prompt": words(cut), "completion": " " + words(length - cut)})
        else:
            rows.append({"prompt": words(cut), "chosen": " " + words(length - cut), "rejected": " " + words(length - cut)})
    return Dataset.from_list(rows)


def run_one(kind: str, row: str, opts: argparse.Namespace, queue) -> None:
    """One configuration, in its own process: puts (median step seconds, peak bytes, path) on `queue`."""
    from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    from hf_msam.trl import MSAMDPOConfig, MSAMDPOTrainer, MSAMSFTConfig, MSAMSFTTrainer

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self._start = [], None

        def on_step_begin(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self._start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self._start)

    torch.set_num_threads(opts.threads)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=opts.vocab, hidden_size=opts.hidden, intermediate_size=4 * opts.hidden, num_hidden_layers=opts.layers,
        num_attention_heads=max(1, opts.hidden // 64), num_key_value_heads=max(1, opts.hidden // 64),
        max_position_embeddings=2 * opts.seq_len + 8, pad_token_id=0, eos_token_id=1,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    extra = dict(ROWS[row])
    if row.startswith(("mSAM", "logits-SAM")):
        extra["msam_micro_batch_size"] = opts.micro_batch
    common = dict(
        per_device_train_batch_size=opts.batch, max_steps=opts.steps + opts.warmup, learning_rate=1e-4, bf16=False,
        report_to="none", save_strategy="no", logging_steps=1000, disable_tqdm=True, max_length=2 * opts.seq_len + 4,
        use_cpu=not torch.cuda.is_available(), train_sampling_strategy="sequential",
    )  # fmt: skip
    plain = row == "plain"
    if kind == "sft":
        trainer_cls, config_cls = (SFTTrainer, SFTConfig) if plain else (MSAMSFTTrainer, MSAMSFTConfig)
    else:
        trainer_cls, config_cls = (DPOTrainer, DPOConfig) if plain else (MSAMDPOTrainer, MSAMDPOConfig)
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as out:
        # DPO's reference: a frozen copy (without one TRL would load it from the model's name, which has none)
        reference = {} if kind == "sft" else {"ref_model": copy.deepcopy(model)}
        trainer = trainer_cls(model=model, args=config_cls(out, **common, **extra), **reference,
                              train_dataset=dataset(kind, opts.batch * (opts.steps + opts.warmup), opts.seq_len, opts.vocab),
                              processing_class=tokenizer(opts.vocab), callbacks=[timer])  # fmt: skip
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        trainer.train()
    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    engine = getattr(trainer, "_msam", None)
    queue.put((statistics.median(timer.times[opts.warmup :]), peak, None if engine is None else engine.path))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trainer", choices=["sft", "dpo", "both"], default="sft")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8, help="rows per device (DPO: preference pairs)")
    parser.add_argument("--micro_batch", type=int, default=2, help="rows (DPO: pairs) per perturbation")
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    parser.add_argument("--json", help="also write the JSON result to this path")
    opts = parser.parse_args()
    kinds = ["sft", "dpo"] if opts.trainer == "both" else [opts.trainer]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    context = multiprocessing.get_context("spawn")
    results = []
    for kind in kinds:
        for row in opts.rows:
            queue = context.Queue()
            load_before = os.getloadavg()[0]
            worker = context.Process(target=run_one, args=(kind, row, opts, queue))
            worker.start()
            while True:  # a worker that dies says so, instead of leaving this process waiting
                try:
                    median, peak, path = queue.get(timeout=5)
                    break
                except Exception:  # noqa: BLE001 (queue.Empty)
                    if not worker.is_alive():
                        raise RuntimeError(f"the {kind} {row!r} worker exited with code {worker.exitcode}") from None
            worker.join()
            results.append({"trainer": kind, "row": row, "median_s": median, "peak_memory_bytes": peak, "path": path,
                            "load_average_before_after": [load_before, os.getloadavg()[0]]})  # fmt: skip
            print(f"{kind} {row:18s} median step {median:.3f} s  peak {peak / 2**20:.0f} MB  path {path}", flush=True)
    for r in results:
        base = next(b for b in results if b["trainer"] == r["trainer"] and b["row"] == results[0]["row"])
        sam = next((b for b in results if b["trainer"] == r["trainer"] and b["row"] == "SAM"), None)
        r["vs_first_row"] = r["median_s"] / base["median_s"]
        r["vs_sam"] = None if sam is None else r["median_s"] / sam["median_s"]
    result = {"device": device, "torch": torch.__version__, "settings": vars(opts), "rows": results}
    print("\n| trainer | configuration | median step (s) | vs " + opts.rows[0] + " | vs SAM | peak memory (MB) | path |")
    print("|---|---|---:|---:|---:|---:|---|")
    for r in results:
        vs_sam = "" if r["vs_sam"] is None else f"{r['vs_sam']:.2f}"
        print(f"| {r['trainer']} | {r['row']} | {r['median_s']:.3f} | {r['vs_first_row']:.2f} | {vs_sam} "
              f"| {r['peak_memory_bytes'] / 2**20:.0f} | {r['path'] or ''} |")  # fmt: skip
    print(json.dumps(result))
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
