"""The code blocks of the README and the docs run as written on a CPU (issues 33, 34): each block is found by its
`<!-- readme-test: NAME -->` marker and run, in a fresh process or, where that is cheap and safe, in this one; only a
Hub model or data set it names is replaced by a tiny local one. `test_every_code_block_is_tested_or_excluded` checks
that every Python and shell block of README.md, ARCHITECTURE.md, docs/ and the site's generated pages is either
marked (and run by a test here) or carries `<!-- not tested: REASON -->` on the line above its fence."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

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


DOCS = sorted((HERE.parent / "docs").rglob("*.md"))


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
args = MSAMTrainingArguments(output_dir="out", per_device_train_batch_size=32, msam_method="scaled", msam_rho=0.1,
                             msam_method_args="factor=0.25", report_to="none", use_cpu=True, max_steps=1)
trainer = MSAMTrainer(model=model, args=args, train_dataset=train_ds)
assert trainer.msam_perturbation.rho == 0.025
trainer.train()
print("scaled trained")
''')
    assert "scaled trained" in output


def test_readme_method_table_is_the_registry():
    """The README's table of methods is `methods_table()`, row for row: a method added or renamed breaks this test."""
    from hf_msam.methods import methods_table

    text = README.read_text(encoding="utf-8")
    for row in methods_table():
        assert f"| `{row.name}` | {row.paper} | {row.cost} |" in text, row
    assert len(README.read_text(encoding="utf-8")) <= 12_000  # the front page; the rest lives in docs/



# Every code block: tested or excluded (issue 34) ------------------------------------------------------------------

ROOT = HERE.parent
CODE_LANGUAGES = {"python", "py", "pycon", "bash", "sh", "shell", "console", "zsh"}
FENCE = re.compile(r"^(\s*)(```+|~~~+)\s*([\w+-]*)")
TESTED = re.compile(r"^\s*<!-- readme-test: ([\w-]+) -->\s*$")
EXCLUDED = re.compile(r"^\s*<!-- not tested: (.{10,}?) -->\s*$")


def fenced_blocks(text: str):
    """(line of the opening fence, 1-based; its language; the line above it) for each fenced block of `text`."""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        fence = match.group(2)
        yield i + 1, match.group(3).lower(), lines[i - 1] if i else ""
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            i += 1
        i += 1


def documentation_pages() -> dict[str, str]:
    """Every page whose code blocks readers copy: README.md, ARCHITECTURE.md, docs/**/*.md, and the pages the site's
    build hook generates (those made from README.md and ARCHITECTURE.md are checked in their sources)."""
    pages = {str(p.relative_to(ROOT)): p.read_text(encoding="utf-8") for p in (README, ROOT / "ARCHITECTURE.md", *DOCS)}
    sys.path.insert(0, str(ROOT))
    try:
        import mkdocs_hooks
    finally:
        sys.path.remove(str(ROOT))
    for path, text in mkdocs_hooks.generated_pages().items():
        if path not in ("index.md", "architecture.md"):
            pages[f"(generated) {path}"] = text
    return pages


def names_run_by_tests() -> set[str]:
    """The marker names some test runs: `readme_block("NAME")`, `run_with_preamble("NAME", ...)` or
    `exec_block("NAME", ...)` in any test file."""
    call = r"""(?:readme_block|run_with_preamble|exec_block)\(\s*["']([\w-]+)["']"""
    return {name for path in HERE.rglob("*.py") for name in re.findall(call, path.read_text(encoding="utf-8"))}


