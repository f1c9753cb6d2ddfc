"""mSAM on TRL's trainers (SFT, DPO, reward): one step against a plain-PyTorch reference, rho=0 against TRL bitwise."""

from __future__ import annotations

import copy
import math

import pytest
import torch

pytest.importorskip("trl")

from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer  # noqa: E402
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer  # noqa: E402
from trl_helpers import (  # noqa: E402
    PREFERENCES,
    PROMPT_COMPLETION,
    completion_logps,
    msam_gradient,
    sft_reference_step,
    sgd_reference,
    token_nll_sum,
    write_tiny_llama,
)

from hf_msam import MSAMArguments, MSAMMixin  # noqa: E402
from hf_msam.trl import (  # noqa: E402
    MSAMDPOConfig,
    MSAMDPOTrainer,
    MSAMRewardConfig,
    MSAMRewardTrainer,
    MSAMSFTConfig,
    MSAMSFTTrainer,
)

COMMON = dict(
    max_steps=1, optim="sgd", learning_rate=0.5, lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0,
    bf16=False, report_to="none", use_cpu=True, save_strategy="no", logging_steps=1, disable_tqdm=True,
    train_sampling_strategy="sequential", dataloader_drop_last=False,
)  # fmt: skip


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def load(llama_dir, cls=AutoModelForCausalLM, **kwargs):
    return cls.from_pretrained(llama_dir, dtype=torch.float64, **kwargs)


def recording(cls):
    """`cls` with a `training_step` override that records its inputs and calls super(): also the pattern the mixin
    must keep working."""

    class Recording(cls):
        def training_step(self, model, inputs, num_items_in_batch=None):
            self.seen = getattr(self, "seen", [])
            self.seen.append({k: v.clone() if torch.is_tensor(v) else v for k, v in inputs.items()})
            return super().training_step(model, inputs, num_items_in_batch)

    return Recording


def trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


# TRL's fused LM head leaves errors of about 1e-8 in the float64 embedding update even of a plain SFTTrainer step
# (measured: rho=0 against the same reference), against updates of about 1e-1.
RTOL, ATOL = 1e-6, 1e-7


def assert_weights_close(model, expected, rtol=RTOL, atol=ATOL):
    got = trainable(model)
    assert got.keys() == expected.keys()
    for name in got:
        torch.testing.assert_close(got[name], expected[name], rtol=rtol, atol=atol, msg=name)


# ---------------------------------------------------------------------------------------------
# SFT
# ---------------------------------------------------------------------------------------------


def test_configs_carry_the_msam_flags_and_validate():
    from transformers import HfArgumentParser

    (config,) = HfArgumentParser(MSAMSFTConfig).parse_args_into_dataclasses(
        ["--output_dir", "x", "--msam_rho", "0.2", "--msam_micro_batch_size", "3", "--packing", "--use_cpu"]
    )
    assert isinstance(config, SFTConfig) and isinstance(config, MSAMArguments)
    assert (config.msam_rho, config.msam_micro_batch_size, config.packing) == (0.2, 3, True)
    for cls in (MSAMSFTConfig, MSAMDPOConfig, MSAMRewardConfig):
        with pytest.raises(ValueError, match="--msam_rho"):
            cls(output_dir="x", msam_rho=-1.0, use_cpu=True)
    assert issubclass(MSAMSFTTrainer, MSAMMixin) and issubclass(MSAMSFTTrainer, SFTTrainer)


