#!/usr/bin/env python
"""Text classification (GLUE, or your own csv/json files) trained with mSAM.

    python run_glue.py --model_name_or_path MODEL --task_name mrpc --do_train --do_eval \
        --msam_rho 0.05 --msam_micro_batch_size 8 --output_dir out

Every `TrainingArguments` flag works, plus the `--msam_*` ones; `--msam_rho 0` trains with the plain
optimizer. Labels may be integers, class names (predictions are then written as names) or floats
(a regression). See README.md next to this file.
"""

import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from datasets import DatasetDict, load_dataset
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    default_data_collator,
    set_seed,
)

from hf_msam import MSAMTrainer
from hf_msam.launcher import end_process_group
# What this script shares with the other examples is in examples/examples_common.py, one folder up: that folder goes
# on the module path, found from this file's own location, so the script runs from any working directory.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from examples_common import (  # noqa: E402
    GLUE_TASKS,
    ClassNames,
    DataArguments,
    ModelArguments,
    add_lora,
    as_float_targets,
    compute_metrics_for,
    evaluate,
    finish,
    first,
    is_regression,
    metric_function,
    parse_arguments,
    train,
    under_launcher,
)

logger = logging.getLogger(__name__)

# The text column(s) of each GLUE task: one sentence, or a pair.
TASK_TEXT = {
    "cola": ("sentence",),
    "sst2": ("sentence",),
    "mrpc": ("sentence1", "sentence2"),
    "stsb": ("sentence1", "sentence2"),
    "rte": ("sentence1", "sentence2"),
    "wnli": ("sentence1", "sentence2"),
    "qqp": ("question1", "question2"),
    "qnli": ("question", "sentence"),
    "mnli": ("premise", "hypothesis"),
}
assert set(TASK_TEXT) == set(GLUE_TASKS)


@dataclass
class TextModelArguments(ModelArguments):
    tokenizer_name: str | None = field(
        default=None, metadata={"help": "Load the tokenizer from here instead of --model_name_or_path."}
    )


@dataclass
class TextDataArguments(DataArguments):
    task_name: str | None = field(
        default=None,
        metadata={
            "help": f"A GLUE task: {', '.join(GLUE_TASKS)}. Alone, it loads the task from the Hub (nyu-mll/glue); "
            "with --train_file/--validation_file, it names the text columns and the metric of those local files."
        },
    )
    train_file: str | None = field(
        default=None,
        metadata={
            "help": "Training data, a csv or json(-lines) file: a `sentence` column (or `sentence1` and "
            "`sentence2`; other names: --text_column_names) and a `label` column holding integers, class names, or "
            "floats (a regression)."
        },
    )
    text_column_names: str | None = field(
        default=None,
        metadata={
            "help": "The text column(s) of the data, comma-separated: one (e.g. `text`) or two, encoded as a pair "
            "(e.g. `question,answer`). Default: the GLUE task's columns with --task_name; otherwise `sentence1,"
            "sentence2` when the training data has both, else `sentence`."
        },
    )
    validation_file: str | None = field(
        default=None, metadata={"help": "Validation data, same format as --train_file."}
    )
    test_file: str | None = field(
        default=None,
        metadata={"help": "Data to predict with --do_predict, as --train_file (the label column is optional)."},
    )
    max_seq_length: int = field(
        default=128,
        metadata={"help": "Tokens per example after tokenization: longer texts are truncated, shorter ones padded."},
    )
    truncation_side: str = field(
        default="right",
        metadata={
            "help": "Which end of a text longer than --max_seq_length is cut off: right (keep the beginning) or left "
            "(keep the end, e.g. reviews whose verdict comes last).",
            "choices": ["right", "left"],
        },
    )
    pad_to_max_length: bool = field(
        default=True,
        metadata={"help": "Pad every example to --max_seq_length. False: pad each batch to its longest one."},
    )
    overwrite_cache: bool = field(
        default=False, metadata={"help": "Tokenize again instead of reading the cached result."}
    )
    max_predict_samples: int | None = field(
        default=None, metadata={"help": "Predict at most this many examples (quick runs, debugging)."}
    )

    def __post_init__(self):
        if self.text_column_names is not None:
            parse_text_column_names(self.text_column_names)  # a malformed value fails here, before any loading
        if self.truncation_side not in ("right", "left"):
            raise ValueError(f"--truncation_side must be right or left, got {self.truncation_side!r}.")
        if self.task_name is not None:
            self.task_name = self.task_name.lower()
            if self.task_name not in TASK_TEXT:
                raise ValueError(
                    f"Unknown --task_name {self.task_name!r}: pick one of {', '.join(GLUE_TASKS)}, or give "
                    "--train_file and --validation_file for your own data."
                )
        files = [f for f in (self.train_file, self.validation_file, self.test_file) if f is not None]
        if not files:
            if self.task_name is None and self.dataset_name is None:
                raise ValueError("Need a GLUE --task_name, a --dataset_name, or --train_file and --validation_file.")
            return
        if self.train_file is None or self.validation_file is None:
            raise ValueError("Local data needs both --train_file and --validation_file (--test_file is optional).")
        kinds = {os.path.splitext(f)[1] for f in files}
        if len(kinds) != 1 or not kinds <= {".csv", ".json"}:
            raise ValueError(
                f"--train_file, --validation_file and --test_file must all be csv or all be json files, got "
                f"{', '.join(files)}."
            )


