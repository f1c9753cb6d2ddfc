"""How the trainer chooses its path by default (`--msam_vectorize auto`): vectorized where the step is known to be
the same, one pass per micro-batch otherwise (SAM, a loss written by the user, too little GPU memory), with the
update the sequential step's either way."""

import copy
import types

import pytest
import torch
import internals
from test_trainer_reference import bert_data, sgd_args, tiny_bert, trainable

from hf_msam import MicroBatchSAM, MSAMTrainer


def run(model, tmp_path, name, trainer_cls=MSAMTrainer, steps=1, **flags):
    args = sgd_args(tmp_path / name, 7, msam_rho=0.1, **flags)
    args.max_steps = steps
    trainer = trainer_cls(model=model, args=args, train_dataset=bert_data(7 * steps))
    trainer.train()
    return trainer


def test_auto_vectorizes_micro_batches_and_keeps_the_sam_path_for_one(tmp_path):
    """The default (no --msam_vectorize given: auto) takes the vectorized step with micro-batches, the sequential
    step's update, and the two-pass SAM step without them."""
    auto, off = tiny_bert(), tiny_bert()
    vectorized = run(auto, tmp_path, "auto", steps=2, msam_micro_batch_size=3)
    run(off, tmp_path, "off", steps=2, msam_micro_batch_size=3, msam_vectorize="off")
    assert vectorized.msam_engine.path == "vectorized"
    for a, b in zip(trainable(auto), trainable(off)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)
    sam = run(tiny_bert(), tmp_path, "sam")  # no micro-batch size: one micro-batch, the two-pass SAM step
    assert sam.msam_engine.path == "sequential" and "one micro-batch" in sam.msam_engine.path_reason


class OwnLoss(MSAMTrainer):
    """A loss written by the user (here a per-example mean with a weight per class, decomposable, but the trainer
    cannot know that)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        weight = torch.tensor([1.0, 2.0], dtype=outputs.logits.dtype)
        loss = torch.nn.functional.cross_entropy(outputs.logits, labels, weight=weight, reduction="none").mean()
        return (loss, outputs) if return_outputs else loss


def test_a_users_own_loss_is_not_vectorized_by_auto_but_by_on(tmp_path):
    auto = run(tiny_bert(), tmp_path, "auto", OwnLoss, msam_micro_batch_size=3)
    assert auto.msam_engine.path == "sequential" and "the user's own" in auto.msam_engine.path_reason
    on, off = tiny_bert(), tiny_bert()
    assert run(on, tmp_path, "on", OwnLoss, msam_micro_batch_size=3, msam_vectorize="on").msam_engine.path == "vectorized"
    run(off, tmp_path, "off", OwnLoss, msam_micro_batch_size=3, msam_vectorize="off")
    for a, b in zip(trainable(on), trainable(off)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


def test_auto_on_a_gpu_keeps_the_sequential_step_when_k_copies_do_not_fit(monkeypatch):
    """The decision reads the GPU's free memory once per number of micro-batches (mocked here: CI has no GPU)."""
    sam = MicroBatchSAM(torch.nn.Linear(4, 4), micro_batch_size=2, vectorize="auto")
    params = [types.SimpleNamespace(device=torch.device("cuda"), numel=lambda: 1000, element_size=lambda: 4)]
    free = {"bytes": 20_000}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (free["bytes"], 10**9))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 0)
    assert sam.vectorized.memory_problem(params, 2) is None  # 8 kB of stacked copies, 20 kB free
    reason = sam.vectorized.memory_problem(params, 4)  # 16 kB
    assert "4 stacked copies" in reason and "half of the free GPU memory" in reason
    free["bytes"] = 10**9
    assert sam.vectorized.memory_problem(params, 4) == reason  # decided once per k: the path does not change mid-run
    sam.vectorize = "on"
    assert sam.vectorized.memory_problem(params, 8) is None  # "on": the user's choice