def test_every_code_block_is_tested_or_excluded():
    """Each Python or shell block is run by a test (`<!-- readme-test: NAME -->` above its fence, NAME asked for by a
    test) or says why not (`<!-- not tested: REASON -->`); a block without a language is refused, so that none hides
    code. Failures name file:line."""
    run = names_run_by_tests()
    problems, tested, excluded = [], 0, 0
    for path, text in documentation_pages().items():
        for line, language, above in fenced_blocks(text):
            where = f"{path}:{line}"
            if not language:
                problems.append(f"{where}: a fenced block without a language (```python, ```bash, or ```text)")
                continue
            if language not in CODE_LANGUAGES:
                continue
            if (m := TESTED.match(above)) is not None:
                if m.group(1) in run:
                    tested += 1
                else:
                    problems.append(f"{where}: marked readme-test: {m.group(1)}, but no test calls readme_block({m.group(1)!r})")
            elif EXCLUDED.match(above):
                excluded += 1
            else:
                problems.append(f"{where}: a {language} block neither run by a test (<!-- readme-test: NAME --> above the "
                                "fence) nor excluded (<!-- not tested: REASON --> above the fence)")  # fmt: skip
    assert not problems, "\n".join(problems)
    assert tested >= 10, (tested, excluded)


def test_the_checker_finds_an_unmarked_block():
    text = "intro\n\n```python\nx = 1\n```\n<!-- not tested: needs two GPUs to run -->\n  ```bash\nls\n  ```\n```\nplain\n```\n"
    assert list(fenced_blocks(text)) == [(3, "python", ""), (7, "bash", "<!-- not tested: needs two GPUs to run -->"),
                                         (10, "", "  ```")]  # fmt: skip
    assert EXCLUDED.match("<!-- not tested: needs two GPUs to run -->") and not EXCLUDED.match("<!-- not tested: GPU -->")


# Blocks cheap enough to run in this process: each in its own namespace, after PREAMBLE's tiny model and data.


@pytest.fixture
def namespace(tmp_path, monkeypatch):
    """A namespace with PREAMBLE's names (and `batches`, `collator`, `max_steps`) in a fresh folder; methods a block
    registers are removed afterwards."""
    from transformers import default_data_collator

    from hf_msam.methods import REGISTRY

    monkeypatch.chdir(tmp_path)
    registered = dict(REGISTRY)
    module = types.ModuleType("doc_block")  # a module, so that what a block defines can be pickled (training_args.bin)
    monkeypatch.setitem(sys.modules, "doc_block", module)
    names = module.__dict__
    exec(PREAMBLE, names)
    names.update(collator=default_data_collator, eval_dataset=names["rows"][:16], max_steps=2)
    names["batches"] = [default_data_collator(names["rows"][:16])]
    yield names
    REGISTRY.clear()
    REGISTRY.update(registered)


def exec_block(name: str, names: dict) -> None:
    exec(compile(readme_block(name), f"<block {name}>", "exec"), names)


class TinyClassifier(torch.nn.Module):
    """Mean of 8-dim token embeddings, then a linear layer: a model whose Hessian-vector products cost little."""

    def __init__(self):
        super().__init__()
        self.embed, self.head = torch.nn.Embedding(50, 8), torch.nn.Linear(8, 2)

    def forward(self, input_ids, labels):
        logits = self.head(torch.tanh(self.embed(input_ids).mean(1)))
        return SimpleNamespace(loss=torch.nn.functional.cross_entropy(logits, labels), logits=logits)


@pytest.mark.slow
def test_flatness_blocks_run(namespace):
    """docs/flatness.md's tour of the measures and docs/flatter.md's three calls, at their default iterations, on a
    tiny classifier and one batch of 16 (about 10 s on 2 cores: 100 Hutchinson probes twice)."""
    import matplotlib

    matplotlib.use("Agg")
    torch.manual_seed(0)
    namespace["model"] = TinyClassifier()
    before = {k: v.clone() for k, v in namespace["model"].state_dict().items()}
    exec_block("flatness-functions", namespace)
    assert os.path.getsize("landscape.png") > 0 and math.isfinite(namespace["lam"]) and math.isfinite(namespace["tr"])
    exec_block("flatter-functions", namespace)
    assert all(torch.equal(v, namespace["model"].state_dict()[k]) for k, v in before.items())  # left as found


