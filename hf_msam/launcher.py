"""`hf-msam run SCRIPT.py [ARGS...]`: train an unmodified `transformers.Trainer` script with mSAM.

Before the script runs, `transformers.Trainer` and `transformers.TrainingArguments` (and their
Seq2Seq variants) are swapped for subclasses of `MSAMTrainer` and `MSAMTrainingArguments`, in the
`transformers` namespace and in every `transformers.*` module that holds them. A script that imports
them, subclasses them, or parses them with `HfArgumentParser` then trains with mSAM unchanged.

The `--msam_*` flags are taken off the command line by the launcher and applied to every training
arguments object the script builds, so they work for `HfArgumentParser` scripts, `argparse` scripts
and scripts that build `TrainingArguments(...)` in code alike; they win over values from a JSON config.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import runpy
import sys
import typing
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from transformers import HfArgumentParser, Seq2SeqTrainer, Seq2SeqTrainingArguments, Trainer, TrainingArguments

from .trainer import MSAMMixin, MSAMTrainer
from .training_args import MSAMTrainingArguments, msam_setting

__all__ = ["LauncherError", "MSAMScriptTrainer", "MSAMScriptTrainingArguments", "patched_transformers", "run"]


class LauncherError(RuntimeError):
    """The script cannot be trained with mSAM as it is."""


# The --msam_* flags given on the command line (only those given), applied by MSAMScriptTrainingArguments.
_flag_values: dict[str, Any] = {}
_trainers_created = 0


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _say(message: str) -> None:
    if _is_main_process():
        print(f"hf-msam: {message}", file=sys.stderr, flush=True)


@dataclasses.dataclass
class MSAMScriptTrainingArguments(MSAMTrainingArguments):
    """`transformers.TrainingArguments` inside `hf-msam run`: `MSAMTrainingArguments`, with the `--msam_*` flags
    given on the command line applied over whatever the script set."""

    def __post_init__(self):
        for name, value in _flag_values.items():
            setattr(self, name, value)
        super().__post_init__()


@dataclasses.dataclass
class MSAMScriptSeq2SeqTrainingArguments(MSAMScriptTrainingArguments, Seq2SeqTrainingArguments):
    """`transformers.Seq2SeqTrainingArguments` inside `hf-msam run`."""


def _check_patchable(cls: type) -> None:
    owner = next(c for c in cls.__mro__ if "training_step" in vars(c))
    if owner is not MSAMMixin:
        raise LauncherError(
            f"`{cls.__qualname__}` overrides `training_step` (in `{owner.__module__}.{owner.__qualname__}`), "
            "the step mSAM replaces, so `hf-msam run` cannot train it with mSAM. Move the custom logic to "
            "`compute_loss` or a `TrainerCallback`, or make the class subclass `hf_msam.MSAMTrainer` and run the "
            "script directly."
        )


class MSAMScriptTrainer(MSAMTrainer):
    """`transformers.Trainer` inside `hf-msam run`: an `MSAMTrainer` that refuses subclasses it cannot train."""

    def __init__(self, *args: Any, **kwargs: Any):
        global _trainers_created
        _check_patchable(type(self))
        super().__init__(*args, **kwargs)
        _trainers_created += 1
        if self.is_world_process_zero():
            name = type(self).__qualname__
            if not self.msam_perturbation.enabled:
                print(f"hf-msam: {name}: msam_rho=0, plain optimizer steps (the baseline).", file=sys.stderr, flush=True)
                return
            processes, accumulation = self.args.world_size, self.args.gradient_accumulation_steps
            micro = self.msam_perturbations_per_step // (processes * accumulation)
            print(
                f"hf-msam: {name} trains with mSAM (msam_rho={msam_setting(self.args, 'msam_rho')}, "
                f"msam_micro_batch_size={self.msam_micro_batch_size}, "
                f"msam_adaptive={msam_setting(self.args, 'msam_adaptive')}): {self.msam_perturbations_per_step} "
                f"perturbations per optimizer step ({processes} process(es) x {accumulation} accumulation step(s) x "
                f"{micro} micro-batch(es)).",
                file=sys.stderr,
                flush=True,
            )


class MSAMScriptSeq2SeqTrainer(MSAMScriptTrainer, Seq2SeqTrainer):
    """`transformers.Seq2SeqTrainer` inside `hf-msam run`."""


_SWAPS = {
    Trainer: MSAMScriptTrainer,
    TrainingArguments: MSAMScriptTrainingArguments,
    Seq2SeqTrainer: MSAMScriptSeq2SeqTrainer,
    Seq2SeqTrainingArguments: MSAMScriptSeq2SeqTrainingArguments,
}


def parse_msam_flags(args: Sequence[str]) -> tuple[dict[str, Any], list[str]]:
    """Split `args` into the `--msam_*` flags given (name -> value) and the script's own arguments."""
    hints = typing.get_type_hints(MSAMTrainingArguments)
    msam_fields = [f for f in dataclasses.fields(MSAMTrainingArguments) if f.name.startswith("msam_")]
    flags = dataclasses.make_dataclass(
        "MSAMFlags",
        [(f.name, hints[f.name], dataclasses.field(default=f.default, metadata=f.metadata)) for f in msam_fields],
    )
    parser = HfArgumentParser(flags, prog="hf-msam run", add_help=False, allow_abbrev=False)
    for action in parser._actions:
        action.default = argparse.SUPPRESS  # keep only the flags given
    given, rest = parser.parse_known_args(list(args))
    return vars(given), rest


