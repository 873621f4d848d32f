"""FLUX.2 LoRA files in every layout in circulation, normalized to what diffusers/peft loads.

Layouts (detected from tensor names):
- diffusers / PEFT: `transformer.<diffusers module>.lora_A/B.weight` (or `base_model.model.`), scale from the file's
  `lora_adapter_metadata` (lora_alpha / r) when present;
- ai-toolkit: `diffusion_model.<BFL module>.lora_A/B.weight` (fused qkv, `double_blocks.*`), no alpha;
- kohya: `lora_unet_<BFL module with underscores>.lora_down/up.weight` + `.alpha`;
- ComfyUI: `diffusion_model.<module>.lora_down/up.weight` + `.alpha`, or `lora_A/B` + `.alpha`;
- LoKr (`.lokr_w1/w2...`, ai-toolkit BFL names or LyCORIS names), through diffusers' LoKr path.

diffusers' own converters do the renaming (`_convert_kohya_flux2_lora_to_diffusers`,
`_convert_non_diffusers_flux2_lora_to_diffusers`, `Flux2LoraLoaderMixin.lora_state_dict` for LoKr). Where they fall
short we fix up first: ComfyUI's alpha keys are folded into lora_A (scale alpha / rank) so the ai-toolkit converter
accepts them, names it does not know are set aside as unmatched instead of raising or vanishing, and BFL's
final-layer modulation (shift, scale) is reordered to diffusers' (scale, shift).

Every adapter leaves here with its scale folded into the weights (peft scaling alpha / r == 1), so a user strength
is exactly peft's `set_scale` weight. Then each target is checked against the live transformer (module exists, shapes
fit): nothing is silently dropped.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field

import torch

from ...errors import ModelFileError

log = logging.getLogger("flux2_accel")

DIFFUSERS = "diffusers"
AI_TOOLKIT = "ai-toolkit"
KOHYA = "kohya"
COMFYUI = "comfyui"
LOKR = "lokr"

_PREFIXES = ("base_model.model.", "model.diffusion_model.", "diffusion_model.", "transformer.")
_SUFFIXES = {  # tensor suffix -> role
    ".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_down.weight": "A", ".lora_up.weight": "B",
    ".lora_A.default.weight": "A", ".lora_B.default.weight": "B", ".alpha": "alpha",
}
# Module names diffusers' ai-toolkit converter maps from BFL to diffusers (see _convert_non_diffusers_flux2_lora_...).
_BFL_MODULE = re.compile(
    r"^(double_blocks\.\d+\.(img_attn\.qkv|txt_attn\.qkv|img_attn\.proj|txt_attn\.proj|img_mlp\.[02]|txt_mlp\.[02])"
    r"|single_blocks\.\d+\.linear[12]|img_in|txt_in|time_in\.(in|out)_layer|guidance_in\.(in|out)_layer"
    r"|final_layer\.linear|final_layer\.adaLN_modulation\.1"
    r"|(single_stream_modulation|double_stream_modulation_img|double_stream_modulation_txt)\.lin)$")
_FUSED_QKV = ("to_qkv", "to_added_qkv")
_EXAMPLES = 5


@dataclass
class NormalizedLora:
    """One file, ready for `transformer.load_lora_adapter(state_dict, prefix="transformer")`."""

    name: str  # file name, for messages and reports
    layout: str
    state_dict: dict[str, torch.Tensor]  # "transformer.<module>.lora_A.weight" / "...lokr_w1" ...
    matched_keys: int  # tensors of the file that landed on a module of the transformer
    total_keys: int
    unmatched: list[str] = field(default_factory=list)  # file keys that did not (with the reason)


def detect_layout(keys) -> str:
    keys = list(keys)
    if any(".lokr_" in k for k in keys):
        return LOKR
    if any(k.startswith("lora_unet_") for k in keys):
        return KOHYA
    if any(k.endswith(".alpha") or ".lora_down." in k for k in keys):
        return COMFYUI
    if any(k.startswith("diffusion_model.") or k.startswith("model.diffusion_model.") for k in keys):
        return AI_TOOLKIT
    return DIFFUSERS


def normalize(name: str, tensors: dict[str, torch.Tensor], metadata: dict | None, transformer) -> NormalizedLora:
    """The file's tensors as a diffusers/peft adapter state dict for `transformer`, with every key accounted for.

    Raises ModelFileError when nothing in the file fits this transformer (e.g. a FLUX.1 LoRA)."""
    if any("dora_scale" in k or "lora_magnitude_vector" in k for k in tensors):
        raise ModelFileError(f"LoRA '{name}' is a DoRA (it has dora_scale / magnitude tensors). DoRA is not "
                             "supported for FLUX.2 here; use a plain LoRA or LoKr export of it.")
    _check_tensor_shapes(name, tensors)
    layout = detect_layout(tensors)
    if layout == LOKR:
        groups, unmatched = _normalize_lokr(name, tensors)
    elif layout == KOHYA:
        groups, unmatched = _normalize_kohya(tensors)
    else:
        groups, unmatched = _normalize_named(name, tensors, _metadata_scales(name, metadata))
    modules = dict(transformer.named_modules())
    state_dict = {}
    for sources, converted in groups:
        reason = _misfit(modules, converted)
        if reason:
            unmatched += [f"{k} ({reason})" for k in sources]
        else:
            state_dict.update(converted)
    matched = len(tensors) - len(unmatched)
    if not state_dict:
        raise ModelFileError(
            f"LoRA '{name}' does not fit this FLUX.2 model: none of its {len(tensors)} tensors matched a layer "
            f"(layout looks like {layout}). Unmatched keys, e.g.: {_examples(unmatched)}. "
            "It is probably a LoRA for another model (FLUX.1, another FLUX.2 size) or an unsupported format.")
    if unmatched:
        log.warning("flux2-accel: LoRA '%s' matched %d of %d tensors; not applied: %s", name, matched,
                    len(tensors), _examples(unmatched))
    return NormalizedLora(name, layout, state_dict, matched, len(tensors), unmatched)


def _check_tensor_shapes(name: str, tensors: dict) -> None:
    """What every layout's converter divides or reads a number from: no empty tensor (a rank-0 LoRA would divide
    alpha by 0), an alpha that is one number, and matrices in floating point (integer ones would be added to the
    weights as whatever their bits happen to count, with no word)."""
    for key, value in tensors.items():
        if not value.is_floating_point() and not key.endswith(".alpha"):
            raise ModelFileError(f"LoRA '{name}': tensor '{key}' is stored as "
                                 f"{str(value.dtype).removeprefix('torch.')}; LoRA matrices must be float32, float16 "
                                 "or bfloat16 (only an alpha may be an integer). The file is damaged or not a LoRA.")
        if not value.numel():
            raise ModelFileError(f"LoRA '{name}': tensor '{key}' is empty (shape {tuple(value.shape)}); the file is "
                                 "damaged.")
        if key.endswith(".alpha") and value.numel() != 1:
            raise ModelFileError(f"LoRA '{name}': alpha '{key}' holds {value.numel()} values where one number is "
                                 "expected; the file is damaged.")


def _examples(unmatched: list[str]) -> str:
    """A few unmatched keys, one per module (its lora_B / alpha would only repeat the reason)."""
    seen, picked = set(), []
    for entry in unmatched:
        module = _split_key(entry.split(" (", 1)[0])[0]
        if module not in seen:
            seen.add(module)
            picked.append(entry)
    return "; ".join(picked[:_EXAMPLES])


# ---------------------------------------------------------------- layouts
# Each returns ([(file keys, converted tensors of one module)], [unmatched file keys with the reason]).

def _split_key(key: str) -> tuple[str, str | None]:
    """(module path without known prefixes, role) for a LoRA tensor name; role None if not a LoRA tensor."""
    for suffix, role in _SUFFIXES.items():
        if key.endswith(suffix):
            module = key[: -len(suffix)]
            break
    else:
        return key, None
    for prefix in _PREFIXES:
        if module.startswith(prefix):
            module = module[len(prefix):]
            break
    return module, role


def _normalize_named(name: str, tensors: dict, metadata_scale):
    """diffusers, PEFT, ai-toolkit and ComfyUI layouts: group per module, fold alpha, rename via diffusers."""
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_flux2_lora_to_diffusers

    grouped: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    unmatched = []
    for key, value in tensors.items():
        module, role = _split_key(key)
        if role is None:
            unmatched.append(f"{key} (not a LoRA down/up/alpha tensor)")
            continue
        grouped.setdefault(module, {})[role] = (key, value)
    groups = []
    for module, parts in grouped.items():
        sources = tuple(k for k, _ in parts.values())
        if "A" not in parts or "B" not in parts:
            unmatched += [f"{k} (its lora_A/lora_B partner is missing)" for k in sources]
            continue
        A, B = parts["A"][1], parts["B"][1]
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
            unmatched += [f"{k} (down/up shapes {tuple(A.shape)} / {tuple(B.shape)} do not chain)" for k in sources]
            continue
        rank = A.shape[0]
        scale = (float(parts["alpha"][1].float().item()) / rank if "alpha" in parts
                 else metadata_scale(module, rank))
        A = _scaled(A, scale)
        if not _BFL_MODULE.match(module):  # already a diffusers module path
            groups.append((sources, {f"transformer.{module}.lora_A.weight": A.contiguous(),
                                     f"transformer.{module}.lora_B.weight": B.contiguous()}))
            continue
        if module == "final_layer.adaLN_modulation.1":
            # BFL orders this output (shift, scale), diffusers' norm_out.linear (scale, shift). The base-weight
            # converter swaps the halves, diffusers' LoRA converter does not: swap lora_B's rows the same way.
            shift, scale_rows = B.chunk(2, dim=0)
            B = torch.cat([scale_rows, shift], dim=0)
        converted = _convert_non_diffusers_flux2_lora_to_diffusers(
            {f"diffusion_model.{module}.lora_A.weight": A, f"diffusion_model.{module}.lora_B.weight": B})
        groups.append((sources, {k: v.contiguous() for k, v in converted.items()}))
    return groups, unmatched


def _normalize_kohya(tensors: dict):
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux2_lora_to_diffusers

    by_module: dict[str, dict] = {}
    for key, value in tensors.items():
        by_module.setdefault(key.split(".", 1)[0], {})[key] = value
    groups, unmatched = [], []
    quiet = logging.getLogger("diffusers.loaders.lora_conversion_utils")
    quiet.disabled = True  # its warning about leftovers is replaced by our own report
    try:
        for module, part in by_module.items():
            remaining = dict(part)  # the converter pops what it converts (folding alpha / rank)
            converted = _convert_kohya_flux2_lora_to_diffusers(remaining)
            unmatched += [f"{k} (not a FLUX.2 kohya module name)" for k in remaining]
            if converted:
                groups.append((tuple(k for k in part if k not in remaining),
                               {k: v.contiguous() for k, v in converted.items()}))
    finally:
        quiet.disabled = False
    return groups, unmatched


def _normalize_lokr(name: str, tensors: dict):
    """diffusers' FLUX.2 LoKr path (ai-toolkit BFL names, LyCORIS names, bare diffusers names; alpha baked in)."""
    from diffusers.loaders.lora_pipeline import Flux2LoraLoaderMixin

    try:
        state_dict = Flux2LoraLoaderMixin.lora_state_dict(dict(tensors))
    except ValueError as e:
        raise ModelFileError(f"LoKr '{name}' has tensors diffusers cannot map to FLUX.2: {e}") from e
    by_module: dict[str, dict] = {}
    for key, value in state_dict.items():
        by_module.setdefault(key.split(".lokr_")[0], {})[key] = value
    fused = sorted(m for m in by_module if m.rsplit(".", 1)[-1] in _FUSED_QKV)
    if fused:
        raise ModelFileError(
            f"LoKr '{name}' targets the fused q/k/v projections ({fused[0]} ...). A Kronecker-product update of the "
            "fused projection cannot be split exactly onto FLUX.2's separate q/k/v layers, and fusing the shared "
            "model's projections would change every other workflow using it, so this LoKr is not supported. "
            "LoKr on other layers and LoRA files (any layout) are supported.")
    # diffusers has already renamed and baked alpha in; misfits are reported under the converted names
    return [(tuple(part), part) for part in by_module.values()], []


