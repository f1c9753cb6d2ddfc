"""hf_msam.flatness against closed forms (least squares: H = (2/n)·XᵀX), its contract, the Trainer flags."""

import copy
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import BertConfig, BertForSequenceClassification, TrainingArguments

import internals
from hf_msam import MSAMTrainer, MSAMTrainingArguments
from hf_msam import flatness
from hf_msam.flatness import (
    LossLandscape,
    hessian_top_eigenvalue,
    hessian_trace,
    loss_landscape,
    plot_loss_landscape,
    sharpness,
)

@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one thread is fastest, and does not fight other processes for the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# Least squares: L(w) = mean_i (x_i·w − y_i)², so ∇L = (2/n)·Xᵀ(Xw − y) and ∇²L = (2/n)·XᵀX
# ---------------------------------------------------------------------------------------------


class LeastSquares(nn.Module):
    """forward(x, labels) -> {"loss": mean((x·w [+ x2·v] − labels)²)}; `v` (frozen) multiplies `x2` when given."""

    def __init__(self, w, v=None):
        super().__init__()
        self.w = nn.Parameter(torch.as_tensor(w, dtype=torch.float64).clone())
        self.v = None if v is None else nn.Parameter(torch.as_tensor(v, dtype=torch.float64), requires_grad=False)

    def forward(self, x, labels, x2=None):
        prediction = x @ self.w + (0 if x2 is None else x2 @ self.v)
        return {"loss": ((prediction - labels) ** 2).mean()}


def matrix_with_singular_values(n, singular_values, seed=0):
    """X = U·diag(s)·Vᵀ with orthonormal U (n × d) and V (d × d): XᵀX has eigenvalues s²."""
    rng = np.random.default_rng(seed)
    d = len(singular_values)
    u, _ = np.linalg.qr(rng.standard_normal((n, d)))
    v, _ = np.linalg.qr(rng.standard_normal((d, d)))
    return u @ np.diag(singular_values) @ v.T


def as_batches(x, y, sizes, **extra):
    """Consecutive rows of x, y as batches of the given (uneven) sizes."""
    x, y = torch.as_tensor(x), torch.as_tensor(y)
    starts = np.cumsum([0] + list(sizes))
    batches = [{"x": x[a:b], "labels": y[a:b]} for a, b in zip(starts[:-1], starts[1:])]
    for key, value in extra.items():
        for batch, a, b in zip(batches, starts[:-1], starts[1:]):
            batch[key] = torch.as_tensor(value)[a:b]
    return batches


SINGULAR_VALUES = [3.0, 2.0, 1.5, 1.0, 0.5, 0.25]
N = 12
SIZES = [2, 10]  # uneven: an unweighted mean of the two batch Hessians would be another matrix


@pytest.fixture
def least_squares():
    rng = np.random.default_rng(1)
    x = matrix_with_singular_values(N, SINGULAR_VALUES)
    y = rng.standard_normal(N)
    model = LeastSquares(rng.standard_normal(len(SINGULAR_VALUES)))
    return model, x, y, as_batches(x, y, SIZES)


def test_top_eigenvalue_is_that_of_2_over_n_XtX(least_squares):
    model, x, _, batches = least_squares
    expected = 2 / N * max(SINGULAR_VALUES) ** 2
    assert expected == pytest.approx(np.linalg.eigvalsh(2 / N * x.T @ x).max(), rel=1e-12)
    assert hessian_top_eigenvalue(model, batches, iters=500, tol=1e-12) == pytest.approx(expected, rel=1e-9)
    # The default tolerance stops early, close to it.
    assert hessian_top_eigenvalue(model, batches) == pytest.approx(expected, rel=1e-3)


def test_top_eigenvalue_is_the_one_of_largest_magnitude(least_squares):
    class NegatedLeastSquares(LeastSquares):
        def forward(self, x, labels):
            return {"loss": -super().forward(x, labels)["loss"]}

    model, x, y, batches = least_squares
    negated = NegatedLeastSquares(model.w.detach())
    assert hessian_top_eigenvalue(negated, batches, iters=500, tol=1e-12) == pytest.approx(-2 / N * 9.0, rel=1e-9)


