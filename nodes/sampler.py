"""The FLUX.2 sampler node: text-to-image and multi-reference editing, returning IMAGE and LATENT."""

from __future__ import annotations

import logging

from ..optim.errors import Interrupted
from ..optim.options import MAX_BATCH_SIZE, MAX_GUIDANCE, MAX_RESOLUTION, MAX_SEED, MAX_STEPS, SIZE_MULTIPLE
from ..optim.parallel import group
from ..optim.run.sampling import SamplingParams
from . import comfy_services, native_model

log = logging.getLogger("flux2_accel")


class Flux2AccelSampler:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("FLUX2_MODEL", {"tooltip": "From Load Diffusion Model (FLUX.2), cache, compile or LoRA "
                                                     "nodes."}),
                "vae": ("FLUX2_VAE", {"tooltip": "From Load VAE (FLUX.2)."}),
                "conditioning": ("FLUX2_CONDITIONING", {"tooltip": "From Text Encode (FLUX.2)."}),
                "width": ("INT", {"default": 1024, "min": SIZE_MULTIPLE, "max": MAX_RESOLUTION,
                                  "step": SIZE_MULTIPLE,
                                  "tooltip": "Image width in pixels, a multiple of 16."}),
                "height": ("INT", {"default": 1024, "min": SIZE_MULTIPLE, "max": MAX_RESOLUTION,
                                   "step": SIZE_MULTIPLE,
                                   "tooltip": "Image height in pixels, a multiple of 16."}),
                "steps": ("INT", {"default": 28, "min": 1, "max": MAX_STEPS,
                                  "tooltip": "Denoising steps. 28-50 for [dev]; 4 for distilled [klein]."}),
                "guidance": ("FLOAT", {"default": 4.0, "min": 0.0, "max": MAX_GUIDANCE, "step": 0.1,
                                       "tooltip": "[dev]: embedded guidance strength. [klein]: CFG scale, used only "
                                                  "when a negative conditioning is connected (base models)."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": MAX_SEED, "control_after_generate": True,
                                 "tooltip": "Noise seed. The same seed gives the same image on any device."}),
                "batch_size": ("INT", {"default": 1, "min": 1, "max": MAX_BATCH_SIZE,
                                       "tooltip": "Images per prompt, drawn from one seeded noise batch."}),
            },
            "optional": {
                "reference_images": ("IMAGE", {"tooltip": "Images to edit or take references from; each image of "
                                                          "the batch is one reference (at least 64 px a side, at "
                                                          "most 64 megapixels)."}),
                "negative": ("FLUX2_CONDITIONING", {"tooltip": "[klein] base models only: enables CFG."}),
            },
        }

    RETURN_TYPES = ("IMAGE", "LATENT")
    RETURN_NAMES = ("image", "latent")
    FUNCTION = "generate"
    CATEGORY = "flux2-accel/sampling"
    DESCRIPTION = "Samples FLUX.2 on diffusers' pipeline: text-to-image, or editing with reference images."

    def generate(self, model, vae, conditioning, width, height, steps, guidance, seed, batch_size,
                 reference_images=None, negative=None):
        params = SamplingParams(width, height, steps, guidance, seed, batch_size)
        progress = comfy_services.Progress(steps)
        if model.parallel is not None:
            native_model.track_parallel_groups()
        try:
            result = group.run(model, vae, conditioning, params, reference_images=reference_images,
                                negative=negative, device=comfy_services.torch_device(),
                                on_step=lambda i, n, get: progress.update(i, get),
                                should_interrupt=comfy_services.interrupt_requested,
                                around=native_model.managed_by_comfyui(model))
        except Interrupted:
            comfy_services.raise_if_interrupted()
            raise
        lines = result.stats_lines()
        for line in lines:
            log.info("flux2-accel %s", line)
        ui = {"flux2_stats": lines}
        timeline = result.cache_timeline()
        if timeline:
            ui["flux2_timeline"] = timeline
        return {"ui": ui, "result": (result.image, {"samples": result.latent})}


NODE_CLASS_MAPPINGS = {"Flux2AccelSampler": Flux2AccelSampler}
NODE_DISPLAY_NAME_MAPPINGS = {"Flux2AccelSampler": "Sampler (FLUX.2)"}
