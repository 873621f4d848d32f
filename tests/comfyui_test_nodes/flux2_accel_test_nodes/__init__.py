"""Test-only ComfyUI nodes (never shipped in the pack's node list): loaded from a test's custom_nodes folder.

ComfyUI's FLUX.2 CLIP loader builds full-size Mistral 3 (24B), so a test cannot make a tiny CONDITIONING with
CLIPTextEncode. This node builds one the way CLIPTextEncode lays it out for FLUX.2: the prompt's tokens only (no
padding to 512), a `pooled_output` of None and an attention mask, seeded random values of any width. And an
empty latent with the tiny VAE's channel count. And a pass-through that sends previews, since the tiny models' latents
have no preview factors (real FLUX.2 latents do).
"""

import torch


class Flux2AccelTestNativeConditioning:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"tokens": ("INT", {"default": 12, "min": 1, "max": 4096}),
                             "width": ("INT", {"default": 96, "min": 1, "max": 65536}),
                             "seed": ("INT", {"default": 0, "min": 0, "max": 2**31})}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "make"
    CATEGORY = "testing"

    def make(self, tokens, width, seed):
        g = torch.Generator().manual_seed(seed)
        embeds = torch.randn(1, tokens, width, generator=g)
        return ([[embeds, {"pooled_output": None, "attention_mask": torch.ones(1, tokens, dtype=torch.long)}]],)


class Flux2AccelTestEmptyLatent:
    """EmptyFlux2LatentImage for tiny models: their VAE has fewer latent channels than the real one's 128."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"channels": ("INT", {"default": 16, "min": 1, "max": 512}),
                             "width": ("INT", {"default": 64, "min": 16, "max": 8192, "step": 16}),
                             "height": ("INT", {"default": 64, "min": 16, "max": 8192, "step": 16})}}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "make"
    CATEGORY = "testing"

    def make(self, channels, width, height):
        return ({"samples": torch.zeros(1, channels, height // 16, width // 16)},)


class Flux2AccelTestPreviews:
    """Passes its images on after sending `count` previews of the first one through ComfyUI's progress bar, as a
    sampler does with its latent previews (they reach the prompt's client as binary websocket frames)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE",), "count": ("INT", {"default": 3, "min": 1, "max": 50})}}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "run"
    CATEGORY = "testing"

    def run(self, images, count):
        import comfy.utils
        from PIL import Image

        pixels = (images[0].clamp(0, 1) * 255).to(torch.uint8).cpu().numpy()
        bar = comfy.utils.ProgressBar(count)
        for step in range(count):
            bar.update_absolute(step + 1, count, ("JPEG", Image.fromarray(pixels), 512))
        return (images,)


NODE_CLASS_MAPPINGS = {"Flux2AccelTestNativeConditioning": Flux2AccelTestNativeConditioning,
                       "Flux2AccelTestEmptyLatent": Flux2AccelTestEmptyLatent,
                       "Flux2AccelTestPreviews": Flux2AccelTestPreviews}
