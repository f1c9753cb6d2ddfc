"""examples/glue/run_glue.py end to end, offline, on a tiny BERT and tiny csv files."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT, sentiment_rows, write_csv
from huggingface_hub import ModelCard
from safetensors.torch import load_file
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from hf_msam import MSAMTrainer

SCRIPT = REPO_ROOT / "examples" / "glue" / "run_glue.py"


@pytest.fixture(scope="module")
def run_glue():
    spec = importlib.util.spec_from_file_location("run_glue", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def run(run_glue, monkeypatch):
    """Run the script's main() in this process with `args`; return the MSAMTrainer it built (None if none)."""

    def _run(*args) -> MSAMTrainer | None:
        trainers = []

        class RecordingTrainer(MSAMTrainer):
            def __init__(self, *a, **kw):
                super().__init__(*a, **kw)
                trainers.append(self)

        monkeypatch.setattr(run_glue, "MSAMTrainer", RecordingTrainer)
        monkeypatch.setattr(sys, "argv", [str(SCRIPT), *map(str, args)])
        run_glue.main()
        return trainers[0] if trainers else None

    return _run


def common_args(model: Path, out: Path, steps: int = 2) -> list:
    return [
        "--model_name_or_path", model, "--output_dir", out, "--do_train", "--do_eval",
        "--max_seq_length", 16, "--per_device_train_batch_size", 8, "--per_device_eval_batch_size", 16,
        "--max_steps", steps, "--logging_steps", 1, "--learning_rate", 1e-3, "--seed", 0,
        "--save_strategy", "no", "--use_cpu", "--report_to", "none", "--disable_tqdm", "true",
    ]  # fmt: skip


def eval_predictions(trainer: MSAMTrainer) -> tuple[np.ndarray, np.ndarray]:
    output = trainer.predict(trainer.eval_dataset)
    return np.squeeze(output.predictions), output.label_ids


def test_local_csv_end_to_end(tiny_bert, glue_csv, tmp_path, run, caplog):
    out = tmp_path / "out"
    trainer = run(
        *common_args(tiny_bert, out, steps=3),
        "--train_file", glue_csv["train"], "--validation_file", glue_csv["validation"], "--test_file", glue_csv["test"],
        "--do_predict", "--msam_rho", 0.1, "--msam_micro_batch_size", 2,
    )  # fmt: skip

    for name in ("all_results.json", "eval_results.json", "train_results.json", "trainer_state.json", "README.md"):
        assert (out / name).is_file(), name
    # Accuracy, computed locally (offline) with a warning, is the accuracy of the model's predictions.
    assert "Computing the same numbers locally" in caplog.text
    eval_results = json.loads((out / "eval_results.json").read_text())
    preds, labels = eval_predictions(trainer)
    assert eval_results["eval_accuracy"] == pytest.approx(accuracy_score(labels, preds.argmax(-1)))
    assert eval_results["eval_samples"] == 16
    assert json.loads((out / "all_results.json").read_text())["train_samples"] == 32
    # mSAM really trained: its metrics are in every training log.
    logs = [e for e in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in e]
    assert len(logs) == 3 and all("msam/sharpness" in e and "msam/perturbed_loss" in e for e in logs)
    # Predictions are written with the label names of the data.
    lines = (out / "predict_results_test.txt").read_text().splitlines()
    assert lines[0] == "index\tprediction" and len(lines) == 9
    assert {line.split("\t")[1] for line in lines[1:]} <= {"0", "1"}
    # The model card: tags and mSAM settings.
    card = ModelCard.load(out / "README.md")
    assert {"msam", "sharpness-aware-minimization"} <= set(card.data.tags)
    assert "## mSAM settings" in card.text
    assert "- rho: 0.1" in card.text and "- micro-batch size: 2 example(s)" in card.text
    assert "- adaptive (ASAM): False" in card.text
    assert "- perturbations per optimizer step: 4 (1 device(s) x 1 accumulation step(s) x 4 micro-batch(es)" in card.text


