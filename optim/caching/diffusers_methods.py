"""diffusers' own cache hooks that run on Flux2Transformer2DModel (0.42.1): MagCache and TaylorSeer.

(diffusers' FirstBlockCacheConfig raises a TypeError on Flux2, hence fbcache.py.) The hooks are enabled for one run
and disabled after it, so each run starts with fresh hook state. diffusers' hooks need a cache context on every call;
the [dev] pipeline sets none, so calls outside one run inside `cache_context("cond")`.

Widgets map onto the configs as closely as each method allows:
- magcache: threshold -> threshold; max_consecutive_cached -> max_skip_steps (0 = the number of steps);
  max(start_percent, warmup_steps / steps) -> retention_ratio. end_percent has no counterpart. The magnitude ratios
  are diffusers' FLUX.1 ratios (FLUX_MAG_RATIOS), interpolated to the run's steps: no FLUX.2 ratios are published,
  so they are an approximation until calibrated (MagCacheConfig(calibrate=True)).
- taylorseer: the threshold only switches it on; a full step is computed every max_consecutive_cached + 1 steps
  (cache_interval), never before max(warmup_steps, start_percent * steps) nor from end_percent * steps on.
"""

from __future__ import annotations

import contextlib
import math

from ..errors import InputError
from .runtime import Branch, CacheRun, forward_patched


def build_config(settings, total_steps: int | None):
    from diffusers import MagCacheConfig, TaylorSeerCacheConfig

    if not total_steps:
        raise InputError(f"{settings.method} needs the run's step count: set RunReport.params before the run.")
    steps = total_steps
    if settings.method == "magcache":
        from diffusers.hooks.mag_cache import FLUX_MAG_RATIOS

        return MagCacheConfig(threshold=settings.threshold,
                              max_skip_steps=settings.max_consecutive_cached or steps,
                              retention_ratio=min(1.0, max(settings.start_percent, settings.warmup_steps / steps)),
                              num_inference_steps=steps, mag_ratios=FLUX_MAG_RATIOS.clone())
    if settings.method == "taylorseer":
        after = None if settings.end_percent >= 1.0 else max(1, math.floor(settings.end_percent * steps))
        return TaylorSeerCacheConfig(cache_interval=(settings.max_consecutive_cached or steps) + 1,
                                     disable_cache_before_step=max(settings.warmup_steps,
                                                                   math.ceil(settings.start_percent * steps)),
                                     disable_cache_after_step=after)
    raise ValueError(settings.method)


def _execution_probe(transformer):
    """The last single-stream block's fused input projection runs only when that block really computes: both
    methods skip by replacing a block's or an attention's forward, never its inner layers."""
    return transformer.single_transformer_blocks[-1].attn.to_qkv_mlp_proj


@contextlib.contextmanager
def installed(transformer, run: CacheRun):
    executed = [0]

    def count(module, inputs):
        executed[0] += 1

    def call(original_forward, branch: Branch, args, kwargs):
        before = executed[0]
        context = (contextlib.nullcontext() if run.branch_name is not None
                   else transformer.cache_context(branch.name))
        with context:
            output = original_forward(*args, **kwargs)
        return output, executed[0] == before

    transformer.enable_cache(build_config(run.settings, run.total_steps))
    hook = _execution_probe(transformer).register_forward_pre_hook(count)
    try:
        with forward_patched(transformer, run, call):
            yield
    finally:
        hook.remove()
        transformer.disable_cache()
