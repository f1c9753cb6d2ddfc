"""examples/vision/run_image_classification.py end to end, offline, on a tiny ViT and folders of 32x32 PNGs."""

from __future__ import annotations

import importlib.util
import json
import os
import runpy
import socket
import subprocess
import sys

import pytest
import torch
from conftest import REPO_ROOT
from huggingface_hub import ModelCard
from sklearn.metrics import accuracy_score

from hf_msam import MSAMTrainer

SCRIPT = REPO_ROOT / "examples" / "vision" / "run_image_classification.py"


@pytest.fixture(scope="module")
def run_image_classification():
    spec = importlib.util.spec_from_file_location("run_image_classification", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def run(run_image_classification, monkeypatch):
    """Run the script's main() in this process with `args`; return the MSAMTrainer it built."""

    def _run(*args) -> MSAMTrainer:
        trainers = []

        class RecordingTrainer(MSAMTrainer):
            def __init__(self, *a, **kw):
                super().__init__(*a, **kw)
                trainers.append(self)

        monkeypatch.setattr(run_image_classification, "MSAMTrainer", RecordingTrainer)
        monkeypatch.setattr(sys, "argv", [str(SCRIPT), *map(str, args)])
        run_image_classification.main()
        return trainers[0]

    return _run


def common_args(tiny_vit, image_folders, out) -> list:
    return [
        "--model_name_or_path", tiny_vit, "--train_dir", image_folders["train"],
        "--validation_dir", image_folders["validation"], "--ignore_mismatched_sizes", "--output_dir", out,
        "--do_train", "--do_eval", "--max_steps", 3, "--logging_steps", 1, "--learning_rate", 1e-3, "--seed", 0,
        "--per_device_eval_batch_size", 6, "--save_strategy", "no", "--use_cpu", "--report_to", "none",
        "--disable_tqdm", "true",
    ]  # fmt: skip


def test_image_folders_end_to_end(tiny_vit, image_folders, tmp_path, run, caplog):
    out = tmp_path / "out"
    trainer = run(
        *common_args(tiny_vit, image_folders, out),
        "--per_device_train_batch_size", 4, "--msam_micro_batch_size", 2, "--msam_rho", 0.1, "--msam_adaptive",
    )  # fmt: skip

    for name in ("all_results.json", "eval_results.json", "trainer_state.json", "README.md", "preprocessor_config.json"):
        assert (out / name).is_file(), name
    # The 3-label head was replaced by one for the 2 classes of the folders.
    assert trainer.model.config.id2label == {0: "cat", 1: "dog"}
    # Accuracy, computed locally (offline) with a warning, is the accuracy of the model's predictions.
    assert "Computing the same numbers locally" in caplog.text
    output = trainer.predict(trainer.eval_dataset)
    eval_results = json.loads((out / "eval_results.json").read_text())
    assert eval_results["eval_accuracy"] == pytest.approx(accuracy_score(output.label_ids, output.predictions.argmax(-1)))
    assert len(output.label_ids) == 6
    logs = [e for e in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in e]
    assert len(logs) == 3 and all("msam/sharpness" in e for e in logs)
    card = ModelCard.load(out / "README.md")
    assert {"msam", "sharpness-aware-minimization", "image-classification", "vision"} <= set(card.data.tags)
    assert "- rho: 0.1" in card.text and "- adaptive (ASAM): True, eta 0.01" in card.text
    assert "- perturbations per optimizer step: 2 (1 device(s) x 1 accumulation step(s) x 2 micro-batch(es)" in card.text


def test_rho_zero_baseline(tiny_vit, image_folders, tmp_path, run):
    out = tmp_path / "out"
    run(*common_args(tiny_vit, image_folders, out), "--per_device_train_batch_size", 4, "--msam_rho", 0)
    assert not any("msam/sharpness" in e for e in json.loads((out / "trainer_state.json").read_text())["log_history"])
    assert "Trained without mSAM (`msam_rho=0`)" in (out / "README.md").read_text()


def test_lora_trains_only_the_adapter_and_head(tiny_vit, image_folders, tmp_path, run):
    from transformers import AutoModelForImageClassification

    out = tmp_path / "out"
    trainer = run(
        *common_args(tiny_vit, image_folders, out), "--per_device_train_batch_size", 4, "--msam_micro_batch_size", 2,
        "--use_peft", "--lora_r", 4, "--lora_dropout", 0.0, "--lora_target_modules", "q_proj", "v_proj",
        "--learning_rate", 1e-2,
    )  # fmt: skip

    base = AutoModelForImageClassification.from_pretrained(tiny_vit).state_dict()
    trained = trainer.model.state_dict()
    assert all(v.abs().sum() > 0 for k, v in trained.items() if "lora_B" in k)  # zero at init: the adapter trained
    frozen = {
        k.replace("base_model.model.", "").replace(".base_layer", ""): v
        for k, v in trained.items()
        if "lora_" not in k and "classifier" not in k
    }
    assert frozen and all(torch.equal(v, base[k]) for k, v in frozen.items()), "a base weight moved"
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert any("classifier" in n for n in trainable)
    assert all("lora_" in n or "classifier" in n for n in trainable)
    assert (out / "adapter_config.json").is_file() and "## mSAM settings" in (out / "README.md").read_text()


@pytest.mark.parametrize(
    "flag, message",
    [
        ("--image_column_name", "--image_column_name img not found in dataset"),
        ("--label_column_name", "--label_column_name img not found in dataset"),
    ],
)
def test_missing_column_fails_before_training(flag, message, tiny_vit, image_folders, tmp_path, run):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=message):
        run(*common_args(tiny_vit, image_folders, out), flag, "img")
    assert not (out / "trainer_state.json").exists()


