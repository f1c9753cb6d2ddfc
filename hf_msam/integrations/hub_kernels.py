"""transformers' hub kernels: layers whose forward the `kernels` package replaces on the instance.

Tested with transformers 5.24.0 and 5.25.0, kernels 0.19.1.

What upstream does (read in transformers' `integrations/hub_kernels.py` and `modeling_utils.py`, and kernels'
`_internals/layer/layer.py`):

- Norms, activations and a few functions of transformers' models are decorated with kernels'
  `use_kernel_forward_from_hub(name)`: the class is registered under `name`; nothing changes on the instance.
- `kernels.kernelize(model, mode=...)` visits every decorated module and, through its `_replace_forward`, either sets
  `module.forward` on the instance to a hub kernel's forward (and `module._kernel_repo` to the kernel's repository),
  or, where no kernel fits the device and mode (every layer on a CPU), deletes any instance `forward` and
  `_kernel_repo`, so that the class's forward runs. Either way an instance `forward` set by someone else is gone.
- From transformers 5.25.0, `from_pretrained` defaults to `use_kernels=True` when `kernels` is installed (5.24.0:
  only when asked) and kernelizes for the mode the model is in (`kernels_mode`, inference after loading); and
  `PreTrainedModel.train(mode)` sets `kernels_mode` to training or inference, which runs `kernelize` again whenever
  the mode differs from the one last used. The Trainer's `training_step` calls `model.train()`: on the first step of
  a loaded model, that call, made inside the mSAM step, re-kernelized the model and took off the forwards the
  vectorized step had routed (the CI failure of transformers 5.25.0).

What we do: `settle(transformers_models(model))` runs that re-kernelization before the vectorized step routes any forward (as the next
`model.train()` would, for the mode the model is in now), and `hub_kernel_forward(module)` recognises a forward set by
kernelize, so that a rule that knows the layer's function (Llama's RMSNorm) applies to the hub kernel computing it.
"""

from __future__ import annotations

from torch import nn

TESTED = {"transformers": ("5.24.0", "5.25.0"), "kernels": ("0.19.1",)}

# The instance attribute kernels' `_replace_forward` sets beside a hub kernel's forward (and deletes with it).
KERNEL_MARK = "_kernel_repo"


def hub_kernel_forward(module: nn.Module) -> bool:
    """True when the module's instance `forward` was put there by `kernels.kernelize`: a hub kernel for the layer
    the class names, which computes the class's function (that is the kernels hub's contract for a layer)."""
    return "forward" in module.__dict__ and KERNEL_MARK in module.__dict__


def uses_hub_kernels(model: nn.Module) -> bool:
    """Whether a transformers model inside `model` is kernelized (`use_kernels`), so that its train()/eval() may
    replace its layers' forwards."""
    return any(getattr(m, "use_kernels", False) is True for m in model.modules() if _is_transformers_model(m))


def transformers_models(model: nn.Module) -> list[nn.Module]:
    """The transformers models inside `model` (itself included): what `settle` looks at, found once per model."""
    return [m for m in model.modules() if _is_transformers_model(m)]


def settle(models: list[nn.Module]) -> None:
    """Kernelize now for the mode each of `models` (see `transformers_models`) is in, where its kernels were chosen
    for the other one: what its next `train()` call with the same mode would do (transformers >= 5.25, which keeps
    `kernels_mode`; earlier releases re-kernelize only when the training flag changes). Training flags are not
    touched. A no-op without kernels."""
    for m in models:
        if getattr(m, "use_kernels", False) is not True or not hasattr(type(m), "kernels_mode"):
            continue
        try:
            from kernels import Mode
        except ImportError:
            return
        wanted = Mode.TRAINING if m.training else Mode.INFERENCE
        if m.kernels_mode != wanted:
            m.kernels_mode = wanted  # transformers' setter: kernelize(m) for that mode


def explain_changed_forward(model: nn.Module) -> str:
    """A hint for the message that reports a forward replaced or removed during a pass."""
    if uses_hub_kernels(model):
        return (
            "; the model uses transformers' hub kernels (`use_kernels`, on by default in from_pretrained since "
            "transformers 5.25 when the `kernels` package is installed), and `PreTrainedModel.train()`/`.eval()` run "
            "`kernels.kernelize` again when the mode changes, which replaces the layers' forwards: put the model in the "
            "mode of the step before it starts (the Trainer does: `model.train()`), or load it with use_kernels=False"
        )
    return "; something (a hook, a library) set or deleted the module's `forward` on the instance inside the pass"


def _is_transformers_model(module: nn.Module) -> bool:
    return any(c.__name__ == "PreTrainedModel" and c.__module__.startswith("transformers.") for c in type(module).__mro__)
