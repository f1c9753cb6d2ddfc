"""`hf-msam run SCRIPT.py [ARGS...]` / `hf-msam run -m MODULE [ARGS...]`: train an unmodified
`transformers.Trainer` (or TRL) script with mSAM.

Before the script runs, `transformers.Trainer` and `transformers.TrainingArguments` (and their
Seq2Seq variants) are swapped for subclasses of `MSAMTrainer` and `MSAMTrainingArguments`, in the
`transformers` namespace and in every `transformers.*` module that holds them. A script that imports
them, subclasses them, or parses them with `HfArgumentParser` then trains with mSAM unchanged. TRL's
`SFTTrainer`/`DPOTrainer`/`RewardTrainer` and their configs are swapped for `hf_msam.trl`'s classes, and TRL's
`trl` command (`-m trl.cli.main`) starts its training processes through `hf-msam run`.

A subclass may override `training_step` if the override calls `super().training_step(...)`: one whose code does
not is refused before training, and if the mSAM step is still not reached by the first optimizer step, training
stops there with an error (before any weight moves).

The `--msam_*` flags are taken off the command line by the launcher and applied to every training
arguments object the script builds, so they work for `HfArgumentParser` scripts, `argparse` scripts
and scripts that build `TrainingArguments(...)` in code alike; they win over values from a JSON config.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import inspect
import os
import re
import runpy
import sys
import types
import typing
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from transformers import (
    HfArgumentParser,
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from .methods import REGISTRY
from .trainer import MSAMMixin, MSAMTrainer
from .training_args import (
    MSAMArguments,
    MSAMTrainingArguments,
    check_msam_settings,
    command_line_overrides,
    msam_default,
    msam_setting,
)

__all__ = [
    "FlagError",
    "end_process_group",
    "LauncherError",
    "MSAMScriptTrainer",
    "MSAMScriptTrainingArguments",
    "check_msam_flags",
    "patched_transformers",
    "run",
]


def end_process_group() -> None:
    """Tear down torch.distributed's default process group, if one is initialized. Call it once a multi-process run
    has finished (after the last collective): torch 2.14 with gloo sometimes aborts at interpreter exit otherwise
    ("terminate called without an active exception", SIGABRT; upstream pytorch issue 190489), turning a finished
    run into a failed job. `hf-msam run` does it after the script returns; a script run with `torchrun script.py`
    can call it (or `torch.distributed.barrier()` and `torch.distributed.destroy_process_group()`) as its last line."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        # Every process reaches this point before any tears its connections down: a process that tore down while
        # another still read from it aborted in one of 20 measured runs (benchmarks/README.md, gloo_exit.py).
        dist.barrier()
        dist.destroy_process_group()


class LauncherError(RuntimeError):
    """The script cannot be trained with mSAM as it is."""


class FlagError(LauncherError):
    """A `--msam_*` value given on the command line that cannot train: the command prints it as one line and exits
    with status 2 (with `HF_MSAM_TRACEBACK=1`, with its traceback)."""


# The --msam_* flags given on the command line (only those given): every MSAMArguments applies them.
_flag_values = command_line_overrides
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


@dataclasses.dataclass
class MSAMScriptSeq2SeqTrainingArguments(MSAMScriptTrainingArguments, Seq2SeqTrainingArguments):
    """`transformers.Seq2SeqTrainingArguments` inside `hf-msam run`."""


def _calls_super_training_step(function: Any) -> bool | None:
    """Whether `function`'s code calls `super().training_step` (names `super` and `training_step`, in it or in code
    nested in it); None when it has no Python code to read (the runtime check decides then)."""
    function = inspect.unwrap(function)
    code = getattr(function, "__code__", None)
    if code is None:
        return None
    names: set[str] = set()
    stack = [code]
    while stack:
        c = stack.pop()
        names.update(c.co_names)
        stack.extend(const for const in c.co_consts if isinstance(const, types.CodeType))
    return {"super", "training_step"} <= names


