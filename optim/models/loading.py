"""Loading FLUX.2 components from diffusers folders or single safetensors files.

Single files are built on the meta device and filled with `load_state_dict(assign=True)` straight from the memory
map, one tensor at a time, so the weights are never held twice.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import ModelFileError
from . import arch, layouts, prequant
from .checkpoint import Checkpoint, MappedCheckpoints, open_checkpoint, read_json_object, weight_files
from .precision import keep_portable_4bit_layouts
from .text_encoding import TextEncoder, load_tokenizer

PIPELINE_SUBFOLDERS = {layouts.TRANSFORMER: "transformer", layouts.VAE: "vae", layouts.TEXT_ENCODER: "text_encoder"}


def _diffusers_folder(path: Path, component: str) -> Path:
    """The component folder inside a diffusers pipeline folder (or the folder itself if it is the component)."""
    sub = path / PIPELINE_SUBFOLDERS[component]
    if (path / "model_index.json").exists():
        read_json_object(path / "model_index.json")  # diffusers reads it too: a broken one is named here
        if not sub.is_dir():
            raise ModelFileError(f"Diffusers folder '{path}' has no '{sub.name}' subfolder.")
        return sub
    if (path / "config.json").exists():
        return path
    raise ModelFileError(f"'{path}' is neither a diffusers pipeline folder (model_index.json) nor a component "
                         f"folder (config.json).")


def _folder_weights(folder: Path, component: str) -> tuple[Checkpoint, layouts.Layout]:
    """The headers of a component folder's .safetensors files (shards merged), identified like a single file."""
    tensors = {}
    for path in weight_files(folder):
        tensors.update(open_checkpoint(path).tensors)
    if not tensors:
        raise ModelFileError(f"'{folder}' has no .safetensors weights (pickled .bin/.pt weights are refused: they "
                             "can run code). Download the safetensors version of this model.")
    weights = Checkpoint(folder, tensors)
    layout = layouts.identify(weights)
    layouts.require(layout, component, weights)
    return weights, layout


def _check_folder_sizes(folder: Path, component: str, config: dict) -> None:
    """config.json against the weights' shapes, before the model is built (see arch.check_config_matches_weights).
    `config` is the effective config: the model class's defaults under the file's values."""
    weights, layout = _folder_weights(folder, component)
    shapes = {k[len(layout.prefix):]: info.shape for k, info in weights.tensors.items() if k.startswith(layout.prefix)}
    arch.check_config_matches_weights(component, config, shapes, str(folder / "config.json"))


def _diffusers_config(folder: Path, model_cls) -> dict:
    """A diffusers model's config.json over its class's defaults: what from_pretrained will build."""
    import inspect

    defaults = {name: p.default for name, p in inspect.signature(model_cls.__init__).parameters.items()
                if p.default is not inspect.Parameter.empty}
    return {**defaults, **read_json_object(folder / "config.json")}


def _from_pretrained(model_cls, folder: Path, **kwargs):
    """`model_cls.from_pretrained` from local safetensors only, refusing weights that do not fill the model exactly:
    diffusers and transformers only warn about missing ("newly initialized") or unused keys, and the model would
    run with random layers."""
    try:
        model, info = model_cls.from_pretrained(folder, local_files_only=True, use_safetensors=True,
                                                output_loading_info=True, **kwargs)
    except (OSError, ValueError, TypeError, KeyError, RuntimeError) as e:  # the library's own refusals
        raise ModelFileError(f"'{folder}' could not be loaded as a {model_cls.__name__}: {e}") from e
    keep_portable_4bit_layouts(model)
    problems = []
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        keys = sorted(str(k) for k in (info.get(kind) or ()))
        if keys:
            problems.append(f"{len(keys)} {kind.replace('_', ' ')} (e.g. {', '.join(keys[:3])})")
    if problems:
        raise ModelFileError(f"The weights in '{folder}' do not fit its config.json: {'; '.join(problems)}. "
                             "The folder is incomplete or mixes files of different models; download it again.")
    return model.eval()