def test_trace_within_the_hutchinson_error():
    rng = np.random.default_rng(2)
    x, y = rng.standard_normal((N, 6)), rng.standard_normal(N)
    model, batches = LeastSquares(rng.standard_normal(6)), as_batches(x, y, SIZES)
    h = 2 / N * x.T @ x
    samples = 400
    # Rademacher z: Var(zᵀHz) = 2(‖H‖_F² − Σ_i H_ii²).
    standard_error = math.sqrt(2 * ((h**2).sum() - (np.diag(h) ** 2).sum()) / samples)
    assert standard_error < 0.05 * np.trace(h)  # so that the check below means something
    estimates = [hessian_trace(model, batches, samples=samples, seed=seed) for seed in (0, 1)]
    for estimate in estimates:
        assert abs(estimate - np.trace(h)) < 4 * standard_error
    assert estimates[0] != estimates[1]  # a random estimate, reproducible from its seed
    assert hessian_trace(model, batches, samples=samples, seed=0) == estimates[0]


def test_trace_is_exact_for_a_diagonal_hessian():
    # Orthogonal columns: XᵀX = diag(s²), and zᵀDz = tr D for every z with entries ±1.
    rng = np.random.default_rng(3)
    u, _ = np.linalg.qr(rng.standard_normal((N, 6)))
    x = u * np.array(SINGULAR_VALUES)
    model = LeastSquares(rng.standard_normal(6))
    batches = as_batches(x, rng.standard_normal(N), SIZES)
    expected = 2 / N * sum(s**2 for s in SINGULAR_VALUES)
    assert hessian_trace(model, batches, samples=3) == pytest.approx(expected, rel=1e-12)


def test_hessian_is_over_the_trainable_parameters_only():
    # L(w, v) = mean((X w + X2 v − y)²) with v frozen: the Hessian in w alone is (2/n)·XᵀX.
    rng = np.random.default_rng(4)
    x = matrix_with_singular_values(N, SINGULAR_VALUES, seed=4)
    x2 = 10 * rng.standard_normal((N, 3))  # would dominate the spectrum if v counted
    model = LeastSquares(rng.standard_normal(6), v=rng.standard_normal(3))
    batches = as_batches(x, rng.standard_normal(N), SIZES, x2=x2)
    assert hessian_top_eigenvalue(model, batches, iters=500, tol=1e-12) == pytest.approx(2 / N * 9.0, rel=1e-9)
    u, _ = np.linalg.qr(rng.standard_normal((N, 6)))
    diagonal = LeastSquares(rng.standard_normal(6), v=rng.standard_normal(3))
    batches = as_batches(u * np.array(SINGULAR_VALUES), rng.standard_normal(N), SIZES, x2=x2)
    expected = 2 / N * sum(s**2 for s in SINGULAR_VALUES)
    assert hessian_trace(diagonal, batches, samples=2) == pytest.approx(expected, rel=1e-12)


# ---------------------------------------------------------------------------------------------
# Sharpness: on a quadratic, L_j(w + e) − L_j(w) = g_j·e + ½ eᵀH_j e exactly
# ---------------------------------------------------------------------------------------------


def reference_sharpness(w, x, y, sizes, rho, micro_batch_size, adaptive, eta=0.01, eps=1e-12):
    """Σ_j n_j (g_j·e_j + ½ e_jᵀH_j e_j) / Σ_j n_j over the micro-batches of each batch, in numpy."""
    rises, counts, start = [], [], 0
    for size in sizes:
        step = micro_batch_size or size
        for a in range(start, start + size, step):
            xj, yj = x[a : min(a + step, start + size)], y[a : min(a + step, start + size)]
            n_j = len(yj)
            g = 2 / n_j * xj.T @ (xj @ w - yj)
            h = 2 / n_j * xj.T @ xj
            if adaptive:
                t = np.abs(w) + eta
                e = rho * t**2 * g / (np.linalg.norm(t * g) + eps)
            else:
                e = rho * g / (np.linalg.norm(g) + eps)
            rises.append(g @ e + 0.5 * e @ h @ e)
            counts.append(n_j)
        start += size
    return float(np.dot(rises, counts) / sum(counts))


