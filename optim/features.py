"""The explicit registry of transformer features, applied in this order when a run starts.

Each entry is a module that exposes FEATURE (an `optim.feature_api.Feature`). Order matters: weights first (LoRA),
then compiled code, then step caching, which wraps the forward pass.
"""

from __future__ import annotations

from . import caching, lora
from . import compile as compiling

FEATURE_MODULES: tuple[str, ...] = ("lora", "compile", "caching")
FEATURES: tuple = (lora.FEATURE, compiling.FEATURE, caching.FEATURE)
