"""Step time and peak memory of `MSAMTrainer` against the plain `Trainer` and hand-written loops.

One run measures, on a small BERT built from a config and trained on random tokens:

    Trainer (AdamW)            the plain transformers Trainer
    MSAMTrainer rho=0          must cost what the plain Trainer costs (target: within 3%)
    MSAMTrainer SAM / mSAM     micro-batch size None (SAM), then each of --micro-batch-sizes
    hand-written ...           the floors: the least PyTorch that computes the same step (plain AdamW
                               step; two-pass SAM; mSAM with the same micro-batches). Targets: SAM
                               and mSAM within 5% of their floor, and at most two copies of the
                               trainable parameters of extra memory over the plain Trainer.
    MSAMTrainer interval 4, LookSAM k=5, Momentum-SAM, GSAM, F-SAM
                               the cheaper and stronger methods, each next to its hand-written floor
                               (`HandwrittenMethod`). Targets (METHOD_TARGETS): interval 4 and LookSAM
                               at most 1.3x the plain Trainer (their mean step: they mix step kinds),
                               Momentum-SAM at most 1.1x, GSAM and F-SAM within 5% of SAM.
    MSAMTrainer Flat-LoRA      with --lora R (the model wrapped with PEFT LoRA of rank R on the attention's query
                               and value projections; every row then trains the adapters only): Flat-LoRA (constant
                               sigma, so every step draws noise), next to its floor, a plain LoRA step plus the noise
                               (`handwritten_flat_lora_backward`); with --counts also with k micro-batches, on both paths.

Every configuration lives in its own worker process, forked from this one once torch, transformers
and hf_msam are imported (so that each has its own peak memory), and the workers run in lockstep:
one optimizer step each, in turn, in an order that rotates every round. Only one worker computes at
any moment, and load from elsewhere on the machine lands on every configuration alike instead of on
whichever happened to be running.

A step is timed from `on_step_begin` to `on_step_end` (training_step, clipping, optimizer and
scheduler step, zero_grad; not data loading or logging), and the hand-written loops time the same
span. The figure is the median over --steps, after --warmup steps.

Peak memory is measured afterwards, for each configuration alone, in a fresh worker taking
MEMORY_STEPS steps: on CUDA, torch.cuda.max_memory_allocated; on CPU, the peak resident set size
(ru_maxrss), with glibc's malloc told to hand freed tensor memory back at once, so that the resident
set follows the live tensors (see `return_freed_memory_at_once`). The CPU figure also counts the
interpreter and libraries, the same in every worker. "Extra" is the difference to the plain
Trainer's peak, in copies of the trainable parameters.

    python benchmarks/step_time.py --json results.json  # 5-10 minutes on an idle 2-core CPU
    python benchmarks/step_time.py --threads 1          # on a machine shared with other jobs
    python benchmarks/step_time.py --quick              # tiny model, a few steps: a smoke test
    python benchmarks/step_time.py --rows msam_gsam     # some rows only (with their floors and the Trainer)
    python benchmarks/step_time.py --lora 8 --counts 8 --rows msam_flat_lora flat_k8_seq flat_k8_vec k8_seq  # Flat-LoRA
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import io
import json
import math
import multiprocessing
import os
import platform
import re
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    ViTConfig,
    ViTForImageClassification,
)

from torch.utils._python_dispatch import TorchDispatchMode

from hf_msam import MSAMTrainer, MSAMTrainingArguments

RHO = 0.05
LEARNING_RATE = 5e-5
MAX_GRAD_NORM = 1.0  # the Trainer's default clipping, done by the hand-written loops too
KERNEL_STEPS = 20  # steps counted by --count-kernels: a whole period of interval 4 and of LookSAM k=5
aten = torch.ops.aten
METADATA_OPS = {  # operators that launch no kernel though they are not views: allocations without a fill
    aten.empty.memory_format, aten.empty_strided.default, aten.empty_like.default, aten.new_empty.default,
    aten.new_empty_strided.default, aten.lift_fresh.default,
}
MEMORY_STEPS = 2  # steps each configuration then takes alone, in a fresh worker, for its peak memory
M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
QUICK = dict(steps=3, warmup=1, batch_size=16, seq_len=16, hidden_size=32, layers=2, heads=2, vocab_size=500)
TARGETS = {"rho0_vs_trainer": 1.03, "sam_vs_floor": 1.05, "extra_param_copies": 2.0}
# The cheaper and stronger methods (README "Methods and schedules"): ratio of the mean step to the plain
# Trainer's (interval, LookSAM, Momentum-SAM), or to MSAMTrainer SAM's (GSAM, F-SAM).
VIT_IMAGE, VIT_PATCH = 32, 4  # ViT: 64 patches and the class token, 65 positions
# The vectorized path (--counts): mSAM with 8 micro-batches at most 1.3x SAM; peak memory at most SAM's plus k copies
# of the trainable parameters, plus 10%.
SWEEP_TARGETS = {"k8_vectorized_vs_sam": 1.3, "memory_over_sam_plus_k_copies": 1.1}
METHOD_TARGETS = {"msam_interval4": 1.3, "msam_looksam5": 1.3, "msam_momentum": 1.1, "msam_gsam": 1.05, "msam_fsam": 1.05}
FLAT_LORA_SIGMA = 0.05
# Flat-LoRA's rows (with --lora): the constant schedule, so that every step draws noise (the cosine one starts at 0).
FLAT_LORA_FLAGS = (("msam_method", "flat_lora"), ("msam_flat_lora_sigma", FLAT_LORA_SIGMA),
                   ("msam_flat_lora_schedule", "constant"))
LORA_TARGETS = {"bert": ["query", "value"], "llama": ["q_proj", "v_proj"], "vit": ["query", "value"]}


@dataclass(frozen=True)
class Config:
    key: str
    label: str
    runner: str  # "trainer" (transformers.Trainer), "msam" (MSAMTrainer) or "loop" (hand-written)
    rho: float  # 0: the plain step
    micro_batch_size: int | None
    floor: str  # key of the hand-written loop that computes the same step
    flags: tuple = ()  # extra MSAMTrainingArguments, as (name, value) pairs; for loops: the method's settings
    stat: str = "median"  # "mean" for rows whose steps differ in kind (a schedule), where the median would hide the cost


METHOD_ROWS = [
    # key, label, MSAMTrainer flags, hand-written floor
    ("interval4", "interval 4", (("msam_interval", 4),)),
    ("looksam5", "LookSAM k=5", (("msam_method", "looksam"), ("msam_looksam_k", 5))),
    ("momentum", "Momentum-SAM", (("msam_method", "momentum"),)),
    ("gsam", "GSAM", (("msam_method", "gsam"),)),
    ("fsam", "F-SAM", (("msam_method", "fsam"),)),
    ("functional", "Functional-SAM", (("msam_method", "functional"),)),
    ("precond", "SAM, Adam-preconditioned", (("msam_precondition", "adam"),)),
    ("logits_sam", "logits-SAM", (("msam_method", "logits_sam"),)),
]


def sweep_configurations(batch_size: int, counts: list[int], lora: int = 0) -> list[Config]:
    """The paths side by side: the plain Trainer, SAM, and mSAM with k micro-batches per device on the sequential
    path (one pass per micro-batch) and on the vectorized one (all micro-batches in each pass), for each k. With
    `lora`, Flat-LoRA too: the whole batch, and k micro-batches on both paths, each next to the hand-written Flat-LoRA
    with the same micro-batches."""
    configs = [
        Config("trainer", "Trainer (AdamW)", "trainer", 0.0, None, "loop_adamw"),
        Config("msam_sam", "MSAMTrainer SAM", "msam", RHO, None, "loop_sam"),
        Config("loop_adamw", "hand-written AdamW", "loop", 0.0, None, "loop_adamw"),
        Config("loop_sam", "hand-written SAM", "loop", RHO, None, "loop_sam"),
    ]
    for k in counts:
        if batch_size % k:
            raise SystemExit(f"--counts: {k} does not divide the batch size {batch_size}")
        m = batch_size // k
        for path in ("sequential", "vectorized"):
            flags = (("msam_vectorize", "off" if path == "sequential" else "on"),)
            configs.append(Config(f"k{k}_{path[:3]}", f"mSAM k={k} {path}", "msam", RHO, m, "loop_sam", flags))
    if lora:
        configs += flat_lora_configurations(None)
        for k in counts:
            m = batch_size // k
            configs.append(Config(f"loop_flat_k{k}", f"hand-written Flat-LoRA k={k}", "loop", RHO, m, f"loop_flat_k{k}",
                                  FLAT_LORA_FLAGS))
            for path in ("sequential", "vectorized"):
                flags = (*FLAT_LORA_FLAGS, ("msam_vectorize", "off" if path == "sequential" else "on"))
                configs.append(Config(f"flat_k{k}_{path[:3]}", f"Flat-LoRA k={k} {path}", "msam", RHO, m,
                                      f"loop_flat_k{k}", flags))
    return configs


def flat_lora_configurations(micro_batch_size: int | None) -> list[Config]:
    """Flat-LoRA on the whole batch, and its floor: a plain LoRA step plus the noise of every LoRA layer."""
    return [
        Config("msam_flat_lora", "MSAMTrainer Flat-LoRA", "msam", RHO, micro_batch_size, "loop_flat_lora", FLAT_LORA_FLAGS),
        Config("loop_flat_lora", "hand-written Flat-LoRA", "loop", RHO, micro_batch_size, "loop_flat_lora", FLAT_LORA_FLAGS),
    ]


def configurations(micro_batch_sizes: list[int], lora: int = 0) -> list[Config]:
    configs = [
        Config("trainer", "Trainer (AdamW)", "trainer", 0.0, None, "loop_adamw"),
        Config("msam_rho0", "MSAMTrainer rho=0", "msam", 0.0, None, "loop_adamw"),
        Config("msam_sam", "MSAMTrainer SAM", "msam", RHO, None, "loop_sam"),
    ]
    for m in micro_batch_sizes:
        configs.append(Config(f"msam_mbs{m}", f"MSAMTrainer mSAM mbs={m}", "msam", RHO, m, f"loop_mbs{m}"))
    configs += [
        Config("loop_adamw", "hand-written AdamW", "loop", 0.0, None, "loop_adamw"),
        Config("loop_sam", "hand-written SAM", "loop", RHO, None, "loop_sam"),
    ]
    for m in micro_batch_sizes:
        configs.append(Config(f"loop_mbs{m}", f"hand-written mSAM mbs={m}", "loop", RHO, m, f"loop_mbs{m}"))
    for key, label, flags in METHOD_ROWS:
        stat = "mean" if key in ("interval4", "looksam5") else "median"
        configs.append(Config(f"msam_{key}", f"MSAMTrainer {label}", "msam", RHO, None, f"loop_{key}", flags, stat))
        configs.append(Config(f"loop_{key}", f"hand-written {label}", "loop", RHO, None, f"loop_{key}", flags, stat))
    if lora:
        configs += flat_lora_configurations(None)
    return configs


# ---------------------------------------------------------------------------------------------
# Worker: one configuration, one step at a time at the parent's signal
# ---------------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def return_freed_memory_at_once() -> None:
    """glibc: give every block of 128 KiB or more its own mapping, unmapped as soon as it is freed.

    By default malloc keeps freed memory for reuse, and the resident set counts it: the peak RSS then
    depends on the order of allocations more than on the live tensors. The price is a page fault per
    fresh page, which is why the timed workers leave malloc alone. Elsewhere (no mallopt): a no-op.
    """
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is not None:
        mallopt(M_MMAP_THRESHOLD, 128 * 1024)


def peak_memory(device: torch.device) -> int:
    """The worker's peak: bytes allocated by torch on CUDA; on CPU, the whole process's resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


