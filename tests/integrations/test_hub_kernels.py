"""Forwards that someone else sets, replaces or removes on a module while the vectorized step has routed it
(transformers' hub kernels since 5.25.0, accelerate's hooks), and models loaded with `from_pretrained`.

transformers 5.25.0 loads models with `use_kernels=True` when the `kernels` package is installed, and
`PreTrainedModel.train()` then re-kernelizes (deletes or replaces the instance `forward` of every layer decorated
with `use_kernel_forward_from_hub`) whenever the mode differs from the one last kernelized for. The Trainer's
`training_step` calls `model.train()`; on a loaded model's first step that call took the routing off the norms in the
middle of the mSAM step (see hf_msam/integrations/hub_kernels.py). The tests here:

- a loaded tiny Llama trains on the vectorized path with the Llama RMSNorm rule, to the sequential step's update;
- canaries that fail, naming the upstream function, if transformers' train() starts replacing forwards without a
  change of mode (then `hub_kernels.settle` is no longer enough) or if kernels stops marking the forwards it sets;
- a forward set, replaced or removed by someone else during a pass: the step gives the reference gradient
  (it falls back to one pass per micro-batch, saying why), the module is left as the other party left it, and an
  exception on its way is not replaced by one from the undo.
"""

from __future__ import annotations

import copy
import types

import pytest
import torch
import transformers
from packaging.version import Version
from reference import MLP, mlp_dataset, msam_gradient
from test_registry import llama_data
from test_trainer_reference import sgd_args, stack, trainable
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRMSNorm

import internals
from hf_msam import MicroBatchSAM, MSAMTrainer, vectorized
from hf_msam.integrations import hub_kernels
from hf_msam.integrations.patching import set_on_instance
from hf_msam.vectorized import GroupLayout, NotVectorizable, Vectorizer

try:
    import kernels  # noqa: F401

    HAS_KERNELS = True
except ImportError:
    HAS_KERNELS = False

# transformers >= 5.25 kernelizes loaded models by default when `kernels` is installed: the case that broke.
KERNELIZED_BY_DEFAULT = HAS_KERNELS and Version(transformers.__version__) >= Version("5.25.0")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, max_position_embeddings=32)  # fmt: skip
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # norms away from 1, so that a norm left out of the perturbation would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.3)
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    return path


def load(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64)


def norms(model):
    return [m for m in model.modules() if isinstance(m, LlamaRMSNorm)]


# ---------------------------------------------------------------------------------------------
# A loaded model on the vectorized path
# ---------------------------------------------------------------------------------------------


