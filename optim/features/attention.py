"""The attention kernel a run uses, through diffusers' attention dispatcher.

`ModelHandle.attention_backend` names one of `BACKENDS` (the loader's `attention_backend` widget). The feature
resolves it for the run's device to one of diffusers' `AttentionBackendName`s and holds diffusers' own
`attention_backend(...)` context for the run: FLUX.2's attention processors carry no backend of their own, so they
dispatch to the one active in that context. Nothing is reloaded or rebuilt; compiled blocks guard on the active
backend, so switching backends recompiles once and switching back reuses the first graphs.

| choice | diffusers backend | needs |
| --- | --- | --- |
| `sdpa` | `native` (torch's scaled_dot_product_attention; torch picks its kernel) | nothing |
| `cudnn` | `_native_cudnn` (torch's cuDNN attention kernel) | CUDA, compute capability 8.0+, cuDNN |
| `flash` | `_flash_3` (flash-attn 3) on Hopper (9.0) if installed, else `flash` (flash-attn 2) | CUDA 8.0+, bf16/fp16 |
| `sage` | `sage` (SageAttention, 8-bit QK) | CUDA 8.0+, `sageattention`, bf16/fp16 |
| `auto` | see `auto_backend` | |

A choice this machine cannot run falls back to `sdpa`, with one warning per (choice, reason) naming the reason.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch

from ..devices import execution_device
from ..errors import InputError
from ..options import ATTENTION_BACKENDS as BACKENDS
from ..options import DEFAULT_ATTENTION_BACKEND as DEFAULT_BACKEND
from .api import Feature

log = logging.getLogger("flux2_accel")

NATIVE = "native"  # diffusers' name for torch's SDPA
_warned: set[tuple[str, str]] = set()


@dataclass(frozen=True)
class Resolved:
    """What a choice became on a device: the diffusers backend name, and why it fell back (None: it did not)."""

    asked: str
    backend: str
    fallback: str | None = None


def validate(name: str) -> None:
    if name not in BACKENDS:
        raise InputError(f"attention_backend is '{name}': choose one of {', '.join(BACKENDS)}.")


def _capability(device: torch.device) -> tuple[int, int] | None:
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_capability(device)


def _installed() -> dict[str, bool]:
    """Which optional kernels diffusers can import (its own checks, versions included)."""
    from diffusers.utils import is_flash_attn_3_available, is_flash_attn_available, is_sageattention_available

    return {"flash": is_flash_attn_available(), "flash3": is_flash_attn_3_available(),
            "sage": is_sageattention_available()}


def auto_backend(device: torch.device, dtype: torch.dtype) -> str:
    """The fastest backend known to be exact (same math as SDPA, fp32 accumulation: only rounding differs) here.

    - not a CUDA GPU: SDPA (torch's CPU kernel);
    - Hopper (compute capability 9.0) with flash-attn 3 installed: `_flash_3`, the fastest exact kernel on H100/H200;
    - Hopper without it: torch's cuDNN attention (`_native_cudnn`), faster than the flash-attn 2 kernel torch's SDPA
      picks by default there;
    - anything else (Ampere, Ada, Blackwell...): SDPA, whose own kernel choice is already the best exact one there.
    SageAttention is never chosen: it quantizes Q and K to 8 bits, and its drift on FLUX.2 is what the bench's
    `attn-sage` row measures."""
    capability = _capability(device)
    if capability is None or dtype not in (torch.bfloat16, torch.float16):
        return "sdpa"
    if capability[0] == 9:
        if _installed()["flash3"]:
            return "flash"
        if torch.backends.cudnn.is_available():
            return "cudnn"
    return "sdpa"


def resolve(name: str, device: torch.device | str, dtype: torch.dtype = torch.bfloat16) -> Resolved:
    """`name` (one of BACKENDS) for `device` and activation `dtype`: the diffusers backend, or SDPA and the reason."""
    validate(name)
    device = torch.device(device)
    choice = auto_backend(device, dtype) if name == "auto" else name
    if choice == "sdpa":
        return Resolved(name, NATIVE)
    capability = _capability(device)
    if capability is None:
        return Resolved(name, NATIVE, f"'{choice}' attention needs a CUDA GPU; this run is on {device.type}")
    if capability < (8, 0):
        return Resolved(name, NATIVE, f"'{choice}' attention needs compute capability 8.0+; this GPU has "
                                      f"{capability[0]}.{capability[1]}")
    if choice != "cudnn" and dtype not in (torch.bfloat16, torch.float16):
        return Resolved(name, NATIVE, f"'{choice}' attention runs bf16/fp16 only; the model computes in {dtype}")
    if choice == "cudnn":
        if not torch.backends.cudnn.is_available():
            return Resolved(name, NATIVE, "'cudnn' attention needs cuDNN, which this torch build lacks")
        return Resolved(name, "_native_cudnn")
    installed = _installed()
    if choice == "flash":
        if capability[0] == 9 and installed["flash3"]:
            return Resolved(name, "_flash_3")
        if installed["flash"]:
            return Resolved(name, "flash")
        return Resolved(name, NATIVE, "'flash' attention needs the flash-attn package (2.6+, or flash-attn 3 on "
                                      "Hopper), which is not installed")
    if not installed["sage"]:
        return Resolved(name, NATIVE, "'sage' attention needs the sageattention package, which is not installed")
    return Resolved(name, "sage")


def warn_fallback(resolved: Resolved) -> None:
    """One warning per (choice, reason) per process."""
    key = (resolved.asked, resolved.fallback)
    if resolved.fallback and key not in _warned:
        _warned.add(key)
        log.warning("flux2-accel: attention_backend '%s' falls back to sdpa: %s.", resolved.asked, resolved.fallback)


@contextlib.contextmanager
def backend_active(resolved: Resolved):
    """diffusers' `attention_backend` context for the resolved backend. diffusers itself refusing it (a package too
    old, say) is one more reason to fall back to SDPA, warned like the others."""
    from diffusers.models.attention_dispatch import attention_backend

    try:
        context = attention_backend(resolved.backend)
        context.__enter__()
    except (RuntimeError, ValueError) as e:
        resolved = Resolved(resolved.asked, NATIVE, f"diffusers refused '{resolved.backend}': {e}")
        warn_fallback(resolved)
        context = attention_backend(NATIVE)
        context.__enter__()
    try:
        yield resolved
    finally:
        context.__exit__(None, None, None)


def _device_of(transformer) -> torch.device:
    for p in transformer.parameters():
        # An offloaded module sits on the CPU between uses; it runs on the execution device.
        return p.device if p.device.type != "cpu" else execution_device()
    return execution_device()


def ring_capable(resolved: Resolved, transformer, device: torch.device) -> Resolved:
    """Ring attention (diffusers' context parallelism with a ring degree) merges partial attentions by their
    log-sum-exp, which diffusers' `native` (SDPA) backend does not return: on a GPU, cuDNN's kernel does."""
    config = getattr(transformer, "_parallel_config", None)
    cp = getattr(config, "context_parallel_config", None)
    if cp is None or (cp.ring_degree or 1) == 1 or resolved.backend != NATIVE:
        return resolved
    if device.type == "cuda":
        return Resolved(resolved.asked, "_native_cudnn", "ring attention needs the kernel's log-sum-exp, which "
                                                         "SDPA does not return")
    raise InputError("parallel mode 'ring' needs an attention kernel that returns its log-sum-exp (cuDNN or "
                     "flash-attn, on GPUs); torch's CPU attention does not: use mode 'ulysses' on CPU.")


@contextlib.contextmanager
def activate(store, transformer, handle, report):
    name = getattr(handle, "attention_backend", DEFAULT_BACKEND)
    device = _device_of(transformer)
    resolved = ring_capable(resolve(name, device, getattr(transformer, "dtype", torch.bfloat16)), transformer,
                            device)
    warn_fallback(resolved)
    with backend_active(resolved) as used:
        report.stats["attention"] = {"asked": used.asked, "backend": used.backend, "fallback": used.fallback}
        yield


FEATURE = Feature("attention", activate)
