"""Pre-quantized checkpoints: Comfy-Org fp8 "mixed"/"scaled", BFL fp8r and nvfp4 files, diffusers bnb-4bit folders.

A quantized tensor is only correct together with its scales, so every path here either keeps the two together or
applies the scales; a file whose fp8 weights lost their scales is refused, never read "silently wrong".

Single files are first brought to one canonical form (`normalize_quantized`), before the key layout is converted:
every 2-D fp8 weight `X.weight` (float8_e4m3fn) travels with `X.weight_scale`, float32 with one value per output row
(scalar per-tensor scales are expanded), so diffusers' BFL converter splits fused qkv weights and their scales alike.
`adopt_quantized` then builds `precision.Fp8Linear` layers for them, so an fp8 file loaded at fp8 keeps the file's
own values (no second rounding) and is never materialized in bf16. nvfp4 weights are dequantized to bf16: no CPU
and no GPU before Blackwell runs nvfp4 matmuls. BFL's and ComfyUI's nvfp4 files pack differently (nibble order,
block-scale layout); `.comfy_quant` tells them apart.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from ..errors import ModelFileError
from .checkpoint import FP8_DTYPES, open_checkpoint, read_json_object, weight_files
from .precision import COMPUTE_DTYPE, FP8_MAX, Fp8Linear, keep_portable_4bit_layout, require_bitsandbytes

log = logging.getLogger("flux2_accel")

SCALE_SUFFIXES = (".weight_scale", ".scale_weight")
# Companion tensors that carry quantization bookkeeping, never model weights. Activation scales are dropped: the
# fast fp8 path scales activations dynamically.
_SIDE_SUFFIXES = (".comfy_quant", ".input_scale", ".scale_input", ".weight_scale_2")
_MARKERS = ("scaled_fp8",)
_FP8_FORMATS = ("float8_e4m3fn", "float8_e5m2", "fp8_e4m3fn", "fp8_e5m2")
# The largest value an fp8 weight stored WITHOUT scales (a plain cast, which holds the model's own values) may reach.
# Every value up to 448 is a legal e4m3 number, so this is a limit on what a real weight can be, not on fp8: trained
# transformer weights sit near their initialization (about 1/sqrt(fan_in), 0.01-0.03 at FLUX.2's widths) with rare
# outliers of a few units; bf16 FLUX weights peak well below 30. A quantizer that scales a tensor fills the range:
# its peak is 448 (per tensor) or every row reaches 448 (per row). A peak at or above 64 (2x margin over the largest
# real weights, 7x below a scaled tensor's) therefore means the scales were stripped, or the tensor is not a weight
# at all: read as it is, the model multiplies activations by values hundreds of times too large and produces
# non-finite activations (a NaN image) a few layers in. Matrices only: 1-D gains and biases are never scaled by
# these quantizers, and LLM norm gains legitimately reach tens, so vectors keep the half-range limit.
_UNSCALED_FP8_WEIGHT_LIMIT = 64.0
_UNSCALED_FP8_VECTOR_LIMIT = FP8_MAX / 2


def is_prequantized(state_dict: dict) -> bool:
    return any(v.dtype in FP8_DTYPES for v in state_dict.values()) or any(
        k.endswith(SCALE_SUFFIXES) or k.endswith(".comfy_quant") for k in state_dict)


def _scale_key(state_dict: dict, base: str) -> str | None:
    for suffix in SCALE_SUFFIXES:
        if base + suffix in state_dict:
            return base + suffix
    return None


def _comfy_format(state_dict: dict, base: str, name: str) -> str | None:
    tensor = state_dict.get(base + ".comfy_quant")
    if tensor is None:
        return None
    try:
        return str(json.loads(bytes(tensor.to(torch.uint8).tolist()).decode("utf-8")).get("format", ""))
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError, TypeError, ValueError, RecursionError) as e:
        raise ModelFileError(f"'{name}': tensor '{base}.comfy_quant' is not the JSON ComfyUI writes ({e}); "
                             "the file is corrupt.") from None


def _row_scale(scale: torch.Tensor, weight: torch.Tensor, scale_key: str, name: str) -> torch.Tensor:
    """A per-tensor or per-row scale as float32 [out_features]."""
    scale = scale.to(torch.float32)
    rows = weight.shape[0]
    if scale.numel() == 1:
        return scale.reshape(1).expand(rows).contiguous()
    if scale.numel() == rows and weight.ndim >= 1:
        return scale.reshape(rows).contiguous()
    raise ModelFileError(f"'{name}': scale '{scale_key}' has shape {tuple(scale.shape)}, which fits neither "
                         f"per-tensor nor per-row scaling of its weight {tuple(weight.shape)}; the file is damaged "
                         "or uses a quantization format this loader does not know.")


def _unswizzle_block_scales(blocked: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """cuBLAS' 128x4-tiled block-scale layout (what ComfyUI / comfy-kitchen store) -> row-major [rows, cols].

    Tiles of 128 rows x 4 columns are stored row-major; inside one, (row r, column c) sits at byte
    (r % 32) * 16 + (r // 32) * 4 + c."""
    padded_rows, padded_cols = -(-rows // 128) * 128, -(-cols // 4) * 4
    tiles = blocked.reshape(padded_rows // 128, padded_cols // 4, 32, 4, 4)  # [tile row, tile col, r%32, r//32, c]
    return tiles.permute(0, 3, 2, 1, 4).reshape(padded_rows, padded_cols)[:rows, :cols]


def _dequantize_nvfp4(state_dict: dict, key: str, name: str, dtype, comfy: bool) -> torch.Tensor:
    """Two layouts: BFL's (as diffusers' BFLQuantizationConfig reads it: element 2i in the low nibble, block scales
    row-major [N, K/16]) and ComfyUI's (comfy-kitchen: element 2i in the high nibble, block scales in cuBLAS'
    swizzled 128x4 tiles)."""
    from diffusers.quantizers.bfl.utils import dequantize_nvfp4

    base = key[: -len(".weight")]
    block_scale, global_scale = state_dict.get(base + ".weight_scale"), state_dict.get(base + ".weight_scale_2")
    if block_scale is None or global_scale is None:
        raise ModelFileError(f"'{name}': nvfp4 weight '{key}' lacks its '{base}.weight_scale' / "
                             f"'{base}.weight_scale_2' scales; the file is incomplete.")
    weight = state_dict[key]
    rows, cols = weight.shape[0], weight.shape[1] * 2 // 16
    if comfy:
        padded = -(-rows // 128) * 128 * (-(-cols // 4) * 4)
        if block_scale.numel() != padded:
            raise ModelFileError(f"'{name}': nvfp4 block scales '{base}.weight_scale' hold {block_scale.numel()} "
                                 f"values; packed weight {tuple(weight.shape)} needs {padded} (128x4 tiles).")
        block_scale = _unswizzle_block_scales(block_scale.flatten(), rows, cols)
        weight = (weight << 4) | (weight >> 4)  # high-nibble-first -> low-nibble-first
    elif tuple(block_scale.shape) != (rows, cols):
        raise ModelFileError(f"'{name}': nvfp4 block scales '{base}.weight_scale' have shape "
                             f"{tuple(block_scale.shape)}, which does not fit packed weight {tuple(weight.shape)}.")
    return dequantize_nvfp4(weight, block_scale, global_scale.float()).to(dtype)


def normalize_quantized(state_dict: dict, name: str, dtype=torch.bfloat16) -> dict:
    """The canonical form described above: 2-D e4m3fn weights kept with float32 per-row `weight_scale`; nvfp4 and
    other scaled tensors dequantized to `dtype`; bookkeeping tensors removed. Raises ModelFileError for a weight
    whose scales are missing or inconsistent."""
    if not is_prequantized(state_dict):
        return state_dict
    file_has_scales = any(k.endswith(SCALE_SUFFIXES) for k in state_dict)
    out, used = {}, set()
    for key, value in state_dict.items():
        if key.endswith(_SIDE_SUFFIXES) or key.endswith(SCALE_SUFFIXES) or key in _MARKERS:
            continue
        base = key[: -len(".weight")] if key.endswith(".weight") else None
        fmt = _comfy_format(state_dict, base, name) if base else None
        if fmt is not None and fmt not in _FP8_FORMATS + ("nvfp4",):
            raise ModelFileError(f"'{name}': layer '{base}' is quantized as '{fmt}', a format this loader does not "
                                 "support (fp8 e4m3fn and nvfp4 are). Use the bf16 or fp8 file of this model.")
        if base and (fmt == "nvfp4" or (value.dtype == torch.uint8 and base + ".weight_scale_2" in state_dict)):
            out[key] = _dequantize_nvfp4(state_dict, key, name, dtype, comfy=fmt == "nvfp4")
            used.update({base + ".weight_scale", base + ".weight_scale_2"})
            continue
        if value.dtype not in FP8_DTYPES:
            out[key] = value
            continue
        scale_key = _scale_key(state_dict, base) if base else None
        if scale_key is not None:
            scale = _row_scale(state_dict[scale_key], value, scale_key, name)
            used.add(scale_key)
        elif file_has_scales and base:
            raise ModelFileError(f"'{name}': fp8 weight '{key}' has no scale ('{base}.weight_scale') while the "
                                 "file's other fp8 weights have one; read without it the layer would be wrong. "
                                 "The file is damaged or was edited: download it again.")
        else:
            peak = float(value.float().abs().amax()) if value.numel() else 0.0
            limit = _UNSCALED_FP8_WEIGHT_LIMIT if value.ndim >= 2 else _UNSCALED_FP8_VECTOR_LIMIT
            if peak != peak:
                raise ModelFileError(f"'{name}': fp8 tensor '{key}' holds NaN values; the file is damaged. "
                                     "Download it again.")
            if peak >= limit:
                raise ModelFileError(f"'{name}': fp8 tensor '{key}' reaches {peak:g} (a real weight stays below "
                                     f"{limit:g}), so it was stored scaled, but the file has no scale tensors "
                                     "('.weight_scale'); read without them the model would overflow to NaN. Use the "
                                     "complete file.")
            scale = torch.ones(value.shape[0] if value.ndim else 1, dtype=torch.float32)
        if base and value.ndim == 2 and value.dtype == torch.float8_e4m3fn:
            out[key], out[base + ".weight_scale"] = value, scale
        else:
            shape = (-1,) + (1,) * (value.ndim - 1) if value.ndim else ()
            out[key] = (value.to(torch.float32) * scale.reshape(shape)).to(dtype)
    unused = [k for k in state_dict if k.endswith(SCALE_SUFFIXES) and k not in used]
    if unused:
        raise ModelFileError(f"'{name}': scale tensor '{unused[0]}' belongs to no fp8 weight "
                             f"({len(unused)} such tensors); the file mixes quantized and plain tensors in a way "
                             "this loader cannot read correctly.")
    return out


def dequantize_for_load(state_dict: dict, name: str, dtype=torch.bfloat16) -> dict:
    """Every quantized tensor dequantized to `dtype` (scales applied, bookkeeping dropped)."""
    sd = normalize_quantized(state_dict, name, dtype)
    out = {}
    for key, value in sd.items():
        if key.endswith(".weight_scale"):
            continue
        if value.dtype in FP8_DTYPES:
            value = (value.float() * sd[key[: -len(".weight")] + ".weight_scale"][:, None]).to(dtype)
        out[key] = value
    return out


def _owner(model: torch.nn.Module, path: str):
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def adopt_quantized(model: torch.nn.Module, state_dict: dict, name: str, dtype=torch.bfloat16) -> dict:
    """Swap the model's Linear layers (on the meta device) for `Fp8Linear` where the normalized state dict holds an
    fp8 weight with its scale; an fp8 tensor whose module is not a Linear is dequantized instead, and so is every fp8
    tensor when `dtype` is not bf16 (Fp8Linear computes in bf16; a caller asking for float32 gets float32 weights).
    Returns the state dict to load, in which every fp8 tensor belongs to an Fp8Linear."""
    out = dict(state_dict)
    for scale_key in [k for k in state_dict if k.endswith(".weight_scale")]:
        path = scale_key[: -len(".weight_scale")]
        weight = out[path + ".weight"]
        module = _owner(model, path)
        if dtype == COMPUTE_DTYPE and type(module) is torch.nn.Linear \
                and tuple(module.weight.shape) == tuple(weight.shape):
            parent_path, _, child = path.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            setattr(parent, child, Fp8Linear(module.in_features, module.out_features, bias=module.bias is not None,
                                             device="meta"))
        else:
            out[path + ".weight"] = (weight.float() * out.pop(scale_key)[:, None]).to(dtype or COMPUTE_DTYPE)
    stray = [k for k, v in out.items() if v.dtype in FP8_DTYPES and k[: -len(".weight")] + ".weight_scale" not in out]
    if stray:
        raise ModelFileError(f"'{name}': fp8 tensor '{stray[0]}' would be read without its scale.")
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for key, value in out.items():
        if key in shapes and tuple(value.shape) != shapes[key]:
            raise ModelFileError(f"'{name}': tensor '{key}' has shape {tuple(value.shape)} where the model built from "
                                 f"the file's other tensors needs {shapes[key]}; the file is damaged or mixes models.")
    return out


def keeps_stored_dtype(key: str, value: torch.Tensor) -> bool:
    """Tensors loaded as stored, not cast to the model dtype: fp8 weights and their float32 scales."""
    return value.dtype in FP8_DTYPES or key.endswith(".weight_scale")


# ---------------------------------------------------------------- diffusers folders

def _folder_weight_files(folder: Path) -> list[Path]:
    return weight_files(folder)


def quantization_config(folder: Path) -> dict | None:
    q = read_json_object(folder / "config.json").get("quantization_config")
    if q is not None and not isinstance(q, dict):
        raise ModelFileError(f"'{folder / 'config.json'}': 'quantization_config' is {type(q).__name__}, not an "
                             "object of settings; the model folder is damaged.")
    return q


def is_bnb_4bit_folder(folder: Path) -> bool:
    q = quantization_config(folder) or {}
    return q.get("quant_method") == "bitsandbytes" and bool(q.get("load_in_4bit") or q.get("_load_in_4bit"))


def check_plain_folder(folder: Path) -> None:
    """A diffusers folder without a quantization config must not hold fp8 weights: from_pretrained would cast them
    to bf16 and drop their scales with only a warning."""
    q = quantization_config(folder)
    if q is not None:
        if q.get("quant_method") == "bitsandbytes" and (q.get("load_in_8bit") or q.get("_load_in_8bit")):
            raise ModelFileError(f"'{folder}' holds a bitsandbytes 8-bit model; only 4-bit (nf4/fp4) diffusers "
                                 "folders and fp8/nvfp4 single files are supported. Use the bf16 folder.")
        raise ModelFileError(f"'{folder}' is quantized with '{q.get('quant_method')}', which this loader does not "
                             "read. Use the bf16 folder, a bnb-4bit folder or a single .safetensors file.")
    for path in _folder_weight_files(folder):
        ckpt = open_checkpoint(path)
        scaled = [k for k in ckpt.keys() if k.endswith(SCALE_SUFFIXES)]
        if ckpt.has_fp8() or scaled:
            raise ModelFileError(f"'{path}' holds fp8 weights{' and scales' if scaled else ''}, but its folder's "
                                 "config.json has no quantization_config, so they would load without their scales. "
                                 "Load the file itself with the single-file loader, which applies them.")


def _assign(model: torch.nn.Module, key: str, value: torch.Tensor) -> None:
    path, _, attr = key.rpartition(".")
    module = model.get_submodule(path) if path else model
    if attr in module._parameters:
        module._parameters[attr] = torch.nn.Parameter(value, requires_grad=False)
    elif attr in module._buffers:
        module._buffers[attr] = value
    else:
        raise KeyError(key)


def load_bnb_4bit(folder: Path, model: torch.nn.Module, dtype=torch.bfloat16) -> torch.nn.Module:
    """Fill `model` (built on the meta device from the folder's config) from a diffusers/transformers bitsandbytes
    4-bit folder, with bitsandbytes' own `Params4bit.from_prequantized`, on CPU. Non-quantized tensors become
    `dtype`; the 4-bit layers compute in `dtype`."""
    bnb = require_bitsandbytes()
    qcfg = quantization_config(folder) or {}
    sd = {}
    for path in _folder_weight_files(folder):
        sd.update(open_checkpoint(path).load())
    if not sd:
        raise ModelFileError(f"'{folder}' has no .safetensors weights.")
    state_keys = [k for k in sd if ".weight.quant_state.bitsandbytes__" in k]
    quantized = set()
    for state_key in state_keys:
        path = state_key.split(".weight.quant_state.")[0]
        module = _owner(model, path)
        if type(module) is not torch.nn.Linear:
            raise ModelFileError(f"'{folder}': 4-bit tensor '{path}.weight' belongs to no Linear layer of this "
                                 "model; the folder is of another model.")
        prefix = path + ".weight."
        stats = {k[len(prefix):]: sd.pop(k) for k in [k for k in sd if k.startswith(prefix)]}
        layer = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                  compute_dtype=dtype, quant_type=qcfg.get("bnb_4bit_quant_type", "nf4"),
                                  device="meta")
        layer.weight = bnb.nn.Params4bit.from_prequantized(sd.pop(path + ".weight"), stats, device="cpu",
                                                           module=layer)
        keep_portable_4bit_layout(layer)
        parent_path, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent_path) if parent_path else model, child, layer)
        quantized.add(path + ".weight")
    expected = {k for k, _ in model.named_parameters()} | {k for k, _ in model.named_buffers()}
    expected -= quantized
    missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
    if missing or unexpected:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise ModelFileError(f"'{folder}' does not match its config.json ({detail}); the folder is incomplete or "
                             "of another model.")
    for key, value in sd.items():
        _assign(model, key, value.to(dtype) if value.is_floating_point() else value)
    return model.eval().requires_grad_(False)


def load_bnb_4bit_transformer(folder: Path, dtype=torch.bfloat16):
    from accelerate import init_empty_weights
    from diffusers import Flux2Transformer2DModel

    config = read_json_object(folder / "config.json")
    config.pop("quantization_config", None)
    with init_empty_weights():
        model = Flux2Transformer2DModel.from_config(config)
    return load_bnb_4bit(folder, model, dtype)