@pytest.mark.parametrize("micro_batch_size", [None, 3])  # 3: micro-batches of 2 | 3, 3, 3, 1
@pytest.mark.parametrize("adaptive, rho", [(False, 0.05), (True, 0.5)])
def test_sharpness_is_the_quadratic_rise(least_squares, micro_batch_size, adaptive, rho):
    model, x, y, batches = least_squares
    expected = reference_sharpness(model.w.detach().numpy(), x, y, SIZES, rho, micro_batch_size, adaptive)
    got = sharpness(model, batches, rho=rho, micro_batch_size=micro_batch_size, adaptive=adaptive)
    assert expected > 0
    assert got == pytest.approx(expected, rel=1e-9)


def test_sharpness_is_what_the_trainer_logs(tmp_path):
    """The trainer's msam/sharpness (dropout off, one SGD step, logged from the step at w₀) is sharpness at w₀."""
    model, data = tiny_bert(dropout=0.0), bert_data(8)
    at_w0 = copy.deepcopy(model)
    args = MSAMTrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=1, optim="sgd", learning_rate=0.1,
        train_sampling_strategy="sequential", report_to="none", use_cpu=True, save_strategy="no", logging_steps=1,
        msam_rho=0.1, msam_micro_batch_size=3,
    )
    trainer = MSAMTrainer(model=model, args=args, train_dataset=data)
    trainer.train()
    logged = next(log["msam/sharpness"] for log in trainer.state.log_history if "msam/sharpness" in log)
    batch = trainer.data_collator(data)
    assert sharpness(at_w0, [batch], rho=0.1, micro_batch_size=3) == pytest.approx(logged, abs=1e-6)


# ---------------------------------------------------------------------------------------------
# Loss landscape
# ---------------------------------------------------------------------------------------------


def plain_loss(model, batches):
    """Σ_b n_b L_b / Σ_b n_b in eval mode, on a copy."""
    model = copy.deepcopy(model).eval()
    with torch.no_grad():
        losses = [(len(b["labels"]), model(**b)["loss"].item()) for b in batches]
    return sum(n * loss for n, loss in losses) / sum(n for n, _ in losses)


def test_landscape_at_alpha_0_is_the_plain_loss(least_squares):
    model, _, _, batches = least_squares
    curve = loss_landscape(model, batches, steps=21, span=2.0)
    assert curve.directions == 1 and len(curve.losses) == 21
    assert curve.coordinates[0] == -2.0 and curve.coordinates[10] == 0.0 and curve.coordinates[-1] == 2.0
    assert curve.losses[10] == pytest.approx(plain_loss(model, batches), rel=1e-14)
    # On a quadratic, L(w + αd) is a parabola in α: zero third differences, positive second ones.
    assert np.abs(np.diff(curve.losses, 3)).max() < 1e-9 * max(curve.losses)
    assert (np.diff(curve.losses, 2) > 0).all()


def test_landscape_2d_contains_the_1d_curve(least_squares):
    model, _, _, batches = least_squares
    curve = loss_landscape(model, batches, steps=7, seed=5)
    surface = loss_landscape(model, batches, directions=2, steps=7, seed=5)
    assert len(surface.losses) == 7 and all(len(row) == 7 for row in surface.losses)
    assert [row[3] for row in surface.losses] == curve.losses  # β = 0: along d₁ alone, the same d₁
    assert surface.losses[3][3] == pytest.approx(plain_loss(model, batches), rel=1e-14)
    assert surface.losses[3] != curve.losses  # α = 0, along d₂: another direction


