"""Flat-LoRA (`--msam_method flat_lora`) against references written here from the paper (Li et al., ICML 2025).

The references never call the rule's forward: they build each LoRA layer's merged weight W + ε + s·BA by hand (or
hand PyTorch W + ε through `torch.func.functional_call`) and differentiate that. ε itself comes from the documented
recipe: a float32 standard normal from a `torch.Generator` seeded with `flat_lora_seed(seed, step, micro-batch,
rank, layer)`, times σ_t·‖(W + s·BA)_i‖/√n, with the row norms and σ_t computed in the test.
"""

import copy
import math

import pytest
import torch
import internals
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

from hf_msam import MicroBatchSAM, MSAMTrainer, MSAMTrainingArguments, PerturbationRule
from hf_msam.methods.flat_lora import FlatLoRAPerturbation, flat_lora_seed, flat_lora_sigma

peft = pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model  # noqa: E402

LR = 0.5


# ---------------------------------------------------------------------------------------------
# The reference, from the paper
# ---------------------------------------------------------------------------------------------


def sigma_ref(sigma, t, T):
    """The paper's schedule: σ_t = σ·½(1 − cos(π·(t − 1)/T)), t the 1-based optimizer step."""
    return sigma * 0.5 * (1 - math.cos(math.pi * (t - 1) / T))


def lora_modules(model):
    return [m for m in model.modules() if isinstance(m, peft.tuners.lora.Linear)]


def eps_ref(layer, sigma_t, seed, step, index, layer_number, rank=0):
    """ε of one layer by the documented recipe; the row scale from W + s·BA computed here in float64."""
    w = layer.base_layer.weight.detach().double()
    a, b = layer.lora_A["default"].weight.detach().double(), layer.lora_B["default"].weight.detach().double()
    merged = w + layer.scaling["default"] * (b @ a)
    std = sigma_t * merged.norm(dim=1) / math.sqrt(w.shape[1])
    g = torch.Generator().manual_seed(flat_lora_seed(seed, step, index, rank, layer_number))
    z = torch.randn(w.shape, generator=g, dtype=torch.float32).double()
    return (z * std[:, None]).to(layer.base_layer.weight.dtype)


class TwoLayer(nn.Module):
    def __init__(self, d_in=5, d_hidden=7, d_out=3):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d_in, d_hidden), nn.Linear(d_hidden, d_out)

    def forward(self, x, y=None):
        out = self.fc2(torch.tanh(self.fc1(x)))
        return out if y is None else ((out - y) ** 2).mean()


