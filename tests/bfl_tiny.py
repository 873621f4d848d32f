"""A tiny FLUX.2-like transformer in BFL's reference layout, written for the tests (no ComfyUI code).

Same structure and call conventions as the models the BFL-layout step cache targets: `double_blocks` called as
block(img=, txt=, vec=, pe=, attn_mask=, transformer_options=) -> (img, txt); `single_blocks` called as
block(x, vec=, pe=, attn_mask=, transformer_options=) -> x on cat(txt, img); global modulation handed to every
block ((img_mod1, img_mod2), (txt_mod1, txt_mod2)) for double blocks, one ModulationOut for single blocks; block
blocks that add to their inputs in place; replacement through transformer_options["patches_replace"]["dit"][("double_block"|"single_block", i)]; reference
tokens appended to the image stream and dropped at the end.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class ModulationOut:
    shift: torch.Tensor
    scale: torch.Tensor
    gate: torch.Tensor


class Modulation(nn.Module):
    def __init__(self, dim: int, double: bool):
        super().__init__()
        self.multiplier = 6 if double else 3
        self.lin = nn.Linear(dim, self.multiplier * dim, bias=False)

    def forward(self, vec):
        out = self.lin(nn.functional.silu(vec))[:, None, :].chunk(self.multiplier, dim=-1)
        first = ModulationOut(*out[:3])
        return first, (ModulationOut(*out[3:]) if self.multiplier == 6 else None)


def _attention(q, k, v, heads: int, pe):
    b, n, d = q.shape
    q, k, v = (t.view(b, n, heads, d // heads).transpose(1, 2) for t in (q * pe, k * pe, v))
    return nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)


def _modulate(x, mod):
    return (1 + mod.scale) * x + mod.shift


class DoubleStreamBlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        for stream in ("img", "txt"):
            setattr(self, f"{stream}_norm1", nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6))
            setattr(self, f"{stream}_norm2", nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6))
            setattr(self, f"{stream}_qkv", nn.Linear(dim, 3 * dim, bias=False))
            setattr(self, f"{stream}_proj", nn.Linear(dim, dim, bias=False))
            setattr(self, f"{stream}_mlp", nn.Sequential(nn.Linear(dim, 2 * dim, bias=False), nn.SiLU(),
                                                          nn.Linear(2 * dim, dim, bias=False)))

    def forward(self, img, txt, vec, pe, attn_mask=None, transformer_options={}):
        (img_mod1, img_mod2), (txt_mod1, txt_mod2) = vec
        img_q, img_k, img_v = self.img_qkv(_modulate(self.img_norm1(img), img_mod1)).chunk(3, dim=-1)
        txt_q, txt_k, txt_v = self.txt_qkv(_modulate(self.txt_norm1(txt), txt_mod1)).chunk(3, dim=-1)
        attn = _attention(torch.cat((txt_q, img_q), 1), torch.cat((txt_k, img_k), 1), torch.cat((txt_v, img_v), 1),
                          self.heads, pe)
        txt_attn, img_attn = attn[:, :txt.shape[1]], attn[:, txt.shape[1]:]
        # in place, as BFL's and ComfyUI's blocks do: callers must not expect their input tensors unchanged
        img += img_mod1.gate * self.img_proj(img_attn)
        img += img_mod2.gate * self.img_mlp(_modulate(self.img_norm2(img), img_mod2))
        txt += txt_mod1.gate * self.txt_proj(txt_attn)
        txt += txt_mod2.gate * self.txt_mlp(_modulate(self.txt_norm2(txt), txt_mod2))
        return img, txt


class SingleStreamBlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.pre_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear1 = nn.Linear(dim, 5 * dim, bias=False)
        self.linear2 = nn.Linear(3 * dim, dim, bias=False)

    def forward(self, x, vec, pe, attn_mask=None, transformer_options={}):
        mod = vec
        q, k, v, mlp = self.linear1(_modulate(self.pre_norm(x), mod)).split([x.shape[-1]] * 3 + [2 * x.shape[-1]],
                                                                              dim=-1)
        out = self.linear2(torch.cat((_attention(q, k, v, self.heads, pe), nn.functional.silu(mlp)), -1))
        x += mod.gate * out
        return x


class TinyBflFlux2(nn.Module):
    def __init__(self, channels=8, context=12, dim=32, heads=2, depth=2, depth_single=3):
        super().__init__()
        self.img_in = nn.Linear(channels, dim)
        self.txt_in = nn.Linear(context, dim)
        self.time_in = nn.Sequential(nn.Linear(1, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(dim, heads) for _ in range(depth))
        self.single_blocks = nn.ModuleList(SingleStreamBlock(dim, heads) for _ in range(depth_single))
        self.double_stream_modulation_img = Modulation(dim, double=True)
        self.double_stream_modulation_txt = Modulation(dim, double=True)
        self.single_stream_modulation = Modulation(dim, double=False)
        self.final_layer = nn.Linear(dim, channels)

    def forward(self, x, context, timesteps, ref=None, transformer_options={}):
        tokens = x.shape[1]
        if ref is not None:
            x = torch.cat((x, ref), 1)
        img, txt = self.img_in(x), self.txt_in(context)
        vec = self.time_in(timesteps[:, None].to(img.dtype))
        vec_orig = vec
        vec = (self.double_stream_modulation_img(vec), self.double_stream_modulation_txt(vec))
        positions = torch.arange(txt.shape[1] + img.shape[1], dtype=img.dtype)
        pe = (1.0 + 0.1 * torch.cos(positions[None, :, None] / (1 + torch.arange(img.shape[-1]))))
        pe = pe.expand(img.shape[0], -1, -1)
        replace = transformer_options.get("patches_replace", {}).get("dit", {})
        for i, block in enumerate(self.double_blocks):
            if ("double_block", i) in replace:
                def run_double(args, block=block):
                    out = {}
                    out["img"], out["txt"] = block(img=args["img"], txt=args["txt"], vec=args["vec"], pe=args["pe"],
                                                   attn_mask=args.get("attn_mask"),
                                                   transformer_options=args.get("transformer_options"))
                    return out

                out = replace[("double_block", i)](
                    {"img": img, "txt": txt, "vec": vec, "pe": pe, "attn_mask": None,
                     "transformer_options": transformer_options}, {"original_block": run_double})
                img, txt = out["img"], out["txt"]
            else:
                img, txt = block(img=img, txt=txt, vec=vec, pe=pe, attn_mask=None,
                                 transformer_options=transformer_options)
        img = torch.cat((txt, img), 1)
        vec, _ = self.single_stream_modulation(vec_orig)
        for i, block in enumerate(self.single_blocks):
            if ("single_block", i) in replace:
                def run_single(args, block=block):
                    return {"img": block(args["img"], vec=args["vec"], pe=args["pe"], attn_mask=args.get("attn_mask"),
                                         transformer_options=args.get("transformer_options"))}

                img = replace[("single_block", i)](
                    {"img": img, "vec": vec, "pe": pe, "attn_mask": None, "transformer_options": transformer_options},
                    {"original_block": run_single})["img"]
            else:
                img = block(img, vec=vec, pe=pe, attn_mask=None, transformer_options=transformer_options)
        img = img[:, txt.shape[1]:]
        return self.final_layer(img)[:, :tokens]
