"""Torch Compile node: returns a model handle whose transformer runs compiled code (the input handle is untouched).

Compilation itself happens at the first sampling, in the compile feature (optim/features/compile.py)."""

from __future__ import annotations

import os

from ..optim.features.compile_settings import DYNAMIC, MODES, SCOPES, CompileSettings, compile_settings
from . import comfy_services

_DEFAULTS = CompileSettings()


def default_cache_dir() -> str:
    """The pack's compile-cache folder inside ComfyUI's user (or temp) directory; "" outside ComfyUI."""
    base = comfy_services.user_directory() or comfy_services.temp_directory()
    return os.path.join(base, "flux2-accel", "compile-cache") if base else ""


class Flux2AccelCompile:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("FLUX2_MODEL", {"tooltip": "The FLUX.2 model to compile; it is not changed, a new one is "
                                                     "returned. Compiling happens at the first sampling."}),
                "scope": (list(SCOPES), {"default": _DEFAULTS.scope,
                                         "tooltip": "regional: compile the repeated transformer blocks (one graph "
                                                    "per block kind, fast cold start, works with the step cache). "
                                                    "full: the whole transformer (slower to compile)."}),
                "mode": (list(MODES), {"default": _DEFAULTS.mode,
                                       "tooltip": "inductor mode. max-autotune searches faster kernels (cold start "
                                                  "can take many minutes; results are cached on disk). "
                                                  "reduce-overhead uses CUDA graphs."}),
                "dynamic": (list(DYNAMIC), {"default": _DEFAULTS.dynamic,
                                            "tooltip": "auto: compile for the first size, then once more with "
                                                       "symbolic sizes at the first size change. true: symbolic "
                                                       "from the start. false: one compile per size."}),
                "fullgraph": ("BOOLEAN", {"default": _DEFAULTS.fullgraph,
                                          "tooltip": "Require one graph per compiled region. Off: parts that do not "
                                                     "trace (some quantized layers) run eager. On: such a model "
                                                     "falls back to eager entirely, with a warning."}),
                "backend": ("STRING", {"default": _DEFAULTS.backend,
                                       "tooltip": "torch.compile backend: inductor (fast code), aot_eager or eager "
                                                  "(for debugging)."}),
                "compile_vae_decoder": ("BOOLEAN", {"default": _DEFAULTS.compile_vae_decoder,
                                                    "tooltip": "Also compile the VAE decoder when decoding with "
                                                               "this model's settings."}),
            },
        }

    RETURN_TYPES = ("FLUX2_MODEL",)
    RETURN_NAMES = ("model",)
    FUNCTION = "apply"
    CATEGORY = "flux2-accel/speed"
    DESCRIPTION = ("Runs the transformer through torch.compile. Compiled code is kept and reused across prompts, "
                   "seeds, LoRA strengths and cache settings; compile caches persist on disk. If compiling fails "
                   "the model runs eager with a warning.")

    def apply(self, model, scope, mode, dynamic, fullgraph, backend, compile_vae_decoder):
        settings = compile_settings(scope, mode, dynamic, fullgraph, backend, compile_vae_decoder, default_cache_dir())
        return (model.replace(compile=settings),)


NODE_CLASS_MAPPINGS = {"Flux2AccelCompile": Flux2AccelCompile}
NODE_DISPLAY_NAME_MAPPINGS = {"Flux2AccelCompile": "Torch Compile (FLUX.2)"}
