"""Functional-SAM and preconditioned SAM (Singh et al., ICML 2025) against references computed here, in plain PyTorch.

Functional-SAM's descent is g = Σ_j c_j J_F(w + e_j)ᵀ ∇_F L_j(w): the references form the Jacobian of the outputs
explicitly (torch.autograd.functional.jacobian) or take the vector-Jacobian product of the perturbed logits with
∇_F L_j(w) computed separately (closed form, or autograd on a detached copy of the clean logits). The preconditioner
P = diag(1/(√v̂ + ε)) is computed by hand from the gradients AdamW was given, not read from the optimizer.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from reference import MLP, ScalerAccelerator, flat, mlp_dataset, unflat
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

from hf_msam import MicroBatchSAM, MSAMTrainer, MSAMTrainingArguments, build_method
from hf_msam.methods.precondition import AdamPreconditionedPerturbation

RHO, LR = 0.3, 0.5
TIGHT = dict(rtol=1e-10, atol=1e-12)


def stack(data):
    return {k: torch.stack([d[k] for d in data]) for k in data[0]}


def params_of(model):
    return [p for p in model.parameters() if p.requires_grad]


def mlp(seed=0):
    torch.manual_seed(seed)
    return MLP().double()


def logits_at(model, w, x):
    """The MLP's logits at the flat point w (w may require grad: a function of w for the Jacobian)."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    shaped = dict(zip(names, unflat(w, params_of(model))))
    return torch.func.functional_call(model, shaped, (x,))["logits"]


def ce_output_gradient(z, y):
    """∇_z of the mean cross-entropy, in closed form: (softmax(z) − onehot(y)) / n."""
    return (torch.softmax(z, -1) - F.one_hot(y, z.shape[-1]).to(z.dtype)) / z.shape[0]


def functional_reference(model, batch, mbs, rho, precondition=None):
    """Σ_j c_j J_F(w + e_j)ᵀ ∇_F L_j(w), the Jacobian formed explicitly; e_j = ρ P g_j/‖P g_j‖ (P = I by default)."""
    w = flat(params_of(model)).detach().clone()
    n = batch["labels"].shape[0]
    size = mbs or n
    total = torch.zeros_like(w)
    for s in range(0, n, size):
        x, y = batch["x"][s : s + size], batch["labels"][s : s + size]
        w_ = w.clone().requires_grad_(True)
        g = torch.autograd.grad(F.cross_entropy(logits_at(model, w_, x), y), w_)[0]
        d = g if precondition is None else precondition * g
        e = rho * d / (d.norm() + 1e-12)
        grad_F = ce_output_gradient(logits_at(model, w, x).detach(), y)  # at the clean point w
        J = torch.autograd.functional.jacobian(lambda v: logits_at(model, v, x), w + e)  # [n_j, C, P] at w + e_j
        total += (y.shape[0] / n) * J.reshape(-1, w.numel()).T @ grad_F.reshape(-1)
    return total


def sam_reference(model, batch, mbs, rho):
    """Σ_j c_j ∇L_j(w + e_j), for contrast."""
    w = flat(params_of(model)).detach().clone()
    n, size = batch["labels"].shape[0], mbs or batch["labels"].shape[0]
    total = torch.zeros_like(w)
    for s in range(0, n, size):
        x, y = batch["x"][s : s + size], batch["labels"][s : s + size]
        loss = lambda v: F.cross_entropy(logits_at(model, v, x), y)  # noqa: E731
        w_ = w.clone().requires_grad_(True)
        g = torch.autograd.grad(loss(w_), w_)[0]
        w_p = (w + rho * g / (g.norm() + 1e-12)).requires_grad_(True)
        total += (y.shape[0] / n) * torch.autograd.grad(loss(w_p), w_p)[0]
    return total


def engine_gradient(model, batch, mbs, method="functional", optimizer=None, accelerator=None, **settings):
    ascent, descent = build_method(method, rho=RHO, **settings)
    sam = MicroBatchSAM(model, micro_batch_size=mbs, perturbation=ascent, descent=descent, optimizer=optimizer,
                        accelerator=accelerator)
    before = [p.detach().clone() for p in params_of(model)]
    sam.backward(batch, lambda mb: model(**mb)["loss"])
    assert all(torch.equal(a, p) for a, p in zip(before, params_of(model)))  # w restored bitwise
    return flat([p.grad for p in params_of(model)])


# ---------------------------------------------------------------------------------------------
# The gradient, by explicit Jacobian algebra
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mbs", [None, 2, 3])
def test_functional_gradient_is_the_jacobian_at_w_plus_e_times_the_clean_output_gradient(mbs):
    model = mlp()
    batch = stack(mlp_dataset(7))  # micro-batches of 2: 2, 2, 2, 1 (uneven)
    expected = functional_reference(model, batch, mbs, RHO)
    got = engine_gradient(model, batch, mbs)
    torch.testing.assert_close(got, expected, **TIGHT)
    # It is not SAM's gradient: the output gradient is the clean one.
    assert (expected - sam_reference(model, batch, mbs, RHO)).abs().max() > 1e-4 * expected.abs().max()


