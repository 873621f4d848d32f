"""Parallel node: one image over several GPUs. Returns a model handle that the pack's sampler runs on an actor group
of Ray actors, one per GPU (optim/parallel); the input handle is untouched. The group starts at the first sampling
and stays warm until another gpus/mode asks for a new one, a rank fails, ComfyUI unloads models ("Free model and
node cache", low memory: nodes/native_model.track_parallel_groups), or ComfyUI exits."""

from __future__ import annotations

from ..optim.features.parallel_settings import ParallelSettings
from ..optim.options import MAX_PARALLEL_GPUS, PARALLEL_MODES
from ..optim.parallel import group
from . import comfy_services

_DEFAULTS = ParallelSettings()


class Flux2AccelParallel:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("FLUX2_MODEL", {"tooltip": "The FLUX.2 model to split over GPUs; it is not changed, a new "
                                                     "one is returned. Every GPU holds the whole model: [dev] in "
                                                     "bf16 needs an 80 GB GPU each, or fp8/nf4."}),
                "gpus": ("INT", {"default": _DEFAULTS.gpus, "min": 2, "max": MAX_PARALLEL_GPUS,
                                 "tooltip": "GPUs (Ray actors) that share each image. Ray starts on this machine "
                                            "at the first sampling, or joins the cluster at RAY_ADDRESS."}),
                "mode": (list(PARALLEL_MODES), {"default": _DEFAULTS.mode,
                                                "tooltip": "ulysses: split the attention heads (the heads must "
                                                           "divide by gpus). ring: ring attention over the tokens "
                                                           "(GPUs only). cfg: a [klein] base run with a negative "
                                                           "prompt runs its two CFG branches on two halves of the "
                                                           "GPUs (gpus even). auto: cfg where the run has a "
                                                           "negative prompt, then ulysses, or ring where the heads "
                                                           "do not divide."}),
            },
        }

    RETURN_TYPES = ("FLUX2_MODEL",)
    RETURN_NAMES = ("model",)
    FUNCTION = "apply"
    CATEGORY = "flux2-accel/speed"
    DESCRIPTION = ("Splits each image over several GPUs with diffusers' context parallelism (and a [klein] base "
                   "run's two CFG branches over two halves of them), on Ray actors. Use it before the pack's "
                   "Sampler; LoRA, compile and the step cache (fbcache, teacache, taylorseer) apply on every GPU. "
                   "Needs Ray: pip install \"ray>=2.50\".")

    def apply(self, model, gpus, mode):
        settings = ParallelSettings(gpus, mode)
        settings.validate()
        group.require_ray()
        return (model.replace(parallel=settings),)


comfy_services.on_free_memory(group.release)

NODE_CLASS_MAPPINGS = {"Flux2AccelParallel": Flux2AccelParallel}
NODE_DISPLAY_NAME_MAPPINGS = {"Flux2AccelParallel": "Parallel (FLUX.2)"}
