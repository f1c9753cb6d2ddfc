#!/usr/bin/env python
"""Image classification (image folders or a Hub dataset) trained with mSAM.

    python run_image_classification.py --model_name_or_path MODEL --dataset_name beans --do_train --do_eval \
        --msam_rho 0.05 --msam_micro_batch_size 8 --output_dir out

Any `AutoModelForImageClassification` checkpoint; its image processor gives the input size and the
normalization. Every `TrainingArguments` flag works, plus the `--msam_*` ones and the augmentation flags
(`--crop_scale`, `--crop_ratio`, `--horizontal_flip`). See README.md next to this file.
"""

import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from datasets import load_dataset
from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification, set_seed

from hf_msam import MSAMTrainer
from hf_msam.launcher import end_process_group
# What this script shares with the other examples is in examples/examples_common.py, one folder up: that folder goes
# on the module path, found from this file's own location, so the script runs from any working directory.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from examples_common import (  # noqa: E402
    ClassNames,
    DataArguments,
    ModelArguments,
    add_lora,
    compute_metrics_for,
    evaluate,
    finish,
    first,
    metric_function,
    parse_arguments,
    train,
    under_launcher,
)

try:
    from torchvision.transforms import v2
except ImportError as err:
    raise SystemExit(
        "run_image_classification.py needs torchvision for its data augmentation. Install it with: "
        "pip install 'hf-msam[vision]'"
    ) from err

logger = logging.getLogger(__name__)


@dataclass
class ImageModelArguments(ModelArguments):
    model_name_or_path: str = field(
        default="google/vit-base-patch16-224-in21k",
        metadata={"help": "A model id on the Hugging Face Hub, or a local directory saved with save_pretrained."},
    )
    image_processor_name: str | None = field(
        default=None, metadata={"help": "Load the image processor from here instead of --model_name_or_path."}
    )
    lora_modules_to_save: list[str] = field(
        default_factory=lambda: ["classifier"],
        metadata={"help": "Modules trained in full beside the LoRA adapter, e.g. the new head (with --use_peft)."},
    )


@dataclass
class ImageDataArguments(DataArguments):
    train_dir: str | None = field(
        default=None, metadata={"help": "Training images, one sub-folder per class (the `imagefolder` layout)."}
    )
    validation_dir: str | None = field(
        default=None, metadata={"help": "Validation images, one sub-folder per class."}
    )
    train_val_split: float | None = field(
        default=0.15,
        metadata={"help": "Without a validation split, hold out this fraction of the training images for it."},
    )
    image_column_name: str = field(default="image", metadata={"help": "The column holding the images."})
    label_column_name: str = field(
        default="label", metadata={"help": "The column holding the labels (class ids or class names)."}
    )
    crop_scale: list[float] = field(
        default_factory=lambda: [0.08, 1.0],
        metadata={
            "help": "Training augmentation: the random crop covers between these two fractions of the image's "
            "area before it is resized to the model's input (RandomResizedCrop's scale). `1 1` keeps the whole "
            "image."
        },
    )
    crop_ratio: list[float] = field(
        default_factory=lambda: [3 / 4, 4 / 3],
        metadata={"help": "Training augmentation: the range of the random crop's aspect ratio (width / height)."},
    )
    horizontal_flip: bool = field(
        default=True,
        metadata={"help": "Training augmentation: mirror half of the images (false for digits, text, ...)."},
    )

    def __post_init__(self):
        if self.dataset_name is None and self.train_dir is None and self.validation_dir is None:
            raise ValueError("Give a --dataset_name, or a --train_dir (and optionally a --validation_dir).")
        if len(self.crop_scale) != 2 or not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ValueError(
                f"--crop_scale takes two fractions of the image area, 0 < min <= max <= 1 (e.g. 0.08 1), got "
                f"{self.crop_scale}."
            )
        if len(self.crop_ratio) != 2 or not 0 < self.crop_ratio[0] <= self.crop_ratio[1]:
            raise ValueError(
                f"--crop_ratio takes two aspect ratios, 0 < min <= max (e.g. 0.75 1.333), got {self.crop_ratio}."
            )


def build_transforms(image_processor, data_args: ImageDataArguments) -> tuple[v2.Compose, v2.Compose]:
    """The training transform (augmentation, as the flags say) and the evaluation one (resize, center crop),
    both ending with the checkpoint's normalization."""
    size = image_processor.size
    side = size["shortest_edge"] if size.get("shortest_edge") is not None else (size["height"], size["width"])
    mean, std = getattr(image_processor, "image_mean", None), getattr(image_processor, "image_std", None)
    tail = [
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=mean, std=std) if mean is not None and std is not None else v2.Identity(),
    ]
    augment = [v2.RandomResizedCrop(side, scale=tuple(data_args.crop_scale), ratio=tuple(data_args.crop_ratio))]
    if data_args.horizontal_flip:
        augment.append(v2.RandomHorizontalFlip())
    return v2.Compose([*augment, *tail]), v2.Compose([v2.Resize(side), v2.CenterCrop(side), *tail])


