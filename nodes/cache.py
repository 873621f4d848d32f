"""Step cache node: returns a model handle that skips near-duplicate denoising steps (the input handle is untouched)."""

from __future__ import annotations

from ..optim.features.caching import METHODS, CacheSettings, cache_settings

_DEFAULTS = CacheSettings()


class Flux2AccelStepCache:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("FLUX2_MODEL", {"tooltip": "The FLUX.2 model to cache; it is not changed, a new one is "
                                                     "returned."}),
                "method": (list(METHODS), {"default": _DEFAULTS.method,
                                           "tooltip": "fbcache: First Block Cache (runs the first block, reuses the "
                                                      "rest when its change is small). teacache: skips the whole "
                                                      "step from the change of the modulated input. magcache / "
                                                      "taylorseer: diffusers' own methods."}),
                "threshold": ("FLOAT", {"default": _DEFAULTS.threshold, "min": 0.0, "max": 5.0, "step": 0.01,
                                        "tooltip": "0 turns caching off. Higher skips more steps and changes the "
                                                   "image more. fbcache ~0.08-0.15; teacache ~0.05-0.3; magcache "
                                                   "~0.06; taylorseer: any value above 0 switches it on."}),
                "start_percent": ("FLOAT", {"default": _DEFAULTS.start_percent, "min": 0.0, "max": 1.0, "step": 0.01,
                                            "tooltip": "Fraction of the steps before which no step is skipped "
                                                       "(the layout of the image is decided early)."}),
                "end_percent": ("FLOAT", {"default": _DEFAULTS.end_percent, "min": 0.0, "max": 1.0, "step": 0.01,
                                          "tooltip": "Fraction of the steps from which no step is skipped (keeps "
                                                     "the final details exact). 1.0 = up to the last step."}),
                "max_consecutive_cached": ("INT", {"default": _DEFAULTS.max_consecutive_cached, "min": 0,
                                                   "max": 100,
                                                   "tooltip": "At most this many skipped steps in a row before a "
                                                              "full step is computed again. 0 = no limit."}),
                "warmup_steps": ("INT", {"default": _DEFAULTS.warmup_steps, "min": 0, "max": 100,
                                         "tooltip": "The first steps are always computed."}),
            },
            "optional": {
                "teacache_coefficients": ("STRING", {"default": "", "multiline": False,
                                                     "tooltip": "teacache only: rescaling polynomial, highest power "
                                                                "first, comma-separated, as printed by `flux2-accel "
                                                                "calibrate-teacache`. Empty = built-in values for "
                                                                "the model family."}),
                "min_steps": ("INT", {"default": _DEFAULTS.min_steps, "min": 0, "max": 200,
                                      "tooltip": "Runs with fewer steps than this never skip (4-step distilled "
                                                 "runs gain little and lose quality); 0 caches any run."}),
            },
        }

    RETURN_TYPES = ("FLUX2_MODEL",)
    RETURN_NAMES = ("model",)
    FUNCTION = "apply"
    CATEGORY = "flux2-accel/speed"
    DESCRIPTION = ("Skips denoising steps whose result barely changes (First Block Cache, TeaCache, MagCache, "
                   "TaylorSeer). The sampler reports computed and skipped steps and the time saved.")

    def apply(self, model, method, threshold, start_percent, end_percent, max_consecutive_cached, warmup_steps,
              teacache_coefficients="", min_steps=_DEFAULTS.min_steps):
        settings = cache_settings(method, threshold, start_percent, end_percent, max_consecutive_cached, warmup_steps,
                                  teacache_coefficients, min_steps)
        return (model.with_step_cache(settings),)


NODE_CLASS_MAPPINGS = {"Flux2AccelStepCache": Flux2AccelStepCache}
NODE_DISPLAY_NAME_MAPPINGS = {"Flux2AccelStepCache": "Step Cache (FLUX.2)"}