@pytest.mark.parametrize("task", ["cola", "mrpc", "stsb"])
def test_glue_task_metrics_on_local_files(task, tiny_bert, tmp_path, run):
    """--task_name with local files: the task's columns and GLUE metrics, computed offline like `evaluate` would."""
    pairs, regression = task != "cola", task == "stsb"
    train = write_csv(tmp_path / "train.csv", sentiment_rows(16, seed=0, pairs=pairs, regression=regression))
    validation = write_csv(tmp_path / "dev.csv", sentiment_rows(16, seed=1, pairs=pairs, regression=regression))
    out = tmp_path / "out"
    head = ["--ignore_mismatched_sizes"] if regression else []  # the tiny BERT has a 2-label head
    trainer = run(
        *common_args(tiny_bert, out, steps=1),
        "--task_name", task, "--train_file", train, "--validation_file", validation, *head,
    )  # fmt: skip

    metrics = json.loads((out / "eval_results.json").read_text())
    preds, labels = eval_predictions(trainer)
    if task == "cola":
        expected = {"matthews_correlation": matthews_corrcoef(labels, preds.argmax(-1))}
    elif task == "mrpc":
        expected = {"accuracy": accuracy_score(labels, preds.argmax(-1)), "f1": f1_score(labels, preds.argmax(-1))}
        expected["combined_score"] = np.mean(list(expected.values()))
    else:
        assert trainer.model.config.num_labels == 1 and labels.dtype == np.float32  # regression
        expected = {"pearson": pearsonr(preds, labels)[0], "spearmanr": spearmanr(preds, labels)[0]}
        expected["combined_score"] = np.mean(list(expected.values()))
    assert {k: metrics[f"eval_{k}"] for k in expected} == pytest.approx(expected)


def test_float_labels_train_as_regression(tiny_bert, tmp_path, run):
    train = write_csv(tmp_path / "train.csv", sentiment_rows(16, seed=0, regression=True))
    validation = write_csv(tmp_path / "dev.csv", sentiment_rows(8, seed=1, regression=True))
    out = tmp_path / "out"
    trainer = run(
        *common_args(tiny_bert, out, steps=1),
        "--train_file", train, "--validation_file", validation, "--ignore_mismatched_sizes",
    )  # fmt: skip
    assert trainer.model.config.num_labels == 1
    preds, labels = eval_predictions(trainer)
    assert json.loads((out / "eval_results.json").read_text())["eval_mse"] == pytest.approx(((preds - labels) ** 2).mean())


def test_lora_trains_only_the_adapter(tiny_bert, glue_csv, tmp_path, run):
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "out"
    trainer = run(
        *common_args(tiny_bert, out, steps=2),
        "--train_file", glue_csv["train"], "--validation_file", glue_csv["validation"],
        "--use_peft", "--lora_r", 4, "--lora_alpha", 8, "--lora_dropout", 0.0, "--lora_target_modules", "query", "value",
        "--msam_micro_batch_size", 4, "--learning_rate", 1e-2,
    )  # fmt: skip

    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert).state_dict()
    trained = trainer.model.state_dict()
    lora_b = {k: v for k, v in trained.items() if "lora_B" in k}
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b.values())  # zero at init: the adapter has trained
    frozen = {
        k.replace("base_model.model.", "").replace(".base_layer", "").replace(".original_module", ""): v
        for k, v in trained.items()
        if "lora_" not in k and "modules_to_save" not in k
    }
    assert set(frozen) == set(base)
    assert all(torch.equal(frozen[k], base[k]) for k in base), "a base weight moved"
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "modules_to_save" in n for n in trainable)
    # Only the adapter is saved, and the card still records mSAM.
    assert (out / "adapter_config.json").is_file() and not (out / "model.safetensors").exists()
    assert any("lora_B" in k for k in load_file(out / "adapter_model.safetensors"))
    assert "## mSAM settings" in (out / "README.md").read_text()
    assert "msam/sharpness" in json.dumps(json.loads((out / "trainer_state.json").read_text())["log_history"])


