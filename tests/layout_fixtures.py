"""Writers for the checkpoint layouts in circulation, built from tiny diffusers-layout models.

These are the inverse of the conversions the loaders rely on (BFL transformer, LDM/BFL VAE, Comfy-Org text encoder
with an embedded tekken vocabulary), so a loader test round-trips real layouts instead of trusting one direction.
"""

from __future__ import annotations

import base64
import json

import torch

TEKKEN_SPECIALS = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "<pad>"]

_RENAMES = {
    "x_embedder": "img_in", "context_embedder": "txt_in",
    "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_guidance_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_guidance_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "double_stream_modulation_img.linear": "double_stream_modulation_img.lin",
    "double_stream_modulation_txt.linear": "double_stream_modulation_txt.lin",
    "single_stream_modulation.linear": "single_stream_modulation.lin", "proj_out": "final_layer.linear",
}
_DOUBLE = {"attn.norm_q.weight": "img_attn.norm.query_norm.scale", "attn.norm_k.weight": "img_attn.norm.key_norm.scale",
           "attn.norm_added_q.weight": "txt_attn.norm.query_norm.scale",
           "attn.norm_added_k.weight": "txt_attn.norm.key_norm.scale",
           "attn.to_out.0.weight": "img_attn.proj.weight", "attn.to_add_out.weight": "txt_attn.proj.weight",
           "ff.linear_in.weight": "img_mlp.0.weight", "ff.linear_out.weight": "img_mlp.2.weight",
           "ff_context.linear_in.weight": "txt_mlp.0.weight", "ff_context.linear_out.weight": "txt_mlp.2.weight"}
_SINGLE = {"attn.to_qkv_mlp_proj.weight": "linear1.weight", "attn.to_out.weight": "linear2.weight",
           "attn.norm_q.weight": "norm.query_norm.scale", "attn.norm_k.weight": "norm.key_norm.scale"}


def transformer_to_bfl(sd: dict, num_layers: int, num_single_layers: int) -> dict:
    out = {}
    for k, v in sd.items():
        if k.startswith(("transformer_blocks", "single_transformer_blocks")):
            continue
        if k == "norm_out.linear.weight":
            scale, shift = v.chunk(2, 0)
            out["final_layer.adaLN_modulation.1.weight"] = torch.cat([shift, scale])
            continue
        for a, b in _RENAMES.items():
            k = k.replace(a, b)
        out[k] = v
    for i in range(num_layers):
        p, q = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        out[q + "img_attn.qkv.weight"] = torch.cat([sd[p + f"attn.to_{x}.weight"] for x in "qkv"])
        out[q + "txt_attn.qkv.weight"] = torch.cat([sd[p + f"attn.add_{x}_proj.weight"] for x in "qkv"])
        for a, b in _DOUBLE.items():
            out[q + b] = sd[p + a]
    for i in range(num_single_layers):
        p, q = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        for a, b in _SINGLE.items():
            out[q + b] = sd[p + a]
    return {k: v.contiguous() for k, v in out.items()}


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
