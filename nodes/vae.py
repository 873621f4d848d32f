"""VAE decode / encode between ComfyUI's IMAGE and FLUX.2 LATENT (ComfyUI's native layout)."""

from __future__ import annotations

from ..optim.run import latents
from ..optim.run.store import STORE
from . import comfy_services


class Flux2AccelVAEDecode:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vae": ("FLUX2_VAE", {"tooltip": "From Load VAE (FLUX.2)."}),
            "latent": ("LATENT", {"tooltip": "FLUX.2 latent [B,128,H/16,W/16], from our sampler or native nodes."}),
        }}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "decode"
    CATEGORY = "flux2-accel/latent"
    DESCRIPTION = "Decodes a FLUX.2 latent to an image."

    def decode(self, vae, latent):
        module = STORE.vae(vae).to(comfy_services.torch_device())
        return (latents.decode(module, latent["samples"]),)


class Flux2AccelVAEEncode:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vae": ("FLUX2_VAE", {"tooltip": "From Load VAE (FLUX.2)."}),
            "image": ("IMAGE", {"tooltip": "Image to encode; cropped to a multiple of 16 pixels, centred."}),
        }}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "encode"
    CATEGORY = "flux2-accel/latent"
    DESCRIPTION = "Encodes an image to a FLUX.2 latent (ComfyUI's native layout)."

    def encode(self, vae, image):
        module = STORE.vae(vae).to(comfy_services.torch_device())
        return ({"samples": latents.encode(module, image)},)


NODE_CLASS_MAPPINGS = {"Flux2AccelVAEDecode": Flux2AccelVAEDecode, "Flux2AccelVAEEncode": Flux2AccelVAEEncode}
NODE_DISPLAY_NAME_MAPPINGS = {"Flux2AccelVAEDecode": "VAE Decode (FLUX.2)", "Flux2AccelVAEEncode": "VAE Encode (FLUX.2)"}