def parse_text_column_names(value: str) -> tuple[str, ...]:
    """`--text_column_names`: "text" -> ("text",); "question, answer" -> ("question", "answer")."""
    names = tuple(name.strip() for name in value.split(","))
    if not 1 <= len(names) <= 2 or not all(names):
        raise ValueError(
            f"--text_column_names takes one column name or two (a pair), comma-separated, e.g. `text` or "
            f"`question,answer`; got {value!r}."
        )
    return names


def load_splits(data_args: TextDataArguments, model_args: TextModelArguments, predict: bool) -> DatasetDict:
    """The raw splits: local files (each read on its own, so that a file with other columns gets a clear
    error later), GLUE from the Hub, or another Hub dataset."""
    if data_args.train_file is not None:
        files = {"train": data_args.train_file, "validation": data_args.validation_file}
        if data_args.test_file is not None:
            files["test"] = data_args.test_file
        elif predict:
            raise ValueError("--do_predict with local files needs a --test_file.")
        kind = os.path.splitext(data_args.train_file)[1].lstrip(".")
        return DatasetDict(
            {
                split: load_dataset(kind, data_files=path, split="train", cache_dir=model_args.cache_dir)
                for split, path in files.items()
            }
        )
    name, subset = (
        ("nyu-mll/glue", data_args.task_name)
        if data_args.task_name is not None
        else (data_args.dataset_name, data_args.dataset_config_name)
    )
    return load_dataset(name, subset, cache_dir=model_args.cache_dir, token=model_args.token)


def text_columns(data_args: TextDataArguments, train_columns: list[str]) -> tuple[str, ...]:
    if data_args.text_column_names is not None:
        return parse_text_column_names(data_args.text_column_names)
    if data_args.task_name is not None:
        return TASK_TEXT[data_args.task_name]
    if {"sentence1", "sentence2"} <= set(train_columns):
        return ("sentence1", "sentence2")
    return ("sentence",)


def require_columns(splits: DatasetDict, texts: tuple[str, ...], data_args: TextDataArguments, evaluating: bool):
    """Stop before anything is loaded or trained when a split lacks a column the run reads."""
    for split, needs_label in (("train", True), ("validation", evaluating), ("test", False)):
        if split not in splits:
            continue
        have = splits[split].column_names
        missing = [c for c in (*texts, *(["label"] if needs_label else [])) if c not in have]
        if missing:
            other_names = " (other names: --text_column_names)"
            if data_args.text_column_names is not None:
                wanted = f"the column(s) of --text_column_names: {', '.join(texts)}"
            elif data_args.task_name is not None:
                wanted = f"the columns of GLUE {data_args.task_name}: {', '.join(texts)}{other_names}"
            else:
                wanted = f"a `sentence` column, or `sentence1` and `sentence2` columns{other_names}"
            raise ValueError(
                f"The {split} data lacks the column(s) {', '.join(missing)} (it has: {', '.join(have)}). "
                f"Expected {wanted}" + (", and a `label` column." if needs_label else ".")
            )


def split_names(task_name: str | None, kind: str, splits: DatasetDict) -> list[tuple[str, str]]:
    """(split, suffix) of what is evaluated (`kind` "validation") or predicted ("test"): GLUE's MNLI has a
    matched and a mismatched one; the mismatched numbers get the suffix `_mm`."""
    if task_name == "mnli" and f"{kind}_matched" in splits:
        return [(f"{kind}_matched", ""), (f"{kind}_mismatched", "_mm")]
    return [(kind, "")]


def write_predictions(trainer: MSAMTrainer, dataset, path: str, regression: bool) -> None:
    """`index<TAB>prediction` lines: a score for a regression, the class name for a classifier."""
    if "label" in dataset.column_names:  # unlabeled test sets hold -1 there
        dataset = dataset.remove_columns("label")
    logits = trainer.predict(dataset).predictions
    logits = logits[0] if isinstance(logits, tuple) else logits
    if not trainer.is_world_process_zero():
        return
    names = trainer.model.config.id2label
    with open(path, "w", encoding="utf-8") as f:
        f.write("index\tprediction\n")
        if regression:
            f.writelines(f"{i}\t{score:3.3f}\n" for i, score in enumerate(np.squeeze(logits, axis=-1)))
        else:
            f.writelines(f"{i}\t{names[int(c)]}\n" for i, c in enumerate(np.argmax(logits, axis=-1)))
    logger.info(f"Predictions written to {path}")


