"""Which model a checkpoint holds, in which key layout, and how to turn it into diffusers' layout.

Layouts seen in circulation:
- transformer: BFL (`double_blocks.*`, fused qkv), Comfy-Org (BFL under `model.diffusion_model.`), diffusers;
- VAE: BFL/LDM (`encoder.down.0.block.0.*`, as Comfy-Org's flux2-vae.safetensors), diffusers;
- text encoder: Comfy-Org / Hugging Face text-only (`model.layers.*`), transformers' Mistral3 (`model.language_model.*`
  or `language_model.model.*`).

Conversion itself is diffusers' own (`convert_flux2_transformer_checkpoint_to_diffusers`, `convert_ldm_vae_checkpoint`).
The other way, diffusers to BFL (`transformer_to_bfl`), is the pack's: diffusers has none. It describes a loaded
transformer to ComfyUI (`transformer_bfl_shapes`) and writes the tests' BFL checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ModelFileError
from .checkpoint import Checkpoint

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


_BFL_RENAMES = {
    "x_embedder": "img_in", "context_embedder": "txt_in",
    "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_guidance_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_guidance_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "double_stream_modulation_img.linear": "double_stream_modulation_img.lin",
    "double_stream_modulation_txt.linear": "double_stream_modulation_txt.lin",
    "single_stream_modulation.linear": "single_stream_modulation.lin", "proj_out": "final_layer.linear",
}
_BFL_DOUBLE = {"attn.norm_q.weight": "img_attn.norm.query_norm.scale",
               "attn.norm_k.weight": "img_attn.norm.key_norm.scale",
               "attn.norm_added_q.weight": "txt_attn.norm.query_norm.scale",
               "attn.norm_added_k.weight": "txt_attn.norm.key_norm.scale",
               "attn.to_out.0.weight": "img_attn.proj.weight", "attn.to_add_out.weight": "txt_attn.proj.weight",
               "ff.linear_in.weight": "img_mlp.0.weight", "ff.linear_out.weight": "img_mlp.2.weight",
               "ff_context.linear_in.weight": "txt_mlp.0.weight", "ff_context.linear_out.weight": "txt_mlp.2.weight"}
_BFL_SINGLE = {"attn.to_qkv_mlp_proj.weight": "linear1.weight", "attn.to_out.weight": "linear2.weight",
               "attn.norm_q.weight": "norm.query_norm.scale", "attn.norm_k.weight": "norm.key_norm.scale"}


def transformer_to_bfl(sd: dict, num_layers: int, num_single_layers: int) -> dict:
    """A diffusers-layout FLUX.2 transformer state dict in BFL's layout (the inverse of diffusers' conversion, which
    `transformer_to_diffusers` uses). Works on meta tensors too: names and shapes without the weights."""
    out = {}
    for k, v in sd.items():
        if k.startswith(("transformer_blocks", "single_transformer_blocks")):
            continue
        if k == "norm_out.linear.weight":
            scale, shift = v.chunk(2, 0)
            out["final_layer.adaLN_modulation.1.weight"] = torch.cat([shift, scale])
            continue
        for a, b in _BFL_RENAMES.items():
            k = k.replace(a, b)
        out[k] = v
    for i in range(num_layers):
        p, q = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        out[q + "img_attn.qkv.weight"] = torch.cat([sd[p + f"attn.to_{x}.weight"] for x in "qkv"])
        out[q + "txt_attn.qkv.weight"] = torch.cat([sd[p + f"attn.add_{x}_proj.weight"] for x in "qkv"])
        for a, b in _BFL_DOUBLE.items():
            out[q + b] = sd[p + a]
    for i in range(num_single_layers):
        p, q = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        for a, b in _BFL_SINGLE.items():
            out[q + b] = sd[p + a]
    return {k: v.contiguous() for k, v in out.items()}


_WRAPPER_NAMES = (".base_layer",)  # peft's LoRA wrapper around a layer: the layer's own weights are beneath it


def transformer_bfl_shapes(transformer: torch.nn.Module) -> dict:
    """The transformer's weights as BFL's layout names them, as meta tensors of their unquantized shapes (no
    memory): what a BFL-layout FLUX.2 checkpoint of this model would hold, for code that identifies a model from
    its checkpoint's names and shapes (ComfyUI's model detection). Quantized layers (nf4 packs its weight, fp8
    keeps a scale beside it) and peft's LoRA layers give their layer's logical weight, (out_features, in_features)."""
    sd = {}
    for name, module in transformer.named_modules():
        if "lora_" in name:
            continue
        for wrapper in _WRAPPER_NAMES:
            name = name.replace(wrapper, "")
        for kind in ("weight", "bias"):
            tensor = module._parameters.get(kind, module._buffers.get(kind))
            if tensor is None:
                continue
            shape = tensor.shape
            if kind == "weight" and hasattr(module, "in_features") and hasattr(module, "out_features"):
                shape = (module.out_features, module.in_features)
            sd[f"{name}.{kind}" if name else kind] = torch.empty(shape, dtype=tensor.dtype, device="meta")
    config = transformer.config
    return transformer_to_bfl(sd, config.num_layers, config.num_single_layers)


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

