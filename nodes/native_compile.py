"""Regional torch.compile on ComfyUI's own FLUX.2 MODEL: returns a patched clone; the input MODEL is never changed.

The pack's compile machinery (optim/features/compile.py) does the work: one compiled `nn.Module._call_impl` shared by
every double and single block (one graph per block kind), installed on the blocks for the duration of each sampling run
by an OUTER_SAMPLE wrapper and removed in `finally`, the pack's persistent cache folder, and the eager fallback with
one warning. Compiled code is kept per diffusion-model module and settings, so a later run reuses it.

What does not recompile: prompt, seed, steps, guidance and sigmas are tensor values; the step cache decides in
Python between blocks. LoRA: ComfyUI's ModelPatcher applies a native LoRA by writing new weight tensors into the
blocks (comfy.utils.set_attr_param: a fresh nn.Parameter(requires_grad=False)) and restores the originals the same
way. The compiled blocks read their parameters as graph inputs (dynamo inlines nn.Modules), so a new tensor with
the same shape, dtype and device reuses the graph; what does make dynamo recompile is a change of a parameter's
requires_grad flag (the originals may require grad, the patched copies never do). `prepare_blocks` therefore sets
requires_grad=False on every block parameter before each compiled run: ComfyUI only runs inference, and the flag
then never changes.
"""

from __future__ import annotations

import logging

from ..optim.features.compile import (DYNAMIC, MODES, CompileSettings, compiled_run, compiled_set_for,
                                      configure_caches_safely)
from . import comfy_patching, node_messages
from .compile import Flux2AccelCompile, default_cache_dir

log = logging.getLogger("flux2_accel")

NODE_NAME = "Torch Compile (FLUX.2, native MODEL)"
CONFIG_KEY = "flux2_accel_compile_config"
WRAPPER_KEY = "flux2_accel_compile"

# Compiled sets per diffusion-model module (weak: a model ComfyUI unloads takes its compiled code with it).


class _Report:
    def __init__(self):
        self.stats: dict = {}


def blocks_of(diffusion_model) -> list:
    return list(diffusion_model.double_blocks) + list(diffusion_model.single_blocks)


def prepare_blocks(diffusion_model) -> None:
    """No block parameter requires grad (see the module docs: that flag is what a LoRA swap would change)."""
    for block in blocks_of(diffusion_model):
        for parameter in block.parameters():
            if parameter.requires_grad:
                parameter.requires_grad_(False)


def outer_sample_wrapper(executor, *args, **kwargs):
    guider = executor.class_obj
    config = guider.model_options.get("transformer_options", {}).get(CONFIG_KEY)
    if config is None:
        return executor(*args, **kwargs)
    settings, node_id = config
    diffusion_model = guider.model_patcher.model.diffusion_model
    configure_caches_safely(settings.cache_dir)
    # Kept with the diffusion model itself (no pack store holds ComfyUI's models): every clone shares it.
    compiled = compiled_set_for(None, None, diffusion_model, settings, "FLUX.2 blocks (native MODEL)",
                                lambda: blocks_of(diffusion_model))
    prepare_blocks(diffusion_model)
    report = _Report()
    try:
        with compiled_run(compiled, report, "compile"):
            return executor(*args, **kwargs)
    finally:
        stats = report.stats.get("compile")
        if stats is not None:
            line = "compile: " + " ".join(f"{k}={v}" for k, v in stats.items())
            log.info("flux2-accel (native MODEL) %s", line)
            node_messages.show_on_node(node_id, [line])


def patched(model, settings: CompileSettings, node_id=None):
    """A clone of ComfyUI MODEL `model` whose FLUX.2 blocks run compiled during sampling."""
    comfy_patching.flux2_diffusion_model(model, NODE_NAME)
    settings.validate()
    clone = model.clone()
    clone.model_options.setdefault("transformer_options", {})[CONFIG_KEY] = (
        settings, None if node_id is None else str(node_id))
    comfy_patching.set_wrapper(clone, comfy_patching.OUTER_SAMPLE, WRAPPER_KEY, outer_sample_wrapper)
    return clone


class Flux2AccelNativeCompile:
    @classmethod
    def INPUT_TYPES(cls):
        pack = Flux2AccelCompile.INPUT_TYPES()["required"]
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "ComfyUI's FLUX.2 model; it is not changed, a patched copy is "
                                               "returned. Compiling happens at the first sampling."}),
                "mode": (list(MODES), pack["mode"][1]),
                "dynamic": (list(DYNAMIC), pack["dynamic"][1]),
                "fullgraph": pack["fullgraph"],
                "backend": pack["backend"],
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    FUNCTION = "apply"
    CATEGORY = "flux2-accel/speed"
    DESCRIPTION = ("Compiles the FLUX.2 transformer blocks of ComfyUI's own MODEL with torch.compile, one graph per "
                   "block kind. Prompt, seed, steps, cache settings and native LoRA strengths reuse the compiled "
                   "code; compile caches persist on disk. If compiling fails the model runs eager with a warning.")

    def apply(self, model, mode, dynamic, fullgraph, backend, unique_id=None):
        settings = CompileSettings("regional", mode, dynamic, bool(fullgraph), backend.strip(), False,
                                   default_cache_dir())
        return (patched(model, settings, unique_id),)


NODE_CLASS_MAPPINGS = {"Flux2AccelNativeCompile": Flux2AccelNativeCompile}
NODE_DISPLAY_NAME_MAPPINGS = {"Flux2AccelNativeCompile": NODE_NAME}