def tiny_lora(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    model = TwoLayer().to(dtype)
    return get_peft_model(model, LoraConfig(r=2, lora_alpha=3, lora_dropout=0.0, target_modules=["fc1", "fc2"],
                                            init_lora_weights=False))


def hand_loss(model, eps, x, y):
    """The loss with every layer's weight W + ε + s·BA built by hand: plain tensors, no module forward."""
    (l1, l2), (e1, e2) = lora_modules(model), eps

    def merged(layer, e):
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        return layer.base_layer.weight + e + layer.scaling["default"] * (b @ a), layer.base_layer.bias

    w1, b1 = merged(l1, e1)
    w2, b2 = merged(l2, e2)
    out = torch.tanh(x @ w1.T + b1) @ w2.T + b2
    return ((out - y) ** 2).mean()


def adapters(model):
    """The trainable parameters: the LoRA adapters (and a SEQ_CLS model's classifier head, which PEFT trains)."""
    return [p for p in model.parameters() if p.requires_grad]


def bases(model):
    return [m.base_layer.weight for m in lora_modules(model)]


# ---------------------------------------------------------------------------------------------
# The noise
# ---------------------------------------------------------------------------------------------


def test_noise_rows_have_std_sigma_row_norm_over_sqrt_n():
    torch.manual_seed(0)
    out_features, n = 256, 4096
    model = get_peft_model(nn.Sequential(nn.Linear(n, out_features)), LoraConfig(r=4, lora_alpha=8, target_modules=["0"],
                                                                                init_lora_weights=False))
    layer = lora_modules(model)[0]
    with torch.no_grad():  # rows of very different norms, and an adapter that changes them
        layer.base_layer.weight.mul_(torch.logspace(-2, 1, out_features)[:, None])
        layer.lora_B["default"].weight.normal_(0, 0.5)
    sigma = 0.05
    rule = FlatLoRAPerturbation(sigma, "constant", seed=3)
    (eps,) = rule.noise_of(model, step=5, index=0)
    w = layer.base_layer.weight.double()
    merged = w + layer.scaling["default"] * (layer.lora_B["default"].weight.double() @ layer.lora_A["default"].weight.double())
    expected_std = sigma * merged.norm(dim=1) / math.sqrt(n)
    assert not torch.allclose(merged.norm(dim=1), w.norm(dim=1), rtol=1e-2)  # the adapter matters to the scale
    z = eps.double() / expected_std[:, None]  # should be N(0, 1), every row
    row_std = z.std(dim=1)
    # A sample std of n = 4096 normals has relative standard error 1/sqrt(2n) = 0.011: every one of the 256 rows within
    # 5 standard errors (0.055), and their mean (standard error 0.011/16 = 0.0007) within 0.004.
    assert (row_std - 1).abs().max() < 5 / math.sqrt(2 * n)
    assert abs(row_std.mean() - 1) < 5 / math.sqrt(2 * n * out_features)
    # Each row's mean: standard error 1/sqrt(n) = 0.016; pooled over all 1M entries, 0.001.
    assert z.mean(dim=1).abs().max() < 5 / math.sqrt(n)
    assert abs(z.mean()) < 5 / math.sqrt(n * out_features)
    # Gaussian, not just scaled: the share within one std is 0.6827 (standard error sqrt(p(1-p)/N) = 0.00045).
    share = (z.abs() < 1).double().mean()
    assert abs(share - 0.682689) < 5 * math.sqrt(0.682689 * 0.317311 / z.numel())
    # And exactly the documented recipe's numbers.
    torch.testing.assert_close(eps, eps_ref(layer, sigma, 3, 5, 0, 0), rtol=1e-6, atol=0)


def test_noise_is_regenerated_from_the_seed():
    model = tiny_lora()
    rule = FlatLoRAPerturbation(0.1, "constant", seed=11)
    first = rule.noise_of(model, step=3, index=1)
    again = FlatLoRAPerturbation(0.1, "constant", seed=11).noise_of(model, step=3, index=1)  # a fresh rule: no state
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert all(not torch.allclose(a, b) for a, b in zip(first, first[::-1]) if a.shape == b.shape)
    for other in (rule.noise_of(model, step=4, index=1), rule.noise_of(model, step=3, index=0),
                  FlatLoRAPerturbation(0.1, "constant", seed=12).noise_of(model, step=3, index=1),
                  FlatLoRAPerturbation(0.1, "constant", seed=11, rank=1).noise_of(model, step=3, index=1)):
        for a, b in zip(first, other):
            assert (a - b).abs().max() > 0.1 * a.abs().max()  # independent draws, not the same numbers
    # Two layers of one pass draw independently too.
    assert flat_lora_seed(11, 3, 1, 0, 0) != flat_lora_seed(11, 3, 1, 0, 1)


def test_sigma_schedule_follows_the_formula():
    T, sigma = 10, 0.05
    for t in range(1, T + 1):
        assert flat_lora_sigma(sigma, "cosine", t, T) == pytest.approx(sigma_ref(sigma, t, T), rel=1e-15, abs=1e-18)
        assert flat_lora_sigma(sigma, "constant", t, T) == sigma
    assert flat_lora_sigma(sigma, "cosine", 1, T) == 0  # the first step is clean
    assert flat_lora_sigma(sigma, "cosine", 6, T) == pytest.approx(sigma / 2, rel=1e-15)  # half-way, half of σ
    assert flat_lora_sigma(sigma, "cosine", 10, T) == pytest.approx(sigma * (1 + math.cos(math.pi / 10)) / 2, rel=1e-15)
    with pytest.raises(ValueError, match="max_steps"):
        flat_lora_sigma(sigma, "cosine", 2, None)


# ---------------------------------------------------------------------------------------------
# One step
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("micro_batch_size", [None, 2])
def test_step_gradient_equals_hand_written_merged_weight_reference(micro_batch_size):
    model = tiny_lora()
    reference = copy.deepcopy(model)
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randn(6, 3, generator=g, dtype=torch.float64)
    sigma, step, T, seed = 0.3, 4, 10, 7
    rule = FlatLoRAPerturbation(sigma, "cosine", seed=seed, max_steps=T)
    sam = MicroBatchSAM(model, micro_batch_size=micro_batch_size, perturbation=rule)
    loss = sam.backward({"x": x, "y": y}, lambda mb: model(**mb), step=step)

    sigma_t = sigma_ref(sigma, step, T)
    size = micro_batch_size or 6
    expected = [torch.zeros_like(p) for p in adapters(reference)]
    expected_loss = 0.0
    for j, s in enumerate(range(0, 6, size)):
        eps = [eps_ref(m, sigma_t, seed, step, j, i) for i, m in enumerate(lora_modules(reference))]
        loss_j = hand_loss(reference, eps, x[s : s + size], y[s : s + size])
        grads = torch.autograd.grad(loss_j, adapters(reference))
        for e, g_j in zip(expected, grads):
            e.add_(g_j, alpha=size / 6)
        expected_loss += loss_j.detach() * size / 6
    got = [p.grad for p in adapters(model)]
    assert all(float(e.abs().max()) > 1e-3 for e in expected)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    torch.testing.assert_close(loss, expected_loss, rtol=0, atol=1e-12)  # the loss at the noisy weights
    # The noise changed the gradient (by far more than the tolerance): the clean gradient is another number.
    clean = torch.autograd.grad(reference(x, y), adapters(reference))
    assert max(float((a - c).abs().max()) for a, c in zip(got, clean)) > 1e-4
    # Nothing of the frozen base moved.
    for a, b in zip(bases(model), bases(reference)):
        assert torch.equal(a, b)


def reference_gradient(model, x, y, sizes, sigma_t, seed, step, first=0):
    """Σ_j c_j ∇_{A,B} L_j at W + ε_j + s·BA (`hand_loss`), in float64 whatever the model's dtype: ε_j of micro-batch
    first + j of the step from the recipe (in the model's dtype, as the rule draws it), the rest of the arithmetic
    here."""
    model = copy.deepcopy(model).double()
    layers = lora_modules(model)
    n, start = x.shape[0], 0
    expected = [torch.zeros_like(p) for p in adapters(model)]
    for j, size in enumerate(sizes):
        eps = [eps_ref(m, sigma_t, seed, step, first + j, i).double() for i, m in enumerate(layers)]
        loss_j = hand_loss(model, eps, x[start : start + size].double(), y[start : start + size].double())
        for e, g_j in zip(expected, torch.autograd.grad(loss_j, adapters(model))):
            e.add_(g_j, alpha=size / n)
        start += size
    return expected


def relative_error(got, expected):
    return max(float((a.double() - b).norm() / b.norm()) for a, b in zip(got, expected))


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("micro_batch_size, sizes", [(4, [4, 3]), (3, [3, 3, 1])])  # k = 2, 3; the last one short
@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_vectorized_step_equals_reference_and_sequential_step(dtype, tolerance, micro_batch_size, sizes, schedule):
    """One forward and backward for all k micro-batches: micro-batch j's rows at W + ε_j in each base layer, ε_j the
    sequential step's (the same seeds), so `.grad` is the hand-written reference's, and the sequential step's."""
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(7, 5, generator=g, dtype=dtype), torch.randn(7, 3, generator=g, dtype=dtype)
    sigma, step, T, seed = 0.3, 4, 10, 7
    grads, losses = {}, {}
    for vectorize in ("off", "on"):
        model = tiny_lora(dtype=dtype)
        before = [w.detach().clone() for w in bases(model)]
        rule = FlatLoRAPerturbation(sigma, schedule, seed=seed, max_steps=T)
        sam = MicroBatchSAM(model, micro_batch_size=micro_batch_size, perturbation=rule, vectorize=vectorize)
        losses[vectorize] = sam.backward({"x": x, "y": y}, lambda mb: model(**mb), step=step)
        assert sam.path == {"off": "sequential", "on": "vectorized"}[vectorize]
        grads[vectorize] = [p.grad.clone() for p in adapters(model)]
        assert all(torch.equal(a, b) for a, b in zip(bases(model), before))  # the base weights never written
        assert not any("forward" in vars(m.base_layer) for m in lora_modules(model))
    sigma_t = sigma_ref(sigma, step, T) if schedule == "cosine" else sigma
    expected = reference_gradient(tiny_lora(dtype=dtype), x, y, sizes, sigma_t, seed, step)
    assert relative_error(grads["on"], expected) <= tolerance
    assert relative_error(grads["off"], expected) <= tolerance
    assert relative_error(grads["on"], [t.double() for t in grads["off"]]) <= tolerance
    torch.testing.assert_close(losses["on"], losses["off"], rtol=tolerance, atol=0)  # the loss at the noisy weights
    # The noise mattered, by far more than the tolerance: without it the gradient is another one.
    clean = reference_gradient(tiny_lora(dtype=dtype), x, y, sizes, 0.0, seed, step)
    assert relative_error(expected, clean) > 1e-3


@pytest.mark.parametrize("vectorize", ["off", "on"])
def test_accumulation_calls_of_one_step_draw_their_own_noise(vectorize):
    """Two accumulation calls of optimizer step 3 (micro-batches of 2: sizes 2, 2, 1, then 2, 2) are micro-batches
    0-2 and 3-4 of the step, each with its own ε; a call that raised before them used up no number."""
    g = torch.Generator().manual_seed(9)
    x1, y1 = torch.randn(5, 5, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g, dtype=torch.float64)
    x2, y2 = torch.randn(4, 5, generator=g, dtype=torch.float64), torch.randn(4, 3, generator=g, dtype=torch.float64)
    model = tiny_lora()
    sam = MicroBatchSAM(model, micro_batch_size=2, perturbation=FlatLoRAPerturbation(0.3, "constant", seed=2),
                        vectorize=vectorize)

    def failing(mb, info):
        if info.point == "perturbed":
            raise RuntimeError("boom in a perturbed pass")
        return model(**mb)

    with pytest.raises(RuntimeError, match="boom"):
        sam.backward({"x": x1, "y": y1}, failing, step=3)
    assert all(p.grad is None for p in adapters(model))
    sam.backward({"x": x1, "y": y1}, lambda mb: model(**mb), step=3)
    sam.backward({"x": x2, "y": y2}, lambda mb: model(**mb), step=3)
    assert sam.path == {"off": "sequential", "on": "vectorized"}[vectorize]
    start = tiny_lora()
    first = reference_gradient(start, x1, y1, [2, 2, 1], 0.3, 2, 3)
    second = reference_gradient(start, x2, y2, [2, 2], 0.3, 2, 3, first=3)
    expected = [a + b for a, b in zip(first, second)]
    assert relative_error([p.grad for p in adapters(model)], expected) <= 1e-10
    # Numbering each call from 0 again (the same ε in both calls) is another gradient, by far.
    again = reference_gradient(start, x2, y2, [2, 2], 0.3, 2, 3, first=0)
    assert relative_error([a + b for a, b in zip(first, again)], expected) > 1e-4


def test_vectorized_pass_keeps_no_noisy_weight_for_the_backward():
    """The k noisy weights W + ε_j of a layer are formed in its forward and again in its backward: nothing of shape
    [k, out, in] is saved for the backward."""
    model = tiny_lora()
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    sam = MicroBatchSAM(model, micro_batch_size=2, perturbation=FlatLoRAPerturbation(0.3, "constant", seed=1),
                        vectorize="on")
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        sam.backward({"x": x, "y": y}, lambda mb: model(**mb), step=1)
    assert sam.path == "vectorized" and saved
    stacked = {(3, *w.shape) for w in bases(model)}
    assert not stacked & set(saved)


def test_the_first_vectorized_steps_checking_forward_is_freed_before_the_perturbed_pass():
    """Without a clean pass, the first vectorized step makes one forward to check the model; its graph (the whole
    batch's activations) must be gone when the perturbed pass runs, or the first step's peak holds two of them."""
    import gc
    import weakref

    class Marked(torch.Tensor):  # an input whose product with the first layer's weights the graph keeps
        pass

    model = tiny_lora()
    sam = MicroBatchSAM(model, micro_batch_size=2, perturbation=FlatLoRAPerturbation(0.3, "constant"), vectorize="on")
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    checking, alive = [], []

    def loss_fn(mb, info):
        if info.point == "clean":
            h = (mb["x"] * 1.0).as_subclass(Marked)
            checking.append(weakref.ref(h))
            return model(h, mb["y"]).as_subclass(torch.Tensor)
        gc.collect()
        alive.append(checking[0]() is not None)
        return model(**mb)

    sam.backward({"x": x, "y": y}, loss_fn, step=1)
    assert sam.path == "vectorized" and len(checking) == 1 and alive == [False]


def test_a_rule_perturbing_without_perturbing_groups_takes_the_sequential_path():
    class Sequential(FlatLoRAPerturbation):
        perturbing_groups = PerturbationRule.perturbing_groups  # only the sequential hook of its own

    model = tiny_lora()
    x, y = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    sam = MicroBatchSAM(model, micro_batch_size=2, perturbation=Sequential(0.3, "constant"), vectorize="auto")
    sam.backward({"x": x, "y": y}, lambda mb: model(**mb), step=1)
    assert sam.path == "sequential" and "perturbing_groups" in sam.path_reason


def test_bf16_base_noise_is_drawn_in_float32_and_added_in_bf16():
    model = tiny_lora(dtype=torch.float32)
    for m in lora_modules(model):
        m.base_layer.to(torch.bfloat16)
    rule = FlatLoRAPerturbation(0.2, "constant", seed=1)
    eps = rule.noise_of(model, step=2, index=0)
    for e, m in zip(eps, lora_modules(model)):
        assert e.dtype == torch.bfloat16
        # The same float32 draw as for float32 weights, rounded once to bf16 (relative error <= 2^-8).
        ref = eps_ref(m, 0.2, 1, 2, 0, lora_modules(model).index(m)).float()
        torch.testing.assert_close(e.float(), ref, rtol=2**-8, atol=0)


def test_weights_bitwise_unchanged_after_a_step_and_after_an_exception():
    model = tiny_lora()
    before = [w.detach().clone() for w in bases(model)]
    versions = [w._version for w in bases(model)]
    x, y = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    sam = MicroBatchSAM(model, micro_batch_size=2, perturbation=FlatLoRAPerturbation(0.5, "constant", seed=0))
    sam.backward({"x": x, "y": y}, lambda mb: model(**mb), step=1)
    assert all(torch.equal(a, b) for a, b in zip(bases(model), before))
    assert [w._version for w in bases(model)] == versions  # never written, not even written back
    assert not any("forward" in vars(m.base_layer) for m in lora_modules(model))
    grads_after_one = [p.grad.clone() for p in adapters(model)]

    calls = []

    def failing(mb, info):
        calls.append(info.index)
        loss = model(**mb)
        if info.index == 1:
            raise RuntimeError("boom in the pass of micro-batch 1")
        return loss

    with pytest.raises(RuntimeError, match="boom"):
        sam.backward({"x": x, "y": y}, failing, step=2)
    assert calls == [0, 1]
    assert all(torch.equal(a, b) for a, b in zip(bases(model), before))
    assert [w._version for w in bases(model)] == versions
    assert not any("forward" in vars(m.base_layer) for m in lora_modules(model))
    # After the failure, forward is the clean model again.
    with torch.no_grad():
        torch.testing.assert_close(model(x, y), hand_loss(model, [torch.zeros_like(w) for w in before], x, y), rtol=0, atol=1e-14)
    del grads_after_one


# ---------------------------------------------------------------------------------------------
# Refusals
# ---------------------------------------------------------------------------------------------


def tiny_bert(seed=0):
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=2,
    )
    return BertForSequenceClassification(config).double()