def test_compare_block_runs(tmp_path, monkeypatch):
    """docs/flatness.md's `hf-msam compare` command, as written, on two small runs' trainer states."""
    import shlex

    from hf_msam.cli import main

    monkeypatch.chdir(tmp_path)
    for run, loss in (("adamw", 0.7), ("msam", 0.6)):
        (tmp_path / "runs" / run).mkdir(parents=True)
        history = [{"step": 1, "loss": loss}, {"step": 2, "loss": loss / 2}, {"step": 2, "eval_accuracy": 0.5, "eval_loss": loss}]
        (tmp_path / "runs" / run / "trainer_state.json").write_text(json.dumps({"log_history": history, "global_step": 2}))
    command = shlex.split(readme_block("compare"))
    assert command[0] == "hf-msam"
    assert main(command[1:]) in (0, None)
    assert "adamw" in (tmp_path / "runs" / "report.md").read_text() and (tmp_path / "runs" / "report.png").stat().st_size


def test_schedule_loop_block_runs(namespace):
    """docs/loop.md's loop with LookSAM's rules and a schedule: the first step plain (start=0.5 of 2), the second not."""
    before = [p.detach().clone() for p in namespace["model"].parameters()]
    exec_block("schedule-loop", namespace)
    assert namespace["sam"].stats.micro_batches == 4, namespace["sam"].stats  # one perturbed batch of 32, micro-batches of 8
    assert any(not torch.equal(a, p) for a, p in zip(before, namespace["model"].parameters()))


def test_your_method_reference_block_passes(namespace):
    """docs/your-method.md: the method registered, then its step checked against the hand-written one."""
    exec_block("variant", namespace)
    exec_block("variant-reference", namespace)


def test_trl_mixin_block_defines_the_classes(namespace):
    pytest.importorskip("trl")
    from hf_msam import MSAMArguments, MSAMMixin

    exec_block("trl-mixin", namespace)
    assert issubclass(namespace["MySFTTrainer"], MSAMMixin) and issubclass(namespace["MySFTConfig"], MSAMArguments)
    config = namespace["MySFTConfig"]("out", msam_rho=0.1, bf16=False)
    assert config.msam_rho == 0.1


def test_troubleshooting_python_blocks_run(namespace):
    pytest.importorskip("sentence_transformers")
    exec_block("st-losses-import", namespace)
    assert hasattr(namespace["losses"], "MultipleNegativesRankingLoss")
    exec_block("gloo-teardown", namespace)  # not in a process group here: nothing to do, and no error


@pytest.mark.slow
def test_sentence_transformers_block_trains(namespace, tmp_path):
    """docs/sentence-transformers.md's block, with a tiny BERT as `model` and 64 pairs as `pairs`: 3 epochs of one step
    of 64, micro-batches of 16 (in-batch negatives: the whole-batch step)."""
    pytest.importorskip("sentence_transformers")
    from conftest import VOCAB
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer, models
    from transformers import BertConfig, BertModel, BertTokenizerFast

    path = tmp_path / "tiny-st"
    BertTokenizerFast(vocab={t: i for i, t in enumerate(VOCAB)}, model_max_length=32).save_pretrained(path)
    BertModel(BertConfig(vocab_size=len(VOCAB), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=20, max_position_embeddings=64)).save_pretrained(path)  # fmt: skip
    namespace["model"] = SentenceTransformer(modules=[models.Transformer(str(path)), models.Pooling(16, "mean")], device="cpu")
    words = VOCAB[7:]
    namespace["pairs"] = Dataset.from_dict({"anchor": [f"the {words[i % len(words)]} movie" for i in range(64)],
                                            "positive": [f"a film {words[(i + 3) % len(words)]}" for i in range(64)]})  # fmt: skip
    before = [p.detach().clone() for p in namespace["model"].parameters()]
    exec_block("sentence-transformers", namespace)
    assert any(not torch.equal(a, p) for a, p in zip(before, namespace["model"].parameters()))  # it trained