def _check_patchable(cls: type) -> None:
    """Refuse, before training, a class whose `training_step` override (outside hf_msam) does not call `super()`."""
    for klass in cls.__mro__:
        if klass is MSAMMixin or klass.__module__.split(".")[0] == "transformers":
            return
        if "training_step" not in vars(klass) or klass.__module__.split(".")[0] == "hf_msam":
            continue
        if _calls_super_training_step(vars(klass)["training_step"]) is False:
            raise LauncherError(
                f"`{cls.__qualname__}` overrides `training_step` (in `{klass.__module__}.{klass.__qualname__}`) "
                "without calling `super().training_step(...)`: it replaces the step mSAM changes, so `hf-msam run` "
                "cannot train it with mSAM. Call `super().training_step(model, inputs, num_items_in_batch)` in the "
                "override (code around the call is fine), move the custom logic to `compute_loss` or a "
                "`TrainerCallback`, or make the class subclass `hf_msam.MSAMTrainer` and run the script directly."
            )


class _CheckStepReached(TrainerCallback):
    """Stops training at the first optimizer step if the mSAM step was never reached (an override that calls
    `super().training_step` only sometimes, or not at all in a way the code check could not see)."""

    def __init__(self, trainer: Any):
        self.trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        trainer = self.trainer
        if trainer is None:
            return
        self.trainer = None  # check the first optimizer step only
        if not trainer._msam_script_step_reached:
            raise LauncherError(
                f"`{type(trainer).__qualname__}` reached its first optimizer step without running the mSAM step: its "
                "`training_step` override did not call `super().training_step(...)`. Stopped before updating the "
                "weights rather than train without mSAM. Make the override call `super().training_step(model, inputs, "
                "num_items_in_batch)` on every step, or move its logic to `compute_loss` or a `TrainerCallback`."
            )


class _ScriptTrainer:
    """What every trainer class `hf-msam run` swaps in adds: the checks above, the count of trainers created, and
    the start-up line."""

    def __init__(self, *args: Any, **kwargs: Any):
        global _trainers_created
        _check_patchable(type(self))
        super().__init__(*args, **kwargs)
        self._msam_script_step_reached = False
        self.add_callback(_CheckStepReached(self))
        _trainers_created += 1
        if self.is_world_process_zero():
            name = type(self).__qualname__
            if not self.msam_perturbation.enabled:
                print(f"hf-msam: {name}: msam_rho=0, plain optimizer steps (the baseline).", file=sys.stderr, flush=True)
                return
            print(
                f"hf-msam: {name} trains with mSAM (msam_rho={msam_setting(self.args, 'msam_rho')}, "
                f"msam_micro_batch_size={self.msam_micro_batch_size}, "
                f"msam_adaptive={msam_setting(self.args, 'msam_adaptive')}): {self.msam_perturbations_per_step} "
                f"perturbations per optimizer step ({self.msam_count('process(es)')}){self.msam_count_caveat}.",
                file=sys.stderr,
                flush=True,
            )

    def training_step(self, *args: Any, **kwargs: Any):
        # `transformers.Trainer` names the swapped class while the script runs, so code that calls the base step as
        # `transformers.Trainer.training_step(trainer, ...)` reaches this method: from inside a running mSAM step (the
        # engine computing a micro-batch's loss), or on a trainer that is not one of the swapped classes (an
        # MSAMTrainer the script built), it means transformers' own step.
        if not isinstance(self, _ScriptTrainer) or getattr(self, "_msam_script_in_step", False):
            return Trainer.training_step(self, *args, **kwargs)
        self._msam_script_step_reached = True
        self._msam_script_in_step = True
        try:
            return super().training_step(*args, **kwargs)
        finally:
            self._msam_script_in_step = False