@pytest.mark.slow
def test_sft_step_equals_token_weighted_reference(llama_dir, tmp_path):
    """Completion-only loss, 5 rows in micro-batches of 2, 2, 1: w − lr·Σ_j (n_j/n)·∇L_j(w + e_j), n_j label tokens."""
    model = load(llama_dir)
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    args = MSAMSFTConfig(str(tmp_path), per_device_train_batch_size=5, msam_rho=0.1, msam_micro_batch_size=2, **COMMON)
    trainer = recording(MSAMSFTTrainer)(
        model=model, args=args, train_dataset=Dataset.from_list(PROMPT_COMPLETION[:5]),
        processing_class=AutoTokenizer.from_pretrained(llama_dir),
    )  # fmt: skip
    trainer.train()

    (batch,) = trainer.seen
    assert batch["labels"][:, 1:].ne(-100).sum(1).unique().numel() > 1  # uneven label counts per row
    assert (batch["labels"] == -100).any(1).all()  # the prompts are masked out
    reference = load(llama_dir)
    reference.load_state_dict(w0)
    expected = sft_reference_step(reference, batch, micro_batch_size=2, rho=0.1, lr=0.5)
    assert_weights_close(model, expected)
    # The tolerance tells the token weighting from a weighting by rows (2/5, 2/5, 1/5), and mSAM from SAM.
    by_rows = sft_reference_step(reference, batch, micro_batch_size=2, rho=0.1, lr=0.5, by_rows=True)
    sam = sft_reference_step(reference, batch, micro_batch_size=5, rho=0.1, lr=0.5)
    for other in (by_rows, sam):
        assert max((other[k] - expected[k]).abs().max().item() for k in expected) > 100 * ATOL

    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs and logs[0]["msam/sharpness"] > 0 and logs[0]["msam/skipped_perturbations"] == 0
    # TRL's own metrics are those of the clean passes, each token counted once.
    assert logs[0]["num_tokens"] == batch["attention_mask"].sum().item()


def test_sft_padding_free_step_equals_reference(llama_dir, tmp_path):
    """A padding-free batch (one row of 5 sequences) is cut at sequence boundaries, 2 + 2 + 1 sequences; the
    reference runs every sequence on its own, unpadded."""
    model = load(llama_dir)
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    args = MSAMSFTConfig(
        str(tmp_path), per_device_train_batch_size=5, padding_free=True, max_length=None, msam_rho=0.1,
        msam_micro_batch_size=2, **COMMON,
    )  # fmt: skip
    trainer = recording(MSAMSFTTrainer)(
        model=model, args=args, train_dataset=Dataset.from_list(PROMPT_COMPLETION[:5]),
        processing_class=AutoTokenizer.from_pretrained(llama_dir),
    )  # fmt: skip
    trainer.train()

    (batch,) = trainer.seen
    assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch
    # The sequences, read off position_ids in plain torch.
    positions = batch["position_ids"][0]
    starts = [i for i in range(positions.numel()) if positions[i] == 0] + [positions.numel()]
    sequences = [(batch["input_ids"][:, a:b], batch["labels"][:, a:b]) for a, b in zip(starts, starts[1:])]
    assert len(sequences) == 5
    reference = load(llama_dir)
    reference.load_state_dict(w0)
    groups = [sequences[0:2], sequences[2:4], sequences[4:5]]
    counts = [sum(int(labels[:, 1:].ne(-100).sum()) for _, labels in g) for g in groups]

    def loss_of(group):
        return lambda: sum(token_nll_sum(reference, ids, labels)[0] for ids, labels in group) / sum(
            int(labels[:, 1:].ne(-100).sum()) for _, labels in group
        )

    gradient = msam_gradient(reference, [loss_of(g) for g in groups], [c / sum(counts) for c in counts], rho=0.1)
    assert_weights_close(model, sgd_reference(reference, gradient, lr=0.5))
    # The logged count is what was cut (3 micro-batches of sequences), whatever the row count of the batch.
    (logged,) = [h for h in trainer.state.log_history if "loss" in h]
    assert logged["msam/micro_batches_per_step"] == 3


