"""TEST-ONLY ComfyUI custom nodes (never shipped in the pack's node list): a small random-weight FLUX.2 MODEL built
from ComfyUI's own classes, a text CONDITIONING of the right width, and a non-FLUX.2 MODEL.

ComfyUI 0.8 detects FLUX.2 files by [dev]'s fixed head count and rope axes, so UNETLoader cannot load a small one:
these nodes build the model from ComfyUI's classes directly (supported_models.Flux2 -> model_base.Flux2 ->
ModelPatcher) with seeded random weights. The test fixture links this folder into the test ComfyUI's custom_nodes.
"""

from __future__ import annotations

import torch

# Small FLUX.2 proportions (the bench's `small` config: 2 double + 18 single blocks, 4 heads of 64); FLUX.2's fixed
# parts as ComfyUI's model detection sets them (global modulation, SiLU MLP, no biases, 4 rope axes, 128 latent
# channels with patch size 1).
FLUX2_SMALL = dict(image_model="flux2", axes_dim=[16, 16, 16, 16], num_heads=4, mlp_ratio=3.0, theta=2000,
                   out_channels=128, global_modulation=True, mlp_silu_act=True, qkv_bias=False, ops_bias=False,
                   default_ref_method="index", ref_index_scale=10.0, txt_ids_dims=[3], patch_size=1, in_channels=128,
                   hidden_size=256, context_in_dim=192, vec_in_dim=None, depth=2, depth_single_blocks=18,
                   guidance_embed=True)
FLUX2_TINY = dict(FLUX2_SMALL, num_heads=2, axes_dim=[8, 8, 8, 8], hidden_size=64, depth=2, depth_single_blocks=3)
CONFIGS = {"tiny": FLUX2_TINY, "small": FLUX2_SMALL}


def build_flux2_model(config: dict, seed: int = 0, dtype=torch.float32):
    """ComfyUI MODEL (ModelPatcher over model_base.Flux2) with seeded random weights."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    model_config = comfy.supported_models.Flux2(dict(config))
    model_config.set_inference_dtype(dtype, None)
    model = model_config.get_model({}, "", device=torch.device("cpu"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.diffusion_model.named_parameters():
            scale = 1.0 if p.ndim == 1 and "norm" in name else (1.0 / max(1, p.shape[-1])) ** 0.5
            p.copy_((torch.randn(p.shape, generator=g) * scale).to(p.dtype) if not (p.ndim == 1 and "norm" in name)
                    else torch.ones_like(p))
    model.eval()
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


class Flux2AccelTestNativeFlux2Model:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"config": (list(CONFIGS), {"default": "tiny"}),
                             "seed": ("INT", {"default": 0, "min": 0, "max": 2**31})}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "build"
    CATEGORY = "flux2-accel-tests"

    def build(self, config, seed):
        return (build_flux2_model(CONFIGS[config], seed),)


class Flux2AccelTestConditioning:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"width": ("INT", {"default": 192, "min": 1, "max": 20000}),
                             "tokens": ("INT", {"default": 8, "min": 1, "max": 512}),
                             "seed": ("INT", {"default": 0, "min": 0, "max": 2**31})}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "build"
    CATEGORY = "flux2-accel-tests"

    def build(self, width, tokens, seed):
        g = torch.Generator().manual_seed(seed)
        return ([[torch.randn(1, tokens, width, generator=g), {"pooled_output": None}]],)


class Flux2AccelTestOtherModel:
    """A MODEL that is not FLUX.2 (ComfyUI's FLUX.1 classes, tiny): the native nodes must refuse it."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "build"
    CATEGORY = "flux2-accel-tests"

    def build(self):
        import comfy.model_management as mm
        import comfy.model_patcher
        import comfy.supported_models

        config = dict(image_model="flux", axes_dim=[4, 6, 6], num_heads=2, mlp_ratio=2.0, theta=10000,
                      out_channels=16, qkv_bias=True, txt_ids_dims=[], patch_size=2, in_channels=16, hidden_size=32,
                      context_in_dim=16, vec_in_dim=8, depth=1, depth_single_blocks=1, guidance_embed=True)
        model_config = comfy.supported_models.Flux(config)
        model_config.set_inference_dtype(torch.float32, None)
        model = model_config.get_model({}, "", device=torch.device("cpu"))
        return (comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                                 offload_device=mm.unet_offload_device()),)


NODE_CLASS_MAPPINGS = {
    "Flux2AccelTestNativeFlux2Model": Flux2AccelTestNativeFlux2Model,
    "Flux2AccelTestConditioning": Flux2AccelTestConditioning,
    "Flux2AccelTestOtherModel": Flux2AccelTestOtherModel,
}
