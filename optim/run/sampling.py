"""Sampling FLUX.2 on diffusers' own pipelines (Flux2Pipeline for [dev], Flux2KleinPipeline for [klein]).

The pipeline is built around components we already hold (no text encoder: conditioning comes in as embeddings) and
asked for latents. Noise follows ComfyUI's seed semantics: one CPU generator seeded with the widget value draws the
whole batch, so a seed gives the same image on any device and matches plain diffusers given the same generator.

Latents stay in float32 between steps whatever the model's precision, as in ComfyUI's samplers: only the
transformer's inputs are cast to its dtype and its velocity back to float32 (`Float32LatentsHook`). diffusers'
pipelines would otherwise draw the noise and hold the latents in the prompt's dtype, and in bf16 every step's update
loses its low bits (about 5e-3 relative over a run). So a seed draws the same float32 noise as ComfyUI's samplers,
and the pack's sampler and the pack's model under ComfyUI's sampler (Model to ComfyUI) land on the same latent.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
from diffusers.hooks import ModelHook

from ..errors import InputError, Interrupted, NonFiniteError
from ..features.caching.transformer_hook import installed
from ..images import MAX_IMAGE_PIXELS
from ..models.arch import family_of
from ..models.text_encoding import FAMILY_BY_EMBED_WIDTH, Flux2Conditioning
from ..options import (MAX_BATCH_SIZE, MAX_GUIDANCE, MAX_RESOLUTION, MAX_SEED, MAX_STEPS, MIN_REFERENCE_SIDE,
                       SIZE_MULTIPLE)
from .latents import packed_to_latent, spatial_factor, to_pil

# FLUX.2's shipped scheduler (scheduler/scheduler_config.json, the same for [dev] and [klein]): dynamic shifting, the
# pipelines pass mu.
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                        max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096, time_shift_type="exponential")


@dataclass(frozen=True)
class SamplingParams:
    width: int = 1024
    height: int = 1024
    steps: int = 28
    guidance: float = 4.0
    seed: int = 0
    batch_size: int = 1

    def validate(self, multiple: int = SIZE_MULTIPLE) -> None:
        for name in ("width", "height"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < multiple or value > MAX_RESOLUTION or value % multiple:
                raise InputError(f"{name} is {value}: it must be a multiple of {multiple} between {multiple} "
                                 f"and {MAX_RESOLUTION}.")
        if not isinstance(self.steps, int) or not 1 <= self.steps <= MAX_STEPS:
            raise InputError(f"steps is {self.steps}: it must be between 1 and {MAX_STEPS}.")
        if not isinstance(self.batch_size, int) or not 1 <= self.batch_size <= MAX_BATCH_SIZE:
            raise InputError(f"batch_size is {self.batch_size}: it must be between 1 and {MAX_BATCH_SIZE}.")
        if not 0 <= int(self.seed) <= MAX_SEED:
            raise InputError(f"seed is {self.seed}: it must be between 0 and {MAX_SEED}.")
        if not 0.0 <= float(self.guidance) <= MAX_GUIDANCE:
            raise InputError(f"guidance is {self.guidance}: it must be between 0 and {MAX_GUIDANCE:g}.")


StepCallback = Callable[[int, int, Callable[[], torch.Tensor]], None]
FLOAT32_LATENTS_HOOK = "flux2_accel_float32_latents"


class Float32LatentsHook(ModelHook):
    """On the transformer while a pipeline samples with float32 latents and prompt embeddings: the text embeddings
    go in in the transformer's dtype (the pipeline already casts the latents), the velocity comes out in float32,
    so the scheduler's update and the latents it keeps stay float32."""

    def __init__(self, compute_dtype: torch.dtype):
        super().__init__()
        self.compute_dtype = compute_dtype

    def pre_forward(self, module, *args, **kwargs):
        if kwargs.get("encoder_hidden_states") is not None:
            kwargs["encoder_hidden_states"] = kwargs["encoder_hidden_states"].to(self.compute_dtype)
        return args, kwargs

    def post_forward(self, module, output):
        if isinstance(output, tuple):  # return_dict=False, as the pipelines call it
            return (output[0].float(), *output[1:])
        output.sample = output.sample.float()
        return output


def float32_latents(transformer):
    """The pipeline's latents in float32 while the block runs (nothing to do for a float32 transformer)."""
    if transformer.dtype == torch.float32:
        return contextlib.nullcontext()
    return installed(transformer, Float32LatentsHook(transformer.dtype), FLOAT32_LATENTS_HOOK)


