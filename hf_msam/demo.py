"""`hf-msam demo`: plain training, SAM and mSAM on digits with noisy labels, in a few minutes on a CPU.

The data are scikit-learn's 1,797 handwritten 8x8 digits (`sklearn.datasets.load_digits`, shipped with the
package: nothing is downloaded). A fixed-seed split keeps 500 of them as a clean test set; of the rest, a known
fraction (40% by default) get their label replaced by a different, uniformly drawn one (symmetric label noise).
A tiny vision transformer, built from a `ViTConfig` with random weights, is trained three times from the same
initialization on the same batches: with the plain optimizer (`MSAMTrainer` with `msam_rho=0`, which is the
plain `Trainer` step), with SAM (one perturbation per batch) and with mSAM (one perturbation per quarter batch).

Under label noise, a network trained long enough memorizes the wrong labels, and its test accuracy falls; SAM
is known to resist that (Foret et al. 2021, section 4). The demo prints, for each run, the clean test accuracy,
the accuracy on the (noisy) training labels, the fraction of flipped examples fitted to their wrong label
(memorization), the flatness at the end and the wall time, and writes `report.md` and `report.png` through
`hf_msam.compare`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

__all__ = ["DemoSettings", "FULL", "QUICK", "main", "noisy_digits", "run_demo"]


@dataclass(frozen=True)
class DemoSettings:
    """Everything that defines a demo run. `FULL` and `QUICK` are the two the command offers."""

    noise: float = 0.4  # fraction of training labels flipped
    seed: int = 0  # data split, label noise, initialization and batch order
    test_size: int = 500
    epochs: int = 60
    batch_size: int = 128
    learning_rate: float = 3e-3
    weight_decay: float = 0.0
    rho: float = 0.1  # SAM and mSAM
    micro_batches: int = 4  # mSAM: micro-batch size = batch_size // micro_batches
    hidden_size: int = 64
    layers: int = 2
    heads: int = 4
    patch_size: int = 2
    eval_every_epochs: int = 5
    flatness_iters: int = 20

    def __post_init__(self):
        if not 0.0 <= self.noise < 0.9:
            raise ValueError(f"--noise must be in [0, 0.9) (the fraction of training labels flipped), got {self.noise}.")
        if self.batch_size % self.micro_batches:
            raise ValueError(f"batch_size {self.batch_size} must be a multiple of micro_batches {self.micro_batches}.")


FULL = DemoSettings()
QUICK = replace(FULL, epochs=6, eval_every_epochs=3, flatness_iters=10)

NUM_CLASSES = 10


# ---------------------------------------------------------------------------------------------
# Data and model
# ---------------------------------------------------------------------------------------------


class _Examples(torch.utils.data.Dataset):
    """Images (N, 1, 8, 8) and labels as the dicts a `ViTForImageClassification` takes."""

    def __init__(self, pixels: torch.Tensor, labels: torch.Tensor):
        self.pixels, self.labels = pixels, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.pixels[i], "labels": self.labels[i]}


def noisy_digits(noise: float, seed: int, test_size: int = 500) -> dict[str, Any]:
    """The digits, split into train and test, with `noise` of the training labels flipped to another class.

    Returns `train` (noisy labels), `test` (clean), `flipped` (the flipped training examples with their wrong
    labels: accuracy on it is the fraction memorized), and the tensors behind them (`clean_train_labels`,
    `noisy_train_labels`, `flipped_mask`).
    """
    try:
        from sklearn.datasets import load_digits
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(
            "hf-msam demo needs scikit-learn for its data set (load_digits): pip install 'hf-msam[examples]'",
            name=error.name,
        ) from error
    digits = load_digits()
    pixels = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # gray levels 0..16
    pixels = (pixels - 0.5) / 0.5
    labels = torch.tensor(digits.target, dtype=torch.long)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=generator)
    test, train = order[:test_size], order[test_size:]
    clean = labels[train]
    flipped = torch.zeros(len(train), dtype=torch.bool)
    flipped[torch.randperm(len(train), generator=generator)[: round(noise * len(train))]] = True
    # A flipped label is uniform over the other nine classes: symmetric noise.
    shift = torch.randint(1, NUM_CLASSES, (len(train),), generator=generator)
    noisy = torch.where(flipped, (clean + shift) % NUM_CLASSES, clean)
    return {
        "train": _Examples(pixels[train], noisy),
        "test": _Examples(pixels[test], labels[test]),
        "flipped": _Examples(pixels[train][flipped], noisy[flipped]),
        "clean_train_labels": clean,
        "noisy_train_labels": noisy,
        "flipped_mask": flipped,
    }


def tiny_vit(settings: DemoSettings):
    """A randomly initialized ViT for 8x8 grayscale digits (about 70k parameters with the defaults)."""
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        image_size=8,
        patch_size=settings.patch_size,
        num_channels=1,
        hidden_size=settings.hidden_size,
        num_hidden_layers=settings.layers,
        num_attention_heads=settings.heads,
        intermediate_size=2 * settings.hidden_size,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=NUM_CLASSES,
    )
    torch.manual_seed(settings.seed)
    return ViTForImageClassification(config)


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def _accuracy(prediction) -> dict[str, float]:
    return {"accuracy": float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())}


def _progress_callback(description: str, total_runs: int, position: int):
    """One progress bar a run, over optimizer steps, showing the last clean test accuracy."""
    from tqdm.auto import tqdm
    from transformers import TrainerCallback

    class DemoProgress(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.bar = tqdm(total=state.max_steps, desc=f"[{position}/{total_runs}] {description}", unit="step",
                            dynamic_ncols=True)

        def on_step_end(self, args, state, control, **kwargs):
            self.bar.update(state.global_step - self.bar.n)

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            if metrics and "eval_test_accuracy" in metrics:
                self.bar.set_postfix(test_acc=f"{metrics['eval_test_accuracy']:.3f}")

        def on_train_end(self, args, state, control, **kwargs):
            self.bar.close()

    return DemoProgress()


METHODS = {  # name: (description, mSAM settings as a function of the demo settings)
    "adamw": ("AdamW, plain (rho=0)", lambda s: {"msam_rho": 0.0, "msam_micro_batch_size": None}),
    "sam": ("SAM (one perturbation a batch)", lambda s: {"msam_rho": s.rho, "msam_micro_batch_size": None}),
    "msam": (
        "mSAM (micro-batches of a quarter batch)",
        lambda s: {"msam_rho": s.rho, "msam_micro_batch_size": s.batch_size // s.micro_batches},
    ),
}


def train_run(name: str, settings: DemoSettings, data: dict[str, Any], output_dir: Path, position: int = 1,
              total_runs: int = 1) -> dict[str, float]:
    """Train one method into `output_dir` and return its final metrics (also in `output_dir/all_results.json`)."""
    from safetensors.torch import save_file
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from . import MSAMTrainer, MSAMTrainingArguments
    from .flatness import hessian_top_eigenvalue, hessian_trace, sharpness

    description, msam = METHODS[name]
    steps_per_epoch = -(-len(data["train"]) // settings.batch_size)
    args = MSAMTrainingArguments(
        output_dir=str(output_dir),
        num_train_epochs=settings.epochs,
        per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=256,
        learning_rate=settings.learning_rate,
        weight_decay=settings.weight_decay,
        lr_scheduler_type="linear",
        warmup_steps=steps_per_epoch,
        eval_strategy="steps",
        eval_steps=settings.eval_every_epochs * steps_per_epoch,
        logging_steps=steps_per_epoch,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=settings.seed,
        data_seed=settings.seed,
        dataloader_num_workers=0,
        log_level="warning",
        disable_tqdm=True,
        **msam(settings),
    )
    trainer = MSAMTrainer(
        model=tiny_vit(settings),
        args=args,
        train_dataset=data["train"],
        eval_dataset={"test": data["test"], "train": data["train"], "flipped": data["flipped"]},
        compute_metrics=_accuracy,
    )
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(_progress_callback(description, total_runs, position))
    started = time.perf_counter()
    train_metrics = trainer.train().metrics
    train_metrics["train_wall_time"] = time.perf_counter() - started
    metrics = trainer.evaluate()  # the final evaluation, on all three sets
    # Flatness at the end of the loss that was minimized (noisy training labels), the same measurement for every run.
    batches = list(itertools.islice(trainer.get_eval_dataloader(data["train"]), 2))
    metrics["eval_hessian_top_eigenvalue"] = hessian_top_eigenvalue(
        trainer.model, batches, iters=settings.flatness_iters, progress_bar=False
    )
    metrics["eval_hessian_trace"] = hessian_trace(
        trainer.model, batches, samples=settings.flatness_iters, progress_bar=False
    )
    metrics["eval_sharpness"] = sharpness(trainer.model, batches, rho=0.05, progress_bar=False)
    # The weights (config.json, model.safetensors: `ViTForImageClassification.from_pretrained(output_dir)` loads them).
    trainer.model.config.save_pretrained(output_dir)
    save_file(trainer.model.state_dict(), output_dir / "model.safetensors", metadata={"format": "pt"})
    torch.save(trainer.args, output_dir / "training_args.bin")  # `hf-msam compare` reads the settings from it
    trainer.save_metrics("train", train_metrics)
    trainer.save_metrics("eval", metrics)
    trainer.save_state()
    return {**train_metrics, **metrics}


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------


def _negative_eigenvalue_note() -> str:
    from .compare import NEGATIVE_EIGENVALUE_MARK

    return (
        f"{NEGATIVE_EIGENVALUE_MARK} Negative λ_max(H): power iteration finds the Hessian eigenvalue of largest "
        "magnitude, which is the top one only at a minimum. A negative one means the weights are not at a minimum of "
        "the training loss (usual after --quick's few epochs), and the number does not say the run is flat."
    )


def _smoke_note(settings: DemoSettings) -> str | None:
    """What a shortened run (--quick) is, said before it starts and after its table: no verdict on SAM."""
    if settings.epochs >= FULL.epochs:
        return None
    return (
        f"SMOKE RUN (--quick, {settings.epochs} epochs of {FULL.epochs}): it checks that training, evaluation, the "
        "flatness measures and the report work. That is too short for the plain run to memorize the wrong labels, "
        "so its numbers say nothing about SAM or mSAM, and no run is better here. For the comparison, run "
        "`hf-msam demo` without --quick."
    )


def _table(results: dict[str, dict[str, float]]) -> list[str]:
    """The demo's table, one row a method, with the note that explains a † when a row has one."""
    from .compare import NEGATIVE_EIGENVALUE_MARK, eigenvalue_cell

    header = ["method", "test acc (clean)", "train acc (noisy labels)", "flipped labels memorized", "λ_max(H)",
              "sharpness at the end (ρ = 0.05)", "train time"]
    rows = []
    for name, m in results.items():
        rows.append([
            METHODS[name][0],
            f"{m['eval_test_accuracy']:.1%}",
            f"{m['eval_train_accuracy']:.1%}",
            f"{m['eval_flipped_accuracy']:.1%}",
            eigenvalue_cell(m["eval_hessian_top_eigenvalue"]),
            f"{m['eval_sharpness']:.3g}",
            f"{m['train_wall_time']:.0f} s",
        ])
    table = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1),
             *("| " + " | ".join(row) + " |" for row in rows)]
    if any(NEGATIVE_EIGENVALUE_MARK in cell for row in rows for cell in row):
        table += ["", _negative_eigenvalue_note()]
    return table


