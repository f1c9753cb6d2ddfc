"""The method registry: `register_method` names a method for `--msam_method`, `build_method` builds its rules, and
everything `--help`, the errors and the docs say about the methods is read from here when it is shown.

A method is a factory `build(args, **settings) -> (PerturbationRule, DescentRule)`. `args` are the parsed arguments
(any `msam_*` field; a missing one reads as its default). The keyword parameters after `args` are the method's own
settings, each with a default and a type (its annotation, else its default's type: int, float, bool or str), given
as `--msam_method_args "name=value,..."` (a dict in Python):

```python
@register_method("scaled", paper="SAM at a fraction of the radius", cost="2 passes per micro-batch")
def build(args, factor: float = 0.5):
    return SAMPerturbation(rho=args.msam_rho * factor), SAMDescent()
```

A parameter whose name ends in "_" (PEP 8's way around a keyword) is the setting without it: `lambda_` is `lambda`.
A built-in setting that had a flag of its own before `--msam_method_args` (`--msam_gsam_alpha`) keeps it
(`dedicated_flags`): the flag sets the setting unless the key is given, and both at once are refused.

This module imports none of its users: the methods import it to register themselves, the arguments to check them.
"""

from __future__ import annotations

import inspect
import json
import math
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from ..defaults import MSAM_DEFAULTS
from .base import Capabilities, DescentRule, PerturbationRule

__all__ = [
    "Method",
    "MethodRow",
    "REGISTRY",
    "Setting",
    "build_method",
    "check_compatible",
    "get_method",
    "method_default",
    "method_names",
    "methods_table",
    "parse_method_args",
    "register_method",
    "require",
]

Factory = Callable[..., tuple[PerturbationRule, DescentRule]]

_TYPES = (bool, int, float, str)
_TRUE, _FALSE = ("true", "yes", "1", "on"), ("false", "no", "0", "off")


@dataclass(frozen=True)
class Setting:
    """One setting of a method: its `name` in `--msam_method_args`, its type and default, the factory's `parameter`
    that takes it, and the dedicated `--msam_*` flag that also sets it (None for most)."""

    name: str
    type: type
    default: Any
    parameter: str
    flag: str | None = None

    def __str__(self) -> str:
        flag = f"; or --{self.flag}" if self.flag else ""
        return f"{self.name} ({self.type.__name__}, default {self.default}{flag})"

    def convert(self, value: Any) -> Any:
        """`value` as this setting's type. A string is parsed (a bool from true/false, yes/no, 1/0, on/off); any other
        value must be of the type already (an int is taken for a float; a bool only for a bool). Raises ValueError
        saying what was given."""
        if isinstance(value, str) and self.type is not str:
            text = value.strip()
            if self.type is bool and text.lower() in _TRUE + _FALSE:
                return text.lower() in _TRUE
            if self.type is not bool:
                try:
                    return self.type(text)
                except ValueError:
                    pass
            raise ValueError(f"got {value!r}")
        if self.type is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, self.type) and (self.type is bool or not isinstance(value, bool)):
            return value
        raise ValueError(f"got {value!r} ({_a(type(value))})")


def _a(kind: type) -> str:
    """"an int", "a float", ...: a type's name with its article, for messages."""
    name = getattr(kind, "__name__", str(kind))
    return f"{'an' if name[:1] in 'aeiou' else 'a'} {name}"


@dataclass(frozen=True)
class Method:
    """A registered method: its name, its factory, the paper it implements, the `--msam_*` flags it reads, a one-line
    note of its cost, and its own settings (the factory's keyword parameters after `args`)."""

    name: str
    build: Factory
    paper: str = ""
    flags: tuple[str, ...] = ()
    cost: str = ""
    settings: tuple[Setting, ...] = ()

    def setting(self, name: str) -> Setting | None:
        return next((s for s in self.settings if s.name == name), None)

    def describe_settings(self) -> str:
        """`name (type, default d; or --flag), ...`, or "none"."""
        return ", ".join(map(str, self.settings)) or "none"