def _build_from_state_dict(cls_or_factory, config, state_dict: dict, dtype, name: str):
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = cls_or_factory(config)
    state_dict = prequant.adopt_quantized(model, state_dict, name, dtype)  # fp8 weights keep their scales
    expected = set(model.state_dict().keys())
    got = set(state_dict)
    missing, unexpected = sorted(expected - got), sorted(got - expected)
    if missing:
        raise ModelFileError(f"'{name}' is missing {len(missing)} tensors the model needs "
                             f"(e.g. {', '.join(missing[:3])}); the file is incomplete or of another model.")
    if unexpected:
        raise ModelFileError(f"'{name}' has {len(unexpected)} tensors this model does not use "
                             f"(e.g. {', '.join(unexpected[:3])}).")
    _refuse_non_float_weights(model, state_dict, name)
    mapped = MappedCheckpoints.snapshot()
    cast = {}
    for k, v in state_dict.items():
        if v.is_floating_point() and dtype is not None and not prequant.keeps_stored_dtype(k, v):
            cast[k] = v.to(dtype)
            if cast[k] is not v:  # a converted copy: the file's pages for v are no longer needed
                mapped.release(v)
        else:
            cast[k] = v
    model.load_state_dict(cast, strict=True, assign=True)
    return model.eval().requires_grad_(False)


_FLOAT_WEIGHT_DTYPES = "float32, float16, bfloat16, float8_e4m3fn or float8_e5m2"


def _refuse_non_float_weights(model, state_dict: dict, name: str) -> None:
    """A weight the model holds in floating point must be stored in floating point: torch would copy an integer or
    bool tensor into it without a word (a `load_state_dict` RuntimeError at best, a model of rounded weights at
    worst). Quantized layouts the model was adapted to (nf4 bytes, fp8 scales) expect their stored dtypes."""
    for key, expected in model.state_dict().items():
        value = state_dict.get(key)
        if expected.is_floating_point() and torch.is_tensor(value) and not value.is_floating_point():
            raise ModelFileError(f"'{name}': tensor '{key}' is stored as {str(value.dtype).removeprefix('torch.')}; "
                                 f"model weights must be {_FLOAT_WEIGHT_DTYPES}. The file is damaged or not a "
                                 "model checkpoint.")


def _open_file(path: Path, component: str) -> tuple[Checkpoint, layouts.Layout]:
    ckpt = open_checkpoint(path)
    layout = layouts.identify(ckpt)
    layouts.require(layout, component, ckpt)
    return ckpt, layout


# ---------------------------------------------------------------- transformer

def load_transformer(path, dtype=torch.bfloat16):
    """Flux2Transformer2DModel from a diffusers folder or a BFL / Comfy-Org / diffusers single file."""
    from diffusers import Flux2Transformer2DModel

    path = Path(path)
    if path.is_dir():
        folder = _diffusers_folder(path, layouts.TRANSFORMER)
        if prequant.is_bnb_4bit_folder(folder):  # diffusers' own bnb loader refuses to run without a GPU
            return prequant.load_bnb_4bit_transformer(folder, dtype)
        prequant.check_plain_folder(folder)
        _check_folder_sizes(folder, layouts.TRANSFORMER, _diffusers_config(folder, Flux2Transformer2DModel))
        return _from_pretrained(Flux2Transformer2DModel, folder, torch_dtype=dtype)
    ckpt, layout = _open_file(path, layouts.TRANSFORMER)
    sd = prequant.normalize_quantized(ckpt.load(), ckpt.name)
    sd = layouts.transformer_to_diffusers(sd, layout)
    config = arch.transformer_config({k: tuple(v.shape) for k, v in sd.items()}, ckpt.name)
    return _build_from_state_dict(lambda c: Flux2Transformer2DModel(**c), config, sd, dtype, ckpt.name)


# ---------------------------------------------------------------- VAE

def load_vae(path, dtype=torch.float32):
    """AutoencoderKLFlux2 from a diffusers folder or a single file (Comfy-Org flux2-vae / diffusers layout)."""
    from diffusers import AutoencoderKLFlux2

    path = Path(path)
    if path.is_dir():
        folder = _diffusers_folder(path, layouts.VAE)
        _check_folder_sizes(folder, layouts.VAE, _diffusers_config(folder, AutoencoderKLFlux2))
        return _from_pretrained(AutoencoderKLFlux2, folder, torch_dtype=dtype)
    ckpt, layout = _open_file(path, layouts.VAE)
    sd = ckpt.load()
    if layout.layout == "ldm":
        # The LDM converter needs the block count, which the LDM names give directly.
        n = arch.count_blocks([k[len(layout.prefix):] for k in sd], r"encoder\.down\.(\d+)\.", ckpt.name)
        sd = layouts.vae_to_diffusers(sd, layout, {"down_block_types": (None,) * n, "up_block_types": (None,) * n})
    else:
        sd = layouts.vae_to_diffusers(sd, layout, {})
    sd.pop("bn.num_batches_tracked", None)
    config = arch.vae_config({k: tuple(v.shape) for k, v in sd.items()}, ckpt.name)
    vae = _build_from_state_dict(lambda c: AutoencoderKLFlux2(**c), config,
                                 {**sd, "bn.num_batches_tracked": torch.tensor(0)}, dtype, ckpt.name)
    return vae


