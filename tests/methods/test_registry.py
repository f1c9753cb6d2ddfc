"""The method registry: a user's own method by name (in-process and through `hf-msam run`), the capabilities its rules
declare, and the mSAM step's loss normalization against the plain Trainer for each loss-kwargs case."""

import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from reference import MLP, flat, mlp_dataset, msam_gradient
from test_trainer_reference import LR, TIGHT, expected_after_step, sgd_args, stack, tiny_bert, bert_data, trainable
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

import hf_msam
from hf_msam import (
    DescentRule,
    MicroBatchSAM,
    MSAMTrainer,
    MSAMTrainingArguments,
    PerturbationRule,
    SAMDescent,
    SAMPerturbation,
    register_method,
)
from hf_msam.methods import REGISTRY


@pytest.fixture
def registered():
    """Register methods for one test, and leave the registry as it was."""
    before = dict(REGISTRY)
    yield register_method
    REGISTRY.clear()
    REGISTRY.update(before)


def test_builtin_methods_are_registered_with_paper_and_flags():
    assert hf_msam.method_names()[:5] == ["sam", "gsam", "fsam", "looksam", "momentum"]
    for name in ("sam", "gsam", "fsam", "looksam", "momentum"):
        assert REGISTRY[name].paper and REGISTRY[name].cost and "msam_rho" in REGISTRY[name].flags
    assert "msam_gsam_alpha" in REGISTRY["gsam"].flags and "msam_looksam_k" in REGISTRY["looksam"].flags


def test_own_method_trains_by_name_and_matches_a_reference(tmp_path, registered):
    @registered("halfrho", paper="SAM at half the radius", flags=("msam_rho",))
    def build(args):
        return SAMPerturbation(rho=args.msam_rho / 2), SAMDescent()

    data = bert_data(8)
    model, reference = tiny_bert(), tiny_bert()
    expected = expected_after_step(reference, msam_gradient(reference, stack(data), 2, 0.2))  # ρ = 0.4 / 2
    args = sgd_args(tmp_path, 8, msam_rho=0.4, msam_micro_batch_size=2, msam_method="halfrho")
    trainer = MSAMTrainer(model=model, args=args, train_dataset=data)
    assert repr(trainer.msam_perturbation) == "SAMPerturbation(rho=0.2, eps=1e-12)"
    trainer.train()
    for a, b in zip(trainable(model), expected):
        torch.testing.assert_close(a, b, **TIGHT)
    # Guard: at the full radius the step is another one.
    full = expected_after_step(reference, msam_gradient(reference, stack(data), 2, 0.4))
    assert not torch.allclose(flat(trainable(model)), flat(full), rtol=1e-6, atol=0)


def test_unknown_method_lists_the_registered_ones(tmp_path, registered):
    registered("mine")(lambda args: (SAMPerturbation(args.msam_rho), SAMDescent()))
    with pytest.raises(ValueError, match=r"registered methods \(sam, gsam, fsam, looksam, momentum, functional, flat_lora, logits_sam, mine\), got 'nope'"):
        MSAMTrainingArguments(str(tmp_path), msam_method="nope")


def test_registering_a_name_twice_needs_replace(registered):
    registered("twice")(lambda args: (SAMPerturbation(), SAMDescent()))
    with pytest.raises(ValueError, match="already registered"):
        registered("twice")(lambda args: (SAMPerturbation(), SAMDescent()))
    registered("twice", replace=True)(lambda args: (SAMPerturbation(), SAMDescent()))
    with pytest.raises(ValueError, match="identifier"):
        registered("has space")


def test_factory_must_return_rules(tmp_path, registered):
    registered("broken")(lambda args: ("not", "rules"))
    with pytest.raises(TypeError, match="must return \\(PerturbationRule, DescentRule\\)"):
        MSAMTrainingArguments(str(tmp_path), msam_method="broken")


class DeviceOwnDescent(DescentRule):
    """A descent that, like GSAM, is nonlinear in each device's own g_p: it says so, and is refused accordingly."""

    explicit = True
    supports_sync = False
    supports_fsdp2 = False

    def descent(self, g, g_p, c=1.0):
        return g_p


