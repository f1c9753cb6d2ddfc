"""`hf-msam run` on unmodified TRL scripts: SFT scripts, TRL's own script modules and CLI, overrides of
`training_step`, and two processes under `accelerate launch`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import free_port
import torch

pytest.importorskip("trl")

from datasets import load_dataset  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402
from trl_helpers import PROMPT_COMPLETION, sft_reference_step, write_jsonl, write_tiny_llama  # noqa: E402

from hf_msam import cli  # noqa: E402

# A TRL SFT script that knows nothing of mSAM; --step_override picks a Trainer subclass with its own training_step.
SFT_SCRIPT = '''
import os
from dataclasses import dataclass, field

import torch
from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer, TrlParser


@dataclass
class ScriptArguments:
    model_dir: str = field(default="")
    data_file: str = field(default="")
    step_override: str = field(default="none")


class SuperStep(SFTTrainer):  # wraps the step: fine
    def training_step(self, model, inputs, num_items_in_batch=None):
        self.wrapped = getattr(self, "wrapped", 0) + 1
        return super().training_step(model, inputs, num_items_in_batch)


class ReplacedStep(SFTTrainer):  # its own step: mSAM cannot be in it
    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = self.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
        self.accelerator.backward(loss)
        return loss.detach()


class LateSuperStep(SFTTrainer):  # calls super() only from step 100 on: caught at the first optimizer step
    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.state.global_step >= 100:
            return super().training_step(model, inputs, num_items_in_batch)
        loss = self.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
        self.accelerator.backward(loss)
        return loss.detach()


def main():
    script_args, config = TrlParser((ScriptArguments, SFTConfig)).parse_args_and_config()
    trainer_class = {"none": SFTTrainer, "super": SuperStep, "replace": ReplacedStep, "late": LateSuperStep}[
        script_args.step_override
    ]
    trainer = trainer_class(
        model=AutoModelForCausalLM.from_pretrained(script_args.model_dir, dtype=torch.float64),
        args=config,
        train_dataset=load_dataset("json", data_files=script_args.data_file, split="train"),
        processing_class=AutoTokenizer.from_pretrained(script_args.model_dir),
    )
    trainer.train()
    trainer.save_state()
    weights = {n: p.detach() for n, p in trainer.model.named_parameters()}
    torch.save(weights, os.path.join(config.output_dir, f"weights_rank{config.process_index}.pt"))
    if trainer.is_world_process_zero():
        with open(os.path.join(config.output_dir, "script_report.json"), "w") as f:
            json_mro = [c.__name__ for c in type(trainer).__mro__]
            import json

            json.dump({"mro": json_mro, "wrapped": getattr(trainer, "wrapped", 0)}, f)


if __name__ == "__main__":
    main()
'''

STEP_ARGS = [
    "--per_device_train_batch_size", "5", "--max_steps", "1", "--optim", "sgd", "--learning_rate", "0.5",
    "--lr_scheduler_type", "constant", "--max_grad_norm", "0", "--weight_decay", "0", "--bf16", "false",
    "--use_cpu", "--report_to", "none", "--save_strategy", "no", "--logging_steps", "1", "--disable_tqdm", "true",
    "--train_sampling_strategy", "sequential",
]  # fmt: skip


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("sft-data"), PROMPT_COMPLETION[:5])


def first_batch(llama_dir, data_file, output_dir):
    """The batch a plain SFTTrainer trains on first with STEP_ARGS (sequential sampling): TRL's own collation."""
    config = SFTConfig(
        str(output_dir), per_device_train_batch_size=5, bf16=False, use_cpu=True, report_to="none",
        train_sampling_strategy="sequential",
    )  # fmt: skip
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float64), args=config,
        train_dataset=load_dataset("json", data_files=str(data_file), split="train"),
        processing_class=AutoTokenizer.from_pretrained(llama_dir),
    )  # fmt: skip
    return next(iter(trainer.get_train_dataloader()))


def reference_weights(llama_dir, data_file, tmp_path, dtype=torch.float64):
    batch = first_batch(llama_dir, data_file, tmp_path / "reference")
    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=dtype)
    return sft_reference_step(model, batch, micro_batch_size=2, rho=0.1, lr=0.5)


