"""MicroBatchSAM on its own: hand-written loops, splitting, skipped perturbations, fp16 scaling, failures."""

import copy

import pytest
import torch
import internals
from accelerate import Accelerator
from reference import MLP, ScalerAccelerator, flat, mlp_dataset, msam_gradient, unflat

from hf_msam import MicroBatchSAM, split_batch
from hf_msam.msam import batch_size_of

TIGHT = dict(rtol=1e-10, atol=1e-13)


def batch_of(n, seed=0):
    data = mlp_dataset(n, seed=seed)
    return {k: torch.stack([d[k] for d in data]) for k in data[0]}


def model_loss(model):
    return lambda mb: model(**mb)["loss"]


def test_split_batch_slices_batch_tensors_and_passes_the_rest_through():
    batch = {"x": torch.arange(10).view(5, 2), "labels": torch.arange(5), "scale": torch.tensor(3.0), "table": torch.ones(7, 2), "name": "a"}
    parts = split_batch(batch, 2)
    assert [p["labels"].tolist() for p in parts] == [[0, 1], [2, 3], [4]]
    assert [p["x"].shape[0] for p in parts] == [2, 2, 1]
    assert all(p["scale"] is batch["scale"] and p["table"] is batch["table"] and p["name"] == "a" for p in parts)
    assert split_batch(batch, None) == [batch] and split_batch(batch, 5) == [batch]
    assert [t.tolist() for t, _ in split_batch((torch.arange(3), "k"), 2)] == [[0, 1], [2]]


def test_batch_without_tensors_cannot_be_split():
    with pytest.raises(ValueError, match="no tensor with a batch dimension"):
        batch_size_of({"text": ["a", "b"]})
    with pytest.raises(ValueError, match="micro_batch_size"):
        MicroBatchSAM(torch.nn.Linear(1, 1), micro_batch_size=0)


@pytest.mark.parametrize("micro_batch_size,adaptive", [(None, False), (3, False), (2, True)])
def test_hand_written_accelerate_loop_matches_reference_sgd(micro_batch_size, adaptive):
    torch.manual_seed(0)
    model = MLP().double()
    reference = copy.deepcopy(model)
    accelerator = Accelerator(cpu=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.3)
    model, optimizer = accelerator.prepare(model, optimizer)
    sam = MicroBatchSAM(model, rho=0.2, micro_batch_size=micro_batch_size, adaptive=adaptive, accelerator=accelerator)
    for step in range(3):
        batch = batch_of(7, seed=step)
        loss = sam.backward(batch, model_loss(model))
        optimizer.step()
        optimizer.zero_grad()

        with torch.no_grad():
            expected_loss = reference(**batch)["loss"]
        grads = msam_gradient(reference, batch, micro_batch_size, 0.2, adaptive=adaptive)
        with torch.no_grad():
            for p, g in zip(reference.parameters(), grads):
                p.sub_(0.3 * g)
        torch.testing.assert_close(loss, expected_loss, **TIGHT)  # the clean loss of the whole batch
        torch.testing.assert_close(flat(model.parameters()), flat(reference.parameters()), **TIGHT)
    assert sam.stats.micro_batches == 3 * len(split_batch(batch, micro_batch_size))


def test_backward_accumulates_into_existing_grad():
    """Gradient accumulation: the ascent pass must not zero or overwrite .grad (davda54/sam#62)."""
    torch.manual_seed(0)
    model = MLP().double()
    earlier = [torch.randn_like(p) for p in model.parameters()]
    for p, g in zip(model.parameters(), earlier):
        p.grad = g.clone()
    batch = batch_of(6)
    expected = msam_gradient(copy.deepcopy(model), batch, 2, 0.1)
    MicroBatchSAM(model, rho=0.1, micro_batch_size=2).backward(batch, model_loss(model))
    for p, e, g in zip(model.parameters(), earlier, expected):
        torch.testing.assert_close(p.grad, e + g, **TIGHT)


def test_enclosing_autocast_region_does_not_reuse_stale_weight_casts():
    """Inside one autocast region, casts of w are cached: the forward at w + e must not see the stale w."""
    torch.manual_seed(0)
    model = MLP(d_in=16, d_hidden=32)
    batch = {k: v.float() if v.is_floating_point() else v for k, v in batch_of(8).items()}
    batch["x"] = torch.randn(8, 16)

    def fresh_region_loss(m, mb):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return m(**mb)["loss"]

    expected = msam_gradient(copy.deepcopy(model), batch, 4, 0.5, loss_of=fresh_region_loss)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        MicroBatchSAM(model, rho=0.5, micro_batch_size=4).backward(batch, model_loss(model))
    torch.testing.assert_close(flat(p.grad for p in model.parameters()), flat(expected), rtol=1e-5, atol=1e-6)


