"""examples/llm (sft.py, dpo.py) end to end, offline: a tiny Llama written by the test, the example's own data files."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

pytest.importorskip("trl")

from conftest import REPO_ROOT  # noqa: E402
from huggingface_hub import ModelCard  # noqa: E402
from trl_helpers import write_tiny_llama  # noqa: E402

EXAMPLES = REPO_ROOT / "examples" / "llm"
COMMON = [
    "--max_steps", "2", "--per_device_train_batch_size", "4", "--learning_rate", "1e-3", "--logging_steps", "1",
    "--save_strategy", "no", "--report_to", "none", "--use_cpu", "--bf16", "false", "--disable_tqdm", "true",
    "--use_peft", "--lora_r", "2", "--lora_alpha", "4", "--lora_target_modules", "q_proj", "v_proj",
    "--msam_rho", "0.05", "--msam_micro_batch_size", "2",
]  # fmt: skip


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def run_example(name, monkeypatch, *args):
    spec = importlib.util.spec_from_file_location(f"llm_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    monkeypatch.setattr(sys, "argv", [str(EXAMPLES / f"{name}.py"), *map(str, args)])
    module.main()


def check_run(out, kind):
    logs = [h for h in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in h]
    assert len(logs) == 2 and all("msam/sharpness" in h for h in logs)
    assert (out / "adapter_model.safetensors").is_file()  # LoRA: the adapter is what is saved
    card = ModelCard.load(out / "README.md")
    assert {"msam", "sharpness-aware-minimization", "trl", kind} <= set(card.data.tags)
    assert "## mSAM settings" in card.text and "perturbations per optimizer step: 2" in card.text


def test_sft_example_with_lora_and_flatness(tmp_path, llama_dir, monkeypatch):
    out = tmp_path / "sft"
    run_example(
        "sft", monkeypatch, "--model_name_or_path", llama_dir, "--train_file", EXAMPLES / "data" / "sft_train.jsonl",
        "--validation_file", EXAMPLES / "data" / "sft_validation.jsonl", "--output_dir", out, *COMMON,
        "--per_device_eval_batch_size", "4", "--msam_eval_flatness", "--msam_flatness_batches", "1",
        "--msam_flatness_iters", "2",
    )  # fmt: skip
    check_run(out, "sft")
    results = json.loads((out / "eval_results.json").read_text())
    assert {"eval_loss", "eval_hessian_top_eigenvalue", "eval_hessian_trace", "eval_sharpness"} <= set(results)


def test_dpo_example_with_lora(tmp_path, llama_dir, monkeypatch):
    out = tmp_path / "dpo"
    run_example(
        "dpo", monkeypatch, "--model_name_or_path", llama_dir, "--train_file", EXAMPLES / "data" / "dpo_train.jsonl",
        "--output_dir", out, *COMMON,
    )  # fmt: skip
    check_run(out, "dpo")


def readme_command(script):
    """The command of examples/llm/README.md that runs `script` (sft.py or dpo.py) alone, as its argument list."""
    import shlex

    text = (EXAMPLES / "README.md").read_text(encoding="utf-8").replace("\\\n", " ")
    (line,) = [x for x in text.splitlines() if x.startswith(f"python examples/llm/{script}")]
    return shlex.split(line)[2:]


@pytest.mark.parametrize("script, kind", [("sft.py", "sft"), ("dpo.py", "dpo")])
def test_readme_commands_run_as_written(tmp_path, llama_dir, monkeypatch, capsys, script, kind):
    """examples/llm/README.md's SFT and DPO commands, as written but for the model and output paths: they train
    on any machine (TRL's bf16 default is replaced by float32 without a bf16-capable GPU), and log every step."""
    import torch
    from transformers.utils import is_torch_bf16_gpu_available

    args = readme_command(script)
    out = tmp_path / kind
    args = [str(llama_dir) if a == "path/to/local/model" else str(out) if a.startswith("runs/") else a for a in args]
    assert "--bf16" not in args and "--use_cpu" not in args and "--logging_steps" in args
    monkeypatch.chdir(REPO_ROOT)  # the data paths are relative to the repository
    run_example(kind, monkeypatch, *args)
    if not torch.cuda.is_available():
        assert "no bf16-capable GPU, adding --use_cpu --bf16 false" in capsys.readouterr().err
    elif not is_torch_bf16_gpu_available():
        assert "no bf16-capable GPU, adding --bf16 false" in capsys.readouterr().err
    state = json.loads((out / "trainer_state.json").read_text())
    logs = [h for h in state["log_history"] if "loss" in h]
    assert state["max_steps"] >= 2 and len(logs) == state["max_steps"]  # --logging_steps 1: every step
    assert all("msam/sharpness" in h for h in logs)
