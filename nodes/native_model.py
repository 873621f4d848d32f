"""The pack's FLUX.2 transformer as a ComfyUI MODEL, managed by ComfyUI's model management.

The pattern of ComfyUI-GGUF and ComfyUI-nunchaku: ComfyUI's own FLUX.2 model object (comfy.model_base.Flux2 built
from comfy.supported_models.Flux2: FLUX.2 latent format, flow sampling with its shift) whose `diffusion_model` is a
small module (optim.native.forward.NativeFlux2) that answers ComfyUI's FLUX.2 call with the pack's diffusers
transformer, wrapped in a ModelPatcher. The transformer is a submodule, so ComfyUI counts its memory, moves it to
the GPU and back, and unloads it like any other model; its samplers, schedulers, guiders, progress, previews and
interrupt work unchanged.

The handle's features (LoRA stack, compile, step cache) are switched on for each sampling run by an OUTER_SAMPLE
wrapper, through the pack's store, exactly as for the pack's own sampler.

Memory: when ComfyUI unloads one of these models (low memory, or "Free model and node cache"), the pack's store
drops its references too (`released`), so once ComfyUI's node cache lets go of the MODEL nothing keeps the weights.
ComfyUI's other detaches (it re-seats every model it loads, on every run) release nothing.
A MODEL that lives on is put back into the store at its next run.

Weight patches (ComfyUI's LoRA loaders, model merging) are refused with a pointer to LoRA Stack (FLUX.2): the
weights are diffusers' and quantized layouts (nf4, per-row fp8) that ComfyUI's patch keys do not address.
"""

from __future__ import annotations

import contextlib
import logging
import weakref

import torch

from ..optim.errors import Flux2AccelError, InputError
from ..optim.features.api import RunReport
from ..optim.models.checkpoint import return_free_heap
from ..optim.models.layouts import transformer_bfl_shapes
from ..optim.native.forward import NativeFlux2
from ..optim.parallel import group
from ..optim.run.sampling import SamplingParams
from ..optim.run.store import STORE
from . import comfy_services

log = logging.getLogger("flux2_accel")
WRAPPER_KEY = "flux2_accel"
PATCH_REFUSAL = ("A flux2-accel model takes no weight patches (ComfyUI's LoRA loaders, model merging): its weights "
                 "are diffusers' FLUX.2 layers, possibly nf4 or fp8, which those patches cannot address. Put the "
                 "LoRAs on a LoRA Stack (FLUX.2) node between the pack's loader and Model to ComfyUI (FLUX.2).")

_HEAP_RETURNED = weakref.WeakSet()  # transformers whose collection hands the freed heap back to the OS
_MANAGED: dict = {}  # base key -> patcher, for transformers the pack's own sampler runs (see `load_for_sampling`)
_GROUP_PATCHER = None  # the placeholder ComfyUI tracks for the Parallel actor groups (see `track_parallel_groups`)


def _comfy():
    try:
        import comfy.model_base
        import comfy.model_detection
        import comfy.model_management
        import comfy.model_patcher
        import comfy.patcher_extension
        import comfy.supported_models
    except ImportError:
        raise Flux2AccelError("Model to ComfyUI (FLUX.2) runs only inside ComfyUI.") from None
    return comfy


_PATCHER_CLASS = None


def patcher_class():
    """ModelPatcher that loads the whole diffusers module at once and refuses weight patches."""
    global _PATCHER_CLASS
    if _PATCHER_CLASS is not None:
        return _PATCHER_CLASS
    comfy = _comfy()

    class Flux2AccelModelPatcher(comfy.model_patcher.ModelPatcher):
        def add_patches(self, patches, strength_patch=1.0, strength_model=1.0):
            raise InputError(PATCH_REFUSAL)

        def load(self, device_to=None, lowvram_model_memory=0, force_patch_weights=False, full_load=False):
            # diffusers layers have no ComfyUI cast-on-demand path: a half-loaded module would mix devices
            return super().load(device_to, lowvram_model_memory=0, force_patch_weights=force_patch_weights,
                                full_load=True)

    _PATCHER_CLASS = Flux2AccelModelPatcher
    return _PATCHER_CLASS