class KernelCount(TorchDispatchMode):
    """Counts the aten operators a step dispatches, views and other metadata-only operators left out: each of the
    rest is a kernel launch on a GPU (a `torch._foreach_*` over a list, one fused launch or a few), so the count is a
    device-independent measure of the per-step overhead that dominates small models on an accelerator."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not (func.is_view or func in METADATA_OPS):
            self.count += 1
        return func(*args, **(kwargs or {}))


class Lockstep:
    """Times each step, and starts it only when the parent says so.

    A step's time is reported when the worker is about to start the next one (or has finished):
    whatever it does between steps (fetching the next batch, logging) is then over, and never runs
    while another worker is being timed.
    """

    def __init__(self, device: torch.device, conn, count_kernels: bool = False):
        self.device, self.conn = device, conn
        self.times: list[float] = []
        self._start = 0.0
        self.kernels: list[int] = []
        self._counter = KernelCount() if count_kernels else None

    def begin(self) -> None:
        if self.times:
            self.conn.send({"step_time": self.times[-1]})
        else:
            self.conn.send({"ready": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"})
        self.conn.recv()
        synchronize(self.device)
        if self._counter is not None:
            self._counter.count = 0
            self._counter.__enter__()
        self._start = time.perf_counter()

    def end(self) -> None:
        synchronize(self.device)
        self.times.append(time.perf_counter() - self._start)
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            self.kernels.append(self._counter.count)

    def finish(self) -> None:
        kernels = statistics.fmean(self.kernels) if self.kernels else None
        self.conn.send({"step_time": self.times[-1], "peak_memory_bytes": peak_memory(self.device), "kernels": kernels})


def build_model(opts: argparse.Namespace, device: torch.device):
    """The model of --model, built from a config; with --lora R, wrapped with PEFT LoRA of rank R (alpha 2R, no
    dropout) on the attention's query and value projections, so that only the adapters train."""
    model = build_base_model(opts, device)
    if not opts.lora:
        return model
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=opts.lora, lora_alpha=2 * opts.lora, lora_dropout=0.0, target_modules=LORA_TARGETS[opts.model])
    return get_peft_model(model, config)


