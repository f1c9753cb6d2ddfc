"""`MSAMTrainingArguments`: `TrainingArguments` plus the `--msam_*` flags.

The field defaults are `hf_msam.defaults`' (a method's own setting's flag takes the setting's default), and what the
help and the docstring say about the methods is written from the method registry when it is read: methods registered
before the arguments are parsed appear in it."""

from __future__ import annotations

import textwrap
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from transformers import TrainingArguments

from .defaults import MSAM_DEFAULTS
from .methods import REGISTRY, build_method, check_compatible, get_method, method_names, parse_method_args
from .methods.registry import describe_all_settings, describe_methods, is_finite, is_whole

__all__ = ["MSAMArguments", "MSAMTrainingArguments", "check_msam_settings", "msam_default", "msam_setting"]


# `hf-msam run` puts here the --msam_* flags it took off the command line: every MSAMArguments built while it runs
# (the swapped TrainingArguments, MSAMTrainingArguments built directly, a TRL config) applies them over what the
# script or its JSON config set.
command_line_overrides: dict[str, Any] = {}


def _setting_default(method: str, name: str) -> Any:
    """The default of a built-in method's setting, which its dedicated flag (`--msam_gsam_alpha`) shares."""
    return REGISTRY[method].setting(name).default


def _precondition_takers() -> str:
    return ", ".join(name for name, m in REGISTRY.items() if "msam_precondition" in m.flags) or "none registered"


def _sync_methods() -> list[str]:
    return method_names(lambda c: c.sync_perturbation)


# What the help and the docstring say about the registered methods, written when it is read.
_METHODS_TEXT: dict[str, Callable[[], str]] = {
    "msam_method": lambda: (
        f"The registered methods (a pass is one forward and one backward): {describe_methods()}; or any method "
        "registered with hf_msam.register_method before the arguments are parsed (see docs/trainer.md, \"Your own variant\")."
    ),
    "msam_method_args": lambda: (
        f"Each method's settings (type, default; the flag that also sets it): {describe_all_settings()}."
    ),
    "msam_precondition": lambda: f"For msam_method {_precondition_takers()}.",
    "msam_sync_perturbation": lambda: (
        f"Works with msam_method {', '.join(_sync_methods()) or 'none registered'}; not with "
        f"{', '.join(n for n in method_names() if n not in _sync_methods()) or 'none'}."
    ),
}


def _fill(template: str) -> str:
    """`template` with each `{field}` mark replaced by that field's text in `_METHODS_TEXT`, as the registry reads now
    ("%" doubled: argparse %-formats help strings)."""
    for name, text in _METHODS_TEXT.items():
        if "{" + name + "}" in template:
            template = template.replace("{" + name + "}", text().replace("%", "%%"))
    return template


class _LiveHelp(str):
    """A help string that reads the registry each time it is shown, not when the parser is built: `parser.format_help()`
    (argparse's `help % params`), `str()`, `in` and `strip()` fill the template's `{field}` marks anew, so a method
    registered after `HfArgumentParser(MSAMTrainingArguments)` was built appears in its `--help`. As a plain string
    (what `str` methods not overridden here see) it is the text as it read when it was made."""

    def __new__(cls, template: str, suffix: str = "") -> _LiveHelp:
        self = super().__new__(cls, _fill(template) + suffix)
        self.template, self.suffix = template, suffix
        return self

    def __str__(self) -> str:
        return _fill(self.template) + self.suffix

    def __mod__(self, params: Any) -> str:
        return str(self) % params

    def __contains__(self, part: object) -> bool:
        return part in str(self)

    def __add__(self, other: str) -> _LiveHelp:  # ArgumentDefaultsHelpFormatter appends " (default: %(default)s)"
        return _LiveHelp(self.template, self.suffix + other)

    def strip(self, chars: str | None = None) -> str:
        return str(self).strip(chars)

    def __reduce__(self) -> tuple:
        return _LiveHelp, (self.template, self.suffix)


