"""The LM study, extended (issue 32, item 3): (a) DPO of the pretrained tiny Llama on preference pairs built from the
drug-review corpus, for AdamW, SAM, mSAM(4) and logits-SAM(4), tracking chosen/rejected log-probabilities and
held-out preference accuracy; (b) full fine-tuning of the same model on a second domain (the Python language
reference text that ships with CPython, `pydoc_data.topics`), for AdamW, SAM, mSAM(4), late-phase mSAM(4) and
Functional-SAM(4), measuring forgetting on the pretraining validation set and int8/int4/int3 degradation with
`hf_msam.flatness.quantization_sensitivity`.

The pretrained model is task 1's AdamW seed-0 run of `run_lm_study.py` (same settings, same cache entry in
runs/lm/AdamW_s0; trained here if absent). Runs are cached in runs/dpo and runs/ft (a run's run.json is reused
when its settings match). `--publish DIR` writes ext_results.json, ext_report.md and the PNG plots there.
See README.md here (section "Extension").
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import run_lm_study as base  # noqa: E402  (data, model, cache, statistics of the existing study)

LN2 = math.log(2.0)

# name -> (msam kwargs, micro-batch size or None for the whole batch)
METHODS_DPO = {
    "AdamW": dict(msam_rho=0.0),
    "SAM": dict(msam_method="sam", k=1),
    "mSAM(4)": dict(msam_method="sam", k=4),
    "logits-SAM(4)": dict(msam_method="logits_sam", k=4),
}
METHODS_FT = {
    "AdamW": dict(msam_rho=0.0),
    "SAM": dict(msam_method="sam", k=1),
    "mSAM(4)": dict(msam_method="sam", k=4),
    "late mSAM(4)": dict(msam_method="sam", k=4, msam_start="LATE"),
    "Functional-SAM(4)": dict(msam_method="functional", k=4),
}


def msam_kwargs(spec: dict, batch: int, rho: float, late: float) -> dict:
    kw = {k: v for k, v in spec.items() if k != "k"}
    if kw.get("msam_rho") == 0.0:
        return {"msam_rho": 0.0, "msam_micro_batch_size": None}
    kw["msam_rho"] = rho
    kw["msam_micro_batch_size"] = batch // spec["k"]
    if kw.get("msam_start") == "LATE":
        kw["msam_start"] = late
    return kw


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


# ------------------------------------------------------------------------------------------------- data
def preference_pairs(reviews: list[str], n_prompt: int, n_cont: int, seed: int) -> list[dict]:
    """prompt: the first n_prompt words of a review; chosen: its next n_cont words; rejected: words
    n_prompt..n_prompt+n_cont of another review (a seeded derangement over the reviews long enough)."""
    words = [r.split() for r in reviews]
    words = [w for w in words if len(w) >= n_prompt + n_cont]
    order = list(range(len(words)))
    rng = random.Random(seed)
    rng.shuffle(order)
    other = {order[i]: order[(i + 1) % len(order)] for i in range(len(order))}  # never itself
    pairs = []
    for i, w in enumerate(words):
        o = words[other[i]]
        pairs.append({"prompt": " ".join(w[:n_prompt]),
                      "chosen": " " + " ".join(w[n_prompt:n_prompt + n_cont]),
                      "rejected": " " + " ".join(o[n_prompt:n_prompt + n_cont])})
    return pairs


def python_reference_text() -> list[str]:
    """The paragraphs of the Python language reference shipped with CPython (pydoc_data.topics), whitespace-collapsed."""
    from pydoc_data.topics import topics

    paras = []
    for key in sorted(topics):
        for p in topics[key].split("\n\n"):
            p = " ".join(p.split())
            if len(p) >= 40:
                paras.append(p)
    return paras


def hf_tokenizer(tok_dir: Path):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=str(tok_dir / "tokenizer.json"), eos_token="<|eos|>",
                                   pad_token="<|eos|>", model_max_length=64)


# ------------------------------------------------------------------------------------------------ metrics
@torch.no_grad()
def completion_logps(model, tok, pairs: list[dict], key: str) -> torch.Tensor:
    """log p(completion + eos | prompt) for each pair, prompt and completion tokenized separately (as TRL's DPO)."""
    eos = tok.eos_token_id
    out = []
    model.eval()
    for p in pairs:
        pi = tok(p["prompt"], add_special_tokens=False)["input_ids"]
        ci = tok(p[key], add_special_tokens=False)["input_ids"] + [eos]
        ids = torch.tensor([pi + ci])
        logits = model(input_ids=ids).logits[0, :-1].float()
        lp = torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None]).squeeze(-1)
        out.append(lp[len(pi) - 1:].sum())
    return torch.stack(out)


