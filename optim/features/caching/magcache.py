"""MagCache for FLUX.2: diffusers' own MagCache hooks (which run on Flux2Transformer2DModel in 0.42.1).

The cache node's widgets map onto MagCacheConfig: threshold -> threshold; max_consecutive_cached -> max_skip_steps
(0 = the number of steps); max(start_percent, warmup_steps / steps) -> retention_ratio. end_percent has no
counterpart. The magnitude ratios are diffusers' FLUX.1 ratios (FLUX_MAG_RATIOS), interpolated to the run's steps:
no FLUX.2 ratios are published, so they are an approximation until calibrated (MagCacheConfig(calibrate=True)).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from . import diffusers_cache
from .decision import CacheRun


@dataclass(frozen=True)
class MagCacheSettings:
    method: ClassVar[str] = "magcache"
    threshold: float = 0.06
    max_skip_steps: int = 3
    retention_ratio: float = 0.2
    num_inference_steps: int = 28

    def config(self):
        from diffusers import MagCacheConfig
        from diffusers.hooks.mag_cache import FLUX_MAG_RATIOS

        return MagCacheConfig(threshold=self.threshold, max_skip_steps=self.max_skip_steps,
                              retention_ratio=self.retention_ratio, num_inference_steps=self.num_inference_steps,
                              mag_ratios=FLUX_MAG_RATIOS.clone())


def settings_for(settings, total_steps: int | None) -> MagCacheSettings:
    steps = diffusers_cache.require_steps("magcache", total_steps)
    return MagCacheSettings(threshold=settings.threshold, max_skip_steps=settings.max_consecutive_cached or steps,
                            retention_ratio=min(1.0, max(settings.start_percent, settings.warmup_steps / steps)),
                            num_inference_steps=steps)


def new_run(settings, total_steps: int | None, family: str) -> CacheRun:
    return CacheRun(settings_for(settings, total_steps), settings.gate, total_steps)


def installed(transformer, run: CacheRun):
    return diffusers_cache.installed(transformer, run, run.settings.config())
