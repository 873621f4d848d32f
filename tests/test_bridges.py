"""Bridges to ComfyUI's own types, without ComfyUI: conditioning both ways, and ComfyUI's FLUX.2 forward call
answered by the pack's transformer (optim/native/forward.py), compared with diffusers' own calls."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers import Flux2Pipeline
from flux2_accel.optim.errors import InputError
from flux2_accel.optim.models.text_encoding import Flux2Conditioning, TextEncoder
from flux2_accel.optim.native import conditioning as native_conditioning
from flux2_accel.optim.native import forward as native_forward
from flux2_accel.optim.run.sampling import SamplingParams, check_conditioning, sample


@pytest.fixture(autouse=True)
def _threads(one_torch_thread):
    yield


def _encoder(comps):
    family = "mistral" if comps.spec.family == "dev" else "qwen3"
    return TextEncoder(comps.text_encoder, comps.tokenizer, family, comps.spec.text_out_layers, identity="tiny")


# ---------------------------------------------------------------- conditioning

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_pack_conditioning_round_trip_is_the_same_tensor(tiny_models, dtype):
    cond = _encoder(tiny_models.dev).encode("a red dog")
    cond = dataclasses.replace(cond, prompt_embeds=cond.prompt_embeds.to(dtype))
    native = native_conditioning.to_native(cond)
    assert len(native) == 1 and native[0][0] is cond.prompt_embeds  # no copy, no cast on the way out
    back = native_conditioning.from_native(native)
    assert back.prompt_embeds is cond.prompt_embeds
    assert back.prompt_embeds.dtype == dtype and back.prompt_embeds.shape == (1, 512, 96)
    assert (back.family, back.encoder_identity, back.prompts) == ("mistral", "tiny", ("a red dog",))


def test_native_conditioning_is_padded_in_front_like_comfyuis_flux2():
    """ComfyUI's FLUX.2 text encoder gives only the prompt's tokens; its FLUX.2 model pads them in front with zeros
    to 512. The pack's sampler gets exactly that tensor; a second trip changes nothing."""
    g = torch.Generator().manual_seed(0)
    embeds = torch.randn(2, 37, 7680, generator=g, dtype=torch.bfloat16)
    cond = native_conditioning.from_native([[embeds, {"pooled_output": None, "attention_mask": torch.ones(2, 37)}]])
    assert cond.prompt_embeds.shape == (2, 512, 7680) and cond.prompt_embeds.dtype == torch.bfloat16
    assert torch.equal(cond.prompt_embeds[:, -37:], embeds)
    assert not cond.prompt_embeds[:, :-37].any()
    assert cond.family == "qwen3"
    again = native_conditioning.from_native(native_conditioning.to_native(cond))
    assert again.prompt_embeds is cond.prompt_embeds
    long = torch.randn(1, 600, 96, generator=g)
    assert native_conditioning.from_native([[long, {}]]).prompt_embeds is long  # nothing cut or padded


@pytest.mark.parametrize("conditioning, words", [
    ([], ["empty"]),
    ([[torch.zeros(1, 4, 96), {}], [torch.zeros(1, 4, 96), {}]], ["2 entries", "Conditioning Concat"]),
    ([[torch.zeros(1, 4, 96), {"reference_latents": [torch.zeros(1, 16, 2, 2)]}]],
     ["reference_latents", "reference_images"]),
    ([[torch.zeros(1, 4, 96), {"guidance": 3.5}]], ["guidance", "Sampler (FLUX.2)"]),
    ([[torch.zeros(1, 4, 96), {"mask": torch.ones(1, 8, 8), "strength": 1.0}]], ["mask", "strength"]),
    ([[torch.zeros(4, 96), {}]], ["(4, 96)", "[batch, tokens, width]"]),
    ([[torch.full((1, 4, 96), float("nan")), {}]], ["NaN"]),
])
def test_native_conditioning_the_pack_cannot_honour_is_refused(conditioning, words):
    with pytest.raises(InputError) as e:
        native_conditioning.from_native(conditioning, field_name="conditioning")
    for word in words:
        assert word in str(e.value)
    assert "conditioning" in str(e.value)


