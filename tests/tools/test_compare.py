"""`hf-msam compare` on run directories made by really training tiny MSAMTrainer runs, and on broken ones."""

import json
import os
import re
import shutil
from html.parser import HTMLParser
from types import SimpleNamespace

import pytest
import torch
from markdown_it import MarkdownIt  # installed with transformers (through typer and rich)
from PIL import Image
from transformers import BertConfig, BertForSequenceClassification

from hf_msam import MSAMTrainer, MSAMTrainingArguments
from hf_msam.compare import NEGATIVE_EIGENVALUE_NOTE, load_run, main, plot_runs

STEPS = 6


def tiny_bert():
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=16, num_labels=2,
    )
    return BertForSequenceClassification(config)


def bert_data(n, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 50, (n, 6), generator=g)
    labels = (ids[:, 0] > 25).long()  # learnable: the class is in the first token
    return [{"input_ids": ids[i], "labels": labels[i]} for i in range(n)]


def accuracy(prediction):
    return {"accuracy": float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())}


def train_run(output_dir, rho, micro_batch_size=None, evaluate_during_training=True):
    """A run as an example script leaves it: model and args, trainer state, all_results.json, the landscape.
    Without `evaluate_during_training`: `--eval_strategy no`, one evaluation after the state is saved, no flatness."""
    args = MSAMTrainingArguments(
        output_dir=str(output_dir), per_device_train_batch_size=8, per_device_eval_batch_size=8, max_steps=STEPS,
        learning_rate=1e-3, logging_steps=1, eval_strategy="steps" if evaluate_during_training else "no", eval_steps=3,
        save_strategy="no", report_to="none", use_cpu=True, msam_rho=rho, msam_micro_batch_size=micro_batch_size,
        msam_eval_flatness=evaluate_during_training, msam_flatness_batches=1, msam_flatness_iters=10,
        msam_eval_landscape=evaluate_during_training,
    )
    trainer = MSAMTrainer(
        model=tiny_bert(), args=args, train_dataset=bert_data(48, seed=1), eval_dataset=bert_data(16, seed=2),
        compute_metrics=accuracy,
    )
    train_metrics = trainer.train().metrics
    trainer.save_model()
    trainer.save_metrics("train", train_metrics)
    trainer.save_state()
    trainer.save_metrics("eval", trainer.evaluate())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two real runs (plain AdamW, mSAM), a run whose state is only in a checkpoint, and broken ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is fastest
    root = tmp_path_factory.mktemp("runs")
    try:
        train_run(root / "adamw", rho=0.0)
        train_run(root / "msam", rho=0.05, micro_batch_size=2)
        train_run(root / "final_eval_only", rho=0.05, evaluate_during_training=False)
    finally:
        torch.set_num_threads(threads)
    checkpointed = root / "checkpointed"
    shutil.copytree(root / "msam", checkpointed / f"checkpoint-{STEPS}")
    (checkpointed / "checkpoint-2").mkdir()
    (checkpointed / "checkpoint-2" / "trainer_state.json").write_text('{"log_history": []}')
    broken = root / "broken"
    shutil.copytree(root / "msam", broken)
    (broken / "trainer_state.json").write_text('{"log_history": [{"step": 1, "loss"')  # cut short
    bad_landscape = root / "bad_landscape"
    shutil.copytree(root / "adamw", bad_landscape)
    (bad_landscape / "loss_landscape.json").write_text('{"directions": 3}')
    (root / "empty").mkdir()
    return root


def read_table(path):
    """{run name: {column: cell}} from the Markdown table of report.md."""
    lines = [line for line in path.read_text().splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]
    return {row[0].strip("`"): dict(zip(header, row)) for row in rows}