def build_base_model(opts: argparse.Namespace, device: torch.device):
    torch.manual_seed(0)
    if opts.model == "llama":
        config = LlamaConfig(
            vocab_size=opts.vocab_size, hidden_size=opts.hidden_size, num_hidden_layers=opts.layers,
            num_attention_heads=opts.heads, num_key_value_heads=opts.heads, intermediate_size=4 * opts.hidden_size,
            max_position_embeddings=opts.seq_len, tie_word_embeddings=True,
        )
        return LlamaForCausalLM(config).to(device)
    if opts.model == "vit":
        config = ViTConfig(
            image_size=opts.image_size, patch_size=opts.patch_size, num_channels=3, hidden_size=opts.hidden_size,
            num_hidden_layers=opts.layers, num_attention_heads=opts.heads, intermediate_size=4 * opts.hidden_size,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=10,
        )
        return ViTForImageClassification(config).to(device)
    config = BertConfig(
        vocab_size=opts.vocab_size,
        hidden_size=opts.hidden_size,
        num_hidden_layers=opts.layers,
        num_attention_heads=opts.heads,
        intermediate_size=4 * opts.hidden_size,
        max_position_embeddings=opts.seq_len,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=2,
    )
    return BertForSequenceClassification(config).to(device)


def synthetic_examples(opts: argparse.Namespace) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    n = (opts.warmup + opts.steps) * opts.batch_size
    if opts.model == "vit":
        pixels = torch.randn(n, 3, opts.image_size, opts.image_size, generator=generator)
        labels = torch.randint(0, 10, (n,), generator=generator)
        return [{"pixel_values": pixels[i], "labels": labels[i]} for i in range(n)]
    if opts.model == "llama":
        input_ids = torch.randint(0, opts.vocab_size, (n, opts.seq_len), generator=generator)
        return [{"input_ids": input_ids[i], "labels": input_ids[i]} for i in range(n)]
    input_ids = torch.randint(0, opts.vocab_size, (n, opts.seq_len), generator=generator)
    labels = torch.randint(0, 2, (n,), generator=generator)
    return [{"input_ids": input_ids[i], "labels": labels[i]} for i in range(n)]