class _FromRegistry(Mapping):
    """A field's `metadata={"help": ...}` whose help has `{field}` marks, each replaced by that field's text in
    `_METHODS_TEXT` when it is shown: the help is a `_LiveHelp`, which parsers (HfArgumentParser, TRL's TrlParser) copy
    as it is and argparse formats when `--help` is printed."""

    def __init__(self, metadata: dict[str, Any]):
        self._metadata = metadata

    def __getitem__(self, key: str) -> Any:
        value = self._metadata[key]
        return _LiveHelp(value) if key == "help" else value

    def __iter__(self) -> Iterator[str]:
        return iter(self._metadata)

    def __len__(self) -> int:
        return len(self._metadata)

    def copy(self) -> dict[str, Any]:
        """A plain dict (its help a `_LiveHelp`): parsers copy metadata."""
        return dict(self)


class _Docstring:
    """A class docstring with `{field}` marks, each replaced (wrapped, indented as the mark) by that field's text in
    `_METHODS_TEXT` when the docstring is read: a class's `__doc__` that is a descriptor is read through `__get__`."""

    def __init__(self, template: str):
        self.template = template

    def __get__(self, obj: Any, owner: Any = None) -> str:
        lines = []
        for line in self.template.split("\n"):
            mark = line.strip()
            if mark.startswith("{") and mark.endswith("}") and mark[1:-1] in _METHODS_TEXT:
                indent = line[: len(line) - len(line.lstrip())]
                text = _METHODS_TEXT[mark[1:-1]]()
                line = textwrap.fill(text, 116, initial_indent=indent, subsequent_indent=indent, break_on_hyphens=False)
            lines.append(line)
        return "\n".join(lines)


