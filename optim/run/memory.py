"""Bounded work: estimate what a run needs before allocating it, and refuse what the device cannot hold.

The estimate (bytes), for batch B, image W x H, latent tokens T = (W/16)(H/16) per image plus L text tokens:

    transformer activations  B * (T + L) * hidden * act_bytes * ACTIVATION_FACTOR
    text embeddings          B * L * joint_attention_dim * act_bytes        (the pipeline repeats them per image)
    latents                  B * T * in_channels * 4 * LATENT_COPIES        (noise, latents, model output: float32)
    decoded image            B * W * H * vae_channels * act_bytes * DECODE_FACTOR   (the VAE's widest level)

hidden = num_attention_heads * attention_head_dim; act_bytes = the transformer's dtype width. ACTIVATION_FACTOR covers
what one block keeps alive at once (fused QKV + MLP projections are 9x hidden in FLUX.2's single blocks, plus
attention output and residuals). It is deliberately coarse: it exists to refuse a batch of 100000, not to predict
peaks to the megabyte.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import InputError

ACTIVATION_FACTOR = 16
LATENT_COPIES = 4
DECODE_FACTOR = 4
PATCH = 16  # image pixels per latent token side (VAE x8, 2x2 patch)


def estimate_run_bytes(config, *, width: int, height: int, batch_size: int, text_tokens: int,
                       act_bytes: int = 2, vae_channels: int = 128, decode: bool = True) -> int:
    """The formula of the module docstring. `config`: the transformer's config (or a dict with the same keys)."""
    get = config.get if isinstance(config, dict) else (lambda k: getattr(config, k))
    hidden = int(get("num_attention_heads")) * int(get("attention_head_dim"))
    tokens = (width // PATCH) * (height // PATCH)
    total = batch_size * (tokens + text_tokens) * hidden * act_bytes * ACTIVATION_FACTOR
    total += batch_size * text_tokens * int(get("joint_attention_dim")) * act_bytes
    total += batch_size * tokens * int(get("in_channels")) * 4 * LATENT_COPIES
    if decode:
        total += batch_size * width * height * vae_channels * act_bytes * DECODE_FACTOR
    return total


def available_bytes(device: torch.device) -> int | None:
    """Free memory where the run's activations go: the GPU's free memory, or the machine's available RAM."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None  # cannot tell: no refusal


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def check_fits(needed: int, device: torch.device, *, width: int, height: int, batch_size: int) -> None:
    """Refuse a run whose estimate exceeds what the device has free, naming the estimate and what is there."""
    free = available_bytes(device)
    if free is not None and needed > free:
        raise InputError(
            f"batch_size {batch_size} at {width}x{height} needs about {_gib(needed)} of memory (estimate) but "
            f"{torch.device(device)} has {_gib(free)} available: lower batch_size, width or height.")
