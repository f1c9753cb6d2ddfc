"""The parts the example scripts (`examples/glue`, `examples/vision`) have in common.

It sits beside the examples, not in the `hf_msam` package: it needs `datasets` and `evaluate`, which the library
does not. Each script puts this folder (`examples/`) on `sys.path` from its own location before importing it, so
`python examples/glue/run_glue.py ...` runs from the repository root, from the script's folder or from anywhere
else (also under `hf-msam run` and `accelerate launch`). A script copied elsewhere needs this file one folder above it.

Each script keeps what is particular to its data (text columns and tokenization, images and their
transforms); this module holds the rest, once:

- `ModelArguments` and `DataArguments`: the command-line fields every example takes (model, Hub access,
  LoRA; dataset name, sample limits). A script subclasses them to add its own fields.
- `parse_arguments`: the command line (or a single `.json` file) into the script's dataclasses and
  `MSAMTrainingArguments`, with logging set up.
- `ClassNames`: the classes of a label column, whatever it holds (a `datasets.ClassLabel`, integers or
  class names), encoded as integer ids in every split, with the names in `config.id2label`.
- `metric_function` / `compute_metrics_for`: the GLUE metric (or accuracy, or MSE) through `evaluate`,
  computed locally with scikit-learn and scipy when `evaluate` cannot fetch it.
- `add_lora`: the `--use_peft` adapter.
- `train`, `evaluate`, `finish`: resume, train, save the model and the metrics files, then the model
  card (or `--push_to_hub`).

It needs the `examples` extra (`pip install 'hf-msam[examples]'`): `datasets`, `evaluate`, scikit-learn.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import datasets
import numpy as np
import transformers
from datasets import ClassLabel, Dataset, DatasetDict, Value
from transformers import HfArgumentParser
from transformers.trainer_utils import get_last_checkpoint

from hf_msam import MSAMTrainingArguments

logger = logging.getLogger(__name__)

GLUE_TASKS = ("cola", "mnli", "mrpc", "qnli", "qqp", "rte", "sst2", "stsb", "wnli")


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


@dataclass
class ModelArguments:
    """The model to fine-tune, where it comes from, and the optional LoRA adapter."""

    model_name_or_path: str = field(
        metadata={"help": "A model id on the Hugging Face Hub, or a local directory saved with save_pretrained."}
    )
    config_name: str | None = field(
        default=None, metadata={"help": "Load the config from here instead of --model_name_or_path."}
    )
    cache_dir: str | None = field(
        default=None, metadata={"help": "Directory for what is downloaded from the Hub (models, datasets)."}
    )
    model_revision: str = field(
        default="main", metadata={"help": "Branch, tag or commit of the model on the Hub."}
    )
    token: str | None = field(
        default=None,
        metadata={"help": "Hub access token for private models or datasets; default: the one of `hf auth login`."},
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={
            "help": "Allow models and datasets that ship their own Python code to run it. Only for repositories "
            "whose code you have read."
        },
    )
    ignore_mismatched_sizes: bool = field(
        default=False,
        metadata={
            "help": "Load a checkpoint whose classification head has another number of labels: the head is "
            "then newly initialized."
        },
    )
    use_peft: bool = field(
        default=False,
        metadata={
            "help": "Train a LoRA adapter through `peft` instead of the whole model. mSAM then perturbs only the "
            "trainable weights: the adapter and the classification head."
        },
    )
    lora_r: int = field(default=8, metadata={"help": "LoRA rank (with --use_peft)."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling alpha (with --use_peft)."})
    lora_dropout: float = field(default=0.1, metadata={"help": "Dropout on the LoRA layers (with --use_peft)."})
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "Names of the modules LoRA adapts, e.g. `query value` (BERT) or `q_proj v_proj` (ViT), with "
            "--use_peft. Default: the ones `peft` knows for the architecture."
        },
    )

    def hub_kwargs(self) -> dict[str, Any]:
        """The keyword arguments every `from_pretrained` call of the example takes."""
        return {
            "cache_dir": self.cache_dir,
            "revision": self.model_revision,
            "token": self.token,
            "trust_remote_code": self.trust_remote_code,
        }


@dataclass
class DataArguments:
    """A Hub dataset, and how many examples of each split to use."""

    dataset_name: str | None = field(default=None, metadata={"help": "A dataset on the Hugging Face Hub."})
    dataset_config_name: str | None = field(
        default=None, metadata={"help": "The configuration (subset) of --dataset_name."}
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Train on at most this many examples (quick runs, debugging)."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Evaluate on at most this many examples (quick runs, debugging)."}
    )


def under_launcher(ours: type, name: str) -> type:
    """`ours`, or, while `hf-msam run` runs the script, the launcher's subclass of it that it put in
    `transformers.<name>`: that one applies the `--msam_*` flags the launcher took off the command line (and
    reports the trainer), so the examples honour them under the launcher too."""
    swapped = getattr(transformers, name)
    return swapped if isinstance(swapped, type) and issubclass(swapped, ours) else ours


def parse_arguments(*dataclass_types: type) -> tuple:
    """The command line (or one `.json` file holding every argument) as instances of `dataclass_types` and
    `MSAMTrainingArguments`, in that order; logging is set up for this process."""
    parser = HfArgumentParser((*dataclass_types, under_launcher(MSAMTrainingArguments, "TrainingArguments")))
    if len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
        parsed = parser.parse_json_file(json_file=os.path.abspath(sys.argv[1]))
    else:
        parsed = parser.parse_args_into_dataclasses()
    training_args = parsed[-1]
    _set_up_logging(training_args)
    return tuple(parsed)


def _set_up_logging(training_args: MSAMTrainingArguments) -> None:
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%Y-%m-%d %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    if training_args.should_log:  # the main process says what it does unless told otherwise
        transformers.utils.logging.set_verbosity_info()
    level = training_args.get_process_log_level()
    logging.getLogger("hf_msam").setLevel(level)
    logger.setLevel(level)
    logging.getLogger("__main__").setLevel(level)
    datasets.utils.logging.set_verbosity(level)
    transformers.utils.logging.set_verbosity(level)
    transformers.utils.logging.enable_default_handler()
    transformers.utils.logging.enable_explicit_format()
    logger.warning(
        f"Process {training_args.process_index} on {training_args.device} (GPUs: {training_args.n_gpu}, "
        f"distributed: {training_args.parallel_mode.value == 'distributed'}, fp16: {training_args.fp16}, "
        f"bf16: {training_args.bf16})"
    )
    logger.info(f"Training arguments: {training_args}")


def first(dataset: Dataset, n: int | None, shuffle_seed: int | None = None) -> Dataset:
    """At most `n` examples of `dataset` (all when `n` is None): its first ones, or, given a seed, a random subset."""
    if n is None or n >= len(dataset):
        return dataset
    if shuffle_seed is not None:
        dataset = dataset.shuffle(seed=shuffle_seed)
    return dataset.select(range(n))


# ---------------------------------------------------------------------------------------------
# Labels
# ---------------------------------------------------------------------------------------------

NO_LABEL = -1  # what GLUE's unlabeled test splits hold; kept as is


def is_regression(dataset: Dataset, column: str) -> bool:
    """True when the label column of `dataset` holds floats: a regression target, not classes."""
    feature = dataset.features[column]
    return isinstance(feature, Value) and feature.dtype in ("float16", "float32", "float64")


def as_float_targets(splits: DatasetDict, column: str) -> DatasetDict:
    """The regression targets of every split as float32 (integers written in the file included)."""
    return DatasetDict(
        {
            name: split.cast_column(column, Value("float32")) if column in split.column_names else split
            for name, split in splits.items()
        }
    )


def _names_of(feature: Any, values: list) -> list[str | None]:
    """Each label value as the class name it stands for (None where there is no label)."""
    if isinstance(feature, ClassLabel):
        return [None if v == NO_LABEL else feature.int2str(v) for v in values]
    return [None if v is None or v == NO_LABEL else str(v) for v in values]


@dataclass
class ClassNames:
    """The classes of a label column: `names[i]` is the class with id i.

    The column may hold a `datasets.ClassLabel` (GLUE, image folders), integers, or class names (a csv or
    json file); every split is encoded to integer ids (a `ClassLabel` column of these names), so the
    collator gets integer labels, and `config.id2label` gets the names.
    """

    names: list[str]

    @classmethod
    def of(cls, split: Dataset, column: str) -> ClassNames:
        """The classes the training split `split` shows: a `ClassLabel`'s names in its order; otherwise the
        distinct values, sorted (numerically for numbers)."""
        feature = split.features[column]
        if isinstance(feature, ClassLabel):
            return cls(list(feature.names))
        values = sorted(
            (v for v in split.unique(column) if v is not None and v != NO_LABEL),
            key=lambda v: (isinstance(v, str), v),  # numbers in numeric order (2 before 10), then names
        )
        return cls(list(dict.fromkeys(str(v) for v in values)))

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.names))

    @property
    def label2id(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.names)}

    def in_model_order(self, config: transformers.PretrainedConfig) -> ClassNames:
        """These classes in the order of a checkpoint already trained on them (its `label2id` has the same names,
        compared case-insensitively), so that its head keeps its meaning; otherwise unchanged."""
        model_ids = {str(name).lower(): int(i) for name, i in (config.label2id or {}).items()}
        same = sorted(model_ids) == sorted(n.lower() for n in self.names)
        if not same or sorted(model_ids.values()) != list(range(len(self.names))):
            if set(model_ids) != {f"label_{i}" for i in range(len(model_ids))}:  # not the placeholder names
                logger.warning(
                    f"The checkpoint's labels {sorted(model_ids)} are not the classes of the data {self.names}: "
                    "the classes keep the data's order."
                )
            return self
        return ClassNames(sorted(self.names, key=lambda n: model_ids[n.lower()]))

    def set_on(self, config: transformers.PretrainedConfig) -> None:
        """Give `config` these classes: their number, and the names in `id2label`/`label2id`."""
        config.id2label = self.id2label
        config.label2id = self.label2id

    def check_known(self, split: Dataset, column: str, split_name: str) -> None:
        """Raise if `split` has a label the training data never shows: the model would have no output for it."""
        values = split.unique(column)
        names = _names_of(split.features[column], values)
        unknown = [v for v, n in zip(values, names) if n is not None and n not in self.names]
        if unknown:
            raise ValueError(
                f"The {split_name} data has label(s) {sorted(unknown, key=str)} that the training data never shows "
                f"(training labels: {self.names}): the model would have no output for them. Fix the labels, or add "
                "examples of them to the training data."
            )

    def encode(self, splits: DatasetDict, column: str) -> DatasetDict:
        """Every split with its label column as class ids (a `ClassLabel` of these names); a label the classes do
        not know, or none, becomes -1 (call `check_known` first where that must not happen)."""
        ids, target = self.label2id, ClassLabel(names=self.names)
        encoded = {}
        for name, split in splits.items():
            if column not in split.column_names or split.features[column] == target:
                encoded[name] = split
                continue
            feature, features = split.features[column], split.features.copy()
            features[column] = target  # the column's type changes too: ids, not the strings it held

            def to_ids(batch, feature=feature):
                return {column: [ids.get(n, NO_LABEL) for n in _names_of(feature, batch[column])]}

            encoded[name] = split.map(to_ids, batched=True, features=features, desc=f"Label ids ({name})")
        return DatasetDict(encoded)


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------


def _local_metric(task_name: str | None, regression: bool) -> Callable[..., dict[str, float]]:
    """The numbers `evaluate` gives for `task_name` ("glue" metric), or "mse"/"accuracy" without a task."""
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import f1_score, matthews_corrcoef

    def compute(predictions: np.ndarray, references: np.ndarray) -> dict[str, float]:
        if task_name == "cola":
            return {"matthews_correlation": float(matthews_corrcoef(references, predictions))}
        if task_name == "stsb":
            return {
                "pearson": float(pearsonr(predictions, references)[0]),
                "spearmanr": float(spearmanr(predictions, references)[0]),
            }
        if task_name is None and regression:
            return {"mse": float(np.mean((predictions - references) ** 2))}
        scores = {"accuracy": float(np.mean(predictions == references))}
        if task_name in ("mrpc", "qqp"):
            scores["f1"] = float(f1_score(y_true=references, y_pred=predictions))
        return scores

    return compute


def metric_function(task_name: str | None, regression: bool, cache_dir: str | None) -> Callable[..., dict]:
    """`evaluate`'s metric: GLUE's for `task_name`, else "mse" (regression) or "accuracy". When `evaluate` cannot
    load it (offline, no cached script), the same numbers computed locally, with a warning."""
    import evaluate

    if task_name is not None:
        path, config_name = "glue", task_name
    else:
        path, config_name = ("mse" if regression else "accuracy"), None
    try:
        return evaluate.load(path, config_name, cache_dir=cache_dir).compute
    # What fails offline depends on `evaluate`'s HTTP stack (FileNotFoundError with HF_HUB_OFFLINE=1, connection
    # errors otherwise), so any failure falls back; the fallback computes the same definitions.
    except Exception as err:
        which = path if config_name is None else f"{path} ({config_name})"
        logger.warning(
            f"`evaluate` could not load the {which} metric ({type(err).__name__}: {err}). "
            "Computing the same numbers locally with scikit-learn and scipy."
        )
        return _local_metric(task_name, regression)


def compute_metrics_for(metric: Callable[..., dict], regression: bool) -> Callable[[Any], dict[str, float]]:
    """The Trainer's `compute_metrics`: logits to class ids (or to one score), then `metric`; with several
    numbers, also their mean as `combined_score`."""

    def compute_metrics(prediction) -> dict[str, float]:
        logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
        predicted = np.squeeze(logits) if regression else np.argmax(logits, axis=1)
        scores = dict(metric(predictions=predicted, references=prediction.label_ids))
        if len(scores) > 1:
            scores["combined_score"] = float(np.mean(list(scores.values())))
        return scores

    return compute_metrics


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------


def add_lora(model, model_args: ModelArguments, **lora_config: Any):
    """`model` wrapped with the LoRA adapter of `--use_peft` (`lora_config`: more `peft.LoraConfig` fields)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=model_args.lora_target_modules,
        **lora_config,
    )
    model = get_peft_model(model, config)
    model.print_trainable_parameters()
    return model


