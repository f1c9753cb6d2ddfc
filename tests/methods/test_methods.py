"""Each method and schedule equals an independent plain-PyTorch reference written from its paper (float64, SGD).

The references below use no hf_msam code: flat parameter vectors, torch.autograd.grad, and the update rule
of each paper's algorithm box, applied per micro-batch and weighted by micro-batch size like mSAM.
"""

import copy
import logging
import os

import pytest
from conftest import torchrun_ranks
import torch
import internals
from reference import MLP, ScalerAccelerator, flat, mlp_dataset, unflat
from transformers import Trainer, TrainerCallback, TrainingArguments

from hf_msam import MSAMTrainer, MSAMTrainingArguments

LR, RHO = 0.5, 0.3
TIGHT = dict(rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# The reference
# ---------------------------------------------------------------------------------------------


def params_of(model):
    return [p for p in model.parameters() if p.requires_grad]


def set_flat(model, vector):
    with torch.no_grad():
        for p, v in zip(params_of(model), unflat(vector, params_of(model))):
            p.copy_(v)


def grad_at(model, w, mb):
    """∇L_mb at the flat point w (the model is left at w)."""
    set_flat(model, w)
    return flat(torch.autograd.grad(model(**mb)["loss"], params_of(model)))


def micro_batches(batch, size):
    n = batch["labels"].shape[0]
    size = size or n
    return [({k: v[s : s + size] for k, v in batch.items()}, min(size, n - s) / n) for s in range(0, n, size)]


def stack(data):
    return {k: torch.stack([d[k] for d in data]) for k in data[0]}


class Reference:
    """One method's per-step gradient, from the paper, with state that crosses steps kept here."""

    def __init__(self, model, method, mbs, **h):
        self.model, self.method, self.mbs, self.h = model, method, mbs, h
        self.m = None  # F-SAM's EMA
        self.g_v, self.reuses_left = None, 0  # LookSAM

    def gradient(self, w, batch, rho=RHO, momentum=None):
        """`batch`, or a list of accumulation batches of one optimizer step (each weighted 1/len)."""
        batches = batch if isinstance(batch, list) else [batch]
        h, total = self.h, torch.zeros_like(w)
        looksam_sam_step = self.method == "looksam" and (self.g_v is None or self.reuses_left == 0)
        if self.method == "looksam":
            self.reuses_left = h["k"] - 1 if looksam_sam_step else self.reuses_left - 1
            new_g_v = torch.zeros_like(w)
        for mb, c in [(mb, c / len(batches)) for b in batches for mb, c in micro_batches(b, self.mbs)]:
            if self.method == "momentum":  # Becker et al.: e = −ρ m/‖m‖, one pass; no momentum yet: e = 0
                e = torch.zeros_like(w) if momentum is None else -rho * momentum / momentum.norm()
                total += c * grad_at(self.model, w + e, mb)
                continue
            g = grad_at(self.model, w, mb)
            if self.method == "looksam" and not looksam_sam_step:  # Liu et al.: g + α‖g‖/‖g_v‖ g_v
                total += c * (g + h["alpha"] * g.norm() / self.g_v.norm() * self.g_v)
                continue
            d = g
            if self.method == "fsam":  # Li et al.: d = g − σ m (m before this micro-batch); m ← λm + (1−λ)g
                d = g if self.m is None else g - h["sigma"] * self.m
                self.m = g.clone() if self.m is None else h["lmbda"] * self.m + (1 - h["lmbda"]) * g
            e = rho * d / (d.norm() + 1e-12)
            g_p = grad_at(self.model, w + e, mb)
            if self.method == "gsam":  # Zhuang et al.: g_p − α g_⊥, g_⊥ ⊥ g_p
                g_perp = g - (g @ g_p) / (g_p @ g_p) * g_p
                total += c * (g_p - h["alpha"] * g_perp)
            elif self.method == "looksam":  # SAM step; keep g_v = g_p − (‖g_p‖ cos θ) g/‖g‖
                new_g_v += c * (g_p - (g @ g_p) / (g @ g) * g)
                total += c * g_p
            else:
                total += c * g_p
        if looksam_sam_step:
            self.g_v = new_g_v
        set_flat(self.model, w)
        return total


def reference_run(model, data, steps, batch_size, method="sam", mbs=None, plain_steps=(), rhos=None, sgd_momentum=0.0, **h):
    """The weights after `steps` SGD steps (lr LR; optional momentum), step t on data[(t-1)B : tB]."""
    model = copy.deepcopy(model)
    ref = Reference(model, method, mbs, **h)
    w, buf = flat(params_of(model)).detach().clone(), None
    for t in range(1, steps + 1):
        batch = stack(data[(t - 1) * batch_size : t * batch_size])
        if t in plain_steps:
            g = sum(c * grad_at(model, w, mb) for mb, c in micro_batches(batch, None))
        else:
            g = ref.gradient(w, batch, rho=RHO if rhos is None else rhos[t - 1], momentum=buf)
        if sgd_momentum:  # torch.optim.SGD: buf ← μ·buf + g (buf ← g at first); w ← w − lr·buf
            buf = g.clone() if buf is None else sgd_momentum * buf + g
            g = buf
        w = w - LR * g
    return w


# ---------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------


def trainer_args(tmp_path, batch_size, steps, **kwargs):
    settings = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=batch_size, max_steps=steps, optim="sgd", learning_rate=LR,
        lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0, train_sampling_strategy="sequential",
        report_to="none", use_cpu=True, save_strategy="no", logging_strategy="no", disable_tqdm=True, msam_rho=RHO,
    )
    settings.update(kwargs)
    return MSAMTrainingArguments(**settings)


