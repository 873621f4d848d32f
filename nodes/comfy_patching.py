"""The door to ComfyUI's model patcher for the nodes that patch a native MODEL (step cache, compile).

Everything goes through ComfyUI's own mechanisms on a clone: wrappers registered by key (comfy.patcher_extension),
block replacements in model_options["transformer_options"]["patches_replace"], model_options cloned per run.
Importable without ComfyUI (tests, CLI): IN_COMFYUI is False there and the functions that need ComfyUI raise a
pack error saying so.
"""

from __future__ import annotations

from ..optim.errors import InputError

try:  # ComfyUI's modules exist only inside a running ComfyUI
    import comfy.model_patcher as _model_patcher  # type: ignore
    import comfy.patcher_extension as _patcher_extension  # type: ignore
except ImportError:
    _model_patcher = _patcher_extension = None

IN_COMFYUI = _patcher_extension is not None

# Wrapper kinds (comfy.patcher_extension.WrappersMP values)
OUTER_SAMPLE = "outer_sample"
DIFFUSION_MODEL = "diffusion_model"


def _need_comfyui() -> None:
    if not IN_COMFYUI:
        raise InputError("this node patches a ComfyUI MODEL and runs only inside ComfyUI.")


def flux2_diffusion_model(model, node: str):
    """The FLUX.2 transformer (BFL layout) inside ComfyUI MODEL `model`, or a pack error naming what it holds."""
    base = getattr(model, "model", None)
    inner = getattr(base, "diffusion_model", None)
    what = (f"a {type(model).__name__} holding {type(base).__name__}"
            + (f" ({type(inner).__module__}.{type(inner).__name__})" if inner is not None else ""))
    if base is None or type(base).__name__ != "Flux2":
        raise InputError(f"{node} works on FLUX.2 models ([dev] or [klein]); the MODEL input is {what}. Connect a "
                         "FLUX.2 diffusion model (UNETLoader / Load Diffusion Model with a FLUX.2 file).")
    params = getattr(inner, "params", None)
    if (not hasattr(inner, "double_blocks") or not hasattr(inner, "single_blocks")
            or not getattr(params, "global_modulation", False)):
        raise InputError(f"{node}: the MODEL input is {what}, which does not have FLUX.2's BFL block layout "
                         "(double_blocks, single_blocks, global modulation).")
    return inner


def family_of(diffusion_model) -> str:
    """FLUX.2 [dev] embeds the guidance value; [klein] does not (it uses real CFG)."""
    return "dev" if getattr(diffusion_model.params, "guidance_embed", False) else "klein"


def set_wrapper(model, kind: str, key: str, wrapper) -> None:
    """Register `wrapper` under `key`, replacing what that key held (applying a node twice does not stack)."""
    _need_comfyui()
    model.remove_wrappers_with_key(kind, key)
    model.add_wrapper_with_key(kind, key, wrapper)


def replace_blocks(model, table: dict) -> None:
    """Install dit block replacements {("double_block", i): fn, ...} on `model` (a clone). A replacement already
    there for a block is kept inside ours: ours calls it as the block's original."""
    existing = model.model_options.get("transformer_options", {}).get("patches_replace", {}).get("dit", {})
    for (block_name, index), patch in table.items():
        inner = existing.get((block_name, index))
        patch = patch if inner is None else chained_replacement(patch, inner)
        model.set_model_patch_replace(patch, "dit", block_name, index)


def chained_replacement(outer, inner):
    def replace(args, extra):
        return outer(args, {**extra, "original_block": lambda a: inner(a, extra)})
    return replace


def clone_model_options(model_options: dict) -> dict:
    _need_comfyui()
    return _model_patcher.create_model_options_clone(model_options)


def _transformer_options_position(args, kwargs):
    """Where a DIFFUSION_MODEL wrapper call carries transformer_options: the keyword, or the forward's last
    positional dict (Flux.forward(x, timestep, context, y, guidance, ref_latents, control, transformer_options,
    **kwargs)); None when it carries none."""
    if isinstance(kwargs.get("transformer_options"), dict):
        return "transformer_options"
    for index in range(len(args) - 1, -1, -1):
        if isinstance(args[index], dict):
            return index
    return None


def wrapper_transformer_options(args, kwargs) -> dict:
    """The transformer_options of a DIFFUSION_MODEL wrapper call ({} when it carries none)."""
    position = _transformer_options_position(args, kwargs)
    if position is None:
        return {}
    return kwargs[position] if isinstance(position, str) else args[position]


def with_transformer_options(args, kwargs, options: dict):
    """The wrapper call's (args, kwargs) with `options` as its transformer_options (where it had none: as the
    keyword)."""
    position = _transformer_options_position(args, kwargs)
    if isinstance(position, int):
        return (*args[:position], options, *args[position + 1:]), kwargs
    return args, {**kwargs, "transformer_options": options}