def test_loaded_llama_takes_the_vectorized_step_with_the_norm_rule(llama_dir, tmp_path):
    model = load(llama_dir)
    if KERNELIZED_BY_DEFAULT:
        assert model.use_kernels, "transformers >= 5.25 with kernels installed kernelizes from_pretrained by default"
    assert not model.training  # from_pretrained leaves it in eval mode: the first step switches it
    twin = copy.deepcopy(model)
    data = llama_data(8)
    runs = {}
    for vectorize, m in (("on", model), ("off", twin)):
        args = sgd_args(tmp_path / vectorize, 4, msam_rho=0.1, msam_micro_batch_size=2, msam_vectorize=vectorize)
        args.max_steps = 2
        runs[vectorize] = MSAMTrainer(model=m, args=args, train_dataset=data)
        runs[vectorize].train()
    engine = runs["on"].msam_engine
    assert engine.path == "vectorized", engine.path_reason
    rule = next(r for matches, r in vectorized.FORWARD_RULES if matches is vectorized._computes_like_llama_rms_norm)
    on_rule = {module for _, module, r in engine.vectorized.vectorizer.covered() if r is rule}
    assert on_rule == set(norms(model)) and len(on_rule) == 5
    assert not any("forward" in m.__dict__ for m in model.modules())  # nothing of ours is left on the modules
    start = trainable(load(llama_dir))
    moved = max((a - b).abs().max().item() for a, b in zip(trainable(twin), start))
    assert moved > 1e-3
    # Llama's RMSNorm normalizes in float32 even in a float64 model: the two paths round there differently.
    for a, b in zip(trainable(model), trainable(twin)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# Canaries: what we rely on from transformers and kernels
# ---------------------------------------------------------------------------------------------


def _sentinels(model):
    """A forward of ours on every module's instance (calling the class's), as the vectorized step routes them."""
    placed = {}
    for m in model.modules():
        fwd = types.MethodType(type(m).forward, m)
        m.forward = fwd
        placed[m] = fwd
    return placed


def test_train_in_the_same_mode_leaves_instance_forwards_alone(llama_dir):
    """After `hub_kernels.settle`, the `model.train()` that `Trainer.training_step` runs inside the mSAM step must not
    touch the forwards routed on the instances."""
    model = load(llama_dir)
    model.train()
    hub_kernels.settle(hub_kernels.transformers_models(model))
    placed = _sentinels(model)
    model.train()  # what Trainer.training_step does inside each of our passes
    gone = [type(m).__name__ for m, f in placed.items() if m.__dict__.get("forward") is not f]
    assert not gone, (
        f"transformers {transformers.__version__}: PreTrainedModel.train() in the mode the model is already in "
        f"replaced or removed the instance forwards of {sorted(set(gone))} (hub kernels' kernelize through "
        "`kernels_mode`, or something new): hf_msam.integrations.hub_kernels.settle no longer leaves the model in a "
        "state the Trainer's model.train() keeps, and the vectorized step would lose its routing mid-pass"
    )


def test_settle_runs_the_kernelization_a_mode_change_would(llama_dir):
    """A loaded model is kernelized for inference; trained, transformers re-kernelizes at its next train() call.
    `settle` does that now (the forwards of ours put before it are gone after it, as after a mode change)."""
    if not KERNELIZED_BY_DEFAULT:
        pytest.skip("the model is not kernelized (transformers < 5.25 or no kernels package)")
    model = load(llama_dir)
    torch.nn.Module.train(model)  # the training flags only, as a parent module's train() would set them
    placed = _sentinels(model)
    hub_kernels.settle(hub_kernels.transformers_models(model))
    gone = {type(m).__name__ for m, f in placed.items() if m.__dict__.get("forward") is not f}
    assert "LlamaRMSNorm" in gone, (
        "hf_msam.integrations.hub_kernels.settle no longer re-kernelizes a loaded model whose `kernels_mode` lags its "
        f"training flag (transformers {transformers.__version__}: PreTrainedModel.kernels_mode / kernels.kernelize)"
    )
    placed = _sentinels(model)
    model.train()
    assert all(m.__dict__.get("forward") is f for m, f in placed.items())


def test_kernels_marks_the_forwards_it_sets():
    """`hub_kernel_forward` reads the mark kernels' `_replace_forward` leaves beside a hub kernel's forward."""
    if not HAS_KERNELS:
        pytest.skip("no kernels package")
    from kernels._internals.layer import layer as kernels_layer

    replace = getattr(kernels_layer, "_replace_forward", None)
    assert replace is not None, "kernels._internals.layer.layer._replace_forward is gone: read how kernelize sets forwards"

    class Kernel(torch.nn.Module):  # a hub kernel layer: a forward for the same module
        def forward(self, hidden_states):
            return LlamaRMSNorm.forward(self, hidden_states)

    norm = LlamaRMSNorm(8).train()
    replace(norm, Kernel, repo="some/repo")
    assert hub_kernel_forward_is_recognised(norm), (
        f"kernels' _replace_forward no longer sets `{hub_kernels.KERNEL_MARK}` beside the forward: update "
        "hf_msam.integrations.hub_kernels.KERNEL_MARK"
    )
    replace(norm, LlamaRMSNorm)  # back to the class's forward: the mark goes with it
    assert "forward" not in norm.__dict__ and not hub_kernels.hub_kernel_forward(norm)


def hub_kernel_forward_is_recognised(norm):
    return hub_kernels.hub_kernel_forward(norm) and internals.computes_like_llama_rms_norm(norm)


def test_the_norm_rule_applies_to_a_hub_kernel_norm_in_training_mode_only():
    norm = LlamaRMSNorm(8)
    norm.forward = types.MethodType(LlamaRMSNorm.forward, norm)  # a kernel computing the layer's function
    norm.__dict__[hub_kernels.KERNEL_MARK] = "some/repo"
    assert internals.computes_like_llama_rms_norm(norm.train())
    assert not internals.computes_like_llama_rms_norm(norm.eval())  # an inference kernel may have no backward
    del norm.__dict__[hub_kernels.KERNEL_MARK]  # a forward of someone else's: the fallback
    assert not internals.computes_like_llama_rms_norm(norm.train())


def test_a_mode_change_inside_a_pass_is_reported(llama_dir):
    """The re-kernelization happening inside a pass (a loss function that calls model.eval()): NotVectorizable,
    naming the module and the cause; the modules are left as kernelize left them."""
    if not KERNELIZED_BY_DEFAULT:
        pytest.skip("the model is not kernelized (transformers < 5.25 or no kernels package)")
    model = load(llama_dir).train()
    vec = Vectorizer(model, [p for p in model.parameters() if p.requires_grad])
    batch = stack(llama_data(4))
    with pytest.raises(NotVectorizable, match=r"LlamaRMSNorm\): its forward was removed.*kernelize"):
        with vec.capture(GroupLayout.rows([2, 2])):
            model.eval()
            model(**batch)
    assert not any("forward" in m.__dict__ for m in model.modules())


# ---------------------------------------------------------------------------------------------
# A forward changed by someone else during the step
# ---------------------------------------------------------------------------------------------


def _wrap(module):
    """accelerate's hooks: a new instance forward that calls the one it found."""
    inner = module.forward

    def hooked(*args, **kwargs):
        return inner(*args, **kwargs)

    module.forward = hooked
    return hooked


def _remove(module):
    """kernels' kernelize falling back to the class: the instance forward deleted."""
    module.__dict__.pop("forward", None)


def _replace(module):
    """kernels' kernelize choosing a kernel: another forward for the same layer."""
    module.forward = types.MethodType(torch.nn.Linear.forward, module)
    return module.forward


@pytest.mark.parametrize("change", [_wrap, _remove, _replace], ids=["wrapped", "removed", "replaced"])
@pytest.mark.parametrize("found", [False, True], ids=["class-forward", "instance-forward"])
def test_a_forward_changed_during_the_pass_gives_the_reference_step(change, found):
    model = MLP().double()
    reference = copy.deepcopy(model)  # before the wrapping: a copied wrapper would call the original's layer
    own = _wrap(model.fc1) if found else None  # an instance forward of someone else's before the step
    batch = stack(mlp_dataset(6))
    want = msam_gradient(reference, batch, 2, 0.1)
    sam = MicroBatchSAM(model, rho=0.1, micro_batch_size=2, vectorize="auto")
    theirs = []

    def loss_fn(mb, info):
        if info.point == "clean" and not theirs:
            theirs.append(change(model.fc1))
        return model(**mb)["loss"]

    sam.backward(batch, loss_fn)
    assert sam.path == "sequential" and "fc1 (Linear): its forward was" in sam.path_reason
    for g, w in zip([p.grad for p in model.parameters()], want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-13)
    # The module as the other party left it: their forward stays, a removal stays removed.
    assert model.fc1.__dict__.get("forward") is theirs[0]
    x = batch["x"]
    with torch.no_grad():
        torch.testing.assert_close(model(x)["logits"], reference(x)["logits"], rtol=0, atol=0)
    del own


@pytest.mark.parametrize("found", [False, True], ids=["class-forward", "instance-forward"])
def test_undo_restores_exactly_what_it_found(found):
    model = MLP().double()
    own = _wrap(model.fc1) if found else None
    vec = Vectorizer(model, list(model.parameters()))
    batch = stack(mlp_dataset(4))
    with vec.capture(GroupLayout.rows([2, 2])):
        assert model.fc1.__dict__.get("forward") not in (None, own)  # routed
        model(**batch)
    assert model.fc1.__dict__.get("forward") is own
    assert ("forward" in model.fc1.__dict__) is found


def test_an_exception_on_its_way_is_not_replaced_by_the_undo():
    model = MLP().double()
    sam = MicroBatchSAM(model, rho=0.1, micro_batch_size=2, vectorize="on")

    def loss_fn(mb, info):
        _remove(model.fc1)
        _remove(model.fc2)
        raise RuntimeError("the user's loss failed")

    with pytest.raises(RuntimeError, match="the user's loss failed"):
        sam.backward(stack(mlp_dataset(4)), loss_fn)
    assert "forward" not in model.fc1.__dict__ and "forward" not in model.fc2.__dict__


def test_set_on_instance_undo():
    class Box:
        pass

    box = Box()
    undo = set_on_instance(box, "f", 1)
    assert box.f == 1 and undo() and "f" not in box.__dict__
    box.f = 0
    undo = set_on_instance(box, "f", 1)
    assert undo() and box.f == 0
    undo = set_on_instance(box, "f", 1)
    box.f = 2  # someone else's, set in between: stays
    assert not undo() and box.f == 2
    undo = set_on_instance(box, "f", 1)
    del box.f  # removed in between: stays removed
    assert not undo() and "f" not in box.__dict__