class MSAMScriptTrainer(_ScriptTrainer, MSAMTrainer):
    """`transformers.Trainer` inside `hf-msam run`: an `MSAMTrainer` that refuses subclasses it cannot train."""


class MSAMScriptSeq2SeqTrainer(MSAMScriptTrainer, Seq2SeqTrainer):
    """`transformers.Seq2SeqTrainer` inside `hf-msam run`."""


_SWAPS = {
    Trainer: MSAMScriptTrainer,
    TrainingArguments: MSAMScriptTrainingArguments,
    Seq2SeqTrainer: MSAMScriptSeq2SeqTrainer,
    Seq2SeqTrainingArguments: MSAMScriptSeq2SeqTrainingArguments,
}

_TRL_CLASSES = ("SFTTrainer", "SFTConfig", "DPOTrainer", "DPOConfig", "RewardTrainer", "RewardConfig")


class _SwappedConfigType(type):
    """The type of a swapped TRL config: TRL's trainers check `isinstance(args, SFTConfig)` against the name in their
    module (swapped here), and convert other arguments through `to_dict()`, which masks every `*_token` field. Any
    instance of TRL's own config (hf_msam.trl's MSAM*Config, built by the script itself, included) passes."""

    def __instancecheck__(cls, instance: Any) -> bool:
        original = cls.__dict__.get("_msam_original")
        return super().__instancecheck__(instance) or (original is not None and isinstance(instance, original))


def _trl_swaps() -> dict[type, type]:
    """When TRL's trainers were imported before the launcher patched `transformers` (they then derive from the
    original `Trainer`), swap them too, for launcher versions of `hf_msam.trl`'s classes. When TRL is imported
    by the script itself, it builds its classes on the swapped `Trainer`/`TrainingArguments`: nothing to do."""
    if "trl.trainer.sft_trainer" not in sys.modules and "trl.trainer.dpo_trainer" not in sys.modules:
        return {}
    import trl

    from . import trl as msam_trl

    swaps = {}
    for name in _TRL_CLASSES:
        original = getattr(trl, name)
        if issubclass(original, (MSAMMixin, MSAMArguments)):
            continue  # built on the swapped classes during an earlier run
        swapped_name = f"MSAMScript{name}"
        swapped = globals().get(swapped_name)
        if swapped is None:  # built once, and kept here so that pickles (training_args.bin) find it by name
            ours = getattr(msam_trl, f"MSAM{name}")
            namespace = {"__module__": __name__, "__qualname__": swapped_name}
            if name.endswith("Config"):
                namespace["_msam_original"] = original
                swapped = dataclasses.dataclass(_SwappedConfigType(swapped_name, (ours,), namespace))
            else:
                swapped = type(swapped_name, (_ScriptTrainer, ours), namespace)
            globals()[swapped_name] = swapped
        swaps[original] = swapped
    return swaps


def _relaunch_with_msam(flag_values: dict[str, Any]):
    """A stand-in for `trl.cli.accelerate_launcher.launch_training_script`: TRL's `trl sft|dpo|reward` command
    starts its script in new processes through `accelerate launch`; start them as `-m hf_msam run SCRIPT`, with
    the `--msam_*` flags, so they train with mSAM too."""
    from importlib import resources

    from accelerate.commands.launch import launch_command, launch_command_parser

    def launch_training_script(script_name, launch_args, training_script_args, *, launch_command_fn=launch_command,
                               launch_parser_fn=launch_command_parser):  # fmt: skip
        script = str(resources.files("trl.scripts").joinpath(script_name))
        args = [*launch_args, "-m", "hf_msam", "run", script, *training_script_args, *format_msam_flags(flag_values)]
        launch_command_fn(launch_parser_fn().parse_args(args))

    return launch_training_script


def format_msam_flags(flag_values: dict[str, Any]) -> list[str]:
    """The `--msam_*` command-line arguments that `parse_msam_flags` reads back as `flag_values`."""
    argv = []
    for name, value in flag_values.items():
        if value is None:
            continue
        argv += [f"--{name}", str(value).lower() if isinstance(value, bool) else str(value)]
    return argv


