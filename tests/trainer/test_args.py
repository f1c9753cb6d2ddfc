"""MSAMTrainingArguments: validation, HfArgumentParser flags, and plain TrainingArguments."""

import logging

import pytest
import internals
from reference import MLP
from transformers import HfArgumentParser, TrainingArguments

from hf_msam import MSAMTrainer, MSAMTrainingArguments


@pytest.mark.parametrize(
    "field,value,flag",
    [
        ("msam_rho", -0.1, "--msam_rho"),
        ("msam_rho", float("nan"), "--msam_rho"),
        ("msam_rho", float("inf"), "--msam_rho"),
        ("msam_micro_batch_size", 0, "--msam_micro_batch_size"),
        ("msam_micro_batch_size", 2.5, "--msam_micro_batch_size"),
        ("msam_adaptive_eta", -1.0, "--msam_adaptive_eta"),
        ("msam_eps", -1e-12, "--msam_eps"),
    ],
)
def test_invalid_values_raise_with_the_flag_named(tmp_path, field, value, flag):
    with pytest.raises(ValueError, match=flag):
        MSAMTrainingArguments(str(tmp_path), **{field: value})


def test_every_msam_field_is_a_documented_command_line_flag(tmp_path):
    parser = HfArgumentParser(MSAMTrainingArguments)
    (args,) = parser.parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--msam_rho", "0.1", "--msam_micro_batch_size", "4", "--msam_adaptive",
         "--msam_adaptive_eta", "0.02", "--msam_eps", "1e-10"]
    )
    assert (args.msam_rho, args.msam_micro_batch_size, args.msam_adaptive, args.msam_adaptive_eta, args.msam_eps) == (
        0.1, 4, True, 0.02, 1e-10,
    )
    helps = {a.dest: a.help for a in parser._actions if a.dest.startswith("msam_")}
    assert set(helps) >= {"msam_rho", "msam_micro_batch_size", "msam_adaptive", "msam_adaptive_eta", "msam_eps"}
    assert all(h and len(h) > 20 for h in helps.values())
    (defaults,) = parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path)])
    assert (defaults.msam_rho, defaults.msam_micro_batch_size, defaults.msam_adaptive) == (0.05, None, False)
    # `--help` renders every help string through argparse's %-formatting: a bare "%" in one crashed it.
    text = parser.format_help()
    assert "--msam_interval" in text and "(t - 1) mod k == 0" in text


def test_plain_training_arguments_get_the_defaults_and_a_notice(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="hf_msam"):
        trainer = MSAMTrainer(model=MLP(), args=TrainingArguments(str(tmp_path), use_cpu=True, report_to="none"))
    assert "without the mSAM settings (TrainingArguments)" in caplog.text
    assert trainer.msam_perturbation.rho == 0.05 and trainer.msam_micro_batch_size is None


def test_perturbations_per_step_counts_devices_accumulation_and_micro_batches(tmp_path):
    args = MSAMTrainingArguments(
        str(tmp_path), use_cpu=True, report_to="none", per_device_train_batch_size=10, gradient_accumulation_steps=3,
        msam_micro_batch_size=4,
    )
    assert MSAMTrainer(model=MLP(), args=args).msam_perturbations_per_step == 1 * 3 * 3  # 4 + 4 + 2


def test_reentrant_gradient_checkpointing_is_rejected(tmp_path):
    args = MSAMTrainingArguments(
        str(tmp_path), use_cpu=True, report_to="none", gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": True},
    )
    with pytest.raises(ValueError, match="reentrant"):
        MSAMTrainer(model=MLP(), args=args)


@pytest.mark.parametrize("flag", ["is_fsdp_enabled", "is_deepspeed_enabled"])
def test_sharded_setups_are_refused_unless_msam_is_off(tmp_path, flag):
    # FSDP/DeepSpeed need a multi-process launch to construct; flip the flag the Trainer derives from them.
    trainer = MSAMTrainer(model=MLP(), args=MSAMTrainingArguments(str(tmp_path), use_cpu=True, report_to="none"))
    setattr(trainer, flag, True)
    with pytest.raises(NotImplementedError, match="FSDP2"):  # the message names the supported way
        internals.check_supported(trainer)
    trainer.msam_perturbation.rho = 0.0
    internals.check_supported(trainer)  # rho = 0 is the plain Trainer: allowed


def test_model_without_trainable_parameter_is_refused_at_train_start(tmp_path):
    from reference import mlp_dataset

    model = MLP().double()
    for p in model.parameters():
        p.requires_grad_(False)
    args = MSAMTrainingArguments(str(tmp_path), use_cpu=True, report_to="none", max_steps=1, per_device_train_batch_size=4)
    trainer = MSAMTrainer(model=model, args=args, train_dataset=mlp_dataset(4))
    with pytest.raises(ValueError, match=r"MSAMTrainer: no parameter of MLP requires grad.*--msam_rho 0"):
        trainer.train()
