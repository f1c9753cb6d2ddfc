"""Synchronized perturbations (--msam_sync_perturbation) and the FSDP2 decisions of the trainer.

Two CPU processes (gloo): the ranks end bitwise equal, and equal a single-process reference (plain PyTorch, from
test_methods) whose micro-batch j is the union of both ranks' j-th micro-batches: with an even split, with an
uneven split and gradient accumulation, and with Friendly-SAM (whose EMA then sees the union's gradients); and the
engine with ranks whose micro-batches differ in size, for mean losses and for shares of a global sum."""

import threading
import types

import pytest
import torch
import torch.distributed as dist
import internals
from reference import MLP, flat, mlp_dataset, msam_gradient, unflat
from test_fsdp2 import torchrun, union
from test_methods import LR, RHO, TIGHT, Reference, stack
from transformers import Trainer

from hf_msam import MicroBatchSAM, MSAMTrainer, MSAMTrainingArguments
from hf_msam.msam import GSAMDescent, LookSAMDescent

FSAM = dict(lmbda=0.6, sigma=0.8)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return torchrun("sync_script.py", tmp_path_factory.mktemp("sync"))


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("path", ["sequential", "vectorized"])
@pytest.mark.parametrize(
    "name, mbs, accumulation, method",
    [("even", 2, 1, "sam"), ("uneven_ga", 3, 2, "sam"), ("fsam", 2, 1, "fsam")],
)
def test_synchronized_ranks_equal_the_union_reference(two_ranks, name, mbs, accumulation, method, path):
    r0, r1 = (r[name if path == "sequential" else f"{name}_vectorized"] for r in two_ranks)
    assert r0["path"] == r1["path"] == path
    assert not torch.equal(r0["batches"][0]["x"], r1["batches"][0]["x"])  # the ranks saw different data
    for a, b in zip(r0["final"], r1["final"]):
        assert torch.equal(a, b)
    assert r0["perturbations_per_step"] == accumulation * -(-4 // mbs)  # no factor for the 2 devices
    assert any("scope: synchronized" in line for line in r0["log"])

    model = MLP().double()
    with torch.no_grad():
        for p, w in zip(model.parameters(), r0["initial"]):
            p.copy_(w)
    ref = Reference(model, method, 2 * mbs, **(FSAM if method == "fsam" else {}))
    w = flat(list(model.parameters())).detach().clone()
    calls = len(r0["batches"])
    for step in range(calls // accumulation):
        batches = [union([r0["batches"][i], r1["batches"][i]], mbs) for i in range(step * accumulation, (step + 1) * accumulation)]
        w = w - LR * ref.gradient(w, batches)
    torch.testing.assert_close(flat(r0["final"]), w, **TIGHT)

    # Device-local perturbations (each rank its own micro-batches) would have given something else.
    local = Reference(MLP().double(), method, mbs, **(FSAM if method == "fsam" else {}))
    set_to = flat(r0["initial"])
    g_local = sum(local.gradient(set_to, [r["batches"][i] for i in range(accumulation)]) for r in (r0, r1)) / 2
    g_sync = Reference(MLP().double(), method, 2 * mbs, **(FSAM if method == "fsam" else {})).gradient(
        set_to, [union([r0["batches"][i], r1["batches"][i]], mbs) for i in range(accumulation)]
    )
    assert (g_local - g_sync).abs().max() > 1e-6


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("path", ["sequential", "vectorized"])
def test_token_level_loss_takes_the_union_direction(two_ranks, path):
    """A causal-LM loss over num_items_in_batch (label tokens counted over both ranks): e_j follows the token-sum
    gradient of the union of the ranks' j-th micro-batches, and each rank descends with its own at w + e_j."""
    from test_no_host_sync import TokenLM

    r0, r1 = (r["tokens" if path == "sequential" else "tokens_vectorized"] for r in two_ranks)
    assert r0["path"] == r1["path"] == path
    for a, b in zip(r0["final"], r1["final"]):
        assert torch.equal(a, b)
    model = TokenLM().double()
    params = list(model.parameters())
    w = flat(r0["initial"]).clone()

    def token_sum(mb):
        logits = model(input_ids=mb["input_ids"])["logits"]
        return torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), mb["labels"][:, 1:].reshape(-1), ignore_index=-100, reduction="sum"
        )

    def set_to(v):
        with torch.no_grad():
            for p, t in zip(params, unflat(v, params)):
                p.copy_(t)

    for step in range(len(r0["batches"])):
        batches, n_items = [r0["batches"][step], r1["batches"][step]], r0["num_items"][step]
        assert r1["num_items"][step] == n_items  # counted over both ranks
        descent = torch.zeros_like(w)
        for start in (0, 2):
            set_to(w)
            union_j = {k: torch.cat([b[k][start : start + 2] for b in batches]) for k in batches[0]}
            g = flat(torch.autograd.grad(token_sum(union_j), params))
            set_to(w + 0.3 * g / g.norm())
            for b in batches:
                mb = {k: v[start : start + 2] for k, v in b.items()}
                descent += flat(torch.autograd.grad(token_sum(mb), params)) / n_items
        w = w - LR * descent
    torch.testing.assert_close(flat(r0["final"]), w, rtol=1e-9, atol=1e-12)


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("path", ["sequential", "vectorized"])
@pytest.mark.parametrize("mode", ["size", "share"])
def test_devices_with_unequal_micro_batches_weigh_as_in_the_union(two_ranks, mode, path):
    """Rank 0: micro-batches of 2 and 2 examples; rank 1: 2 and 1. e_j comes from the union's mean loss (4 then
    3 examples); each rank descends with its own micro-batches at w + e_j, and DDP averages the two ranks."""
    ranks = [dict(r["engine"]) for r in two_ranks]
    if path == "vectorized":
        for r in ranks:
            assert r[f"{mode}_vectorized_path"] == "vectorized"
            r[mode], r[f"{mode}_host_syncs"] = r[f"{mode}_vectorized"], r[f"{mode}_vectorized_host_syncs"]
    assert all(torch.equal(a, b) for a, b in zip(ranks[0][mode], ranks[1][mode]))
    assert ranks[0][f"{mode}_host_syncs"] == [] and ranks[1][f"{mode}_host_syncs"] == []  # no .item(), bool(t), ...
    torch.manual_seed(0)
    model = MLP().double()
    params = list(model.parameters())
    w0 = flat(params).detach().clone()
    cut = lambda b, s, e: {k: v[s:e] for k, v in b.items()}  # noqa: E731
    batches = [r["batch"] for r in ranks]
    expected = torch.zeros_like(w0)
    for start in (0, 2):
        union_j = {k: torch.cat([b[k][start : start + 2] for b in batches]) for k in batches[0]}
        g = flat(torch.autograd.grad(model(**union_j)["loss"], params))
        e = 0.3 * g / (g.norm() + 1e-12)
        with torch.no_grad():
            for p, v in zip(params, unflat(w0 + e, params)):
                p.copy_(v)
        for b in batches:
            mb = cut(b, start, start + 2)
            n_j, n = mb["labels"].shape[0], b["labels"].shape[0]
            if mode == "size":  # the rank's mean loss: micro-batch j weighs n_j / n
                loss = n_j / n * model(**mb)["loss"]
            else:  # the rank's share of the sum over all 7 examples
                loss = torch.nn.functional.cross_entropy(model(x=mb["x"])["logits"], mb["labels"], reduction="sum") / 7
            expected += flat(torch.autograd.grad(loss, params)) / 2  # DDP averages the ranks
        with torch.no_grad():
            for p, v in zip(params, unflat(w0, params)):
                p.copy_(v)
    torch.testing.assert_close(flat(ranks[0][mode]), expected, **TIGHT)


