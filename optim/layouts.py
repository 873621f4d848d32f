"""Which model a checkpoint holds, in which key layout, and how to turn it into diffusers' layout.

Layouts seen in circulation:
- transformer: BFL (`double_blocks.*`, fused qkv), Comfy-Org (BFL under `model.diffusion_model.`), diffusers;
- VAE: BFL/LDM (`encoder.down.0.block.0.*`, as Comfy-Org's flux2-vae.safetensors), diffusers;
- text encoder: Comfy-Org / Hugging Face text-only (`model.layers.*`), transformers' Mistral3 (`model.language_model.*`
  or `language_model.model.*`).

Conversion itself is diffusers' own (`convert_flux2_transformer_checkpoint_to_diffusers`, `convert_ldm_vae_checkpoint`).
"""

from __future__ import annotations

from dataclasses import dataclass

from .checkpoint import Checkpoint
from .errors import ModelFileError

TRANSFORMER = "transformer"
VAE = "vae"
TEXT_ENCODER = "text_encoder"

_TRANSFORMER_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.")
_VAE_PREFIXES = ("first_stage_model.", "vae.")
_TEXT_PREFIXES = ("text_encoders.mistral3_24b.transformer.", "text_encoders.qwen3_4b.transformer.", "text_encoder.")

_FLUX1_MARKERS = ("double_blocks.0.img_mod.lin.weight", "vector_in.in_layer.weight",
                  "transformer_blocks.0.norm1.linear.weight", "time_text_embed.timestep_embedder.linear_1.weight")
_COMPONENT_NAMES = {TRANSFORMER: "a FLUX.2 diffusion model (transformer)", VAE: "a VAE",
                    TEXT_ENCODER: "a text encoder"}
_FOLDERS = {TRANSFORMER: "models/diffusion_models", VAE: "models/vae", TEXT_ENCODER: "models/text_encoders"}


@dataclass(frozen=True)
class Layout:
    component: str  # TRANSFORMER, VAE or TEXT_ENCODER
    layout: str  # "bfl", "diffusers", "ldm", "hf", "mistral3"
    prefix: str = ""
    family: str = ""  # text encoders: "mistral" or "qwen3"


def _under(keys, prefix):
    return [k[len(prefix):] for k in keys if k.startswith(prefix)]


def _first_prefix(keys, prefixes):
    for p in prefixes:
        if any(k.startswith(p) for k in keys):
            return p
    return ""


def identify(ckpt: Checkpoint) -> Layout:
    """Classify a checkpoint by its tensor names, or raise ModelFileError saying what it is not."""
    keys = list(ckpt.keys())
    p = _first_prefix(keys, _TRANSFORMER_PREFIXES)
    tkeys = set(_under(keys, p)) if p else set(keys)
    if "single_stream_modulation.lin.weight" in tkeys:
        return Layout(TRANSFORMER, "bfl", p)
    if "single_stream_modulation.linear.weight" in tkeys:
        return Layout(TRANSFORMER, "diffusers", p)
    if any(m in tkeys for m in _FLUX1_MARKERS):
        raise ModelFileError(
            f"'{ckpt.name}' is a FLUX.1 checkpoint (it has FLUX.1's per-block modulation), not FLUX.2. "
            "This pack loads FLUX.2 [dev] and [klein] only; use ComfyUI's native loaders for FLUX.1.")
    p = _first_prefix(keys, _VAE_PREFIXES)
    vkeys = set(_under(keys, p)) if p else set(keys)
    if "decoder.conv_in.weight" in vkeys:
        layout = "ldm" if any(k.startswith("encoder.down.") or k.startswith("decoder.up.") for k in vkeys) \
            else "diffusers"
        return Layout(VAE, layout, p)
    p = _first_prefix(keys, _TEXT_PREFIXES)
    xkeys = set(_under(keys, p)) if p else set(keys)
    for inner, layout in (("model.language_model.", "mistral3"), ("language_model.model.", "mistral3"),
                          ("model.", "hf")):
        if f"{inner}layers.0.self_attn.q_proj.weight" in xkeys:
            family = "qwen3" if f"{inner}layers.0.self_attn.q_norm.weight" in xkeys else "mistral"
            return Layout(TEXT_ENCODER, layout, p + inner, family)
    sample = ", ".join(sorted(keys)[:5])
    raise ModelFileError(f"'{ckpt.name}' is not a FLUX.2 transformer, VAE or text encoder checkpoint "
                         f"(first tensor names: {sample}).")


def require(layout: Layout, component: str, ckpt: Checkpoint) -> None:
    if layout.component != component:
        raise ModelFileError(
            f"'{ckpt.name}' is {_COMPONENT_NAMES[layout.component]}, not {_COMPONENT_NAMES[component]}. "
            f"Put it in {_FOLDERS[layout.component]} and load it with the matching loader.")


def transformer_to_diffusers(state_dict: dict, layout: Layout) -> dict:
    from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers

    sd = {k[len(layout.prefix):]: v for k, v in state_dict.items() if k.startswith(layout.prefix)}
    if layout.layout == "bfl":
        sd = convert_flux2_transformer_checkpoint_to_diffusers(sd)
    return sd


def vae_to_diffusers(state_dict: dict, layout: Layout, config: dict) -> dict:
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    sd = {k[len(layout.prefix):]: v for k, v in state_dict.items() if k.startswith(layout.prefix)}
    if layout.layout == "ldm":
        # diffusers' LDM converter knows the SD/FLUX.1 VAE; FLUX.2 adds the latent batch-norm, which keeps its name.
        bn = {k: v for k, v in sd.items() if k.startswith("bn.")}
        sd = {**convert_ldm_vae_checkpoint(sd, config), **bn}
    return sd


def text_encoder_to_hf(state_dict: dict, layout: Layout) -> dict:
    """Text-only `MistralModel` / `Qwen3Model` keys (no `model.` prefix, no LM head, no vision tower)."""
    return {k[len(layout.prefix):]: v for k, v in state_dict.items() if k.startswith(layout.prefix)}