def test_report_has_a_row_per_run_and_skips_the_broken(runs, tmp_path, capsys):
    directories = ["adamw", "msam", "checkpointed", "broken", "bad_landscape", "empty", "missing"]
    assert main([str(runs / d) for d in directories] + ["--output", str(tmp_path / "out" / "report")]) == 0
    report = tmp_path / "out" / "report.md"
    table = read_table(report)
    assert list(table) == ["adamw", "msam", "checkpointed"]

    # The mSAM settings, from training_args.bin.
    settings = {name: (row["ρ"], row["micro-batch"], row["ASAM"]) for name, row in table.items()}
    assert settings["adamw"] == ("0 (off)", "whole batch", "no")
    assert settings["msam"] == ("0.05", "2", "no")
    # The final evaluation and flatness numbers, and the train time, from all_results.json.
    for name in ("adamw", "msam"):
        with open(runs / name / "all_results.json") as f:
            results = json.load(f)
        row = table[name]
        assert row["steps"] == str(STEPS)
        assert row["eval_loss"] == f"{results['eval_loss']:.4g}"
        assert row["eval_accuracy"] == f"{results['eval_accuracy']:.4g}"
        assert row["λ_max(H)"] == f"{results['eval_hessian_top_eigenvalue']:.4g}"
        assert row["tr(H)"] == f"{results['eval_hessian_trace']:.4g}"
        assert row["sharpness"] == f"{results['eval_sharpness']:.4g}"
        assert row["train time"] == f"{results['train_runtime']:.1f} s"
    assert table["msam"]["eval_loss"] != table["adamw"]["eval_loss"]
    # A run that saved its state only in checkpoints: the latest one's.
    assert table["checkpointed"]["steps"] == str(STEPS) and table["checkpointed"]["ρ"] == "0.05"

    # The broken runs are reported, in the report and on stderr, with why.
    skipped = report.read_text().split("## Skipped")[1]
    err = capsys.readouterr().err
    for name, reason in [
        ("broken", "trainer_state.json is unreadable"),
        ("bad_landscape", "loss_landscape.json is unreadable"),
        ("empty", "no trainer_state.json"),
        ("missing", "not a directory"),
    ]:
        assert f"`{runs / name}`: {reason}" in skipped
        assert f"skipping {runs / name}: {reason}" in err
    assert "![" in report.read_text() and "(report.png)" in report.read_text()


def test_report_png_is_a_figure(runs, tmp_path):
    output = ["--output", str(tmp_path / "report.md"), "--metric", "eval_accuracy"]
    assert main([str(runs / "adamw"), str(runs / "msam"), *output]) == 0
    with Image.open(tmp_path / "report.png") as image:
        image.verify()
        assert image.format == "PNG" and image.width >= 1000 and image.height >= 700  # 2 x 2 panels: landscapes present


def test_nothing_to_report(runs, tmp_path, capsys):
    assert main([str(runs / "empty"), str(runs / "broken"), "--output", str(tmp_path / "report")]) == 1
    assert "no run could be read" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_training_args_are_read_without_running_them(runs, tmp_path):
    """training_args.bin is a pickle: reading the settings must not call what it names."""
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    run = tmp_path / "run"
    shutil.copytree(runs / "adamw", run)
    torch.save(SimpleNamespace(msam_rho=Payload(), msam_micro_batch_size=4), run / "training_args.bin")
    assert load_run(run).settings == {"msam_micro_batch_size": 4}
    assert not marker.exists()


def test_eval_panel_of_a_run_evaluated_only_at_the_end(runs, tmp_path):
    """--eval_strategy no: no evaluation in the logs, the final one in all_results.json: one point at the last step."""
    run = load_run(runs / "final_eval_only")
    assert not any("eval_accuracy" in log for log in run.log_history)
    with open(runs / "final_eval_only" / "all_results.json") as f:
        final = json.load(f)["eval_accuracy"]
    figure = plot_runs([load_run(runs / "adamw"), run], tmp_path / "report.png", metric="eval_accuracy")
    eval_panel = figure.axes[1]
    assert eval_panel.get_title() == "Evaluation: eval_accuracy"
    adamw_line, final_point = eval_panel.get_lines()
    assert list(adamw_line.get_xdata()) == [3, 6]  # evaluated every 3 steps
    assert list(final_point.get_xdata()) == [STEPS] and list(final_point.get_ydata()) == [final]
    texts = [text.get_text() for text in eval_panel.texts]
    assert "★ evaluated only at the end" in texts and not any("not in the logs" in t for t in texts)
    # The table has its final metrics too.
    assert main([str(runs / "final_eval_only"), "--output", str(tmp_path / "r")]) == 0
    assert read_table(tmp_path / "r.md")["final_eval_only"]["eval_accuracy"] == f"{final:.4g}"