@pytest.mark.parametrize(
    "case, message",
    [
        ("unknown_task", "Unknown --task_name 'glu': pick one of cola, mnli"),
        ("missing_column", "The train data lacks the column(s) sentence"),
        ("no_validation_label", "The validation data lacks the column(s) label"),
        ("unseen_validation_label", "The validation data has label(s) [7] that the training data never shows"),
        ("mixed_extensions", "must all be csv or all be json files"),
    ],
)
def test_bad_input_fails_before_training(case, message, tiny_bert, glue_csv, tmp_path, run):
    train, validation = glue_csv["train"], glue_csv["validation"]
    extra = []
    if case == "unknown_task":
        extra = ["--task_name", "glu"]
    elif case == "missing_column":
        train = write_csv(tmp_path / "bad.csv", [{"text": "good movie .", "label": 1}, {"text": "bad .", "label": 0}])
    elif case == "no_validation_label":
        validation = write_csv(tmp_path / "bad.csv", [{"sentence": "good movie ."}])
    elif case == "unseen_validation_label":
        validation = write_csv(tmp_path / "bad.csv", [{"sentence": "good movie .", "label": 7}])
    elif case == "mixed_extensions":
        validation = tmp_path / "dev.json"
        validation.write_text('{"sentence": "good .", "label": 1}\n')
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=re.escape(message)):
        run(*common_args(tiny_bert, out), "--train_file", train, "--validation_file", validation, *extra)
    assert not (out / "trainer_state.json").exists()


def test_json_files(tiny_bert, tmp_path, run):
    for split, seed in (("train", 0), ("dev", 1)):
        with open(tmp_path / f"{split}.json", "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in sentiment_rows(8, seed=seed, pairs=True))
    out = tmp_path / "out"
    trainer = run(
        *common_args(tiny_bert, out, steps=1),
        "--train_file", tmp_path / "train.json", "--validation_file", tmp_path / "dev.json",
    )  # fmt: skip
    assert trainer.train_dataset[0]["token_type_ids"].count(1) > 0  # sentence1 and sentence2 were encoded as a pair
    assert "eval_accuracy" in json.loads((out / "eval_results.json").read_text())


@pytest.mark.slow
@pytest.mark.multiprocess
def test_accelerate_launch_two_processes(tiny_bert, glue_csv, tmp_path):
    out = tmp_path / "out"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port), str(SCRIPT),
        *map(str, common_args(tiny_bert, out)), "--per_device_train_batch_size", "4", "--msam_micro_batch_size", "2",
        "--train_file", str(glue_csv["train"]), "--validation_file", str(glue_csv["validation"]),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    log = proc.stdout + proc.stderr
    assert "mSAM: 4 distinct perturbations per optimizer step (2 device(s)" in log
    card = (out / "README.md").read_text()
    assert "- perturbations per optimizer step: 4 (2 device(s) x 1 accumulation step(s) x 2 micro-batch(es)" in card
    state = json.loads((out / "trainer_state.json").read_text())
    assert all("msam/sharpness" in e for e in state["log_history"] if "loss" in e)
    assert json.loads((out / "eval_results.json").read_text())["eval_samples"] == 16


def topic_rows(n: int, seed: int) -> list[dict]:
    """Sentences labelled with class names (three moods), in the order upbeat, gloomy, plain, upbeat, ..."""
    import random

    from conftest import NEGATIVE_WORDS, NEUTRAL_WORDS, POSITIVE_WORDS

    rng = random.Random(seed)
    words = {"upbeat": POSITIVE_WORDS, "gloomy": NEGATIVE_WORDS, "plain": NEUTRAL_WORDS}
    names = list(words)
    return [
        {"sentence": " ".join(rng.choice(words[names[i % 3]]) for _ in range(5)) + " .", "label": names[i % 3]}
        for i in range(n)
    ]


