"""Step Cache on ComfyUI's own FLUX.2 MODEL: returns a patched clone; the input MODEL is never changed.

The decision, its statistics and the block-layout adapter are the engine's (optim/features/caching/bfl_layout.py); this
module only installs them through ComfyUI's patcher (nodes/comfy_patching.py):
- block replacements for the first double and the last single block (patches_replace["dit"]), which find the
  run's state in transformer_options and run the blocks unchanged when there is none;
- an OUTER_SAMPLE wrapper that creates fresh state for each sampling run in a clone of the guider's model_options
  and, in `finally`, logs the statistics, shows them on this node and drops the state (like ComfyUI's EasyCache);
- a DIFFUSION_MODEL wrapper that tells the state which CFG branches (transformer_options["cond_or_uncond"]) each
  model call carries and at which sigma (so samplers that call the model twice per step count steps, not calls),
  hands the forward a copy of the block-replacement table that a skipped call can let the blocks between through
  with, and times the call.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ..optim.errors import InputError
from ..optim.features.caching import CacheSettings, parse_coefficients
from ..optim.features.caching.bfl_layout import METHODS, STATE_KEY, BflStepCache, block_replacements
from ..optim.features.caching.decision import TIMELINE_KEY
from ..optim.run.engine import format_stats
from . import comfy_patching, node_messages
from .cache import Flux2AccelStepCache

log = logging.getLogger("flux2_accel")

NODE_NAME = "Step Cache (FLUX.2, native MODEL)"
CONFIG_KEY = "flux2_accel_step_cache_config"
WRAPPER_KEY = "flux2_accel_step_cache"


@dataclass(frozen=True)
class NativeCacheConfig:
    """What the node chose; lives in the clone's transformer_options (deep-copied with it)."""

    settings: CacheSettings
    family: str
    num_double: int
    num_single: int
    node_id: str | None = None


def stats_lines(stats: dict) -> list[str]:
    """The statistics as the pack's sampler shows them, plus the decisions per branch (C computed, S skipped)."""
    timeline = stats.get(TIMELINE_KEY, {})
    return format_stats({"cache": stats}) + [f"{name}: {decisions}" for name, decisions in timeline.items()]


def outer_sample_wrapper(executor, *args, **kwargs):
    guider = executor.class_obj
    original_options = guider.model_options
    config = original_options.get("transformer_options", {}).get(CONFIG_KEY)
    if config is None:
        return executor(*args, **kwargs)
    sigmas = args[3] if len(args) > 3 else kwargs.get("sigmas")
    steps = max(0, len(sigmas) - 1) if sigmas is not None else None
    diffusion_model = guider.model_patcher.model.diffusion_model
    cache = BflStepCache(config.settings, steps, config.family, diffusion_model.double_blocks[0],
                         config.num_double, config.num_single, schedule=sigmas)
    try:
        guider.model_options = comfy_patching.clone_model_options(original_options)
        guider.model_options["transformer_options"][STATE_KEY] = cache
        return executor(*args, **kwargs)
    finally:
        guider.model_options = original_options
        stats = cache.stats()
        log.info("flux2-accel step cache (native MODEL): %s computed %d, skipped %d of %d model calls, about %.2f s "
                 "saved", stats["method"], stats["computed_steps"], stats["skipped_steps"], stats["total_steps"],
                 stats["estimated_time_saved_s"])
        if "note" in stats:
            log.info("flux2-accel step cache (native MODEL): %s", stats["note"])
        node_messages.show_on_node(config.node_id, stats_lines(stats))


def diffusion_model_wrapper(executor, *args, **kwargs):
    options = comfy_patching.wrapper_transformer_options(args, kwargs)
    cache = options.get(STATE_KEY)
    if cache is None:
        return executor(*args, **kwargs)
    x = args[0] if args else kwargs["x"]
    # This call's own block-replacement table, so that a skipped call can let the blocks between through
    block_table = dict(options.get("patches_replace", {}).get("dit", {}))
    call_options = {**options, "patches_replace": {**options.get("patches_replace", {}), "dit": block_table}}
    args, kwargs = comfy_patching.with_transformer_options(args, kwargs, call_options)
    with cache.model_call(options.get("cond_or_uncond"), x.shape[0], x.device, block_table, options.get("sigmas")):
        return executor(*args, **kwargs)