def bert_data(n, seq_len=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 40, (n, seq_len), generator=g)
    mask = torch.ones(n, seq_len, dtype=torch.long)
    mask[::3, -2:] = 0
    labels = torch.randint(0, 2, (n,), generator=g)
    return [{"input_ids": ids[i], "attention_mask": mask[i], "labels": labels[i]} for i in range(n)]


def lora_bert(seed=0):
    lora = LoraConfig(task_type="SEQ_CLS", r=2, lora_alpha=4, lora_dropout=0.0, target_modules=["query", "value"],
                      init_lora_weights=False)
    return get_peft_model(tiny_bert(seed), lora).double()


def flat_args(tmp_path, **kwargs):
    settings = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=3, optim="sgd", learning_rate=LR,
        lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0, train_sampling_strategy="sequential",
        report_to="none", use_cpu=True, save_strategy="no", logging_strategy="no", msam_method="flat_lora",
        msam_flat_lora_sigma=0.2, seed=3,
    )
    settings.update(kwargs)
    return MSAMTrainingArguments(**settings)


def test_refused_without_lora_layers(tmp_path):
    with pytest.raises(ValueError, match=r"--msam_method flat_lora .*has none: wrap the model with PEFT LoRA"):
        MSAMTrainer(model=tiny_bert(), args=flat_args(tmp_path), train_dataset=bert_data(4)).train()
    with pytest.raises(ValueError, match="--msam_method flat_lora"):
        MicroBatchSAM(TwoLayer(), perturbation=FlatLoRAPerturbation())
    with pytest.raises(ValueError, match="--msam_sync_perturbation does not combine with --msam_method flat_lora"):
        flat_args(tmp_path, msam_sync_perturbation=True)
    with pytest.raises(ValueError, match="--msam_flat_lora_sigma"):
        flat_args(tmp_path, msam_flat_lora_sigma=-0.1)
    with pytest.raises(ValueError, match="--msam_flat_lora_schedule"):
        flat_args(tmp_path, msam_flat_lora_schedule="linear")