def heldout_preference(policy, ref, tok, pairs: list[dict], beta: float, ref_lp=None) -> dict:
    pc, pr = completion_logps(policy, tok, pairs, "chosen"), completion_logps(policy, tok, pairs, "rejected")
    rc, rr = ref_lp if ref_lp is not None else (completion_logps(ref, tok, pairs, "chosen"),
                                                 completion_logps(ref, tok, pairs, "rejected"))
    margin = (pc - rc) - (pr - rr)
    return {
        "accuracy": float((margin > 0).float().mean()),  # policy margin > reference margin
        "dpo_loss": float(-torch.nn.functional.logsigmoid(beta * margin).mean()),
        "policy_prefers_chosen": float((pc > pr).float().mean()),
        "ref_prefers_chosen": float((rc > rr).float().mean()),
        "dlogp_chosen": float((pc - rc).mean()), "dlogp_rejected": float((pr - rr).mean()),
        "logp_chosen": float(pc.mean()), "logp_rejected": float(pr.mean()),
    }


def lm_loss(model, blocks: torch.Tensor, bs: int = 64) -> float:
    model.eval()
    tot, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, blocks.shape[0], bs):
            x = blocks[i:i + bs]
            tot += float(model(input_ids=x, labels=x).loss) * x.shape[0]
            n += x.shape[0]
    return tot / n


# ------------------------------------------------------------------------------------------------- runs
def pretrained(a, work: Path, vocab: int, tr_b, va_b) -> Path:
    """Task 1's AdamW seed-0 model of run_lm_study.py (the same cache entry), trained if absent."""
    common = {"size": a.size, "vocab": a.vocab, "seq": a.seq, "batch": 32, "micro": 8, "rho": 0.05}
    key = common | {"task": "lm", "method": "AdamW", "seed": 0, "steps": a.pre_steps, "lr": 3e-3}
    rdir = work / "lm" / "AdamW_s0"

    def go():
        model = base.make_model(vocab, a.seq, 0, a.size)
        r = base.train_one(model, base.Blocks(tr_b), base.Blocks(va_b), rdir, 0, a.pre_steps, 3e-3, 32, 8, 0.05,
                           base.METHODS_LM["AdamW"], 0.05)
        model.save_pretrained(rdir / "model")
        return r

    r = base.run_cached(rdir / "run.json", key, go)
    if not (rdir / "model").exists():  # a cached run.json without its model (should not happen): train again
        (rdir / "run.json").unlink()
        r = base.run_cached(rdir / "run.json", key, go)
    print(json.dumps({"pretrained": str(rdir / "model"), "val_loss": r["val_loss"]}), flush=True)
    return rdir / "model"