class ComfyNativeFlux2(NativeFlux2):
    """NativeFlux2 behind ComfyUI's DIFFUSION_MODEL wrappers (EasyCache and other model-agnostic wrappers)."""

    def forward(self, x, timestep, context, y=None, guidance=None, ref_latents=None, control=None,
                transformer_options={}, **kwargs):
        import comfy.patcher_extension

        return comfy.patcher_extension.WrapperExecutor.new_class_executor(
            super().forward, self,
            comfy.patcher_extension.get_all_wrappers(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL,
                                                     transformer_options),
        ).execute(x, timestep, context, y, guidance, ref_latents, control, transformer_options, **kwargs)


def released(patcher=None) -> None:
    """ComfyUI unloaded a pack model: drop the pack's own references to its weights, so the memory is freed.

    This runs inside ComfyUI's unloading loop (an ON_DETACH callback), so the ComfyUI-side objects stay alive:
    dropping the last reference to a patcher here would run ComfyUI's own clean-up (a weakref finalizer that edits
    its list of loaded models) while that loop walks the list, which kills ComfyUI's prompt worker. Patchers let go
    of their transformer instead (the pack sampler's registrations are replaced at their next run; a MODEL from
    Model to ComfyUI loads its base again at its next run, `_seat`), except a MODEL in the middle of a run: ComfyUI
    also detaches a model it is about to patch and run again."""
    log.info("flux2-accel: ComfyUI unloaded a pack model; releasing the pack's %d loaded models", len(STORE))
    for managed in (*_MANAGED.values(), *(() if patcher is None else (patcher,))):
        module = managed.model.diffusion_model
        if not getattr(module, "running", False):
            module.transformer = None
    STORE.clear()
    comfy_services.memory_released()


def _on_detach(patcher, unpatch_all) -> None:
    if not unpatch_all:
        # Not an unload: ComfyUI detaches every model it is about to load again (load_models_gpu re-seats it on
        # each run), and a patcher being collected detaches too. Releasing there would drop the store, text
        # encoders and VAE included, on every run. ComfyUI's unloads (low memory, "Free model and node cache")
        # detach with unpatch_all=True.
        return
    try:
        released(patcher)
    except Exception:  # never break ComfyUI's own unloading
        log.exception("flux2-accel: releasing models failed")


def _seat(handle, module) -> None:
    """Make the store hold this module's transformer again after a release, features reset, so the run's
    features (LoRA, compile, step cache) are applied to the weights ComfyUI manages."""
    transformer = module.transformer
    if transformer is None:  # ComfyUI unloaded it: the base loads again
        module.transformer = STORE.transformer(handle)
        return

    def adopt():
        peft = getattr(transformer, "peft_config", None)
        if peft:  # adapters from before the release: the store's LoRA bookkeeping starts again from none
            transformer.delete_adapters(list(peft))
        return transformer

    live = STORE.get(handle.base_key, adopt)
    if live is not transformer:  # the store loaded this base again meanwhile: use its copy, drop ours
        module.transformer = live


def _outer_sample(handle):
    def wrapper(executor, *args, **kwargs):
        guider = executor.class_obj
        noise, sigmas = args[0], args[3]
        module = guider.model_patcher.model.diffusion_model
        _seat(handle, module)
        module.running = True  # a detach during the run (ComfyUI re-patching) must not take its weights
        try:
            params = SamplingParams(width=int(noise.shape[-1]) * 16, height=int(noise.shape[-2]) * 16,
                                    steps=max(1, int(sigmas.shape[-1]) - 1), seed=int(kwargs.get("seed") or 0),
                                    batch_size=int(noise.shape[0]))
            report = RunReport(params=params)
            with STORE.prepared(handle, report) as live:
                if live is not module.transformer:
                    module.transformer = live
                try:
                    return executor(*args, **kwargs)
                finally:
                    for name, values in report.stats.items():
                        log.info("flux2-accel %s: %s", name, values)
        finally:
            module.running = False
    return wrapper


def flux2_model_config(transformer):
    """ComfyUI's FLUX.2 model config (comfy.supported_models.Flux2) for the transformer, made by ComfyUI's own model
    detection from the names and shapes a BFL-layout checkpoint of it would hold (meta tensors, no memory). So the
    config carries every key the running ComfyUI version reads (0.33 added hidden_size to its memory estimate),
    with this model's sizes. ComfyUI does not build its own network for it: the pack's module is the model."""
    comfy = _comfy()
    model_config = comfy.model_detection.model_config_from_unet(transformer_bfl_shapes(transformer), "")
    if model_config is None or model_config.unet_config.get("image_model") != "flux2":
        found = "nothing" if model_config is None else f"'{model_config.unet_config.get('image_model')}'"
        raise Flux2AccelError(f"ComfyUI's model detection finds {found} in this transformer, not FLUX.2 "
                              f"({type(transformer).__name__}): this ComfyUI cannot run it as a FLUX.2 MODEL.")
    model_config.unet_config["disable_unet_model_creation"] = True  # ComfyUI's switch for externally built models
    return model_config