def test_capabilities_declared_by_a_rule_are_enforced_everywhere(tmp_path, registered):
    registered("mine")(lambda args: (SAMPerturbation(args.msam_rho, args.msam_adaptive), DeviceOwnDescent()))
    with pytest.raises(ValueError, match="--msam_sync_perturbation does not combine with --msam_method mine"):
        MSAMTrainingArguments(str(tmp_path), msam_method="mine", msam_sync_perturbation=True)
    MSAMTrainingArguments(str(tmp_path), msam_method="mine", msam_adaptive=True)  # its perturbation takes ASAM
    registered("plain_only")(lambda args: (SAMPerturbation(args.msam_rho), SAMDescent()))  # ignores msam_adaptive
    with pytest.raises(ValueError, match="--msam_adaptive \\(ASAM\\) does not combine with --msam_method plain_only"):
        MSAMTrainingArguments(str(tmp_path), msam_method="plain_only", msam_adaptive=True)
    with pytest.raises(ValueError, match="sync_perturbation=True"):  # the engine, given the rules directly
        MicroBatchSAM(MLP(), sync_perturbation=True, descent=DeviceOwnDescent())


def test_flags_changed_after_the_arguments_are_checked_when_the_trainer_starts(tmp_path):
    args = sgd_args(tmp_path, 4)
    for name, value in (("msam_rho", float("nan")), ("msam_rho", -0.5), ("msam_micro_batch_size", 0), ("msam_method", "nope")):
        bad = copy.copy(args)
        setattr(bad, name, value)
        with pytest.raises(ValueError, match=name):
            MSAMTrainer(model=MLP().double(), args=bad, train_dataset=mlp_dataset(4))


def test_switches_given_as_strings_are_parsed(tmp_path):
    assert MSAMTrainingArguments(str(tmp_path), msam_adaptive="False").msam_adaptive is False
    assert MSAMTrainingArguments(str(tmp_path), msam_adaptive="true").msam_adaptive is True
    with pytest.raises(ValueError, match="--msam_adaptive must be True or False"):
        MSAMTrainingArguments(str(tmp_path), msam_adaptive="maybe")
    with pytest.raises(ValueError, match="--msam_rho"):
        MSAMTrainingArguments(str(tmp_path), msam_rho=True)


USER_SCRIPT = """
import torch
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments, HfArgumentParser
from hf_msam import register_method, SAMPerturbation, SAMDescent

@register_method("halfrho")
def build(args):
    return SAMPerturbation(rho=args.msam_rho / 2), SAMDescent()

def main():
    (args,) = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses()
    torch.manual_seed(0)
    config = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                        max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = BertForSequenceClassification(config).double()
    g = torch.Generator().manual_seed(1)
    ids, labels = torch.randint(1, 40, (8, 7), generator=g), torch.randint(0, 2, (8,), generator=g)
    data = [{"input_ids": ids[i], "labels": labels[i]} for i in range(8)]
    before = [p.detach().clone() for p in model.parameters()]
    Trainer(model=model, args=args, train_dataset=data).train()
    after = [p.detach() for p in model.parameters()]
    torch.save({"before": before, "after": after, "method": args.msam_method}, args.output_dir + "/weights.pt")

if __name__ == "__main__":
    main()
"""


