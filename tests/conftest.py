"""Shared fixtures: tiny models saved from configs and tiny data sets, all written locally (no Hub)."""

from __future__ import annotations

import csv
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_EVALUATE_OFFLINE"] = "1"  # evaluate does not follow HF_HUB_OFFLINE: it would try the network first
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parent.parent
# The tests mirror the package (engine/, vectorized/, methods/, integrations/, trainer/, tools/); the helpers they
# share (reference.py, trl_helpers.py, internals.py, the two-process scripts) stay here. Every folder is importable
# from every test, and from the processes the tests launch (TEST_PATHS for their PYTHONPATH).
TESTS = Path(__file__).resolve().parent
TEST_PATHS = [str(TESTS), *(str(d) for d in sorted(TESTS.iterdir()) if d.is_dir() and (d / "__init__.py").exists() is False
                            and any(d.glob("test_*.py")))]  # fmt: skip
for _path in reversed(TEST_PATHS):
    if _path not in sys.path:
        sys.path.insert(0, _path)


def free_port() -> int:
    """A free TCP port on the loopback, for a launched process group's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def script_env() -> dict:
    """The environment of a launched test script: every test folder importable, one thread per process."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([*TEST_PATHS, os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}


def torchrun_ranks(out_dir, script: str, *args: str, timeout: int = 300) -> list[dict]:
    """Run tests/`script` in 2 gloo processes through torchrun (its first argument `out_dir`); what each rank saved
    there (rank0.pt, rank1.pt)."""
    import torch

    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(free_port()), str(TESTS / script), str(out_dir), *args,
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=script_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(2)]

# A vocabulary small enough for a 2-layer BERT, large enough for the sentences below.
POSITIVE_WORDS = ["good", "great", "fine", "nice", "happy"]
NEGATIVE_WORDS = ["bad", "awful", "poor", "sad", "ugly"]
NEUTRAL_WORDS = ["the", "a", "movie", "film", "plot", "was", "is", "very", "really", "and", "it", "this", "story", "cast"]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", *POSITIVE_WORDS, *NEGATIVE_WORDS, *NEUTRAL_WORDS]


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    """A 2-layer BERT for sequence classification (random weights) with a WordPiece tokenizer, saved to a dir."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    path = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = BertTokenizerFast(vocab={token: i for i, token in enumerate(VOCAB)}, model_max_length=32)
    tokenizer.save_pretrained(path)
    config = BertConfig(
        vocab_size=len(VOCAB),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=64,
        num_labels=2,
    )
    BertForSequenceClassification(config).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_vit(tmp_path_factory) -> Path:
    """A 2-layer ViT for 32x32 images (random weights, 3 labels) with its ViTImageProcessor, saved to a dir."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    path = tmp_path_factory.mktemp("tiny-vit")
    config = ViTConfig(
        image_size=32,
        patch_size=8,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        num_labels=3,  # deliberately not the 2 classes of `image_folders`: exercises --ignore_mismatched_sizes
    )
    ViTForImageClassification(config).save_pretrained(path)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
    return path


def _sentence(rng: random.Random, words: list[str]) -> str:
    return " ".join([rng.choice(NEUTRAL_WORDS), rng.choice(words), rng.choice(NEUTRAL_WORDS), rng.choice(words)]) + " ."


def write_csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def sentiment_rows(n: int, seed: int, pairs: bool = False, regression: bool = False) -> list[dict]:
    """Sentences whose label is 1 for positive words, 0 for negative ones (a score in [0, 5] with `regression`)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 2
        words = POSITIVE_WORDS if label else NEGATIVE_WORDS
        if pairs:
            row = {"sentence1": _sentence(rng, words), "sentence2": _sentence(rng, words)}
        else:
            row = {"sentence": _sentence(rng, words)}
        row["label"] = round(label * 4.0 + rng.random(), 3) if regression else label
        rows.append(row)
    return rows


@pytest.fixture
def glue_csv(tmp_path) -> dict[str, Path]:
    """train/validation/test csv files with `sentence` and integer `label` columns."""
    return {
        "train": write_csv(tmp_path / "train.csv", sentiment_rows(32, seed=0)),
        "validation": write_csv(tmp_path / "validation.csv", sentiment_rows(16, seed=1)),
        "test": write_csv(tmp_path / "test.csv", sentiment_rows(8, seed=2)),
    }


@pytest.fixture(scope="session")
def image_folders(tmp_path_factory) -> dict[str, Path]:
    """`imagefolder` train/ and validation/ dirs of 32x32 PNGs in two classes (reddish `cat`, bluish `dog`)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    rng = random.Random(0)
    for split, n in (("train", 12), ("validation", 6)):
        for label, base in (("cat", (200, 40, 40)), ("dog", (40, 40, 200))):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(n // 2):
                color = tuple(min(255, max(0, c + rng.randint(-30, 30))) for c in base)
                Image.new("RGB", (32, 32), color).save(folder / f"{label}_{i}.png")
    return {"train": root / "train", "validation": root / "validation"}