def native_patcher(handle, transformer=None):
    """A MODEL (ModelPatcher) for the handle's transformer: ComfyUI's FLUX.2 model around the pack's weights."""
    comfy = _comfy()
    transformer = transformer if transformer is not None else STORE.transformer(handle)
    if transformer not in _HEAP_RETURNED:  # freed weights leave the process, not just the Python heap
        _HEAP_RETURNED.add(transformer)
        weakref.finalize(transformer, return_free_heap)
    module = ComfyNativeFlux2(transformer)
    model_config = flux2_model_config(transformer)
    channels = transformer.config.in_channels
    model_config.set_inference_dtype(module.dtype, None)
    latent_format = model_config.latent_format
    if latent_format.latent_channels != channels:  # small test models: ComfyUI sizes empty latents by this
        latent_format.latent_channels = channels
        latent_format.latent_rgb_factors = latent_format.latent_rgb_factors_bias = None  # no preview colours
        latent_format.latent_rgb_factors_reshape = None
    model = comfy.model_base.Flux2(model_config)
    model.diffusion_model = module
    mm = comfy.model_management
    patcher = patcher_class()(model, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())
    patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, _outer_sample(handle))
    patcher.add_callback_with_key(comfy.patcher_extension.CallbacksMP.ON_DETACH, WRAPPER_KEY, _on_detach)
    return patcher


def load_for_sampling(handle, transformer) -> None:
    """Tell ComfyUI's model management about a transformer the pack's own sampler is about to run (offload "none"):
    ComfyUI loads it on its device, counts it when it needs memory, and unloads it (releasing the pack's store)
    like its own models."""
    comfy = _comfy()
    patcher = _MANAGED.get(handle.base_key)
    if patcher is None or patcher.model.diffusion_model.transformer is not transformer:
        patcher = _MANAGED[handle.base_key] = native_patcher(handle, transformer)
    comfy.model_management.load_models_gpu([patcher])


def managed_by_comfyui(handle) -> tuple:
    """What the pack's own sampler enters around a run so ComfyUI's model management tracks its transformer: it
    counts it when it needs memory, and its unloading (low memory, "Free model and node cache") releases the pack's
    store. Only with offload "none": the offload modes move the weights themselves. Nothing outside ComfyUI."""
    if not comfy_services.IN_COMFYUI or handle.offload != "none":
        return ()

    @contextlib.contextmanager
    def tracked(transformer):
        load_for_sampling(handle, transformer)
        yield

    return (tracked,)


class ParallelGroupPlaceholder(torch.nn.Module):
    """A weightless model standing for the Parallel actor groups in ComfyUI's list of loaded models: the groups'
    weights live in their Ray ranks, which ComfyUI cannot see."""


def _on_group_detach(patcher, unpatch_all) -> None:
    if not unpatch_all:  # ComfyUI re-seating the models it loads on every run (see `_on_detach`)
        return
    try:
        log.info("flux2-accel: ComfyUI unloaded the Parallel actor groups; their ranks stop and give their GPUs back")
        group.release()
    except Exception:  # never break ComfyUI's own unloading
        log.exception("flux2-accel: releasing the Parallel actor groups failed")


def track_parallel_groups() -> None:
    """Tell ComfyUI's model management, before a Parallel run, that the pack's actor groups hold memory: a
    placeholder it loads like its own models, so its unloads (low memory, "Free model and node cache", POST /free)
    tear the groups down. The next Parallel run starts new ones. Nothing outside ComfyUI."""
    global _GROUP_PATCHER
    if not comfy_services.IN_COMFYUI:
        return
    comfy = _comfy()
    if _GROUP_PATCHER is None:
        mm = comfy.model_management
        patcher = comfy.model_patcher.ModelPatcher(ParallelGroupPlaceholder(), load_device=mm.get_torch_device(),
                                                   offload_device=mm.unet_offload_device())
        patcher.add_callback_with_key(comfy.patcher_extension.CallbacksMP.ON_DETACH, WRAPPER_KEY, _on_group_detach)
        _GROUP_PATCHER = patcher
    comfy.model_management.load_models_gpu([_GROUP_PATCHER])
