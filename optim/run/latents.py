"""Latents and images at the pack's edges.

LATENT is ComfyUI's native FLUX.2 layout: patchified and batch-norm normalised, [B, 4*C, H/16, W/16] (C=32 for the
real VAE, so [B,128,H/16,W/16]); native VAEDecode with flux2-vae decodes it. IMAGE is [B, H, W, 3] float in 0..1.
The arithmetic is diffusers' (Flux2Pipeline's patchify, batch-norm and postprocess steps), in the same order, so a
decode here is bit-identical to the pipeline's own.
"""

from __future__ import annotations

import torch

from ..errors import InputError


def _bn_stats(vae, like: torch.Tensor):
    mean = vae.bn.running_mean.view(1, -1, 1, 1).to(like.device, like.dtype)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(like.device, like.dtype)
    return mean, std


def spatial_factor(vae) -> int:
    """Image pixels per latent cell: the VAE's downsampling times the 2x2 patch."""
    return 2 ** (len(vae.config.block_out_channels) - 1) * 2


@torch.no_grad()
def decode(vae, latent: torch.Tensor, device=None) -> torch.Tensor:
    """LATENT [B,4C,h,w] -> IMAGE [B,H,W,3] float32 in 0..1. `device`: where to run (offloaded VAEs sit elsewhere)."""
    from diffusers import Flux2Pipeline

    expected = vae.bn.running_mean.numel()
    if latent.ndim != 4 or latent.shape[1] != expected:
        raise InputError(f"latent has shape {tuple(latent.shape)}; this VAE decodes [B,{expected},H,W] FLUX.2 latents.")
    device = device or next(vae.parameters()).device
    latent = latent.to(device)
    mean, std = _bn_stats(vae, latent)
    z = Flux2Pipeline._unpatchify_latents(latent * std + mean)
    image = vae.decode(z.to(vae.dtype), return_dict=False)[0]
    image = (image / 2 + 0.5).clamp(0, 1)  # diffusers' VaeImageProcessor.denormalize, as postprocess("pt") does
    return image.permute(0, 2, 3, 1).float().cpu()


@torch.no_grad()
def encode(vae, image: torch.Tensor) -> torch.Tensor:
    """IMAGE [B,H,W,3] in 0..1 -> LATENT. The image is cropped to a multiple of 16 pixels, centred."""
    from diffusers import Flux2Pipeline
    from diffusers.pipelines.flux2.pipeline_flux2 import retrieve_latents

    if image.ndim != 4 or image.shape[-1] not in (3, 4):
        raise InputError(f"image has shape {tuple(image.shape)}; expected IMAGE [B,H,W,3].")
    f = spatial_factor(vae)
    h, w = image.shape[1] // f * f, image.shape[2] // f * f
    if h == 0 or w == 0:
        raise InputError(f"image is {image.shape[2]}x{image.shape[1]} pixels; it must be at least {f}x{f}.")
    top, left = (image.shape[1] - h) // 2, (image.shape[2] - w) // 2
    x = image[:, top:top + h, left:left + w, :3].permute(0, 3, 1, 2)
    device = next(vae.parameters()).device
    x = (x * 2 - 1).to(device, vae.dtype)
    z = retrieve_latents(vae.encode(x), sample_mode="argmax")
    z = Flux2Pipeline._patchify_latents(z)
    mean, std = _bn_stats(vae, z)
    return ((z - mean) / std).float().cpu()


def packed_to_latent(packed: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Diffusers' packed tokens [B, h*w, C] (row-major) -> [B, C, h, w]."""
    b, _, c = packed.shape
    return packed.reshape(b, height, width, c).permute(0, 3, 1, 2)


def to_pil(image: torch.Tensor):
    """IMAGE [B,H,W,3] -> list of PIL images (8-bit)."""
    import numpy as np
    from PIL import Image

    arr = (image.clamp(0, 1).cpu().numpy() * 255.0).round().astype(np.uint8)
    return [Image.fromarray(a[..., :3]) for a in arr]