def train(model, data, tmp_path, batch_size, steps, trainer_cls=MSAMTrainer, **kwargs):
    trainer = trainer_cls(model=model, args=trainer_args(tmp_path, batch_size, steps, **kwargs), train_dataset=data)
    trainer.train()
    return flat(params_of(model)).detach()


def mlp(seed=0):
    torch.manual_seed(seed)
    return MLP().double()


CASES = {
    "sam": ({}, {}),
    "gsam": (dict(msam_method="gsam", msam_gsam_alpha=0.4), dict(alpha=0.4)),
    "fsam": (dict(msam_method="fsam", msam_fsam_lambda=0.6, msam_fsam_sigma=0.8), dict(lmbda=0.6, sigma=0.8)),
    "looksam": (dict(msam_method="looksam", msam_looksam_k=2, msam_looksam_alpha=0.7), dict(k=2, alpha=0.7)),
}


@pytest.mark.parametrize("method", list(CASES))
@pytest.mark.parametrize("mbs", [None, 2])
def test_method_matches_its_paper(tmp_path, method, mbs):
    flags, h = CASES[method]
    model, data = mlp(), mlp_dataset(15)
    expected = reference_run(model, data, 3, 5, method=method, mbs=mbs, **h)
    got = train(model, data, tmp_path, 5, 3, msam_micro_batch_size=mbs, **flags)
    torch.testing.assert_close(got, expected, **TIGHT)


@pytest.mark.parametrize("mbs", [None, 2])
def test_momentum_sam_matches_its_paper(tmp_path, mbs):
    model, data = mlp(), mlp_dataset(15)
    expected = reference_run(model, data, 3, 5, method="momentum", mbs=mbs, sgd_momentum=0.9)
    got = train(model, data, tmp_path, 5, 3, msam_micro_batch_size=mbs, msam_method="momentum", optim_args="momentum=0.9")
    torch.testing.assert_close(got, expected, **TIGHT)


def test_methods_differ_from_sam(tmp_path):
    """Guards the references: with these settings every method takes a different 3-step path than SAM."""
    model, data = mlp(), mlp_dataset(15)
    sam = reference_run(model, data, 3, 5, mbs=2)
    for method, (_, h) in CASES.items():
        if method != "sam":
            assert not torch.allclose(reference_run(model, data, 3, 5, method=method, mbs=2, **h), sam, rtol=1e-6, atol=0), method
    momentum = reference_run(model, data, 3, 5, method="momentum", mbs=2, sgd_momentum=0.9)
    assert not torch.allclose(momentum, reference_run(model, data, 3, 5, method="sam", mbs=2, plain_steps=(1, 2, 3), sgd_momentum=0.9))


@pytest.mark.parametrize("method", ["gsam", "fsam", "looksam"])
def test_gradient_accumulation_holds_for_stateful_and_explicit_methods(tmp_path, method):
    """GA = 2: each accumulation step perturbs on its own; LookSAM decides SAM/reuse once per optimizer step."""
    flags, h = CASES[method]
    model, data = mlp(), mlp_dataset(24)
    ref_model = copy.deepcopy(model)
    ref = Reference(ref_model, method, 3, **h)
    w = flat(params_of(ref_model)).detach().clone()
    for t in range(3):
        halves = [stack(data[8 * t : 8 * t + 4]), stack(data[8 * t + 4 : 8 * t + 8])]
        w = w - LR * ref.gradient(w, halves)
    got = train(model, data, tmp_path, 4, 3, gradient_accumulation_steps=2, msam_micro_batch_size=3, **flags)
    torch.testing.assert_close(got, w, **TIGHT)


