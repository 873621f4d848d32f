"""The explicit registry of transformer features, applied in this order when a run starts.

Each entry is a module that exposes FEATURE (an `optim.features.api.Feature`). Order matters: weights first (LoRA),
then context parallelism (its hooks go on the LoRA-wrapped modules), then compiled code, then step caching, which
wraps the forward pass; the attention kernel is a process-wide dispatch setting held for the run (compiled code guards
on it, so it only has to be set before the first forward).
"""

from __future__ import annotations

from . import attention, caching, context_parallel, lora
from . import compile as compiling

FEATURE_MODULES: tuple[str, ...] = ("lora", "context_parallel", "compile", "caching", "attention")
FEATURES: tuple = (lora.FEATURE, context_parallel.FEATURE, compiling.FEATURE, caching.FEATURE, attention.FEATURE)