def test_wrong_width_is_refused_naming_both_widths(tiny_models):
    """A [klein] conditioning reaching the [dev] model: refused by the pack's sampler (FLUX2_CONDITIONING) and by
    the native forward (CONDITIONING), each naming both widths."""
    dev = tiny_models.dev.transformer
    klein_cond = _encoder(tiny_models.klein).encode("a cat")
    wide = dataclasses.replace(klein_cond, prompt_embeds=torch.zeros(1, 512, 7680))
    with pytest.raises(InputError, match=r"width 7680 .* expects width 96"):
        check_conditioning(dev, native_conditioning.from_native(native_conditioning.to_native(wide)))
    with pytest.raises(InputError, match=r"width 7680 .* expects width 96"):
        native_forward.NativeFlux2(dev)(torch.zeros(1, 16, 2, 2), torch.ones(1), torch.zeros(1, 512, 7680))
    with pytest.raises(InputError, match=r"width 15360 .*expects width 96.*15360 for\s+\[dev\]"):
        native_forward.check_context_width(dev, torch.zeros(1, 512, 15360))


def test_conditioning_from_comfyui_samples_like_the_pack_s_own(tiny_models):
    comps = tiny_models.dev
    cond = _encoder(comps).encode("a red dog")
    params = SamplingParams(width=32, height=32, steps=2, seed=3)
    direct = sample(comps.transformer, comps.vae, cond, params)
    bridged = native_conditioning.from_native(native_conditioning.to_native(cond))
    assert torch.equal(sample(comps.transformer, comps.vae, bridged, params), direct)


# ---------------------------------------------------------------- ComfyUI's forward call

def _diffusers_call(transformer, x, sigma, context, guidance, refs=()):
    """What diffusers' Flux2Pipeline passes to the transformer for the same quantities."""
    latents = Flux2Pipeline._pack_latents(x)
    ids = Flux2Pipeline._prepare_latent_ids(x)
    hidden = latents
    if refs:
        ref_tokens = torch.cat([Flux2Pipeline._pack_latents(r) for r in refs], dim=1)
        ref_ids = Flux2Pipeline._prepare_image_ids(list(refs)).expand(x.shape[0], -1, -1)
        hidden = torch.cat([latents, ref_tokens.expand(x.shape[0], -1, -1)], dim=1)
        ids = torch.cat([ids, ref_ids], dim=1)
    out = transformer(hidden_states=hidden, timestep=sigma, guidance=guidance, encoder_hidden_states=context,
                      txt_ids=Flux2Pipeline._prepare_text_ids(context), img_ids=ids, return_dict=False)[0]
    out = out[:, : latents.shape[1]]
    return out.reshape(x.shape[0], x.shape[2], x.shape[3], -1).permute(0, 3, 1, 2)


@pytest.mark.parametrize("family", ["dev", "klein"])
@pytest.mark.parametrize("batch, n_refs", [(1, 0), (2, 0), (2, 2)])
def test_comfyui_forward_call_equals_diffusers_call(tiny_models, family, batch, n_refs):
    """ComfyUI's FLUX.2 arguments (x, timestep = sigma, context, guidance, ref_latents, transformer_options) give
    bit for bit what the transformer gives when called as diffusers' pipeline calls it."""
    transformer = getattr(tiny_models, family).transformer
    g = torch.Generator().manual_seed(7)
    x = torch.randn(batch, 16, 3, 4, generator=g)
    context = torch.randn(batch, 20, 96, generator=g)
    sigma = torch.tensor([0.8, 0.3][:batch])
    guidance = torch.full((batch,), 3.5)
    refs = [torch.randn(1, 16, 2, 3, generator=g), torch.randn(1, 16, 4, 2, generator=g)][:n_refs]
    module = native_forward.NativeFlux2(transformer)
    got = module(x, sigma, context, y=None, guidance=guidance, ref_latents=refs or None, control=None,
                 transformer_options={"cond_or_uncond": [0] * batch})
    want = _diffusers_call(transformer, x, sigma, context, guidance if family == "dev" else None, refs)
    assert got.shape == x.shape and got.dtype == x.dtype
    assert torch.equal(got, want)
    if n_refs:  # the references really condition the result
        assert not torch.equal(got, module(x, sigma, context, guidance=guidance, transformer_options={}))
    if family == "dev":  # guidance reaches the [dev] embedding; None switches it off, as in ComfyUI's model
        assert not torch.equal(got, module(x, sigma, context, guidance=guidance * 2, ref_latents=refs or None))


