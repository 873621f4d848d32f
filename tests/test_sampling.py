"""Sampling: bit-identical to plain diffusers, ComfyUI seed semantics, validation, interrupts."""

from __future__ import annotations

import layout_fixtures
import pytest
import torch
from flux2_accel.optim.errors import InputError, Interrupted
from flux2_accel.optim.models.text_encoding import TextEncoder
from flux2_accel.optim.run import latents
from flux2_accel.optim.run.sampling import SamplingParams, sample

FAMILY_TE = {"dev": "mistral", "klein": "qwen3"}


def _encoder(comps):
    return TextEncoder(comps.text_encoder, comps.tokenizer, FAMILY_TE[comps.spec.family], comps.spec.text_out_layers)


def _diffusers_images(comps, prompt, params, **extra):
    pipe = layout_fixtures.full_pipeline(comps)
    out = pipe(prompt=prompt, height=params.height, width=params.width, num_inference_steps=params.steps,
               guidance_scale=params.guidance, num_images_per_prompt=params.batch_size,
               generator=torch.Generator().manual_seed(params.seed), output_type="pt",
               text_encoder_out_layers=comps.spec.text_out_layers, **extra).images
    return out.permute(0, 2, 3, 1)


@pytest.mark.parametrize("family", ["dev", "klein"])
@pytest.mark.parametrize("batch", [1, 2])
def test_text_to_image_is_bit_identical_to_diffusers(tiny_models, family, batch):
    comps = getattr(tiny_models, family)
    params = SamplingParams(width=64, height=48, steps=3, guidance=3.5, seed=1234, batch_size=batch)
    cond = _encoder(comps).encode("a red dog")
    latent = sample(comps.transformer, comps.vae, cond, params)
    assert latent.shape == (batch, 4 * comps.spec.latent_channels, 48 // 16, 64 // 16)
    assert latent.dtype == torch.float32
    image = latents.decode(comps.vae, latent)
    assert torch.equal(image, _diffusers_images(comps, "a red dog", params))


def test_reference_edit_is_bit_identical_to_diffusers(tiny_models):
    from PIL import Image

    comps = tiny_models.dev
    ref = torch.linspace(0, 1, 64 * 80 * 3).reshape(1, 64, 80, 3)
    pil = latents.to_pil(ref)
    params = SamplingParams(width=64, height=64, steps=2, guidance=4.0, seed=5)
    cond = _encoder(comps).encode("a cat")
    got = latents.decode(comps.vae, sample(comps.transformer, comps.vae, cond, params, reference_images=ref))
    want = _diffusers_images(comps, "a cat", params, image=pil)
    assert torch.equal(got, want)
    plain = latents.decode(comps.vae, sample(comps.transformer, comps.vae, cond, params))
    assert not torch.equal(got, plain)  # the reference really conditions the result
    assert isinstance(pil[0], Image.Image)


def test_seed_semantics(tiny_models):
    comps = tiny_models.dev
    cond = _encoder(comps).encode("a dog")
    p = SamplingParams(width=32, height=32, steps=2, seed=2**64 - 1)
    a = sample(comps.transformer, comps.vae, cond, p)
    b = sample(comps.transformer, comps.vae, cond, p)
    c = sample(comps.transformer, comps.vae, cond, SamplingParams(width=32, height=32, steps=2, seed=7))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("field,kwargs,match", [
    ("width", dict(width=70), "width is 70: it must be a multiple of 16"),
    ("height", dict(height=0), "height is 0"),
    ("steps", dict(steps=0), "steps is 0: it must be between 1 and 200"),
    ("too many steps", dict(steps=100000), "steps is 100000: it must be between 1 and 200"),
    ("batch", dict(batch_size=0), "batch_size is 0"),
    ("batch too large", dict(batch_size=65), "batch_size is 65: it must be between 1 and 64"),
    ("seed", dict(seed=-1), "seed is -1"),
])
def test_bad_parameters_are_named(tiny_models, field, kwargs, match):
    comps = tiny_models.dev
    cond = _encoder(comps).encode("a dog")
    with pytest.raises(InputError, match=match):
        sample(comps.transformer, comps.vae, cond, SamplingParams(**{**dict(width=32, height=32, steps=2), **kwargs}))


def test_conditioning_from_wrong_encoder(tiny_models):
    from flux2_accel.optim.models.text_encoding import Flux2Conditioning

    cond = Flux2Conditioning(torch.zeros(1, 8, 7), "mistral")
    with pytest.raises(InputError, match=r"width 7 .*expects width 96"):
        sample(tiny_models.dev.transformer, tiny_models.dev.vae, cond, SamplingParams(32, 32, 2))


def test_interrupt_leaves_model_reusable(tiny_models):
    comps = tiny_models.dev
    cond = _encoder(comps).encode("a dog")
    p = SamplingParams(width=32, height=32, steps=4, seed=3)
    before = sample(comps.transformer, comps.vae, cond, p)
    seen = []
    with pytest.raises(Interrupted, match="after 2 of 4"):
        sample(comps.transformer, comps.vae, cond, p, on_step=lambda i, n, get: seen.append((i, n, get().shape)),
               should_interrupt=lambda: len(seen) >= 1)
    assert seen == [(1, 4, (1, 16, 2, 2))]
    assert torch.equal(sample(comps.transformer, comps.vae, cond, p), before)


def test_bf16_model_samples_with_float32_latents_and_leaves_no_hook(tiny_models):
    """A bf16 transformer: the pipeline's latents stay float32 between steps (the scheduler's update is not rounded
    to bf16), which takes the result away from diffusers' bf16-latent run by about bf16's rounding, and the
    float32-latent hook is gone after the run, after an interrupt too."""
    import copy
    import dataclasses

    from diffusers.hooks import HookRegistry
    from flux2_accel.optim.run.sampling import FLOAT32_LATENTS_HOOK

    comps = tiny_models.dev
    transformer = copy.deepcopy(comps.transformer).to(torch.bfloat16)
    cond = _encoder(comps).encode("a dog")
    cond = dataclasses.replace(cond, prompt_embeds=cond.prompt_embeds.to(torch.bfloat16))
    p = SamplingParams(width=64, height=48, steps=4, seed=3)
    got = sample(transformer, comps.vae, cond, p)
    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    assert registry.get_hook(FLOAT32_LATENTS_HOOK) is None and "forward" not in transformer.__dict__
    last = {}
    pipe = layout_fixtures.full_pipeline(dataclasses.replace(comps, transformer=transformer))
    pipe(prompt_embeds=cond.prompt_embeds, height=48, width=64, num_inference_steps=4, guidance_scale=p.guidance,
         generator=torch.Generator().manual_seed(3), output_type="latent",
         callback_on_step_end=lambda pl, i, t, kw: last.update(latents=kw["latents"]) or {})
    assert last["latents"].dtype == torch.bfloat16  # diffusers on its own keeps bf16 latents
    bf16_latents = latents.packed_to_latent(last["latents"], 3, 4).float()
    rel = ((got - bf16_latents).norm() / got.norm()).item()
    assert 1e-4 < rel < 5e-2, rel
    with pytest.raises(Interrupted):
        sample(transformer, comps.vae, cond, p, should_interrupt=lambda: True)
    assert registry.get_hook(FLOAT32_LATENTS_HOOK) is None and "forward" not in transformer.__dict__
    assert torch.equal(sample(transformer, comps.vae, cond, p), got)


def test_encode_decode_layout(tiny_models):
    vae = tiny_models.dev.vae
    image = torch.rand(2, 70, 90, 3)
    lat = latents.encode(vae, image)
    assert lat.shape == (2, 16, 64 // 16, 80 // 16)  # centred crop to multiples of 16
    out = latents.decode(vae, lat)
    assert out.shape == (2, 64, 80, 3) and out.dtype == torch.float32
    assert 0.0 <= out.min() and out.max() <= 1.0
    with pytest.raises(InputError, match=r"\[B,16,H,W\]"):
        latents.decode(vae, torch.zeros(1, 128, 4, 4))