@pytest.mark.parametrize("method", ["gsam", "looksam"])
def test_fp16_loss_scale_applies_to_explicit_descents(method):
    """Under fp16 scaling g and g_p are unscaled before GSAM/LookSAM combine them, and the descent is scaled back."""
    from hf_msam import MicroBatchSAM, build_method

    torch.manual_seed(0)
    model = MLP()
    batch = {"x": torch.randn(6, 6), "labels": torch.randint(0, 3, (6,))}
    model64 = copy.deepcopy(model).double()
    flags, h = CASES[method]
    expected = Reference(model64, method, 3, **h).gradient(flat(params_of(model64)).detach(), {"x": batch["x"].double(), "labels": batch["labels"]}, rho=0.1)
    ascent, descent = build_method(method, rho=0.1, gsam_alpha=0.4, looksam_k=2, looksam_alpha=0.7)
    MicroBatchSAM(model, micro_batch_size=3, accelerator=ScalerAccelerator(2.0**12), perturbation=ascent, descent=descent).backward(batch, lambda mb: model(**mb)["loss"])
    got = flat(p.grad for p in model.parameters()) / 2.0**12
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", ["sam", "gsam", "fsam", "looksam", "momentum"])
def test_frozen_parameters_are_never_perturbed_nor_updated(method):
    from hf_msam import MicroBatchSAM, build_method

    torch.manual_seed(0)
    model = MLP().double()
    model.fc1.requires_grad_(False)
    seen = []
    model.fc1.register_forward_pre_hook(lambda m, args: seen.append(m.weight.detach().clone()))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    ascent, descent = build_method(method, rho=1.0, looksam_k=2)
    sam = MicroBatchSAM(model, micro_batch_size=2, perturbation=ascent, descent=descent, optimizer=optimizer)
    for step in range(3):  # momentum: no momentum at step 1; looksam: SAM, reuse, SAM
        sam.backward(stack(mlp_dataset(4, seed=step)), lambda mb: model(**mb)["loss"])
        optimizer.step()
        optimizer.zero_grad()
    assert len(seen) > 3 and all(torch.equal(seen[0], s) for s in seen)
    assert model.fc1.weight.grad is None


def test_momentum_needs_an_optimizer_with_momentum(tmp_path):
    with pytest.raises(ValueError, match="--msam_method momentum"):
        train(mlp(), mlp_dataset(5), tmp_path, 5, 1, msam_method="momentum")  # plain SGD keeps no momentum


@pytest.mark.parametrize(
    "optim, alpha, user_optimizer, warned",
    [
        ("adamw_torch", 0.7, None, True), ("adamw_torch", 0.1, None, False), ("sgd", 0.7, None, False),
        ("sgd", 0.7, "adam", True), ("adamw_torch", 0.7, "sgd", False),  # the optimizer in use decides, not --optim
    ],
)  # fmt: skip
def test_looksam_warns_with_adam_type_optimizers_above_alpha_0_1(tmp_path, caplog, optim, alpha, user_optimizer, warned):
    """LookSAM's paper alpha stalled AdamW in the study (loss flat at ln 10): the trainer says so at its first step."""
    model = mlp()
    optimizer = {"adam": lambda: torch.optim.Adam(model.parameters(), lr=LR), "sgd": lambda: torch.optim.SGD(model.parameters(), lr=LR)}
    args = trainer_args(tmp_path, 5, 1, msam_method="looksam", msam_looksam_alpha=alpha, optim=optim)
    trainer = MSAMTrainer(model=model, args=args, train_dataset=mlp_dataset(5),
                          optimizers=(optimizer[user_optimizer](), None) if user_optimizer else (None, None))  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="hf_msam"):
        trainer.train()
    assert ("LookSAM with an Adam-type optimizer" in caplog.text) == warned, caplog.text


