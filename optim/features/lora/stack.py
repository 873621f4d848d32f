"""Bringing a shared live transformer to one handle's LoRA stack, and back to its base weights.

Adapters stay unfused peft layers (exact on any base precision, quantized included): the base weights are never
written, so "no LoRA" is the base bit for bit (adapters disabled), and a stack of N LoRAs costs only their own
weights. Each file is read and injected once per loaded base (`LoraState`, kept in `store.state[base_key]`); later
runs only switch the active set and write strengths.

Strengths live in 0-dim tensors that keep their identity (filled in place), the same trick peft's compiled hotswap
uses: torch.compile guards on python-float attributes and would recompile on every strength change, but treats
tensors as graph inputs. peft's `set_scale` computes the value (alpha / r, rslora); we copy it into the tensor.
"""

from __future__ import annotations

import warnings
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from ...errors import ModelFileError
from ...handle import file_identity
from ...models.checkpoint import FP8_DTYPES, first_non_finite, open_checkpoint
from ..api import feature_state
from .formats import NormalizedLora, normalize

MAX_IDLE_ADAPTERS = 4  # adapters kept loaded beyond the current stack, least recently used dropped first
STATE_KEY = "lora"


@dataclass
class LoadedAdapter:
    adapter_name: str  # peft adapter name inside the transformer
    file_name: str
    matched_keys: int
    total_keys: int
    layout: str


@dataclass
class LoraState:
    """What one live transformer holds: loaded adapters by file identity, and counters for tests and reports."""

    transformer_ref: weakref.ref
    adapters: OrderedDict = field(default_factory=OrderedDict)  # file identity -> LoadedAdapter (LRU order)
    file_reads: int = 0
    adapter_loads: int = 0
    next_id: int = 0
    layers: list | None = None  # the transformer's peft layers, found again after each load / eviction

    def tuner_layers(self, transformer) -> list:
        if self.layers is None:
            self.layers = tuner_layers(transformer)
        return self.layers


def state_for(store, base_key, transformer) -> LoraState:
    return feature_state(store, base_key, STATE_KEY, transformer, lambda: LoraState(weakref.ref(transformer)))


def read_lora_file(path: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and header metadata of a LoRA file (safetensors only: pickles can run code). A NaN or infinity in
    any tensor is refused here, where it enters: applied, it would turn every image made with the LoRA into NaN."""
    ckpt = open_checkpoint(path)
    tensors = ckpt.load()
    bad = first_non_finite(tensors)
    if bad is not None:
        raise ModelFileError(f"LoRA '{ckpt.name}' has NaN or infinite values in tensor '{bad}'; applied, it would "
                             "make every image NaN. The file is damaged or its training diverged: use another "
                             "checkpoint of it.")
    return tensors, ckpt.metadata


def tuner_layers(transformer) -> list:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in transformer.modules() if isinstance(m, BaseTunerLayer)]


# ---------------------------------------------------------------- loading

def load_adapter(transformer, state: LoraState, path: str) -> LoadedAdapter:
    """The adapter for `path`, injecting it on first use (one file read per file version)."""
    identity = file_identity(path)
    loaded = state.adapters.get(identity)
    if loaded is not None:
        state.adapters.move_to_end(identity)
        return loaded
    tensors, metadata = read_lora_file(path)
    state.file_reads += 1
    name = identity[0].rsplit("/", 1)[-1].rsplit("\\", 1)[-1]
    normalized = normalize(name, tensors, metadata, transformer)
    adapter_name = f"lora{state.next_id}"
    state.next_id += 1
    _inject(transformer, normalized, adapter_name)
    for param_name, param in transformer.named_parameters():
        if f".{adapter_name}." in param_name or param_name.endswith(f".{adapter_name}"):
            param.requires_grad_(False)  # inference only; the same flags every run keep compile guards stable
    state.adapter_loads += 1
    state.layers = None
    loaded = LoadedAdapter(adapter_name, name, normalized.matched_keys, normalized.total_keys, normalized.layout)
    state.adapters[identity] = loaded
    return loaded


def _inject(transformer, normalized: NormalizedLora, adapter_name: str) -> None:
    custom = _custom_linear_types(transformer, normalized)
    try:
        with warnings.catch_warnings():
            # several adapters in one model is the point of a stack, not a mistake
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            if not custom:
                transformer.load_lora_adapter(normalized.state_dict, prefix="transformer", adapter_name=adapter_name)
            elif normalized.layout == "lokr":
                raise ValueError(f"LoKr adapters cannot wrap {', '.join(t.__name__ for t in custom)} layers; load "
                                 "the model at bf16 or nf4 to use this LoKr")
            else:
                _inject_with_custom_layers(transformer, normalized, adapter_name, custom)
    except (ValueError, RuntimeError, TypeError) as e:  # peft/diffusers refusing the adapter: name the file
        raise ModelFileError(f"LoRA '{normalized.name}' ({normalized.layout} layout) could not be applied to this "
                             f"FLUX.2 model: {e}") from e


def _custom_linear_types(transformer, normalized: NormalizedLora) -> tuple:
    """Types of targeted layers peft's own dispatch does not wrap (e.g. the pack's Fp8Linear)."""
    modules = dict(transformer.named_modules())
    found = set()
    for key in normalized.state_dict:
        layer = modules.get(key.removeprefix("transformer.").split(".lora_")[0].split(".lokr_")[0])
        base = getattr(layer, "base_layer", layer)
        if base is not None and not isinstance(base, torch.nn.Linear) \
                and type(base).__name__ not in ("Linear4bit", "Linear8bitLt"):
            found.add(type(base))
    return tuple(sorted(found, key=lambda t: t.__name__))


def _inject_with_custom_layers(transformer, normalized: NormalizedLora, adapter_name: str, custom: tuple) -> None:
    """diffusers' `load_lora_adapter` steps (config from ranks, inject, load state), with peft's custom-module
    dispatch registered for linear-like layers it does not know. Adapters are scaled already (alpha == r)."""
    from diffusers.utils.peft_utils import get_peft_kwargs
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    state_dict = {k.removeprefix("transformer."): v for k, v in normalized.state_dict.items()}
    ranks = {f"^{k}": v.shape[1] for k, v in state_dict.items() if "lora_B" in k and v.ndim > 1}
    config = LoraConfig(**get_peft_kwargs(ranks, None, state_dict, is_unet=True, adapter_name=adapter_name))
    config._register_custom_module({t: _linear_like_lora_class() for t in custom})
    try:
        inject_adapter_in_model(config, transformer, adapter_name=adapter_name, state_dict=state_dict)
        set_peft_model_state_dict(transformer, state_dict, adapter_name)
        transformer._hf_peft_config_loaded = True
    except Exception:
        if adapter_name in getattr(transformer, "peft_config", {}):
            transformer.delete_adapters([adapter_name])
        raise


_LINEAR_LIKE_LORA = None


def _linear_like_lora_class():
    """peft's LoRA Linear around a layer with in/out_features and a forward (fp8 weights with scales...): the
    adapter computes in the layer's compute dtype, never in its fp8 storage dtype."""
    global _LINEAR_LIKE_LORA
    if _LINEAR_LIKE_LORA is None:
        from peft.tuners.lora.layer import Linear

        class LinearLikeLora(Linear):
            def _get_base_layer_device_and_dtype(self, base_layer):
                device, dtype = super()._get_base_layer_device_and_dtype(base_layer)
                if dtype is None or dtype in FP8_DTYPES or not dtype.is_floating_point:
                    bias = getattr(base_layer, "bias", None)
                    dtype = bias.dtype if bias is not None else torch.bfloat16
                return device, dtype

        _LINEAR_LIKE_LORA = LinearLikeLora
    return _LINEAR_LIKE_LORA