@dataclass
class MSAMArguments:
    __doc__ = _Docstring(r"""
    The micro-batch sharpness-aware minimization (mSAM) settings, as a dataclass mixin that goes in front of any
    `TrainingArguments` subclass: `MSAMTrainingArguments(MSAMArguments, TrainingArguments)`, or a TRL config,
    `MSAMSFTConfig(MSAMArguments, SFTConfig)`. With `HfArgumentParser`, each appears on the command line as
    `--msam_*`; they are validated before the base class's own `__post_init__` runs.

    Parameters:
        msam_rho (`float`, *optional*, defaults to `0.05`):
            Perturbation radius ρ. `0` turns mSAM off: the step is then exactly the plain `Trainer` step.
        msam_micro_batch_size (`int` or `None`, *optional*, defaults to `None`):
            Examples per perturbation on each device. `None`: the whole per-device batch is one micro-batch.
        msam_adaptive (`bool`, *optional*, defaults to `False`):
            ASAM: scale the perturbation by T = |w| + η elementwise.
        msam_adaptive_eta (`float`, *optional*, defaults to `0.01`):
            η of ASAM.
        msam_eps (`float`, *optional*, defaults to `1e-12`):
            Added to the gradient norm in the denominator of the perturbation.
        msam_method (`str`, *optional*, defaults to `"sam"`):
            The sharpness-aware method. See docs/methods.md.
            {msam_method}
        msam_method_args (`dict` or `str`, *optional*, defaults to `None`):
            The settings of `msam_method`: a dict, or comma-separated `key=value` pairs (`"alpha=0.2,k=3"`, as
            `optim_args`), each converted to the setting's type. A built-in setting's own flag (`msam_gsam_alpha`)
            still sets it when the key is not given; the key with the flag at another value than its default, a key
            the method does not have, or a value of the wrong type is a ValueError.
            {msam_method_args}
        msam_precondition (`str`, *optional*, defaults to `"none"`):
            `adam`: the perturbation along AdamW's preconditioned gradient, e = rho * P g / ||P g||,
            P = diag(1 / (sqrt(v_hat) + eps)) (Singh et al. 2025). Needs an Adam-type optimizer (refused when the
            trainer is built otherwise). `none`: the plain gradient.
            {msam_precondition}
        msam_start (`float`, *optional*, defaults to `0.0`):
            Optimizer steps t <= msam_start * max_steps are plain steps (late-phase SAM). In [0, 1).
        msam_interval (`int`, *optional*, defaults to `1`):
            Optimizer step t (1-based) is perturbed when (t - 1) % msam_interval == 0, plain in between.
        msam_rho_schedule (`str`, *optional*, defaults to `"constant"`):
            `constant`: rho every step; `lr`: rho_t = rho * lr_t / lr_max (rho follows the learning-rate schedule).
        msam_gsam_alpha (`float`, *optional*, defaults to `0.1`):
            alpha of GSAM: descent = g_p - alpha * (the part of the clean gradient orthogonal to g_p).
        msam_fsam_lambda (`float`, *optional*, defaults to `0.95`):
            lambda of Friendly-SAM: the EMA m <- lambda * m + (1 - lambda) * g of past micro-batch gradients. In [0, 1).
        msam_fsam_sigma (`float`, *optional*, defaults to `1.0`):
            sigma of Friendly-SAM: the ascent direction is g - sigma * m.
        msam_looksam_k (`int`, *optional*, defaults to `5`):
            LookSAM: a full SAM step every k optimizer steps; the k - 1 between reuse its direction at one pass each.
        msam_looksam_alpha (`float`, *optional*, defaults to `0.7`):
            alpha of LookSAM: reuse steps descend along g + alpha * (||g|| / ||g_v||) * g_v. The default is the
            paper's; with AdamW, alpha >= 0.2 stalled training in our measurements and 0.1 trained (warned at the
            first step).
        msam_flat_lora_sigma (`float`, *optional*, defaults to `0.05`):
            sigma of Flat-LoRA (`msam_method` flat_lora): row i of the merged LoRA weight W + s*BA gets Gaussian noise of
            std sigma_t * ||(W + s*BA)_i|| / sqrt(n), n its input dimension. 0 turns it off.
        msam_flat_lora_schedule (`str`, *optional*, defaults to `"cosine"`):
            `cosine`: sigma_t = sigma * (1 - cos(pi * (t - 1) / max_steps)) / 2, rising from 0 (the paper's); `constant`.
        msam_sync_perturbation (`bool`, *optional*, defaults to `False`):
            Synchronized perturbations: micro-batch j's perturbation comes from the gradient of the union over all
            devices of their j-th micro-batches, the same on every device (one extra all-reduce of the trainable
            gradients per micro-batch). Default: each device perturbs with its own micro-batches. Always on under
            FSDP2. See docs/multi-device.md.
            {msam_sync_perturbation}
        msam_vectorize (`str`, *optional*, defaults to `"auto"`):
            `on`: all micro-batches of a device in one forward and one backward per pass (the vectorized step);
            `auto`: vectorized where it applies, else one pass per micro-batch (the log says why); `off`: one pass
            per micro-batch. See docs/performance.md.
        msam_eval_flatness (`bool`, *optional*, defaults to `False`):
            Every evaluation also reports `eval_hessian_top_eigenvalue`, `eval_hessian_trace` and `eval_sharpness`
            (see `hf_msam.flatness`), measured on the first `msam_flatness_batches` evaluation batches.
        msam_flatness_batches (`int`, *optional*, defaults to `8`):
            Evaluation batches the flatness metrics and the loss landscape are measured on.
        msam_flatness_rho (`float`, *optional*, defaults to `0.05`):
            Radius of `eval_sharpness`, the same for every run (SAM perturbation, one micro-batch per batch).
        msam_flatness_iters (`int`, *optional*, defaults to `100`):
            Power iterations for the top eigenvalue and Hutchinson probes for the trace.
        msam_eval_landscape (`bool`, *optional*, defaults to `False`):
            Every evaluation writes `loss_landscape.json` and `loss_landscape.png` to `output_dir`; the last stays.
        msam_eval_quantization (`bool`, *optional*, defaults to `False`):
            Every evaluation also reports `eval_int{b}_loss_delta` (and `eval_int{b}_accuracy_delta`) for b = 8, 4, 3:
            how much rounding the linear layers' weights to b bits changes them (`quantization_sensitivity`).
        msam_quantization_backend (`str`, *optional*, defaults to `"simulated"`):
            How `msam_eval_quantization` quantizes: `simulated` (the weights rounded in place, `quantize_rows`) or
            `torchao` (torchao's weight-only configs on a copy of the model; `pip install "hf-msam[quantization]"`).
    """)

    msam_rho: float = field(
        default=MSAM_DEFAULTS["msam_rho"],
        metadata={
            "help": "Perturbation radius rho of (m)SAM. 0 turns it off: each step is then exactly the plain "
            "Trainer step (one forward and backward, bitwise-identical weights)."
        },
    )
    msam_micro_batch_size: int | None = field(
        default=MSAM_DEFAULTS["msam_micro_batch_size"],
        metadata={
            "help": "Examples per perturbation on each device (the mSAM micro-batch). None: the whole "
            "per-device batch is one micro-batch, which is SAM on each device. A batch that does not divide "
            "evenly gets a smaller last micro-batch, weighted by its size."
        },
    )
    msam_adaptive: bool = field(
        default=MSAM_DEFAULTS["msam_adaptive"],
        metadata={"help": "Use ASAM (Kwon et al. 2021): e = rho * T^2 g / ||T g|| with T = |w| + eta elementwise."},
    )
    msam_adaptive_eta: float = field(
        default=MSAM_DEFAULTS["msam_adaptive_eta"],
        metadata={"help": "eta of ASAM in T = |w| + eta. Used only with --msam_adaptive."},
    )
    msam_eps: float = field(
        default=MSAM_DEFAULTS["msam_eps"],
        metadata={"help": "Added to the gradient norm in the denominator of the perturbation, for stability."},
    )
    msam_method: str = field(
        default=MSAM_DEFAULTS["msam_method"],
        metadata=_FromRegistry({
            "help": "The sharpness-aware method (--msam_adaptive makes SAM's ascent ASAM's). {msam_method} Its own "
            "settings go in --msam_method_args.",
        }),
    )
    msam_method_args: dict[str, Any] | str | None = field(
        default=MSAM_DEFAULTS["msam_method_args"],
        metadata=_FromRegistry({
            "help": "The settings of --msam_method, as comma-separated key=value pairs like --optim_args (e.g. "
            "\"alpha=0.2\"; a JSON object, or a dict in Python, also works), each converted to the setting's type. A "
            "built-in setting's own flag (--msam_gsam_alpha) still sets it when the key is not given. {msam_method_args} "
            "A key the method does not have, a value of the wrong type, or a key whose own flag is set to another "
            "value than its default too is refused.",
        }),
    )
    msam_precondition: str = field(
        default=MSAM_DEFAULTS["msam_precondition"],
        metadata=_FromRegistry({
            "help": "adam: perturb along AdamW's preconditioned gradient, e = rho * P g / ||P g|| with "
            "P = diag(1 / (sqrt(v_hat) + eps)) from the optimizer's bias-corrected second moment (Singh et al. 2025; "
            "before the first optimizer step, the plain gradient); needs an Adam-type optimizer. none: the plain "
            "gradient. {msam_precondition}",
            "choices": ["none", "adam"],
        }),
    )
    msam_start: float = field(
        default=MSAM_DEFAULTS["msam_start"],
        metadata={
            "help": "Late-phase SAM: optimizer steps t <= msam_start * max_steps are plain steps (one forward and "
            "backward). A number in [0, 1); 0 perturbs from the first step."
        },
    )
    msam_interval: int = field(
        default=MSAM_DEFAULTS["msam_interval"],
        metadata={
            "help": "Perturb every k-th optimizer step only: step t (1-based) is perturbed when (t - 1) mod k == 0 and "
            "plain in between. With --msam_start too, a step is perturbed only when both allow it."
        },
    )
    msam_rho_schedule: str = field(
        default=MSAM_DEFAULTS["msam_rho_schedule"],
        metadata={
            "help": "constant: rho at every step. lr: rho_t = rho * lr_t / lr_max, rho following the learning-rate "
            "schedule (warmup and decay), as GSAM does.",
            "choices": ["constant", "lr"],
        },
    )
    msam_gsam_alpha: float = field(
        default=_setting_default("gsam", "alpha"),
        metadata={
            "help": "alpha of GSAM (--msam_method gsam): each micro-batch descends along g_p - alpha * g_perp, g_perp "
            "the part of its clean gradient orthogonal to its perturbed gradient g_p. 0 is SAM."
        },
    )
    msam_fsam_lambda: float = field(
        default=_setting_default("fsam", "lambda"),
        metadata={
            "help": "lambda of Friendly-SAM (--msam_method fsam): the EMA m <- lambda * m + (1 - lambda) * g_j of "
            "past micro-batch gradients, in [0, 1)."
        },
    )
    msam_fsam_sigma: float = field(
        default=_setting_default("fsam", "sigma"),
        metadata={"help": "sigma of Friendly-SAM (--msam_method fsam): the ascent direction is g_j - sigma * m."},
    )
    msam_looksam_k: int = field(
        default=_setting_default("looksam", "k"),
        metadata={
            "help": "LookSAM (--msam_method looksam): a full SAM step every k optimizer steps; the k - 1 steps between "
            "take one pass and reuse the stored direction g_v. 1 is SAM."
        },
    )
    msam_looksam_alpha: float = field(
        default=_setting_default("looksam", "alpha"),
        metadata={
            "help": "alpha of LookSAM (--msam_method looksam): reuse steps descend along g + alpha * (||g|| / ||g_v||) "
            "* g_v. 0.7 is the paper's; with AdamW, alpha >= 0.2 stalled training in our measurements and 0.1 trained "
            "(a warning says so at the first step)."
        },
    )
    msam_flat_lora_sigma: float = field(
        default=_setting_default("flat_lora", "sigma"),
        metadata={
            "help": "sigma of Flat-LoRA (--msam_method flat_lora, PEFT LoRA models): each pass runs every LoRA layer at "
            "W + s*BA + noise, row i of the noise N(0, sigma_t^2 ||(W + s*BA)_i||^2 / n), n the input dimension, drawn "
            "from a seed. 0.05 is the paper's. 0 turns it off."
        },
    )
    msam_flat_lora_schedule: str = field(
        default=_setting_default("flat_lora", "schedule"),
        metadata={
            "help": "How Flat-LoRA's sigma changes over training. cosine: sigma_t = sigma * (1 - cos(pi (t - 1) / "
            "max_steps)) / 2, rising from 0 at the first step to sigma (the paper's). constant: sigma at every step.",
            "choices": ["cosine", "constant"],
        },
    )
    msam_sync_perturbation: bool = field(
        default=MSAM_DEFAULTS["msam_sync_perturbation"],
        metadata=_FromRegistry({
            "help": "Synchronize the perturbations across devices: micro-batch j's perturbation comes from the gradient "
            "of the union of all devices' j-th micro-batches (weighted by their sizes or label-token counts), so every "
            "device applies the same one and a step has accumulation steps x micro-batches per device perturbations, "
            "whatever the number of devices (SAM proper on the global batch when --msam_micro_batch_size is unset). "
            "Costs one all-reduce of the trainable gradients per micro-batch. Off: each device perturbs with its own "
            "micro-batches. Always on under FSDP2. {msam_sync_perturbation}",
        }),
    )
    msam_vectorize: str = field(
        default=MSAM_DEFAULTS["msam_vectorize"],
        metadata={
            "help": "How a device's micro-batches are computed. on: all of them in one forward and one backward per "
            "pass (the vectorized step: every micro-batch's own gradient from per-layer rules, each micro-batch's rows "
            "at w + e_j in one forward; about SAM's cost whatever the number of micro-batches); an error says what "
            "prevents it. auto: vectorized where it applies, otherwise one pass per micro-batch, saying why in the "
            "log. off: one pass per micro-batch.",
            "choices": ["auto", "on", "off"],
        },
    )
    msam_eval_flatness: bool = field(
        default=MSAM_DEFAULTS["msam_eval_flatness"],
        metadata={
            "help": "At every evaluation, also report eval_hessian_top_eigenvalue, eval_hessian_trace and "
            "eval_sharpness (hf_msam.flatness), measured on the first --msam_flatness_batches evaluation batches. "
            "eval_sharpness is the SAM sharpness at radius --msam_flatness_rho (each batch one micro-batch), whatever "
            "this run's --msam_rho and --msam_micro_batch_size, so plain and mSAM runs compare on equal footing. "
            "Costs up to 2 x --msam_flatness_iters double backward passes per batch."
        },
    )
    msam_flatness_batches: int = field(
        default=MSAM_DEFAULTS["msam_flatness_batches"],
        metadata={"help": "Evaluation batches the flatness metrics and the loss landscape are measured on."},
    )
    msam_flatness_rho: float = field(
        default=MSAM_DEFAULTS["msam_flatness_rho"],
        metadata={
            "help": "Radius at which eval_sharpness is measured (SAM perturbation, each evaluation batch one "
            "micro-batch). The same for every run whatever its training rho, so runs compare on equal footing."
        },
    )
    msam_flatness_iters: int = field(
        default=MSAM_DEFAULTS["msam_flatness_iters"],
        metadata={
            "help": "Power iterations for eval_hessian_top_eigenvalue and Hutchinson probes for eval_hessian_trace "
            "(each one Hessian-vector product, i.e. a double backward, per flatness batch). Lower it on large models."
        },
    )
    msam_eval_landscape: bool = field(
        default=MSAM_DEFAULTS["msam_eval_landscape"],
        metadata={
            "help": "At every evaluation, write loss_landscape.json and loss_landscape.png to output_dir: the loss "
            "along a filter-normalized random direction (Li et al. 2018) on the first --msam_flatness_batches "
            "evaluation batches. Each evaluation overwrites them: the last one stays."
        },
    )
    msam_eval_quantization: bool = field(
        default=MSAM_DEFAULTS["msam_eval_quantization"],
        metadata={
            "help": "At every evaluation, also report eval_int8/int4/int3_loss_delta (and _accuracy_delta where the "
            "model's logits give one): the change of the loss when every nn.Linear and Conv1D weight, the LM head "
            "included, is rounded to that many bits, symmetric per output row (weight-only quantization, simulated unless "
            "--msam_quantization_backend torchao), "
            "on the first --msam_flatness_batches evaluation batches. Flatter minima are expected to lose less."
        },
    )
    msam_quantization_backend: str = field(
        default=MSAM_DEFAULTS["msam_quantization_backend"],
        metadata={
            "help": "How --msam_eval_quantization quantizes. simulated: each weight rounded in place to b bits "
            "(integers in +-(2^(b-1) - 1), scale max|w_row|/(2^(b-1) - 1)), then restored. torchao: real weight-only "
            "quantization of a copy of the model with torchao's Int8WeightOnlyConfig (8 bits) and "
            "IntxWeightOnlyConfig (4 and 3 bits), symmetric per output row (integers in [-2^(b-1), 2^(b-1) - 1], "
            "scale max|w_row|/(2^(b-1) - 1/2)); needs pip install \"hf-msam[quantization]\" and float32, bfloat16 "
            "or float16 weights.",
            "choices": ["simulated", "torchao"],
        },
    )

    def __post_init__(self):
        for name, value in command_line_overrides.items():
            setattr(self, name, value)
        check_msam_settings(self)
        super().__post_init__()