def test_directions_are_filter_normalized():
    weight = torch.randn(4, 3, 2, dtype=torch.float64)
    bias = torch.randn(4, dtype=torch.float64)
    zero = torch.zeros(5, 2, dtype=torch.float64)
    generator = torch.Generator().manual_seed(0)
    d_weight, d_bias, d_zero = internals.filter_normalized_direction([weight, bias, zero], generator)
    # Each filter (slice along dim 0) of d has the norm of the same filter of w; a 1-D tensor is one filter.
    torch.testing.assert_close(d_weight.flatten(1).norm(dim=1), weight.flatten(1).norm(dim=1))
    torch.testing.assert_close(d_bias.norm(), bias.norm())
    assert torch.equal(d_zero, zero)
    assert not torch.allclose(d_weight / d_weight.norm(), weight / weight.norm())  # random, not w itself


def test_plot_loss_landscape_writes_pngs(least_squares, tmp_path):
    model, _, _, batches = least_squares
    for directions in (1, 2):
        landscape = loss_landscape(model, batches, directions=directions, steps=9)
        landscape.to_json(tmp_path / f"{directions}.json")
        assert LossLandscape.from_json(tmp_path / f"{directions}.json") == landscape
        plot_loss_landscape(landscape, tmp_path / f"{directions}.png")
        with Image.open(tmp_path / f"{directions}.png") as image:
            assert image.format == "PNG" and image.width > 400


def test_malformed_landscape_json_is_rejected(tmp_path):
    path = tmp_path / "landscape.json"
    for content in ({"directions": 1, "coordinates": [0, 1], "losses": [1.0]}, {"coordinates": [0, 1]}, [1, 2]):
        path.write_text(json.dumps(content))
        with pytest.raises(ValueError, match="not a loss landscape"):
            LossLandscape.from_json(path)


# ---------------------------------------------------------------------------------------------
# The contract: model unchanged, modes kept, any grad mode, clear errors
# ---------------------------------------------------------------------------------------------


def tiny_bert(seed=0, dropout=0.1):
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=16, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout, num_labels=2,
    )
    return BertForSequenceClassification(config).double()


def bert_data(n, seq_len=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 50, (n, seq_len), generator=g)
    labels = torch.randint(0, 2, (n,), generator=g)
    return [{"input_ids": ids[i], "labels": labels[i]} for i in range(n)]


def bert_batches(n=12, batch_size=4):
    data = bert_data(n)
    chunks = [data[i : i + batch_size] for i in range(0, n, batch_size)]
    return [{k: torch.stack([d[k] for d in chunk]) for k in data[0]} for chunk in chunks]


MEASURES = {
    "hessian_top_eigenvalue": lambda m, b: hessian_top_eigenvalue(m, b, iters=5),
    "hessian_trace": lambda m, b: hessian_trace(m, b, samples=3),
    "sharpness": lambda m, b: sharpness(m, b, micro_batch_size=2, adaptive=True),
    "loss_landscape": lambda m, b: loss_landscape(m, b, directions=2, steps=3),
}


def lora_bert():
    from peft import LoraConfig, get_peft_model

    # init_lora_weights=False: B ≠ 0 too, so the adapter is not at a saddle of the loss.
    return get_peft_model(tiny_bert(), LoraConfig(r=2, target_modules=["query", "value"], init_lora_weights=False))