def test_looksam_warning_reads_the_descent_rule_in_use(tmp_path, caplog):
    from hf_msam import LookSAMDescent

    model = mlp()
    args = trainer_args(tmp_path, 5, 1, msam_method="looksam", optim="adamw_torch")  # args' alpha: 0.7
    trainer = MSAMTrainer(model=model, args=args, train_dataset=mlp_dataset(5), descent=LookSAMDescent(alpha=0.05))
    with caplog.at_level(logging.WARNING, logger="hf_msam"):
        trainer.train()
    assert "LookSAM with an Adam-type optimizer" not in caplog.text


# ---------------------------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------------------------


def test_interval_perturbs_every_kth_step(tmp_path):
    model, data = mlp(), mlp_dataset(20)
    expected = reference_run(model, data, 4, 5, mbs=2, plain_steps=(2, 4))  # interval 2: steps 1 and 3 perturbed
    got = train(copy.deepcopy(model), data, tmp_path, 5, 4, msam_micro_batch_size=2, msam_interval=2)
    torch.testing.assert_close(got, expected, **TIGHT)
    expected3 = reference_run(model, data, 4, 5, mbs=2, plain_steps=(2, 3))  # interval 3: steps 1 and 4
    got3 = train(copy.deepcopy(model), data, tmp_path, 5, 4, msam_micro_batch_size=2, msam_interval=3)
    torch.testing.assert_close(got3, expected3, **TIGHT)


def test_start_makes_the_early_steps_plain(tmp_path):
    model, data = mlp(), mlp_dataset(20)
    expected = reference_run(model, data, 4, 5, method="gsam", mbs=2, plain_steps=(1, 2), alpha=0.4)
    got = train(model, data, tmp_path, 5, 4, msam_micro_batch_size=2, msam_start=0.5, msam_method="gsam", msam_gsam_alpha=0.4)
    torch.testing.assert_close(got, expected, **TIGHT)


class Snapshots(TrainerCallback):
    def __init__(self):
        self.weights = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.weights.append([p.detach().clone() for p in model.parameters()])


def test_plain_steps_of_a_schedule_are_bitwise_the_plain_trainer(tmp_path):
    """start 0.5 of 4 steps: steps 1-2 are the Trainer's own; interval 2: step 2 is."""
    data = mlp_dataset(20)
    common = dict(per_device_train_batch_size=5, max_steps=4, learning_rate=1e-2, report_to="none", use_cpu=True,
                  save_strategy="no", logging_strategy="no", seed=3, disable_tqdm=True)
    runs = {}
    for name, cls, args in [
        ("plain", Trainer, TrainingArguments(str(tmp_path / "a"), **common)),
        ("start", MSAMTrainer, MSAMTrainingArguments(str(tmp_path / "b"), msam_start=0.5, msam_micro_batch_size=2, **common)),
    ]:
        snaps = Snapshots()
        cls(model=mlp(), args=args, train_dataset=data, callbacks=[snaps]).train()
        runs[name] = snaps.weights
    for step in (0, 1):  # after steps 1 and 2: bitwise equal
        assert all(torch.equal(a, b) for a, b in zip(runs["plain"][step], runs["start"][step])), step
    assert not all(torch.equal(a, b) for a, b in zip(runs["plain"][2], runs["start"][2]))  # step 3 is perturbed


def test_rho_follows_the_learning_rate(tmp_path):
    model, data = mlp(), mlp_dataset(15)
    # linear decay without warmup: lr_t = LR·(1 − (t − 1)/3), so ρ_t = ρ·(1 − (t − 1)/3); the reference
    # steps with the same decaying lr
    rhos = [RHO * (1 - (t - 1) / 3) for t in (1, 2, 3)]
    ref_model = copy.deepcopy(model)
    ref = Reference(ref_model, "sam", 2)
    w = flat(params_of(ref_model)).detach().clone()
    for t in (1, 2, 3):
        batch = stack(data[(t - 1) * 5 : t * 5])
        w = w - LR * (1 - (t - 1) / 3) * ref.gradient(w, batch, rho=rhos[t - 1])
    got = train(model, data, tmp_path, 5, 3, msam_micro_batch_size=2, msam_rho_schedule="lr", lr_scheduler_type="linear")
    torch.testing.assert_close(got, w, **TIGHT)