def build_pipeline(transformer, vae, family: str, distilled: bool = True, text_encoder=None, tokenizer=None):
    """diffusers' pipeline for `family` around the given components (no text encoder: embeddings come in)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Pipeline

    parts = dict(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG), vae=vae, text_encoder=text_encoder,
                 tokenizer=tokenizer, transformer=transformer)
    pipe = Flux2Pipeline(**parts) if family == "dev" else Flux2KleinPipeline(**parts, is_distilled=distilled)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def check_finite(latents: torch.Tensor, step: int, steps: int) -> None:
    """A NaN or Inf in the latents would decode to a black image: stop and say what usually causes it."""
    if not torch.isfinite(latents).all():
        raise NonFiniteError(
            f"the latents hold NaN/Inf values after step {step} of {steps}. Likely causes: an fp8 model file without "
            "its weight scales (or with broken ones), a LoRA with non-finite or far too strong weights, or a "
            "precision that overflows on this model (try precision bf16, and the LoRAs off).")


def check_conditioning(transformer, conditioning: Flux2Conditioning, field_name: str = "conditioning") -> None:
    want = transformer.config.joint_attention_dim
    got = conditioning.prompt_embeds.shape[-1]
    if got != want:
        raise InputError(
            f"{field_name} has embeddings of width {got} (shape {tuple(conditioning.prompt_embeds.shape)}) but this "
            f"transformer expects width {want}: the text encoder does not belong to this model "
            f"({'Mistral 3 for [dev], ' if FAMILY_BY_EMBED_WIDTH.get(want) == 'mistral' else ''}Qwen3 for [klein]).")



def reference_pil_images(reference_images: torch.Tensor | list | None) -> list | None:
    """The reference images as PIL images, each checked: at least MIN_REFERENCE_SIDE a side and at most
    MAX_IMAGE_PIXELS. An IMAGE tensor ([B, H, W, C], ComfyUI's layout) is checked on its shape before any pixel is
    converted, so a huge tensor from another node is refused without a copy."""
    if reference_images is None:
        return None
    if torch.is_tensor(reference_images):
        if reference_images.ndim != 4 or reference_images.shape[-1] not in (3, 4) or reference_images.shape[0] == 0:
            raise InputError(f"reference_images has shape {tuple(reference_images.shape)}; an IMAGE is "
                             "[batch, height, width, 3] with at least one image.")
        _, height, width, _ = reference_images.shape
        sizes = [(width, height)] * reference_images.shape[0]
    else:
        sizes = [img.size for img in reference_images]
    for n, (width, height) in enumerate(sizes):
        if min(width, height) < MIN_REFERENCE_SIDE:
            raise InputError(f"reference image {n + 1} is {width}x{height}; reference images must be at least "
                             f"{MIN_REFERENCE_SIDE} pixels on each side.")
        if width * height > MAX_IMAGE_PIXELS:
            raise InputError(f"reference image {n + 1} is {width}x{height} pixels, more than the "
                             f"{MAX_IMAGE_PIXELS:,} this pack takes; scale it down (FLUX.2 resizes references to "
                             "about 1 megapixel anyway).")
    return to_pil(reference_images) if torch.is_tensor(reference_images) else list(reference_images)


def calls_both_branches(family: str, negative: Flux2Conditioning | None, params: SamplingParams) -> bool:
    """Whether a run does CFG: two transformer calls a step, the negative prompt's and the positive one's."""
    return family == "klein" and negative is not None and params.guidance > 1.0


@torch.no_grad()
def sample(transformer, vae, conditioning: Flux2Conditioning, params: SamplingParams, *,
           reference_images: torch.Tensor | list | None = None, negative: Flux2Conditioning | None = None,
           on_step: StepCallback | None = None, should_interrupt: Callable[[], bool] | None = None,
           attention_kwargs: dict | None = None) -> torch.Tensor:
    """Denoise and return LATENT [B, 4C, H/16, W/16] (float32, CPU)."""
    factor = spatial_factor(vae)
    params.validate(multiple=factor)
    check_conditioning(transformer, conditioning)
    family = family_of(transformer)
    use_cfg = calls_both_branches(family, negative, params)
    if negative is not None:
        check_conditioning(transformer, negative, "negative conditioning")
    pipe = build_pipeline(transformer, vae, family, distilled=not use_cfg)
    device = pipe._execution_device  # follows offload hooks, where the weights themselves may sit on the CPU
    h, w = params.height // factor, params.width // factor

    final = {}

    def callback(pipeline, i, t, kwargs):
        # The packed latents after the last step are the result: the two pipelines post-process their outputs
        # differently (Klein returns them de-normalised), the per-step tensors are the same in both.
        final["latents"] = kwargs["latents"]
        if i == 0:  # the first step tells: a broken model gives NaN at once, no need to run the others
            check_finite(kwargs["latents"], 1, params.steps)
        if should_interrupt is not None and should_interrupt():
            raise Interrupted(f"interrupted after {i + 1} of {params.steps} steps")
        if on_step is not None:
            latents = kwargs["latents"]
            on_step(i + 1, params.steps, lambda: packed_to_latent(latents, h, w).float())
        return {}

    images = reference_pil_images(reference_images)
    kwargs = dict(
        image=images, prompt_embeds=conditioning.prompt_embeds.to(device, torch.float32),
        height=params.height, width=params.width, num_inference_steps=params.steps, guidance_scale=params.guidance,
        num_images_per_prompt=params.batch_size, generator=torch.Generator("cpu").manual_seed(int(params.seed)),
        output_type="latent", callback_on_step_end=callback, attention_kwargs=attention_kwargs,
    )
    if family == "klein" and use_cfg:
        kwargs["negative_prompt_embeds"] = negative.prompt_embeds.to(device, torch.float32)
    with float32_latents(transformer):
        pipe(**kwargs)
    check_finite(final["latents"], params.steps, params.steps)
    return packed_to_latent(final["latents"], h, w).float().cpu()