class ScriptedLoss:
    """Model loss, except on chosen calls (1-based): 'zero' (no gradient), 'nan', or 'raise'."""

    def __init__(self, model, script):
        self.model, self.script, self.calls = model, script, 0

    def __call__(self, mb):
        self.calls += 1
        loss = self.model(**mb)["loss"]
        action = self.script.get(self.calls)
        if action == "zero":
            return loss * 0.0
        if action == "nan":
            return loss * float("nan")
        if action == "raise":
            raise RuntimeError("perturbed pass failed")
        return loss


@pytest.mark.parametrize("bad", ["zero", "nan"])
def test_zero_or_non_finite_ascent_gradient_skips_that_perturbation(bad):
    torch.manual_seed(0)
    model = MLP().double()
    batch = batch_of(6)
    clean = copy.deepcopy(model)
    plain_grad = torch.autograd.grad(clean(**{k: v[:3] for k, v in batch.items()})["loss"], list(clean.parameters()))
    second = msam_gradient(clean, {k: v[3:] for k, v in batch.items()}, None, 0.1)
    sam = MicroBatchSAM(model, rho=0.1, micro_batch_size=3)
    sam.backward(batch, ScriptedLoss(model, {1: bad}))  # call 1: the ascent pass of micro-batch 1
    assert sam.stats.skipped == 1 and sam.stats.micro_batches == 2
    # micro-batch 1 falls back to its plain gradient at w; micro-batch 2 is perturbed as usual
    expected = [0.5 * a + 0.5 * b for a, b in zip(plain_grad, second)]
    torch.testing.assert_close(flat(p.grad for p in model.parameters()), flat(expected), **TIGHT)


def test_exception_in_perturbed_pass_restores_weights_bitwise():
    torch.manual_seed(0)
    model = MLP().double()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="perturbed pass failed"):
        MicroBatchSAM(model, rho=1.0, micro_batch_size=2).backward(batch_of(6), ScriptedLoss(model, {4: "raise"}))
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_frozen_parameters_are_never_perturbed():
    torch.manual_seed(0)
    model = MLP().double()
    model.fc1.requires_grad_(False)
    seen = []
    model.fc1.register_forward_pre_hook(lambda m, args: seen.append(m.weight.detach().clone()))
    MicroBatchSAM(model, rho=1.0).backward(batch_of(4), model_loss(model))
    assert len(seen) == 2 and torch.equal(seen[0], seen[1])  # same fc1 weight in both passes
    assert model.fc1.weight.grad is None


@pytest.mark.parametrize("vectorize", ["off", "on"])
def test_fp16_loss_scale_is_removed_before_the_norm(vectorize):
    torch.manual_seed(0)
    model = MLP()
    batch = {"x": torch.randn(6, 6), "labels": torch.randint(0, 3, (6,))}
    expected = msam_gradient(copy.deepcopy(model), batch, 3, 0.1)
    sam = MicroBatchSAM(model, rho=0.1, micro_batch_size=3, accelerator=ScalerAccelerator(2.0**12), eps=1.0, vectorize=vectorize)
    sam.backward(batch, model_loss(model))
    assert sam.path == ("vectorized" if vectorize == "on" else "sequential")
    # eps = 1 would weigh 4096x less against a scaled norm: agreement shows the norm was unscaled
    expected_eps1 = msam_gradient(copy.deepcopy(model), batch, 3, 0.1, eps=1.0)
    got = flat(p.grad for p in model.parameters()) / 2.0**12
    torch.testing.assert_close(got, flat(expected_eps1), rtol=1e-5, atol=1e-7)
    assert not torch.allclose(got, flat(expected), rtol=1e-3, atol=0)


@pytest.mark.parametrize("vectorize", ["off", "on"])
def test_fp16_overflow_in_ascent_skips_perturbation_not_the_run(vectorize):
    torch.manual_seed(0)
    model = MLP()
    batch = {"x": torch.randn(6, 6), "labels": torch.randint(0, 3, (6,))}
    before = [p.detach().clone() for p in model.parameters()]
    sam = MicroBatchSAM(model, rho=0.1, micro_batch_size=3, accelerator=ScalerAccelerator(2.0**120), vectorize=vectorize)
    sam.backward(batch, lambda mb: 1e6 * model(**mb)["loss"])  # the scaled gradients overflow float32
    assert sam.stats.skipped == 2
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_model_without_trainable_parameter_is_refused_naming_requires_grad():
    torch.manual_seed(0)
    model = MLP().double()
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter of MLP requires grad.*requires_grad_"):
        MicroBatchSAM(model, rho=0.1, micro_batch_size=2)
    model.fc2.requires_grad_(True)
    sam = MicroBatchSAM(model, rho=0.1, micro_batch_size=2)
    model.fc2.requires_grad_(False)  # frozen after the engine was built: refused at the step, before any pass
    before = [p.detach().clone() for p in model.parameters()]
    loss = ScriptedLoss(model, {})
    with pytest.raises(ValueError, match="MicroBatchSAM.backward: no parameter of MLP requires grad"):
        sam.backward(batch_of(4), loss)
    assert loss.calls == 0 and all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def grad_of(model, mb, shift=None):
    """∇L_mb at w (+ shift), a flat vector; the model is left at w."""
    params = list(model.parameters())
    w = [p.detach().clone() for p in params]
    if shift is not None:
        with torch.no_grad():
            for p, e in zip(params, unflat(shift, params)):
                p.add_(e)
    g = flat(torch.autograd.grad(model(**mb)["loss"], params))
    with torch.no_grad():
        for p, w_i in zip(params, w):
            p.copy_(w_i)
    return g