def main():
    model_args, data_args, training_args = parse_arguments(TextModelArguments, TextDataArguments)
    set_seed(training_args.seed)

    splits = load_splits(data_args, model_args, training_args.do_predict)
    texts = text_columns(data_args, splits["train"].column_names)
    require_columns(splits, texts, data_args, training_args.do_eval)

    regression = data_args.task_name == "stsb" or is_regression(splits["train"], "label")
    config = AutoConfig.from_pretrained(
        model_args.config_name or model_args.model_name_or_path,
        finetuning_task=data_args.task_name,
        **model_args.hub_kwargs(),
    )
    if regression:
        config.num_labels = 1
        classes = None
    else:
        classes = ClassNames.of(splits["train"], "label").in_model_order(config)
        if training_args.do_eval:
            for split, _ in split_names(data_args.task_name, "validation", splits):
                if split in splits:
                    classes.check_known(splits[split], "label", split)
        classes.set_on(config)

    tokenizer = AutoTokenizer.from_pretrained(
        model_args.tokenizer_name or model_args.model_name_or_path, **model_args.hub_kwargs()
    )
    tokenizer.truncation_side = data_args.truncation_side
    model = AutoModelForSequenceClassification.from_pretrained(
        model_args.model_name_or_path,
        config=config,
        ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
        **model_args.hub_kwargs(),
    )
    if model_args.use_peft:
        model = add_lora(model, model_args, task_type="SEQ_CLS")

    if data_args.max_seq_length > tokenizer.model_max_length:
        logger.warning(
            f"--max_seq_length {data_args.max_seq_length} is more than the model takes: using "
            f"{tokenizer.model_max_length}."
        )
    max_length = min(data_args.max_seq_length, tokenizer.model_max_length)
    padding = "max_length" if data_args.pad_to_max_length else False

    def tokenize(batch):
        return tokenizer(*(batch[c] for c in texts), padding=padding, max_length=max_length, truncation=True)

    with training_args.main_process_first(desc="labels and tokenization"):
        splits = as_float_targets(splits, "label") if regression else classes.encode(splits, "label")
        splits = splits.map(
            tokenize, batched=True, load_from_cache_file=not data_args.overwrite_cache, desc="Tokenizing"
        )

    def main_split(kind: str, wanted: bool, limit: int | None):
        """The (first) validation or test split, when the run uses it."""
        if not wanted:
            return None
        name = split_names(data_args.task_name, kind, splits)[0][0]
        if name not in splits:
            raise ValueError(f"--do_{'eval' if kind == 'validation' else 'predict'} needs a {kind} split.")
        return first(splits[name], limit)

    train_dataset = first(splits["train"], data_args.max_train_samples) if training_args.do_train else None
    eval_dataset = main_split("validation", training_args.do_eval, data_args.max_eval_samples)
    main_split("test", training_args.do_predict, None)  # fail now, not after training

    if data_args.pad_to_max_length:
        collator = default_data_collator
    else:  # pad each batch; multiples of 8 suit fp16 tensor cores
        collator = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8 if training_args.fp16 else None)
    metric = metric_function(data_args.task_name, regression, model_args.cache_dir)
    trainer = under_launcher(MSAMTrainer, "Trainer")(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        compute_metrics=compute_metrics_for(metric, regression),
        processing_class=tokenizer,
        data_collator=collator,
    )

    if training_args.do_train:
        train(trainer, training_args)
    if training_args.do_eval:
        results = {}
        for split, suffix in split_names(data_args.task_name, "validation", splits):
            if split in splits:
                results |= evaluate(trainer, first(splits[split], data_args.max_eval_samples), suffix)
        trainer.save_metrics("eval", results)
    if training_args.do_predict:
        for split, suffix in split_names(data_args.task_name, "test", splits):
            if split in splits:
                name = (data_args.task_name or "test") + ("-mm" if suffix else "")
                path = os.path.join(training_args.output_dir, f"predict_results_{name}.txt")
                write_predictions(trainer, first(splits[split], data_args.max_predict_samples), path, regression)

    glue_from_hub = data_args.task_name is not None and data_args.train_file is None
    finish(
        trainer,
        training_args,
        finetuned_from=model_args.model_name_or_path,
        tasks="text-classification",
        language="en" if glue_from_hub else None,
        dataset_tags="nyu-mll/glue" if glue_from_hub else None,
        dataset_args=data_args.task_name if glue_from_hub else None,
        dataset=f"GLUE {data_args.task_name.upper()}" if glue_from_hub else None,
    )


if __name__ == "__main__":
    main()
    end_process_group()  # under torchrun/accelerate on CPU: gloo may abort at exit with its group alive
