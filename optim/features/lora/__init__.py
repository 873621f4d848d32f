"""LoRA stacks for FLUX.2: the `lora` feature.

A handle carries `loras`, a tuple of `LoraSpec` applied in order (stack nodes chain by appending). When a run starts,
`FEATURE.activate` brings the shared transformer to that stack: each file's adapter is loaded once per base, then the
active set and strengths are written (no file read, no base reload). A handle without enabled LoRAs runs the exact
base weights. When the run ends adapters are switched off again, so the shared module computes its base weights for
anyone else.

torch.compile: strengths are 0-dim tensors updated in place (see stack.py), so changing a strength never recompiles.
Changing *which* adapters are active (adding a LoRA, turning the last one off) changes the traced structure: each
distinct set compiles once and is then reused from dynamo's cache. A LoRA switched off while others stay on is kept
active at strength 0 once loaded, so toggling it does not recompile either. The compile feature runs after this one
(FEATURE_MODULES order) and calls what this feature declares as `prepare_for_compile` before compiling; it is
idempotent.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from dataclasses import dataclass

from ...errors import InputError
from ..api import Feature
from ...handle import file_identity
from . import stack


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA in a stack: an absolute path to a .safetensors file, its strength, and whether it is on."""

    path: str
    strength: float = 1.0
    enabled: bool = True

    def __post_init__(self):
        if not isinstance(self.path, str) or not self.path:
            raise InputError("LoRA path is empty: choose a file from models/loras.")
        try:
            strength = float(self.strength)
        except (TypeError, ValueError):
            raise InputError(f"LoRA strength {self.strength!r} for '{self.path}' is not a number.") from None
        if strength != strength or abs(strength) > 100:
            raise InputError(f"LoRA strength {self.strength} for '{self.path}' is out of range (-100..100).")
        object.__setattr__(self, "strength", strength)
        object.__setattr__(self, "enabled", bool(self.enabled))


def prepare_for_compile(transformer) -> None:
    """Make every loaded adapter's strength a tensor attribute, so dynamo does not specialize on its value.

    Call it right before `torch.compile` / `compile_repeated_blocks`. The lora feature already keeps strengths as
    tensors whenever it sets them; this covers adapters loaded by other means. Safe without any LoRA."""
    stack.tensorize_scalings(transformer)


@contextlib.contextmanager
def activate(store, transformer, handle, report):
    specs = tuple(handle.loras or ())
    state = stack.state_for(store, handle.base_key, transformer)
    if not specs and not state.adapters:  # never had a LoRA: leave the module untouched
        yield
        return
    try:
        strengths, lines, matched = OrderedDict(), [], {}
        for spec in specs:
            if not isinstance(spec, LoraSpec):
                raise InputError(f"handle.loras must hold LoraSpec entries, got {type(spec).__name__}.")
            identity = file_identity(spec.path)
            loaded = state.adapters.get(identity)
            if not spec.enabled and loaded is None:
                lines.append(f"{_file_name(spec.path)} (off)")
                continue  # switched off and never loaded: no need to read it
            loaded = stack.load_adapter(transformer, state, spec.path)
            # the same file twice adds up: (s1 + s2) * delta
            strengths[loaded.adapter_name] = strengths.get(loaded.adapter_name, 0.0) + (
                spec.strength if spec.enabled else 0.0)
            lines.append(f"{loaded.file_name} x{spec.strength:g}" + ("" if spec.enabled else " (off)"))
            matched[loaded.file_name] = f"{loaded.matched_keys}/{loaded.total_keys}"
        if not any(spec.enabled for spec in specs):
            strengths.clear()  # nothing on: the exact base, not adapters at strength 0
        stack.evict_idle(transformer, state, keep=set(strengths))
        stack.set_stack(transformer, state, strengths)
        if specs:
            report.stats["lora"] = {"active": lines, "matched_keys": matched}
    except BaseException:
        stack.disable(stack.tuner_layers(transformer))  # never leave a half-configured stack behind
        raise
    try:
        yield
    finally:
        if state.adapters:
            stack.disable(state.tuner_layers(transformer))


def _file_name(path: str) -> str:
    return path.replace("\\", "/").rsplit("/", 1)[-1]


FEATURE = Feature("lora", activate, prepare_for_compile=prepare_for_compile)

__all__ = ["FEATURE", "LoraSpec", "prepare_for_compile"]
