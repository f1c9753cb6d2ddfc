"""The `hf-msam` command (also `python -m hf_msam`)."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

RUN_DESCRIPTION = """\
Run an unmodified training script that uses transformers.Trainer and TrainingArguments (directly, through
HfArgumentParser, or through subclasses of them, TRL's SFT/DPO/Reward trainers and configs included) with
mSAM swapped in. `-m MODULE` runs a module as `python -m` does (e.g. TRL's scripts: -m trl.scripts.sft, or
TRL's own command: -m trl.cli.main sft). The --msam_* flags (--msam_rho, --msam_micro_batch_size,
--msam_adaptive, --msam_adaptive_eta, --msam_eps, ...) may be given anywhere among ARGS, and everything else
goes to the script. Trainer subclasses whose training_step override calls super().training_step(...) train
with mSAM; overrides that replace the step are refused before training. Works under
`accelerate launch -m hf_msam run ...` and `torchrun -m hf_msam run ...`: each process perturbs with its
own micro-batches, or, with --msam_sync_perturbation (and always under FSDP2), all processes perturb together.
"""

RUN_EPILOG = """\
examples:
  hf-msam run run_glue.py --model_name_or_path bert-base-uncased --task_name mrpc --do_train --msam_rho 0.05 \\
      --msam_micro_batch_size 8 --output_dir out
  accelerate launch --multi_gpu --num_processes 2 -m hf_msam run train.py --msam_rho 0.1 --output_dir out
      (without GPUs, add the Trainer's --use_cpu: the 2 processes then train together over gloo)
  hf-msam run -m trl.scripts.sft --model_name_or_path MODEL_DIR --dataset_name DATA_DIR --output_dir out \\
      --msam_rho 0.05 --msam_micro_batch_size 2

An invalid --msam_* value stops the command before the script runs, with one line and exit status 2
(HF_MSAM_TRACEBACK=1 shows the traceback). See docs/troubleshooting.md.
"""

RUN_USAGE = (
    "usage: hf-msam run SCRIPT.py [ARGS...] | hf-msam run -m MODULE [ARGS...]: train a transformers.Trainer script "
    "with mSAM, e.g. `hf-msam run train.py --output_dir out --msam_rho 0.05 --msam_micro_batch_size 8` "
    "(`hf-msam run --help` for more)"
)


def _compare(argv: list[str]) -> int:
    try:
        compare = importlib.import_module("hf_msam.compare")
    except ModuleNotFoundError as err:
        if err.name != "hf_msam.compare":
            raise
        print(
            "hf-msam: error: `hf-msam compare` is not available in this installation (hf_msam.compare is missing). "
            "Install a release of hf-msam that ships it.",
            file=sys.stderr,
        )
        return 2
    return compare.main(argv)


def _demo(argv: list[str]) -> int:
    from . import demo

    return demo.main(argv)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="hf-msam", description="Micro-batch sharpness-aware minimization (mSAM) for the Hugging Face Trainer."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run_parser = commands.add_parser(
        "run",
        help="run a transformers.Trainer script with mSAM, without changing it",
        description=RUN_DESCRIPTION,
        epilog=RUN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run_parser.add_argument(
        "script", metavar="SCRIPT.py | -m MODULE", help="the training script, or -m and a module to run like python -m"
    )
    run_parser.add_argument(
        "script_args", nargs=argparse.REMAINDER, metavar="ARGS", help="its arguments, and --msam_* flags"
    )
    commands.add_parser("compare", help="compare training runs (see `hf-msam compare --help`)", add_help=False)
    commands.add_parser(
        "demo", help="plain training vs SAM vs mSAM on noisy labels, offline, in minutes (see `hf-msam demo --help`)",
        add_help=False,
    )

    if argv[:1] == ["compare"]:  # compare parses its own arguments, --help included
        return _compare(argv[1:])
    if argv[:1] == ["demo"]:  # so does demo
        return _demo(argv[1:])
    if argv[:1] != ["run"]:
        parser.parse_args(argv)  # help, errors, or a command without its arguments
        return 2
    rest = argv[1:]
    if not rest:
        print(f"hf-msam run: {RUN_USAGE}", file=sys.stderr)
        return 2
    if rest[0] in ("-h", "--help"):
        run_parser.print_help()
        return 0
    module = None
    if rest[0] == "-m":  # run -m MODULE ARGS...: everything after MODULE is the module's
        if len(rest) < 2:
            print(f"hf-msam run: error: -m needs a module name. {RUN_USAGE}", file=sys.stderr)
            return 2
        module, script, script_args = rest[1], None, rest[2:]
    elif rest[0].startswith("-"):
        print(f"hf-msam run: error: the script comes first, before its arguments and the --msam_* flags (got {rest[0]!r}). "
              f"{RUN_USAGE}", file=sys.stderr)  # fmt: skip
        return 2
    else:
        script, script_args = rest[0], rest[1:]

    from .launcher import FlagError, LauncherError, flag_error, run

    try:
        run(script, script_args, module=module)
    except FlagError as err:
        return flag_error(err, "hf-msam run")
    except LauncherError as err:
        print(f"hf-msam: error: {err}", file=sys.stderr)
        return 2
    return 0


