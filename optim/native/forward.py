"""ComfyUI's FLUX.2 forward call, answered by diffusers' Flux2Transformer2DModel.

ComfyUI calls a FLUX.2 diffusion model as `model(x, timestep, context, y=None, guidance=None, ref_latents=None,
control=None, transformer_options={}, **kwargs)` with
  x            latent [B, C, h, w] (C = 128 for the real VAE; patch size 1, so one token per latent cell),
  timestep     sigma in 0..1, [B] (its flow model's `timestep(sigma)` is sigma itself),
  context      text embeddings [B, L, D] (ComfyUI's FLUX.2 pads them in front with zeros to 512 tokens),
  guidance     the embedded guidance scale [B] ([dev]; None switches the embedding off),
  ref_latents  reference latents [1, C, h', w'] (ReferenceLatent), placed at time index 10, 20, ...,
and returns the velocity [B, C, h, w]. Diffusers' transformer takes the same quantities as packed tokens plus 4-axis
position ids (t, h, w, l), and its timestep and guidance in the same 0..1 units (it multiplies both by 1000 inside,
as ComfyUI's timestep embedding does). The ids here are the ones diffusers' FLUX.2 pipelines build
(`_prepare_latent_ids`, `_prepare_image_ids` with scale 10, `_prepare_text_ids`), which are also the ones ComfyUI's
FLUX.2 model builds, so a step taken through this module equals one step of diffusers' pipeline.

Pure torch: the ComfyUI side (nodes/native_model.py) adds ComfyUI's wrapper executor around `forward`.
"""

from __future__ import annotations

import torch

from ..errors import InputError

REFERENCE_TIME_SCALE = 10  # FLUX.2: the i-th reference latent sits at time index 10 * (i + 1)
REFERENCE_METHODS = ("index", None)  # ComfyUI's "index" method is FLUX.2's; None means the model's default


def latent_ids(height: int, width: int, time_index: int = 0, device=None) -> torch.Tensor:
    """Position ids (t, h, w, 0) of one latent's tokens in row-major order, [h*w, 4]."""
    return torch.cartesian_prod(torch.tensor([time_index]), torch.arange(height), torch.arange(width),
                                torch.arange(1)).to(device)


def text_ids(length: int, device=None) -> torch.Tensor:
    """Position ids (0, 0, 0, l) of the text tokens, [L, 4]."""
    return torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(length)).to(device)


