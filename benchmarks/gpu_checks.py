"""GPU checks of hf-msam, run by `benchmarks/gpu_checks.sh` on a CUDA machine (each part also runs on CPU,
without its CUDA-only checks, as a dry run).

    python benchmarks/gpu_checks.py versions
    python benchmarks/gpu_checks.py precision --json out.json          # fp32, bf16, fp16 through MSAMTrainer
    python benchmarks/gpu_checks.py fsdp-train --out run.pt [--method sam|msam]   # under `accelerate launch` or plain
    python benchmarks/gpu_checks.py fsdp-compare a.pt b.pt --json out.json

precision: for each precision, (a) no host synchronization inside `MSAMTrainer.training_step`
(`torch.cuda.set_sync_debug_mode("warn")` only while the step runs; every warning is recorded with the Python
stack that raised it), (b) one SGD step equals a plain-PyTorch mSAM step computed here under the same autocast,
(c) a few AdamW steps with gradient accumulation leave finite weights (fp16: with the Trainer's GradScaler).

fsdp-train: a tiny BERT trained for a few SGD steps with MSAMTrainer (SAM, or mSAM with 2 micro-batches, fp32),
saving the final full weights, the logged losses and msam/* metrics. fsdp-compare: the FSDP2 run against the
run without FSDP.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import sys
import tempfile
import traceback
import warnings

import torch
from transformers import BertConfig, BertForSequenceClassification

from hf_msam import MSAMTrainer, MSAMTrainingArguments

RHO = 0.05
LR = 0.5
VOCAB = 100
SEQ = 16


def tiny_bert(seed=0):
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=2,
    )
    return BertForSequenceClassification(config)


def data(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, SEQ), generator=g)
    mask = torch.ones(n, SEQ, dtype=torch.long)
    mask[::3, -4:] = 0  # some padding
    labels = torch.randint(0, 2, (n,), generator=g)
    return [{"input_ids": ids[i], "attention_mask": mask[i], "labels": labels[i]} for i in range(n)]


def stack(examples, device):
    return {k: torch.stack([e[k] for e in examples]).to(device) for k in examples[0]}


def device_now():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def trainable(model):
    return [p.detach().float().cpu().clone() for p in model.parameters() if p.requires_grad]


# ---------------------------------------------------------------------------------------------
# versions
# ---------------------------------------------------------------------------------------------


def versions(_opts):
    import accelerate
    import transformers

    import hf_msam

    info = {
        "python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
        "transformers": transformers.__version__, "accelerate": accelerate.__version__,
        "hf_msam": getattr(hf_msam, "__version__", "?"), "hf_msam_path": os.path.dirname(hf_msam.__file__),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
    }
    print(json.dumps(info))
    print("PASS versions" if torch.cuda.is_available() else "FAIL versions: no CUDA device")
    return 0 if torch.cuda.is_available() else 1


# ---------------------------------------------------------------------------------------------
# precision: sync-free step, reference step, finite fp16 steps
# ---------------------------------------------------------------------------------------------


class SyncRecorder:
    """Records CUDA host syncs (sync debug mode "warn") raised while `training_step` runs, with their Python stack."""

    def __init__(self):
        self.syncs: list[dict] = []

    @contextlib.contextmanager
    def watching(self):
        if not torch.cuda.is_available():
            yield
            return
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            previous = warnings.showwarning

            def show(message, category, filename, lineno, file=None, line=None):
                if "called a synchronizing" in str(message):  # not torch's "debug mode is a prototype" notice
                    frames = [f for f in traceback.extract_stack()[:-1] if not f.filename.endswith("warnings.py")]
                    # The line that called the synchronizing op: the innermost frame outside torch's own Python code.
                    callers = [f for f in frames if f"{os.sep}torch{os.sep}" not in f.filename]
                    site = (callers or frames)[-1]
                    ours = [f for f in frames if f"{os.sep}hf_msam{os.sep}" in f.filename]
                    self.syncs.append({
                        "message": str(message).splitlines()[0],
                        "site": f"{site.filename}:{site.lineno} {site.name}: {site.line}",
                        "in_hf_msam": f"{os.sep}hf_msam{os.sep}" in site.filename,
                        "innermost_hf_msam_frame": f"{ours[-1].filename}:{ours[-1].lineno} {ours[-1].name}: {ours[-1].line}" if ours else None,
                    })
                else:
                    previous(message, category, filename, lineno, file, line)

            warnings.showwarning = show
            torch.cuda.set_sync_debug_mode("warn")
            try:
                yield
            finally:
                torch.cuda.set_sync_debug_mode(0)
                warnings.showwarning = previous


def recording_trainer(recorder):
    class RecordingTrainer(MSAMTrainer):
        def training_step(self, *args, **kwargs):
            with recorder.watching():
                return super().training_step(*args, **kwargs)

    return RecordingTrainer


def precision_args(out_dir, precision, device, **kwargs):
    return MSAMTrainingArguments(
        output_dir=out_dir, report_to="none", save_strategy="no", disable_tqdm=True, use_cpu=device.type == "cpu",
        bf16=precision == "bf16", fp16=precision == "fp16", train_sampling_strategy="sequential",
        dataloader_pin_memory=False, **kwargs,
    )


def reference_msam_step(model, batch, micro_batch_size, rho, precision, device):
    """Plain PyTorch: per micro-batch g_j, e_j = rho g_j/||g_j||, g'_j at w + e_j, sum_j (n_j/n) g'_j; SGD w - lr g."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    params = [p for p in model.parameters() if p.requires_grad]
    w0 = [p.detach().clone() for p in params]
    n = batch["labels"].shape[0]

    def grad(mb):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = model(**mb).loss
        return torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True)

    total = [torch.zeros_like(w) for w in w0]
    for s in range(0, n, micro_batch_size):
        mb = {k: v[s : s + micro_batch_size] for k, v in batch.items()}
        g = grad(mb)
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(x.float()) for x in g]))
        with torch.no_grad():
            for p, w, x in zip(params, w0, g):
                p.copy_(w + rho * x / (norm + 1e-12))
        g_perturbed = grad(mb)
        c = mb["labels"].shape[0] / n
        with torch.no_grad():
            for acc, x, p, w in zip(total, g_perturbed, params, w0):
                acc += c * x
                p.copy_(w)
    with torch.no_grad():
        return [(w - LR * g).float().cpu() for w, g in zip(w0, total)]


