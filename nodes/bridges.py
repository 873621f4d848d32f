"""Bridges between the pack's socket types and ComfyUI's own: conditioning both ways, and the pack's model as a
native MODEL. Tensors cross unchanged (optim/native/conditioning.py); the model bridge is nodes/native_model.py."""

from __future__ import annotations

from ..optim.errors import InputError
from ..optim.native import conditioning as native_conditioning
from . import native_model


class Flux2AccelToConditioning:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"conditioning": ("FLUX2_CONDITIONING", {
            "tooltip": "From Text Encode (FLUX.2) or Remote Text Encode (FLUX.2)."})}}

    RETURN_TYPES = ("CONDITIONING",)
    RETURN_NAMES = ("conditioning",)
    OUTPUT_TOOLTIPS = ("The same embeddings as ComfyUI's CONDITIONING, for KSampler, guiders, FluxGuidance and "
                       "ReferenceLatent.",)
    FUNCTION = "convert"
    CATEGORY = "flux2-accel/bridges"
    DESCRIPTION = ("Passes the pack's FLUX.2 prompt embeddings to ComfyUI's own nodes, unchanged (no re-encoding, "
                   "same precision).")

    def convert(self, conditioning):
        return (native_conditioning.to_native(conditioning),)


class Flux2AccelFromConditioning:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"conditioning": ("CONDITIONING", {
            "tooltip": "From CLIP Text Encode with a FLUX.2 text encoder (CLIPLoader type flux2), or another "
                       "single-prompt conditioning."})}}

    RETURN_TYPES = ("FLUX2_CONDITIONING",)
    RETURN_NAMES = ("conditioning",)
    OUTPUT_TOOLTIPS = ("The same embeddings, padded in front to 512 tokens as ComfyUI's FLUX.2 model pads them, for "
                       "Sampler (FLUX.2).",)
    FUNCTION = "convert"
    CATEGORY = "flux2-accel/bridges"
    DESCRIPTION = ("Passes a ComfyUI CONDITIONING to Sampler (FLUX.2), unchanged. Reference images go to the "
                   "sampler's reference_images input, guidance to its guidance widget.")

    def convert(self, conditioning):
        return (native_conditioning.from_native(conditioning),)


class Flux2AccelToModel:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("FLUX2_MODEL", {
            "tooltip": "From Load Diffusion Model (FLUX.2), LoRA Stack, Step Cache or Compile (FLUX.2): precision, "
                       "LoRAs, step cache and compile all stay in effect."})}}

    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("A ComfyUI MODEL: KSampler, SamplerCustomAdvanced, guiders, FluxGuidance and ReferenceLatent "
                       "work on it, and ComfyUI's model management loads and frees it.",)
    FUNCTION = "convert"
    CATEGORY = "flux2-accel/bridges"
    DESCRIPTION = ("Makes the pack's FLUX.2 model (nf4, fp8, LoRA stack, step cache, compile) a native ComfyUI "
                   "MODEL. ComfyUI manages its memory, so the loader's offload setting is not used here. ComfyUI's "
                   "LoRA loaders are refused: put LoRAs on LoRA Stack (FLUX.2) before this node.")

    def convert(self, model):
        if getattr(model, "parallel", None) is not None:
            raise InputError("Model to ComfyUI (FLUX.2): this model went through Parallel (FLUX.2), which only the "
                             "pack's Sampler (FLUX.2) runs; ComfyUI's samplers run a model on one GPU. Take the "
                             "model from before the Parallel node.")
        return (native_model.native_patcher(model),)


NODE_CLASS_MAPPINGS = {
    "Flux2AccelToConditioning": Flux2AccelToConditioning,
    "Flux2AccelFromConditioning": Flux2AccelFromConditioning,
    "Flux2AccelToModel": Flux2AccelToModel,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "Flux2AccelToConditioning": "Conditioning to ComfyUI (FLUX.2)",
    "Flux2AccelFromConditioning": "Conditioning to FLUX.2",
    "Flux2AccelToModel": "Model to ComfyUI (FLUX.2)",
}
