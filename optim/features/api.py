"""What a transformer feature is, and what it may use: the contract between `optim.run.store` and the feature modules.

A feature (LoRA, compile, step cache...) is one kind of change to a live transformer, driven by one handle field.
`Feature.activate(store, transformer, handle, report)` returns a context manager held open for one run. Features do
not import each other: what one must know about another is declared here, on `Feature`, and read from the features
the store applies (`store.features`).

State a feature keeps between runs (loaded adapters, compiled code) lives in `FeatureStates`, one slot per loaded
base module and feature name, dropped when the store evicts the base or when the module under the key was replaced.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass(frozen=True)
class Feature:
    """One kind of change to a live transformer.

    activate(store, transformer, handle, report): a context manager kept open for the run. It must leave the module
        reusable when the run fails or is interrupted, and may write statistics into `report.stats[name]`.
    prepare_for_compile(transformer): what compiled code needs from this feature before tracing (LoRA: strengths as
        tensors, so a strength change does not recompile). None: nothing.
    decides_in_forward(handle) -> bool: True when, for this handle, the feature decides in Python inside the
        transformer's forward (step caching), so a whole-forward graph would guard on per-run state.
    """

    name: str
    activate: Callable[..., contextlib.AbstractContextManager]
    prepare_for_compile: Callable[[Any], None] | None = None
    decides_in_forward: Callable[[Any], bool] | None = None


@dataclass
class RunReport:
    """One run: its sampling parameters (set before the features are switched on), and what features report back
    (cache statistics, compile info...) under `stats[feature_name]`."""

    params: Any = None  # optim.run.sampling.SamplingParams
    stats: dict = field(default_factory=dict)


class FeatureStates:
    """Per-base state slots: `get(key, name, module, factory)` is feature `name`'s state for the base `key`, made by
    `factory()` the first time, and again when the module held under `key` is no longer `module` (a reloaded base
    starts clean). Holds modules weakly."""

    def __init__(self):
        self._slots: dict[Any, dict[str, tuple[weakref.ref, Any]]] = {}

    def get(self, key, name: str, module, factory: Callable[[], Any]):
        slot = self._slots.setdefault(key, {})
        held = slot.get(name)
        if held is None or held[0]() is not module:
            held = slot[name] = (weakref.ref(module), factory())
        return held[1]

    def drop(self, key) -> None:
        self._slots.pop(key, None)

    def clear(self) -> None:
        self._slots.clear()

    def __contains__(self, key) -> bool:
        return key in self._slots


LOOSE_STATES = FeatureStates()
"""Slots for modules that no store holds (a VAE decoder, a feature called directly): keyed by the module's id; the
weak reference check makes a reused id start clean."""


def feature_state(store, key, name: str, module, factory: Callable[[], Any]):
    """`store`'s slot for (key, name), or the loose slot of `module` when there is no store."""
    if store is None:
        return LOOSE_STATES.get(("module", id(module)), name, module, factory)
    return store.states.get(key, name, module, factory)