def parse_msam_flags(args: Sequence[str]) -> tuple[dict[str, Any], list[str]]:
    """Split `args` into the `--msam_*` flags given (name -> value) and the script's own arguments."""
    hints = typing.get_type_hints(MSAMTrainingArguments)
    msam_fields = [f for f in dataclasses.fields(MSAMTrainingArguments) if f.name.startswith("msam_")]
    flags = dataclasses.make_dataclass(
        "MSAMFlags",
        [(f.name, hints[f.name], dataclasses.field(default=f.default, metadata=dict(f.metadata))) for f in msam_fields],
    )
    parser = HfArgumentParser(flags, prog="hf-msam run", add_help=False, allow_abbrev=False)
    for action in parser._actions:
        action.default = argparse.SUPPRESS  # keep only the flags given

    def error(message: str) -> typing.NoReturn:  # argparse's own would print the whole usage of every flag
        raise FlagError(_argparse_message(parser, message))

    parser.error = error
    given, rest = parser.parse_known_args(list(args))
    return vars(given), rest


def _argparse_message(parser: argparse.ArgumentParser, message: str) -> str:
    """argparse's complaint about an --msam_* value, on one line, with what the flag takes."""
    match = re.match(r"argument (--[\w-]+)(?:/--[\w-]+)*: (.*)", message)
    if match is None:
        return f"{message}. See `hf-msam run --help` and docs/trainer.md (\"Flags\")."
    flag, problem = match.groups()
    action = next((a for a in parser._actions if flag in a.option_strings), None)
    takes = ""
    if action is not None and action.help:
        takes = " " + flag + ": " + action.help.split(". ")[0].rstrip(".") + "."
    return f"{flag}: {problem}. Give a valid value or drop the flag.{takes}"


# Methods that a script may register when it runs (hf_msam.register_method) are unknown before it runs: the name
# is checked when the script builds its arguments instead, if the script (or a .py file beside it) registers one.
def _may_register_methods(origin: str | None) -> bool:
    if origin is None:
        return False
    path = Path(origin)
    candidates = [path, *sorted(path.parent.glob("*.py"))[:200]]
    for candidate in candidates:
        try:
            if "register_method" in candidate.read_text(encoding="utf-8", errors="replace"):
                return True
        except OSError:
            continue
    return False


def check_msam_flags(flag_values: dict[str, Any], *, origin: str | None = None) -> None:
    """Check the `--msam_*` flags given (name -> value) as `MSAMArguments` would, over the defaults, before anything
    runs: raise `FlagError` (one line: the flag, the value, what to do) for a value out of range, an unknown method
    or a combination that cannot train. A method that the script at `origin` may register itself is checked when the
    script builds its arguments."""
    values = {name: msam_default(name) for name in _msam_field_names()}
    values.update(flag_values)
    method = values["msam_method"]
    if method not in REGISTRY and _may_register_methods(origin):
        # Check everything else now, under the default method; the rest when the script has registered its own.
        values.update(msam_method="sam", msam_method_args=None, msam_precondition="none", msam_adaptive=False, msam_sync_perturbation=False)
    try:
        check_msam_settings(types.SimpleNamespace(**values))
    except ValueError as error:
        raise FlagError(_flag_message(error, flag_values)) from error


def _msam_field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(MSAMArguments)]


def _flag_message(error: BaseException, flag_values: dict[str, Any]) -> str:
    """`error`'s message on one line, followed by the --msam_* flags that were given."""
    message = " ".join(str(error).split())
    given = " ".join(format_msam_flags(flag_values))
    return f"{message} (command line: {given})" if given else message