def test_sft_packing_logs_the_micro_batches_it_cut(llama_dir, tmp_path):
    """With `packing`, a row is a bin of several sequences: the static count (in rows) is a lower bound, said so at
    start and in the card, and the logged msam/micro_batches_per_step is what was cut, counted here by hand."""
    args = MSAMSFTConfig(
        str(tmp_path), per_device_train_batch_size=1, packing=True, max_length=48, msam_rho=0.1, msam_micro_batch_size=2,
        **COMMON,
    )  # fmt: skip
    trainer = recording(MSAMSFTTrainer)(
        model=load(llama_dir), args=args, train_dataset=Dataset.from_list(PROMPT_COMPLETION),
        processing_class=AutoTokenizer.from_pretrained(llama_dir),
    )  # fmt: skip
    trainer.train()
    (batch,) = trainer.seen
    sequences = int(batch["position_ids"][0].eq(0).sum())  # a sequence starts where its positions restart
    assert batch["input_ids"].shape[0] == 1 and sequences > 2
    (logged,) = [h for h in trainer.state.log_history if "loss" in h]
    assert logged["msam/micro_batches_per_step"] == math.ceil(sequences / 2) > trainer.msam_perturbations_per_step == 1
    assert "packed rows" in trainer.msam_count_caveat
    trainer.create_model_card()
    assert "packed rows" in (tmp_path / "README.md").read_text()


def test_sft_rho_zero_is_plain_sft_bitwise(llama_dir, tmp_path):
    data = Dataset.from_list(PROMPT_COMPLETION)
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    common = {**COMMON, "max_steps": 2, "optim": "adamw_torch", "learning_rate": 1e-2, "max_grad_norm": 1.0}
    plain = load(llama_dir)
    SFTTrainer(model=plain, args=SFTConfig(str(tmp_path / "a"), per_device_train_batch_size=4, **common),
               train_dataset=data, processing_class=tokenizer).train()  # fmt: skip
    ours = load(llama_dir)
    trainer = MSAMSFTTrainer(
        model=ours, args=MSAMSFTConfig(str(tmp_path / "b"), per_device_train_batch_size=4, msam_rho=0.0, msam_micro_batch_size=2, **common),
        train_dataset=data, processing_class=tokenizer,
    )  # fmt: skip
    trainer.train()
    for (name, a), b in zip(plain.named_parameters(), ours.parameters()):
        assert torch.equal(a, b), name
    assert not torch.equal(plain.lm_head.weight, load(llama_dir).lm_head.weight)  # it did train
    assert not any("msam/sharpness" in h for h in trainer.state.log_history)


def test_user_mixin_class_and_lora(llama_dir, tmp_path):
    """`class MySFT(MSAMMixin, SFTTrainer)` with LoRA: trains with mSAM, only the adapter moves (the frozen base
    weights are never perturbed: they end bitwise as they started)."""
    from peft import LoraConfig

    class MySFT(MSAMMixin, SFTTrainer):
        pass

    args = MSAMSFTConfig(str(tmp_path), per_device_train_batch_size=3, msam_rho=0.2, msam_micro_batch_size=2, **COMMON)
    trainer = MySFT(
        model=load(llama_dir), args=args, train_dataset=Dataset.from_list(PROMPT_COMPLETION[:3]),
        processing_class=AutoTokenizer.from_pretrained(llama_dir),
        peft_config=LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )  # fmt: skip
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    moved = {n for n, w in before.items() if not torch.equal(after[n], w)}
    assert moved and all("lora_" in n for n in moved)
    assert moved == {n for n, p in after.items() if p.requires_grad}
    assert trainer.msam_perturbations_per_step == 2
    assert "msam/sharpness" in [h for h in trainer.state.log_history if "loss" in h][0]


@pytest.mark.slow
def test_sft_flatness_in_evaluation(llama_dir, tmp_path):
    """--msam_eval_flatness on a causal LM in TRL's evaluation: finite metrics, weights untouched."""
    model = load(llama_dir)
    args = MSAMSFTConfig(
        str(tmp_path), per_device_eval_batch_size=4, msam_eval_flatness=True, msam_flatness_batches=1,
        msam_flatness_iters=3, **COMMON,
    )  # fmt: skip
    trainer = MSAMSFTTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(PROMPT_COMPLETION),
        eval_dataset=Dataset.from_list(PROMPT_COMPLETION[:4]), processing_class=AutoTokenizer.from_pretrained(llama_dir),
    )  # fmt: skip
    before = trainable(model)
    metrics = trainer.evaluate()
    for key in ("eval_loss", "eval_hessian_top_eigenvalue", "eval_hessian_trace", "eval_sharpness"):
        assert math.isfinite(metrics[key]), key
    assert metrics["eval_hessian_trace"] != 0
    assert all(torch.equal(before[n], p) for n, p in trainable(model).items())