class BatchNormMLP(nn.Module):
    """x -> Linear -> BatchNorm -> tanh -> Linear, cross-entropy: running statistics a train-mode pass would move."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3)).double()

    def forward(self, x, labels):
        return {"loss": nn.functional.cross_entropy(self.layers(x), labels)}


def mlp_batches():
    g = torch.Generator().manual_seed(0)
    return [{"x": torch.randn(5, 6, generator=g, dtype=torch.float64), "labels": torch.arange(5) % 3} for _ in range(2)]


@pytest.mark.parametrize("measure", MEASURES)
@pytest.mark.parametrize(
    "make_model, make_batches",
    [(tiny_bert, bert_batches), (lora_bert, bert_batches), (BatchNormMLP, mlp_batches)],
    ids=["bert", "lora", "batchnorm"],
)
def test_model_is_left_bitwise_unchanged_in_its_modes(measure, make_model, make_batches):
    model = make_model().train()
    list(model.modules())[-1].eval()  # one module in another mode than the others
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modes = {name: m.training for name, m in model.named_modules()}
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    MEASURES[measure](model, make_batches())
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert {name: p.requires_grad for name, p in model.named_parameters()} == requires_grad
    assert all(p.grad is None for p in model.parameters())


def exact_hessian(model, batches):
    """∇²L over the trainable parameters, flattened, by torch.autograd.functional.hessian (eval mode)."""
    model = copy.deepcopy(model).eval()
    names, params = zip(*[(n, p.detach()) for n, p in model.named_parameters() if p.requires_grad])
    total = sum(len(b["labels"]) for b in batches)

    def loss(flat):
        tensors = torch.split(flat, [p.numel() for p in params])
        weights = {n: t.view_as(p) for n, t, p in zip(names, tensors, params)}
        losses = [torch.func.functional_call(model, weights, kwargs=b)["loss"] for b in batches]
        return sum(len(b["labels"]) * loss for b, loss in zip(batches, losses)) / total

    with sdpa_kernel(SDPBackend.MATH):  # the one attention kernel with a double backward
        return torch.autograd.functional.hessian(loss, torch.cat([p.flatten() for p in params])).numpy()


def test_lora_hessian_is_the_adapters():
    """On a network, against its whole Hessian in the LoRA adapter's weights (the only trainable ones)."""
    model, batches = lora_bert(), bert_batches()
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    h = exact_hessian(model, batches)
    eigenvalues = np.linalg.eigvalsh(h)
    largest = eigenvalues[np.abs(eigenvalues).argmax()]
    assert hessian_top_eigenvalue(model, batches, iters=1000, tol=1e-10) == pytest.approx(largest, rel=1e-6)
    samples = 200
    standard_error = math.sqrt(2 * ((h**2).sum() - (np.diag(h) ** 2).sum()) / samples)
    assert abs(hessian_trace(model, batches, samples=samples) - np.trace(h)) < 4 * standard_error


def test_works_under_no_grad(least_squares):
    model, _, _, batches = least_squares
    expected = (hessian_trace(model, batches, samples=2), sharpness(model, batches))
    with torch.no_grad():
        assert (hessian_trace(model, batches, samples=2), sharpness(model, batches)) == expected


@pytest.mark.parametrize("measure", MEASURES)
def test_rejects_bad_input_clearly(measure):
    model = tiny_bert()
    with pytest.raises(ValueError, match="empty"):
        MEASURES[measure](model, [])
    with pytest.raises(ValueError, match="returned no `loss`"):
        MEASURES[measure](model, [{k: v for k, v in b.items() if k != "labels"} for b in bert_batches()])
    with pytest.raises(TypeError, match="single dict"):
        MEASURES[measure](model, bert_batches()[0])


def test_progress_bar_after_a_moment(least_squares, monkeypatch, capsys):
    model, _, _, batches = least_squares
    hessian_trace(model, batches, samples=2)
    assert "Hessian trace" not in capsys.readouterr().err  # too quick to show
    monkeypatch.setattr(flatness, "_PROGRESS_DELAY_S", 0.0)
    hessian_trace(model, batches, samples=2)
    assert "Hessian trace" in capsys.readouterr().err
    hessian_trace(model, batches, samples=2, progress_bar=False)
    assert "Hessian trace" not in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# In the Trainer
# ---------------------------------------------------------------------------------------------

FLATNESS_KEYS = ["eval_hessian_top_eigenvalue", "eval_hessian_trace", "eval_sharpness"]