@contextlib.contextmanager
def patched_transformers(flag_values: dict[str, Any] | None = None) -> Iterator[dict[str, str]]:
    """Swap the `transformers` training classes for the mSAM ones while inside; yields {original: swapped} names."""
    saved = []
    for name, module in list(sys.modules.items()):
        if name != "transformers" and not name.startswith("transformers."):
            continue
        for original, swapped in _SWAPS.items():
            attr = original.__name__
            # The top-level lazy module resolves names on first access: set them there even when not yet cached.
            if vars(module).get(attr) is original or (name == "transformers" and attr not in vars(module)):
                saved.append((module, attr, vars(module).get(attr)))
                setattr(module, attr, swapped)
    _flag_values.clear()
    _flag_values.update(flag_values or {})
    try:
        yield {original.__name__: swapped.__name__ for original, swapped in _SWAPS.items()}
    finally:
        _flag_values.clear()
        for module, attr, value in reversed(saved):
            if value is None:
                delattr(module, attr)  # back to the lazy import
            else:
                setattr(module, attr, value)


def run(script: str, args: Sequence[str]) -> None:
    """Run `script` as `__main__` with `args` as its command line, training with mSAM."""
    global _trainers_created
    path = Path(script)
    if not path.is_file():
        raise LauncherError(f"{script}: no such file. Usage: hf-msam run SCRIPT.py [ARGS...]")
    flag_values, script_args = parse_msam_flags(args)
    saved_argv, saved_path = sys.argv, list(sys.path)
    sys.argv = [str(path), *script_args]
    sys.path.insert(0, str(path.resolve().parent))  # what `python SCRIPT.py` does, for the script's own imports
    _trainers_created = 0
    try:
        with patched_transformers(flag_values) as swaps:
            swapped = ", ".join(f"{original} -> hf_msam.launcher.{new}" for original, new in swaps.items())
            given = ", ".join(f"{name}={value}" for name, value in flag_values.items()) or "none, mSAM defaults"
            _say(
                f"running {path.name} with mSAM. Swapped in transformers: {swapped} (subclasses of MSAMTrainer and "
                f"MSAMTrainingArguments). --msam_* flags given: {given}."
            )
            runpy.run_path(str(path), run_name="__main__")
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
    if _trainers_created == 0:
        _say(
            f"{path.name} finished without creating a transformers.Trainer: mSAM was not used. `hf-msam run` only "
            "reaches scripts that build their trainer from transformers.Trainer (or a subclass of it)."
        )
