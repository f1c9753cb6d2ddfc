"""The sharpness-aware methods, one module each, and the registry that names them for `--msam_method`.

A method is a factory that takes the parsed arguments (an `MSAMArguments`, or any object with `msam_*` fields:
missing ones read as their defaults), and its own settings as keyword parameters, and returns its (perturbation
rule, descent rule) pair:

```python
from hf_msam import SAMDescent, SAMPerturbation, register_method

@register_method("scaled", paper="SAM at a fraction of the radius", cost="2 passes per micro-batch")
def build(args, factor: float = 0.5):
    return SAMPerturbation(rho=args.msam_rho * factor), SAMDescent()
```

after which `--msam_method scaled --msam_method_args "factor=0.25"` trains with it (`MSAMTrainer`, `hf-msam run`, TRL
configs; `build_method("scaled", method_args={"factor": 0.25})` in Python). What a method combines with (ASAM,
synchronized perturbations, FSDP2, the vectorized path, `--msam_interval`, whether it reads the optimizer's state) is
read off its rules (`Capabilities`); `check_compatible` raises the one error for each combination that does not
hold, wherever it is asked for.

The registry lives in `registry.py`, which imports none of the methods; the built-in methods register themselves
when the modules imported below are (`method_names()` lists every registered method, `methods_table()` describes
them). The rules: `base.py` the two halves of a method, `sam.py` SAM and ASAM, `precondition.py` preconditioned SAM
(and the `sam` method, whose ascent may be it).
"""

from __future__ import annotations

from .base import Capabilities, DescentRule, PerturbationRule
from .registry import (
    REGISTRY,
    Method,
    MethodRow,
    Setting,
    build_method,
    check_compatible,
    get_method,
    method_names,
    methods_table,
    parse_method_args,
    register_method,
)

__all__ = [
    "Capabilities",
    "DescentRule",
    "Method",
    "MethodRow",
    "PerturbationRule",
    "REGISTRY",
    "Setting",
    "build_method",
    "check_compatible",
    "get_method",
    "method_names",
    "methods_table",
    "parse_method_args",
    "register_method",
]

# The built-in methods register themselves on import, in this order (the order of --help and of the methods table).
from . import precondition, gsam, fsam, looksam, momentum  # noqa: E402,F401,I001  (precondition.py registers sam)
from . import functional  # noqa: E402,F401
from . import flat_lora  # noqa: E402,F401
from . import logits_sam  # noqa: E402,F401