def test_functional_with_a_plain_tensor_output_and_gradient_accumulation():
    """A model returning a bare tensor (F = itself), two `backward` calls accumulating into `.grad`."""
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
    ref_model = MLP().double()  # the same function, to reuse the reference
    with torch.no_grad():
        ref_model.fc1.weight.copy_(net[0].weight), ref_model.fc1.bias.copy_(net[0].bias)
        ref_model.fc2.weight.copy_(net[2].weight), ref_model.fc2.bias.copy_(net[2].bias)
    ascent, descent = build_method("functional", rho=RHO)
    sam = MicroBatchSAM(net, micro_batch_size=2, perturbation=ascent, descent=descent)
    halves = [stack(mlp_dataset(4, seed=s)) for s in (3, 4)]
    for b in halves:
        sam.backward(b, lambda mb: F.cross_entropy(net(mb["x"]), mb["labels"]) / 2, step=1)
    expected = sum(functional_reference(ref_model, b, 2, RHO) for b in halves) / 2
    torch.testing.assert_close(flat([p.grad for p in net.parameters()]), expected, **TIGHT)


def test_functional_under_fp16_loss_scaling():
    """The output gradient is unscaled (kept in float32) and the surrogate's backward is scaled like any gradient."""
    model = MLP()
    torch.manual_seed(2)
    model = MLP()
    batch = {"x": torch.randn(6, 6), "labels": torch.randint(0, 3, (6,))}
    expected = functional_reference(copy.deepcopy(model).double(), {"x": batch["x"].double(), "labels": batch["labels"]}, 3, RHO)
    got = engine_gradient(model, batch, 3, accelerator=ScalerAccelerator(2.0**12)) / 2.0**12
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Preconditioned perturbations, from a hand-computed AdamW state
# ---------------------------------------------------------------------------------------------


def adam_inverse_by_hand(gradients, beta2=0.999, eps=1e-8):
    """1/(√v̂ + ε) after AdamW stepped with these flat gradients: v_t = β₂ v_{t−1} + (1 − β₂) g_t², v̂ = v_t/(1 − β₂ᵗ)."""
    v = torch.zeros_like(gradients[0])
    for g in gradients:
        v = beta2 * v + (1 - beta2) * g * g
    v_hat = v / (1 - beta2 ** len(gradients))
    return 1 / (v_hat.sqrt() + eps)


@pytest.mark.parametrize("steps", [0, 1, 2])
def test_preconditioned_perturbation_from_a_hand_computed_adamw_state(steps):
    model = mlp()
    params = params_of(model)
    optimizer = torch.optim.AdamW(params, lr=0.0, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)  # lr 0: w stays
    seen = []
    for t in range(steps):
        torch.manual_seed(10 + t)
        grads = [torch.randn_like(p) * (1 + i) for i, p in enumerate(params)]  # parameters at different scales
        for p, g in zip(params, grads):
            p.grad = g.clone()
        optimizer.step()
        seen.append(flat(grads))
    g = [torch.randn_like(p) for p in params]
    rule = AdamPreconditionedPerturbation(rho=RHO, optimizer=optimizer)
    e, norm, ok = rule.perturb(params, [t.clone() for t in g])
    P = adam_inverse_by_hand(seen) if steps else torch.ones_like(flat(g))  # before the first step: the plain gradient
    d = P * flat(g)
    torch.testing.assert_close(flat(e), RHO * d / (d.norm() + 1e-12), **TIGHT)
    torch.testing.assert_close(norm, d.norm(), **TIGHT)
    assert bool(ok)
    if steps:  # the preconditioner changes the direction
        plain = RHO * flat(g) / flat(g).norm()
        assert (flat(e) - plain).abs().max() > 1e-3


@pytest.mark.parametrize("method", ["sam", "functional"])
def test_preconditioned_step_through_the_engine(method):
    """One AdamW step, then the engine with --msam_precondition adam: e_j = ρ P g_j/‖P g_j‖ in the reference."""
    model = mlp()
    params = params_of(model)
    optimizer = torch.optim.AdamW(params, lr=0.0, betas=(0.9, 0.99), eps=1e-3, weight_decay=0.0)
    torch.manual_seed(5)
    g0 = [torch.randn_like(p) for p in params]
    for p, g in zip(params, g0):
        p.grad = g.clone()
    optimizer.step()
    optimizer.zero_grad()
    P = adam_inverse_by_hand([flat(g0)], beta2=0.99, eps=1e-3)
    batch = stack(mlp_dataset(6))
    got = engine_gradient(model, batch, 3, method=method, optimizer=optimizer, precondition="adam")
    if method == "functional":
        expected = functional_reference(model, batch, 3, RHO, precondition=P)
    else:
        w = flat(params).detach().clone()
        expected = torch.zeros_like(w)
        for s in (0, 3):
            x, y = batch["x"][s : s + 3], batch["labels"][s : s + 3]
            loss = lambda v: F.cross_entropy(logits_at(model, v, x), y)  # noqa: E731
            w_ = w.clone().requires_grad_(True)
            d = P * torch.autograd.grad(loss(w_), w_)[0]
            w_p = (w + RHO * d / (d.norm() + 1e-12)).requires_grad_(True)
            expected += 0.5 * torch.autograd.grad(loss(w_p), w_p)[0]
    torch.testing.assert_close(got, expected, **TIGHT)
