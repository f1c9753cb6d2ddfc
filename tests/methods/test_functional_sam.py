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


# ---------------------------------------------------------------------------------------------
# Through MSAMTrainer: a BERT classifier, a Llama causal LM (token-weighted, -100 labels, accumulation)
# ---------------------------------------------------------------------------------------------


def sgd_args(tmp_path, batch_size, **kwargs):
    return MSAMTrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=batch_size, max_steps=1, optim="sgd", learning_rate=LR,
        lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0, train_sampling_strategy="sequential",
        report_to="none", use_cpu=True, save_strategy="no", logging_strategy="no", disable_tqdm=True,
        msam_method="functional", **kwargs,
    )  # fmt: skip


def vjp_reference(model, pieces, rho):
    """Σ_j c_j J_F(w + e_j)ᵀ ∇_F L_j(w) as a vector-Jacobian product; `pieces` are (forward, loss_of_logits, c_j), the
    forward giving the logits and ∇_F L_j(w) taken by autograd on a detached copy of the clean logits."""
    params = params_of(model)
    w0 = [p.detach().clone() for p in params]
    total = [torch.zeros_like(p) for p in params]
    for forward, loss_of, c in pieces:
        g = torch.autograd.grad(loss_of(forward()), params)
        norm = torch.sqrt(sum((t * t).sum() for t in g))
        z = forward().detach().requires_grad_(True)
        (grad_F,) = torch.autograd.grad(loss_of(z), z)
        with torch.no_grad():
            for p, w, t in zip(params, w0, g):
                p.copy_(w + rho * t / (norm + 1e-12))
        vjp = torch.autograd.grad(forward(), params, grad_outputs=grad_F)
        with torch.no_grad():
            for acc, t in zip(total, vjp):
                acc.add_(c * t)
            for p, w in zip(params, w0):
                p.copy_(w)
    return total


def tiny_bert():
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3,
    )  # fmt: skip
    return BertForSequenceClassification(config).double()


def bert_data(n=6, seq_len=7):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 40, (n, seq_len), generator=g)
    mask = torch.ones(n, seq_len, dtype=torch.long)
    mask[::3, -2:] = 0
    labels = torch.randint(0, 3, (n,), generator=g)
    return [{"input_ids": ids[i], "attention_mask": mask[i], "labels": labels[i]} for i in range(n)]


def after_sgd(model, gradient):
    return [(p - LR * g).detach() for p, g in zip(params_of(model), gradient)]


@pytest.mark.parametrize("vectorize", ["off", "on"])
def test_trainer_bert_classifier_equals_the_vjp_reference(tmp_path, vectorize):
    model, data = tiny_bert(), bert_data()
    ref = copy.deepcopy(model)
    batch = stack(data)
    pieces = []
    for s in (0, 2, 4):
        mb = {k: v[s : s + 2] for k, v in batch.items()}
        forward = lambda mb=mb: ref(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"]).logits  # noqa: E731
        pieces.append((forward, lambda z, y=mb["labels"]: F.cross_entropy(z, y), 1 / 3))
    gradient = vjp_reference(ref, pieces, 0.1)
    expected = after_sgd(ref, gradient)
    trainer = MSAMTrainer(model=model, args=sgd_args(tmp_path, 6, msam_rho=0.1, msam_micro_batch_size=2, msam_vectorize=vectorize),
                          train_dataset=data)
    trainer.train()
    assert trainer.msam_engine.path == ("vectorized" if vectorize == "on" else "sequential")
    for a, b in zip(params_of(model), expected):
        torch.testing.assert_close(a.detach(), b, **TIGHT)
    # SAM's step is measurably elsewhere
    sam = after_sgd(ref, __import__("reference").msam_gradient(copy.deepcopy(ref), batch, 2, 0.1))
    assert max((a - b).abs().max() for a, b in zip(sam, expected)) > 1e-6


def tiny_llama():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=30, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=16, tie_word_embeddings=False,
    )  # fmt: skip
    return LlamaForCausalLM(config).double()


def llama_data():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 30, (8, 6), generator=g)
    labels = ids.clone()
    for i, keep in enumerate([6, 3, 5, 2, 6, 4, 1, 6]):  # ragged: the label-token counts differ per row
        labels[i, keep:] = -100
    return [{"input_ids": ids[i], "labels": labels[i]} for i in range(8)]