def pack(latent: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] -> tokens [B, h*w, C], row-major (the inverse of optim.run.latents.packed_to_latent)."""
    return latent.flatten(2).transpose(1, 2)


def check_context_width(transformer, context: torch.Tensor, field_name: str = "conditioning") -> None:
    want = transformer.config.joint_attention_dim
    got = context.shape[-1]
    if got != want:
        raise InputError(
            f"{field_name} has text embeddings of width {got} (shape {tuple(context.shape)}) but this FLUX.2 model "
            f"expects width {want}: the text encoder does not belong to this model (Mistral 3 gives 15360 for "
            "[dev]; Qwen3 gives 7680 for [klein] 4B and 12288 for [klein] 9B).")


def forward(transformer, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor,
            guidance: torch.Tensor | None = None, ref_latents: list | None = None,
            ref_latents_method: str | None = None, attention_kwargs: dict | None = None) -> torch.Tensor:
    """One FLUX.2 denoiser call in ComfyUI's terms (see the module docstring); returns [B, C, h, w] in x's dtype."""
    cfg = transformer.config
    if x.ndim != 4 or x.shape[1] != cfg.in_channels:
        raise InputError(f"latent has shape {tuple(x.shape)}; this FLUX.2 model takes [B, {cfg.in_channels}, H/16, "
                         "W/16] latents (Empty Flux 2 Latent, or VAE Encode with the FLUX.2 VAE).")
    if context is None or context.ndim != 3:
        raise InputError("conditioning is missing or not [B, tokens, width] text embeddings: connect a FLUX.2 "
                         "conditioning (CLIP Text Encode with a flux2 text encoder, or Conditioning from FLUX.2).")
    check_context_width(transformer, context)
    if ref_latents_method not in REFERENCE_METHODS:
        raise InputError(f"reference_latents_method '{ref_latents_method}' is not supported on a flux2-accel model; "
                         "FLUX.2 uses 'index' (remove the FluxKontextMultiReferenceLatentMethod node or set it to "
                         "index).")
    b, _, h, w = x.shape
    dtype = x.dtype
    device = x.device
    tokens = [pack(x)]
    ids = [latent_ids(h, w, device=device)]
    for i, ref in enumerate(ref_latents or ()):
        if ref.ndim != 4 or ref.shape[1] != cfg.in_channels:
            raise InputError(f"reference latent {i + 1} has shape {tuple(ref.shape)}; this model takes [1, "
                             f"{cfg.in_channels}, h, w] FLUX.2 latents.")
        ref_tokens = pack(ref.to(device, dtype))
        tokens.append(ref_tokens.expand(b, -1, -1) if ref_tokens.shape[0] == 1 else ref_tokens)
        ids.append(latent_ids(ref.shape[-2], ref.shape[-1], REFERENCE_TIME_SCALE * (i + 1), device=device))
    hidden_states = torch.cat(tokens, dim=1) if len(tokens) > 1 else tokens[0]
    timestep = timestep.to(device).reshape(-1).expand(b) if timestep.numel() == 1 else timestep.to(device)
    if cfg.guidance_embeds and guidance is not None:
        guidance = guidance.to(device).reshape(-1)
        guidance = guidance.expand(b) if guidance.numel() == 1 else guidance
    else:
        guidance = None  # [klein] embeds no guidance; None on [dev] switches it off, as in ComfyUI's model
    out = transformer(hidden_states=hidden_states, encoder_hidden_states=context.to(device, dtype),
                      timestep=timestep, img_ids=torch.cat(ids, dim=0), txt_ids=text_ids(context.shape[1], device),
                      guidance=guidance, joint_attention_kwargs=attention_kwargs, return_dict=False)[0]
    out = out[:, : h * w]
    return out.transpose(1, 2).reshape(b, -1, h, w).to(dtype)


def compute_dtype(transformer) -> torch.dtype:
    """The dtype activations run in: the weights' own for bf16/fp16/fp32 models, bf16 for fp8/nf4 storage."""
    dtype = getattr(transformer, "dtype", torch.bfloat16)
    return dtype if dtype in (torch.bfloat16, torch.float16, torch.float32) else torch.bfloat16


def branch_name(cond_or_uncond) -> str:
    """The CFG branch a call belongs to, from ComfyUI's transformer_options["cond_or_uncond"] (0 = positive,
    1 = negative): step caches keep separate state per branch, as they do for diffusers' "cond"/"uncond"."""
    kinds = set(cond_or_uncond or (0,))
    if kinds == {1}:
        return "uncond"
    return "cond" if kinds == {0} else "cond+uncond"


class NativeFlux2(torch.nn.Module):
    """A diffusers FLUX.2 transformer behind ComfyUI's FLUX.2 diffusion-model call.

    The transformer is a submodule, so whoever manages this module's memory (ComfyUI's model patcher) moves and
    counts the transformer's weights.
    """

    def __init__(self, transformer):
        super().__init__()
        self.transformer = transformer
        self.dtype = compute_dtype(transformer)

    def forward(self, x, timestep, context, y=None, guidance=None, ref_latents=None, control=None,
                transformer_options=None, **kwargs):
        options = transformer_options or {}
        if control is not None:
            raise InputError("ControlNet inputs do not apply to a flux2-accel model (its transformer is diffusers' "
                             "FLUX.2, not ComfyUI's): remove the ControlNet from this sampler's conditioning.")
        if options.get("patches_replace", {}).get("dit"):
            raise InputError("A node patched this model's transformer blocks (patches_replace 'dit'), which only "
                             "applies to ComfyUI's own FLUX.2 blocks; a flux2-accel model has diffusers' blocks. "
                             "Remove that node, or load the model with ComfyUI's Load Diffusion Model.")
        with self.transformer.cache_context(branch_name(options.get("cond_or_uncond"))):
            return forward(self.transformer, x, timestep, context, guidance=guidance, ref_latents=ref_latents,
                           ref_latents_method=kwargs.get("ref_latents_method"))
