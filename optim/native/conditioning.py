"""FLUX2_CONDITIONING <-> ComfyUI's CONDITIONING, tensors untouched.

ComfyUI's CONDITIONING is a list of [embeddings [B, L, D], options dict] entries. Its FLUX.2 text encoder returns
only the prompt's tokens (L varies) and its FLUX.2 model pads them in front with zeros to 512 tokens when it
samples (comfy.model_base.Flux2.extra_conds). Diffusers' pipelines, and so the pack's encoders, give 512 tokens
already (the prompt plus the text encoder's states for its padding tokens), which ComfyUI's model then takes as
they are. So:
  to ComfyUI:   the pack's tensor itself (same object, same dtype), which the native model uses unchanged;
  from ComfyUI: the tensor, zero-padded in front to 512 tokens exactly as ComfyUI's model would pad it, so the
                pack's sampler sees what ComfyUI's sampler sees. At 512 tokens or more it is passed as it is.
A conditioning that went pack -> ComfyUI -> pack is the very tensor it started as.
The width is not checked here: it is checked where the model is known (the pack's sampler, the model bridge).
"""

from __future__ import annotations

import torch

from ..errors import InputError
from ..models.text_encoding import MAX_SEQUENCE_LENGTH, Flux2Conditioning

SOURCE_KEY = "flux2_accel_source"  # where the pack's encoder metadata rides along in a native entry
IGNORED_KEYS = frozenset({"pooled_output", "attention_mask", SOURCE_KEY})  # FLUX.2 samples without them
FAMILY_BY_WIDTH = {15360: "mistral", 12288: "qwen3", 7680: "qwen3"}
ADVICE = {
    "reference_latents": "connect the reference images to the sampler's reference_images input instead of "
                         "ReferenceLatent",
    "guidance": "set guidance on Sampler (FLUX.2) instead of FluxGuidance",
}


def to_native(conditioning: Flux2Conditioning) -> list:
    """FLUX2_CONDITIONING -> CONDITIONING: one entry holding the pack's tensor itself."""
    source = {"family": conditioning.family, "encoder_identity": conditioning.encoder_identity,
              "prompts": tuple(conditioning.prompts)}
    return [[conditioning.prompt_embeds, {"pooled_output": None, SOURCE_KEY: source}]]


def from_native(conditioning, field_name: str = "conditioning") -> Flux2Conditioning:
    """CONDITIONING -> FLUX2_CONDITIONING. Refuses what the pack's sampler cannot honour, naming it."""
    if not isinstance(conditioning, (list, tuple)) or not conditioning:
        raise InputError(f"{field_name} is empty: connect a CONDITIONING from CLIP Text Encode or a conditioning "
                         "node.")
    if len(conditioning) != 1:
        raise InputError(f"{field_name} has {len(conditioning)} entries (Conditioning Combine or area/mask "
                         "conditioning); Sampler (FLUX.2) takes one prompt: use Conditioning Concat, or a single "
                         "CLIP Text Encode.")
    entry = conditioning[0]
    try:
        embeds, options = entry[0], dict(entry[1])
    except (TypeError, IndexError, KeyError, ValueError):
        raise InputError(f"{field_name} is not a ComfyUI CONDITIONING ([embeddings, options] entries).") from None
    if not torch.is_tensor(embeds) or embeds.ndim != 3 or not embeds.is_floating_point():
        shape = tuple(embeds.shape) if torch.is_tensor(embeds) else type(embeds).__name__
        raise InputError(f"{field_name} holds {shape}; FLUX.2 text embeddings are [batch, tokens, width] floats.")
    if 0 in embeds.shape:  # padding would turn it into 512 zero tokens: a prompt of nothing, with no word
        raise InputError(f"{field_name} holds no embeddings (shape {tuple(embeds.shape)}): the text encoder that "
                         "produced it returned 0 tokens, prompts or width. Encode the prompt again.")
    extra = sorted(k for k, v in options.items() if k not in IGNORED_KEYS and v is not None)
    if extra:
        hints = "; ".join(ADVICE[k] for k in extra if k in ADVICE)
        raise InputError(f"{field_name} carries {', '.join(extra)}, which Sampler (FLUX.2) does not apply"
                         f"{': ' + hints if hints else ''}. Remove those nodes between the text encoder and "
                         "Conditioning to FLUX.2, or sample with ComfyUI's own sampler.")
    if not bool(torch.isfinite(embeds).all()):
        raise InputError(f"{field_name} contains NaN or infinite values: the text encoder that produced it failed "
                         "(try another precision).")
    if embeds.shape[1] < MAX_SEQUENCE_LENGTH:  # as comfy.model_base.Flux2 does before sampling
        embeds = torch.nn.functional.pad(embeds, (0, 0, MAX_SEQUENCE_LENGTH - embeds.shape[1], 0))
    source = options.get(SOURCE_KEY) or {}
    family = source.get("family") or FAMILY_BY_WIDTH.get(embeds.shape[-1], "")
    return Flux2Conditioning(embeds, family, source.get("encoder_identity", "comfyui"),
                             tuple(source.get("prompts", ())))
