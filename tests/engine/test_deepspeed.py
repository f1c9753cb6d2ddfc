"""DeepSpeed is refused, clearly and early: the trainer at construction (with the right words about ZeRO), the engine
when its model is a DeepSpeed engine or its accelerator runs DeepSpeed, the flatness flags at construction.

DeepSpeed is not installed here: stand-ins carry its class names and modules, and the trainer's flag is set where
the Trainer derives it from accelerate's state."""

import re
import types

import pytest
import internals
from reference import MLP
from torch import nn
from transformers import Trainer

from hf_msam import MicroBatchSAM, MSAMTrainer, MSAMTrainingArguments


class DeepSpeedEngine(nn.Module):
    """Named and placed like deepspeed.runtime.engine.DeepSpeedEngine: it wraps the model, as `deepspeed.initialize`
    returns it."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, **kwargs):
        return self.module(**kwargs)


DeepSpeedEngine.__module__ = "deepspeed.runtime.engine"


class PipelineEngine(DeepSpeedEngine):
    pass


PipelineEngine.__module__ = "deepspeed.runtime.pipe.engine"


def _args(tmp_path, **kwargs):
    return MSAMTrainingArguments(str(tmp_path), use_cpu=True, report_to="none", **kwargs)


def test_trainer_refusal_says_what_zero_shards_and_what_to_do(tmp_path):
    trainer = MSAMTrainer(model=MLP(), args=_args(tmp_path))
    trainer.is_deepspeed_enabled = True
    with pytest.raises(NotImplementedError) as error:
        internals.check_supported(trainer)
    message = " ".join(str(error.value).split())
    assert message.startswith("MSAMTrainer does not support DeepSpeed (any ZeRO stage)")
    # ZeRO-1: optimizer state; ZeRO-2: also gradients; ZeRO-3: also the parameters. Never "ZeRO-2 ... weights".
    assert "ZeRO-1 partitions the optimizer state, ZeRO-2 also the gradients, ZeRO-3 also the parameters" in message
    assert not re.search(r"ZeRO-2[^;.]*weights", message)
    assert "shard of the weights" not in message  # the FSDP wording, which does not apply
    assert "engine.step" in message  # why: DeepSpeed steps the optimizer inside accelerate's backward
    assert "FSDP2" in message and "--msam_rho 0" in message  # what to do


@pytest.mark.parametrize("engine", [DeepSpeedEngine, PipelineEngine])
def test_engine_refuses_a_deepspeed_wrapped_model_at_construction(engine):
    with pytest.raises(NotImplementedError, match=r"MicroBatchSAM does not support DeepSpeed \(any ZeRO stage\)"):
        MicroBatchSAM(engine(MLP()), rho=0.05, micro_batch_size=2)


def test_engine_refuses_an_accelerator_that_runs_deepspeed():
    from accelerate.utils import DistributedType

    accelerator = types.SimpleNamespace(distributed_type=DistributedType.DEEPSPEED)
    with pytest.raises(NotImplementedError, match="DeepSpeed"):
        MicroBatchSAM(MLP(), rho=0.05, accelerator=accelerator)
    # Other setups, and a model whose class only ends in "Engine" outside deepspeed, are fine.
    MicroBatchSAM(MLP(), rho=0.05, accelerator=types.SimpleNamespace(distributed_type=DistributedType.MULTI_GPU))

    class MyEngine(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(2, 2)

    MicroBatchSAM(MyEngine(), rho=0.05)


@pytest.fixture
def deepspeed_trainer(monkeypatch):
    """The Trainer believes it runs DeepSpeed from construction on (it derives the flag from accelerate's state)."""
    original = Trainer.create_accelerator_and_postprocess

    def create(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.is_deepspeed_enabled = True

    monkeypatch.setattr(Trainer, "create_accelerator_and_postprocess", create)


@pytest.mark.parametrize("flag", ["msam_eval_flatness", "msam_eval_landscape"])
@pytest.mark.parametrize("rho", [0.0, 0.05])  # the flags are refused for a plain (rho 0) run too
def test_flatness_flags_with_deepspeed_are_refused_at_construction(tmp_path, deepspeed_trainer, flag, rho):
    with pytest.raises(NotImplementedError, match=f"--{flag} need the whole, unsharded trainable weights.*DeepSpeed"):
        MSAMTrainer(model=MLP(), args=_args(tmp_path, msam_rho=rho, **{flag: True}))


def test_deepspeed_without_msam_and_flatness_is_the_plain_trainer(tmp_path, deepspeed_trainer):
    trainer = MSAMTrainer(model=MLP(), args=_args(tmp_path, msam_rho=0.0))
    assert trainer.is_deepspeed_enabled
    with pytest.raises(NotImplementedError, match="DeepSpeed"):  # with mSAM on: refused at construction
        MSAMTrainer(model=MLP(), args=_args(tmp_path, msam_rho=0.05))
