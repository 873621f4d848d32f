"""Weight memory of a model file at a precision, from the safetensors header alone (nothing is loaded).

The count is the one `precision.estimated_weight_bytes` makes on a built model, made on the header's tensor shapes
instead: every 2-D `.weight` outside the keep-list is a Linear layer stored at the precision's size
(`precision.estimated_linear_bytes`, bias included), everything else is bf16. Names are first put in the layout the
loader builds (diffusers' for the transformer, so a fused BFL qkv counts as the three layers it becomes, and
transformers' text-only model for single-file text encoders), and pre-quantized files count at their unpacked shapes.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import ModelFileError
from . import arch, layouts, prequant
from .checkpoint import Checkpoint, open_checkpoint
from .precision import (TEXT_ENCODER_KEEP_BF16, TEXT_ENCODER_PRECISIONS, TRANSFORMER_KEEP_BF16, TRANSFORMER_PRECISIONS,
                        estimated_linear_bytes, is_kept)

COMPONENTS = {layouts.TRANSFORMER: (TRANSFORMER_PRECISIONS, TRANSFORMER_KEEP_BF16),
              layouts.TEXT_ENCODER: (TEXT_ENCODER_PRECISIONS, TEXT_ENCODER_KEEP_BF16)}
_TARGET = {"bf16": "bf16", "fp8_e4m3fn": "fp8", "fp8_e4m3fn_fast": "fp8", "nf4": "nf4"}
_BOOKKEEPING = prequant.SCALE_SUFFIXES + (".comfy_quant", ".input_scale", ".scale_input", ".weight_scale_2",
                                          "scaled_fp8")


def _logical_shapes(ckpt: Checkpoint) -> dict[str, torch.Tensor]:
    """Meta tensors of the model's own tensors: quantization bookkeeping dropped, nvfp4 weights (two 4-bit values per
    byte) at their unpacked shape."""
    out = {}
    for key, info in ckpt.tensors.items():
        if key.endswith(_BOOKKEEPING):
            continue
        shape = info.shape
        base = key[: -len(".weight")]
        if key.endswith(".weight") and info.dtype == torch.uint8 and len(shape) == 2 and (
                f"{base}.weight_scale_2" in ckpt or f"{base}.comfy_quant" in ckpt):
            shape = (shape[0], shape[1] * 2)
        dtype = info.dtype if isinstance(info.dtype, torch.dtype) else torch.uint8
        out[key] = torch.empty(shape, dtype=dtype, device="meta")
    return out


def _file_tensors(path: Path, component: str) -> dict[str, torch.Tensor]:
    """A single file's tensors (meta) under the names the loader gives them."""
    ckpt = open_checkpoint(path)
    layout = layouts.identify(ckpt)
    layouts.require(layout, component, ckpt)
    tensors = _logical_shapes(ckpt)
    if component == layouts.TRANSFORMER:
        return layouts.transformer_to_diffusers(tensors, layout)
    tensors = layouts.text_encoder_to_hf(tensors, layout)
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    config, out_layers = arch.text_encoder_config(shapes, layout.family, ckpt.name)
    if max(out_layers) == config["num_hidden_layers"]:
        tensors.pop("norm.weight", None)  # the loader replaces a pruned encoder's final norm by Identity
    return tensors


def _folder_tensors(path: Path, component: str) -> dict[str, torch.Tensor]:
    folder = path / ("transformer" if component == layouts.TRANSFORMER else "text_encoder") \
        if (path / "model_index.json").exists() else path
    if not (folder / "config.json").is_file():
        raise ModelFileError(f"'{path}' is neither a diffusers pipeline folder (model_index.json) nor a component "
                             "folder (config.json).")
    if prequant.quantization_config(folder):
        raise ModelFileError(f"'{folder}' is pre-quantized; its memory is not estimated from the header.")
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(_logical_shapes(open_checkpoint(file)))
    if not tensors:
        raise ModelFileError(f"'{folder}' has no .safetensors weights.")
    return tensors


def estimate_weight_bytes(path, precision: str, component: str = layouts.TRANSFORMER,
                          double_quant: bool = True) -> int:
    """Bytes the weights of the model in `path` (a file or diffusers folder) take once loaded at `precision`.

    Reads headers only. Raises ModelFileError, naming the file, for one that is not that component or is broken, and
    naming the choices for an unknown precision."""
    if component not in COMPONENTS:
        raise ModelFileError(f"no weight estimate for component '{component}'; "
                             f"choose one of {', '.join(COMPONENTS)}")
    precisions, keep = COMPONENTS[component]
    if precision not in precisions:
        raise ModelFileError(f"precision '{precision}' is not one of {', '.join(precisions)}")
    path = Path(path)
    tensors = _folder_tensors(path, component) if path.is_dir() else _file_tensors(path, component)
    target = _TARGET[precision]
    total = 0
    for key, t in tensors.items():
        if key.endswith(".bias") and tensors.get(key[: -len(".bias")] + ".weight") is not None \
                and tensors[key[: -len(".bias")] + ".weight"].ndim == 2:
            continue  # counted with its Linear weight
        if key.endswith(".weight") and t.ndim == 2:
            module = key[: -len(".weight")]
            out_features, in_features = t.shape
            total += estimated_linear_bytes(out_features, in_features, f"{module}.bias" in tensors,
                                            "bf16" if is_kept(module, keep) else target, double_quant)
        else:
            total += t.numel() * (2 if t.is_floating_point() else t.element_size())
    return total


def format_bytes(n: int) -> str:
    """Decimal units as the README quotes model sizes: 17.8 GB, 412 MB, 3.1 KB."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            value = n / size
            return f"{value:.1f} {unit}" if value < 100 else f"{value:.0f} {unit}"
    return f"{n} B"