def run_script(tmp_path, llama_dir, data_dir, *extra):
    script = tmp_path / "sft_script.py"
    script.write_text(textwrap.dedent(SFT_SCRIPT), encoding="utf-8")
    out = tmp_path / "out"
    argv = [
        "run", str(script), "--model_dir", str(llama_dir), "--data_file", str(data_dir / "train.jsonl"),
        "--output_dir", str(out), *STEP_ARGS, "--msam_rho", "0.1", "--msam_micro_batch_size", "2", *extra,
    ]  # fmt: skip
    return cli.main(argv), out


def assert_close_to(weights, expected, rtol=1e-6, atol=1e-7):
    for name, w in expected.items():
        torch.testing.assert_close(weights[name].to(w.dtype), w, rtol=rtol, atol=atol, msg=name)


def test_unmodified_sft_script_trains_with_msam(tmp_path, llama_dir, data_dir, capsys):
    code, out = run_script(tmp_path, llama_dir, data_dir)
    assert code == 0
    err = capsys.readouterr().err
    assert "hf-msam: running sft_script.py with mSAM" in err and "SFTTrainer -> hf_msam.launcher.MSAMScriptSFTTrainer" in err
    assert "trains with mSAM (msam_rho=0.1, msam_micro_batch_size=2" in err and "3 perturbations per optimizer step" in err
    assert_close_to(torch.load(out / "weights_rank0.pt"), reference_weights(llama_dir, data_dir / "train.jsonl", tmp_path))
    logs = [h for h in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in h]
    assert logs[0]["msam/sharpness"] > 0
    assert sys.modules["trl"].SFTTrainer is SFTTrainer  # unpatched afterwards


@pytest.mark.slow
def test_super_calling_override_trains_with_msam(tmp_path, llama_dir, data_dir):
    code, out = run_script(tmp_path, llama_dir, data_dir, "--step_override", "super")
    assert code == 0
    report = json.loads((out / "script_report.json").read_text())
    assert report["mro"][0] == "SuperStep" and "MSAMMixin" in report["mro"] and report["wrapped"] == 1
    assert_close_to(torch.load(out / "weights_rank0.pt"), reference_weights(llama_dir, data_dir / "train.jsonl", tmp_path))


def test_replacing_override_is_refused_before_training(tmp_path, llama_dir, data_dir, capsys):
    code, out = run_script(tmp_path, llama_dir, data_dir, "--step_override", "replace")
    assert code == 2
    err = capsys.readouterr().err
    assert "hf-msam: error: `ReplacedStep` overrides `training_step`" in err and "without calling `super().training_step" in err
    assert not (out / "trainer_state.json").exists() and "Tokenizing" not in err  # refused at construction


def test_override_that_skips_the_msam_step_stops_at_the_first_optimizer_step(tmp_path, llama_dir, data_dir, capsys):
    code, out = run_script(tmp_path, llama_dir, data_dir, "--step_override", "late")
    assert code == 2
    err = capsys.readouterr().err
    assert "`LateSuperStep` reached its first optimizer step without running the mSAM step" in err
    assert not (out / "weights_rank0.pt").exists()


def trl_sft_args(llama_dir, data_dir, out):
    return [
        "--model_name_or_path", str(llama_dir), "--dataset_name", str(data_dir), "--output_dir", str(out),
        "--dtype", "float32", *STEP_ARGS, "--msam_rho", "0.1", "--msam_micro_batch_size", "2",
    ]  # fmt: skip


def saved_weights(out):
    from safetensors.torch import load_file

    return load_file(out / "model.safetensors")


def test_trl_sft_script_module(tmp_path, llama_dir, data_dir, capsys):
    """`hf-msam run -m trl.scripts.sft ...`: TRL's own SFT script, unchanged, trains with mSAM (float32 model)."""
    out = tmp_path / "out"
    assert cli.main(["run", "-m", "trl.scripts.sft", *trl_sft_args(llama_dir, data_dir, out)]) == 0
    assert "trains with mSAM (msam_rho=0.1, msam_micro_batch_size=2" in capsys.readouterr().err
    expected = reference_weights(llama_dir, data_dir / "train.jsonl", tmp_path, dtype=torch.float32)
    assert_close_to(saved_weights(out), expected, rtol=1e-4, atol=1e-5)