def test_without_torchvision_names_the_extra(monkeypatch):
    for name in ("torchvision", "torchvision.transforms", "torchvision.transforms.v2"):
        monkeypatch.setitem(sys.modules, name, None)  # `import torchvision` now fails as if it were not installed
    with pytest.raises(SystemExit, match=r"pip install 'hf-msam\[vision\]'"):
        runpy.run_path(str(SCRIPT), run_name="run_image_classification")


@pytest.mark.slow
@pytest.mark.multiprocess
def test_accelerate_launch_two_processes(tiny_vit, image_folders, tmp_path):
    out = tmp_path / "out"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port), str(SCRIPT),
        *map(str, common_args(tiny_vit, image_folders, out)), "--per_device_train_batch_size", "2",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    assert "mSAM: 2 distinct perturbations per optimizer step (2 device(s)" in proc.stdout + proc.stderr
    card = (out / "README.md").read_text()
    assert "- micro-batch size: 2 example(s) per perturbation, per device (the whole per-device batch" in card
    assert "- perturbations per optimizer step: 2 (2 device(s) x 1 accumulation step(s) x 1 micro-batch(es)" in card
    logs = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert all("msam/sharpness" in e for e in logs if "loss" in e)


def parse_data_args(module, *args):
    from transformers import HfArgumentParser

    (data_args,) = HfArgumentParser(module.ImageDataArguments).parse_args_into_dataclasses(
        ["--train_dir", "x", *map(str, args)]
    )
    return data_args


def test_augmentation_flags_change_the_transforms(run_image_classification, tiny_vit):
    from torchvision.transforms import v2
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(tiny_vit)
    module = run_image_classification

    def steps(*args):
        train, evaluation = module.build_transforms(processor, parse_data_args(module, *args))
        assert not any(isinstance(t, (v2.RandomResizedCrop, v2.RandomHorizontalFlip)) for t in evaluation.transforms)
        return train.transforms

    default = steps()
    assert isinstance(default[0], v2.RandomResizedCrop) and tuple(default[0].size) == (32, 32)
    assert default[0].scale == pytest.approx((0.08, 1.0)) and default[0].ratio == pytest.approx((3 / 4, 4 / 3))
    assert isinstance(default[1], v2.RandomHorizontalFlip) and default[1].p == 0.5

    tuned = steps("--crop_scale", 0.85, 1.0, "--crop_ratio", 0.9, 1.1, "--horizontal_flip", "false")
    assert tuned[0].scale == pytest.approx((0.85, 1.0)) and tuned[0].ratio == pytest.approx((0.9, 1.1))
    assert not any(isinstance(t, v2.RandomHorizontalFlip) for t in tuned)
    assert not any(isinstance(t, v2.RandomHorizontalFlip) for t in steps("--no_horizontal_flip"))
    # The same transform on one image: with scale 1 1 and ratio 1 1 (a square image) the crop is the whole image.
    from PIL import Image

    image = Image.new("RGB", (32, 32))
    image.putpixel((0, 0), (255, 0, 0))
    pixels = v2.Compose(steps("--crop_scale", 1, 1, "--crop_ratio", 1, 1, "--no_horizontal_flip"))(image)
    assert pixels[0, 0, 0] == pytest.approx((1.0 - 0.5) / 0.5)  # red channel of the corner, normalized (mean 0.5, std 0.5)


