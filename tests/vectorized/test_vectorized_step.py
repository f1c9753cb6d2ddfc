"""The vectorized mSAM step (`--msam_vectorize on`) against the sequential one and against the plain-PyTorch reference:
the same update for every method, with padding, uneven micro-batches, token weights and accumulation; clear errors
where it cannot run; `auto` falls back and says why."""

import copy

import pytest
import torch
import internals
from reference import MLP, mlp_dataset, msam_gradient
from test_registry import llama_data, tiny_llama
from test_vectorized_arch import causal_lm_loss_in_logits_dtype, without_float32_casts
from test_trainer_reference import LR, TIGHT, bert_data, expected_after_step, sgd_args, stack, tiny_bert, trainable

from hf_msam import MicroBatchSAM, MSAMTrainer

METHODS = [
    dict(msam_method="sam"),
    dict(msam_method="sam", msam_adaptive=True, msam_rho=0.5),
    dict(msam_method="gsam", msam_gsam_alpha=0.4),
    dict(msam_method="fsam", msam_fsam_lambda=0.8),
    dict(msam_method="looksam", msam_looksam_k=2),
    dict(msam_method="momentum"),
]


def train(model, data, tmp_path, vectorize, steps=2, batch_size=7, micro_batch_size=3, **kwargs):
    kwargs = {"msam_rho": 0.1, **kwargs}
    args = sgd_args(tmp_path / vectorize, batch_size, msam_micro_batch_size=micro_batch_size, msam_vectorize=vectorize, **kwargs)
    args.max_steps = steps
    if kwargs.get("msam_method") == "momentum":
        args.optim_args = "momentum=0.9"
    trainer = MSAMTrainer(model=model, args=args, train_dataset=data)
    trainer.train()
    return trainer