def load_splits(data_args: ImageDataArguments, model_args: ImageModelArguments):
    if data_args.dataset_name is not None:
        name, subset = data_args.dataset_name, data_args.dataset_config_name
        return load_dataset(name, subset, cache_dir=model_args.cache_dir, token=model_args.token)
    folders = {"train": data_args.train_dir, "validation": data_args.validation_dir}
    files = {split: os.path.join(folder, "**") for split, folder in folders.items() if folder is not None}
    return load_dataset("imagefolder", data_files=files, cache_dir=model_args.cache_dir)


def main():
    model_args, data_args, training_args = parse_arguments(ImageModelArguments, ImageDataArguments)
    if training_args.remove_unused_columns:
        logger.info("Setting --remove_unused_columns False: the transforms read the image column.")
        training_args.remove_unused_columns = False
    set_seed(training_args.seed)

    splits = load_splits(data_args, model_args)
    if "train" not in splits:
        raise ValueError("The dataset has no train split: give a --train_dir (its classes define the labels).")
    image_column, label_column = data_args.image_column_name, data_args.label_column_name
    columns = splits["train"].column_names
    for flag, name in (("--image_column_name", image_column), ("--label_column_name", label_column)):
        if name not in columns:
            raise ValueError(
                f"{flag} {name} not found in dataset '{data_args.dataset_name or data_args.train_dir}': set it to "
                f"one of its columns: {', '.join(columns)}."
            )
    if "validation" not in splits and data_args.train_val_split:
        held_out = splits["train"].train_test_split(data_args.train_val_split, seed=training_args.seed)
        splits["train"], splits["validation"] = held_out["train"], held_out["test"]

    config = AutoConfig.from_pretrained(
        model_args.config_name or model_args.model_name_or_path,
        finetuning_task="image-classification",
        **model_args.hub_kwargs(),
    )
    classes = ClassNames.of(splits["train"], label_column).in_model_order(config)
    if training_args.do_eval and "validation" in splits:
        classes.check_known(splits["validation"], label_column, "validation")
    classes.set_on(config)
    with training_args.main_process_first(desc="label ids"):
        splits = classes.encode(splits, label_column)

    model = AutoModelForImageClassification.from_pretrained(
        model_args.model_name_or_path,
        config=config,
        ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
        **model_args.hub_kwargs(),
    )
    if model_args.use_peft:
        model = add_lora(model, model_args, modules_to_save=model_args.lora_modules_to_save)
    image_processor = AutoImageProcessor.from_pretrained(
        model_args.image_processor_name or model_args.model_name_or_path, **model_args.hub_kwargs()
    )
    train_transform, eval_transform = build_transforms(image_processor, data_args)

    def transformed(transform):
        def apply(batch):
            batch["pixel_values"] = [transform(image.convert("RGB")) for image in batch[image_column]]
            return batch

        return apply

    train_dataset = eval_dataset = None
    if training_args.do_train:
        train_dataset = first(splits["train"], data_args.max_train_samples, shuffle_seed=training_args.seed)
        train_dataset.set_transform(transformed(train_transform))
    if training_args.do_eval:
        if "validation" not in splits:
            raise ValueError("--do_eval needs a validation split: give a --validation_dir or a --train_val_split.")
        eval_dataset = first(splits["validation"], data_args.max_eval_samples, shuffle_seed=training_args.seed)
        eval_dataset.set_transform(transformed(eval_transform))

    def collate(examples):
        return {
            "pixel_values": torch.stack([e["pixel_values"] for e in examples]),
            "labels": torch.tensor([e[label_column] for e in examples]),
        }

    trainer = under_launcher(MSAMTrainer, "Trainer")(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        compute_metrics=compute_metrics_for(metric_function(None, False, model_args.cache_dir), regression=False),
        processing_class=image_processor,
        data_collator=collate,
    )
    if training_args.do_train:
        train(trainer, training_args)
    if training_args.do_eval:
        trainer.save_metrics("eval", evaluate(trainer, eval_dataset))
    finish(
        trainer,
        training_args,
        finetuned_from=model_args.model_name_or_path,
        tasks="image-classification",
        dataset=data_args.dataset_name,
        tags=["image-classification", "vision"],
    )


if __name__ == "__main__":
    main()
    end_process_group()  # under torchrun/accelerate on CPU: gloo may abort at exit with its group alive