def check_precision(precision, device, tmp):
    result = {"precision": precision}
    if device.type == "cpu" and precision == "fp16":
        result["skipped"] = "fp16 needs CUDA"
        return result
    # (a) + (b): one SGD step, batch 10 cut into micro-batches 4 + 4 + 2, against the reference.
    examples = data(10)
    model = tiny_bert().to(device)
    reference_model = copy.deepcopy(model)
    before = trainable(model)
    expected = reference_msam_step(reference_model, stack(examples, device), 4, RHO, precision, device)
    recorder = SyncRecorder()
    args = precision_args(
        os.path.join(tmp, f"{precision}_ref"), precision, device, per_device_train_batch_size=10, max_steps=1,
        optim="sgd", learning_rate=LR, lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0,
        logging_strategy="no", msam_rho=RHO, msam_micro_batch_size=4,
    )
    recording_trainer(recorder)(model=model, args=args, train_dataset=examples).train()
    got = trainable(model)
    update_ref = torch.cat([(e - b).reshape(-1) for e, b in zip(expected, before)])
    update_got = torch.cat([(g - b).reshape(-1) for g, b in zip(got, before)])
    result["update_norm"] = update_ref.norm().item()
    result["update_rel_diff"] = ((update_got - update_ref).norm() / update_ref.norm()).item()
    result["max_abs_weight_diff"] = max((g - e).abs().max().item() for g, e in zip(got, expected))
    result["max_rel_weight_diff"] = max(((g - e).abs() / e.abs().clamp_min(1e-6)).max().item() for g, e in zip(got, expected))
    result["moved"] = bool(update_got.norm() > 0)
    # (c): four AdamW steps, two accumulation steps each, mSAM with micro-batches of 4; syncs recorded too.
    model = tiny_bert().to(device)
    args = precision_args(
        os.path.join(tmp, f"{precision}_adamw"), precision, device, per_device_train_batch_size=8, max_steps=4,
        gradient_accumulation_steps=2, learning_rate=1e-3, logging_steps=1, msam_rho=RHO, msam_micro_batch_size=4,
    )
    trainer = recording_trainer(recorder)(model=model, args=args, train_dataset=data(64))
    trainer.train()
    weights = trainable(model)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    result["adamw_finite_weights"] = all(torch.isfinite(w).all().item() for w in weights)
    result["adamw_losses"] = [h["loss"] for h in logs]
    result["adamw_msam_logged_steps"] = sum("msam/perturbed_loss" in h for h in logs)
    result["adamw_moved"] = any(not torch.equal(a, b) for a, b in zip(weights, trainable(tiny_bert())))
    if precision == "fp16":
        scaler = getattr(trainer.accelerator, "scaler", None)
        result["grad_scaler"] = type(scaler).__name__ if scaler is not None else None
        result["grad_scale_after"] = scaler.get_scale() if scaler is not None else None
    result["host_syncs_in_training_step"] = recorder.syncs if device.type == "cuda" else "not checked (CPU)"
    # The model's own syncs (e.g. transformers' attention-mask checks), for comparison: one forward+backward.
    bare = SyncRecorder()
    model = tiny_bert().to(device)
    batch = stack(data(4), device)
    with bare.watching():
        with torch.autocast(device.type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision),
                            enabled=precision != "fp32"):
            loss = model(**batch).loss
        loss.backward()
    result["bare_model_syncs"] = len(bare.syncs)
    result["bare_model_sync_sites"] = sorted({s["site"] for s in bare.syncs})
    return result