def run_trainer(config: Config, opts: argparse.Namespace, device: torch.device, lockstep: Lockstep) -> None:
    class LockstepCallback(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            lockstep.begin()

        def on_step_end(self, args, state, control, **kwargs):
            lockstep.end()

    output_dir = tempfile.TemporaryDirectory(prefix="step_time_")
    settings = dict(
        output_dir=output_dir.name,
        per_device_train_batch_size=opts.batch_size,
        max_steps=opts.warmup + opts.steps,
        learning_rate=LEARNING_RATE,
        max_grad_norm=MAX_GRAD_NORM,
        logging_strategy="no",
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=device.type == "cpu",
        seed=0,
        bf16=opts.bf16,
        activation_checkpointing=opts.activation_checkpointing,
    )
    if config.runner == "trainer":
        trainer_cls, args = Trainer, TrainingArguments(**settings)
    else:
        args = MSAMTrainingArguments(
            **settings, msam_rho=config.rho, msam_micro_batch_size=config.micro_batch_size, **dict(config.flags)
        )
        trainer_cls = MSAMTrainer
    trainer = trainer_cls(
        model=build_model(opts, device), args=args, train_dataset=synthetic_examples(opts), callbacks=[LockstepCallback()]
    )
    with output_dir:
        trainer.train()


def handwritten_msam_backward(model, params, batch, rho: float, micro_batch_size: int | None) -> None:
    """Accumulate the (m)SAM gradient of `batch` into .grad: the same computation as MicroBatchSAM, bare."""
    n = next(iter(batch.values())).shape[0]
    size = micro_batch_size or n
    w = [p.detach().clone() for p in params]
    for start in range(0, n, size):
        micro_batch = {k: v[start : start + size] for k, v in batch.items()}
        g = torch.autograd.grad(model(**micro_batch).loss, params)
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in g]))
        torch._foreach_mul_(g, rho / (norm + 1e-12))
        with torch.no_grad():
            torch._foreach_add_(params, g)
        del g
        loss = model(**micro_batch).loss
        (loss if size >= n else loss * (next(iter(micro_batch.values())).shape[0] / n)).backward()
        with torch.no_grad():
            torch._foreach_copy_(params, w)


def lora_layers(model) -> list:
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def handwritten_flat_lora_backward(model, layers, batch, sigma: float, micro_batch_size: int | None, generator) -> None:
    """Accumulate the Flat-LoRA gradient of `batch` into .grad, bare: per micro-batch, every LoRA layer's base weight
    W += ε (ε_i ~ N(0, σ²‖(W + s·BA)_i‖²/n), one draw per layer), forward and backward, W back by copy."""
    n = next(iter(batch.values())).shape[0]
    size = micro_batch_size or n
    bases = [layer.base_layer.weight for layer in layers]
    w = [b.detach().clone() for b in bases]
    for start in range(0, n, size):
        micro_batch = {k: v[start : start + size] for k, v in batch.items()}
        with torch.no_grad():
            for layer, base in zip(layers, bases):
                merged = torch.addmm(base, layer.lora_B["default"].weight, layer.lora_A["default"].weight,
                                     alpha=layer.scaling["default"])
                std = torch.linalg.vector_norm(merged, dim=1) * (sigma / math.sqrt(base.shape[1]))
                base.add_(torch.randn(base.shape, generator=generator, device=base.device) * std[:, None])
        loss = model(**micro_batch).loss
        (loss if size >= n else loss * (next(iter(micro_batch.values())).shape[0] / n)).backward()
        with torch.no_grad():
            torch._foreach_copy_(bases, w)


def _grad(loss, params):
    return list(torch.autograd.grad(loss, params))