@pytest.mark.parametrize("vectorize", ["off", "on"])
def test_trainer_causal_lm_token_weighted_with_accumulation_equals_the_vjp_reference(tmp_path, vectorize):
    """Two accumulation steps of 4 rows, micro-batches of 2 rows: micro-batch j weighs its share of all N label tokens
    of the optimizer step, and its ∇_F L_j is that of its own token-mean loss."""
    model, data = tiny_llama(), llama_data()
    ref = copy.deepcopy(model)
    N = sum(int((d["labels"][1:] != -100).sum()) for d in data)
    pieces = []
    for s in (0, 2, 4, 6):
        mb = stack(data[s : s + 2])
        count = int((mb["labels"][:, 1:] != -100).sum())

        def loss_of(z, y=mb["labels"], count=count):  # float32, as the model's loss upcasts the logits
            z = z[:, :-1].float()
            return F.cross_entropy(z.reshape(-1, 30), y[:, 1:].reshape(-1), ignore_index=-100, reduction="sum") / count

        pieces.append((lambda ids=mb["input_ids"]: ref(input_ids=ids).logits, loss_of, count / N))
    expected = after_sgd(ref, vjp_reference(ref, pieces, 0.05))
    args = sgd_args(tmp_path, 4, gradient_accumulation_steps=2, msam_rho=0.05, msam_micro_batch_size=2, msam_vectorize=vectorize)
    trainer = MSAMTrainer(model=model, args=args, train_dataset=data)
    trainer.train()
    assert trainer.msam_engine.path == ("vectorized" if vectorize == "on" else "sequential")
    # The model's loss runs in float32 (it upcasts the logits): float32-level agreement, against updates of ~1e-1.
    for a, b in zip(params_of(model), expected):
        torch.testing.assert_close(a.detach(), b, rtol=0, atol=1e-6)
    # The tolerance tells the token weighting from a weighting by rows (each micro-batch 1/4).
    by_rows = after_sgd(ref, vjp_reference(ref, [(f, loss_of, 0.25) for f, loss_of, _ in pieces], 0.05))
    assert max((a - b).abs().max() for a, b in zip(by_rows, expected)) > 100 * 1e-6


# ---------------------------------------------------------------------------------------------
# TRL SFT
# ---------------------------------------------------------------------------------------------