def verdicts(result, device):
    p = result["precision"]
    lines = []
    if "skipped" in result:
        return [f"SKIP precision-{p}: {result['skipped']}"]
    if device.type == "cuda":
        syncs = result["host_syncs_in_training_step"]
        ours = [s for s in syncs if s["in_hf_msam"]]
        others = sorted({s["site"] for s in syncs if not s["in_hf_msam"]})
        lines.append(
            (f"PASS precision-{p}-no-host-sync-in-hf_msam" if not ours
             else f"FAIL precision-{p}-no-host-sync-in-hf_msam: {len(ours)} sync(s), first: {json.dumps(ours[0])}")
            + f"; {len(syncs) - len(ours)} sync(s) in the training steps at sites outside hf_msam: {others}; bare model "
            f"forward+backward: {result['bare_model_syncs']} sync(s) at {result['bare_model_sync_sites']}"
        )
    tol = 1e-5 if p == "fp32" else 5e-2
    ok = result["moved"] and result["update_rel_diff"] <= tol
    lines.append(
        f"{'PASS' if ok else 'FAIL'} precision-{p}-matches-reference: update rel diff {result['update_rel_diff']:.3e} "
        f"(tolerance {tol:g}), max abs weight diff {result['max_abs_weight_diff']:.3e}, max rel {result['max_rel_weight_diff']:.3e}"
    )
    ok = result["adamw_finite_weights"] and result["adamw_moved"] and result["adamw_msam_logged_steps"] == 4
    lines.append(
        f"{'PASS' if ok else 'FAIL'} precision-{p}-adamw-steps: finite {result['adamw_finite_weights']}, moved "
        f"{result['adamw_moved']}, msam logged steps {result['adamw_msam_logged_steps']}/4, losses "
        f"{[round(x, 4) for x in result['adamw_losses']]}" + (f", grad scale {result.get('grad_scale_after')}" if p == "fp16" else "")
    )
    return lines


def precision(opts):
    device = device_now()
    results, status = [], 0
    with tempfile.TemporaryDirectory() as tmp:
        for p in opts.precisions:
            try:
                result = check_precision(p, device, tmp)
            except Exception:
                result = {"precision": p, "error": traceback.format_exc()}
                print(result["error"], file=sys.stderr)
                print(f"FAIL precision-{p}: raised {result['error'].strip().splitlines()[-1]}")
                status = 1
            else:
                for line in verdicts(result, device):
                    print(line)
                    status |= line.startswith("FAIL")
            results.append(result)
            print(json.dumps(result), flush=True)
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump({"device": str(device), "results": results}, f, indent=2)
    return status


# ---------------------------------------------------------------------------------------------
# FSDP2 through the Trainer
# ---------------------------------------------------------------------------------------------