def test_rho_following_a_zero_learning_rate_perturbs_nothing(tmp_path, caplog):
    """--msam_rho_schedule lr with --learning_rate 0: ρ_t = ρ·0/0 is taken as 0 (no ZeroDivisionError): the run
    trains like the plain Trainer (weights unchanged, the same logged losses) with a zero sharpness, and says so."""
    data = mlp_dataset(10)
    common = dict(learning_rate=0.0, logging_strategy="steps", logging_steps=1)
    settings = dict(per_device_train_batch_size=5, max_steps=2, optim="sgd", lr_scheduler_type="linear",
                    train_sampling_strategy="sequential", report_to="none", use_cpu=True, save_strategy="no",
                    disable_tqdm=True, **common)  # fmt: skip
    plain = Trainer(model=mlp(), args=TrainingArguments(str(tmp_path / "plain"), **settings), train_dataset=data)
    plain.train()
    model = mlp()
    before = flat(params_of(model)).detach().clone()
    trainer = MSAMTrainer(model=model, args=MSAMTrainingArguments(str(tmp_path / "msam"), msam_rho=RHO, msam_micro_batch_size=2,
                          msam_method="fsam", msam_rho_schedule="lr", **settings), train_dataset=data)  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="hf_msam"):
        trainer.train()
    assert "--msam_rho_schedule lr" in caplog.text and "--learning_rate is 0.0" in caplog.text
    assert torch.equal(flat(params_of(model)), before)
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    plain_logs = [entry for entry in plain.state.log_history if "loss" in entry]
    assert len(logs) == 2 and [e["loss"] for e in logs] == [e["loss"] for e in plain_logs]
    assert all(e["msam/sharpness"] == 0.0 and e["msam/skipped_perturbations"] == 0 for e in logs)


def test_rho_schedule_of_a_zero_maximum_is_zero_without_host_sync():
    from reference import host_syncs

    from hf_msam import Schedule

    schedule, calls = Schedule(rho_schedule="lr"), []
    with host_syncs(calls):
        zero = schedule.rho(RHO, torch.tensor(0.0), torch.tensor(0.0))
        half = schedule.rho(RHO, torch.tensor(0.25), torch.tensor(0.5))
    assert calls == []
    assert zero.item() == 0.0 and half.item() == pytest.approx(RHO / 2)
    assert schedule.rho(RHO, 0.0, 0.0) == 0.0 and schedule.rho(RHO, 0.25, 0.5) == pytest.approx(RHO / 2)


# ---------------------------------------------------------------------------------------------
# State across steps: checkpoint, resume
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags",
    [dict(msam_method="looksam", msam_looksam_k=3), dict(msam_method="fsam", msam_fsam_lambda=0.5)],
    ids=["looksam", "fsam"],
)
def test_resume_equals_the_uninterrupted_run(tmp_path, flags):
    data = mlp_dataset(20)
    kwargs = dict(msam_micro_batch_size=2, save_strategy="steps", save_steps=2, **flags)
    whole = train(mlp(), data, tmp_path / "whole", 5, 4, **kwargs)
    checkpoint = tmp_path / "whole" / "checkpoint-2"
    assert (checkpoint / "msam_state_0.pt").is_file()

    def resumed(drop_state=False):
        if drop_state:
            os.remove(checkpoint / "msam_state_0.pt")
        model = mlp(seed=1)  # other weights: the checkpoint must bring them back
        trainer = MSAMTrainer(model=model, args=trainer_args(tmp_path / "whole", 5, 4, **kwargs), train_dataset=data)
        trainer.train(resume_from_checkpoint=str(checkpoint))
        return flat(params_of(model)).detach()

    assert torch.equal(resumed(), whole)
    assert not torch.allclose(resumed(drop_state=True), whole, rtol=1e-8, atol=0)  # the saved state mattered


def fsam_checkpoint(tmp_path):
    """A 4-step F-SAM run saving at step 2: its checkpoint-2, the settings, the data and the final weights."""
    data, kwargs = mlp_dataset(20), dict(msam_micro_batch_size=2, save_strategy="steps", save_steps=2, msam_method="fsam", msam_fsam_lambda=0.5)
    whole = train(mlp(), data, tmp_path / "whole", 5, 4, **kwargs)
    return tmp_path / "whole" / "checkpoint-2", kwargs, data, whole


def resume(tmp_path, checkpoint, kwargs, data):
    model = mlp(seed=1)  # other weights: the checkpoint must bring them back
    trainer = MSAMTrainer(model=model, args=trainer_args(tmp_path / "whole", 5, 4, **kwargs), train_dataset=data)
    trainer.train(resume_from_checkpoint=str(checkpoint))
    return flat(params_of(model)).detach()