def test_comfyui_forward_refuses_what_it_cannot_apply(tiny_models):
    module = native_forward.NativeFlux2(tiny_models.dev.transformer)
    x, t, ctx = torch.zeros(1, 16, 2, 2), torch.ones(1), torch.zeros(1, 8, 96)
    with pytest.raises(InputError, match=r"\[B, 16, H/16, W/16\]"):
        module(torch.zeros(1, 128, 2, 2), t, ctx)
    with pytest.raises(InputError, match="reference_latents_method 'offset'.*index"):
        module(x, t, ctx, ref_latents=[x], ref_latents_method="offset")
    with pytest.raises(InputError, match="patches_replace"):
        module(x, t, ctx, transformer_options={"patches_replace": {"dit": {("double_block", 0): print}}})
    with pytest.raises(InputError, match="ControlNet"):
        module(x, t, ctx, control={"input": []})


@pytest.mark.parametrize("dtype, tolerance, update", [
    (torch.float32, 1e-5, "comfyui"), (torch.bfloat16, 1e-3, "comfyui"),
    (torch.float32, 0.0, "diffusers"), (torch.bfloat16, 0.0, "diffusers")])
def test_euler_through_comfyuis_call_matches_the_pack_s_sampler(tiny_models, dtype, tolerance, update):
    """ComfyUI's euler sampler, written out (CONST flow model: denoised = x - sigma * v; float32 latents, the model's
    input cast to its dtype and its output to float32, as ComfyUI's BaseModel does), through ComfyUI's call at the
    sigmas diffusers' FLUX.2 pipeline uses (ComfyUI's Flux2Scheduler gives the same), from the same seeded noise,
    lands where the pack's sampler lands, in bf16 too: both keep the latents in float32. Written with diffusers'
    update (x + dt * v instead of ComfyUI's velocity recovered from the denoised latent), it lands there bit for
    bit: the update's form is the only difference between the two paths."""
    import copy

    from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

    comps = dataclasses.replace(tiny_models.dev, transformer=copy.deepcopy(tiny_models.dev.transformer).to(dtype))
    cond = _encoder(tiny_models.dev).encode("a red dog")
    cond = dataclasses.replace(cond, prompt_embeds=cond.prompt_embeds.to(dtype))
    params = SamplingParams(width=64, height=48, steps=4, guidance=4.0, seed=11)
    want = sample(comps.transformer, comps.vae, cond, params)
    h, w = 48 // 16, 64 // 16
    from diffusers import FlowMatchEulerDiscreteScheduler
    from flux2_accel.optim.run.sampling import SCHEDULER_CONFIG

    scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG)
    steps = params.steps
    scheduler.set_timesteps(sigmas=[1.0 - i / steps for i in range(steps)], mu=compute_empirical_mu(h * w, steps))
    sigmas = scheduler.sigmas
    x = torch.randn(1, 16, h, w, generator=torch.Generator().manual_seed(params.seed))  # comfy.sample.prepare_noise
    module = native_forward.NativeFlux2(comps.transformer)
    with torch.no_grad():
        for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
            v = module(x.to(dtype), sigma.reshape(1), cond.prompt_embeds,
                       guidance=torch.tensor([params.guidance])).float()
            if update == "diffusers":
                x = x + (sigma_next - sigma) * v
                continue
            denoised = x - sigma * v
            x = x + (x - denoised) / sigma * (sigma_next - sigma)
    rel = ((x - want).norm() / want.norm()).item()
    assert rel <= tolerance, rel


def test_step_cache_branches_follow_comfyuis_cond_or_uncond():
    assert native_forward.branch_name([0]) == "cond"
    assert native_forward.branch_name([1]) == "uncond"
    assert native_forward.branch_name([1, 0]) == "cond+uncond"
    assert native_forward.branch_name(None) == "cond"