def run_demo(output: str | Path, settings: DemoSettings, methods: tuple[str, ...] = tuple(METHODS)) -> dict:
    """Train each method, write OUTPUT/report.md and OUTPUT/report.png; returns {method: final metrics}."""
    from . import compare

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    data = noisy_digits(settings.noise, settings.seed, settings.test_size)
    flipped = int(data["flipped_mask"].sum())
    print(
        f"hf-msam demo: {len(data['train'])} training digits, {flipped} ({settings.noise:.0%}) of them with a wrong "
        f"label; {len(data['test'])} clean test digits. A {settings.layers}-layer ViT, {settings.epochs} epochs, "
        f"batch {settings.batch_size}, rho {settings.rho:g}, threads {torch.get_num_threads()}.",
        flush=True,
    )
    smoke = _smoke_note(settings)
    if smoke:
        print(smoke, flush=True)
    results = {}
    started = time.perf_counter()
    for position, name in enumerate(methods, 1):
        results[name] = train_run(name, settings, data, output / name, position, len(methods))
    elapsed = time.perf_counter() - started

    runs = [compare.load_run(output / name, name=name) for name in methods]
    report, figure = output / "report.md", output / "report.png"
    compare.plot_runs(runs, figure, metric="eval_test_accuracy")
    compare.write_report(runs, [], report, figure=figure.name)
    table = _table(results)
    intro = [
        "# hf-msam demo: label noise",
        "",
        *([f"**{smoke}**", ""] if smoke else []),
        f"{len(data['train'])} of scikit-learn's 8x8 digits for training, {flipped} ({settings.noise:.0%}) of them "
        f"with their label flipped to another class at random (seed {settings.seed}); {len(data['test'])} clean digits "
        "for testing. The same tiny ViT initialization and batches for every method. *test acc*: accuracy on the "
        "clean test labels; *train acc*: on the noisy training labels; *flipped labels memorized*: the share of "
        "flipped examples predicted as their wrong label. λ_max(H), tr(H) and sharpness (at ρ = 0.05 for every run): "
        "of the loss on the first 512 noisy training examples at the end, the loss that training minimized (here, "
        "not the evaluation loss that the table of `hf-msam compare` below speaks of). Train time is wall time.",
        "",
        *table,
        "",
        f"Settings: `{json.dumps(asdict(settings))}`",
        "",
        "In the table below (from `hf-msam compare`), `eval_test_*` is the clean test set, `eval_train_*` the noisy "
        "training set and `eval_flipped_*` its flipped part.",
        "",
    ]
    compared = report.read_text(encoding="utf-8").replace("# hf-msam compare", "## hf-msam compare", 1)
    report.write_text("\n".join(intro) + "\n" + compared, encoding="utf-8")
    print("\n" + "\n".join(table) + "\n")
    if smoke:
        print(smoke)
    print(f"hf-msam demo: done in {elapsed / 60:.1f} min. Report: {report.resolve()} (figure: {figure.resolve()})")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="hf-msam demo",
        description="Train a tiny ViT on scikit-learn's 8x8 digits with a fraction (default 40 percent) of the "
        "training labels flipped, with the plain optimizer, SAM and mSAM, then print a table (clean test accuracy, "
        "memorization of the wrong labels, flatness, time) and write OUTPUT/report.md and OUTPUT/report.png. "
        "Offline, on one CPU thread: about 3 minutes on an idle machine (2.7 min measured on 2 cores), up to about 8 "
        "on a busy one (7.7 min measured with other jobs running); --quick: about 40 s on an idle machine.",
    )
    parser.add_argument("--output", default="hf-msam-demo", help="where to write the runs and the report "
                        "(default: ./hf-msam-demo)")
    parser.add_argument("--quick", action="store_true", help="6 epochs instead of 60: a smoke run (about 40 s on an "
                        "idle 2-core machine), too short for the plain run to memorize the wrong labels")
    parser.add_argument("--noise", type=float, default=FULL.noise, help="fraction of training labels flipped "
                        f"(default: {FULL.noise})")
    parser.add_argument("--seed", type=int, default=FULL.seed, help=f"seed of everything (default: {FULL.seed})")
    argv = list(sys.argv[1:] if argv is None else argv)
    from .launcher import reject_msam_flags

    status = reject_msam_flags(
        argv, "hf-msam demo", "it trains its three fixed runs (plain, SAM and mSAM with rho 0.1). To train with your own "
        "mSAM settings, run your script with `hf-msam run SCRIPT.py --msam_rho ...`."
    )
    if status is not None:
        return status
    args = parser.parse_args(argv)
    try:
        settings = replace(QUICK if args.quick else FULL, noise=args.noise, seed=args.seed)
    except ValueError as error:
        parser.error(str(error))
    missing = [m for m in ("sklearn", "matplotlib", "tqdm") if _missing(m)]
    if missing:
        print(
            f"hf-msam demo: error: missing {', '.join(missing)}. Install the extras: pip install 'hf-msam[examples,flatness]'",
            file=sys.stderr,
        )
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    threads = torch.get_num_threads()
    # A model this small gains nothing from more threads, and on a busy machine extra threads slow it badly.
    torch.set_num_threads(1)
    try:
        run_demo(args.output, settings)
    finally:
        torch.set_num_threads(threads)
    return 0


def _missing(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is None


if __name__ == "__main__":
    sys.exit(main())
