"""An independent, plain-PyTorch reference for the mSAM gradient (no hf_msam code), tiny models, and the test
helpers several test files share (host-sync counting, an fp16-scaling stand-in for an Accelerator)."""

import contextlib

import torch
from torch import nn


def flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


def unflat(vector, like):
    out, i = [], 0
    for t in like:
        out.append(vector[i : i + t.numel()].view_as(t))
        i += t.numel()
    return out


def msam_gradient(model, batch, micro_batch_size, rho, adaptive=False, eta=0.01, eps=1e-12, loss_of=None, weights=None):
    """Σ_j c_j ∇L_{B_j}(w + e_j), e_j = ρ g_j/‖g_j‖ (ASAM: ρ T²g_j/‖T g_j‖, T = |w|+η), c_j = n_j/n.

    `batch` is a dict of tensors split along dim 0. `loss_of(model, micro_batch)` defaults to the model's
    own `loss`. `weights(micro_batches)` may replace c_j. Leaves the model as it found it; returns a list
    of tensors shaped like the trainable parameters.
    """
    loss_of = loss_of or (lambda m, b: m(**b)["loss"])
    params = [p for p in model.parameters() if p.requires_grad]
    w0 = [p.detach().clone() for p in params]
    n = batch["labels"].shape[0]
    size = micro_batch_size or n
    micro = [{k: v[s : s + size] for k, v in batch.items()} for s in range(0, n, size)]
    c = weights(micro) if weights else [mb["labels"].shape[0] / n for mb in micro]
    total = torch.zeros_like(flat(w0))
    for mb, c_j in zip(micro, c):
        g = flat(torch.autograd.grad(loss_of(model, mb), params, allow_unused=True, materialize_grads=True))
        if adaptive:
            T = flat([w.abs() for w in w0]) + eta
            e = rho * T * T * g / ((T * g).norm() + eps)
        else:
            e = rho * g / (g.norm() + eps)
        with torch.no_grad():
            for p, w, e_p in zip(params, w0, unflat(e, w0)):
                p.copy_(w + e_p)
        g_perturbed = flat(torch.autograd.grad(loss_of(model, mb), params, allow_unused=True, materialize_grads=True))
        total += c_j * g_perturbed
        with torch.no_grad():
            for p, w in zip(params, w0):
                p.copy_(w)
    return unflat(total, w0)


class MLP(nn.Module):
    """x -> Linear -> [BatchNorm] -> tanh -> Linear, cross-entropy; forward(x, labels) -> {"loss", "logits"}."""

    def __init__(self, d_in=6, d_hidden=8, n_classes=3, batch_norm=False):
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden)
        self.bn = nn.BatchNorm1d(d_hidden) if batch_norm else nn.Identity()
        self.fc2 = nn.Linear(d_hidden, n_classes)

    def forward(self, x, labels=None):
        logits = self.fc2(torch.tanh(self.bn(self.fc1(x))))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits, labels)
        return out


def mlp_dataset(n, d_in=6, n_classes=3, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g, dtype=dtype)
    y = torch.randint(0, n_classes, (n,), generator=g)
    return [{"x": x[i], "labels": y[i]} for i in range(n)]


# Tensor methods that make the host wait for the device.
SYNCING = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__")


@contextlib.contextmanager
def host_syncs(calls):
    """Record in `calls` every tensor method that would synchronize with the host, while inside."""
    originals = {name: getattr(torch.Tensor, name) for name in SYNCING}

    def counted(name):
        def method(t, *args, **kwargs):
            calls.append(name)
            return originals[name](t, *args, **kwargs)

        return method

    for name in SYNCING:
        setattr(torch.Tensor, name, counted(name))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


class ScalerAccelerator:
    """What MicroBatchSAM needs from an accelerate.Accelerator with fp16 loss scaling."""

    def __init__(self, scale):
        self.scaler = torch.amp.GradScaler("cpu", init_scale=scale)

    def no_sync(self, model):
        return contextlib.nullcontext()

    def backward(self, loss):
        self.scaler.scale(loss).backward()