@pytest.mark.parametrize("method", METHODS, ids=lambda m: "-".join(str(v) for v in m.values()))
def test_bert_with_padding_every_method_matches_the_sequential_step(tmp_path, method):
    data = bert_data(14)  # two steps of 7 rows: micro-batches of 3, 3, 1
    on, off = tiny_bert(), tiny_bert()
    vectorized = train(on, data, tmp_path, "on", **method)
    train(off, data, tmp_path, "off", **method)
    assert vectorized.msam_engine.path == "vectorized"
    assert any(not torch.equal(a, b) for a, b in zip(trainable(on), trainable(tiny_bert())))
    for a, b in zip(trainable(on), trainable(off)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


def test_one_step_equals_the_plain_pytorch_reference(tmp_path):
    data = bert_data(7)
    model, reference = tiny_bert(), tiny_bert()
    expected = expected_after_step(reference, msam_gradient(reference, stack(data), 3, 0.1))
    train(model, data, tmp_path, "on", steps=1)
    for a, b in zip(trainable(model), expected):
        torch.testing.assert_close(a, b, **TIGHT)


def test_token_weighted_causal_lm_with_accumulation(tmp_path, monkeypatch):
    """Llama (tied embeddings), label tokens differing per row, num_items_in_batch over 2 accumulation steps: `auto`
    takes the vectorized step (Llama's RMSNorm through the torch.func fallback), and its update is the sequential
    one to 1e-10.

    transformers computes parts of a float64 Llama in float32 (RMSNorm's `.to(torch.float32)`, ForCausalLMLoss's
    `logits.float()`): a float32 rounding turns the two paths' 1e-16 differences into ~1e-7 ones (1.7e-5 relative
    on these weights). Those casts are patched out, for both paths alike, so that float64 means float64."""
    without_float32_casts(monkeypatch)
    data = llama_data(12)
    on, off = tiny_llama(), tiny_llama()
    for model in (on, off):
        model.config.tie_word_embeddings = True
        model.tie_weights()
        model.loss_function = causal_lm_loss_in_logits_dtype
    vectorized = train(on, data, tmp_path, "auto", steps=2, batch_size=3, micro_batch_size=2, gradient_accumulation_steps=2)
    train(off, data, tmp_path, "off", steps=2, batch_size=3, micro_batch_size=2, gradient_accumulation_steps=2)
    assert vectorized.msam_engine.path == "vectorized", vectorized.msam_engine.path_reason
    assert any(not torch.equal(a, b) for a, b in zip(trainable(on), trainable(tiny_llama())))
    for a, b in zip(trainable(on), trainable(off)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


def test_token_weighted_causal_lm_float32_casts_kept(tmp_path):
    """The same with transformers' float32 casts left in: the paths then agree as float32 computations do. Compared
    on the updates w_after - w_before, per parameter, to 1e-5 relative (the float32 tolerance of
    tests/vectorized/test_vectorized_arch.py; measured 1.6e-7), which the weights themselves (1e-1 and larger) would hide."""
    data = llama_data(12)
    on, off = tiny_llama(), tiny_llama()
    before = trainable(tiny_llama())
    vectorized = train(on, data, tmp_path, "auto", steps=2, batch_size=3, micro_batch_size=2, gradient_accumulation_steps=2)
    train(off, data, tmp_path, "off", steps=2, batch_size=3, micro_batch_size=2, gradient_accumulation_steps=2)
    assert vectorized.msam_engine.path == "vectorized"
    for a, b, w in zip(trainable(on), trainable(off), before):
        assert (a - b).norm() <= 1e-5 * (b - w).norm()


def test_float32_agrees_to_single_precision(tmp_path):
    data = bert_data(7)
    on, off = tiny_bert().float(), tiny_bert().float()
    train(on, data, tmp_path, "on", steps=1)
    train(off, data, tmp_path, "off", steps=1)
    for a, b in zip(trainable(on), trainable(off)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_on_refuses_batchnorm_in_train_mode_naming_it(tmp_path):
    with pytest.raises(ValueError, match="BatchNorm"):
        train(MLP(batch_norm=True).double(), mlp_dataset(8), tmp_path, "on", steps=1, batch_size=8, micro_batch_size=4)


def test_auto_falls_back_and_says_why(tmp_path, caplog):
    trainer = train(MLP(batch_norm=True).double(), mlp_dataset(8), tmp_path, "auto", steps=1, batch_size=8, micro_batch_size=4)
    assert trainer.msam_engine.path == "sequential" and "BatchNorm" in trainer.msam_engine.path_reason
    assert "one pass per micro-batch (sequential), because BatchNorm" in caplog.text


def test_single_process_synchronized_perturbations_are_the_device_local_step():
    """One process: the union of the devices' j-th micro-batches is this one's (two processes: tests/engine/test_sync.py)."""
    batch = stack(mlp_dataset(5))
    grads = []
    for vectorize in ("on", "off"):
        torch.manual_seed(0)
        sam = MicroBatchSAM(MLP().double(), micro_batch_size=2, sync_perturbation=True, vectorize=vectorize)
        sam.backward(batch, lambda mb: sam.model(**mb)["loss"])
        assert sam.path == ("vectorized" if vectorize == "on" else "sequential")
        grads.append([p.grad for p in sam.model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


def test_not_decomposable_loss_falls_back(tmp_path):
    """A loss that is not Σ_j c_j L_j (here: the batch's max example loss) must not take the vectorized step."""
    model = MLP().double()
    sam = MicroBatchSAM(model, micro_batch_size=2, vectorize="auto")
    batch = stack(mlp_dataset(4))
    sam.backward(batch, lambda mb: model(**mb)["loss"], decomposable=False)
    assert sam.path == "sequential" and "weighted sum" in sam.path_reason


def test_weights_are_never_written_even_when_the_descent_raises(tmp_path):
    model = MLP().double()
    before = copy.deepcopy(model.state_dict())
    sam = MicroBatchSAM(model, rho=0.5, micro_batch_size=2, vectorize="on")
    calls = []

    def loss_fn(mb, info):
        calls.append(info.point)
        if info.point == "perturbed":
            raise RuntimeError("boom")
        return model(**mb)["loss"]

    with pytest.raises(RuntimeError, match="boom"):
        sam.backward(stack(mlp_dataset(4)), loss_fn)
    assert calls == ["clean", "perturbed"]  # one clean pass and one perturbed pass for both micro-batches
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_lora_adapters_only(tmp_path):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"], lora_dropout=0.0)
    on, off = peft.get_peft_model(tiny_bert(), config), peft.get_peft_model(tiny_bert(), config)
    off.load_state_dict(on.state_dict())
    data = bert_data(7)
    vectorized = train(on, data, tmp_path, "on", steps=1, msam_rho=0.5)
    train(off, data, tmp_path, "off", steps=1, msam_rho=0.5)
    assert vectorized.msam_engine.path == "vectorized"
    for a, b in zip(trainable(on), trainable(off)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("method", [*METHODS, dict(msam_method="functional")],
                         ids=lambda m: "-".join(str(v) for v in m.values()))
def test_gradient_checkpointing_every_method_matches_the_sequential_step(tmp_path, monkeypatch, method):
    """`--gradient_checkpointing` (transformers' non-reentrant default): the backward recomputes each decoder layer,
    its routed Linears and the RMSNorms the fallback runs included. `auto` takes the vectorized step, and the update
    after two steps with uneven micro-batches is the sequential one's to 1e-10 (float64, casts patched out as above)."""
    without_float32_casts(monkeypatch)
    data = llama_data(14)
    on, off = tiny_llama(), tiny_llama()
    for model in (on, off):
        model.loss_function = causal_lm_loss_in_logits_dtype
    vectorized = train(on, data, tmp_path, "auto", activation_checkpointing=True, **method)
    train(off, data, tmp_path, "off", activation_checkpointing=True, **method)
    assert on.is_gradient_checkpointing and vectorized.msam_engine.path == "vectorized", vectorized.msam_engine.path_reason
    assert any(not torch.equal(a, b) for a, b in zip(trainable(on), trainable(tiny_llama())))
    for a, b in zip(trainable(on), trainable(off)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


def test_gradient_checkpointing_capture_keeps_no_activations_of_the_checkpointed_layers(monkeypatch):
    """Under checkpointing the capture takes the groups' gradients from probes on the routed layers (zeros that
    autograd differentiates) instead of keeping each layer's input and output edge: nothing inside the
    checkpointed decoder layers is recorded, so the activations checkpointing frees stay freed. The per-group
    gradients are the same as without checkpointing (to 1e-12, float64, casts patched out)."""
    from hf_msam.vectorized import GroupLayout, Vectorizer

    def per_group(checkpointing: bool):
        torch.manual_seed(0)
        model = tiny_llama().double().train()
        if checkpointing:
            model.activation_checkpointing_enable()
        vec = Vectorizer(model, [p for p in model.parameters() if p.requires_grad])
        ids = torch.randint(3, model.config.vocab_size, (4, 6), generator=torch.Generator().manual_seed(1))
        with vec.capture(GroupLayout.rows([3, 1])) as cap:
            loss = model(input_ids=ids, labels=ids).loss
            recorded = internals.recorded_layers(cap)
            g = cap.group_gradients(loss)
        return recorded, g

    without_float32_casts(monkeypatch)
    plain_calls, plain = per_group(False)
    calls, probed = per_group(True)
    assert any(".layers." in name for name in plain_calls)
    assert calls and not any(".layers." in name for name in calls), calls  # embeddings, the final norm's input, lm_head
    for a, b in zip(probed, plain):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_torch_compile_through_the_trainer_matches_the_sequential_step(tmp_path):
    """`--torch_compile` (eager backend: dynamo without code generation, quick on a CPU): `auto` takes the
    vectorized step, whose routed layers run outside compilation, and the update is the uncompiled sequential
    step's to 1e-10."""
    import torch._dynamo

    torch._dynamo.reset()
    data = bert_data(14)
    on, off = tiny_bert(), tiny_bert()
    from torch._dynamo.utils import counters

    vectorized = train(on, data, tmp_path, "auto", torch_compile=True, torch_compile_backend="eager")
    assert counters["stats"]["unique_graphs"] > 0  # the trainer did compile the model
    torch._dynamo.reset()
    train(off, data, tmp_path, "off")
    assert vectorized.msam_engine.path == "vectorized", vectorized.msam_engine.path_reason
    assert any(not torch.equal(a, b) for a, b in zip(trainable(on), trainable(tiny_bert())))
    for a, b in zip(trainable(on), trainable(off)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)
