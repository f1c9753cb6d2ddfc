"""Step time of MSAM-SFT against plain TRL SFT on a small causal LM (CPU or GPU).

    python benchmarks/trl_step_time.py --steps 12 --batch 8 --micro_batch 2

Builds a Llama from a config (random weights, no download), random token data, and times optimizer steps
(median over the steps after the first `--warmup`) of: plain `SFTTrainer`, `MSAMSFTTrainer` with `msam_rho=0`
(must cost the same), `MSAMSFTTrainer` with SAM (one micro-batch: two passes, the floor of any (m)SAM step) and
with mSAM (`--micro_batch` sequences per perturbation).
Prints one line per run and the ratios, with the load average (the CPU may be shared).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, TrainerCallback
from trl import SFTConfig, SFTTrainer

from hf_msam.trl import MSAMSFTConfig, MSAMSFTTrainer


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


def tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    words = ["<pad>", "<eos>", "<unk>"] + [f"w{i}" for i in range(vocab_size - 3)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--micro_batch", type=int, default=2)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=2000)
    args = parser.parse_args()

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 64), num_key_value_heads=max(1, args.hidden // 64),
        max_position_embeddings=args.seq_len + 8, pad_token_id=0, eos_token_id=1,
    )  # fmt: skip
    initial = LlamaForCausalLM(config).state_dict()
    params = sum(t.numel() for t in initial.values())
    g = torch.Generator().manual_seed(0)
    n = args.batch * (args.steps + args.warmup)
    rows = []
    for _ in range(n):
        length = int(torch.randint(args.seq_len // 2, args.seq_len, (1,), generator=g))
        ids = torch.randint(3, args.vocab, (length,), generator=g).tolist()
        cut = length // 3
        rows.append({"prompt": " ".join(f"w{i - 3}" for i in ids[:cut]), "completion": " " + " ".join(f"w{i - 3}" for i in ids[cut:])})
    data = Dataset.from_list(rows)
    tok = tokenizer(args.vocab)
    common = dict(
        per_device_train_batch_size=args.batch, max_steps=args.steps + args.warmup, learning_rate=1e-4, bf16=False,
        report_to="none", save_strategy="no", logging_steps=1000, disable_tqdm=True, max_length=args.seq_len + 4,
        use_cpu=not torch.cuda.is_available(), train_sampling_strategy="sequential",
    )  # fmt: skip
    runs = {
        "plain SFTTrainer": (SFTTrainer, SFTConfig, {}),
        "MSAMSFTTrainer rho=0": (MSAMSFTTrainer, MSAMSFTConfig, {"msam_rho": 0.0}),
        "MSAMSFTTrainer rho=0.05 (SAM, 1 micro-batch)": (MSAMSFTTrainer, MSAMSFTConfig, {"msam_rho": 0.05}),
        f"MSAMSFTTrainer rho=0.05 mbs={args.micro_batch}": (
            MSAMSFTTrainer, MSAMSFTConfig, {"msam_rho": 0.05, "msam_micro_batch_size": args.micro_batch}),
    }  # fmt: skip
    print(f"Llama {params / 1e6:.1f}M parameters, batch {args.batch} x up to {args.seq_len} tokens, "
          f"device {'cuda' if torch.cuda.is_available() else 'cpu'}, torch threads {torch.get_num_threads()}")  # fmt: skip
    medians = {}
    with tempfile.TemporaryDirectory() as out:
        for name, (trainer_cls, config_cls, extra) in runs.items():
            model = LlamaForCausalLM(config)
            model.load_state_dict(initial)
            timer = StepTimer()
            load_before = os.getloadavg()[0]
            trainer = trainer_cls(model=model, args=config_cls(out, **common, **extra), train_dataset=data,
                                  processing_class=tok, callbacks=[timer])  # fmt: skip
            trainer.train()
            medians[name] = statistics.median(timer.times[args.warmup :])
            print(f"{name:46s} median step {medians[name]:.3f} s  (load average {load_before:.2f} -> {os.getloadavg()[0]:.2f})")
    base = medians["plain SFTTrainer"]
    for name, t in medians.items():
        print(f"ratio {name:46s} {t / base:.2f}x")


if __name__ == "__main__":
    main()