class MethodRow(NamedTuple):
    """One row of the methods table (`methods_table`)."""

    name: str
    paper: str
    settings: str
    cost: str


REGISTRY: dict[str, Method] = {}


def _settings_of(name: str, factory: Factory, dedicated_flags: Mapping[str, str]) -> tuple[Setting, ...]:
    """The settings a factory declares: its parameters after the first, each with a default of int, float, bool or
    str (by annotation, else by the default's type). Raises ValueError, saying how to declare them, when one cannot
    be a setting."""
    where = f"register_method({name!r})"
    try:
        parameters = list(inspect.signature(factory).parameters.values())[1:]
    except (TypeError, ValueError):  # a callable without a signature: no settings
        parameters = []
    try:
        hints = typing.get_type_hints(factory)
    except Exception:  # an annotation that does not resolve: read the default's type instead
        hints = {}
    settings = []
    for p in parameters:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.kind is p.POSITIONAL_ONLY or p.default is p.empty:
            raise ValueError(
                f"{where}: the factory's parameter {p.name!r} after `args` is a setting, so it needs a default and must "
                f"be passable by keyword, e.g. def build(args, {p.name}: float = 0.5)."
            )
        kind = hints.get(p.name, p.annotation)
        kind = type(p.default) if kind is p.empty else kind
        if isinstance(kind, str):  # an annotation get_type_hints could not resolve, read as a name
            kind = {t.__name__: t for t in _TYPES}.get(kind, kind)
        fits = isinstance(p.default, kind) if kind in _TYPES else False
        if kind is float and isinstance(p.default, int) and not isinstance(p.default, bool):
            fits = True
        if kind is int and isinstance(p.default, bool):
            fits = False
        if not fits:
            raise ValueError(
                f"{where}: the setting {p.name!r} must be of type int, float, bool or str with a default of that type, "
                f"got {getattr(kind, '__name__', kind)} with default {p.default!r}."
            )
        public = p.name[:-1] if p.name.endswith("_") else p.name  # `lambda_` is the setting `lambda`
        settings.append(Setting(public, kind, p.default, p.name, dedicated_flags.get(public)))
    unknown = set(dedicated_flags) - {s.name for s in settings}
    if unknown:
        raise ValueError(f"{where}: dedicated_flags names {sorted(unknown)}, which are not settings of the factory.")
    return tuple(settings)


MEASURED = " (measured on a CPU: benchmarks/README.md)"  # appended to a built-in method's measured cost