def _norm(tensors):
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in tensors]))


def _dot(a, b):
    return torch.stack([torch.sum(x * y) for x, y in zip(a, b)]).sum()


class HandwrittenMethod:
    """The bare PyTorch of each method's step (one micro-batch, the whole batch): the floor of its row.

    Each step leaves the gradient in .grad, and w where it was; no guards, no bookkeeping beyond the method's own.
    """

    def __init__(self, config: Config, model, params, optimizer):
        self.flags, self.model, self.params, self.optimizer = dict(config.flags), model, params, optimizer
        self.rho, self.t = config.rho, 0
        self.m = self.g_v = None
        self.micro_batch_size = config.micro_batch_size
        if self.flags.get("msam_method") == "flat_lora":
            self.layers = lora_layers(model)
            self.generator = torch.Generator(device=params[0].device).manual_seed(0)

    def perturbed_grad(self, batch, e):
        with torch.no_grad():
            torch._foreach_add_(self.params, e)
        g_p = _grad(self.model(**batch).loss, self.params)
        with torch.no_grad():
            torch._foreach_copy_(self.params, self.w)
        return g_p

    def set_grad(self, d):
        for p, d_i in zip(self.params, d):
            p.grad = d_i

    def step(self, batch) -> None:
        self.t += 1
        method = self.flags.get("msam_method", "sam")
        if method == "flat_lora":  # no ascent: the base weights' noise, drawn per micro-batch
            sigma = self.flags["msam_flat_lora_sigma"]
            handwritten_flat_lora_backward(self.model, self.layers, batch, sigma, self.micro_batch_size, self.generator)
            return
        if "msam_interval" in self.flags:
            if (self.t - 1) % self.flags["msam_interval"]:
                self.model(**batch).loss.backward()
            else:
                handwritten_msam_backward(self.model, self.params, batch, self.rho, None)
            return
        self.w = [p.detach().clone() for p in self.params]
        if method == "momentum":  # e = −ρ m/‖m‖ from AdamW's exp_avg; no momentum yet: a plain step
            state = self.optimizer.state
            if not state:
                self.model(**batch).loss.backward()
                return
            m = [state[p]["exp_avg"] for p in self.params]
            e = torch._foreach_mul(m, -self.rho / _norm(m))
            with torch.no_grad():
                torch._foreach_add_(self.params, e)
            del e
            self.model(**batch).loss.backward()
            with torch.no_grad():
                torch._foreach_copy_(self.params, self.w)
            return
        if method == "logits_sam":  # the paper's step: one body forward, g from the head's input, the head again at W + e
            head = self.model.get_output_embeddings() or self.model.classifier
            w_at = head.weight.detach().requires_grad_(True)  # the head's use alone (the tied embedding reads W)
            seen = {}

            def at_w(module, args, out):
                seen["h"] = args[0]
                return F.linear(args[0], w_at, module.bias)

            handle = head.register_forward_hook(at_w)
            try:
                out = self.model(**batch)
            finally:
                handle.remove()
            (g,) = torch.autograd.grad(out.loss, w_at, retain_graph=True)  # reaches the head's output only
            e = g.mul_(self.rho / (g.norm() + 1e-12))
            logits = F.linear(seen.pop("h"), head.weight + e, head.bias)
            del out, g, e
            labels = batch["labels"]
            if logits.dim() == 3:  # causal LM: next-token cross-entropy
                logits, labels = logits[:, :-1], labels[:, 1:]
            F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)).backward()
            return
        if method == "functional":  # J_F(w + e)ᵀ ∇_F L(w): ∇_F L from the clean pass, back through the perturbed logits
            out = self.model(**batch)
            *g, grad_logits = torch.autograd.grad(out.loss, [*self.params, out.logits])
            e = torch._foreach_mul(g, self.rho / (_norm(g) + 1e-12))
            del g, out
            with torch.no_grad():
                torch._foreach_add_(self.params, e)
            del e
            self.model(**batch).logits.backward(grad_logits)
            with torch.no_grad():
                torch._foreach_copy_(self.params, self.w)
            return
        g = _grad(self.model(**batch).loss, self.params)
        if self.flags.get("msam_precondition") == "adam" and self.optimizer.state:  # P g, P = 1/(√v̂ + ε)
            group = self.optimizer.param_groups[0]
            beta2, eps = group["betas"][1], group["eps"]
            for g_i, p in zip(g, self.params):
                state = self.optimizer.state[p]
                g_i.div_((state["exp_avg_sq"] / (1 - beta2 ** state["step"])).sqrt_().add_(eps))
        if method == "looksam" and self.g_v is not None and (self.t - 1) % self.flags["msam_looksam_k"]:
            scale = self.flags.get("alpha", 0.7) * _norm(g) / _norm(self.g_v)  # reuse: g + α‖g‖/‖g_v‖ g_v
            torch._foreach_add_(g, torch._foreach_mul(self.g_v, scale))
            self.set_grad(g)
            return
        if method == "fsam":  # d = g − σm, m ← λm + (1 − λ)g  (σ = 1, λ = 0.95)
            if self.m is None:
                self.m, d = [t.clone() for t in g], g
            else:
                d = torch._foreach_sub(g, self.m)
                torch._foreach_lerp_(self.m, g, 0.05)
        else:
            d = g
        e = torch._foreach_mul(d, self.rho / (_norm(d) + 1e-12))
        del d
        g_p = self.perturbed_grad(batch, e)
        del e
        if method == "gsam":  # g_p − α(g − s·g_p), α = 0.1
            s = _dot(g, g_p) / _dot(g_p, g_p)
            torch._foreach_mul_(g_p, 1 + 0.1 * s)
            torch._foreach_add_(g_p, g, alpha=-0.1)
        elif method == "looksam":  # keep g_v = g_p − (⟨g, g_p⟩/‖g‖²)·g
            s = _dot(g, g_p) / _dot(g, g)
            self.g_v = torch._foreach_sub(g_p, torch._foreach_mul(g, s))
        self.set_grad(g_p)


