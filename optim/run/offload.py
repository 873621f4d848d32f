"""Offloading the transformer, VAE and text encoder to CPU memory between uses, with diffusers' own mechanisms.

Modes (the loader's "offload" widget):
- "none": the models move to the GPU and stay there;
- "model_cpu": each whole model moves to the GPU when it runs and back to the CPU when the next one starts
  (accelerate's `cpu_offload_with_hook`, chained as diffusers' `enable_model_cpu_offload` does);
- "sequential": every layer is brought to the GPU only for its own forward pass (accelerate's `cpu_offload`, as
  diffusers' `enable_sequential_cpu_offload`); the least memory and the slowest;
- "group": diffusers' group offloading, prefetched on a CUDA stream: the transformer one block at a time
  (`block_level`), the VAE and text encoder layer by layer (`leaf_level`: their top-level modules hold no block
  list, and the VAE runs through `decode`, not `forward`).

`offloaded(...)` holds a mode for one run and removes its hooks afterwards, so the shared modules are left as plain
modules for handles that ask for another mode. Without a CUDA GPU every mode is a no-op, and it says so.
"""

from __future__ import annotations

import contextlib
import logging

import torch

from ..devices import execution_device
from ..errors import InputError
from ..options import OFFLOAD_MODES

log = logging.getLogger("flux2_accel")


def _is_4bit(module: torch.nn.Module) -> bool:
    return any(type(m).__name__ == "Linear4bit" for m in module.modules())


def _validate(mode: str, modules: list[torch.nn.Module]) -> None:
    if mode not in OFFLOAD_MODES:
        raise InputError(f"offload mode '{mode}' is not available; choose one of {', '.join(OFFLOAD_MODES)}.")
    if mode == "sequential" and any(_is_4bit(m) for m in modules):
        # accelerate re-creates each Params4bit from its packed bytes when it moves a layer, which loses the
        # quantization state; diffusers does not support this combination either.
        raise InputError("offload 'sequential' does not work with nf4 (bitsandbytes 4-bit) models; use "
                         "'model_cpu' or 'group' offload with nf4, or fp8 precision with 'sequential'.")


def _install(mode: str, modules: list[torch.nn.Module], device: torch.device, num_blocks_per_group: int,
             use_stream: bool, block_level: tuple = ()) -> list:
    """Attach `mode`'s hooks; returns what `_remove` needs to take them off again."""
    if mode == "none":
        for m in modules:
            m.to(device)
        return []
    if mode == "model_cpu":
        from accelerate import cpu_offload_with_hook

        hooks, previous = [], None
        for m in modules:  # run order: text encoder -> transformer -> VAE
            _, previous = cpu_offload_with_hook(m, device, prev_module_hook=previous)
            hooks.append(previous)
        return hooks
    if mode == "sequential":
        from accelerate import cpu_offload

        for m in modules:
            m.to("cpu")
            # Buffers too: Fp8Linear keeps its fp8 weights in buffers, so that a model's dtype stays bf16.
            cpu_offload(m, device, offload_buffers=True)
        return []
    from diffusers.hooks import apply_group_offloading

    for m in modules:
        m.to("cpu")
        by_block = any(m is b for b in block_level)
        apply_group_offloading(m, onload_device=device, offload_device=torch.device("cpu"),
                               offload_type="block_level" if by_block else "leaf_level",
                               num_blocks_per_group=num_blocks_per_group if by_block else None,
                               use_stream=use_stream)
    return []


def _remove(mode: str, modules: list[torch.nn.Module], hooks: list) -> None:
    if mode == "none":
        return
    if mode in ("model_cpu", "sequential"):
        from accelerate.hooks import remove_hook_from_module

        for hook in hooks:
            hook.offload()
        for m in modules:
            # AlignDevicesHook.detach_hook puts sequentially offloaded weights back from its weights map.
            remove_hook_from_module(m, recurse=True)
            m.to("cpu")
        return
    from diffusers.hooks import HookRegistry

    for m in modules:
        registry = HookRegistry.check_if_exists_or_initialize(m)
        for name in ("group_offloading", "lazy_prefetch_group_offloading", "layer_execution_tracker"):
            registry.remove_hook(name, recurse=True)
        m.to("cpu")


def has_offload_hooks(module: torch.nn.Module) -> bool:
    """True while any accelerate or diffusers offloading hook is attached anywhere in `module`."""
    for m in module.modules():
        if hasattr(m, "_hf_hook"):
            return True
        registry = getattr(m, "_diffusers_hook", None)
        if registry is not None and any("offload" in n or "execution_tracker" in n for n in registry.hooks):
            return True
    return False


@contextlib.contextmanager
def offloaded(mode: str, *, transformer=None, vae=None, text_encoder=None, device: torch.device | None = None,
              num_blocks_per_group: int = 1):
    """Apply offload `mode` to the given models for the duration of the block; yields the execution device (pass
    inputs there). `device` defaults to the current CUDA GPU; without one this is a logged no-op."""
    modules = [m for m in (text_encoder, transformer, vae) if m is not None]
    _validate(mode, modules)
    device = torch.device(device) if device is not None else execution_device()
    if device.type == "cpu":
        if mode != "none":
            log.info("flux2-accel: offload '%s' has no effect without a GPU; the models run on the CPU.", mode)
        yield device
        return
    hooks = _install(mode, modules, device, num_blocks_per_group, use_stream=device.type == "cuda",
                     block_level=(transformer,) if transformer is not None else ())
    try:
        yield device
    finally:
        _remove(mode, modules, hooks)