def write_rows(path: Path, rows: list[dict]) -> Path:
    if path.suffix == ".csv":
        return write_csv(path, rows)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def read_predictions(path: Path) -> list[str]:
    lines = path.read_text().splitlines()
    assert lines[0] == "index\tprediction"
    assert [line.split("\t")[0] for line in lines[1:]] == [str(i) for i in range(len(lines) - 1)]
    return [line.split("\t")[1] for line in lines[1:]]


@pytest.mark.parametrize("ext", ["csv", "json"])
def test_class_name_labels_train_evaluate_predict(ext, tiny_bert, tmp_path, run):
    """Labels written as class names: ids in the model, names in its config and in the predictions file."""
    train = write_rows(tmp_path / f"train.{ext}", topic_rows(36, seed=0))
    validation_rows = topic_rows(15, seed=1)
    validation = write_rows(tmp_path / f"dev.{ext}", validation_rows)
    out = tmp_path / "out"
    trainer = run(
        *common_args(tiny_bert, out, steps=4),
        "--train_file", train, "--validation_file", validation, "--test_file", validation, "--do_predict",
        "--ignore_mismatched_sizes", "--msam_micro_batch_size", 4,  # the tiny BERT has a 2-label head
    )  # fmt: skip

    # The names, sorted, are the classes 0, 1, 2, in the saved config too.
    names = {0: "gloomy", 1: "plain", 2: "upbeat"}
    assert trainer.model.config.id2label == names
    saved = json.loads((out / "config.json").read_text())
    assert saved["id2label"] == {str(i): name for i, name in names.items()}
    assert saved["label2id"] == {name: i for i, name in names.items()}
    # The model saw integer class ids (the encoded `label` column), not the strings of the file.
    assert trainer.train_dataset[0]["label"] == {"upbeat": 2, "gloomy": 0, "plain": 1}[topic_rows(1, seed=0)[0]["label"]]
    assert trainer.train_dataset.features["label"].names == list(names.values())
    # Predictions are written as names; the evaluation's accuracy is scikit-learn's on them.
    predicted = read_predictions(out / "predict_results_test.txt")
    truth = [row["label"] for row in validation_rows]
    assert len(predicted) == len(truth) and set(predicted) <= set(names.values())
    eval_results = json.loads((out / "eval_results.json").read_text())
    assert eval_results["eval_accuracy"] == pytest.approx(accuracy_score(truth, predicted))
    assert eval_results["eval_samples"] == 15
    logs = [e for e in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in e]
    assert len(logs) == 4 and all(math.isfinite(e["loss"]) for e in logs)


@pytest.mark.slow
def test_trained_class_names_model_evaluates_again_with_its_own_order(tiny_bert, tmp_path, run):
    """A checkpoint whose config names the classes in its own order (not sorted) is evaluated with the ids of
    that order: its head keeps its meaning."""
    rows = topic_rows(24, seed=0)
    train = write_csv(tmp_path / "train.csv", rows)
    validation_rows = topic_rows(12, seed=1)
    validation = write_csv(tmp_path / "dev.csv", validation_rows)
    first_out, second_out = tmp_path / "first", tmp_path / "second"
    run(
        *common_args(tiny_bert, first_out, steps=2), "--train_file", train, "--validation_file", validation,
        "--test_file", validation, "--do_predict", "--ignore_mismatched_sizes",
    )  # fmt: skip
    # The trained config, with the names in another order than sorted: the ids must follow the model.
    config_path = first_out / "config.json"
    config = json.loads(config_path.read_text())
    config["id2label"] = {"0": "upbeat", "1": "gloomy", "2": "plain"}
    config["label2id"] = {"upbeat": 0, "gloomy": 1, "plain": 2}
    config_path.write_text(json.dumps(config))
    trainer = run(
        "--model_name_or_path", first_out, "--output_dir", second_out, "--do_eval", "--do_predict",
        "--train_file", train, "--validation_file", validation, "--test_file", validation,
        "--max_seq_length", 16, "--per_device_eval_batch_size", 16, "--use_cpu", "--report_to", "none",
    )  # fmt: skip
    assert trainer.model.config.id2label == {0: "upbeat", 1: "gloomy", 2: "plain"}
    assert trainer.eval_dataset["label"] == [{"upbeat": 0, "gloomy": 1, "plain": 2}[r["label"]] for r in validation_rows]
    predicted = read_predictions(second_out / "predict_results_test.txt")
    truth = [r["label"] for r in validation_rows]
    assert json.loads((second_out / "eval_results.json").read_text())["eval_accuracy"] == pytest.approx(
        accuracy_score(truth, predicted)
    )