def _names_a_given_flag(error: BaseException, flag_values: dict[str, Any]) -> bool:
    """Whether `error` is the mSAM settings check refusing one of the --msam_* flags given (the check that runs when
    arguments are built, after the script registered its methods, or on the script's own settings combined with them)."""
    if not isinstance(error, ValueError) or not flag_values:
        return False
    frames = []
    tb = error.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame.f_code.co_name)
        tb = tb.tb_next
    if "check_msam_settings" not in frames:
        return False
    message = str(error)
    return any(f"--{name}" in message for name in flag_values)


@contextlib.contextmanager
def patched_transformers(flag_values: dict[str, Any] | None = None) -> Iterator[dict[str, str]]:
    """Swap the `transformers` training classes for the mSAM ones while inside; yields {original: swapped} names."""
    saved = []
    swaps_by_package = {"transformers": _SWAPS, "trl": _trl_swaps()}
    for name, module in list(sys.modules.items()):
        package = name.split(".")[0]
        if package not in swaps_by_package:
            continue
        for original, swapped in swaps_by_package[package].items():
            attr = original.__name__
            # The top-level lazy module resolves names on first access: set them there even when not yet cached.
            if vars(module).get(attr) is original or (name == package and attr not in vars(module)):
                saved.append((module, attr, vars(module).get(attr)))
                setattr(module, attr, swapped)
    _flag_values.clear()
    _flag_values.update(flag_values or {})
    try:
        yield {
            original.__name__: swapped.__name__ for swaps in swaps_by_package.values() for original, swapped in swaps.items()
        }
    finally:
        _flag_values.clear()
        for module, attr, value in reversed(saved):
            if value is None:
                delattr(module, attr)  # back to the lazy import
            else:
                setattr(module, attr, value)


# The MSAMArguments built while a script runs under `hf-msam run`, with the values the script (or its JSON config)
# gave the --msam_* fields that the command line replaced: [(arguments, {name: the script's value})].
_script_values: list[tuple[Any, dict[str, Any]]] = []


@contextlib.contextmanager
def _watching_msam_classes() -> Iterator[None]:
    """While inside, note every mSAM trainer the script builds (`MSAMTrainer` and its subclasses, TRL's `MSAM*`
    trainers, any `MSAMMixin` trainer, as well as the swapped classes) and what the --msam_* flags replaced in each
    `MSAMArguments` it builds."""
    post_init, init = MSAMArguments.__post_init__, MSAMMixin.__init__

    def recording_post_init(self, *args: Any, **kwargs: Any):
        before = {name: getattr(self, name, msam_default(name)) for name in command_line_overrides}
        _script_values.append((self, before))
        return post_init(self, *args, **kwargs)

    def noting_init(self, *args: Any, **kwargs: Any):
        global _trainers_created
        init(self, *args, **kwargs)
        if not isinstance(self, _ScriptTrainer):  # the swapped classes count and announce themselves
            _trainers_created += 1
            if self.is_world_process_zero():
                _say(_script_trainer_line(self))

    MSAMArguments.__post_init__, MSAMMixin.__init__ = recording_post_init, noting_init
    try:
        yield
    finally:
        MSAMArguments.__post_init__, MSAMMixin.__init__ = post_init, init
        _script_values.clear()


def _replaced_settings(args: Any) -> list[tuple[str, Any, Any]]:
    """(name, the script's value, the flag's value) for each --msam_* flag that changed what the script set in
    `args` (or, if `args` was copied after it was built, in the MSAMArguments the script built)."""
    records = [before for built, before in _script_values if built is args] or [before for _, before in _script_values]
    replaced = []
    for name, value in command_line_overrides.items():
        for before in records:
            if name in before and before[name] != value:
                replaced.append((name, before[name], value))
                break
    return replaced


