"""Every node checks its own inputs at entry, against the limits its INPUT_TYPES declares.

ComfyUI's frontend keeps widgets within min/max, but an API-format workflow, a direct call or another pack's node
can hand a node anything: -1 or NaN seconds, a step count above the maximum, a string where a number goes. One check
here, driven by the node class's own INPUT_TYPES (so limits live in one place), is installed on every node's
FUNCTION when the node registry loads (nodes/__init__.py). A bad value fails with the node and the widget named.
"""

from __future__ import annotations

import functools
import inspect
import math

from ..optim.errors import InputError

_CHECKED = "__flux2accel_checked__"


def problem(kind, options: dict, value):
    """Why `value` does not fit a widget declared as (kind, options), or None when it fits."""
    if isinstance(kind, (list, tuple)):  # a combo: one of the listed choices
        return None if not kind or value in kind else f"not one of the choices ({', '.join(map(str, kind[:8]))}" \
                                                      f"{', ...' if len(kind) > 8 else ''})"
    if kind == "BOOLEAN":
        return None if isinstance(value, bool) else "not a boolean (true/false)"
    if kind == "STRING":
        return None if isinstance(value, str) else "not a string"
    if kind not in ("INT", "FLOAT"):
        return None  # tensors, models, conditionings: checked by the code that reads them
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"not a number ({type(value).__name__})"
    if kind == "INT" and isinstance(value, float) and not value.is_integer():
        return "not a whole number"
    if not math.isfinite(value):
        return "not a finite number"
    low, high = options.get("min"), options.get("max")
    if low is not None and value < low:
        return f"below the minimum {low}"
    if high is not None and value > high:
        return f"above the maximum {high}"
    return None


def check_inputs(node_class, declared: dict, node_id: str, display_name: str, values: dict) -> None:
    """Raise InputError naming the node and the first widget whose value does not fit its declaration (`declared`:
    the class's INPUT_TYPES())."""
    for section in ("required", "optional"):
        for name, declaration in (declared.get(section) or {}).items():
            if name not in values or not isinstance(declaration, (list, tuple)) or not declaration:
                continue
            options = declaration[1] if len(declaration) > 1 and isinstance(declaration[1], dict) else {}
            kind = declaration[0]
            if name in getattr(node_class, "FILE_WIDGETS", ()):
                # model-file choices: the loader resolves the name itself and says which folder lacks it (the file
                # may also have been added since the menu was listed)
                kind = "STRING"
            why = problem(kind, options, values[name])
            if why:
                raise InputError(f"{display_name} ({node_id}): widget '{name}' is {values[name]!r}: {why}.")


def install(node_class, node_id: str, display_name: str) -> None:
    """Wrap the class's FUNCTION so each call checks its inputs first (once per class)."""
    name = node_class.FUNCTION
    function = node_class.__dict__.get(name) or getattr(node_class, name)
    if getattr(function, _CHECKED, False):
        return
    signature = inspect.signature(function)
    # Read once: the limits are static, and the one dynamic part (model-file menus) is FILE_WIDGETS, resolved by
    # the loaders themselves; reading it per call would list the model folders on every run.
    declared = node_class.INPUT_TYPES()

    @functools.wraps(function)
    def checked(self, *args, **kwargs):
        values = {}
        for key, value in signature.bind_partial(self, *args, **kwargs).arguments.items():
            if signature.parameters[key].kind is inspect.Parameter.VAR_KEYWORD:  # LoRA Stack's slot widgets
                values.update(value)
            elif key != "self":
                values[key] = value
        check_inputs(node_class, declared, node_id, display_name, values)
        return function(self, *args, **kwargs)

    setattr(checked, _CHECKED, True)
    setattr(node_class, name, checked)