def test_negative_eigenvalue_is_marked_as_the_largest_magnitude_one(runs, tmp_path):
    negative = tmp_path / "negative"
    shutil.copytree(runs / "adamw", negative)
    with open(negative / "all_results.json") as f:
        results = json.load(f)
    results["eval_hessian_top_eigenvalue"] = -856.9237
    (negative / "all_results.json").write_text(json.dumps(results))
    assert main([str(runs / "msam"), str(negative), "--output", str(tmp_path / "report")]) == 0
    text = (tmp_path / "report.md").read_text()
    table = read_table(tmp_path / "report.md")
    assert table["negative"]["λ_max(H)"] == "-856.9 †"
    assert "†" not in table["msam"]["λ_max(H)"] and float(table["msam"]["λ_max(H)"]) > 0
    assert NEGATIVE_EIGENVALUE_NOTE in text and "largest magnitude" in NEGATIVE_EIGENVALUE_NOTE
    # Without a negative one, no note.
    assert main([str(runs / "msam"), "--output", str(tmp_path / "positive")]) == 0
    assert NEGATIVE_EIGENVALUE_NOTE not in (tmp_path / "positive.md").read_text()


def rendered_tables(markdown: str) -> list[list[list[str]]]:
    """The tables of `markdown` as a CommonMark + GFM-tables renderer (markdown-it-py, which transformers
    installs) shows them: each row's cells as text, a `<br>` read as a line break."""

    class Cells(HTMLParser):
        def __init__(self):
            super().__init__()
            self.tables, self.cell = [], None

        def handle_starttag(self, tag, attrs):
            if tag == "table":
                self.tables.append([])
            elif tag == "tr":
                self.tables[-1].append([])
            elif tag in ("td", "th"):
                self.cell = ""
            elif tag == "br" and self.cell is not None:
                self.cell += "\n"

        def handle_endtag(self, tag):
            if tag in ("td", "th"):
                self.tables[-1][-1].append(self.cell)
                self.cell = None

        def handle_data(self, data):
            if self.cell is not None:
                self.cell += data

    parser = Cells()
    parser.feed(MarkdownIt("commonmark").enable("table").render(markdown))
    return parser.tables


def test_names_and_values_with_pipes_and_line_breaks_stay_in_their_cells(runs, tmp_path):
    """A `|` in a run's name or a value would end its cell, a line break its row: the rendered table must show
    every run in one row, with the name and the values as they are."""
    names = ["seed|1\nrho 0.05", "`m|2` ", "plain"]
    for name in names:
        shutil.copytree(runs / "msam", tmp_path / name)
    with open(runs / "msam" / "all_results.json") as f:
        results = json.load(f)
    odd = tmp_path / names[0]
    (odd / "all_results.json").write_text(json.dumps({**results, "eval_note": "a|b\nc", "eval_x|y": 0.5}))
    bad = tmp_path / "broken|run\nhere"
    bad.mkdir()
    assert main([str(tmp_path / n) for n in names] + [str(bad), "--output", str(tmp_path / "out" / "report")]) == 0
    markdown = (tmp_path / "out" / "report.md").read_text()

    [table] = rendered_tables(markdown)
    header, rows = table[0], table[1:]
    assert header[:5] == ["run", "ρ", "micro-batch", "ASAM", "steps"] and "eval_x|y" in header
    assert [len(row) for row in rows] == [len(header)] * len(names)
    assert [row[0] for row in rows] == names
    cells = dict(zip(header, rows[0]))
    assert cells["eval_note"] == "a|b\nc" and cells["eval_x|y"] == "0.5"
    assert cells["eval_loss"] == f"{results['eval_loss']:.4g}" and cells["ρ"] == "0.05"
    assert dict(zip(header, rows[2]))["eval_note"] == "—"  # the other runs have no such value
    # The skipped run: one list item, its directory whole.
    skipped = MarkdownIt("commonmark").render(markdown.split("## Skipped")[1])
    assert skipped.count("<li>") == 1 and "no trainer_state.json" in skipped
    assert "\n".join(re.findall("<code>(.*?)</code>", skipped)) == str(bad)