def flatness_args(tmp_path, **kwargs):
    kwargs.setdefault("msam_flatness_iters", 10)  # an evaluation's Hessian budget, cut from 100 to keep tests fast
    return MSAMTrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, per_device_eval_batch_size=4, max_steps=2,
        report_to="none", use_cpu=True, save_strategy="no", logging_steps=1, **kwargs,
    )


@pytest.mark.parametrize("rho", [0.0, 0.05])  # the flags work with a plain run (msam_rho=0) too
def test_trainer_flags_add_the_flatness_metrics(tmp_path, rho):
    args = flatness_args(
        tmp_path, msam_rho=rho, msam_micro_batch_size=2, msam_eval_flatness=True, msam_flatness_batches=2,
        msam_eval_landscape=True,
    )
    trainer = MSAMTrainer(model=tiny_bert(), args=args, train_dataset=bert_data(8), eval_dataset=bert_data(16, seed=2))
    trainer.train()
    registered = trainer.accelerator.gradient_state.dataloader_references
    metrics = trainer.evaluate()
    trainer.save_metrics("eval", metrics)
    # Taking the first batches left no evaluation dataloader registered in accelerate's gradient state.
    assert trainer.accelerator.gradient_state.dataloader_references == registered

    # The numbers are the functions', on the trained model and the first 2 evaluation batches.
    batches = list(trainer.get_eval_dataloader())[:2]
    assert metrics["eval_hessian_top_eigenvalue"] == hessian_top_eigenvalue(trainer.model, batches, iters=10)
    assert metrics["eval_hessian_trace"] == hessian_trace(trainer.model, batches, samples=10)
    # Sharpness at --msam_flatness_rho, one micro-batch per batch, whatever the run trained with.
    assert metrics["eval_sharpness"] == sharpness(trainer.model, batches, rho=0.05)
    assert metrics["eval_sharpness"] > 0 and metrics["eval_hessian_trace"] != 0
    # They reach the logs and all_results.json.
    logged = {k: v for log in trainer.state.log_history for k, v in log.items()}
    assert all(logged[k] == metrics[k] for k in FLATNESS_KEYS)
    with open(tmp_path / "all_results.json") as f:
        all_results = json.load(f)
    assert all(all_results[k] == metrics[k] for k in FLATNESS_KEYS)
    # The landscape of the last evaluation, at α = 0 its plain loss on those batches.
    landscape = LossLandscape.from_json(tmp_path / "loss_landscape.json")
    assert landscape.losses[10] == pytest.approx(plain_loss(trainer.model, batches), rel=1e-12)
    with Image.open(tmp_path / "loss_landscape.png") as image:
        assert image.format == "PNG"


def test_trainer_flatness_per_eval_dataset(tmp_path):
    args = flatness_args(tmp_path, msam_eval_flatness=True, msam_flatness_batches=1)
    eval_sets = {"a": bert_data(4, seed=2), "b": bert_data(4, seed=3)}
    trainer = MSAMTrainer(model=tiny_bert(), args=args, eval_dataset=eval_sets)
    metrics = trainer.evaluate()
    for name in eval_sets:
        assert all(f"eval_{name}_{k[len('eval_'):]}" in metrics for k in FLATNESS_KEYS)
    assert metrics["eval_a_hessian_trace"] != metrics["eval_b_hessian_trace"]
    assert not any(k in metrics for k in FLATNESS_KEYS)


def test_trainer_without_the_flags_adds_nothing(tmp_path):
    for args in (flatness_args(tmp_path), TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)):
        metrics = MSAMTrainer(model=tiny_bert(), args=args, eval_dataset=bert_data(8)).evaluate()
        assert "eval_loss" in metrics and not any(k in metrics for k in FLATNESS_KEYS)
    assert not (tmp_path / "loss_landscape.json").exists()


@pytest.mark.parametrize("field,value", [("msam_flatness_batches", 0), ("msam_flatness_iters", 0), ("msam_flatness_rho", 0.0)])
def test_flatness_settings_are_validated(tmp_path, field, value):
    with pytest.raises(ValueError, match=field):
        flatness_args(tmp_path, **{field: value})


