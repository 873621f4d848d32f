"""Prompt encoding into FLUX2_CONDITIONING."""

from __future__ import annotations

import dataclasses

from ..optim.run.store import STORE
from . import comfy_services


class Flux2AccelTextEncode:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "text_encoder": ("FLUX2_TEXT_ENCODER", {"tooltip": "From Load Text Encoder (FLUX.2)."}),
            "prompt": ("STRING", {"multiline": True, "dynamicPrompts": True, "default": "",
                                  "tooltip": "What to draw, or for edits what to change in the reference images."}),
        }}

    RETURN_TYPES = ("FLUX2_CONDITIONING",)
    RETURN_NAMES = ("conditioning",)
    FUNCTION = "encode"
    CATEGORY = "flux2-accel/conditioning"
    DESCRIPTION = "Encodes a prompt with the FLUX.2 text encoder (Mistral 3 for [dev], Qwen3 for [klein])."

    def encode(self, text_encoder, prompt):
        encoder = STORE.text_encoder(text_encoder)
        encoder.model.to(comfy_services.torch_device())
        cond = encoder.encode(prompt)
        return (dataclasses.replace(cond, prompt_embeds=cond.prompt_embeds.to("cpu")),)


NODE_CLASS_MAPPINGS = {"Flux2AccelTextEncode": Flux2AccelTextEncode}
NODE_DISPLAY_NAME_MAPPINGS = {"Flux2AccelTextEncode": "Text Encode (FLUX.2)"}