def patched(model, settings: CacheSettings, node_id=None):
    """A clone of ComfyUI MODEL `model` with the step cache installed (a plain clone when the threshold is 0)."""
    diffusion_model = comfy_patching.flux2_diffusion_model(model, NODE_NAME)
    settings.validate()
    if settings.method not in METHODS:
        raise InputError(f"{NODE_NAME}: method '{settings.method}' runs only on the pack's own FLUX2_MODEL; "
                         f"choose {' or '.join(METHODS)}.")
    clone = model.clone()
    if not settings.enabled:
        return clone
    family = comfy_patching.family_of(diffusion_model)  # TeaCache's run warns when [klein] has no coefficients
    num_double, num_single = len(diffusion_model.double_blocks), len(diffusion_model.single_blocks)
    clone.model_options.setdefault("transformer_options", {})[CONFIG_KEY] = NativeCacheConfig(
        settings, family, num_double, num_single,
        None if node_id is None else str(node_id))
    comfy_patching.replace_blocks(clone, block_replacements(num_double, num_single))
    comfy_patching.set_wrapper(clone, comfy_patching.OUTER_SAMPLE, WRAPPER_KEY, outer_sample_wrapper)
    comfy_patching.set_wrapper(clone, comfy_patching.DIFFUSION_MODEL, WRAPPER_KEY, diffusion_model_wrapper)
    return clone


class Flux2AccelNativeStepCache:
    @classmethod
    def INPUT_TYPES(cls):
        pack = Flux2AccelStepCache.INPUT_TYPES()
        required = dict(pack["required"])
        required["model"] = ("MODEL", {"tooltip": "ComfyUI's FLUX.2 model ([dev] or [klein], any weight format); it "
                                                  "is not changed, a patched copy is returned."})
        method_tooltip = ("fbcache: First Block Cache (runs the first block, reuses the rest when its change is "
                          "small). teacache: skips the whole step from the change of the modulated input.")
        required["method"] = (list(METHODS), {**required["method"][1], "tooltip": method_tooltip})
        threshold = dict(required["threshold"][1])
        threshold["tooltip"] = ("0 turns caching off (the model runs exactly as without this node). Higher skips "
                                "more steps and changes the image more. fbcache ~0.08-0.15; teacache ~0.05-0.3.")
        required["threshold"] = ("FLOAT", threshold)
        return {"required": required, "optional": pack["optional"], "hidden": {"unique_id": "UNIQUE_ID"}}

    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    FUNCTION = "apply"
    CATEGORY = "flux2-accel/speed"
    DESCRIPTION = ("Skips sampling steps whose result barely changes (First Block Cache, TeaCache) on ComfyUI's own "
                   "FLUX.2 MODEL, for KSampler and SamplerCustomAdvanced. Computed and skipped steps and the time "
                   "saved are shown on this node after each run and written to the log.")

    def apply(self, model, method, threshold, start_percent, end_percent, max_consecutive_cached, warmup_steps,
              teacache_coefficients="", min_steps=CacheSettings.min_steps, unique_id=None):
        settings = CacheSettings(method, float(threshold), float(start_percent), float(end_percent),
                                 int(max_consecutive_cached), int(warmup_steps),
                                 parse_coefficients(teacache_coefficients), int(min_steps))
        return (patched(model, settings, unique_id),)


NODE_CLASS_MAPPINGS = {"Flux2AccelNativeStepCache": Flux2AccelNativeStepCache}
NODE_DISPLAY_NAME_MAPPINGS = {"Flux2AccelNativeStepCache": NODE_NAME}