# ---------------------------------------------------------------------------------------------
# Through the Trainer
# ---------------------------------------------------------------------------------------------


def functional_reference_steps(model, data, steps, sigma, seed, T, micro_batch_size=None):
    """SGD on the adapters with each step's gradient at W + ε (ε from the recipe), through functional_call: the
    model's own modules with their base weights swapped for W + ε, no hf_msam code in the forward."""
    model = copy.deepcopy(model)
    batch = {k: torch.stack([d[k] for d in data]) for k in data[0]}
    n = len(data)
    size = micro_batch_size or n
    layers = lora_modules(model)
    names = {id(p): name for name, p in model.named_parameters()}
    for t in range(1, steps + 1):
        sigma_t = sigma_ref(sigma, t, T)
        total = [torch.zeros_like(p) for p in adapters(model)]
        for j, s in enumerate(range(0, n, size)):
            eps = [eps_ref(m, sigma_t, seed, t, j, i) for i, m in enumerate(layers)]
            swapped = {names[id(m.base_layer.weight)]: m.base_layer.weight + e for m, e in zip(layers, eps)}
            mb = {k: v[s : s + size] for k, v in batch.items()}
            loss = torch.func.functional_call(model, swapped, args=(), kwargs=mb).loss
            for acc, g in zip(total, torch.autograd.grad(loss, adapters(model))):
                acc.add_(g, alpha=min(size, n - s) / n)
        with torch.no_grad():
            for p, g in zip(adapters(model), total):
                p.sub_(LR * g)
    return model


