"""`hf-msam run` / `python -m hf_msam run`: unmodified Trainer scripts trained with mSAM."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
from conftest import free_port
import torch

from hf_msam import MSAMTrainer, MSAMTrainingArguments, cli
from hf_msam.launcher import parse_msam_flags, patched_transformers
from hf_msam.methods import REGISTRY

# A script that knows nothing of mSAM: its own subclasses of Trainer and TrainingArguments, HfArgumentParser.
HF_PARSER_SCRIPT = '''
import json
import os
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import HfArgumentParser, Trainer, TrainingArguments


@dataclass
class ScriptArguments:
    n_examples: int = field(default=32)


@dataclass
class MyTrainingArguments(TrainingArguments):
    note: str = field(default="")


class Regressor(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))

    def forward(self, x, labels=None):
        out = self.net(x).squeeze(-1)
        return {"loss": nn.functional.mse_loss(out, labels), "logits": out}


class MyTrainer(Trainer):
    def log(self, logs, start_time=None):
        logs["script/note"] = 1.0
        super().log(logs, start_time)


def main():
    script_args, training_args = HfArgumentParser((ScriptArguments, MyTrainingArguments)).parse_args_into_dataclasses()
    torch.manual_seed(0)
    x = torch.randn(script_args.n_examples, 4)
    data = [{"x": xi, "labels": yi} for xi, yi in zip(x, x.sum(-1))]
    model = Regressor()
    trainer = MyTrainer(model=model, args=training_args, train_dataset=data)
    trainer.train()
    trainer.save_model()  # pickles MyTrainingArguments into training_args.bin
    trainer.save_state()
    torch.save(model.state_dict(), os.path.join(training_args.output_dir, f"weights_rank{training_args.process_index}.pt"))
    if trainer.is_world_process_zero():
        with open(os.path.join(training_args.output_dir, "script_report.json"), "w") as f:
            json.dump(
                {
                    "trainer_mro": [c.__name__ for c in type(trainer).__mro__],
                    "args_mro": [c.__name__ for c in type(training_args).__mro__],
                    "args": training_args.to_dict(),
                },
                f,
            )


if __name__ == "__main__":
    main()
'''

# A script that parses its own flags with argparse and builds TrainingArguments in code.
ARGPARSE_SCRIPT = '''
import argparse
import json
import os

import torch
from torch import nn
from transformers import Trainer, TrainingArguments


class Regressor(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 1)

    def forward(self, x, labels=None):
        out = self.linear(x).squeeze(-1)
        return {"loss": nn.functional.mse_loss(out, labels), "logits": out}


parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("--steps", type=int, default=2)
flags = parser.parse_args()
args = TrainingArguments(
    output_dir=flags.out, max_steps=flags.steps, per_device_train_batch_size=8, logging_steps=1,
    save_strategy="no", use_cpu=True, report_to="none", disable_tqdm=True,
)
torch.manual_seed(0)
x = torch.randn(16, 4)
trainer = Trainer(model=Regressor(), args=args, train_dataset=[{"x": xi, "labels": yi} for xi, yi in zip(x, x.sum(-1))])
trainer.train()
trainer.save_state()
with open(os.path.join(flags.out, "script_report.json"), "w") as f:
    json.dump(args.to_dict(), f)
'''

OVERRIDES_TRAINING_STEP_SCRIPT = '''
from transformers import Trainer, TrainingArguments


class CustomStepTrainer(Trainer):
    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = self.compute_loss(model, inputs)  # its own step: never reaches Trainer.training_step
        self.accelerator.backward(loss)
        return loss.detach()


CustomStepTrainer(model=None, args=TrainingArguments(output_dir="unused", use_cpu=True, report_to="none"))
'''

TRAIN_ARGS = [
    "--max_steps", "3", "--per_device_train_batch_size", "8", "--learning_rate", "0.05", "--logging_steps", "1",
    "--save_strategy", "no", "--use_cpu", "--report_to", "none", "--disable_tqdm", "true",
]  # fmt: skip


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def log_history(output_dir: Path) -> list[dict]:
    return json.loads((output_dir / "trainer_state.json").read_text())["log_history"]


def test_parse_msam_flags_takes_only_the_msam_flags():
    given, rest = parse_msam_flags(
        ["--output_dir", "out", "--msam_rho", "0.1", "cfg.json", "--msam-micro-batch-size", "2", "--msam_adaptive", "-h"]
    )
    assert given == {"msam_rho": 0.1, "msam_micro_batch_size": 2, "msam_adaptive": True}
    assert rest == ["--output_dir", "out", "cfg.json", "-h"]
    assert parse_msam_flags(["--lr", "1", "--", "--msam_rho", "1"]) == ({}, ["--lr", "1", "--", "--msam_rho", "1"])


def test_patch_swaps_the_classes_and_restores_them(tmp_path):
    transformers = sys.modules["transformers"]  # what a script's `import transformers` gets
    original_trainer, original_args = transformers.Trainer, transformers.TrainingArguments
    original_seq2seq = transformers.Seq2SeqTrainer
    with patched_transformers({"msam_rho": 0.2}):
        assert issubclass(transformers.Trainer, MSAMTrainer)
        assert issubclass(transformers.trainer.Trainer, MSAMTrainer)
        assert issubclass(transformers.Seq2SeqTrainer, MSAMTrainer)
        assert issubclass(transformers.Seq2SeqTrainer, original_seq2seq)
        args = transformers.Seq2SeqTrainingArguments(output_dir=str(tmp_path), predict_with_generate=True, use_cpu=True)
        assert isinstance(args, MSAMTrainingArguments) and args.predict_with_generate and args.msam_rho == 0.2
        assert transformers.TrainingArguments(output_dir=str(tmp_path), msam_rho=0.5, use_cpu=True).msam_rho == 0.2
    assert transformers.Trainer is original_trainer and transformers.trainer.Trainer is original_trainer
    assert transformers.TrainingArguments is original_args and transformers.Seq2SeqTrainer is original_seq2seq


def test_run_hf_argument_parser_script_with_msam(tmp_path, capsys):
    script = write(tmp_path / "train.py", HF_PARSER_SCRIPT)
    out = tmp_path / "out"
    argv = ["run", str(script), "--output_dir", str(out), *TRAIN_ARGS, "--msam_rho", "0.1", "--msam_micro_batch_size", "2"]

    assert cli.main(argv) == 0

    report = json.loads((out / "script_report.json").read_text())
    assert "MSAMTrainer" in report["trainer_mro"] and report["trainer_mro"][0] == "MyTrainer"
    assert "MSAMTrainingArguments" in report["args_mro"] and report["args_mro"][0] == "MyTrainingArguments"
    assert report["args"]["msam_rho"] == 0.1 and report["args"]["msam_micro_batch_size"] == 2
    train_logs = [entry for entry in log_history(out) if "loss" in entry]
    assert len(train_logs) == 3
    assert all("msam/sharpness" in entry and entry["script/note"] == 1.0 for entry in train_logs)
    assert (out / "training_args.bin").is_file()  # the script's own args class pickled fine
    err = capsys.readouterr().err
    assert err.count("hf-msam: running train.py with mSAM") == 1
    assert "msam_rho=0.1, msam_micro_batch_size=2" in err
    assert "MyTrainer trains with mSAM" in err and "4 perturbations per optimizer step" in err
    assert sys.modules["transformers"].Trainer.__module__ == "transformers.trainer"  # unpatched afterwards


def test_run_argparse_script_building_training_arguments_in_code(tmp_path, capsys):
    script = write(tmp_path / "train_argparse.py", ARGPARSE_SCRIPT)
    out = tmp_path / "out"

    assert cli.main(["run", str(script), "--out", str(out), "--msam_rho", "0.3", "--msam_adaptive", "--steps", "2"]) == 0

    args = json.loads((out / "script_report.json").read_text())
    assert args["msam_rho"] == 0.3 and args["msam_adaptive"] is True
    assert all("msam/sharpness" in entry for entry in log_history(out) if "loss" in entry)
    assert "Trainer trains with mSAM (msam_rho=0.3" in capsys.readouterr().err


def test_run_msam_rho_zero_is_the_plain_baseline(tmp_path, capsys):
    script = write(tmp_path / "train.py", HF_PARSER_SCRIPT)
    out = tmp_path / "out"
    assert cli.main(["run", str(script), "--output_dir", str(out), *TRAIN_ARGS, "--msam_rho", "0"]) == 0
    assert not any("msam/sharpness" in entry for entry in log_history(out))
    assert "msam_rho=0, plain optimizer steps" in capsys.readouterr().err


def test_run_refuses_a_trainer_that_overrides_training_step(tmp_path, capsys):
    script = write(tmp_path / "custom_step.py", OVERRIDES_TRAINING_STEP_SCRIPT)
    assert cli.main(["run", str(script)]) == 2
    err = capsys.readouterr().err
    assert "hf-msam: error: `CustomStepTrainer` overrides `training_step`" in err
    assert "without calling `super().training_step(...)`" in err and "compute_loss" in err


def test_run_missing_script(tmp_path, capsys):
    assert cli.main(["run", str(tmp_path / "nope.py")]) == 2
    assert "nope.py: no such file" in capsys.readouterr().err


def test_run_warns_when_the_script_creates_no_trainer(tmp_path, capsys):
    script = write(tmp_path / "hello.py", "import sys\nprint('args', sys.argv[1:])\n")
    assert cli.main(["run", str(script), "a", "--msam_rho", "0.1", "b"]) == 0
    captured = capsys.readouterr()
    assert "args ['a', 'b']" in captured.out
    assert "finished without creating a transformers.Trainer or an hf_msam trainer: mSAM was not used" in captured.err


def test_compare_dispatches_lazily(monkeypatch):
    calls = []
    fake = types.ModuleType("hf_msam.compare")
    fake.main = lambda argv: calls.append(argv) or 0
    monkeypatch.setitem(sys.modules, "hf_msam.compare", fake)
    assert cli.main(["compare", "--help", "run_a", "run_b"]) == 0
    assert calls == [["--help", "run_a", "run_b"]]


def test_compare_without_the_module_says_so(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "hf_msam.compare", None)  # import fails as if the module were absent
    assert cli.main(["compare", "x"]) == 2
    assert "`hf-msam compare` is not available" in capsys.readouterr().err


@pytest.mark.slow
def test_console_script(tmp_path):
    """The installed `hf-msam` entry point, in a fresh process."""
    exe = shutil.which("hf-msam", path=os.path.dirname(sys.executable)) or shutil.which("hf-msam")
    if exe is None:
        pytest.skip("the hf-msam console script is not installed (pip install -e .)")
    script = write(tmp_path / "train.py", HF_PARSER_SCRIPT)
    out = tmp_path / "out"
    proc = subprocess.run(
        [exe, "run", str(script), "--output_dir", str(out), *TRAIN_ARGS, "--msam_micro_batch_size", "4"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 perturbations per optimizer step" in proc.stderr
    assert all("msam/sharpness" in entry for entry in log_history(out) if "loss" in entry)


@pytest.mark.slow
@pytest.mark.multiprocess
def launch_two_processes(tmp_path, launcher: list[str]):
    """`LAUNCHER -m hf_msam run train.py ...` on 2 CPU processes (gloo): the finished process, its output folder."""
    script = write(tmp_path / "train.py", HF_PARSER_SCRIPT)
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", *launcher, "-m", "hf_msam", "run", str(script), "--output_dir", str(out), *TRAIN_ARGS,
        "--per_device_train_batch_size", "4", "--msam_micro_batch_size", "2",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "4 perturbations per optimizer step (2 process(es) x 1 accumulation step(s) x 2 micro-batch(es))" in proc.stderr
    rank0, rank1 = (torch.load(out / f"weights_rank{r}.pt") for r in (0, 1))
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    return proc, out


def test_accelerate_launch_two_processes(tmp_path):
    """`accelerate launch -m hf_msam run` on 2 CPU processes (gloo): one announcement, identical weights on both ranks."""
    proc, out = launch_two_processes(tmp_path, [
        "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
    ])  # fmt: skip
    assert proc.stderr.count("hf-msam: running train.py with mSAM") == 1  # main process only
    assert json.loads((out / "script_report.json").read_text())["args"]["msam_micro_batch_size"] == 2
    assert all("msam/sharpness" in entry for entry in log_history(out) if "loss" in entry)


@pytest.mark.slow
def test_torchrun_two_processes(tmp_path):
    """`torchrun -m hf_msam run` on 2 CPU processes (gloo), as docs/launcher.md says: identical weights on both ranks."""
    launch_two_processes(tmp_path, ["torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())])


def test_run_applies_the_flags_to_msam_arguments_built_by_the_script(tmp_path, capsys):
    # A script that builds hf_msam's own MSAMTrainingArguments (not transformers.TrainingArguments) still gets the
    # --msam_* flags given to the launcher, over the values it set itself; outside the launcher they are gone again.
    script = write(
        tmp_path / "own_args.py",
        textwrap.dedent(
            """
            import json, sys
            from hf_msam import MSAMTrainingArguments
            args = MSAMTrainingArguments(output_dir=sys.argv[1], msam_rho=0.5, msam_micro_batch_size=8, report_to="none")
            print(json.dumps({"rho": args.msam_rho, "mbs": args.msam_micro_batch_size, "method": args.msam_method}))
            """
        ),
    )
    assert cli.main(["run", str(script), str(tmp_path / "o"), "--msam_micro_batch_size", "2", "--msam_method", "gsam"]) == 0
    seen = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert seen == {"rho": 0.5, "mbs": 2, "method": "gsam"}
    assert MSAMTrainingArguments(output_dir=str(tmp_path / "o"), report_to="none").msam_micro_batch_size is None


# A script that builds hf_msam's MSAMTrainer (a subclass of it) with settings of its own.
OWN_MSAM_TRAINER_SCRIPT = """
import json, sys
import torch
from torch import nn
from hf_msam import MSAMTrainer, MSAMTrainingArguments