def thirds(batch):
    return [{k: v[s : s + 2] for k, v in batch.items()} for s in (0, 2, 4)]


def test_exception_mid_step_rolls_back_fsam_ema_with_the_weights():
    """F-SAM's EMA (Li et al.): m ← g_1, then m ← λm + (1 − λ)g_j. A step that raises in its third micro-batch (after
    two have updated m) leaves m, the engine's counters and the weights as they were; the step retried then goes on
    from there."""
    from hf_msam import build_method

    torch.manual_seed(0)
    model = MLP().double()
    batch, lmbda = batch_of(6), 0.9
    ascent, descent = build_method("fsam", rho=0.1, fsam_sigma=1.0, fsam_lambda=lmbda)
    sam = MicroBatchSAM(model, micro_batch_size=2, perturbation=ascent, descent=descent)
    g = [grad_of(model, mb) for mb in thirds(batch)]  # w never changes here: no optimizer step
    m = g[0]
    for g_j in g[1:]:
        m = lmbda * m + (1 - lmbda) * g_j
    sam.backward(batch, model_loss(model), step=1)
    torch.testing.assert_close(flat(ascent.m), m, **TIGHT)
    m_before, stats_before = [t.clone() for t in ascent.m], dict(vars(sam.stats))
    weights = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="perturbed pass failed"):
        sam.backward(batch, ScriptedLoss(model, {5: "raise"}), step=2)  # call 5: micro-batch 3's clean pass
    assert all(torch.equal(a, b) for a, b in zip(ascent.m, m_before)) and bool(ascent.started)
    assert internals.step_state(sam)[0] == 1 and sam.stats.micro_batches == stats_before["micro_batches"] == 3
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))
    sam.backward(batch, model_loss(model), step=2)
    for g_j in g:
        m = lmbda * m + (1 - lmbda) * g_j
    torch.testing.assert_close(flat(ascent.m), m, **TIGHT)
    assert sam.stats.micro_batches == 6 and sam.stats.steps == 2


def test_exception_mid_step_rolls_back_looksam_state_with_the_weights():
    """LookSAM (Liu et al.): a SAM step keeps g_v = Σ_j c_j (g_p,j − (⟨g_j, g_p,j⟩/‖g_j‖²) g_j) over its micro-batches,
    accumulation steps included. A second accumulation step that raises in its second micro-batch leaves g_v, the
    counter of reuse steps and the weights as the first one left them."""
    from hf_msam import build_method

    torch.manual_seed(0)
    model = MLP().double()
    batch, rho = batch_of(6), 0.1
    ascent, descent = build_method("looksam", rho=rho, looksam_k=3, looksam_alpha=0.7)
    sam = MicroBatchSAM(model, micro_batch_size=2, perturbation=ascent, descent=descent)
    g_v = torch.zeros_like(flat(model.parameters()))
    for mb in thirds(batch):  # c_j = 1/3
        g = grad_of(model, mb)
        g_p = grad_of(model, mb, rho * g / (g.norm() + 1e-12))
        g_v += (g_p - (g @ g_p) / (g @ g) * g) / 3
    sam.backward(batch, model_loss(model), step=1)
    torch.testing.assert_close(flat(descent.g_v), g_v, **TIGHT)
    assert descent.reuses_left == 2
    before = [t.clone() for t in descent.g_v]
    weights = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="perturbed pass failed"):
        sam.backward(batch, ScriptedLoss(model, {4: "raise"}), step=1)  # the same optimizer step; call 4: micro-batch 2
    assert all(torch.equal(a, b) for a, b in zip(descent.g_v, before))
    assert descent.reuses_left == 2 and not internals.looksam_fresh(descent) and internals.step_state(sam)[1] == "perturbed"
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))
    sam.backward(batch, model_loss(model), step=1)  # retried: adds this accumulation step's part to g_v
    torch.testing.assert_close(flat(descent.g_v), 2 * g_v, **TIGHT)
