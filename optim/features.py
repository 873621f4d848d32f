"""The explicit registry of transformer features, applied in this order when a run starts.

Each entry is a module that exposes FEATURE (an optim.handle.Feature). Order matters: weights first (LoRA), then
compiled code, then step caching, which wraps the forward pass.
"""

from __future__ import annotations

import importlib

from .handle import register_feature

FEATURE_MODULES: tuple[str, ...] = ("lora", "compile", "caching")


def register_all() -> None:
    for name in FEATURE_MODULES:
        register_feature(importlib.import_module(f".{name}", __package__).FEATURE)


register_all()