class Regressor(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 1)

    def forward(self, x, labels=None):
        out = self.linear(x).squeeze(-1)
        return {"loss": nn.functional.mse_loss(out, labels), "logits": out}


class MyMSAMTrainer(MSAMTrainer):
    pass


args = MSAMTrainingArguments(
    output_dir=sys.argv[1], max_steps=2, per_device_train_batch_size=8, logging_steps=1, save_strategy="no",
    use_cpu=True, report_to="none", disable_tqdm=True, msam_rho=0.5, msam_micro_batch_size=8,
)
torch.manual_seed(0)
x = torch.randn(16, 4)
trainer = MyMSAMTrainer(model=Regressor(), args=args, train_dataset=[{"x": a, "labels": b} for a, b in zip(x, x.sum(-1))])
trainer.train()
trainer.save_state()
"""


def test_run_recognises_an_msam_trainer_built_by_the_script(tmp_path, capsys):
    script = write(tmp_path / "own_trainer.py", OWN_MSAM_TRAINER_SCRIPT)
    out = tmp_path / "out"

    assert cli.main(["run", str(script), str(out), "--msam_micro_batch_size", "2", "--msam_rho", "0.5"]) == 0

    err = capsys.readouterr().err
    assert "mSAM was not used" not in err
    assert err.count("the script built MyMSAMTrainer (a hf_msam.MSAMTrainer): it trains with mSAM (msam_rho=0.5, "
                     "msam_micro_batch_size=2, msam_method=sam, msam_adaptive=False): 4 perturbations per optimizer "
                     "step") == 1
    # Only the micro-batch size changed: the flag's rho equals the script's.
    assert "The --msam_* flags replaced the script's settings: msam_micro_batch_size=8 -> 2." in err
    train_logs = [entry for entry in log_history(out) if "loss" in entry]
    assert len(train_logs) == 2 and all(entry["msam/micro_batches_per_step"] == 4 for entry in train_logs)


def test_run_reports_the_script_settings_when_no_flag_is_given(tmp_path, capsys):
    script = write(tmp_path / "own_trainer.py", OWN_MSAM_TRAINER_SCRIPT)
    assert cli.main(["run", str(script), str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert "mSAM was not used" not in err
    assert "(msam_rho=0.5, msam_micro_batch_size=8, msam_method=sam, msam_adaptive=False): 1 perturbations" in err
    assert "No --msam_* flags were given: these are the script's own settings." in err


def test_run_with_no_arguments_prints_the_usage(capsys):
    assert cli.main(["run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the following arguments are required" not in err
    assert "usage: hf-msam run SCRIPT.py [ARGS...] | hf-msam run -m MODULE [ARGS...]" in err


def test_run_help_examples_are_one_per_line(capsys):
    assert cli.main(["run", "--help"]) == 0
    lines = capsys.readouterr().out.splitlines()
    trl = [i for i, line in enumerate(lines) if "hf-msam run -m trl.scripts.sft" in line]
    assert len(trl) == 1 and lines[trl[0]].rstrip().endswith("\\")
    assert lines[trl[0] + 1].strip() == "--msam_rho 0.05 --msam_micro_batch_size 2"


# Scripts must not run when a flag is invalid: this one would write a file.
SIDE_EFFECT_SCRIPT = "import pathlib, sys\npathlib.Path(sys.argv[1]).write_text('ran')\n"


@pytest.mark.parametrize(
    "flags, names",
    [
        (["--msam_method", "bogus"], ["--msam_method", "'bogus'", "registered methods"]),
        (["--msam_micro_batch_size", "-2"], ["--msam_micro_batch_size", "-2", "whole number >= 1"]),
        (["--msam_micro_batch_size", "two"], ["--msam_micro_batch_size", "'two'", "invalid int value"]),
        (["--msam_method", "gsam", "--msam_sync_perturbation"], ["--msam_sync_perturbation", "gsam", "Drop"]),
        (["--msam_precondition", "adam", "--msam_adaptive"], ["--msam_precondition adam", "--msam_adaptive", "Choose"]),
        (["--msam_vectorize", "maybe"], ["--msam_vectorize", "'maybe'", "choose from"]),
    ],
)
def test_run_refuses_an_invalid_flag_in_one_line_before_the_script_runs(tmp_path, capsys, monkeypatch, flags, names):
    monkeypatch.delenv("HF_MSAM_TRACEBACK", raising=False)
    script = write(tmp_path / "side_effect.py", SIDE_EFFECT_SCRIPT)
    marker = tmp_path / "ran.txt"
    assert cli.main(["run", str(script), str(marker), *flags]) == 2
    err = capsys.readouterr().err
    assert not marker.exists()  # found before the script ran
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("hf-msam run: error: "), err
    assert "Traceback" not in err and all(name in lines[0] for name in names), err


# A log record of torch's own logging ("W1207 21:05:29.586000 11596 torch/utils/_pytree.py:630] ..."): torchao 0.18,
# which transformers imports whenever it is installed (the dev extra installs it), logs two deprecation warnings of
# torch 2.14 at import. Not ours to silence; what this file checks is what hf-msam itself writes.
UPSTREAM_LOG_RECORD = re.compile(r"^[DIWEF]\d{4} \d\d:\d\d:\d\d\.\d+\s+\d+ \S+:\d+\] ")


def test_invalid_flag_in_a_fresh_process_exits_2_without_traceback_unless_asked(tmp_path):
    script = write(tmp_path / "side_effect.py", SIDE_EFFECT_SCRIPT)
    cmd = [sys.executable, "-m", "hf_msam", "run", str(script), str(tmp_path / "ran.txt"), "--msam_micro_batch_size", "-1"]
    env = {k: v for k, v in os.environ.items() if k != "HF_MSAM_TRACEBACK"}
    quiet = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    ours = [line for line in quiet.stderr.splitlines() if not UPSTREAM_LOG_RECORD.match(line)]
    assert quiet.returncode == 2 and len(ours) == 1 and "Traceback" not in quiet.stderr, quiet.stderr
    assert ours[0].startswith("hf-msam run: error: ") and "--msam_micro_batch_size" in ours[0], quiet.stderr
    loud = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**env, "HF_MSAM_TRACEBACK": "1"})
    assert loud.returncode != 0 and "Traceback" in loud.stderr and "FlagError" in loud.stderr
    assert not (tmp_path / "ran.txt").exists()


def test_python_api_keeps_raising_value_error(tmp_path):
    with pytest.raises(ValueError, match="--msam_micro_batch_size must be a whole number"):
        MSAMTrainingArguments(output_dir=str(tmp_path), msam_micro_batch_size=-1, report_to="none")
    with pytest.raises(ValueError, match="--msam_method must be one of the registered methods"):
        MSAMTrainingArguments(output_dir=str(tmp_path), msam_method="bogus", report_to="none")


REGISTERING_SCRIPT = """
import json, sys
from hf_msam import SAMDescent, SAMPerturbation, register_method, MSAMTrainingArguments

