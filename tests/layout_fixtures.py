"""Writers for the checkpoint layouts in circulation, built from tiny diffusers-layout models.

These are the inverse of the conversions the loaders rely on (BFL transformer, LDM/BFL VAE, Comfy-Org text encoder
with an embedded tekken vocabulary), so a loader test round-trips real layouts instead of trusting one direction.
"""

from __future__ import annotations

import base64
import json

import torch
from flux2_accel.optim.models import layouts
from flux2_accel.optim.run.sampling import build_pipeline

TEKKEN_SPECIALS = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "<pad>"]

# The BFL transformer writer is the pack's own (optim/models/layouts.py), also used to describe a model to ComfyUI.
transformer_to_bfl = layouts.transformer_to_bfl


def full_pipeline(components):
    """A full diffusers pipeline over tiny components (text encoder included), as the pack builds it."""
    return build_pipeline(components.transformer, components.vae, components.spec.family,
                          text_encoder=components.text_encoder, tokenizer=components.tokenizer)


def vae_to_ldm(sd: dict, num_blocks: int) -> dict:
    out = {}
    for k, v in sd.items():
        n = k
        n = n.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        for i in range(num_blocks):
            n = n.replace(f"encoder.down_blocks.{i}.resnets.", f"encoder.down.{i}.block.")
            n = n.replace(f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample.")
            j = num_blocks - 1 - i
            n = n.replace(f"decoder.up_blocks.{i}.resnets.", f"decoder.up.{j}.block.")
            n = n.replace(f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{j}.upsample.")
        n = n.replace("mid_block.resnets.0.", "mid.block_1.").replace("mid_block.resnets.1.", "mid.block_2.")
        if "mid_block.attentions.0." in n:
            n = n.replace("mid_block.attentions.0.", "mid.attn_1.").replace("group_norm", "norm")
            n = n.replace("to_q", "q").replace("to_k", "k").replace("to_v", "v").replace("to_out.0", "proj_out")
            if v.ndim == 2:
                v = v[:, :, None, None]
        out[n] = v.contiguous()
    return out


def tekken_json(words: list[str], specials: list[str]) -> bytes:
    """A tiny tekken vocabulary: all 256 bytes, then whole words as merges, after the special tokens."""
    ranks = [bytes([b]) for b in range(256)]
    for w in words:
        enc = w.encode()
        for end in range(2, len(enc) + 1):
            if enc[:end] not in ranks:
                ranks.append(enc[:end])
    data = {
        "config": {"pattern": r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",
                   "default_vocab_size": len(specials) + len(ranks), "default_num_special_tokens": len(specials)},
        "vocab": [{"rank": i, "token_bytes": base64.b64encode(t).decode()} for i, t in enumerate(ranks)],
        "special_tokens": [{"rank": i, "token_str": s, "is_control": True} for i, s in enumerate(specials)],
    }
    return json.dumps(data).encode()


def tekken_tensor(words, specials) -> torch.Tensor:
    return torch.frombuffer(bytearray(tekken_json(words, specials)), dtype=torch.uint8).clone()
