"""The defaults of the `--msam_*` settings, in one place that imports nothing of hf_msam: `MSAMArguments` takes its
fields' defaults from here, and the method registry reads them for arguments that lack a field (`build_method` with
no arguments, or a plain `TrainingArguments`).

A setting a method owns (GSAM's alpha, ...) has its default in the method's factory signature instead; its dedicated
flag (`--msam_gsam_alpha`) takes that default (see `hf_msam.methods.registry`)."""

from __future__ import annotations

from typing import Any

MSAM_DEFAULTS: dict[str, Any] = {
    "msam_rho": 0.05,
    "msam_micro_batch_size": None,
    "msam_adaptive": False,
    "msam_adaptive_eta": 0.01,
    "msam_eps": 1e-12,
    "msam_method": "sam",
    "msam_method_args": None,
    "msam_precondition": "none",
    "msam_start": 0.0,
    "msam_interval": 1,
    "msam_rho_schedule": "constant",
    "msam_sync_perturbation": False,
    "msam_vectorize": "auto",
    "msam_eval_flatness": False,
    "msam_flatness_batches": 8,
    "msam_flatness_rho": 0.05,
    "msam_flatness_iters": 100,
    "msam_eval_landscape": False,
    "msam_eval_quantization": False,
    "msam_quantization_backend": "simulated",
}