def run_loop(config: Config, opts: argparse.Namespace, device: torch.device, lockstep: Lockstep) -> None:
    """The hand-written floor: the step the Trainer takes by default, without the Trainer."""
    model = build_model(opts, device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    total_steps = opts.warmup + opts.steps
    optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE, weight_decay=0.0, fused=True)  # Trainer: adamw_torch_fused
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / total_steps)  # Trainer: linear
    examples = synthetic_examples(opts)
    batches = [
        {k: torch.stack([e[k] for e in examples[i : i + opts.batch_size]]) for k in examples[0]}
        for i in range(0, len(examples), opts.batch_size)
    ]
    method = HandwrittenMethod(config, model, params, optimizer) if config.flags else None
    for batch in batches:
        lockstep.begin()
        batch = {k: v.to(device) for k, v in batch.items()}
        if method is not None:
            method.step(batch)
        elif config.rho == 0:
            model(**batch).loss.backward()
        else:
            handwritten_msam_backward(model, params, batch, config.rho, config.micro_batch_size)
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        lockstep.end()


def worker(config: Config, opts: argparse.Namespace, conn, for_memory: bool) -> None:
    torch.set_num_threads(opts.threads)
    # Resolved here, not in the parent: CUDA initialized before a fork is unusable in the child.
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if opts.device == "auto" else opts.device)
    if for_memory and device.type == "cpu":
        return_freed_memory_at_once()
    lockstep = Lockstep(device, conn, count_kernels=getattr(opts, "counting", False))
    with contextlib.redirect_stdout(io.StringIO()):  # the Trainer prints its final metrics
        (run_loop if config.runner == "loop" else run_trainer)(config, opts, device, lockstep)
    lockstep.finish()


# ---------------------------------------------------------------------------------------------
# Parent: start the workers, step them in turn, report
# ---------------------------------------------------------------------------------------------


class Worker:
    """A forked worker process running one configuration, and what it reported."""

    def __init__(self, config: Config, opts: argparse.Namespace, for_memory: bool):
        self.config = config
        context = multiprocessing.get_context("fork")  # the children reuse this process's imports
        self.conn, child_conn = context.Pipe()
        args = (config, opts, child_conn, for_memory)
        self.process = context.Process(target=worker, args=args, name=config.key, daemon=True)
        self.process.start()
        child_conn.close()  # the child's end now lives in the child only: recv() sees EOF if it dies
        self.times: list[float] = []
        self.peak_memory_bytes = 0

    def receive(self) -> dict:
        try:
            return self.conn.recv()
        except EOFError:
            exitcode = self.process.exitcode
            raise RuntimeError(f"worker {self.config.key} died (exit code {exitcode}); see its traceback above") from None

    def step(self) -> None:
        self.conn.send("go")
        message = self.receive()
        self.times.append(message["step_time"])
        self.peak_memory_bytes = message.get("peak_memory_bytes", self.peak_memory_bytes)
        self.kernels = message.get("kernels", getattr(self, "kernels", None))


def trainable_parameter_bytes(opts: argparse.Namespace) -> int:
    model = build_model(opts, torch.device("cpu"))
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def run_in_lockstep(
    configs: list[Config], opts: argparse.Namespace, for_memory: bool = False
) -> tuple[set[str], list[Worker]]:
    """Start a worker per configuration, and step them in turn, in an order that rotates every round."""
    workers = [Worker(config, opts, for_memory) for config in configs]
    try:
        devices = {w.receive()["ready"] for w in workers}  # model built, about to take its first step
        for round_ in range(opts.warmup + opts.steps):
            shift = round_ % len(workers)
            for w in workers[shift:] + workers[:shift]:
                w.step()
            if not for_memory:
                print(f"timing: round {round_ + 1}/{opts.warmup + opts.steps}", file=sys.stderr, flush=True)
        for w in workers:
            w.process.join()
    finally:
        for w in workers:
            if w.process.is_alive():
                w.process.kill()
    return devices, workers