def test_missing_state_file_warns_and_the_state_restarts(tmp_path, caplog):
    checkpoint, kwargs, data, _ = fsam_checkpoint(tmp_path)
    os.remove(checkpoint / "msam_state_0.pt")
    with caplog.at_level(logging.WARNING, logger="hf_msam"):
        got = resume(tmp_path, checkpoint, kwargs, data)
    assert "has no msam_state_0.pt for process 0" in caplog.text and "FriendlyPerturbation restarts" in caplog.text
    # Reference: F-SAM's EMA for steps 1-2, then a fresh one (m = None) for steps 3-4.
    model = mlp()
    w = flat(params_of(model)).detach().clone()
    for t in range(1, 5):
        ref = Reference(copy.deepcopy(model), "fsam", 2, lmbda=0.5, sigma=1.0) if t in (1, 3) else ref
        w = w - LR * ref.gradient(w, stack(data[(t - 1) * 5 : t * 5]))
    torch.testing.assert_close(got, w, **TIGHT)


def damage(path, how):
    if how == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        return "cannot be read.*truncated or corrupt"
    if how == "not a torch file":
        path.write_text("hello")
        return "cannot be read"
    state = torch.load(path, weights_only=True)
    if how == "short":
        state["perturbation"]["m"] = state["perturbation"]["m"][:-1]
        message = "'m' has 3 tensors for the model's 4 trainable parameters"
    elif how == "shape":
        state["perturbation"]["m"][1] = state["perturbation"]["m"][1][:2]
        message = r"'m'\[1\] has shape \(2,\), its parameter \(8,\)"
    elif how == "nan":
        state["perturbation"]["m"][2][0, 0] = float("nan")
        message = "'m' has non-finite entries"
    elif how == "inf":
        state["perturbation"]["m"][0][0, 0] = float("inf")
        message = "'m' has non-finite entries"
    torch.save(state, path)
    return message


@pytest.mark.parametrize("how", ["truncated", "not a torch file", "short", "shape", "nan", "inf"])
def test_damaged_state_file_is_refused_naming_it_and_how_to_continue(tmp_path, how):
    checkpoint, kwargs, data, whole = fsam_checkpoint(tmp_path)
    path = checkpoint / "msam_state_0.pt"
    message = damage(path, how)
    with pytest.raises(ValueError, match=message) as err:
        resume(tmp_path, checkpoint, kwargs, data)
    assert str(path) in str(err.value) and f"Delete {path} to restart the method's state" in str(err.value)
    os.remove(path)  # as the message says: the run then resumes with the state restarted
    resume(tmp_path, checkpoint, kwargs, data)


def test_looksam_state_with_a_negative_counter_is_refused(tmp_path):
    data, kwargs = mlp_dataset(20), dict(msam_micro_batch_size=2, save_strategy="steps", save_steps=2, msam_method="looksam", msam_looksam_k=3)
    train(mlp(), data, tmp_path / "whole", 5, 4, **kwargs)
    path = tmp_path / "whole" / "checkpoint-2" / "msam_state_0.pt"
    state = torch.load(path, weights_only=True)
    state["descent"]["reuses_left"] = -1  # would never take a SAM step again
    torch.save(state, path)
    with pytest.raises(ValueError, match=f"{path}.*reuses_left must be a whole number >= 0, got -1.*Delete"):
        resume(tmp_path, path.parent, kwargs, data)