@dataclass
class MSAMTrainingArguments(MSAMArguments, TrainingArguments):
    r"""
    Configuration for [`MSAMTrainer`]: every argument of [`~transformers.TrainingArguments`], plus the
    mSAM settings of [`MSAMArguments`] (`--msam_*` with `HfArgumentParser`).
    """


_DEFAULTS = {f.name: f.default for f in fields(MSAMArguments)}
_SWITCHES = ("msam_adaptive", "msam_sync_perturbation", "msam_eval_flatness", "msam_eval_landscape", "msam_eval_quantization")
_TRUE, _FALSE = ("true", "yes", "1", "on"), ("false", "no", "0", "off")


def check_msam_settings(args: Any) -> None:
    """Raise ValueError naming the flag when an mSAM setting of `args` is out of range or of the wrong type, or when
    the method does not combine with the others. Run when the arguments are built and again when a trainer starts
    (scripts and sweeps may change fields in between). Switches given as strings ("true", "False", "yes", "0", ...,
    as some config loaders give them) are parsed in place."""
    for name in _SWITCHES:
        value = getattr(args, name, _DEFAULTS[name])
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            setattr(args, name, value.strip().lower() in _TRUE)
        elif not isinstance(value, bool):
            raise ValueError(f"--{name} must be True or False, got {value!r}.")
    if isinstance(getattr(args, "msam_method_args", None), str):  # "alpha=0.2,k=3" or JSON: a dict, as given
        args.msam_method_args = parse_method_args(args.msam_method_args)
    rho = msam_setting(args, "msam_rho")
    if not is_finite(rho, 0.0):
        raise ValueError(
            f"--msam_rho must be a finite number >= 0 (0 turns mSAM off), got {rho!r}. "
            "Typical values are 0.01 to 0.5 (SAM) or 0.5 to 2.0 (ASAM)."
        )
    micro_batch_size = msam_setting(args, "msam_micro_batch_size")
    if micro_batch_size is not None and not is_whole(micro_batch_size):
        raise ValueError(
            f"--msam_micro_batch_size must be a whole number >= 1, or None for one micro-batch per device; "
            f"got {micro_batch_size!r}."
        )
    ranges = {  # name: (low, high, what the message says)
        "msam_adaptive_eta": (0.0, None, "a finite number >= 0"),
        "msam_eps": (0.0, None, "a finite number >= 0"),
        "msam_start": (0.0, 1.0, "a number in [0, 1) (the fraction of max_steps trained with plain steps first)"),
        "msam_gsam_alpha": (0.0, None, "a finite number >= 0"),
        "msam_fsam_lambda": (0.0, 1.0, "a number in [0, 1)"),
        "msam_fsam_sigma": (0.0, None, "a finite number >= 0"),
        "msam_looksam_alpha": (0.0, None, "a finite number >= 0"),
        "msam_flat_lora_sigma": (0.0, None, "a finite number >= 0 (0.05 is the paper's; 0 turns Flat-LoRA off)"),
    }
    for name, (low, high, what) in ranges.items():
        if not is_finite(msam_setting(args, name), low, high):
            raise ValueError(f"--{name} must be {what}, got {msam_setting(args, name)!r}.")
    for name, what in (
        ("msam_interval", "a whole number >= 1 (1: every step is perturbed)"),
        ("msam_looksam_k", "a whole number >= 1"),
        ("msam_flatness_batches", "a whole number >= 1"),
        ("msam_flatness_iters", "a whole number >= 1"),
    ):
        if not is_whole(msam_setting(args, name)):
            raise ValueError(f"--{name} must be {what}, got {msam_setting(args, name)!r}.")
    if not is_finite(msam_setting(args, "msam_flatness_rho"), 0.0, low_open=True):
        raise ValueError(f"--msam_flatness_rho must be a finite number > 0, got {msam_setting(args, 'msam_flatness_rho')!r}.")
    if msam_setting(args, "msam_vectorize") not in ("auto", "on", "off"):
        raise ValueError(f"--msam_vectorize must be 'auto', 'on' or 'off', got {msam_setting(args, 'msam_vectorize')!r}.")
    if msam_setting(args, "msam_flat_lora_schedule") not in ("cosine", "constant"):
        raise ValueError(
            f"--msam_flat_lora_schedule must be 'cosine' or 'constant', got {msam_setting(args, 'msam_flat_lora_schedule')!r}."
        )
    if msam_setting(args, "msam_quantization_backend") not in ("simulated", "torchao"):
        raise ValueError(
            "--msam_quantization_backend must be 'simulated' or 'torchao', got "
            f"{msam_setting(args, 'msam_quantization_backend')!r}."
        )
    if msam_setting(args, "msam_rho_schedule") not in ("constant", "lr"):
        raise ValueError(f"--msam_rho_schedule must be 'constant' or 'lr', got {msam_setting(args, 'msam_rho_schedule')!r}.")
    # What the method combines with is read off its rules: one error for each combination that does not hold.
    method = msam_setting(args, "msam_method")
    precondition = msam_setting(args, "msam_precondition")
    if precondition not in ("none", "adam"):
        raise ValueError(f"--msam_precondition must be 'none' or 'adam', got {precondition!r}.")
    if precondition != "none":
        takers = [name for name, m in REGISTRY.items() if "msam_precondition" in m.flags]
        if "msam_precondition" not in get_method(method).flags:
            raise ValueError(
                f"--msam_precondition {precondition} does not combine with --msam_method {method}: it applies to "
                f"--msam_method {', '.join(takers)}. Drop --msam_precondition, or choose one of those."
            )
        if msam_setting(args, "msam_adaptive"):
            raise ValueError(
                f"--msam_precondition {precondition} does not combine with --msam_adaptive: both rescale the ascent "
                "gradient. Choose one."
            )
    perturbation, descent = build_method(method, args)
    check_compatible(
        perturbation,
        descent,
        method=method,
        adaptive=msam_setting(args, "msam_adaptive"),
        sync_perturbation=msam_setting(args, "msam_sync_perturbation"),
        interval=msam_setting(args, "msam_interval"),
    )


def msam_default(name: str) -> Any:
    """The default of the `MSAMArguments` field `name`."""
    if name not in _DEFAULTS:
        raise AttributeError(f"There is no mSAM setting {name!r}; the settings are {', '.join(_DEFAULTS)}.")
    return _DEFAULTS[name]


def msam_setting(args: TrainingArguments, name: str):
    """`args.<name>`, or its `MSAMTrainingArguments` default when `args` is a plain `TrainingArguments`."""
    return getattr(args, name, msam_default(name))