def test_sync_flag_is_validated(tmp_path):
    for method in ("gsam", "looksam"):
        with pytest.raises(ValueError, match=f"--msam_sync_perturbation does not combine with --msam_method {method}"):
            MSAMTrainingArguments(str(tmp_path), use_cpu=True, msam_sync_perturbation=True, msam_method=method)
    with pytest.raises(ValueError, match="--msam_sync_perturbation must be True or False"):
        MSAMTrainingArguments(str(tmp_path), use_cpu=True, msam_sync_perturbation="sometimes")
    for descent in (GSAMDescent(), LookSAMDescent()):
        with pytest.raises(ValueError, match="sync_perturbation=True"):
            MicroBatchSAM(MLP(), sync_perturbation=True, descent=descent)


def test_single_process_sync_is_the_device_local_step(tmp_path):
    """One process: the union of the devices' j-th micro-batches is micro-batch j itself; both scopes give the
    plain-PyTorch mSAM gradient."""
    torch.manual_seed(0)
    model = MLP().double()
    batch = {"x": torch.randn(5, 6, dtype=torch.float64), "labels": torch.tensor([0, 1, 2, 0, 1])}
    expected = flat(msam_gradient(model, batch, 2, 0.3))
    for sync in (False, True):
        m = MLP().double()
        m.load_state_dict(model.state_dict())
        MicroBatchSAM(m, rho=0.3, micro_batch_size=2, sync_perturbation=sync).backward(batch, lambda mb: m(**mb)["loss"])
        torch.testing.assert_close(flat([p.grad for p in m.parameters()]), expected, **TIGHT)