def test_state_file_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    """The state file is written to a temporary file in the checkpoint and renamed: a save that dies half-way leaves
    the previous file as it was and no temporary file."""
    checkpoint, kwargs, data, _ = fsam_checkpoint(tmp_path)
    path = checkpoint / "msam_state_0.pt"
    before = path.read_bytes()
    trainer = MSAMTrainer(model=mlp(), args=trainer_args(tmp_path / "other", 5, 4, **kwargs), train_dataset=data)
    trainer.msam_perturbation.load_state_dict(torch.load(path, weights_only=True)["perturbation"])
    real_save = torch.save

    def dies_half_way(obj, f, *args, **kw):
        if isinstance(f, (str, os.PathLike)):  # the Trainer's own RNG state
            return real_save(obj, f, *args, **kw)
        f.write(before[: len(before) // 2])
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        internals.save_checkpoint_state(trainer, str(checkpoint))
    assert path.read_bytes() == before and sorted(p.name for p in checkpoint.glob("msam_state*")) == ["msam_state_0.pt"]
    monkeypatch.setattr(torch, "save", real_save)
    internals.save_checkpoint_state(trainer, str(checkpoint))
    assert torch.load(path, weights_only=True)["world_size"] == 1


# ---------------------------------------------------------------------------------------------
# Flags that do not combine
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,flag",
    [
        (dict(msam_method="lookahead"), "--msam_method"),
        (dict(msam_start=1.0), "--msam_start"),
        (dict(msam_start=-0.1), "--msam_start"),
        (dict(msam_interval=0), "--msam_interval"),
        (dict(msam_interval=1.5), "--msam_interval"),
        (dict(msam_rho_schedule="cosine"), "--msam_rho_schedule"),
        (dict(msam_gsam_alpha=-1.0), "--msam_gsam_alpha"),
        (dict(msam_fsam_lambda=1.0), "--msam_fsam_lambda"),
        (dict(msam_fsam_sigma=float("nan")), "--msam_fsam_sigma"),
        (dict(msam_looksam_k=0), "--msam_looksam_k"),
        (dict(msam_looksam_alpha=-0.5), "--msam_looksam_alpha"),
        (dict(msam_method="fsam", msam_adaptive=True), "--msam_adaptive"),
        (dict(msam_method="momentum", msam_adaptive=True), "--msam_adaptive"),
        (dict(msam_method="looksam", msam_interval=2), "--msam_interval"),
    ],
)
def test_bad_values_and_combinations_raise_naming_the_flag(tmp_path, kwargs, flag):
    with pytest.raises(ValueError, match=flag):
        MSAMTrainingArguments(str(tmp_path), **kwargs)


# ---------------------------------------------------------------------------------------------
# Two processes (gloo): a stateful method keeps its state per device, and the ranks stay in sync
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_process_ddp_looksam_matches_per_device_reference(tmp_path):
    ranks = torchrun_ranks(tmp_path, "ddp_method_script.py")
    assert ranks[0]["world_size"] == 2 and len(ranks[0]["batches"]) == 3
    assert not torch.equal(ranks[0]["batches"][0]["x"], ranks[1]["batches"][0]["x"])
    for a, b in zip(ranks[0]["final"], ranks[1]["final"]):
        assert torch.equal(a, b)  # all-reduced once per step: the ranks end bitwise in sync

    # Reference: each device runs LookSAM on its own micro-batches with its own g_v; DDP averages the descents.
    model = MLP().double()
    set_flat(model, flat(ranks[0]["initial"]))
    refs = [Reference(copy.deepcopy(model), "looksam", 3, k=2, alpha=0.7) for _ in ranks]
    w = flat(ranks[0]["initial"])
    for step in range(3):
        grads = [ref.gradient(w, r["batches"][step], rho=0.2) for ref, r in zip(refs, ranks)]
        w = w - 0.5 * (grads[0] + grads[1]) / 2
    torch.testing.assert_close(flat(ranks[0]["final"]), w, **TIGHT)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_process_resume_of_stateful_methods_and_a_changed_process_count(tmp_path, caplog):
    """F-SAM, LookSAM and Momentum-SAM on 2 processes: each rank saves and restores its own state, so the resumed run
    ends bitwise where the uninterrupted one does, which equals the per-device reference. Resuming with another number
    of processes (1 -> 2, 2 -> 1) warns and restarts the method's state."""
    one = tmp_path / "one"  # a 1-process F-SAM checkpoint, for the 2-process resume
    train(mlp(), mlp_dataset(8), one, 4, 2, msam_method="fsam", msam_micro_batch_size=3, save_strategy="steps", save_steps=2)
    ranks = torchrun_ranks(tmp_path, "ddp_resume_script.py", str(one / "checkpoint-2"), timeout=600)
    assert ranks[0]["world_size"] == 2
    for method, h in [("fsam", dict(lmbda=0.5, sigma=1.0)), ("looksam", dict(k=3, alpha=0.7)), ("momentum", {})]:
        if method != "momentum":
            assert (tmp_path / method / "checkpoint-2" / "msam_state_1.pt").is_file()
        for r in ranks:  # resumed on 2 processes: bitwise the uninterrupted run, on each rank
            assert torch.equal(flat(r["resumed"][method]), flat(r["whole"][method])), method
        assert torch.equal(flat(ranks[0]["whole"][method]), flat(ranks[1]["whole"][method]))
        # Reference: each device keeps its own method state; DDP averages the gradients; SGD with momentum 0.9.
        model = MLP().double()
        set_flat(model, flat(ranks[0]["initial"][method]))
        refs = [Reference(copy.deepcopy(model), method, 3, **h) for _ in ranks]
        w, buf = flat(ranks[0]["initial"][method]), None
        for step in range(4):
            g = sum(ref.gradient(w, r["batches"][method][step], rho=0.2, momentum=buf) for ref, r in zip(refs, ranks)) / 2
            buf = g.clone() if buf is None else 0.9 * buf + g
            w = w - 0.5 * buf
        torch.testing.assert_close(flat(ranks[0]["whole"][method]), w, **TIGHT)
    assert all(not r["resume_warnings"] for r in ranks), [r["resume_warnings"] for r in ranks]
    # 1 -> 2 processes: rank 0 finds the state of 1 process, rank 1 none; both restart it.
    assert all(r["grown_state"] == {"m": None} for r in ranks)
    assert any("holds the mSAM method state of 1 process(es)" in m and "this run has 2" in m for m in ranks[0]["grown_warnings"])
    assert any("has no msam_state_1.pt for process 1" in m and "restarts" in m for m in ranks[1]["grown_warnings"])
    # 2 -> 1 process: the F-SAM checkpoint of the 2-process run, resumed here.
    trainer = MSAMTrainer(model=mlp(), args=trainer_args(tmp_path / "shrunk", 4, 2, msam_method="fsam", msam_micro_batch_size=3),
                          train_dataset=mlp_dataset(8))  # fmt: skip
    at_start = []

    class StateAtStart(TrainerCallback):  # the method's state once the checkpoint is loaded, before any step
        def on_train_begin(self, *args, **kwargs):
            at_start.append(trainer.msam_perturbation.state_dict())

    trainer.add_callback(StateAtStart())
    with caplog.at_level(logging.WARNING, logger="hf_msam"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "fsam" / "checkpoint-2"))
    assert "holds the mSAM method state of 2 process(es)" in caplog.text and "FriendlyPerturbation restarts" in caplog.text
    assert at_start == [{"m": None}]