def test_run_module_errors(capsys):
    assert cli.main(["run", "-m", "no_such_module_here"]) == 2
    assert "No module named 'no_such_module_here'" in capsys.readouterr().err


@pytest.mark.slow
def test_trl_command_line(tmp_path, llama_dir, data_dir):
    """`hf-msam run -m trl.cli.main sft ...`: TRL's `trl sft` command starts its script through accelerate launch;
    the process it starts trains with mSAM too."""
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(cli.__file__).parent.parent), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "hf_msam", "run", "-m", "trl.cli.main", "sft", *trl_sft_args(llama_dir, data_dir, out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "trains with mSAM (msam_rho=0.1, msam_micro_batch_size=2" in proc.stderr
    # The banner once, from the process that trains; the `trl` command's own process says it relaunches.
    assert proc.stderr.count("Swapped: Trainer -> ") == 1
    assert "hf-msam: running sft.py with mSAM. Swapped:" in proc.stderr
    assert "hf-msam: running -m trl.cli.main: TRL's command starts its training script" in proc.stderr
    expected = reference_weights(llama_dir, data_dir / "train.jsonl", tmp_path, dtype=torch.float32)
    assert_close_to(saved_weights(out), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_accelerate_launch_two_processes_sft(tmp_path, llama_dir):
    """2 CPU processes (gloo), an unmodified SFT script through the launcher: the ranks end bitwise equal."""
    data = write_jsonl(tmp_path / "data", PROMPT_COMPLETION)
    script = tmp_path / "sft_script.py"
    script.write_text(textwrap.dedent(SFT_SCRIPT), encoding="utf-8")
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()),
        "-m", "hf_msam", "run", str(script), "--model_dir", str(llama_dir), "--data_file", str(data / "train.jsonl"),
        "--output_dir", str(out), *STEP_ARGS, "--max_steps", "2", "--per_device_train_batch_size", "3",
        "--msam_rho", "0.1", "--msam_micro_batch_size", "2",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("hf-msam: running sft_script.py with mSAM") == 1
    assert "4 perturbations per optimizer step (2 process(es) x 1 accumulation step(s) x 2 micro-batch(es))" in proc.stderr
    rank0, rank1 = (torch.load(out / f"weights_rank{r}.pt") for r in (0, 1))
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    initial = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float64)
    assert not torch.equal(rank0["lm_head.weight"], initial.lm_head.weight)
    logs = [h for h in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in h]
    assert len(logs) == 2 and all("msam/sharpness" in h for h in logs)


# A script that builds hf_msam.trl's MSAMSFTTrainer itself, with settings of its own.
OWN_MSAM_SFT_SCRIPT = '''
import sys

import torch
from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from hf_msam.trl import MSAMSFTConfig, MSAMSFTTrainer

model_dir, data_file, out = sys.argv[1:4]
config = MSAMSFTConfig(
    out, per_device_train_batch_size=5, max_steps=1, bf16=False, use_cpu=True, report_to="none", save_strategy="no",
    logging_steps=1, disable_tqdm=True, msam_rho=0.3, msam_micro_batch_size=5, msam_method="gsam",
)
trainer = MSAMSFTTrainer(
    model=AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64), args=config,
    train_dataset=load_dataset("json", data_files=data_file, split="train"),
    processing_class=AutoTokenizer.from_pretrained(model_dir),
)
trainer.train()
'''


def test_run_recognises_the_trl_msam_trainer_built_by_the_script(tmp_path, llama_dir, data_dir, capsys):
    script = tmp_path / "own_sft.py"
    script.write_text(OWN_MSAM_SFT_SCRIPT, encoding="utf-8")
    argv = ["run", str(script), str(llama_dir), str(data_dir / "train.jsonl"), str(tmp_path / "out"),
            "--msam_micro_batch_size", "2", "--msam_method", "gsam"]  # fmt: skip
    assert cli.main(argv) == 0
    err = capsys.readouterr().err
    assert "mSAM was not used" not in err
    assert ("the script built MSAMSFTTrainer (a hf_msam.trl.MSAMSFTTrainer): it trains with mSAM (msam_rho=0.3, "
            "msam_micro_batch_size=2, msam_method=gsam, msam_adaptive=False): 3 perturbations per optimizer step") in err
    assert "The --msam_* flags replaced the script's settings: msam_micro_batch_size=5 -> 2." in err