def _script_trainer_line(trainer: Any) -> str:
    """What `hf-msam run` says about an mSAM trainer the script built itself: its settings, and which of them the
    --msam_* flags replaced."""
    name = type(trainer).__qualname__
    ours = next((k for k in type(trainer).__mro__ if k.__module__.split(".")[0] == "hf_msam"), MSAMMixin)
    kind = f"hf_msam.{ours.__qualname__}" if ours.__module__ in ("hf_msam.trainer", "hf_msam") else (
        f"{ours.__module__}.{ours.__qualname__}"
    )
    shown = ["msam_rho", "msam_micro_batch_size", "msam_method", "msam_adaptive"]
    shown += [flag for flag in command_line_overrides if flag not in shown]
    settings = ", ".join(f"{flag}={msam_setting(trainer.args, flag)}" for flag in shown)
    if trainer.msam_perturbation.enabled:
        how = (
            f"trains with mSAM ({settings}): {trainer.msam_perturbations_per_step} perturbations per optimizer step "
            f"({trainer.msam_count('process(es)')}){trainer.msam_count_caveat}"
        )
    else:
        how = f"msam_rho=0: plain optimizer steps, the baseline ({settings})"
    line = f"the script built {name} (a {kind}): it {how}."
    replaced = _replaced_settings(trainer.args)
    if replaced:
        changes = ", ".join(f"{flag}={old!r} -> {new!r}" for flag, old, new in replaced)
        line += f" The --msam_* flags replaced the script's settings: {changes}."
    elif command_line_overrides:
        given = ", ".join(f"{flag}={value!r}" for flag, value in command_line_overrides.items())
        line += f" The --msam_* flags given ({given}) equal the script's settings."
    else:
        line += " No --msam_* flags were given: these are the script's own settings."
    return line


# TRL's `trl` command lives here; it starts its training scripts in new processes (see _relaunch_with_msam).
_TRL_CLI_MODULES = ("trl", "trl.cli", "trl.cli.main")


def run(script: str | None, args: Sequence[str], module: str | None = None) -> None:
    """Run `script` (or, like `python -m`, `module`) as `__main__` with `args` as its command line, training with
    mSAM."""
    global _trainers_created
    if (script is None) == (module is None):
        raise LauncherError("give a script or -m MODULE. Usage: hf-msam run SCRIPT.py [ARGS...] | -m MODULE [ARGS...]")
    if module is not None:
        try:
            spec = importlib.util.find_spec(module)
            if spec is not None and spec.submodule_search_locations is not None:  # a package: its __main__ runs
                spec = importlib.util.find_spec(f"{module}.__main__")
        except (ImportError, ValueError):
            spec = None
        if spec is None or spec.origin is None:
            raise LauncherError(f"No module named {module!r} (or no {module}.__main__ to run). Usage: hf-msam run -m MODULE [ARGS...]")
        origin, target, name = spec.origin, f"-m {module}", module
    else:
        path = Path(script)
        if not path.is_file():
            raise LauncherError(f"{script}: no such file. Usage: hf-msam run SCRIPT.py [ARGS...]")
        origin, target, name = str(path), path.name, path.name
    flag_values, script_args = parse_msam_flags(args)
    check_msam_flags(flag_values, origin=origin)  # before the script runs: one line and status 2 for a bad value
    if _uses_trl(origin, module):
        # Import TRL's trainers on the original transformers classes, then swap them for hf_msam.trl's (whose
        # steps also keep TRL's metrics to the clean passes); see _trl_swaps.
        import hf_msam.trl  # noqa: F401
    saved_argv, saved_path = sys.argv, list(sys.path)
    sys.argv = [origin, *script_args]
    # What `python SCRIPT.py` / `python -m MODULE` put first on the path, for the script's own imports.
    sys.path.insert(0, str(Path(origin).resolve().parent) if module is None else os.getcwd())
    _trainers_created = 0
    relaunched = False
    try:
        with (
            patched_transformers(flag_values) as swaps,
            _trl_cli_patched(module, flag_values) as relaunched,
            _watching_msam_classes(),
        ):
            swapped = ", ".join(f"{original} -> hf_msam.launcher.{new}" for original, new in swaps.items())
            given = ", ".join(f"{name}={value}" for name, value in flag_values.items()) or "none, mSAM defaults"
            if relaunched:  # the processes TRL's command starts say what they swap, once
                _say(f"running {target}: TRL's command starts its training script through accelerate launch, as "
                     f"`-m hf_msam run SCRIPT` with the --msam_* flags given ({given}).")  # fmt: skip
            else:
                _say(
                    f"running {target} with mSAM. Swapped: {swapped} (subclasses of MSAMTrainer and "
                    f"MSAMTrainingArguments). --msam_* flags given: {given}."
                )
            try:
                if module is None:
                    runpy.run_path(origin, run_name="__main__")
                else:
                    runpy.run_module(module, run_name="__main__", alter_sys=True)
            except ValueError as error:
                if _names_a_given_flag(error, flag_values):  # found when the script built its arguments
                    raise FlagError(_flag_message(error, flag_values)) from error
                raise
            end_process_group()  # the script finished: gloo may abort at interpreter exit with its group alive
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
    if _trainers_created == 0 and not relaunched:
        _say(
            f"{name} finished without creating a transformers.Trainer or an hf_msam trainer: mSAM was not used. "
            "`hf-msam run` only reaches scripts that build their trainer from transformers.Trainer (or a subclass of "
            "it), TRL's SFT/DPO/Reward trainers or hf_msam's trainers, in this process."
        )


