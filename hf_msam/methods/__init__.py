"""The sharpness-aware methods, one module each, and the registry that names them for `--msam_method`.

A method is a factory that takes the parsed arguments (an `MSAMArguments`, or any object with `msam_*` fields:
missing ones read as their defaults) and returns its (perturbation rule, descent rule) pair:

```python
from hf_msam import SAMDescent, SAMPerturbation, register_method

@register_method("halfrho", paper="SAM at half the radius", flags=("msam_rho",))
def build(args):
    return SAMPerturbation(rho=args.msam_rho / 2), SAMDescent()
```

after which `--msam_method halfrho` trains with it (`MSAMTrainer`, `hf-msam run`, TRL configs). What a method
combines with (ASAM, synchronized perturbations, FSDP2, the vectorized path, `--msam_interval`, whether it reads
the optimizer's state) is read off its rules (`Capabilities`); `check_compatible` raises the one error for each
combination that does not hold, wherever it is asked for.

Built in: `sam` (and ASAM) in `sam.py`, `gsam`, `fsam`, `looksam`, `momentum`, `functional`, `flat_lora` in modules of
those names; `--msam_precondition adam` (for `sam` and `functional`) in `precondition.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .base import Capabilities, DescentRule, PerturbationRule, check_compatible

__all__ = [
    "Capabilities",
    "DescentRule",
    "Method",
    "PerturbationRule",
    "REGISTRY",
    "build_method",
    "check_compatible",
    "get_method",
    "method_names",
    "register_method",
]

Factory = Callable[[Any], tuple[PerturbationRule, DescentRule]]


@dataclass(frozen=True)
class Method:
    """A registered method: its name, its factory, the paper it implements and the `--msam_*` flags it reads."""

    name: str
    build: Factory
    paper: str = ""
    flags: tuple[str, ...] = ()


REGISTRY: dict[str, Method] = {}


def register_method(name: str, *, paper: str = "", flags: tuple[str, ...] = (), replace: bool = False) -> Callable[[Factory], Factory]:
    """Decorator: register `factory(args) -> (PerturbationRule, DescentRule)` as `--msam_method name`.

    `paper` (a reference) and `flags` (the `msam_*` fields the factory reads) are shown in `--help` and in errors.
    Registering a name twice raises unless `replace=True`."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"A method name must be a plain identifier (letters, digits, underscores), got {name!r}.")

    def decorator(factory: Factory) -> Factory:
        if name in REGISTRY and not replace and REGISTRY[name].build is not factory:
            raise ValueError(f"--msam_method {name!r} is already registered; pass replace=True to register_method to replace it.")
        REGISTRY[name] = Method(name, factory, paper, tuple(flags))
        return factory

    return decorator


def method_names() -> list[str]:
    return list(REGISTRY)


def get_method(name: str) -> Method:
    if name not in REGISTRY:
        raise ValueError(
            f"--msam_method must be one of the registered methods ({', '.join(REGISTRY)}), got {name!r}. "
            "Register your own with hf_msam.register_method before the arguments are built."
        )
    return REGISTRY[name]


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
        from ..training_args import msam_default

        return msam_default(name)


def build_method(method: str = "sam", args: Any = None, /, optimizer: Any = None, **settings: Any) -> tuple[PerturbationRule, DescentRule]:
    """The (perturbation, descent) pair of a registered method, built from `args` (parsed arguments, or None for the
    defaults) and keyword `settings` over them (`rho=0.1` or `msam_rho=0.1`). `optimizer` is given to rules that read
    its state (Momentum-SAM)."""
    perturbation, descent = get_method(method).build(_Settings(args, settings))
    if not isinstance(perturbation, PerturbationRule) or not isinstance(descent, DescentRule):
        raise TypeError(
            f"The factory of --msam_method {method} must return (PerturbationRule, DescentRule), got "
            f"({type(perturbation).__name__}, {type(descent).__name__})."
        )
    if optimizer is not None and perturbation.needs_optimizer_state:
        perturbation.optimizer = optimizer
    return perturbation, descent


# The built-in methods register themselves on import.
from . import sam, gsam, fsam, looksam, momentum  # noqa: E402,F401,I001  (this order is the order of --help)
from . import functional  # noqa: E402,F401  (Functional-SAM, and preconditioned SAM in precondition.py)
from . import flat_lora  # noqa: E402,F401