# ---------------------------------------------------------------- scales and checks

def _scaled(A: torch.Tensor, scale: float) -> torch.Tensor:
    if scale == 1.0:
        return A
    return (A.float() * scale).to(A.dtype)


def _metadata_scales(name: str, metadata: dict | None):
    """scale(module, rank) from diffusers' `lora_adapter_metadata` (lora_alpha, r, alpha_pattern, use_rslora)."""
    config = {}
    raw = (metadata or {}).get("lora_adapter_metadata")
    if raw:
        try:
            packed = json.loads(raw)
        except (TypeError, ValueError, RecursionError):
            packed = None
        if not isinstance(packed, dict):
            raise ModelFileError(f"LoRA '{name}': its 'lora_adapter_metadata' header entry is not a JSON object of "
                                 "settings, so its alpha (strength scale) cannot be read. The file is damaged.")
        config = {k.removeprefix("transformer."): v for k, v in packed.items()}

    def number(value, field: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ModelFileError(f"LoRA '{name}': '{field}' in its lora_adapter_metadata is {value!r}, not a finite "
                                 "number. The file is damaged.")
        return float(value)

    def scale(module: str, rank: int) -> float:
        if "lora_alpha" not in config:
            return 1.0  # diffusers/PEFT convention without alphas: W + B @ A
        from peft.utils.other import get_pattern_key

        alpha = config["lora_alpha"]
        pattern = config.get("alpha_pattern") or {}
        if not isinstance(pattern, dict):
            raise ModelFileError(f"LoRA '{name}': 'alpha_pattern' in its lora_adapter_metadata is not an object; "
                                 "the file is damaged.")
        if pattern:
            key = get_pattern_key(list(pattern), module)
            alpha = pattern.get(key, alpha)
        return number(alpha, "lora_alpha") / (math.sqrt(rank) if config.get("use_rslora") else rank)

    return scale


def _misfit(modules: dict, tensors: dict) -> str | None:
    """Why converted adapter `tensors` (all for one target layer, or a q/k/v split of one) cannot go on
    `modules` (named_modules of the transformer), or None when they fit."""
    targets = {k.removeprefix("transformer.").split(".lora_")[0].split(".lokr_")[0] for k in tensors}
    for target in sorted(targets):
        reason = _layer_misfit(modules.get(target), {k: v for k, v in tensors.items()
                                                     if k.startswith(f"transformer.{target}.")})
        if reason:
            return f"{reason}: {target}" if target in modules else reason
    return None


def _layer_misfit(layer, tensors: dict) -> str | None:
    if layer is None:
        return "no such layer in FLUX.2"
    base = getattr(layer, "base_layer", layer)  # already wrapped by an earlier adapter
    in_features, out_features = getattr(base, "in_features", None), getattr(base, "out_features", None)
    if in_features is None or out_features is None:
        return f"{type(base).__name__} is not a linear layer"
    A = next((v for k, v in tensors.items() if k.endswith("lora_A.weight")), None)
    B = next((v for k, v in tensors.items() if k.endswith("lora_B.weight")), None)
    if A is not None and B is not None:
        if A.shape[1] != in_features or B.shape[0] != out_features:
            return (f"LoRA maps {A.shape[1]}->{B.shape[0]} features but the layer is "
                    f"{in_features}->{out_features}")
        return None
    w = {k.rsplit(".", 1)[-1]: v for k, v in tensors.items()}
    rows1 = w["lokr_w1"].shape[0] if "lokr_w1" in w else w["lokr_w1_a"].shape[0]
    cols1 = w["lokr_w1"].shape[1] if "lokr_w1" in w else w["lokr_w1_b"].shape[1]
    rows2 = w["lokr_w2"].shape[0] if "lokr_w2" in w else w["lokr_w2_a"].shape[0]
    cols2 = w["lokr_w2"].shape[1] if "lokr_w2" in w else w["lokr_w2_b"].shape[1]
    if rows1 * rows2 != out_features or cols1 * cols2 != in_features:
        return f"LoKr maps {cols1 * cols2}->{rows1 * rows2} features but the layer is {in_features}->{out_features}"
    return None