def register_method(
    name: str,
    *,
    paper: str = "",
    flags: tuple[str, ...] = (),
    cost: str = "",
    dedicated_flags: Mapping[str, str] | None = None,
    replace: bool = False,
) -> Callable[[Factory], Factory]:
    """Decorator: register `factory(args, **settings) -> (PerturbationRule, DescentRule)` as `--msam_method name`.

    The factory's keyword parameters after `args` are its settings (`--msam_method_args`; see the module docstring).
    `paper` (a reference), `flags` (the `msam_*` fields the factory reads) and `cost` (one line, e.g. "2 passes per
    micro-batch") are shown in `--help`, the errors and `methods_table()`. `dedicated_flags` maps a setting to an
    `msam_*` field that also sets it (the built-in methods' flags from before `--msam_method_args`). Registering a
    name twice raises unless `replace=True`."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"A method name must be a plain identifier (letters, digits, underscores), got {name!r}.")
    dedicated_flags = dict(dedicated_flags or {})

    def decorator(factory: Factory) -> Factory:
        if name in REGISTRY and not replace and REGISTRY[name].build is not factory:
            raise ValueError(f"--msam_method {name!r} is already registered; pass replace=True to register_method to replace it.")
        settings = _settings_of(name, factory, dedicated_flags)
        all_flags = tuple(dict.fromkeys((*flags, *dedicated_flags.values())))
        REGISTRY[name] = Method(name, factory, paper, all_flags, cost, settings)
        return factory

    return decorator


def method_names(where: Callable[[Capabilities], bool] | None = None, **settings: Any) -> list[str]:
    """The registered methods, in registration order; with `where`, those whose capabilities (built with their
    defaults and `settings`) satisfy it. A method that cannot be built with these settings is left out."""
    if where is None:
        return list(REGISTRY)
    names = []
    for name in REGISTRY:
        try:
            if where(Capabilities.of(*build_method(name, **settings))):
                names.append(name)
        except Exception:  # a user's method that cannot be built with these settings: not a suggestion
            continue
    return names


def get_method(name: str) -> Method:
    if name not in REGISTRY:
        raise ValueError(
            f"--msam_method must be one of the registered methods ({', '.join(REGISTRY)}), got {name!r}. "
            "Register your own with hf_msam.register_method before the arguments are built."
        )
    return REGISTRY[name]


def methods_table() -> list[MethodRow]:
    """One row per registered method, in registration order, for a table in the docs: its name, paper, settings
    (`name (type, default d; or --flag)`, or "none") and cost note."""
    return [MethodRow(m.name, m.paper, m.describe_settings(), m.cost) for m in REGISTRY.values()]


def describe_methods() -> str:
    """`name (paper; cost), ...` for every registered method, for help texts."""
    return ", ".join(f"{m.name} ({'; '.join(filter(None, (m.paper, m.cost)))})" if m.paper or m.cost else m.name
                     for m in REGISTRY.values())  # fmt: skip


def describe_all_settings() -> str:
    """`method: its settings; ...` for the methods with settings, then the names of those without, for help texts."""
    parts = [f"{m.name}: {m.describe_settings()}" for m in REGISTRY.values() if m.settings]
    bare = [m.name for m in REGISTRY.values() if not m.settings]
    if bare:
        parts.append(f"{', '.join(bare)}: none")
    return "; ".join(parts)


def method_default(name: str) -> Any:
    """The default of the `--msam_*` field `name` for a factory that reads it: a dedicated flag's is its setting's."""
    for method in REGISTRY.values():
        for s in method.settings:
            if s.flag == name:
                return s.default
    if name in MSAM_DEFAULTS:
        return MSAM_DEFAULTS[name]
    flags = sorted({s.flag for m in REGISTRY.values() for s in m.settings if s.flag})
    raise AttributeError(f"There is no mSAM setting {name!r}; the settings are {', '.join([*MSAM_DEFAULTS, *flags])}.")


def parse_method_args(value: Any) -> dict[str, Any]:
    """`--msam_method_args` as a dict: None is {}, a mapping is copied, a string is comma-separated `key=value` pairs
    ("alpha=0.2,k=3", as transformers' `--optim_args`) or a JSON object. Values stay as given: each method converts
    its own."""
    how = 'comma-separated key=value pairs, e.g. --msam_method_args "alpha=0.2,k=3" (a dict in Python)'
    if value is None:
        return {}
    if isinstance(value, Mapping):
        items = dict(value)
    elif isinstance(value, str):
        text = value.strip()
        if text.startswith("{"):
            try:
                items = json.loads(text)
            except json.JSONDecodeError as err:
                raise ValueError(f"--msam_method_args {value!r} is not valid JSON ({err}); give {how}.") from None
            if not isinstance(items, dict):
                raise ValueError(f"--msam_method_args {value!r} must be a JSON object; give {how}.")
        else:
            items = {}
            for pair in filter(None, (p.strip() for p in text.split(","))):
                key, sep, val = pair.partition("=")
                if not sep or not key.strip():
                    raise ValueError(f"--msam_method_args: {pair!r} is not key=value; give {how}, got {value!r}.")
                if key.strip() in items:
                    raise ValueError(f"--msam_method_args gives {key.strip()!r} twice in {value!r}: give it once.")
                items[key.strip()] = val.strip()
    else:
        raise ValueError(f"--msam_method_args must be {how}, got a {type(value).__name__}: {value!r}.")
    if not all(isinstance(key, str) for key in items):
        raise ValueError(f"--msam_method_args: the keys must be setting names (strings), got {list(items)!r}.")
    return items


def _its_settings(entry: Method) -> str:
    if not entry.settings:
        return f"--msam_method {entry.name} has no settings of its own: leave --msam_method_args empty for it."
    return (f"The settings of --msam_method {entry.name}: {entry.describe_settings()}; give them as "
            f'--msam_method_args "name=value,..." (a dict in Python).')  # fmt: skip


def _resolve(entry: Method, view: Any, given: dict[str, Any]) -> dict[str, Any]:
    """The factory's keyword arguments: each setting from `given` (converted), else from its dedicated flag, else its
    default. Raises ValueError for a key the method does not have, a value of the wrong type, or a key given while its
    dedicated flag is set (to another value than the default) too."""
    unknown = [key for key in given if entry.setting(key) is None]
    if unknown:
        owners = {key: [m.name for m in REGISTRY.values() if m.setting(key)] for key in unknown}
        elsewhere = [f"{key} is a setting of --msam_method {', '.join(names)}" for key, names in owners.items() if names]
        hint = f" ({'; '.join(elsewhere)})" if elsewhere else ""
        raise ValueError(
            f"--msam_method_args: --msam_method {entry.name} has no setting {', '.join(map(repr, unknown))}{hint}. "
            + _its_settings(entry)
        )
    values = {}
    for s in entry.settings:
        flagged = getattr(view, s.flag) if s.flag else s.default
        if s.name not in given:
            values[s.parameter] = flagged  # the dedicated flag's value as it always was: at its default, the default
            continue
        if s.flag and flagged != s.default:
            raise ValueError(
                f"--{s.flag} {flagged} and --msam_method_args {s.name}={given[s.name]} both set {s.name} of --msam_method "
                f"{entry.name}: give one of them. " + _its_settings(entry)
            )
        try:
            values[s.parameter] = s.convert(given[s.name])
        except ValueError as err:
            what = " (true/false, yes/no, 1/0 or on/off)" if s.type is bool else ""
            raise ValueError(
                f"--msam_method_args: {s.name} of --msam_method {entry.name} must be {_a(s.type)}{what}, {err}. "
                + _its_settings(entry)
            ) from None
    return values


def require(ok: bool, method: str, name: str, value: Any, what: str) -> None:
    """Raise the ValueError of setting `name` of `method` when not `ok`: it must be `what` (a factory checks its
    settings with this)."""
    if ok:
        return
    setting = REGISTRY[method].setting(name) if method in REGISTRY else None
    flag = f", or --{setting.flag}" if setting is not None and setting.flag else ""
    raise ValueError(
        f"{name} of --msam_method {method} (--msam_method_args {name}=...{flag}) must be {what}, got {value!r}."
    )


def is_finite(value: Any, low: float | None = None, high: float | None = None, low_open: bool = False) -> bool:
    """A real number (not a bool), finite, in [low, high) (or (low, high) with `low_open`)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return False
    if low is not None and (value <= low if low_open else value < low):
        return False
    return high is None or value < high


def is_whole(value: Any, low: int = 1) -> bool:
    """An int (not a bool) >= low."""
    return not isinstance(value, bool) and isinstance(value, int) and value >= low


class _Settings:
    """`args` with the `msam_*` defaults behind it, and `settings` over it (given as `msam_rho` or as `rho`)."""

    def __init__(self, args: Any, settings: dict[str, Any]):
        self._args = args
        self._settings = {(k if k.startswith("msam_") else f"msam_{k}"): v for k, v in settings.items()}

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        if name in self._settings:
            return self._settings[name]
        if self._args is not None and hasattr(self._args, name):
            return getattr(self._args, name)
        return method_default(name)


def build_method(
    method: str = "sam", args: Any = None, /, optimizer: Any = None, method_args: Any = None, **settings: Any
) -> tuple[PerturbationRule, DescentRule]:
    """The (perturbation, descent) pair of a registered method, built from `args` (parsed arguments, or None for the
    defaults) and keyword `settings` over them (`rho=0.1` or `msam_rho=0.1`). The method's own settings come from
    `args.msam_method_args` with `method_args` (a dict, or "key=value,...") over it. `optimizer` is given to rules
    that read its state (Momentum-SAM)."""
    entry = get_method(method)
    view = _Settings(args, settings)
    given = {**parse_method_args(view.msam_method_args), **parse_method_args(method_args)}
    perturbation, descent = entry.build(view, **_resolve(entry, view, given))
    if not isinstance(perturbation, PerturbationRule) or not isinstance(descent, DescentRule):
        raise TypeError(
            f"The factory of --msam_method {method} must return (PerturbationRule, DescentRule), got "
            f"({type(perturbation).__name__}, {type(descent).__name__})."
        )
    if optimizer is not None and perturbation.needs_optimizer_state:
        perturbation.optimizer = optimizer
    return perturbation, descent


def check_compatible(
    perturbation: PerturbationRule,
    descent: DescentRule,
    *,
    method: str | None = None,
    adaptive: bool | None = None,
    sync_perturbation: bool = False,
    fsdp2: bool = False,
    interval: int = 1,
) -> None:
    """Raise ValueError, naming the flags, when the method cannot be combined with the set-up asked for.

    `method` is the registered name (None: rules given directly); `adaptive` whether ASAM was asked for (None:
    not known here); `sync_perturbation` whether perturbations are synchronized (always under FSDP2)."""
    caps = Capabilities.of(perturbation, descent)
    who = f"--msam_method {method}" if method else f"the rules {perturbation!r} and {descent!r}"
    if getattr(descent, "through_outputs", False) and not perturbation.needs_gradient:
        raise ValueError(
            f"{who}: a descent through the outputs (Functional-SAM) needs ∇_F L at w from a clean pass, and the "
            f"perturbation {perturbation!r} makes none (needs_gradient False)."
        )
    if adaptive and not caps.adaptive:
        raise ValueError(
            f"--msam_adaptive (ASAM) does not combine with {who}: its perturbation is not adaptive. Drop "
            f"--msam_adaptive, or use a method that takes it ({_names_where(lambda c: c.adaptive, msam_adaptive=True)})."
        )
    if interval != 1 and not caps.interval:
        raise ValueError(
            f"--msam_interval does not combine with {who}, which has its own interval (--msam_looksam_k for looksam): "
            "leave --msam_interval at 1."
        )
    if fsdp2 and not caps.fsdp2:
        why = _why(perturbation, descent, "fsdp2", _NONLINEAR + ", which FSDP2's sharded gradients do not give")
        raise ValueError(
            f"{who} is not supported under FSDP2: {why}. Use --msam_method "
            f"{_names_where(lambda c: c.fsdp2)} under FSDP2, or plain DDP."
        )
    if sync_perturbation and not caps.sync_perturbation:
        why = _why(perturbation, descent, "sync_perturbation", _NONLINEAR + ", which synchronizing the ascent does not make the union's")
        raise ValueError(
            f"--msam_sync_perturbation does not combine with {who}: {why}. Drop "
            "--msam_sync_perturbation (sync_perturbation=True in MicroBatchSAM) for device-local perturbations, or "
            f"use --msam_method {_names_where(lambda c: c.sync_perturbation)}."
        )


_NONLINEAR = "its descent is a nonlinear function of each device's own perturbed gradient"


def _why(perturbation: PerturbationRule, descent: DescentRule, capability: str, default: str) -> str:
    """Why `capability` does not hold: a rule's own note (`capability_notes[capability]`) where it has one, else
    `default`."""
    for rule in (perturbation, descent):
        note = getattr(rule, "capability_notes", {}).get(capability)
        if note:
            return note
    return default


def _names_where(predicate: Callable[[Capabilities], bool], **settings: Any) -> str:
    """The registered methods whose capabilities satisfy `predicate`, as text for a message."""
    return ", ".join(method_names(predicate, **settings)) or "none registered"