# ---------------------------------------------------------------------------------------------
# DPO and reward models
# ---------------------------------------------------------------------------------------------


def dpo_common(tmp_path, **kwargs):
    return {**COMMON, "output_dir": str(tmp_path), "per_device_train_batch_size": 5, "beta": 0.5, **kwargs}


def test_dpo_rho_zero_is_plain_dpo_bitwise(llama_dir, tmp_path):
    data = Dataset.from_list(PREFERENCES)
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    common = {"max_steps": 2, "optim": "adamw_torch", "learning_rate": 1e-2, "per_device_train_batch_size": 3}
    plain = load(llama_dir)
    DPOTrainer(model=plain, ref_model=load(llama_dir), args=DPOConfig(**dpo_common(tmp_path / "a", **common)),
               train_dataset=data, processing_class=tokenizer).train()  # fmt: skip
    ours = load(llama_dir)
    MSAMDPOTrainer(
        model=ours, ref_model=load(llama_dir), args=MSAMDPOConfig(**dpo_common(tmp_path / "b", **common), msam_rho=0.0),
        train_dataset=data, processing_class=tokenizer,
    ).train()  # fmt: skip
    for (name, a), b in zip(plain.named_parameters(), ours.parameters()):
        assert torch.equal(a, b), name
    assert not torch.equal(plain.lm_head.weight, load(llama_dir).lm_head.weight)