# ---------------------------------------------------------------- text encoder

def _text_model_class(family: str):
    if family == "qwen3":
        from transformers import Qwen3Config, Qwen3Model

        return Qwen3Config, Qwen3Model
    from transformers import MistralConfig, MistralModel

    return MistralConfig, MistralModel


def load_text_encoder(path, dtype=torch.bfloat16, tokenizer_path=None):
    """A TextEncoder (model + tokenizer + the hidden layers FLUX.2 reads) from a folder or a single file."""
    path = Path(path)
    if path.is_dir():
        return _load_text_encoder_folder(path, dtype)
    ckpt, layout = _open_file(path, layouts.TEXT_ENCODER)
    wanted = [k for k in ckpt.keys() if k.startswith(layout.prefix)]
    sd = layouts.text_encoder_to_hf(prequant.normalize_quantized(ckpt.load(wanted), ckpt.name), layout)
    config_kwargs, out_layers = arch.text_encoder_config({k: tuple(v.shape) for k, v in sd.items()}, layout.family,
                                                        ckpt.name)
    config_cls, model_cls = _text_model_class(layout.family)
    config = config_cls(**config_kwargs, tie_word_embeddings=False)
    model = _build_from_state_dict(model_cls, config, sd, dtype, ckpt.name)
    if max(out_layers) == config.num_hidden_layers:
        # A pruned encoder (Comfy-Org ships Mistral cut at layer 30): its last hidden state must not be normed.
        model.norm = torch.nn.Identity()
    tokenizer = load_tokenizer(ckpt, layout.family, tokenizer_path)
    return TextEncoder(model=model, tokenizer=tokenizer, family=layout.family, out_layers=out_layers,
                       identity=f"{ckpt.name}:{ckpt.path.stat().st_size}")


def _load_text_encoder_folder(path: Path, dtype):
    from transformers import AutoTokenizer

    root = path if (path / "model_index.json").exists() else None
    folder = _diffusers_folder(path, layouts.TEXT_ENCODER)
    config = read_json_object(folder / "config.json")
    names = config.get("architectures")
    arch_name = names[0] if isinstance(names, list) and names and isinstance(names[0], str) else ""
    if "Qwen3" in arch_name:
        from transformers import Qwen3ForCausalLM as cls

        family = "qwen3"
    elif "Mistral" in arch_name:
        from transformers import Mistral3ForConditionalGeneration as cls

        family = "mistral"
    else:
        raise ModelFileError(f"'{folder}' holds a {arch_name or 'unknown'} model; FLUX.2 uses Mistral 3 (dev) or "
                             "Qwen3 (klein) text encoders.")
    if prequant.quantization_config(folder) is None:  # quantized weights are packed: their shapes say nothing
        try:
            effective = cls.config_class.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
            raise ModelFileError(f"'{folder / 'config.json'}' is not a valid {cls.config_class.__name__}: {e}") \
                from e
        text_config = getattr(effective, "text_config", effective)
        _check_folder_sizes(folder, layouts.TEXT_ENCODER, text_config.to_dict())
    model = _from_pretrained(cls, folder, dtype=dtype)
    tok_folder = (root / "tokenizer") if root is not None else folder
    try:
        tokenizer = AutoTokenizer.from_pretrained(tok_folder, local_files_only=True)
    except Exception as e:
        raise ModelFileError(f"No usable tokenizer in '{tok_folder}': {e}") from e
    text_cfg = getattr(model.config, "text_config", model.config)
    out_layers = arch.text_out_layers(family, text_cfg.hidden_size, text_cfg.num_hidden_layers, str(folder))
    return TextEncoder(model=model, tokenizer=tokenizer, family=family, out_layers=out_layers,
                       identity=f"{folder}:{(folder / 'config.json').stat().st_mtime_ns}")