class SimulatedDevices:
    """`n` devices in one process: device r runs in thread r, and torch.distributed's all_reduce (a sum, the
    engine's only collective here) adds what every device passes, in rank order, as a process group would."""

    def __init__(self, monkeypatch, n=2):
        self.n, self.slots, self.rank = n, [None] * n, threading.local()
        self.barrier = threading.Barrier(n, timeout=60)
        world = object()  # a process group stands in for the default one
        monkeypatch.setattr(dist, "is_available", lambda: True)
        monkeypatch.setattr(dist, "is_initialized", lambda: True)
        monkeypatch.setattr(dist, "get_world_size", lambda group=None: n)
        monkeypatch.setattr(dist, "get_rank", lambda group=None: self.rank.value)
        monkeypatch.setattr(dist, "group", types.SimpleNamespace(WORLD=world))
        monkeypatch.setattr(dist, "all_reduce", self.all_reduce)

    def all_reduce(self, tensor, op=None, group=None, async_op=False):
        assert op in (None, dist.ReduceOp.SUM) and not async_op
        self.slots[self.rank.value] = tensor.clone()
        self.barrier.wait()
        total = sum(self.slots[1:], self.slots[0].clone())
        self.barrier.wait()
        tensor.copy_(total)

    def run(self, steps):
        """Run steps[r]() on device r, all at once; re-raise the first failure."""
        errors = []

        def device(r):
            self.rank.value = r
            try:
                steps[r]()
            except BaseException as err:  # noqa: BLE001 - reported below, after the other device is released
                errors.append(err)
                self.barrier.abort()

        threads = [threading.Thread(target=device, args=(r,)) for r in range(self.n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]


def _trainer(tmp_path, model=None, **kwargs):
    args = MSAMTrainingArguments(str(tmp_path), use_cpu=True, report_to="none", per_device_train_batch_size=4, **kwargs)
    return MSAMTrainer(model=model if model is not None else MLP(), args=args)


def _fsdp(monkeypatch, trainer, version):
    """What accelerate's state looks like under FSDP `version` (FSDP needs a GPU launch to construct for real)."""
    plugin = types.SimpleNamespace(fsdp_version=version)
    monkeypatch.setattr(trainer.accelerator, "state", types.SimpleNamespace(fsdp_plugin=plugin, is_fsdp2=version == 2))
    trainer.is_fsdp_enabled = True


def _two_device_step(tmp_path, monkeypatch, method, fsdp2):
    """One training step of two trainers, one per simulated device, each on its own 4 examples in micro-batches of 2;
    with `fsdp2`, each takes the scope its __init__ decides under FSDP2 (and must accept `method`). Returns the
    gradient DDP would step with (the devices' .grad averaged), the devices' batches, the initial weights and the
    optimizer's momentum (Momentum-SAM's e: SGD's buffer from an earlier step, the same on both devices)."""
    torch.manual_seed(0)
    initial = MLP().double()
    w = flat(list(initial.parameters())).detach()
    momentum = torch.randn_like(w) if method == "momentum" else None
    trainers = []
    for r in range(2):
        model = MLP().double()
        model.load_state_dict(initial.state_dict())
        settings = dict(msam_fsam_lambda=FSAM["lmbda"], msam_fsam_sigma=FSAM["sigma"]) if method == "fsam" else {}
        trainer = _trainer(tmp_path / f"device{r}", model, msam_micro_batch_size=2, msam_rho=RHO, msam_method=method,
                           optim="sgd", optim_args="momentum=0.9", **settings)
        trainer.create_optimizer()
        trainer.current_gradient_accumulation_steps = 1  # as the training loop sets it
        if momentum is not None:
            for p, m in zip(model.parameters(), unflat(momentum, list(model.parameters()))):
                trainer.optimizer.state[p]["momentum_buffer"] = m.clone()
        if fsdp2:
            with monkeypatch.context() as mocked:
                _fsdp(mocked, trainer, 2)
                trainer.msam_sync_perturbation = internals.fsdp2(trainer)  # what __init__ decides under FSDP2
                internals.check_supported(trainer)  # no refusal
            trainer.is_fsdp_enabled = False  # the step below is a plain data-parallel one, in the scope FSDP2 chose
        trainers.append(trainer)
    data = stack(mlp_dataset(8, seed=3))
    batches = [{k: v[4 * r : 4 * (r + 1)] for k, v in data.items()} for r in range(2)]
    with monkeypatch.context() as mocked:
        devices = SimulatedDevices(mocked)
        devices.run([lambda t=t, b=b: t.training_step(t.model, b) for t, b in zip(trainers, batches)])
    grads = [flat([p.grad for p in t.model.parameters()]) for t in trainers]
    return (grads[0] + grads[1]) / 2, batches, w, momentum


def _references(method, batches, w, momentum=None):
    """The plain-PyTorch step gradient of two devices (DDP averaging them): e_j from the union of the devices' j-th
    micro-batches (synchronized), or from each device's own (device-local)."""
    h = FSAM if method == "fsam" else {}
    synchronized = Reference(MLP().double(), method, 4, **h).gradient(w, union(batches, 2), momentum=momentum)
    local = sum(Reference(MLP().double(), method, 2, **h).gradient(w, b, momentum=momentum) for b in batches) / 2
    return synchronized, local


def test_device_local_scope_by_default_on_two_devices(tmp_path, monkeypatch):
    """Without FSDP2 or --msam_sync_perturbation, each device perturbs with its own micro-batches."""
    g, batches, w, _ = _two_device_step(tmp_path, monkeypatch, "sam", fsdp2=False)
    synchronized, local = _references("sam", batches, w)
    torch.testing.assert_close(g, local, **TIGHT)
    assert (synchronized - local).abs().max() > 1e-6  # the scopes give different steps on these batches


def test_fsdp2_synchronizes_and_says_so(tmp_path, monkeypatch):
    """Under FSDP2 the trainer synchronizes e_j over the devices (the union's gradient, on two simulated devices);
    the log line and the model card say so."""
    g, batches, w, _ = _two_device_step(tmp_path, monkeypatch, "sam", fsdp2=True)
    synchronized, local = _references("sam", batches, w)
    torch.testing.assert_close(g, synchronized, **TIGHT)
    assert (g - local).abs().max() > 1e-6
    trainer = _trainer(tmp_path, msam_micro_batch_size=2)
    _fsdp(monkeypatch, trainer, 2)
    trainer.msam_sync_perturbation = internals.fsdp2(trainer)
    internals.check_supported(trainer)
    internals.announce(trainer)
    trainer.args.output_dir = str(tmp_path)
    monkeypatch.setattr(Trainer, "create_model_card", lambda self, *a, **k: None)  # the base card needs a config
    trainer.create_model_card()
    card = (tmp_path / "README.md").read_text()
    assert "- perturbation scope: synchronized" in card and "- perturbations per optimizer step: 2 (1 accumulation" in card


@pytest.mark.parametrize("method", ["gsam", "looksam", "flat_lora"])
def test_fsdp2_refuses_methods_it_cannot_make_right(tmp_path, monkeypatch, method):
    trainer = _trainer(tmp_path, msam_method=method)
    _fsdp(monkeypatch, trainer, 2)
    trainer.msam_sync_perturbation = True
    with pytest.raises(ValueError, match=f"--msam_method {method} is not supported under FSDP2"):
        internals.check_supported(trainer)


@pytest.mark.parametrize("method", ["sam", "fsam", "momentum"])
def test_fsdp2_accepts_the_methods_it_makes_right(tmp_path, monkeypatch, method):
    """Accepted under FSDP2, and right there: on two simulated devices, the step of the synchronized scope (F-SAM's
    EMA sees the union's gradients; Momentum-SAM's e = −ρ·m/‖m‖, from the optimizer's momentum)."""
    g, batches, w, momentum = _two_device_step(tmp_path, monkeypatch, method, fsdp2=True)
    synchronized, local = _references(method, batches, w, momentum)
    torch.testing.assert_close(g, synchronized, **TIGHT)
    if method != "momentum":  # Momentum-SAM's e comes from the optimizer's momentum, the same on every device
        assert (g - local).abs().max() > 1e-6


def test_fsdp1_and_deepspeed_are_refused_naming_fsdp2(tmp_path, monkeypatch):
    trainer = _trainer(tmp_path)
    _fsdp(monkeypatch, trainer, 1)
    with pytest.raises(NotImplementedError, match=r"FSDP1.*fsdp_version: 2"):
        internals.check_supported(trainer)
    trainer = _trainer(tmp_path)
    trainer.is_deepspeed_enabled = True
    with pytest.raises(NotImplementedError, match=r"DeepSpeed.*FSDP2"):
        internals.check_supported(trainer)