@pytest.mark.slow
def test_dpo_step_equals_pairwise_reference(llama_dir, tmp_path):
    """5 pairs in micro-batches of 2, 2, 1 pairs (each chosen answer with its rejected one), weighted by pairs; the
    reference model is never perturbed."""
    model, ref_model = load(llama_dir), load(llama_dir)
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = recording(MSAMDPOTrainer)(
        model=model, ref_model=ref_model, args=MSAMDPOConfig(**dpo_common(tmp_path), msam_rho=0.1, msam_micro_batch_size=2),
        train_dataset=Dataset.from_list(PREFERENCES), processing_class=AutoTokenizer.from_pretrained(llama_dir),
    )  # fmt: skip
    trainer.train()
    (batch,) = trainer.seen
    n = batch["input_ids"].shape[0] // 2
    assert n == 5
    policy = load(llama_dir)
    policy.load_state_dict(w0)
    frozen = load(llama_dir)
    with torch.no_grad():
        ref_logps = completion_logps(frozen, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    pairs = [range(0, 2), range(2, 4), range(4, 5)]

    def loss_of(r):
        rows = list(r) + [n + i for i in r]

        def loss():
            logps = completion_logps(policy, batch["input_ids"][rows], batch["attention_mask"][rows], batch["completion_mask"][rows])
            ref = ref_logps[rows]
            k = len(r)
            margin = (logps[:k] - ref[:k]) - (logps[k:] - ref[k:])
            return -torch.nn.functional.logsigmoid(0.5 * margin).mean()

        return loss

    gradient = msam_gradient(policy, [loss_of(r) for r in pairs], [len(r) / n for r in pairs], rho=0.1)
    assert_weights_close(model, sgd_reference(policy, gradient, lr=0.5))
    assert all(torch.equal(a, b) for a, b in zip(ref_model.parameters(), frozen.parameters()))
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert "msam/sharpness" in logs[0] and "rewards/chosen" in logs[0]


def test_reward_trainer_splits_by_pairs(llama_dir, tmp_path):
    """RewardTrainer: micro-batches of whole pairs (the reward loss needs both answers), msam metrics logged."""
    model = load(llama_dir, AutoModelForSequenceClassification, num_labels=1)
    model.config.pad_token_id = 0
    data = Dataset.from_list([{"chosen": p["prompt"] + p["chosen"], "rejected": p["prompt"] + p["rejected"]} for p in PREFERENCES])
    trainer = recording(MSAMRewardTrainer)(
        model=model, args=MSAMRewardConfig(str(tmp_path), per_device_train_batch_size=4, msam_rho=0.1, msam_micro_batch_size=3, **COMMON),
        train_dataset=data, processing_class=AutoTokenizer.from_pretrained(llama_dir),
    )  # fmt: skip
    trainer.train()
    (batch,) = trainer.seen
    assert batch["input_ids"].shape[0] == 8
    from hf_msam.batches import split_pairs

    micro = split_pairs(batch, 3)
    assert [mb["input_ids"].shape[0] for mb in micro] == [6, 2]
    assert torch.equal(micro[1]["input_ids"], batch["input_ids"][[3, 7]])
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert "msam/sharpness" in logs[0] and "accuracy" in logs[0]


# ---------------------------------------------------------------------------------------------
# TRL's logged metrics under micro-batches: those of the same step without them
# ---------------------------------------------------------------------------------------------


def first_log(trainer):
    return next(h for h in trainer.state.log_history if "loss" in h)


def logged_metrics_of(cls, config_cls, llama_dir, tmp_path, data, **kwargs):
    trainer = cls(
        model=load(llama_dir), args=config_cls(str(tmp_path), **COMMON, **kwargs), train_dataset=Dataset.from_list(data),
        processing_class=AutoTokenizer.from_pretrained(llama_dir),
    )  # fmt: skip
    trainer.train()
    return first_log(trainer)


def label_free_last_rows(llama_dir):
    """PROMPT_COMPLETION tokenized, with a completion mask; in rows 6 and 7 it marks only the first token, which
    the shifted labels drop (TRL keeps such rows: its filter reads the unshifted labels). So the last micro-batch
    of 2 rows holds no label token."""
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    rows = []
    for i, row in enumerate(PROMPT_COMPLETION):
        prompt = tokenizer(row["prompt"])["input_ids"]
        completion = tokenizer(row["completion"])["input_ids"] + [tokenizer.eos_token_id]
        mask = [1] + [0] * (len(prompt) + len(completion) - 1) if i >= 6 else [0] * len(prompt) + [1] * len(completion)
        rows.append({"input_ids": prompt + completion, "completion_mask": mask})
    return rows


@pytest.mark.parametrize(
    "layout, data, settings",
    [
        ("padded", "label-free", dict(per_device_train_batch_size=8, completion_only_loss=True)),
        ("packed", PROMPT_COMPLETION, dict(per_device_train_batch_size=1, packing=True, max_length=48)),
    ],
)
def test_sft_metrics_under_micro_batches_equal_the_plain_step(llama_dir, tmp_path, layout, data, settings):
    """entropy, mean_token_accuracy and num_tokens of the first step (the clean passes at w) equal plain SFTTrainer's
    on the same batch: a micro-batch without label tokens weighs nothing (it used to count as 0), and packed rows
    cut into micro-batches of sequences give the row's ratio, not a mean of ratios."""
    data = label_free_last_rows(llama_dir) if data == "label-free" else data
    plain = logged_metrics_of(SFTTrainer, SFTConfig, llama_dir, tmp_path / "plain", data, **settings)
    ours = logged_metrics_of(
        recording(MSAMSFTTrainer), MSAMSFTConfig, llama_dir, tmp_path / "msam", data, msam_rho=0.1,
        msam_micro_batch_size=2, **settings,
    )  # fmt: skip
    assert ours["msam/micro_batches_per_step"] >= 3  # the batch was cut
    assert ours["num_tokens"] == plain["num_tokens"]
    assert ours["mean_token_accuracy"] == pytest.approx(plain["mean_token_accuracy"], rel=1e-9)
    assert ours["entropy"] == pytest.approx(plain["entropy"], rel=1e-6)
    assert ours["loss"] == pytest.approx(plain["loss"], rel=1e-6)  # the clean loss of the same step
    if layout == "padded":  # 4 micro-batches, the last without labels: it used to log 3/4 of the entropy
        assert ours["msam/micro_batches_per_step"] == 4


def test_sft_metrics_with_a_label_free_micro_batch_are_the_token_weighted_ones(llama_dir, tmp_path):
    """The same padded step against a plain-PyTorch reference: accuracy and entropy over the label tokens of the
    whole batch, from the model's logits at w."""
    settings = dict(per_device_train_batch_size=8, completion_only_loss=True)
    trainer = recording(MSAMSFTTrainer)(
        model=load(llama_dir), args=MSAMSFTConfig(str(tmp_path), **COMMON, msam_rho=0.1, msam_micro_batch_size=2, **settings),
        train_dataset=Dataset.from_list(label_free_last_rows(llama_dir)),
        processing_class=AutoTokenizer.from_pretrained(llama_dir),
    )  # fmt: skip
    trainer.train()
    (batch,) = trainer.seen
    assert batch["input_ids"].shape[0] == 8
    assert batch["labels"][6:, 1:].ne(-100).sum() == 0 < batch["labels"][:6, 1:].ne(-100).sum()
    with torch.no_grad():
        logits = load(llama_dir)(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    mask = batch["labels"][:, 1:].ne(-100)
    logp = torch.log_softmax(logits, -1)
    entropy = -(logp.exp() * logp).sum(-1)[mask].mean().item()
    accuracy = (logits.argmax(-1) == batch["labels"][:, 1:])[mask].double().mean().item()
    logged = first_log(trainer)
    assert logged["mean_token_accuracy"] == pytest.approx(accuracy, rel=1e-6)  # TRL divides in float32
    assert logged["entropy"] == pytest.approx(entropy, rel=1e-6)
    assert logged["num_tokens"] == batch["attention_mask"].sum().item()


def test_dpo_metrics_under_micro_batches_equal_the_plain_step(llama_dir, tmp_path):
    """5 pairs in micro-batches of 2, 2, 1: DPO's token ratios and its means over pairs equal plain DPOTrainer's."""
    data = Dataset.from_list(PREFERENCES)
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    plain = DPOTrainer(model=load(llama_dir), ref_model=load(llama_dir), args=DPOConfig(**dpo_common(tmp_path / "a")),
                       train_dataset=data, processing_class=tokenizer)  # fmt: skip
    plain.train()
    ours = MSAMDPOTrainer(
        model=load(llama_dir), ref_model=load(llama_dir),
        args=MSAMDPOConfig(**dpo_common(tmp_path / "b"), msam_rho=0.1, msam_micro_batch_size=2),
        train_dataset=data, processing_class=tokenizer,
    )  # fmt: skip
    ours.train()
    a, b = first_log(plain), first_log(ours)
    assert b["msam/micro_batches_per_step"] == 3
    keys = [k for k in a if k.split("/")[0] in ("rewards", "logps", "logits") or k in ("entropy", "mean_token_accuracy", "num_tokens")]
    assert len(keys) >= 9
    for key in keys:
        assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-9), key


def test_model_card_names_a_local_base_model(llama_dir, tmp_path):
    """A model loaded from a local directory: TRL's card said "fine-tuned version of [None](https://huggingface.co/None)";
    it names the directory. A model built from a config (no name at all) leaves the base model out."""
    from transformers import LlamaConfig

    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    data = Dataset.from_list(PROMPT_COMPLETION[:2])
    config = LlamaConfig.from_pretrained(llama_dir)
    for name, model in (("local", load(llama_dir)), ("config", AutoModelForCausalLM.from_config(config))):
        out = tmp_path / name
        trainer = MSAMSFTTrainer(model=model, args=MSAMSFTConfig(str(out), msam_rho=0.1, **COMMON), train_dataset=data,
                                 processing_class=tokenizer)  # fmt: skip
        trainer.create_model_card(model_name="tiny", dataset_name="local.jsonl")
        text = (out / "README.md").read_text()
        assert "[None]" not in text and "huggingface.co/None" not in text
        expected = f"fine-tuned version of the local model `{llama_dir.name}` on" if name == "local" else "This model was trained on"
        assert expected in text and "## mSAM settings" in text