@pytest.mark.slow
def test_own_method_through_the_launcher(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(USER_SCRIPT))
    out = tmp_path / "out"
    cmd = [
        sys.executable, "-m", "hf_msam", "run", str(script), "--output_dir", str(out), "--max_steps", "1",
        "--per_device_train_batch_size", "8", "--optim", "sgd", "--learning_rate", str(LR), "--lr_scheduler_type",
        "constant", "--max_grad_norm", "0", "--weight_decay", "0", "--train_sampling_strategy", "sequential",
        "--report_to", "none", "--use_cpu", "--save_strategy", "no", "--logging_strategy", "no",
        "--msam_rho", "0.4", "--msam_micro_batch_size", "2", "--msam_method", "halfrho",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = torch.load(out / "weights.pt")
    assert saved["method"] == "halfrho"
    model = tiny_bert()
    with torch.no_grad():
        for p, w in zip(model.parameters(), saved["before"]):
            p.copy_(w)
    g = torch.Generator().manual_seed(1)
    ids, labels = torch.randint(1, 40, (8, 7), generator=g), torch.randint(0, 2, (8,), generator=g)
    expected = expected_after_step(model, msam_gradient(model, {"input_ids": ids, "labels": labels}, 2, 0.2))
    for a, b in zip(saved["after"], expected):
        torch.testing.assert_close(a, b, **TIGHT)


# ---------------------------------------------------------------------------------------------
# The mSAM step's loss is the plain Trainer's: with a zero perturbation, the same update and the same logged loss
# ---------------------------------------------------------------------------------------------


class ZeroPerturbation(PerturbationRule):
    """e = 0 on every micro-batch (but the mSAM step still runs: clean and perturbed passes, micro-batch weights)."""

    def perturb(self, params, grads, rho=None):
        for g in grads:
            g.zero_()
        return grads, torch.zeros((), dtype=torch.float64), torch.ones((), dtype=torch.bool)


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=32,
    )
    return LlamaForCausalLM(config).double()


def llama_data(n, seq_len=8, seed=3):
    """Label tokens differ per row (-100 masks), so a token-normalized loss weighs rows unequally."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 40, (n, seq_len), generator=g)
    labels = ids.clone()
    for i in range(n):
        labels[i, : 1 + i % 5] = -100
    return [{"input_ids": ids[i], "labels": labels[i]} for i in range(n)]


def _token_sum_loss(outputs, labels, num_items_in_batch=None):
    logits = outputs["logits"]
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, -2), labels.flatten(), reduction="sum")
    return loss / num_items_in_batch


CASES = {
    # model, data, extra trainer kwargs; a mean over examples without loss kwargs
    "mean-loss": (tiny_bert, lambda: bert_data(12), {}),
    # a causal LM that accepts loss kwargs: normalized by num_items_in_batch over both accumulation steps
    "num-items": (tiny_llama, lambda: llama_data(12), {}),
    # a compute_loss_func, normalized by num_items_in_batch
    "compute-loss-func": (tiny_bert, lambda: bert_data(12), {"compute_loss_func": _token_sum_loss}),
}


@pytest.mark.parametrize("case", CASES)
def test_step_loss_is_the_plain_trainers(tmp_path, case, registered):
    registered("zero")(lambda args: (ZeroPerturbation(), SAMDescent()))
    make_model, make_data, extra = CASES[case]
    data = make_data()
    common = dict(
        per_device_train_batch_size=6, gradient_accumulation_steps=2, max_steps=2, optim="sgd", learning_rate=LR,
        lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0, train_sampling_strategy="sequential",
        report_to="none", use_cpu=True, save_strategy="no", logging_steps=1,
    )
    plain_model, msam_model = make_model(), make_model()
    plain = Trainer(model=plain_model, args=TrainingArguments(str(tmp_path / "plain"), **common), train_dataset=data, **extra)
    plain.train()
    args = MSAMTrainingArguments(str(tmp_path / "msam"), msam_method="zero", msam_micro_batch_size=4, **common)  # 4 + 2
    msam = MSAMTrainer(model=msam_model, args=args, train_dataset=data, **extra)
    msam.train()
    assert msam.msam_engine is not None  # the mSAM step ran
    moved = [not torch.equal(a, b) for a, b in zip(trainable(plain_model), trainable(make_model()))]
    assert any(moved)
    for a, b in zip(trainable(msam_model), trainable(plain_model)):
        torch.testing.assert_close(a, b, **TIGHT)
    losses = lambda t: [h["loss"] for h in t.state.log_history if "loss" in h]  # noqa: E731
    assert len(losses(msam)) == 2
    # The Trainer keeps its running loss in float32: equal up to its rounding.
    torch.testing.assert_close(torch.tensor(losses(msam)), torch.tensor(losses(plain)), rtol=1e-6, atol=0)