def test_fsam_ema_starts_at_the_first_usable_gradient():
    """A skipped first micro-batch (zero gradient, e.g. an fp16 overflow) must not start F-SAM's EMA at 0: the
    second micro-batch starts it, m = g_2, and the third climbs along g_3 − σ·g_2 (Li et al., Algorithm 1)."""
    from hf_msam import MicroBatchSAM, build_method

    torch.manual_seed(0)
    model = MLP().double()
    batch = stack(mlp_dataset(6, seed=1))
    scale = {"i": 0}

    def loss_fn(mb):  # the first micro-batch's loss (both passes) is multiplied by 0: g_1 = 0
        scale["i"] += 1
        return model(**mb)["loss"] * (0.0 if scale["i"] <= 2 else 1.0)

    ascent, descent = build_method("fsam", rho=RHO, fsam_sigma=1.0, fsam_lambda=0.9)
    MicroBatchSAM(model, micro_batch_size=2, perturbation=ascent, descent=descent).backward(batch, loss_fn)
    params = [p for p in model.parameters() if p.requires_grad]
    mbs = [mb for mb, _ in micro_batches(batch, 2)]
    g2 = flat(torch.autograd.grad(model(**mbs[1])["loss"], params))
    g3 = flat(torch.autograd.grad(model(**mbs[2])["loss"], params))
    torch.testing.assert_close(flat(ascent.m), 0.9 * g2 + 0.1 * g3, **TIGHT)
    assert ascent.m[0].dtype == torch.float64 and bool(ascent.started)


def test_momentum_refuses_an_optimizer_that_keeps_its_momentum_under_other_names():
    from hf_msam import MicroBatchSAM, build_method

    class EightBitLike(torch.optim.SGD):  # keeps its first moment as `state1`, like bitsandbytes' 8-bit Adam
        def step(self, closure=None):
            super().step(closure)
            for group in self.param_groups:
                for p in group["params"]:
                    self.state[p]["state1"] = torch.zeros_like(p)

    torch.manual_seed(0)
    model = MLP().double()
    optimizer = EightBitLike(model.parameters(), lr=0.1)
    ascent, descent = build_method("momentum", rho=RHO)
    sam = MicroBatchSAM(model, perturbation=ascent, descent=descent, optimizer=optimizer)
    batch = stack(mlp_dataset(4, seed=1))
    sam.backward(batch, lambda mb: model(**mb)["loss"])  # no momentum yet: a plain step
    optimizer.step()
    with pytest.raises(ValueError, match="state1"):
        sam.backward(batch, lambda mb: model(**mb)["loss"])
