"""TaylorSeer for FLUX.2: diffusers' own TaylorSeer hooks (which run on Flux2Transformer2DModel in 0.42.1).

The threshold only switches it on; a full step is computed every max_consecutive_cached + 1 steps (cache_interval),
never before max(warmup_steps, start_percent * steps) nor from end_percent * steps on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from . import diffusers_cache
from .decision import CacheRun


@dataclass(frozen=True)
class TaylorSeerSettings:
    method: ClassVar[str] = "taylorseer"
    cache_interval: int = 4
    disable_cache_before_step: int = 1
    disable_cache_after_step: int | None = None

    def config(self):
        from diffusers import TaylorSeerCacheConfig

        return TaylorSeerCacheConfig(cache_interval=self.cache_interval,
                                     disable_cache_before_step=self.disable_cache_before_step,
                                     disable_cache_after_step=self.disable_cache_after_step)


def settings_for(settings, total_steps: int | None) -> TaylorSeerSettings:
    steps = diffusers_cache.require_steps("taylorseer", total_steps)
    after = None if settings.end_percent >= 1.0 else max(1, math.floor(settings.end_percent * steps))
    return TaylorSeerSettings(cache_interval=(settings.max_consecutive_cached or steps) + 1,
                              disable_cache_before_step=max(settings.warmup_steps,
                                                            math.ceil(settings.start_percent * steps)),
                              disable_cache_after_step=after)


def new_run(settings, total_steps: int | None, family: str) -> CacheRun:
    return CacheRun(settings_for(settings, total_steps), settings.gate, total_steps)


def installed(transformer, run: CacheRun):
    return diffusers_cache.installed(transformer, run, run.settings.config())
