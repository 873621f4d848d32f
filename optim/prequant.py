"""Pre-quantized checkpoints (fp8 "scaled"/"mixed", BFL fp8r, nvfp4) turned into plain weights at load time.

An fp8 tensor is only correct together with its scale, so scales are always applied here: a file is never read
"silently wrong" by dropping them.
"""

from __future__ import annotations

import torch

from .checkpoint import FP8_DTYPES
from .errors import ModelFileError

# Companion tensors that carry quantization bookkeeping, never model weights.
_SIDE_SUFFIXES = (".comfy_quant", ".input_scale", ".scale_input")
_MARKERS = ("scaled_fp8",)


def is_prequantized(state_dict: dict) -> bool:
    return any(v.dtype in FP8_DTYPES for v in state_dict.values()) or any(
        k.endswith((".weight_scale", ".scale_weight")) for k in state_dict)


def _scale_for(state_dict: dict, weight_key: str):
    base = weight_key[: -len(".weight")]
    for suffix in (".weight_scale", ".scale_weight"):
        if base + suffix in state_dict:
            return base + suffix
    return None


def dequantize_for_load(state_dict: dict, name: str, dtype=torch.bfloat16) -> dict:
    """Upcast fp8 weights with their scales (scalar per-tensor or per-row) and drop quantization side tensors."""
    if not is_prequantized(state_dict):
        return state_dict
    out, used = {}, set()
    for key, value in state_dict.items():
        if key.endswith(".weight_scale_2") or (value.dtype == torch.uint8 and key.endswith(".weight")
                                              and _scale_for(state_dict, key) is not None):
            raise ModelFileError(
                f"'{name}' is an nvfp4 (4-bit) checkpoint (tensor '{key}'). Load the bf16 or fp8 file instead, "
                "or use the nf4 precision on a bf16 file.")
        if value.dtype in FP8_DTYPES:
            scale_key = _scale_for(state_dict, key) if key.endswith(".weight") else None
            w = value.to(torch.float32)
            if scale_key is not None:
                scale = state_dict[scale_key].to(torch.float32)
                used.add(scale_key)
                if scale.numel() == 1:
                    w = w * scale.reshape(())
                elif scale.numel() == w.shape[0]:
                    w = w * scale.reshape(-1, *([1] * (w.ndim - 1)))
                else:
                    raise ModelFileError(f"'{name}': scale '{scale_key}' has shape {tuple(scale.shape)}, which fits "
                                         f"neither per-tensor nor per-row scaling of weight {tuple(w.shape)}.")
            out[key] = w.to(dtype)
        else:
            out[key] = value
    for key in list(out):
        if key in used or key.endswith(_SIDE_SUFFIXES) or key in _MARKERS or (
                key.endswith((".weight_scale", ".scale_weight")) and key not in used):
            del out[key]
    return out