def measure(opts: argparse.Namespace) -> dict:
    load_before = os.getloadavg()
    if opts.counts:
        configs = sweep_configurations(opts.batch_size, opts.counts, opts.lora)
    else:
        configs = configurations(opts.micro_batch_sizes, opts.lora)
    if opts.rows:
        unknown = set(opts.rows) - {c.key for c in configs}
        if unknown:
            raise SystemExit(f"unknown --rows {sorted(unknown)}; known: {[c.key for c in configs]}")
        needed = set(opts.rows) | {"trainer"}
        if needed & {"msam_gsam", "msam_fsam"}:
            needed.add("msam_sam")  # their targets are relative to SAM
        needed |= {c.floor for c in configs if c.key in needed}
        configs = [c for c in configs if c.key in needed]
    devices, workers = run_in_lockstep(configs, opts)
    memory_opts = argparse.Namespace(**{**vars(opts), "warmup": 0, "steps": MEMORY_STEPS})
    peak = {}
    for config in configs:  # one at a time, each alone on the machine
        peak[config.key] = run_in_lockstep([config], memory_opts, for_memory=True)[1][0].peak_memory_bytes
        print(f"memory: {config.label} done", file=sys.stderr, flush=True)

    kernels = {}
    if opts.count_kernels:  # a third pass: KERNEL_STEPS steps (a whole period of every mixed-step method), counted
        count_opts = argparse.Namespace(**{**vars(opts), "warmup": 0, "steps": KERNEL_STEPS, "counting": True})
        for config in configs:
            kernels[config.key] = run_in_lockstep([config], count_opts, for_memory=True)[1][0].kernels
            print(f"kernels: {config.label} done", file=sys.stderr, flush=True)

    param_bytes = trainable_parameter_bytes(opts)
    by_key = {w.config.key: w for w in workers}
    median = {
        key: (statistics.fmean if w.config.stat == "mean" else statistics.median)(w.times[opts.warmup :])
        for key, w in by_key.items()
    }
    rows = []
    for key, w in by_key.items():
        measured = w.times[opts.warmup :]
        q1, _, q3 = statistics.quantiles(measured, n=4) if len(measured) > 1 else (measured[0],) * 3
        rows.append(
            {
                **asdict(w.config),
                "median_s": median[key],  # the mean for rows with stat "mean"
                "mean_s": statistics.fmean(measured),
                "q1_s": q1,
                "q3_s": q3,
                "vs_trainer": median[key] / median["trainer"],
                "vs_floor": median[key] / median[w.config.floor],
                "vs_sam": median[key] / median["msam_sam"] if "msam_sam" in median else None,
                "peak_memory_bytes": peak[key],
                "extra_vs_trainer_param_copies": (peak[key] - peak["trainer"]) / param_bytes,
                "kernels_per_step": kernels.get(key),
                "kernels_vs_floor": kernels[key] / kernels[w.config.floor] if kernels else None,
                "step_times_s": measured,
            }
        )
    return {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "device": ", ".join(sorted(devices)),
            "torch": torch.__version__,
            "threads": opts.threads,
            "load_average_before_after": [load_before, os.getloadavg()],  # other work on the machine adds noise
        },
        "settings": {k: v for k, v in vars(opts).items() if k != "json"},
        "trainable_param_bytes": param_bytes,
        "memory_measure": (
            f"peak RSS (ru_maxrss) of a fresh worker taking {MEMORY_STEPS} steps, malloc returning freed blocks at once"
            if devices == {"cpu"}
            else f"torch.cuda.max_memory_allocated of a fresh worker taking {MEMORY_STEPS} steps"
        ),
        "targets": check_sweep_targets(rows, param_bytes) if opts.counts else check_targets(rows),
        "rows": rows,
    }


def check_targets(rows: list[dict]) -> dict:
    row = {r["key"]: r for r in rows}
    sam_rows = [r for r in rows if r["runner"] == "msam" and r["rho"] > 0 and not r["flags"]]
    methods = {}
    for key, target in METHOD_TARGETS.items():
        if key in row:
            base = row["msam_sam"] if key in ("msam_gsam", "msam_fsam") else row["trainer"]
            methods[key] = row[key]["median_s"] / base["median_s"] <= target
    return {
        "methods_vs_trainer_or_sam": methods,
        "rho0_within_3pct_of_trainer": row["msam_rho0"]["vs_trainer"] <= TARGETS["rho0_vs_trainer"] if "msam_rho0" in row else None,
        "sam_msam_within_5pct_of_floor": {r["key"]: r["vs_floor"] <= TARGETS["sam_vs_floor"] for r in sam_rows},
        "extra_memory_at_most_2_param_copies": {
            r["key"]: r["extra_vs_trainer_param_copies"] <= TARGETS["extra_param_copies"] for r in sam_rows
        },
    }