@register_method("halfrho_launcher_test", paper="SAM at half the radius", flags=("msam_rho",), replace=True)
def build(args):
    return SAMPerturbation(rho=args.msam_rho / 2), SAMDescent()

args = MSAMTrainingArguments(output_dir=sys.argv[1], report_to="none", msam_sync_perturbation=True)
print(json.dumps({"method": args.msam_method}))
"""


def test_a_method_the_script_registers_is_accepted_and_a_bad_combination_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("HF_MSAM_TRACEBACK", raising=False)
    script = write(tmp_path / "variant.py", REGISTERING_SCRIPT)
    saved = dict(REGISTRY)
    try:
        assert cli.main(["run", str(script), str(tmp_path / "o"), "--msam_method", "halfrho_launcher_test"]) == 0
        assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == {"method": "halfrho_launcher_test"}
        # The script's own msam_sync_perturbation=True with --msam_method gsam: found when it builds its arguments.
        assert cli.main(["run", str(script), str(tmp_path / "o"), "--msam_method", "gsam"]) == 2
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if "error" in line]
        assert "Traceback" not in err and len(errors) == 1 and errors[0].startswith("hf-msam run: error: ")
        assert "--msam_sync_perturbation does not combine with --msam_method gsam" in errors[0]
    finally:
        REGISTRY.clear()
        REGISTRY.update(saved)


@pytest.mark.parametrize("command", ["demo", "compare"])
def test_demo_and_compare_refuse_msam_flags_in_one_line(tmp_path, capsys, monkeypatch, command):
    monkeypatch.delenv("HF_MSAM_TRACEBACK", raising=False)
    extra = [str(tmp_path)] if command == "compare" else ["--output", str(tmp_path / "demo")]
    assert cli.main([command, *extra, "--msam_micro_batch_size", "0"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"hf-msam {command}: error: --msam_micro_batch_size must be a whole")
    assert cli.main([command, *extra, "--msam_rho", "0.1"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and f"hf-msam {command} takes no --msam_* flags (got --msam_rho 0.1)" in err[0]
    assert not (tmp_path / "demo").exists()