def dpo_run(a, model_dir: Path, tok, train_pairs, held_pairs, held_ref, spec: dict, seed: int, rdir: Path) -> dict:
    from datasets import Dataset
    from transformers import LlamaForCausalLM, set_seed

    from hf_msam.trl import MSAMDPOConfig, MSAMDPOTrainer

    set_seed(seed)
    policy = LlamaForCausalLM.from_pretrained(model_dir)
    ref = LlamaForCausalLM.from_pretrained(model_dir)
    kw = msam_kwargs(spec, a.dpo_batch, a.rho, a.late)
    args = MSAMDPOConfig(
        output_dir=str(rdir), max_steps=a.dpo_steps, per_device_train_batch_size=a.dpo_batch, learning_rate=a.dpo_lr,
        lr_scheduler_type="cosine", warmup_steps=max(1, a.dpo_steps // 10), weight_decay=0.0, beta=a.beta,
        max_length=64, bf16=False, seed=seed, data_seed=seed, save_strategy="no", eval_strategy="no", logging_steps=a.dpo_log,
        report_to="none", disable_tqdm=True, use_cpu=True, dataloader_num_workers=0, log_level="warning", **kw,
    )
    trainer = MSAMDPOTrainer(model=policy, ref_model=ref, args=args, train_dataset=Dataset.from_list(train_pairs),
                             processing_class=tok)
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    hist = [h for h in trainer.state.log_history if "loss" in h]
    keep = ("step", "loss", "logps/chosen", "logps/rejected", "rewards/accuracies", "rewards/margins",
            "rewards/chosen", "rewards/rejected")
    hist = [{k: h[k] for k in keep if k in h} for h in hist]
    held = heldout_preference(policy, ref, tok, held_pairs, a.beta, held_ref)
    tail = hist[-max(1, len(hist) // 5):]
    final_loss = sum(h["loss"] for h in tail) / len(tail)
    return {"wall_s": wall, "log_history": hist, "heldout": held, "final_train_loss": final_loss,
            "learned": final_loss <= 0.8 * LN2, "settings": kw}


def ft_run(a, model_dir: Path, ft_tr, ft_va, pre_va, spec: dict, seed: int, rdir: Path) -> dict:
    from transformers import LlamaForCausalLM, set_seed

    from hf_msam.flatness import quantization_sensitivity

    set_seed(seed)
    model = LlamaForCausalLM.from_pretrained(model_dir)
    kw = msam_kwargs(spec, 32, a.rho, a.late)
    r = base.train_one(model, base.Blocks(ft_tr), base.Blocks(ft_va), rdir, seed, a.ft_steps, a.ft_lr, 32,
                       kw["msam_micro_batch_size"], kw["msam_rho"], kw, 0.05)
    r["pretrain_val_loss_after"] = lm_loss(model, pre_va)
    batches = [{"input_ids": ft_va[i:i + 64], "labels": ft_va[i:i + 64]} for i in range(0, ft_va.shape[0], 64)]
    q = quantization_sensitivity(model, batches, bits=(8, 4, 3))
    r["quant"] = {str(b): v for b, v in q.items()}
    return r


# ---------------------------------------------------------------------------------------------- summary
def ci_row(xs: list[float]) -> tuple[float, float]:
    return base.mean_ci(xs)


def fmt(xs: list[float], d: int = 4) -> str:
    m, h = ci_row(xs)
    return f"{m:.{d}f} ± {h:.{d}f}"


def paired(xs: list[float], ys: list[float], d: int = 4) -> str:
    m, h = ci_row([x - y for x, y in zip(xs, ys)])
    return f"{m:+.{d}f} [{m - h:+.{d}f}, {m + h:+.{d}f}]"


def dpo_tables(res: dict, seeds: list[int]) -> str:
    rows = ["| method | final train DPO loss | held-out pref. accuracy | Δ acc vs AdamW, paired [95% CI] | held-out DPO loss "
            "| held-out Δlog p chosen (policy − ref) | held-out Δlog p rejected | wall s / run | learned (train loss ≤ 0.8 ln 2) |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    base_acc = [res["AdamW"][s]["heldout"]["accuracy"] for s in seeds] if "AdamW" in res else None
    for name, per in res.items():
        g = lambda k: [per[s]["heldout"][k] for s in seeds]  # noqa: E731
        acc = g("accuracy")
        d = "—" if name == "AdamW" or base_acc is None else paired(acc, base_acc, 3)
        rows.append(f"| {name} | {fmt([per[s]['final_train_loss'] for s in seeds])} | {fmt(acc, 3)} | {d} | "
                    f"{fmt(g('dpo_loss'))} | {fmt(g('dlogp_chosen'), 2)} | {fmt(g('dlogp_rejected'), 2)} | "
                    f"{ci_row([per[s]['wall_s'] for s in seeds])[0]:.1f} | "
                    f"{sum(per[s]['learned'] for s in seeds)}/{len(seeds)} |")
    return "\n".join(rows)


def ft_tables(res: dict, seeds: list[int], ft_init: float, pre_init: float) -> str:
    rows = ["| method | fine-tune val loss | forgetting: pretrain val loss after − before | Δ forgetting vs AdamW [95% CI] "
            "| int8 Δloss | int4 Δloss | int3 Δloss | Δ int4 vs AdamW [95% CI] | Δ int3 vs AdamW [95% CI] | wall s / run "
            "| learned (≥ 20% below initial) |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    A = res.get("AdamW")
    for name, per in res.items():
        fv = [per[s]["val_loss"] for s in seeds]
        fg = [per[s]["pretrain_val_loss_after"] - pre_init for s in seeds]
        q = {b: [per[s]["quant"][b]["loss"] for s in seeds] for b in ("8", "4", "3")}
        if name == "AdamW" or A is None:
            df = d4 = d3 = "—"
        else:
            df = paired(fg, [A[s]["pretrain_val_loss_after"] - pre_init for s in seeds])
            d4 = paired(q["4"], [A[s]["quant"]["4"]["loss"] for s in seeds])
            d3 = paired(q["3"], [A[s]["quant"]["3"]["loss"] for s in seeds])
        learned = sum(per[s]["val_loss"] <= 0.8 * ft_init for s in seeds)
        rows.append(f"| {name} | {fmt(fv)} | {fmt(fg)} | {df} | {fmt(q['8'])} | {fmt(q['4'])} | {fmt(q['3'])} | {d4} | {d3} "
                    f"| {ci_row([per[s]['wall_s'] for s in seeds])[0]:.1f} | {learned}/{len(seeds)} |")
    return "\n".join(rows)


def plots(out: dict, pub: Path, seeds: list[int]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    if "dpo" in out["tasks"]:
        res = out["tasks"]["dpo"]["runs"]
        fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
        for i, (name, per) in enumerate(res.items()):
            c = f"C{i}"
            for j, (key, ax) in enumerate(zip(("logps/chosen", "logps/rejected", "rewards/accuracies"), axes)):
                steps = [h["step"] for h in per[str(seeds[0])]["log_history"]]
                ys = torch.tensor([[h[key] for h in per[str(s)]["log_history"]] for s in seeds])
                m = ys.mean(0)
                ax.plot(steps, m, color=c, label=name)
                ax.fill_between(steps, ys.min(0).values, ys.max(0).values, color=c, alpha=0.15)
        for ax, t in zip(axes, ("train log p(chosen) (sum over tokens)", "train log p(rejected)", "train reward accuracy")):
            ax.set_title(t)
            ax.set_xlabel("optimizer step")
        axes[0].legend()
        fig.suptitle("DPO on the tiny Llama: mean over 3 seeds (band: min–max); TRL's logged values")
        fig.tight_layout()
        fig.savefig(pub / "dpo_logps.png", dpi=110)
        plt.close(fig)
        made.append("dpo_logps.png")
    if "ft" in out["tasks"]:
        ft = out["tasks"]["ft"]
        res, pre_init = ft["runs"], ft["pretrain_val_loss_before"]
        names = list(res)
        metrics = [("forgetting (pretrain val Δloss)", lambda r: r["pretrain_val_loss_after"] - pre_init),
                   ("int4 Δloss (fine-tune val)", lambda r: r["quant"]["4"]["loss"]),
                   ("int3 Δloss (fine-tune val)", lambda r: r["quant"]["3"]["loss"])]
        fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
        for ax, (title, f) in zip(axes, metrics):
            ms, hs = zip(*[ci_row([f(res[n][str(s)]) for s in seeds]) for n in names])
            ax.bar(range(len(names)), ms, yerr=hs, capsize=4, color=[f"C{i}" for i in range(len(names))])
            for i, n in enumerate(names):
                ax.scatter([i] * len(seeds), [f(res[n][str(s)]) for s in seeds], color="k", s=8, zorder=3)
            ax.set_xticks(range(len(names)), names, rotation=20)
            ax.set_title(title)
        fig.suptitle("Fine-tune on the Python reference text: mean ± 95% t-interval over 3 seeds (dots: seeds)")
        fig.tight_layout()
        fig.savefig(pub / "ft_forgetting_quant.png", dpi=110)
        plt.close(fig)
        made.append("ft_forgetting_quant.png")
    return made


# --------------------------------------------------------------------------------------------------- main
def main(argv=None) -> dict:
    p = base.study_parser(__doc__)
    p.add_argument("--pre_steps", type=int, default=300, help="task 1's steps of the pretrained AdamW model")
    p.add_argument("--rho", type=float, default=0.05)
    p.add_argument("--late", type=float, default=0.5, help="msam_start of late-phase mSAM")
    p.add_argument("--dpo_steps", type=int, default=100)
    p.add_argument("--dpo_batch", type=int, default=16)
    p.add_argument("--dpo_lr", type=float, default=5e-4)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--dpo_log", type=int, default=5)
    p.add_argument("--prompt_words", type=int, default=10)
    p.add_argument("--cont_words", type=int, default=10)
    p.add_argument("--ft_steps", type=int, default=150)
    p.add_argument("--ft_lr", type=float, default=1e-3)
    p.add_argument("--ft_val_blocks", type=int, default=128)
    p.add_argument("--tasks", nargs="+", default=["dpo", "ft"], choices=["pretrain", "dpo", "ft"])
    p.add_argument("--methods", nargs="+", default=None)
    a = base.parse_with_run_arguments(p, argv)
    work = base.prepare_run(a)
    t_start = time.perf_counter()

    pre_train_txt, pre_val_txt = base.split(base.read_reviews("drugsComTrain.tsv"), 0.1)
    test_train_txt, test_val_txt = base.split(base.read_reviews("drugsComTest.tsv"), 0.2)
    btok = base.train_tokenizer(pre_train_txt, a.vocab, work / "tokenizer")
    vocab = btok.get_vocab_size()
    tr_b, va_b = base.pack(btok, pre_train_txt, a.seq), base.pack(btok, pre_val_txt, a.seq)
    model_dir = pretrained(a, work, vocab, tr_b, va_b)
    tok = hf_tokenizer(work / "tokenizer")
    out: dict = {"settings": vars(a), "tasks": {}, "python": sys.version.split()[0]}

    def wanted(methods: dict) -> dict:
        return {k: v for k, v in methods.items() if a.methods is None or k in a.methods}

    if "dpo" in a.tasks:
        from transformers import LlamaForCausalLM

        train_pairs = preference_pairs(test_train_txt, a.prompt_words, a.cont_words, 1)
        held_pairs = (preference_pairs(test_val_txt, a.prompt_words, a.cont_words, 2)
                      + preference_pairs(pre_val_txt, a.prompt_words, a.cont_words, 3))
        ref = LlamaForCausalLM.from_pretrained(model_dir)
        held_ref = (completion_logps(ref, tok, held_pairs, "chosen"), completion_logps(ref, tok, held_pairs, "rejected"))
        init = heldout_preference(ref, ref, tok, held_pairs, a.beta, held_ref)
        res: dict = {}
        for name, spec in wanted(METHODS_DPO).items():
            res[name] = {}
            for s in a.seeds:
                key = {k: getattr(a, k) for k in ("size", "vocab", "seq", "pre_steps", "rho", "dpo_steps", "dpo_batch",
                                                  "dpo_lr", "beta", "dpo_log", "prompt_words", "cont_words")}
                key |= {"task": "dpo", "method": name, "spec": spec, "seed": s}
                rdir = work / "dpo" / f"{slug(name)}_s{s}"
                r = base.run_cached(rdir / "run.json", key, lambda spec=spec, s=s, rdir=rdir: dpo_run(
                    a, model_dir, tok, train_pairs, held_pairs, held_ref, spec, s, rdir))
                res[name][s] = r
                print(json.dumps({"task": "dpo", "method": name, "seed": s, "final_train_loss": r["final_train_loss"],
                                  "heldout_acc": r["heldout"]["accuracy"], "wall_s": round(r["wall_s"], 1),
                                  "elapsed_s": round(time.perf_counter() - t_start)}), flush=True)
        out["tasks"]["dpo"] = {"runs": {m: {str(s): r for s, r in v.items()} for m, v in res.items()},
                               "n_train_pairs": len(train_pairs), "n_heldout_pairs": len(held_pairs),
                               "heldout_at_init": init, "example_pair": train_pairs[0]}
        if all(len(v) == len(a.seeds) for v in res.values()):
            out["tasks"]["dpo"]["table"] = dpo_tables(res, a.seeds)

    if "ft" in a.tasks:
        from transformers import LlamaForCausalLM

        paras = python_reference_text()
        ft_tr_txt, ft_va_txt = base.split(paras, 0.1)
        ft_tr, ft_va = base.pack(btok, ft_tr_txt, a.seq), base.pack(btok, ft_va_txt, a.seq)[: a.ft_val_blocks]
        m0 = LlamaForCausalLM.from_pretrained(model_dir)
        ft_init, pre_init = lm_loss(m0, ft_va), lm_loss(m0, va_b)
        from hf_msam.flatness import quantization_sensitivity

        q0 = quantization_sensitivity(m0, [{"input_ids": ft_va[i:i + 64], "labels": ft_va[i:i + 64]}
                                           for i in range(0, ft_va.shape[0], 64)], bits=(8, 4, 3))
        res = {}
        for name, spec in wanted(METHODS_FT).items():
            res[name] = {}
            for s in a.seeds:
                key = {k: getattr(a, k) for k in ("size", "vocab", "seq", "pre_steps", "rho", "late", "ft_steps", "ft_lr",
                                                  "ft_val_blocks")}
                key |= {"task": "ft", "method": name, "spec": spec, "seed": s}
                rdir = work / "ft" / f"{slug(name)}_s{s}"
                r = base.run_cached(rdir / "run.json", key, lambda spec=spec, s=s, rdir=rdir: ft_run(
                    a, model_dir, ft_tr, ft_va, va_b, spec, s, rdir))
                res[name][s] = r
                print(json.dumps({"task": "ft", "method": name, "seed": s, "val_loss": r["val_loss"],
                                  "pretrain_val_after": r["pretrain_val_loss_after"], "int4": r["quant"]["4"]["loss"],
                                  "wall_s": round(r["wall_s"], 1), "elapsed_s": round(time.perf_counter() - t_start)}),
                      flush=True)
        out["tasks"]["ft"] = {"runs": {m: {str(s): r for s, r in v.items()} for m, v in res.items()},
                              "blocks": {"train": ft_tr.shape[0], "val": ft_va.shape[0]}, "paragraphs": len(paras),
                              "ft_val_loss_before": ft_init, "pretrain_val_loss_before": pre_init,
                              "base_quant": {str(b): v for b, v in q0.items()},
                              "unigram_xent_ft_val": base.unigram_xent(ft_tr, ft_va, vocab)}
        if all(len(v) == len(a.seeds) for v in res.values()):
            out["tasks"]["ft"]["table"] = ft_tables(res, a.seeds, ft_init, pre_init)

    out["total_wall_s"] = time.perf_counter() - t_start
    md = []
    if "dpo" in out["tasks"] and "table" in out["tasks"]["dpo"]:
        d = out["tasks"]["dpo"]
        md.append(f"### (a) DPO ({d['n_train_pairs']} training pairs, {d['n_heldout_pairs']} held-out pairs)\n\n"
                  + d["table"] + f"\n\nAt the start (policy = reference): held-out DPO loss {d['heldout_at_init']['dpo_loss']:.4f} "
                  f"(ln 2), reference prefers chosen on {d['heldout_at_init']['ref_prefers_chosen']:.3f} of held-out pairs.")
    if "ft" in out["tasks"] and "table" in out["tasks"]["ft"]:
        f = out["tasks"]["ft"]
        bq = f["base_quant"]
        md.append(f"### (b) Fine-tune on the Python reference text ({f['blocks']['train']} train blocks, {f['blocks']['val']} val blocks)\n\n"
                  + f["table"] + f"\n\nPretrained model before fine-tuning: fine-tune val loss {f['ft_val_loss_before']:.4f}, "
                  f"pretrain val loss {f['pretrain_val_loss_before']:.4f}; its Δloss on the fine-tune val set at int8/int4/int3: "
                  f"{bq['8']['loss']:+.4f} / {bq['4']['loss']:+.4f} / {bq['3']['loss']:+.4f}. Unigram cross-entropy on the "
                  f"fine-tune val set: {f['unigram_xent_ft_val']:.4f}.")
    report = "\n\n".join(md)
    print(report)
    if a.publish:
        pub = Path(a.publish)
        pub.mkdir(parents=True, exist_ok=True)
        out["plots"] = plots(out, pub, a.seeds)
        (pub / "ext_results.json").write_text(json.dumps(out, indent=1, default=float))
        (pub / "ext_report.md").write_text(report + "\n")
    return out


if __name__ == "__main__":
    main()