def evict_idle(transformer, state: LoraState, keep: set) -> None:
    idle = [identity for identity, a in state.adapters.items() if a.adapter_name not in keep]
    for identity in idle[: max(0, len(idle) - MAX_IDLE_ADAPTERS)]:
        transformer.delete_adapters([state.adapters.pop(identity).adapter_name])
        state.layers = None


# ---------------------------------------------------------------- switching

def set_stack(transformer, state: LoraState, strengths: "OrderedDict[str, float]") -> None:
    """Activate exactly the adapters in `strengths` (name -> strength), or the bare base when it is empty."""
    layers = state.tuner_layers(transformer)
    if not strengths:
        disable(layers)
        return
    names = list(strengths)
    for layer in layers:
        if layer.disable_adapters or list(layer.active_adapters) != names:
            layer.enable_adapters(True)
            # inference_mode keeps adapter grads off: stable compile guards, no autograd bookkeeping
            layer.set_adapter(names, inference_mode=True)
        for name, strength in strengths.items():
            set_strength(layer, name, strength)


def disable(layers) -> None:
    """Adapters off: every wrapped layer computes its base layer only (bit-exact base output)."""
    for layer in layers:
        if not layer.disable_adapters:
            layer.enable_adapters(False)


def set_strength(layer, adapter: str, strength: float) -> None:
    """peft's scale for `strength`, written into the layer's persistent 0-dim scaling tensor."""
    if adapter not in layer.scaling:
        return
    kept = layer.scaling[adapter]
    layer.set_scale(adapter, float(strength))
    value = layer.scaling[adapter]
    value = float(value) if not torch.is_tensor(value) else float(value.item())
    device = layer.get_base_layer().weight.device
    if torch.is_tensor(kept) and kept.device == device:
        kept.fill_(value)
        layer.scaling[adapter] = kept
    else:
        layer.scaling[adapter] = torch.tensor(value, dtype=torch.float32, device=device)


def tensorize_scalings(transformer) -> int:
    """Turn every adapter scaling that is still a python float into a 0-dim tensor; returns how many."""
    count = 0
    for layer in tuner_layers(transformer):
        for adapter, value in list(layer.scaling.items()):
            if not torch.is_tensor(value):
                device = layer.get_base_layer().weight.device
                layer.scaling[adapter] = torch.tensor(float(value), dtype=torch.float32, device=device)
                count += 1
    return count
