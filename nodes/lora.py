"""LoRA stack node: appends LoRA files to a model handle's stack. Loading happens when sampling starts."""

from __future__ import annotations

from ..optim.features.lora import LoraSpec
from . import comfy_services

SLOTS = 4
NONE = "None"


class Flux2AccelLoraStack:
    """Adds up to four LoRAs to the model's stack; chain several nodes for more. The input model is unchanged."""

    @classmethod
    def INPUT_TYPES(cls):
        files = [NONE] + [f for f in comfy_services.list_models("loras")
                          if f.lower().endswith((".safetensors", ".sft"))]  # pickled formats are never loaded
        optional = {}
        for i in range(1, SLOTS + 1):
            optional[f"lora_{i}"] = (files, {"default": NONE, "tooltip": f"LoRA file {i} from models/loras "
                                             "(.safetensors; diffusers, ai-toolkit, kohya, ComfyUI or LoKr layout). "
                                             "'None' leaves the slot empty."})
            optional[f"strength_{i}"] = ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01,
                                                   "tooltip": f"How strongly LoRA {i} is applied (1 = as trained, "
                                                   "0 = no effect, negative inverts it). Changing it does not "
                                                   "reload the model."})
            optional[f"enabled_{i}"] = ("BOOLEAN", {"default": True, "tooltip": f"Switch LoRA {i} on or off "
                                                    "without losing its strength."})
        return {
            "required": {"model": ("FLUX2_MODEL", {"tooltip": "The FLUX.2 model to add the LoRAs to. Stacks chain: "
                                                   "LoRAs already on this model stay and these are applied after."})},
            "optional": optional,
        }

    RETURN_TYPES = ("FLUX2_MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The model with these LoRAs appended to its stack.",)
    FUNCTION = "apply"
    FILE_WIDGETS = tuple(f"lora_{i}" for i in range(1, SLOTS + 1))  # resolved (and named) by resolve_model
    CATEGORY = "flux2-accel/lora"
    DESCRIPTION = "Stack LoRAs on a FLUX.2 model with per-LoRA strength and on/off switches."

    def apply(self, model, **slots):
        specs = tuple(
            LoraSpec(comfy_services.resolve_model("loras", slots[f"lora_{i}"]),
                     slots.get(f"strength_{i}", 1.0), slots.get(f"enabled_{i}", True))
            for i in range(1, SLOTS + 1) if slots.get(f"lora_{i}", NONE) not in (NONE, None, ""))
        return (model.with_loras(specs),)


NODE_CLASS_MAPPINGS = {"Flux2AccelLoraStack": Flux2AccelLoraStack}
NODE_DISPLAY_NAME_MAPPINGS = {"Flux2AccelLoraStack": "LoRA Stack (FLUX.2)"}