@pytest.mark.parametrize("vectorize, path, checkpointing", [
    ("off", "sequential", False), ("auto", "vectorized", False),
    ("auto", "vectorized", True),  # the backward recomputes the base layers: the same noise, from the same seeds
])
def test_trainer_on_lora_bert_equals_reference(tmp_path, vectorize, path, checkpointing):
    model, data = lora_bert(), bert_data(4)
    expected = functional_reference_steps(model, data, steps=3, sigma=0.2, seed=3, T=3, micro_batch_size=2)
    plain = functional_reference_steps(model, data, steps=3, sigma=0.0, seed=3, T=3)
    args = flat_args(tmp_path, msam_micro_batch_size=2, msam_vectorize=vectorize,
                     activation_checkpointing=checkpointing)
    trainer = MSAMTrainer(model=model, args=args, train_dataset=data)
    trainer.train()
    assert trainer.msam_perturbation.max_steps == 3 and trainer.msam_engine.path == path, trainer.msam_engine.path_reason
    assert model.is_activation_checkpointing == checkpointing
    gaps = []
    for a, b, c in zip(adapters(model), adapters(expected), adapters(plain)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
        gaps.append(float((b - c).detach().abs().max()))
    assert max(gaps) > 1e-6  # the noise changed the run (by 1.0e-4 here), by far more than the tolerance
    for m, r in zip(lora_modules(model), lora_modules(expected)):
        assert torch.equal(m.base_layer.weight, r.base_layer.weight)


@pytest.mark.parametrize("vectorize, path", [("off", "sequential"), ("auto", "vectorized")])
def test_resume_equals_uninterrupted_run(tmp_path, vectorize, path):
    data = bert_data(8)
    common = dict(max_steps=4, msam_micro_batch_size=2, per_device_train_batch_size=4, msam_vectorize=vectorize)
    full = lora_bert()
    trainer = MSAMTrainer(model=full, args=flat_args(tmp_path / "full", **common), train_dataset=data)
    trainer.train()
    assert trainer.msam_engine.path == path

    first = lora_bert()
    args = flat_args(tmp_path / "resumed", save_strategy="steps", save_steps=2, **common)
    MSAMTrainer(model=first, args=args, train_dataset=data).train()
    resumed = lora_bert()  # a fresh model, its adapters loaded from the checkpoint
    MSAMTrainer(model=resumed, args=args, train_dataset=data).train(resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-2"))
    for a, b in zip(adapters(full), adapters(resumed)):
        assert torch.equal(a, b)
    assert any(not torch.equal(a, b) for a, b in zip(adapters(full), adapters(lora_bert())))
    noiseless = lora_bert()  # the noise mattered: without it the run ends elsewhere
    MSAMTrainer(model=noiseless, args=flat_args(tmp_path / "plain", msam_flat_lora_sigma=0.0, **common), train_dataset=data).train()
    assert max(float((a - b).detach().abs().max()) for a, b in zip(adapters(full), adapters(noiseless))) > 1e-6


def test_gradient_accumulation_vectorized_equals_sequential_and_noise_matters(tmp_path):
    """2 accumulation steps of 4 examples, micro-batches of 3 (k = 2, the last one short): the vectorized run ends
    where the sequential one does (the sequential path is checked against the hand-written reference above)."""
    data = bert_data(16)
    common = dict(max_steps=2, msam_micro_batch_size=3, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                  msam_flat_lora_schedule="constant")
    runs = {}
    for vectorize in ("off", "on", "plain"):
        model = lora_bert()
        settings = dict(common, msam_vectorize="off" if vectorize == "plain" else vectorize)
        if vectorize == "plain":
            settings["msam_flat_lora_sigma"] = 0.0
        trainer = MSAMTrainer(model=model, args=flat_args(tmp_path / vectorize, **settings), train_dataset=data)
        trainer.train()
        if vectorize != "plain":  # sigma 0: plain Trainer steps, no engine
            assert trainer.msam_engine.path == ("vectorized" if vectorize == "on" else "sequential")
        runs[vectorize] = [p.detach().clone() for p in adapters(model)]
    assert relative_error(runs["on"], [t.double() for t in runs["off"]]) <= 1e-10
    start = [p.detach().clone() for p in adapters(lora_bert())]
    moved = [a - b for a, b in zip(runs["off"], start)]
    assert relative_error([a - b for a, b in zip(runs["on"], start)], moved) <= 1e-10  # of the update, not the weights
    assert max(float((a - b).abs().max()) for a, b in zip(runs["off"], runs["plain"])) > 1e-6


def test_trainer_step_makes_no_host_sync(tmp_path, monkeypatch):
    from reference import MLP, SYNCING, mlp_dataset

    calls, active = [], [False]
    for name in SYNCING:
        original = getattr(torch.Tensor, name)

        def counted(t, *args, __name=name, __original=original, **kwargs):
            if active[0]:
                calls.append(__name)
            return __original(t, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)

    class Counting(MSAMTrainer):
        def training_step(self, *args, **kwargs):
            active[0] = True
            try:
                return super().training_step(*args, **kwargs)
            finally:
                active[0] = False

    torch.manual_seed(0)
    model = get_peft_model(MLP(), LoraConfig(r=2, target_modules=["fc1", "fc2"], init_lora_weights=False))
    args = flat_args(tmp_path, per_device_train_batch_size=6, msam_micro_batch_size=4, disable_tqdm=True,
                     learning_rate=1e-2, optim="adamw_torch")
    trainer = Counting(model=model, args=args, train_dataset=mlp_dataset(18, dtype=torch.float32))
    trainer.train()
    assert internals.stats(trainer).micro_batches == 6  # 3 steps x 2 micro-batches, each with its own noise
    assert trainer.msam_engine.path == "vectorized"  # --msam_vectorize auto takes Flat-LoRA's one-pass step
    assert calls == []


def test_bf16_autocast_step_is_close_to_the_float32_reference():
    model = tiny_lora(dtype=torch.float32)
    reference = copy.deepcopy(model)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(8, 5, generator=g), torch.randn(8, 3, generator=g)
    rule = FlatLoRAPerturbation(0.3, "constant", seed=4)

    def loss_fn(mb):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(**mb)

    MicroBatchSAM(model, perturbation=rule).backward({"x": x, "y": y}, loss_fn, step=2)
    eps = [eps_ref(m, 0.3, 4, 2, 0, i) for i, m in enumerate(lora_modules(reference))]
    expected = torch.autograd.grad(hand_loss(reference, eps, x, y), adapters(reference))
    for a, b in zip(adapters(model), expected):
        assert a.grad.dtype == torch.float32
        # bf16 keeps 8 bits of mantissa: agreement to a few per cent of the gradient's scale.
        torch.testing.assert_close(a.grad, b, rtol=0, atol=0.03 * float(b.abs().max()))