def test_compute_dtype_is_bf16_for_quantized_storage(tiny_models):
    assert native_forward.NativeFlux2(tiny_models.dev.transformer).dtype == torch.float32
    fake = torch.nn.Linear(2, 2).to(torch.float8_e4m3fn)
    fake.dtype = torch.float8_e4m3fn
    assert native_forward.compute_dtype(fake) == torch.bfloat16


def test_pack_conditioning_type_is_unchanged():
    # the bridge adds no field to the pack's type: other nodes keep building it as before
    assert [f.name for f in dataclasses.fields(Flux2Conditioning)] == ["prompt_embeds", "family",
                                                                        "encoder_identity", "prompts"]


# ---------------------------------------------------------------- nodes, without ComfyUI

def test_conditioning_bridge_nodes_round_trip(tiny_models):
    from flux2_accel import NODE_CLASS_MAPPINGS

    cond = _encoder(tiny_models.klein).encode("a cat")
    (native,) = NODE_CLASS_MAPPINGS["Flux2AccelToConditioning"]().convert(cond)
    (back,) = NODE_CLASS_MAPPINGS["Flux2AccelFromConditioning"]().convert(native)
    assert back.prompt_embeds is cond.prompt_embeds and back.family == "qwen3"


def test_model_bridge_outside_comfyui_says_so(tiny_models, monkeypatch):
    import builtins

    from flux2_accel import NODE_CLASS_MAPPINGS
    from flux2_accel.optim.errors import Flux2AccelError
    from flux2_accel.optim.handle import ModelHandle

    real_import = builtins.__import__

    def no_comfy(name, *args, **kwargs):
        if name == "comfy" or name.startswith("comfy."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_comfy)
    handle = ModelHandle(source=str(tiny_models.files["dev_comfy"]))
    with pytest.raises(Flux2AccelError, match="only inside ComfyUI"):
        NODE_CLASS_MAPPINGS["Flux2AccelToModel"]().convert(handle)


def test_only_comfyuis_unloads_release_not_its_reloading_detaches(tiny_models, monkeypatch):
    """ComfyUI detaches a model with unpatch_all=False before loading it again (every run) and when a patcher is
    collected: the store and the module's weights stay. An unload (unpatch_all=True) releases both."""
    import types

    from flux2_accel.nodes import comfy_services, native_model
    from flux2_accel.optim.handle import ModelHandle
    from flux2_accel.optim.run.store import STORE

    monkeypatch.setattr(comfy_services, "_free_memory_callbacks", [])
    handle = ModelHandle(source=str(tiny_models.files["dev_comfy"]))
    transformer = STORE.transformer(handle)
    module = types.SimpleNamespace(transformer=transformer, running=False)
    patcher = types.SimpleNamespace(model=types.SimpleNamespace(diffusion_model=module))
    native_model._on_detach(patcher, False)
    assert len(STORE) == 1 and module.transformer is transformer
    native_model._on_detach(patcher, True)
    assert len(STORE) == 0 and module.transformer is None


def test_unloading_a_pack_model_releases_the_store_without_patching_comfyui(tiny_models, monkeypatch):
    """ComfyUI unloading one of the pack's models (its ModelPatcher's ON_DETACH) empties the pack's store and runs
    the on_free_memory callbacks; comfy.model_management is left as it is."""
    import types

    from flux2_accel.nodes import comfy_services, native_model
    from flux2_accel.optim.handle import ModelHandle
    from flux2_accel.optim.run.store import STORE

    def unload_all_models():
        return None

    fake_mm = types.SimpleNamespace(unload_all_models=unload_all_models)
    monkeypatch.setattr(comfy_services, "_mm", fake_mm)
    monkeypatch.setattr(comfy_services, "_free_memory_callbacks", [])  # this test's hook only, removed after
    calls = []
    comfy_services.on_free_memory(lambda: calls.append("hook"))
    STORE.transformer(ModelHandle(source=str(tiny_models.files["dev_comfy"])))
    assert len(STORE) == 1
    native_model.released()
    assert len(STORE) == 0 and calls == ["hook"]
    assert fake_mm.unload_all_models is unload_all_models  # nothing wrapped