# ---------------------------------------------------------------------------------------------
# Train, evaluate, write the card
# ---------------------------------------------------------------------------------------------


def _checkpoint_to_resume(training_args: MSAMTrainingArguments) -> str | None:
    if training_args.resume_from_checkpoint is not None:
        return training_args.resume_from_checkpoint
    if not os.path.isdir(training_args.output_dir):
        return None
    found = get_last_checkpoint(training_args.output_dir)
    if found is not None:
        logger.info(f"Resuming from {found}, the last checkpoint in --output_dir (another --output_dir starts over).")
    return found


def train(trainer, training_args: MSAMTrainingArguments) -> None:
    """Train (resuming from the last checkpoint in `output_dir` if there is one), save the model (and its
    tokenizer or image processor), `train_results.json` and `trainer_state.json`."""
    result = trainer.train(resume_from_checkpoint=_checkpoint_to_resume(training_args))
    metrics = {**result.metrics, "train_samples": len(trainer.train_dataset)}
    trainer.save_model()
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    trainer.save_state()


def evaluate(trainer, dataset: Dataset, suffix: str = "") -> dict[str, float]:
    """Evaluate on `dataset`, log the numbers, and return them (with `eval_samples`), each key ending in `suffix`."""
    metrics = {**trainer.evaluate(eval_dataset=dataset), "eval_samples": len(dataset)}
    metrics = {f"{key}{suffix}": value for key, value in metrics.items()}
    trainer.log_metrics("eval", metrics)
    return metrics


def finish(trainer, training_args: MSAMTrainingArguments, **card: Any) -> None:
    """Write the model card (tagged and with the mSAM settings by `MSAMTrainer`), or push model and card to the
    Hub with `--push_to_hub`. `card`: the card's fields (`finetuned_from`, `tasks`, `dataset`, ...)."""
    card = {key: value for key, value in card.items() if value is not None}
    if training_args.push_to_hub:
        trainer.push_to_hub(**card)
    else:
        trainer.create_model_card(**card)

