"""The adapters to upstream libraries (hf_msam/integrations/): each names what it relies on, and a test here fails
with the adapter's and the missing name's when an upstream release removes it. Behaviour of each adapter against
plain-PyTorch references lives in the tests of what uses it (test_hub_kernels.py, test_trainer_reference.py)."""

from __future__ import annotations

import pytest
import torch
import internals

from hf_msam.integrations import torch_internals
from hf_msam.integrations import transformers as transformers_adapter


@pytest.mark.parametrize("adapter", [transformers_adapter, torch_internals], ids=lambda m: m.__name__)
def test_upstream_names_the_adapter_relies_on_are_there(adapter):
    missing = adapter.missing_upstream_names()
    assert not missing, f"{adapter.__name__} (tested with {adapter.TESTED}) relies on names now gone: {missing}"


def test_inverse_scale_is_exact_and_does_not_sync():
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    scaler.scale(torch.ones(()))  # makes the scale tensor
    inverse = torch_internals.inverse_scale(scaler)
    assert inverse.dtype == torch.float32 and inverse.item() == 2.0**-16


class _Accelerator:
    def __init__(self):
        self.calls = 0

    def backward(self, loss, **kwargs):
        self.calls += 1


def test_loss_of_training_step_holds_the_backward_and_puts_it_back(monkeypatch):
    """The Trainer's own training_step runs with the accelerator's backward held: the loss comes back, nothing is
    backpropagated, and the accelerator's backward (its class's, or one set on the instance) is as it was."""
    from transformers import Trainer

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = model(inputs["x"]).sum()
        self.accelerator.backward(loss)
        return loss.detach()

    monkeypatch.setattr(Trainer, "training_step", training_step)

    class Host:
        accelerator = None

    host, model = Host(), torch.nn.Linear(3, 1)
    host.accelerator = _Accelerator()
    x = torch.randn(4, 3)
    loss = transformers_adapter.loss_of_training_step(host, model, {"x": x}, None)
    torch.testing.assert_close(loss, model(x).sum())
    assert loss.requires_grad and host.accelerator.calls == 0 and "backward" not in vars(host.accelerator)
    own = host.accelerator.backward = lambda loss, **kwargs: None  # someone else's, on the instance
    transformers_adapter.loss_of_training_step(host, model, {"x": x}, None)
    assert vars(host.accelerator)["backward"] is own


def test_loss_of_training_step_names_itself_when_upstream_changes(monkeypatch):
    from transformers import Trainer

    monkeypatch.setattr(Trainer, "training_step", lambda self, model, inputs, n=None: None)  # never calls backward

    class Host:
        accelerator = _Accelerator()

    with pytest.raises(RuntimeError, match=r"called accelerator.backward 0 times.*hf_msam.integrations.transformers"):
        transformers_adapter.loss_of_training_step(Host(), torch.nn.Linear(2, 1), {}, None)


def test_trl_names_hf_msam_trl_relies_on_are_there():
    pytest.importorskip("trl")
    from hf_msam.integrations import trl as trl_adapter
    from hf_msam.integrations import trl_fused_head

    for adapter in (trl_adapter, trl_fused_head):
        missing = adapter.missing_upstream_names()
        assert not missing, f"{adapter.__name__} (tested with {adapter.TESTED}) relies on names now gone: {missing}"


def test_integrations_take_part_only_where_they_apply(tmp_path):
    """A plain transformers trainer has no integration: its batches never enter sentence-transformers' code."""
    from test_trainer_reference import bert_data, sgd_args, tiny_bert

    from hf_msam import MSAMTrainer
    from hf_msam.integrations.hooks import INTEGRATIONS

    assert any(i.name == "sentence-transformers" for i in INTEGRATIONS)
    trainer = MSAMTrainer(model=tiny_bert(), args=sgd_args(tmp_path, 4, msam_micro_batch_size=2), train_dataset=bert_data(4))
    assert internals.integrations(trainer) == []