def test_unknown_class_name_in_validation_fails_before_training(tiny_bert, tmp_path, run):
    train = write_csv(tmp_path / "train.csv", topic_rows(12, seed=0))
    validation = write_csv(tmp_path / "dev.csv", [{"sentence": "good .", "label": "cheerful"}])
    with pytest.raises(ValueError, match=re.escape("The validation data has label(s) ['cheerful'] that the training")):
        run(*common_args(tiny_bert, tmp_path / "out"), "--train_file", train, "--validation_file", validation)


def test_under_hf_msam_run_the_msam_flags_are_honoured(tiny_bert, glue_csv, tmp_path):
    """`hf-msam run run_glue.py --msam_micro_batch_size 2`: the launcher takes the --msam_* flags off the command
    line; the script must still train with them (2 micro-batches of 2), not with the defaults."""
    from hf_msam.launcher import run as launcher_run

    out = tmp_path / "out"
    args = [*common_args(tiny_bert, out, steps=1), "--train_file", glue_csv["train"], "--validation_file",
            glue_csv["validation"], "--per_device_train_batch_size", 4, "--msam_micro_batch_size", 2, "--msam_rho", 0.2]
    launcher_run(str(SCRIPT), [str(a) for a in args])
    card = (out / "README.md").read_text()
    assert "- rho: 0.2" in card and "- micro-batch size: 2 example(s)" in card
    assert "- perturbations per optimizer step: 2 (1 device(s) x 1 accumulation step(s) x 2 micro-batch(es)" in card


@pytest.mark.parametrize("side", ["right", "left"])
def test_truncation_side_keeps_the_chosen_end(side, tiny_bert, glue_csv, tmp_path, run):
    from transformers import AutoTokenizer

    args = common_args(tiny_bert, tmp_path / side, steps=1)
    args[args.index("--max_seq_length") + 1] = 6
    trainer = run(*args, "--train_file", glue_csv["train"], "--validation_file", glue_csv["validation"],
                  "--truncation_side", side, "--msam_rho", 0)  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    with open(glue_csv["train"], newline="") as f:
        texts = [row["sentence"] for row in csv.DictReader(f)]
    long = [i for i, t in enumerate(texts) if len(tokenizer(t, add_special_tokens=False)["input_ids"]) > 4]
    assert long, "the test data needs texts longer than the limit"
    for i in long:
        ids = tokenizer(texts[i], add_special_tokens=False)["input_ids"]
        kept = ids[-4:] if side == "left" else ids[:4]  # 6 tokens = [CLS] + 4 + [SEP]
        assert trainer.train_dataset[i]["input_ids"] == [tokenizer.cls_token_id, *kept, tokenizer.sep_token_id]


def renamed(rows: list[dict], names: dict[str, str]) -> list[dict]:
    return [{names.get(k, k): v for k, v in row.items()} for row in rows]