def fsdp_train(opts):
    device = device_now()
    model = tiny_bert()
    with tempfile.TemporaryDirectory() as tmp:
        args = MSAMTrainingArguments(
            output_dir=tmp, report_to="none", save_strategy="no", disable_tqdm=True, use_cpu=device.type == "cpu",
            per_device_train_batch_size=8, max_steps=opts.steps, optim="sgd", learning_rate=0.1,
            lr_scheduler_type="constant", weight_decay=0.0, logging_steps=1, train_sampling_strategy="sequential",
            dataloader_pin_memory=False, msam_rho=RHO, msam_micro_batch_size=4 if opts.method == "msam" else None,
            # --args-fsdp: FSDP2 from the TrainingArguments (under torchrun) instead of from `accelerate launch`
            **(dict(fsdp=True, fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": ["BertLayer"]})
               if opts.args_fsdp else {}),
        )
        trainer = MSAMTrainer(model=model, args=args, train_dataset=data(8 * opts.steps))
        trainer.train()
    wrapped = trainer.model_wrapped if trainer.model_wrapped is not None else trainer.model
    full = {}
    dtensors = 0
    for name, p in trainer.model.named_parameters():
        if hasattr(p, "full_tensor"):
            dtensors += 1
            p = p.full_tensor()
        full[name] = p.detach().float().cpu().clone()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    info = {
        "method": opts.method,
        "fsdp2": trainer._msam_fsdp2(),
        "distributed_type": str(trainer.accelerator.distributed_type),
        "dtensor_params": dtensors,
        "wrapped": type(wrapped).__name__,
        "sync_perturbation": trainer.msam_sync_perturbation,
        "engine_built": trainer._msam is not None,
        "losses": [h["loss"] for h in logs],
        "msam_logged_steps": sum("msam/perturbed_loss" in h for h in logs),
        "msam_perturbed_loss": [h.get("msam/perturbed_loss") for h in logs],
        "steps": opts.steps,
    }
    if trainer.accelerator.is_main_process:
        torch.save({"info": info, "weights": full}, opts.out)
        print(json.dumps(info), flush=True)
    return 0


def fsdp_compare(opts):
    a, b = torch.load(opts.fsdp, weights_only=False), torch.load(opts.plain, weights_only=False)
    ia, ib = a["info"], b["info"]
    rel = max(
        ((a["weights"][k] - b["weights"][k]).norm() / b["weights"][k].norm().clamp_min(1e-12)).item() for k in b["weights"]
    )
    initial = {k: v.float() for k, v in tiny_bert().named_parameters()}
    moved = max(((b["weights"][k] - initial[k]).norm() / initial[k].norm().clamp_min(1e-12)).item() for k in initial)
    loss_rel = max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(ia["losses"], ib["losses"]))
    ok = (
        ia["fsdp2"] and not ib["fsdp2"] and ia["dtensor_params"] > 0 and set(a["weights"]) == set(b["weights"])
        and ia["msam_logged_steps"] == ia["steps"] and ib["msam_logged_steps"] == ib["steps"]
        and rel <= 1e-5 and loss_rel <= 1e-5 and len(ia["losses"]) == len(ib["losses"]) == ia["steps"]
    )
    summary = {
        "method": ia["method"], "max_param_rel_diff": rel, "max_loss_rel_diff": loss_rel, "moved_rel_max": moved,
        "fsdp": ia, "plain": ib,
    }
    print(
        f"{'PASS' if ok else 'FAIL'} fsdp2-{ia['method']}: max param rel diff {rel:.3e}, max loss rel diff {loss_rel:.3e}, "
        f"fsdp2 {ia['fsdp2']} ({ia['distributed_type']}, {ia['dtensor_params']} DTensor params, sync {ia['sync_perturbation']}), "
        f"msam steps {ia['msam_logged_steps']}/{ia['steps']} vs {ib['msam_logged_steps']}/{ib['steps']}, "
        f"losses fsdp {[round(x, 6) for x in ia['losses']]} plain {[round(x, 6) for x in ib['losses']]}"
    )
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(summary, f, indent=2)
    return 0 if ok else 1


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("versions")
    p = sub.add_parser("precision")
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16", "fp16"])
    p.add_argument("--json")
    p = sub.add_parser("fsdp-train")
    p.add_argument("--method", choices=["sam", "msam"], default="msam")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--out", required=True)
    p.add_argument("--args-fsdp", action="store_true", help="FSDP2 through TrainingArguments.fsdp/fsdp_config")
    p = sub.add_parser("fsdp-compare")
    p.add_argument("fsdp")
    p.add_argument("plain")
    p.add_argument("--json")
    opts = parser.parse_args(argv)
    command = {"versions": versions, "precision": precision, "fsdp-train": fsdp_train, "fsdp-compare": fsdp_compare}
    return command[opts.command](opts)


if __name__ == "__main__":
    sys.exit(main())
