"""An instance attribute set for a while (a module's `forward`, an accelerator's `backward`) and taken off again.

Others set the same attributes: accelerate's hooks wrap a module's `forward` on the instance, and transformers' hub
kernels (`kernels.kernelize`, run by `PreTrainedModel.train()` when the mode changes) set or delete it. The undo
below therefore restores exactly what it found (the instance attribute present with its value, or absent) only while
the attribute is still ours; when someone replaced or removed it in between, theirs is the newer state and stays.
It never raises: an undo runs in `finally` blocks, often while another exception is on its way.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

_ABSENT = object()


def set_on_instance(obj: Any, name: str, value: Any) -> Callable[[], bool]:
    """Set `obj.<name> = value` on the instance; return the undo, which answers whether it restored the state found
    (True) or left a newer one that someone else set in between (False)."""
    found = obj.__dict__.get(name, _ABSENT)
    setattr(obj, name, value)

    def undo() -> bool:
        if obj.__dict__.get(name, _ABSENT) is not value:  # replaced or removed by someone else: theirs stays
            return False
        if found is _ABSENT:
            obj.__dict__.pop(name, None)  # nn.Module keeps plain attributes in __dict__ too
        else:
            setattr(obj, name, found)
        return True

    return undo


def instance_value(obj: Any, name: str) -> Any:
    """The instance's own attribute `name`, or None when the class's is used."""
    return obj.__dict__.get(name)