@pytest.mark.parametrize("pairs", [False, True])
def test_text_column_names_reads_columns_of_other_names(pairs, tiny_bert, tmp_path, run):
    """--text_column_names text (or a pair, `question,answer`): the same run, example for example and weight for
    weight, as with the same texts under the default names `sentence` (`sentence1`, `sentence2`)."""
    names = {"sentence1": "question", "sentence2": "answer"} if pairs else {"sentence": "text"}
    rows = {split: sentiment_rows(16, seed=seed, pairs=pairs) for split, seed in (("train", 0), ("dev", 1))}
    trainers = {}
    for kind in ("default", "renamed"):
        files = {
            split: write_csv(tmp_path / f"{kind}-{split}.csv", r if kind == "default" else renamed(r, names))
            for split, r in rows.items()
        }
        flag = ["--text_column_names", "question, answer" if pairs else "text"] if kind == "renamed" else []
        trainers[kind] = run(
            *common_args(tiny_bert, tmp_path / kind, steps=2),
            "--train_file", files["train"], "--validation_file", files["dev"], "--msam_micro_batch_size", 4, *flag,
        )  # fmt: skip
    default, other = trainers["default"], trainers["renamed"]
    columns = other.train_dataset.column_names
    assert set(names.values()) <= set(columns) and not set(names) & set(columns)
    for key in ("input_ids", "token_type_ids", "attention_mask"):
        assert other.train_dataset[key] == default.train_dataset[key]
        assert other.eval_dataset[key] == default.eval_dataset[key]
    assert any(1 in ids for ids in other.train_dataset["token_type_ids"]) == pairs  # a pair is encoded as a pair
    trained, reference = other.model.state_dict(), default.model.state_dict()
    assert all(torch.equal(trained[k], reference[k]) for k in reference)
    results = {kind: json.loads((tmp_path / kind / "eval_results.json").read_text()) for kind in trainers}
    for key in ("eval_loss", "eval_accuracy", "eval_samples"):
        assert results["renamed"][key] == results["default"][key]


@pytest.mark.parametrize(
    "value, message",
    [
        (None, "The train data lacks the column(s) sentence (it has: text, label). Expected a `sentence` column, or "
               "`sentence1` and `sentence2` columns (other names: --text_column_names)"),
        ("body", "The train data lacks the column(s) body (it has: text, label). Expected the column(s) of "
                 "--text_column_names: body"),
        ("a,b,c", "--text_column_names takes one column name or two (a pair), comma-separated"),
        ("text,", "--text_column_names takes one column name or two (a pair), comma-separated"),
    ],
)  # fmt: skip
def test_text_column_names_errors_name_the_flag(value, message, tiny_bert, tmp_path, run):
    rows = [{"text": "good movie .", "label": 1}, {"text": "bad .", "label": 0}]
    train, validation = write_csv(tmp_path / "train.csv", rows), write_csv(tmp_path / "dev.csv", rows)
    flag = [] if value is None else ["--text_column_names", value]
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=re.escape(message)):
        run(*common_args(tiny_bert, out), "--train_file", train, "--validation_file", validation, *flag)
    assert not (out / "trainer_state.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    "script, where",
    [("glue/run_glue.py", "repository root"), ("glue/run_glue.py", "elsewhere"),
     ("vision/run_image_classification.py", "elsewhere")],
)  # fmt: skip
def test_scripts_find_the_shared_module_from_any_directory(script, where, tmp_path):
    """examples/examples_common.py is beside the examples, not in the package: a script finds it from its own
    location, run as `python examples/glue/run_glue.py` from the repository root or by its path from elsewhere."""
    path = REPO_ROOT / "examples" / script
    cwd, path = (REPO_ROOT, path.relative_to(REPO_ROOT)) if where == "repository root" else (tmp_path, path)
    proc = subprocess.run([sys.executable, str(path), "--help"], capture_output=True, text=True, cwd=cwd, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    flag = "--text_column_names" if script.startswith("glue") else "--train_dir"
    assert flag in proc.stdout and "--msam_rho" in proc.stdout


def test_the_package_needs_neither_datasets_nor_evaluate():
    """The library imports neither (the examples' shared module, which does, is not part of it)."""
    import ast

    import hf_msam

    assert importlib.util.find_spec("hf_msam.examples_common") is None
    imported = set()
    for path in Path(hf_msam.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                imported.add(node.module.split(".")[0])
    assert "torch" in imported and "transformers" in imported  # the walk sees the package's imports
    assert not imported & {"datasets", "evaluate"}
