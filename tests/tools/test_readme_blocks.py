"""The README's code blocks run as written on a CPU (issue 33): each block is found by its `<!-- readme-test: NAME -->`
marker and run in a fresh process; only a Hub model or data set it names is replaced by a tiny local one."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parents[1]  # tests/
README = HERE.parent / "README.md"

# What a user must never see after a README block ran (the messages issue 33 is about).
BAD_MESSAGES = (
    "Traceback",
    "mSAM was not used",
    "terminate called without an active exception",
    "DeprecationWarning",
    "requires a GPU",
    "bf16",
)


DOCS = sorted((HERE.parent / "docs").glob("*.md"))


def readme_block(name: str) -> str:
    """The fenced code block right after `<!-- readme-test: name -->` in README.md or a page of docs/."""
    pattern = rf"<!-- readme-test: {re.escape(name)} -->\s*```\w*\n(.*?)```"
    found = [m.group(1) for page in (README, *DOCS) for m in re.finditer(pattern, page.read_text(encoding="utf-8"), re.DOTALL)]
    assert len(found) == 1, f"{len(found)} blocks marked <!-- readme-test: {name} --> in README.md and docs/ (one expected)"
    return found[0]


def substitute(block: str, replacements: dict[str, str]) -> str:
    for old, new in replacements.items():
        assert block.count(old) == 1, f"the README block no longer contains {old!r} once"
        block = block.replace(old, new)
    return block


def run_block(code: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "default::DeprecationWarning"}  # fmt: skip
    script = cwd / "readme_block.py"
    script.write_text(code, encoding="utf-8")
    return subprocess.run([sys.executable, str(script)], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_readme_trl_block_runs_on_a_cpu(tmp_path):
    pytest.importorskip("trl")
    pytest.importorskip("peft")
    sys.path.insert(0, str(HERE))
    from trl_helpers import PROMPT_COMPLETION, write_jsonl, write_tiny_llama

    model_dir = write_tiny_llama(tmp_path / "tiny-llama")
    data_dir = write_jsonl(tmp_path / "data", PROMPT_COMPLETION)
    code = substitute(
        readme_block("trl"),
        {
            '"Qwen/Qwen2.5-0.5B"': repr(str(model_dir)),
            'load_dataset("trl-lib/Capybara", split="train[:64]")': (
                f'load_dataset("json", data_files={str(data_dir / "train.jsonl")!r}, split="train")'
            ),
        },
    )
    code += "\nimport json\njson.dump(trainer.state.log_history, open('log_history.json', 'w'))\n"

    proc = run_block(code, tmp_path)

    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert not [m for m in BAD_MESSAGES if m in output], output[-4000:]
    history = json.loads((tmp_path / "log_history.json").read_text())
    assert history[-1]["step"] == 4 and history[-1]["train_loss"] > 0  # max_steps=4, trained
    assert "mSAM: 4 distinct perturbations per optimizer step" in output  # batch 8 in micro-batches of 2


def test_readme_set_up_installs_the_cpu_build_of_torch_first():
    """The README's first commands: on a CPU-only machine, torch from PyTorch's CPU wheel index before the install
    (PyPI's torch is the CUDA build), at the versions CI pins; then the install and test commands CI runs."""
    first = re.search(r"```bash\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.DOTALL).group(1)
    commands = [line.split("#")[0].strip() for line in first.splitlines()]
    ci = (HERE.parent / ".ci" / "run").read_text(encoding="utf-8")
    pinned = re.search(r"pip install --quiet (torch==\S+ torchvision==\S+)", ci).group(1)
    cpu = f"pip install {pinned} --index-url https://download.pytorch.org/whl/cpu"
    assert cpu in commands and commands.index(cpu) < commands.index('pip install -e ".[dev]"')
    assert "-e \".[dev]\"" in ci and "python -m pytest -q" in commands and "python -m pytest -q" in ci


# What the quickstart, the loop and the variant leave to the reader, made here: a tiny BERT from a config and an
# in-memory data set (64 rows: two steps of 32).
PREAMBLE = '''
import torch
from transformers import BertConfig, BertForSequenceClassification

torch.manual_seed(0)
model = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                                 num_attention_heads=2, intermediate_size=32, num_labels=2))
g = torch.Generator().manual_seed(0)
rows = [{"input_ids": torch.randint(1, 50, (8,), generator=g), "labels": torch.randint(0, 2, (), generator=g)}
        for _ in range(64)]
train_ds, eval_ds = rows, rows[:16]
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
loader = torch.utils.data.DataLoader(rows, batch_size=32)
'''


def run_with_preamble(name: str, tmp_path: Path, after: str = "") -> str:
    proc = run_block(PREAMBLE + readme_block(name) + after, tmp_path)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert not [m for m in BAD_MESSAGES if m in output], output[-4000:]
    return output


def test_readme_quickstart_block_runs_on_a_cpu(tmp_path):
    output = run_with_preamble("quickstart", tmp_path, after=(
        "\nassert trainer.state.global_step == 6  # 3 epochs (the default) of 2 steps\n"
        "print('path:', trainer.msam_engine.path)\n"))  # fmt: skip
    assert "mSAM: 4 distinct perturbations per optimizer step" in output and "path: " in output


def test_readme_loop_block_runs_on_a_cpu(tmp_path):
    """The hand-written loop: each step changes the weights, and the engine's micro-batches are the block's."""
    run_with_preamble("loop", tmp_path, after=(
        "\nassert sam.stats.micro_batches == 8, sam.stats  # 2 batches of 32 in micro-batches of 8\n"
        "assert isinstance(loss, torch.Tensor) and torch.isfinite(loss)\n"))  # fmt: skip


def test_readme_variant_block_trains_with_the_registered_method(tmp_path):
    output = run_with_preamble("variant", tmp_path, after='''
from hf_msam import MSAMTrainer, MSAMTrainingArguments
args = MSAMTrainingArguments(output_dir="out", per_device_train_batch_size=32, msam_method="halfrho", msam_rho=0.1,
                             report_to="none", use_cpu=True, max_steps=1)
trainer = MSAMTrainer(model=model, args=args, train_dataset=train_ds)
assert trainer.msam_perturbation.rho == 0.05
trainer.train()
print("halfrho trained")
''')
    assert "halfrho trained" in output


def test_readme_method_table_is_the_registry():
    """The README's table of methods is `methods_table()`, row for row: a method added or renamed breaks this test."""
    from hf_msam.methods import methods_table

    text = README.read_text(encoding="utf-8")
    for row in methods_table():
        assert f"| `{row.name}` | {row.paper} | {row.cost} |" in text, row
    assert len(README.read_text(encoding="utf-8")) <= 12_000  # the front page; the rest lives in docs/