def test_trl_sft_functional_step_equals_the_token_weighted_vjp_reference(tmp_path):
    """MSAMSFTTrainer takes the SFT loss from the logits for this method (TRL's fused head gives only log p(label),
    in which the loss is linear: Functional-SAM would be SAM there): 5 rows in micro-batches of 2, 2, 1."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl_helpers import PROMPT_COMPLETION, write_tiny_llama

    from hf_msam.trl import MSAMSFTConfig, MSAMSFTTrainer

    llama_dir = write_tiny_llama(tmp_path / "llama")
    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float64)
    ref = copy.deepcopy(model)
    seen = []

    class Recording(MSAMSFTTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            seen.append({k: v.clone() for k, v in inputs.items() if torch.is_tensor(v)})
            return super().training_step(model, inputs, num_items_in_batch)

    args = MSAMSFTConfig(
        str(tmp_path / "out"), per_device_train_batch_size=5, msam_rho=0.1, msam_micro_batch_size=2, msam_method="functional",
        max_steps=1, optim="sgd", learning_rate=LR, lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0,
        bf16=False, report_to="none", use_cpu=True, save_strategy="no", logging_steps=1, disable_tqdm=True,
        train_sampling_strategy="sequential",
    )  # fmt: skip
    trainer = Recording(model=model, args=args, train_dataset=Dataset.from_list(PROMPT_COMPLETION[:5]),
                        processing_class=AutoTokenizer.from_pretrained(llama_dir))
    trainer.train()
    (batch,) = seen
    V = model.config.vocab_size
    counts = [int(batch["labels"][a : a + 2, 1:].ne(-100).sum()) for a in (0, 2, 4)]
    pieces = []
    for a, count in zip((0, 2, 4), counts):
        rows = {k: batch[k][a : a + 2] for k in ("input_ids", "attention_mask", "labels")}

        def loss_of(z, y=rows["labels"], count=count):
            return F.cross_entropy(z[:, :-1].reshape(-1, V).float(), y[:, 1:].reshape(-1), ignore_index=-100, reduction="sum") / count

        forward = lambda rows=rows: ref(input_ids=rows["input_ids"], attention_mask=rows["attention_mask"]).logits  # noqa: E731
        pieces.append((forward, loss_of, count / sum(counts)))
    expected = after_sgd(ref, vjp_reference(ref, pieces, 0.1))
    for a, b in zip(params_of(model), expected):
        torch.testing.assert_close(a.detach(), b, rtol=0, atol=1e-6)
    # SAM's step (what the fused head's log p(label) as F would give) is measurably elsewhere.
    from trl_helpers import sft_reference_step

    sam = sft_reference_step(ref, batch, micro_batch_size=2, rho=0.1, lr=LR)
    names = [n for n, p in ref.named_parameters() if p.requires_grad]
    assert max((sam[n] - b).abs().max() for n, b in zip(names, expected)) > 100 * 1e-6
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs and logs[0]["msam/sharpness"] > 0 and "mean_token_accuracy" in logs[0]


# ---------------------------------------------------------------------------------------------
# Refusals, and resume
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, flag",
    [
        (dict(msam_method="gsam", msam_precondition="adam"), "--msam_precondition adam does not combine with --msam_method gsam"),
        (dict(msam_precondition="adam", msam_adaptive=True), "--msam_precondition adam does not combine with --msam_adaptive"),
        (dict(msam_precondition="diag"), "--msam_precondition must be"),
        (dict(msam_method="functional", msam_sync_perturbation=True), "--msam_sync_perturbation does not combine with --msam_method functional"),
    ],
)
def test_bad_combinations_are_refused_naming_the_flag(tmp_path, kwargs, flag):
    with pytest.raises(ValueError, match=flag):
        MSAMTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", **kwargs)


@pytest.mark.parametrize("method", ["sam", "functional"])
def test_precondition_with_an_optimizer_without_a_second_moment_is_refused(tmp_path, method):
    args = MSAMTrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=1, optim="sgd", use_cpu=True, report_to="none",
        save_strategy="no", msam_method=method, msam_precondition="adam",
    )  # fmt: skip
    with pytest.raises(ValueError, match="--msam_precondition adam .* keeps no second moment"):
        MSAMTrainer(model=mlp(), args=args, train_dataset=mlp_dataset(4)).train()


def test_functional_refuses_a_loss_that_is_not_computed_from_the_models_outputs():
    model = mlp()
    other = copy.deepcopy(model)
    sam = MicroBatchSAM(model, perturbation=build_method("functional", rho=RHO)[0], descent=build_method("functional")[1])
    with pytest.raises(ValueError, match="--msam_method functional found no output"):
        sam.backward(stack(mlp_dataset(4)), lambda mb: (other(**mb)["loss"] + 0 * sum(p.sum() for p in model.parameters())))
    assert all(p.grad is None for p in model.parameters())


def test_functional_refuses_fused_log_probabilities_without_logits():
    """F = log p(label) (TRL's fused LM head) would make Functional-SAM SAM for the SFT loss: refused."""

    class Fused(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = MLP().double()

        def forward(self, x, labels):
            log_probs = torch.log_softmax(self.net(x)["logits"], -1).gather(-1, labels[:, None]).squeeze(-1)
            return {"loss": -log_probs.mean(), "log_probs": log_probs}

    model = Fused()
    ascent, descent = build_method("functional", rho=RHO)
    with pytest.raises(ValueError, match="fused LM head"):
        MicroBatchSAM(model, perturbation=ascent, descent=descent).backward(stack(mlp_dataset(4)), lambda mb: model(**mb)["loss"])


def test_resume_with_precondition_equals_the_uninterrupted_run(tmp_path):
    """The preconditioner is the optimizer's second moment: it comes back with the optimizer's checkpoint."""
    data = mlp_dataset(20)

    def args(**kwargs):
        settings = dict(
            output_dir=str(tmp_path / "run"), per_device_train_batch_size=5, max_steps=4, optim="adamw_torch",
            learning_rate=1e-2, lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0, use_cpu=True,
            report_to="none", train_sampling_strategy="sequential", save_strategy="steps", save_steps=2, logging_strategy="no",
            disable_tqdm=True, msam_rho=RHO, msam_micro_batch_size=2, msam_method="functional", msam_precondition="adam",
        )  # fmt: skip
        return MSAMTrainingArguments(**{**settings, **kwargs})

    model = mlp()
    MSAMTrainer(model=model, args=args(), train_dataset=data).train()
    whole = flat(params_of(model)).detach()
    resumed = mlp(seed=1)
    MSAMTrainer(model=resumed, args=args(), train_dataset=data).train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    assert torch.equal(flat(params_of(resumed)).detach(), whole)
    # and the preconditioner mattered: without it the run ends elsewhere
    plain = mlp()
    MSAMTrainer(model=plain, args=args(msam_precondition="none", output_dir=str(tmp_path / "plain")), train_dataset=data).train()
    assert (flat(params_of(plain)).detach() - whole).abs().max() > 1e-6


# ---------------------------------------------------------------------------------------------
# TRL DPO: the policy's log-probabilities from the logits
# ---------------------------------------------------------------------------------------------


def _fused_llama(tmp_path, dtype, outputs=("log_probs", "entropy", "mean_logits", "is_top1", "log_sum_sq_probs")):
    from trl.trainer.utils import add_fused_lm_head
    from trl_helpers import write_tiny_llama

    model = LlamaForCausalLM.from_pretrained(write_tiny_llama(tmp_path / "llama"), dtype=dtype)
    add_fused_lm_head(model, outputs=outputs)
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, model.config.vocab_size, (4, 9), generator=g)
    attention_mask = torch.ones_like(ids)
    attention_mask[1, -3:] = 0
    labels = ids.masked_fill(torch.rand(ids.shape, generator=g) < 0.4, -100)
    labels[1, -3:] = -100
    return model, ids, attention_mask, labels


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_head_from_logits_equals_trls_fused_head(tmp_path, monkeypatch, dtype):
    """Every field TRL's fused LM head returns, from the logits: bitwise in float32 (the fused head computes in float32
    on CPU, with the same formulas), within float32 roundoff in float64 (where ours stays in float64); the gradient of
    the log-probabilities with respect to every weight within float32 roundoff. No host sync on the way."""
    pytest.importorskip("trl")
    from reference import SYNCING

    from hf_msam.trl import fused_head_from_logits

    model, ids, attention_mask, labels = _fused_llama(tmp_path, dtype)
    fused = model(input_ids=ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True, use_cache=False)
    logits = model(input_ids=ids, attention_mask=attention_mask, use_cache=False).logits
    syncs = []
    with monkeypatch.context() as patch:
        for name in SYNCING:
            original = getattr(torch.Tensor, name)
            patch.setattr(torch.Tensor, name, lambda t, *a, __name=name, __original=original, **k: syncs.append(__name) or __original(t, *a, **k))
        ours = fused_head_from_logits(logits, labels, log_sum_sq_probs=True)
    assert syncs == []
    assert ours.log_probs.shape == fused.log_probs.shape == (4, 8)
    assert torch.equal(ours.label_mask, fused.label_mask) and torch.equal(ours.is_top1, fused.is_top1)
    assert bool((ours.log_probs[~ours.label_mask] == 0).all()) and bool(ours.label_mask.sum() > 5)
    for name in ("log_probs", "entropy", "mean_logits", "log_sum_sq_probs", "loss"):
        a, b = getattr(fused, name), getattr(ours, name)
        if dtype == torch.float32:
            assert b.dtype == torch.float32 and torch.equal(a, b), name
        else:
            assert b.dtype == torch.float64, name
            torch.testing.assert_close(b, a.double(), rtol=3e-7, atol=3e-7, msg=name)
    # the gradient, through a nonlinear function of the log-probabilities (as DPO's loss is)
    params = params_of(model)
    weights = torch.linspace(-1, 1, ours.log_probs.numel(), dtype=torch.float64).view_as(ours.log_probs)

    def grad(log_probs):
        return flat(torch.autograd.grad(torch.sigmoid((weights * log_probs.double()).sum()), params))

    a, b = grad(fused.log_probs), grad(ours.log_probs)
    assert (a - b).abs().max() <= 1e-5 * a.abs().max()


DPO_BETA, DPO_RHO = 0.5, 0.1


def dpo_pieces(policy, ref_logps, batch, pairs, beta=DPO_BETA):
    """Per micro-batch of pairs: (the policy's logits, DPO's sigmoid loss of the logits, its share of the pairs);
    `ref_logps` the reference model's Σ_t log p(completion token) per row."""
    n = batch["input_ids"].shape[0] // 2
    pieces = []
    for r in pairs:
        rows = list(r) + [n + i for i in r]
        ids, attention_mask = batch["input_ids"][rows], batch["attention_mask"][rows]
        completion = batch["completion_mask"][rows][:, 1:]
        ref, k = ref_logps[rows].double(), len(r)

        def loss_of(z, ids=ids, completion=completion, ref=ref, k=k):
            logp = torch.log_softmax(z[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
            ratio = (logp * completion).sum(-1) - ref
            return -F.logsigmoid(beta * (ratio[:k] - ratio[k:])).mean()

        forward = lambda ids=ids, attention_mask=attention_mask: policy(input_ids=ids, attention_mask=attention_mask).logits  # noqa: E731
        pieces.append((forward, loss_of, len(r) / n))
    return pieces


def fused_ref_logps(ref_model, batch, rows=None):
    """The reference model's log p(completion) per row through TRL's fused head, as DPOTrainer computes it (float32)."""
    from trl.trainer.utils import add_fused_lm_head

    add_fused_lm_head(ref_model)
    rows = slice(None) if rows is None else rows
    ids, completion = batch["input_ids"][rows], batch["completion_mask"][rows]
    with torch.no_grad():
        out = ref_model(input_ids=ids, attention_mask=batch["attention_mask"][rows], labels=ids.masked_fill(completion == 0, -100),
                        fused_lm_head=True, use_cache=False)  # fmt: skip
    return out.log_probs[:, -(ids.shape[1] - 1) :].sum(1)


@pytest.fixture
def float64_rms_norm(monkeypatch):
    """Llama's RMSNorm computes in float32 whatever the input's dtype: in a float64 model, differences of 1e-16 between
    two computations of w + e_j (the engine's and the reference's) then come out of it as float32 roundoff (≈1e-8 in
    the step). Here it computes in the input's dtype, so the float64 step can be compared at 1e-10."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    def forward(self, hidden_states):
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))

    monkeypatch.setattr(LlamaRMSNorm, "forward", forward)


def run_functional_dpo(tmp_path, vectorize, peft=False, **settings):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl_helpers import PREFERENCES, write_tiny_llama

    from hf_msam.trl import MSAMDPOConfig, MSAMDPOTrainer

    llama_dir = write_tiny_llama(tmp_path / "llama")
    load = lambda: AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float64)  # noqa: E731
    model = load()
    extra = {}
    if peft:  # the trainer wraps the model: its reference is then the policy with the adapters disabled
        from peft import LoraConfig

        extra["peft_config"] = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        torch.manual_seed(1)
    else:
        extra["ref_model"] = load()
        policy = copy.deepcopy(model)
    seen = []

    class Recording(MSAMDPOTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            seen.append({k: v.clone() for k, v in inputs.items() if torch.is_tensor(v)})
            return super().training_step(model, inputs, num_items_in_batch)

    args = MSAMDPOConfig(str(tmp_path / "out"), **{**dict(
        per_device_train_batch_size=5, beta=DPO_BETA, msam_rho=DPO_RHO, msam_micro_batch_size=2, msam_method="functional",
        msam_vectorize=vectorize, max_steps=1, optim="sgd", learning_rate=LR, lr_scheduler_type="constant",
        max_grad_norm=0.0, weight_decay=0.0, bf16=False, report_to="none", use_cpu=True, save_strategy="no",
        logging_steps=1, disable_tqdm=True, train_sampling_strategy="sequential",
    ), **settings})  # fmt: skip
    trainer = Recording(model=model, args=args, train_dataset=Dataset.from_list(PREFERENCES),
                        processing_class=AutoTokenizer.from_pretrained(llama_dir), **extra)  # fmt: skip
    model = trainer.model
    if peft:  # the same LoRA model, its adapters as the trainer initialized them
        from peft import get_peft_model

        policy = get_peft_model(load(), extra["peft_config"])
        adapters = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
        assert adapters and not policy.load_state_dict(adapters, strict=False).unexpected_keys
    before = [p.detach().clone() for p in params_of(model)]
    trainer.train()
    (batch,) = seen
    return trainer, model, policy, load(), batch, before


def relative_error(got, expected):
    return max(float((a - b).abs().max()) for a, b in zip(got, expected)) / max(float(b.abs().max()) for b in expected)


@pytest.mark.parametrize("vectorize", ["off", "on"])
def test_trl_dpo_functional_step_equals_the_pairwise_vjp_reference(tmp_path, vectorize, float64_rms_norm):
    """MSAMDPOTrainer with Functional-SAM: 5 pairs in micro-batches of 2, 2, 1 pairs. F is the policy's logits (TRL's
    fused head, which returns only log p(label), is served from them); the step equals Σ_j (|B_j|/5)·J_F(w + e_j)ᵀ
    ∇_F L_j(w), with DPO's sigmoid loss written here and the reference model's log-probabilities from a frozen copy
    (through TRL's fused head, as the trainer computes them)."""
    pytest.importorskip("trl")
    # DPOConfig checkpoints activations by default: both paths run with it
    trainer, model, policy, frozen, batch, before = run_functional_dpo(tmp_path, vectorize, activation_checkpointing=True)
    assert trainer.msam_engine.path == ("vectorized" if vectorize == "on" else "sequential")
    n = batch["input_ids"].shape[0] // 2
    assert n == 5
    pairs = [range(0, 2), range(2, 4), range(4, 5)]
    if vectorize == "on":  # the reference model sees the whole batch in one call, else each micro-batch
        ref_logps = fused_ref_logps(frozen, batch)
    else:
        ref_logps = torch.empty(2 * n, dtype=torch.float32)
        for r in pairs:
            rows = list(r) + [n + i for i in r]
            ref_logps[rows] = fused_ref_logps(frozen, batch, rows)
    # the fused reference log-probabilities are float32's rounding of the float64 ones
    from trl_helpers import completion_logps

    with torch.no_grad():
        exact = completion_logps(frozen, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    torch.testing.assert_close(ref_logps.double(), exact, rtol=1e-6, atol=1e-6)
    pieces = dpo_pieces(policy, ref_logps, batch, pairs)
    gradient = vjp_reference(policy, pieces, DPO_RHO)  # Σ_j c_j J_F(w + e_j)ᵀ ∇_F L_j(w)
    update = [b - p.detach() for b, p in zip(before, params_of(model))]
    expected = [LR * g for g in gradient]
    err = relative_error(update, expected)
    assert err <= 1e-10, err
    # SAM's step is measurably elsewhere, and so is the plain gradient
    from trl_helpers import msam_gradient

    sam = msam_gradient(policy, [lambda f=f, loss_of=loss_of: loss_of(f()) for f, loss_of, _ in pieces], [c for *_, c in pieces], DPO_RHO)
    assert relative_error([LR * g for g in sam], expected) > 1e-4
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs and logs[0]["msam/sharpness"] != 0 and "rewards/chosen" in logs[0] and "entropy" in logs[0]


@pytest.mark.parametrize("vectorize", ["off", "on"])
def test_trl_dpo_functional_lora_step_equals_the_vjp_reference(tmp_path, vectorize, float64_rms_norm):
    """The same with a LoRA policy and no reference model (TRL's reference: the policy with its adapters disabled,
    a forward that stays fused): only the adapters move, by the reference's step."""
    pytest.importorskip("peft")
    trainer, model, policy, frozen, batch, before = run_functional_dpo(
        tmp_path, vectorize, peft=True, activation_checkpointing=True
    )
    assert trainer.msam_engine.path == ("vectorized" if vectorize == "on" else "sequential")
    n = batch["input_ids"].shape[0] // 2
    pairs = [range(0, 2), range(2, 4), range(4, 5)]
    if vectorize == "on":
        ref_logps = fused_ref_logps(frozen, batch)  # the base model: the policy with its adapters disabled
    else:
        ref_logps = torch.empty(2 * n, dtype=torch.float32)
        for r in pairs:
            rows = list(r) + [n + i for i in r]
            ref_logps[rows] = fused_ref_logps(frozen, batch, rows)
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in name for name in names)
    gradient = vjp_reference(policy, dpo_pieces(policy, ref_logps, batch, pairs), DPO_RHO)
    update = [b - p.detach() for b, p in zip(before, params_of(model))]
    err = relative_error(update, [LR * g for g in gradient])
    assert err <= 1e-10, err
    base = {name: p for name, p in frozen.named_parameters()}
    for name, p in model.named_parameters():  # the frozen base weights end bitwise as they started
        if not p.requires_grad:
            assert torch.equal(p, base[name.replace("base_model.model.", "").replace(".base_layer", "")]), name
