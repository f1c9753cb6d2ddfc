"""`hf-msam demo`: its noisy data against scikit-learn's own digits, and a real `--quick` run end to end."""

import json
import re

import pytest
import torch
from sklearn.datasets import load_digits
from transformers import ViTForImageClassification

import internals
from hf_msam import demo
from hf_msam.cli import main


def test_noisy_digits_flip_exactly_the_asked_fraction_of_training_labels_only():
    digits = load_digits()
    data = demo.noisy_digits(noise=0.4, seed=3, test_size=500)
    train, test = data["train"], data["test"]
    assert len(train) == 1297 and len(test) == 500

    # Match every example back to scikit-learn's digits by its pixels, to get its true label independently.
    true_label = {tuple(image.flatten().tolist()): int(label) for image, label in zip(digits.images, digits.target)}

    def truth(pixels):
        return true_label[tuple(((pixels.flatten() * 0.5 + 0.5) * 16).round().tolist())]

    assert all(truth(test.pixels[i]) == int(test.labels[i]) for i in range(len(test)))  # test labels are clean
    wrong = [truth(train.pixels[i]) != int(train.labels[i]) for i in range(len(train))]
    assert sum(wrong) == round(0.4 * 1297) == len(data["flipped"])
    assert wrong == data["flipped_mask"].tolist()
    # Symmetric noise: the wrong labels spread over all ten classes.
    assert len(set(data["flipped"].labels.tolist())) == 10


def test_printed_table_explains_a_negative_eigenvalue_under_it():
    """The table the demo prints (and puts in report.md) marks a negative λ_max with † and says what that means."""

    def metrics(eigenvalue):
        return {"eval_test_accuracy": 0.5, "eval_train_accuracy": 0.6, "eval_flipped_accuracy": 0.1,
                "eval_hessian_top_eigenvalue": eigenvalue, "eval_sharpness": 0.02, "train_wall_time": 3.0}  # fmt: skip

    table = internals.demo_table({"adamw": metrics(12.5), "sam": metrics(-374.6), "msam": metrics(3.0)})
    rows = [line for line in table if line.startswith("| ") and "%" in line]
    assert [row.split("|")[5].strip() for row in rows] == ["12.5", "-374.6 †", "3"]
    note = table[table.index("") + 1 :]
    assert len(note) == 1 and note[0].startswith("† Negative λ_max(H)") and "not at a minimum" in note[0]
    assert "" not in internals.demo_table({"adamw": metrics(12.5), "sam": metrics(0.0)})  # nothing marked, no note


def test_missing_optional_package_names_the_extra(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(demo, "_missing", lambda module: module == "sklearn")
    assert main(["demo", "--quick", "--output", str(tmp_path)]) == 2
    assert "pip install 'hf-msam[examples,flatness]'" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_quick_demo_writes_the_report(tmp_path, capsys):
    output = tmp_path / "demo"
    assert main(["demo", "--quick", "--output", str(output)]) == 0
    out = capsys.readouterr().out
    assert f"Report: {(output / 'report.md').resolve()}" in out
    assert (output / "report.png").stat().st_size > 10_000
    # A smoke run, said before it trains and after its table, and in the report: no verdict on SAM.
    smoke = [line for line in out.splitlines() if line.startswith("SMOKE RUN (--quick, 6 epochs of 60)")]
    assert len(smoke) == 2 and "say nothing about SAM or mSAM" in smoke[0]
    assert out.index(smoke[0]) < out.index("| method") < out.rindex(smoke[1])
    assert "**SMOKE RUN (--quick" in (output / "report.md").read_text()
    # The table's sharpness and the plot's are named as the different measurements they are.
    assert "sharpness at the end (ρ = 0.05)" in out

    # The printed table: one row a method, percentages and a time; a † explained under it.
    rows = [line for line in out.splitlines() if line.startswith("| ") and "%" in line]
    assert any("λ_max(H)" in line for line in out.splitlines() if line.startswith("| method"))
    assert ("† Negative λ_max(H)" in out) == any("†" in row for row in rows)
    assert [row.split("|")[1].strip() for row in rows] == [description for description, _ in demo.METHODS.values()]
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert all(0 <= float(cell.rstrip("%")) <= 100 for cell in cells[1:4])
        assert re.fullmatch(r"\d+ s", cells[-1])

    # report.md: the demo's table, then hf-msam compare's, with each run's settings from its training_args.bin.
    report = (output / "report.md").read_text()
    assert all(row in report for row in rows)
    compared = {line.split("|")[1].strip(): line for line in report.splitlines() if line.startswith("| `")}
    assert list(compared) == ["`adamw`", "`sam`", "`msam`"]
    header = next(line for line in report.splitlines() if line.startswith("| run |"))
    assert "eval_test_accuracy" in header and "eval_flipped_accuracy" in header
    assert "runtime" not in header and "per_second" not in header  # speed, not metrics, of the named eval sets
    micro_batch = demo.QUICK.batch_size // demo.QUICK.micro_batches
    assert "| 0 (off) | whole batch |" in compared["`adamw`"]
    assert f"| {demo.QUICK.rho:g} | whole batch |" in compared["`sam`"]
    assert f"| {demo.QUICK.rho:g} | {micro_batch} |" in compared["`msam`"]

    # The reported memorization and test accuracy are those of the saved model, recomputed here in plain PyTorch.
    data = demo.noisy_digits(demo.QUICK.noise, demo.QUICK.seed, demo.QUICK.test_size)
    for name in demo.METHODS:
        with open(output / name / "all_results.json") as f:
            results = json.load(f)
        model = ViTForImageClassification.from_pretrained(output / name).eval()
        with torch.no_grad():
            for split in ("test", "flipped"):
                predicted = model(pixel_values=data[split].pixels).logits.argmax(-1)
                accuracy = (predicted == data[split].labels).float().mean().item()
                # Batched differently than in the Trainer: allow one near-tie to go the other way.
                assert results[f"eval_{split}_accuracy"] == pytest.approx(accuracy, abs=1.01 / len(predicted))
        assert results["train_wall_time"] > 0
