"""The one place the tests reach hf_msam's private state: each accessor says what it reads and why no public name
serves. A rename inside hf_msam is then one edit here, not a search through the tests."""

from __future__ import annotations

from typing import Any


def check_supported(trainer: Any) -> None:
    """The mixin's refusal of setups it cannot train (FSDP1, DeepSpeed, ...), run by __init__; the tests call it again
    after changing what it reads (a mocked FSDP2 plugin)."""
    trainer._check_supported()


def announce(trainer: Any) -> None:
    """The start-of-training log line and checks (the first step runs them)."""
    trainer._announce()


def fsdp2(trainer: Any) -> bool:
    """Whether the mixin sees FSDP2 (read off accelerate's plugin)."""
    return trainer._msam_fsdp2()


def stats(trainer: Any) -> Any:
    """The running mSAM statistics of the logging window (the engine's `stats` once it exists, before it too)."""
    return trainer._msam_stats


def integrations(trainer: Any) -> list:
    """The integrations (hf_msam.integrations.hooks) that take part in this trainer's steps."""
    return trainer._msam_integrations


def decomposable(trainer: Any, inputs: Any, cut: Any, size_fn: Any, shares: bool) -> bool | None:
    """Whether the trainer takes the batch's loss for the weighted sum of its micro-batches' losses."""
    return trainer._msam_decomposable(inputs, cut, size_fn, shares)


def save_checkpoint_state(trainer: Any, output_dir: str) -> None:
    """What the mixin writes into each checkpoint beside the RNG state (the method's state), through the Trainer's
    own hook for it."""
    trainer._save_rng_state(output_dir)


def step_state(engine: Any) -> tuple[Any, str]:
    """The engine's current optimizer step and its mode ("perturbed", or LookSAM's "reuse")."""
    return engine._step, engine._mode


def looksam_fresh(descent: Any) -> bool:
    """Whether LookSAM's descent has no g_v yet."""
    return descent._fresh


def recorded_layers(capture: Any) -> list[str]:
    """The names of the layers a capture recorded calls of, in call order."""
    return [call.unit.name for call in capture._calls]


def fsdp_param_groups(state: Any) -> list:
    """FSDP2's parameter groups of an FSDP state, as the adapter reads them across torch versions."""
    from hf_msam.integrations.torch_internals import _param_groups

    return _param_groups(state)


def llama_rms_forward_key() -> tuple | None:
    """The key the RMSNorm rule recognizes Llama's RMSNorm forward by (None while that forward is patched)."""
    from hf_msam.vectorized.rules.rms_norm import _llama_rms_forward_key

    return _llama_rms_forward_key()


def computes_like_llama_rms_norm(module: Any) -> bool:
    """Whether the RMSNorm rule takes `module`'s forward (or its hub kernel) for Llama's RMSNorm computation."""
    from hf_msam.vectorized.rules.rms_norm import _computes_like_llama_rms_norm

    return _computes_like_llama_rms_norm(module)


def demo_table(results: dict) -> str:
    """The demo's results table (markdown) for `results` (method name -> final metrics), as it prints it."""
    from hf_msam import demo

    return demo._table(results)


def filter_normalized_direction(params: list, generator: Any) -> list:
    """The loss landscape's random direction, filter-normalized (Li et al. 2018), for `params`."""
    from hf_msam import flatness

    return flatness._filter_normalized_direction(params, generator)