def _uses_trl(origin: str, module: str | None) -> bool:
    """Whether the script or module to run is TRL's or imports it (and TRL is installed)."""
    if importlib.util.find_spec("trl") is None:
        return False
    if module is not None and module.split(".")[0] == "trl":
        return True
    try:
        source = Path(origin).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    # TRL itself, or hf_msam's TRL classes (which must be built on TRL's own classes, before the swap).
    pattern = r"^\s*(from\s+trl[\s.]|import\s+trl\b|from\s+hf_msam\.trl\s|import\s+hf_msam\.trl\b|from\s+hf_msam\s+import\s.*\btrl\b)"
    return re.search(pattern, source, flags=re.MULTILINE) is not None


@contextlib.contextmanager
def _trl_cli_patched(module: str | None, flag_values: dict[str, Any]) -> Iterator[bool]:
    """Under `-m trl.cli.main` (TRL's `trl` command), make the processes it starts run through `hf-msam run`."""
    if module not in _TRL_CLI_MODULES:
        yield False
        return
    import trl.cli.accelerate_launcher as launcher_module

    saved = launcher_module.launch_training_script
    launcher_module.launch_training_script = _relaunch_with_msam(flag_values)
    try:
        yield True
    finally:
        launcher_module.launch_training_script = saved


def flag_error(err: BaseException, prog: str) -> int:
    """An invalid --msam_* value: one line on stderr and status 2; with HF_MSAM_TRACEBACK=1, the traceback."""
    if os.environ.get("HF_MSAM_TRACEBACK", "").strip().lower() not in ("", "0", "false", "no", "off"):
        raise err
    print(f"{prog}: error: {err} (HF_MSAM_TRACEBACK=1 shows the traceback)", file=sys.stderr)
    return 2


def reject_msam_flags(argv: Sequence[str], prog: str, why: str) -> int | None:
    """For the commands that take no --msam_* flags (`demo`, `compare`): None when `argv` has none; otherwise one line
    and status 2: what is wrong with an invalid value (as `hf-msam run` says it), or that the command does not take
    them."""
    if not any(arg.startswith(("--msam_", "--msam-")) for arg in argv):
        return None
    try:
        given, _ = parse_msam_flags(argv)
        check_msam_flags(given)
        raise FlagError(f"{prog} takes no --msam_* flags (got {' '.join(format_msam_flags(given))}): {why}")
    except FlagError as err:
        return flag_error(err, prog)