def check_sweep_targets(rows: list[dict], param_bytes: int) -> dict:
    row = {r["key"]: r for r in rows}
    memory = {}
    for r in rows:
        found = re.fullmatch(r"(flat_)?k(\d+)_(seq|vec)", r["key"])
        base = "msam_flat_lora" if found and found.group(1) else "msam_sam"  # Flat-LoRA's rows: over its whole-batch row
        if found and base in row:
            k = int(found.group(2))
            bound = (row[base]["peak_memory_bytes"] + k * param_bytes) * SWEEP_TARGETS["memory_over_sam_plus_k_copies"]
            memory[r["key"]] = r["peak_memory_bytes"] <= bound
    return {
        "k8_vectorized_at_most_1.3x_sam": (  # None where the SAM row was not run (--rows without msam_sam)
            row["k8_vec"]["vs_sam"] <= SWEEP_TARGETS["k8_vectorized_vs_sam"]
            if "k8_vec" in row and row["k8_vec"]["vs_sam"] is not None else None
        ),
        "peak_memory_at_most_sam_plus_k_copies_plus_10pct": memory,
    }


def markdown_table(result: dict) -> str:
    lines = [
        "| configuration | median step (s) | IQR (s) | vs Trainer | vs SAM | vs floor | peak memory (MB) | extra vs Trainer (param copies) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        vs_floor = "floor" if r["key"] == r["floor"] else f"{r['vs_floor']:.3f}"
        vs_sam = "" if r.get("vs_sam") is None else f"{r['vs_sam']:.3f}"
        label = r["label"] + (" (mean)" if r.get("stat") == "mean" else "")
        lines.append(
            f"| {label} | {r['median_s']:.4f} | {r['q1_s']:.4f}–{r['q3_s']:.4f} | {r['vs_trainer']:.3f} | {vs_sam} | {vs_floor} "
            f"| {r['peak_memory_bytes'] / 2**20:.1f} | {r['extra_vs_trainer_param_copies']:+.2f} |"
        )
    if any(r.get("kernels_per_step") for r in result["rows"]):
        lines += ["", "| configuration | kernels per step (mean) | vs floor |", "|---|---:|---:|"]
        lines += [f"| {r['label']} | {r['kernels_per_step']:.0f} | {r['kernels_vs_floor']:.3f} |" for r in result["rows"]]
    lines.append(f"\ntrainable parameters: {result['trainable_param_bytes'] / 2**20:.1f} MB (one copy)")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="measured steps per configuration")
    parser.add_argument("--warmup", type=int, default=3, help="steps per configuration left out of the figures")
    parser.add_argument("--batch-size", type=int, default=32, help="per-device batch size")
    parser.add_argument("--micro-batch-sizes", type=int, nargs="+", default=[8, 4], help="mSAM micro-batch sizes")
    parser.add_argument(
        "--counts", type=int, nargs="+",
        help="the paths' rows instead of the default ones: mSAM with each number k of micro-batches per device, on the "
        "sequential and on the vectorized path, next to SAM (e.g. --counts 2 4 8 16)",
    )
    parser.add_argument("--model", choices=["bert", "llama", "vit"], default="bert",
                        help="BertForSequenceClassification, LlamaForCausalLM (tied embeddings) or ViTForImageClassification")
    parser.add_argument("--lora", type=int, default=0, metavar="R",
                        help="wrap the model with PEFT LoRA of rank R on the attention's query and value projections "
                        "(only the adapters train), and add Flat-LoRA's rows; 0 (default): the full model")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N; auto: cuda when available")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads in every worker")
    parser.add_argument("--json", help="also write the JSON result to this path")
    parser.add_argument("--rows", nargs="+", help="only these configuration keys (e.g. trainer msam_sam msam_gsam loop_gsam)")
    parser.add_argument("--count-kernels", action="store_true",
                        help=f"also count each row's kernels per step (non-view aten operators, a GPU's launches), over "
                             f"{KERNEL_STEPS} steps in a worker of its own: the per-step overhead, independent of the device")
    parser.add_argument("--bf16", action="store_true",
                        help="bf16 mixed precision (autocast) in the Trainer rows (the hand-written floors stay float32)")
    parser.add_argument("--activation-checkpointing", action="store_true",
                        help="activation checkpointing (transformers' non-reentrant default) in the Trainer rows")
    parser.add_argument("--image-size", type=int, default=VIT_IMAGE, help="ViT: image side in pixels (224 for ViT-B/16)")
    parser.add_argument("--patch-size", type=int, default=VIT_PATCH, help="ViT: patch side in pixels (16 for ViT-B/16)")
    parser.add_argument("--quick", action="store_true", help="tiny model, few steps (other flags still apply): a smoke test")
    opts = parser.parse_args(argv)
    if opts.quick:
        parser.set_defaults(**QUICK)
        opts = parser.parse_args(argv)
    return opts


def main(argv: list[str] | None = None) -> None:
    opts = parse_args(argv)
    result = measure(opts)
    print(markdown_table(result))
    print(json.dumps(result["targets"], indent=2))
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(result, f, indent=2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