@pytest.mark.parametrize("vectorize", ["auto", "on"])
def test_engine_default_stays_off_for_hand_written_loops(vectorize):
    """MicroBatchSAM cannot see the loss function: it vectorizes only when asked."""
    model = torch.nn.Linear(3, 2).double()
    batch = {"x": torch.randn(4, 3, dtype=torch.float64), "y": torch.randn(4, 2, dtype=torch.float64)}
    loss_fn = lambda mb: torch.nn.functional.mse_loss(model(mb["x"]), mb["y"])  # noqa: E731
    default = MicroBatchSAM(model, micro_batch_size=2)
    default.backward(batch, loss_fn)
    assert default.path == "sequential" and "vectorize='off'" in default.path_reason
    asked = MicroBatchSAM(model, micro_batch_size=2, vectorize=vectorize)
    asked.backward(batch, loss_fn)
    assert asked.path == "vectorized"


def test_momentum_sam_checks_the_model_once_although_it_has_no_clean_pass():
    """Momentum-SAM takes no pass at w, so its first vectorized step makes one forward at w to check that the routed
    layers see every use of the weights; a weight read outside its layer then falls back before anything moves."""
    from test_vectorized_arch import VOCAB, DirectRead, Net

    from hf_msam.methods.momentum import MomentumPerturbation

    ids = torch.randint(0, VOCAB, (4, 5), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": torch.arange(4) % 3}
    grads = {}
    for name, middle in (("plain", None), ("reads-outside", DirectRead)):
        for vectorize in ("auto", "off"):
            torch.manual_seed(0)
            model = (Net() if middle is None else Net(middle())).double()
            optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
            model(**batch)["loss"].backward()
            optimizer.step()  # a momentum to perturb along
            optimizer.zero_grad()
            sam = MicroBatchSAM(model, micro_batch_size=2, vectorize=vectorize, optimizer=optimizer,
                                perturbation=MomentumPerturbation(rho=0.1))
            sam.backward(batch, lambda mb: model(**mb)["loss"])
            grads[name, vectorize] = ([p.grad for p in model.parameters()], sam.path, sam.path_reason)
    assert grads["plain", "auto"][1] == "vectorized"
    for a, b in zip(grads["plain", "auto"][0], grads["plain", "off"][0]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)
    assert grads["reads-outside", "auto"][1] == "sequential" and "outside the layer calls" in grads["reads-outside", "auto"][2]
    for a, b in zip(grads["reads-outside", "auto"][0], grads["reads-outside", "off"][0]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("loss_type, expected", [("sigmoid", True), (["sigmoid", "sft"], False), ("aot", False),
                                                 ("aot_unpaired", False)])
def test_preference_losses_across_pairs_are_not_vectorized(loss_type, expected):
    """TRL's AOT losses sort the batch's log-ratios and its "sft" term is one token mean over the batch: not a sum
    over micro-batches of pairs, so `auto` must not take the vectorized step for them."""
    from hf_msam.trainer import MSAMMixin

    class PreferenceTrainer(MSAMMixin):
        def compute_loss(self, *args, **kwargs):  # stands for TRL's DPOTrainer.compute_loss
            raise NotImplementedError

    PreferenceTrainer.__module__ = "trl.trainer.dpo_trainer"
    trainer = PreferenceTrainer.__new__(PreferenceTrainer)
    trainer.args = types.SimpleNamespace(loss_type=loss_type)
    cut = types.SimpleNamespace(layout="pairs")
    assert internals.decomposable(trainer, {}, cut, None, False) is expected


def test_a_model_found_unfit_at_a_forward_is_not_tried_again_and_its_pass_is_discarded():
    """A weight read outside its layer is found in the graph of the first vectorized pass: the step then starts again
    with one pass per micro-batch and calls `on_discard` once (a trainer drops that pass's metrics there; TRL's fused
    LM head is such a model). Later steps take one pass per micro-batch at once, with the same reason: no pass is
    spent on the vectorized path again. The gradient of every step is the `off` one's."""
    from test_vectorized_arch import VOCAB, DirectRead, Net

    torch.manual_seed(0)
    model = Net(DirectRead()).double()
    twin = copy.deepcopy(model)
    ids = torch.randint(0, VOCAB, (4, 5), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": torch.arange(4) % 3}
    calls, discards = [], []

    def loss_of(m):
        def loss(mb, info=None):
            calls.append(info.point if info is not None else None)
            return m(**mb)["loss"]
        return loss

    sam = MicroBatchSAM(model, rho=0.1, micro_batch_size=2, vectorize="auto")
    sam.on_discard = lambda: discards.append(len(calls))
    off = MicroBatchSAM(twin, rho=0.1, micro_batch_size=2, vectorize="off")
    for step in range(2):
        calls.clear()
        model.zero_grad(set_to_none=True)
        twin.zero_grad(set_to_none=True)
        sam.backward(batch, loss_of(model))
        off.backward(batch, lambda mb: twin(**mb)["loss"])
        assert sam.path == "sequential" and "outside the layer calls" in sam.path_reason
        # step 1: the discarded vectorized pass, then 2 micro-batches x (clean, perturbed); step 2: those 4 only
        assert len(calls) == (5 if step == 0 else 4), calls
        for a, b in zip(model.parameters(), twin.parameters()):
            assert torch.equal(a.grad, b.grad)
    assert discards == [1]


def test_the_path_line_is_logged_under_off_too_and_names_a_parameter_by_its_name(caplog):
    """`--msam_vectorize off` logs its path line once; a refusal at a forward names the parameter's module path."""
    import logging

    from reference import MLP, mlp_dataset
    from test_trainer_reference import stack

    from hf_msam import MicroBatchSAM

    batch = stack(mlp_dataset(4))
    model = MLP().double()
    sam = MicroBatchSAM(model, micro_batch_size=2, vectorize="off")
    with caplog.at_level(logging.INFO, logger="hf_msam"):
        sam.backward(batch, lambda mb: model(**mb)["loss"])
        sam.backward(batch, lambda mb: model(**mb)["loss"])
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("mSAM step:")]
    assert lines == ["mSAM step: one pass per micro-batch (sequential), because vectorize='off' (--msam_vectorize off)."]

    def reads_outside(mb):  # the loss reads fc2's weight outside fc2's call
        return model(**mb)["loss"] + 1e-3 * model.fc2.weight.square().sum()

    sam = MicroBatchSAM(model, micro_batch_size=2, vectorize="auto")
    sam.backward(batch, reads_outside)
    assert sam.path == "sequential" and "fc2.weight (parameter 2) [3, 8] (read by" in sam.path_reason


def test_msam_path_is_the_latest_path_line(tmp_path, caplog):
    """`trainer.msam_path` is None before the first perturbed step, then the last line the log printed: the
    vectorized step's, or the sequential step's with the setting that decided it."""
    import logging

    args = sgd_args(tmp_path / "unstarted", 7, msam_rho=0.1, msam_micro_batch_size=3)
    assert MSAMTrainer(model=tiny_bert(), args=args, train_dataset=bert_data(7)).msam_path is None
    with caplog.at_level(logging.INFO, logger="hf_msam"):
        vectorized = run(tiny_bert(), tmp_path, "auto", msam_micro_batch_size=3)
        off = run(tiny_bert(), tmp_path, "off", msam_micro_batch_size=3, msam_vectorize="off")
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("mSAM step:")]
    assert logged == [f"mSAM step: {vectorized.msam_path}.", f"mSAM step: {off.msam_path}."]
    assert vectorized.msam_path.startswith("vectorized (3 micro-batches")
    assert off.msam_path.endswith("because vectorize='off' (--msam_vectorize off)")


def test_a_rule_that_changes_perturb_alone_does_not_inherit_its_parents_group_form():
    """The vectorized step forms all e_j at once with `perturb_groups` only where that form belongs to the rule's
    `perturb`: a SAM subclass that changes `perturb` (here: e_j halved) gets its own rule, j by j."""
    from reference import MLP, mlp_dataset
    from test_trainer_reference import stack

    from hf_msam import SAMDescent, SAMPerturbation

    class Halved(SAMPerturbation):
        def perturb(self, params, grads, rho=None):
            e, norm, ok = super().perturb(params, grads, rho)
            return [t.mul_(0.5) for t in e], norm, ok

    batch = stack(mlp_dataset(8))
    rho = 0.2
    results = {}
    for name, rule, vectorize in [("halved", Halved(rho), "on"), ("half_rho", SAMPerturbation(rho / 2), "off")]:
        torch.manual_seed(0)
        model = MLP().double()
        sam = MicroBatchSAM(model, micro_batch_size=2, vectorize=vectorize, perturbation=rule, descent=SAMDescent())
        sam.backward(batch, lambda mb: model(**mb)["loss"])
        results[name] = [p.grad.clone() for p in model.parameters()]
    for a, b in zip(results["halved"], results["half_rho"]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