def test_flatness_rho_sets_the_radius_of_eval_sharpness(tmp_path):
    args = flatness_args(tmp_path, msam_rho=0.0, msam_eval_flatness=True, msam_flatness_batches=1, msam_flatness_rho=0.2)
    trainer = MSAMTrainer(model=tiny_bert(), args=args, eval_dataset=bert_data(4, seed=2))
    metrics = trainer.evaluate()
    batches = list(trainer.get_eval_dataloader())[:1]
    assert metrics["eval_sharpness"] == sharpness(trainer.model, batches, rho=0.2)
    assert metrics["eval_sharpness"] != sharpness(trainer.model, batches, rho=0.05)


def test_trainer_weighs_causal_lm_batches_by_label_tokens(tmp_path):
    """A causal LM's loss is a mean over label tokens: the flatness of an evaluation is that of the mean over all
    tokens of its batches (as the Trainer's loss), not the mean of the batch means. Reference: the landscape at
    α = 0, the loss summed token by token in plain PyTorch."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16)  # fmt: skip
    model = LlamaForCausalLM(config).double()
    ids = torch.randint(0, 32, (4, 8))
    labels = ids.clone()
    labels[0, 2:] = -100  # batch 1 (rows 0, 1): 1 + 7 label tokens after the shift; batch 2: 7 + 7
    data = [{"input_ids": i, "labels": y} for i, y in zip(ids, labels)]
    args = MSAMTrainingArguments(
        output_dir=str(tmp_path), per_device_eval_batch_size=2, report_to="none", use_cpu=True, msam_rho=0.0,
        msam_eval_landscape=True, msam_flatness_batches=2,
    )  # fmt: skip
    trainer = MSAMTrainer(model=model, args=args, eval_dataset=data)
    trainer.evaluate()
    landscape = LossLandscape.from_json(tmp_path / "loss_landscape.json")

    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1]
        target = labels[:, 1:]
        nll = nn.functional.cross_entropy(logits.reshape(-1, 32), target.reshape(-1), ignore_index=-100, reduction="sum")
        token_mean = (nll / target.ne(-100).sum()).item()
        by_batch = [
            nn.functional.cross_entropy(logits[r].reshape(-1, 32), target[r].reshape(-1), ignore_index=-100).item()
            for r in (slice(0, 2), slice(2, 4))
        ]
    # (transformers' causal-LM loss takes the cross-entropy in float32, hence not 1e-12)
    assert landscape.losses[10] == pytest.approx(token_mean, rel=1e-7)
    assert abs(token_mean - sum(by_batch) / 2) > 1e-3  # the example-weighted mean would differ: the test can fail


@pytest.mark.parametrize("version, flag, refused", [
    (2, "msam_eval_flatness", None),  # FSDP2: finite differences of sharded gradients (tests/engine/test_fsdp2.py)
    (2, "msam_eval_landscape", "--msam_eval_landscape does not support FSDP2"),
    (1, "msam_eval_flatness", "--msam_eval_flatness need the whole, unsharded trainable weights.*FSDP1"),
])
def test_flatness_flags_under_fsdp(tmp_path, monkeypatch, version, flag, refused):
    """The trainer's decision (FSDP needs a GPU launch to construct for real: accelerate's state is mocked)."""
    import types

    trainer = MSAMTrainer(model=nn.Linear(2, 1), args=MSAMTrainingArguments(
        str(tmp_path), use_cpu=True, report_to="none", msam_rho=0.0, **{flag: True}))
    plugin = types.SimpleNamespace(fsdp_version=version)
    monkeypatch.setattr(trainer.accelerator, "state", types.SimpleNamespace(fsdp_plugin=plugin, is_fsdp2=version == 2))
    trainer.is_fsdp_enabled = True
    if refused is None:
        flatness.check_flatness_supported(trainer)
    else:
        with pytest.raises(NotImplementedError, match=refused):
            flatness.check_flatness_supported(trainer)