@pytest.mark.parametrize(
    "args, message",
    [
        (("--crop_scale", 0.5), "--crop_scale takes two fractions"),
        (("--crop_scale", 0.9, 0.5), "--crop_scale takes two fractions"),
        (("--crop_ratio", 0, 1), "--crop_ratio takes two aspect ratios"),
    ],
)
def test_bad_augmentation_flags_are_refused(args, message, run_image_classification):
    with pytest.raises(ValueError, match=message):
        parse_data_args(run_image_classification, *args)


def test_validation_classes_are_matched_by_name(tiny_vit, image_folders, tmp_path, run):
    """A validation folder with only some of the classes: its images get the training ids of their class names."""
    import shutil

    validation = tmp_path / "validation"
    shutil.copytree(image_folders["validation"] / "dog", validation / "dog")
    out = tmp_path / "out"
    args = common_args(tiny_vit, image_folders, out)
    args[args.index("--validation_dir") + 1] = validation
    trainer = run(*args, "--per_device_train_batch_size", 4, "--max_steps", 1)
    assert trainer.model.config.id2label == {0: "cat", 1: "dog"}
    output = trainer.predict(trainer.eval_dataset)
    assert list(output.label_ids) == [1, 1, 1]  # dog, not the folder's own index 0
    eval_results = json.loads((out / "eval_results.json").read_text())
    assert eval_results["eval_accuracy"] == pytest.approx(accuracy_score([1, 1, 1], output.predictions.argmax(-1)))


def test_label_column_of_class_names(tiny_vit, tmp_path, run):
    """A dataset whose label column holds class names (strings, not a ClassLabel) trains, with the names sorted
    into ids and kept in the config."""
    from datasets import Dataset, Features, Image, Value
    from PIL import Image as PILImage

    data = tmp_path / "named"
    data.mkdir()
    features = Features({"image": Image(), "label": Value("string")})
    for split, n in (("train", 8), ("validation", 4)):
        names = ["red", "blue"] * (n // 2)
        images = [PILImage.new("RGB", (32, 32), (200, 30, 30) if c == "red" else (30, 30, 200)) for c in names]
        Dataset.from_dict({"image": images, "label": names}, features=features).to_parquet(data / f"{split}.parquet")
    out = tmp_path / "out"
    trainer = run(
        "--model_name_or_path", tiny_vit, "--dataset_name", data, "--ignore_mismatched_sizes", "--output_dir", out,
        "--do_train", "--do_eval", "--max_steps", 1, "--per_device_train_batch_size", 4, "--seed", 0,
        "--save_strategy", "no", "--use_cpu", "--report_to", "none", "--disable_tqdm", "true",
    )  # fmt: skip
    assert trainer.model.config.id2label == {0: "blue", 1: "red"}
    assert json.loads((out / "config.json").read_text())["label2id"] == {"blue": 0, "red": 1}
    output = trainer.predict(trainer.eval_dataset)
    assert list(output.label_ids) == [1, 0, 1, 0]
    eval_results = json.loads((out / "eval_results.json").read_text())
    assert eval_results["eval_accuracy"] == pytest.approx(accuracy_score(output.label_ids, output.predictions.argmax(-1)))
