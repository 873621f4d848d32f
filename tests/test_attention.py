"""attention_backend: diffusers' dispatcher switched per run, SDPA fallback with one warning naming the reason, the
`auto` rule, the loader's widget, and composition with the step cache and compile."""

from __future__ import annotations

import logging

import pytest
import torch
from flux2_accel.optim.errors import InputError
from flux2_accel.optim.features import attention
from flux2_accel.optim.features.caching import CacheSettings
from flux2_accel.optim.features.compile import CompileSettings, graph_count
from flux2_accel.optim.features.registry import FEATURES
from flux2_accel.optim.handle import ModelHandle, VaeHandle
from flux2_accel.optim.models import tiny
from flux2_accel.optim.models.text_encoding import Flux2Conditioning
from flux2_accel.optim.run import engine
from flux2_accel.optim.run.sampling import SamplingParams
from flux2_accel.optim.run.store import ModelStore
from test_nodes import models_dir, node, widgets  # noqa: F401  (models_dir is a fixture)

PARAMS = SamplingParams(width=64, height=64, steps=4, guidance=4.0, seed=1)
NOT_SDPA = ("cudnn", "flash", "sage")


@pytest.fixture(scope="module")
def parts():
    comps = tiny.build_components(tiny.TINY, seed=5)
    comps.transformer.to(torch.bfloat16)
    model, vae = ModelHandle("<attention test transformer>", family="dev"), VaeHandle("<attention test vae>")
    cond = Flux2Conditioning(torch.randn(1, 8, comps.transformer.config.joint_attention_dim,
                                         generator=torch.Generator().manual_seed(0)), "mistral")
    return comps, model, vae, cond


def store_for(parts, features=None) -> ModelStore:
    comps, model, vae, _ = parts
    store = ModelStore(features=features)
    store.get(model.base_key, lambda: comps.transformer)
    store.get(vae.base_key, lambda: comps.vae)
    return store


def run(parts, store, params=PARAMS, **fields):
    _, model, vae, cond = parts
    return engine.run(model.replace(**fields), vae, cond, params, store=store, device="cpu", decode=False)


@pytest.fixture
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(attention, "_warned", set())


def fallback_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "falls back to sdpa" in r.getMessage()]


# ---------------------------------------------------------------- resolution

@pytest.mark.parametrize("name", NOT_SDPA)
def test_on_a_cpu_every_choice_but_sdpa_falls_back_and_says_why(name):
    resolved = attention.resolve(name, "cpu")
    assert resolved.backend == "native" and f"'{name}' attention needs a CUDA GPU" in resolved.fallback


@pytest.mark.parametrize("name", ("sdpa", "auto"))
def test_sdpa_and_auto_are_native_sdpa_on_a_cpu(name):
    assert attention.resolve(name, "cpu") == attention.Resolved(name, "native", None)


def fake_gpu(monkeypatch, capability, flash=False, flash3=False, sage=False, cudnn=True):
    monkeypatch.setattr(attention, "_capability", lambda device: capability)
    monkeypatch.setattr(attention, "_installed", lambda: {"flash": flash, "flash3": flash3, "sage": sage})
    monkeypatch.setattr(torch.backends.cudnn, "is_available", lambda: cudnn)


@pytest.mark.parametrize("capability, flash3, cudnn, expected", [
    ((9, 0), True, True, "_flash_3"),  # H100/H200 with flash-attn 3
    ((9, 0), False, True, "_native_cudnn"),  # Hopper without it: torch's cuDNN kernel
    ((9, 0), False, False, "native"),
    ((8, 9), True, True, "native"),  # Ada: torch's own choice
    ((8, 0), False, True, "native"),
    ((10, 0), True, True, "native"),  # Blackwell: not measured yet, SDPA
])
def test_auto_picks_the_fastest_exact_backend_of_the_device(monkeypatch, capability, flash3, cudnn, expected):
    fake_gpu(monkeypatch, capability, flash3=flash3, cudnn=cudnn)
    resolved = attention.resolve("auto", "cuda")
    assert (resolved.backend, resolved.fallback) == (expected, None)


def test_auto_never_picks_sage(monkeypatch):
    fake_gpu(monkeypatch, (9, 0), flash=True, flash3=False, sage=True, cudnn=False)
    assert attention.resolve("auto", "cuda").backend == "native"


@pytest.mark.parametrize("name, installed, expected, reason", [
    ("flash", {}, "native", "needs the flash-attn package"),
    ("flash", {"flash": True}, "flash", None),
    ("flash", {"flash": True, "flash3": True}, "_flash_3", None),
    ("sage", {}, "native", "needs the sageattention package"),
    ("sage", {"sage": True}, "sage", None),
    ("cudnn", {}, "_native_cudnn", None),
])
def test_each_choice_on_a_hopper_gpu(monkeypatch, name, installed, expected, reason):
    fake_gpu(monkeypatch, (9, 0), **installed)
    resolved = attention.resolve(name, "cuda")
    assert resolved.backend == expected
    assert (resolved.fallback is None) if reason is None else (reason in resolved.fallback)


def test_old_gpus_and_fp32_models_fall_back_with_the_reason(monkeypatch):
    fake_gpu(monkeypatch, (7, 5), flash=True, sage=True)
    assert "compute capability 8.0+; this GPU has 7.5" in attention.resolve("flash", "cuda").fallback
    fake_gpu(monkeypatch, (8, 6), flash=True, sage=True)
    assert "bf16/fp16 only" in attention.resolve("sage", "cuda", torch.float32).fallback
    assert attention.resolve("flash", "cuda", torch.float32).backend == "native"


def test_flash_on_ampere_is_flash_attn_2_even_with_flash_attn_3(monkeypatch):
    fake_gpu(monkeypatch, (8, 0), flash=True, flash3=True)
    assert attention.resolve("flash", "cuda").backend == "flash"


def test_unknown_names_are_refused_naming_the_setting():
    with pytest.raises(InputError, match="attention_backend is 'xformers'.*auto, sdpa, cudnn, flash, sage"):
        attention.resolve("xformers", "cpu")


def test_diffusers_refusing_a_backend_falls_back_to_sdpa_with_its_reason(fresh_warnings, caplog):
    # flash-attn is not installed here: diffusers' own requirement check refuses 'flash'.
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    before = _AttentionBackendRegistry._active_backend
    with caplog.at_level(logging.WARNING, logger="flux2_accel"):
        with attention.backend_active(attention.Resolved("flash", "flash")) as used:
            assert used.backend == "native" and "diffusers refused 'flash'" in used.fallback
            assert _AttentionBackendRegistry._active_backend == "native"
    assert _AttentionBackendRegistry._active_backend == before  # put back afterwards
    assert len(fallback_warnings(caplog)) == 1 and "flash-attn" in fallback_warnings(caplog)[0]


# ---------------------------------------------------------------- the feature on a run

def test_the_feature_is_registered_after_the_others():
    assert FEATURES[-1] is attention.FEATURE and ModelHandle("x").attention_backend == "auto"


def test_every_fallback_warns_once_naming_the_reason_and_matches_sdpa_bit_for_bit(parts, fresh_warnings, caplog):
    store = store_for(parts)
    sdpa = run(parts, store, attention_backend="sdpa")
    assert sdpa.report.stats["attention"] == {"asked": "sdpa", "backend": "native", "fallback": None}
    with caplog.at_level(logging.WARNING, logger="flux2_accel"):
        for name in NOT_SDPA + ("auto",):
            for _ in range(2):  # the second run of a choice warns no more
                result = run(parts, store, attention_backend=name)
                assert torch.equal(result.latent, sdpa.latent), name
                assert result.report.stats["attention"]["backend"] == "native"
    warnings = fallback_warnings(caplog)
    assert len(warnings) == len(NOT_SDPA)  # one per choice; auto is sdpa here, no fallback
    for name, text in zip(NOT_SDPA, warnings):
        assert f"attention_backend '{name}' falls back to sdpa" in text and "needs a CUDA GPU" in text
    assert store.load_count == 2  # switching backends never reloads (the transformer and the VAE, once each)


def test_a_handle_with_an_unknown_backend_is_refused_before_sampling(parts):
    with pytest.raises(InputError, match="attention_backend is 'fast'"):
        run(parts, store_for(parts), attention_backend="fast")


def test_sdpa_with_fbcache_and_compile_composes_and_equals_no_backend_setting(parts):
    """The same handle through a store without the attention feature (no backend setting at all) and with it: the
    same latents bit for bit, the same skipped steps, and no recompile on the second run."""
    import torch._dynamo

    fields = dict(attention_backend="sdpa", cache=CacheSettings(method="fbcache", threshold=0.8, min_steps=0),
                  compile=CompileSettings(backend="aot_eager"))
    without = tuple(f for f in FEATURES if f is not attention.FEATURE)
    torch._dynamo.reset()
    try:
        plain = run(parts, store_for(parts, features=without), **fields)
        torch._dynamo.reset()
        store = store_for(parts)
        with_backend = run(parts, store, **fields)
        graphs = graph_count()
        again = run(parts, store, **fields)
        assert graph_count() == graphs  # reused: the backend does not make compiled code guard differently per run
    finally:
        torch._dynamo.reset()
    assert torch.equal(plain.latent, with_backend.latent) and torch.equal(again.latent, with_backend.latent)
    assert with_backend.report.stats["compile"]["compiled"] and with_backend.report.stats["attention"]["backend"] \
        == "native"
    assert with_backend.report.stats["cache"]["skipped_steps"] == plain.report.stats["cache"]["skipped_steps"] >= 1


# ---------------------------------------------------------------- the loader's widget

def test_the_loader_has_an_optional_attention_backend_widget_after_the_others():
    types = widgets("Flux2AccelLoadDiffusionModel")
    assert list(types["required"]) == ["model_name", "precision", "offload"]  # unchanged
    choices, opts = types["optional"]["attention_backend"]
    assert tuple(choices) == attention.BACKENDS and opts["default"] == "auto" and "sdpa" in opts["tooltip"]


def test_the_loader_puts_the_choice_on_the_handle_and_refuses_unknown_names(models_dir):  # noqa: F811
    loader = node("Flux2AccelLoadDiffusionModel")
    (old,) = loader.load("dev_comfy.safetensors", "bf16")  # a workflow saved before the widget existed
    (cudnn,) = loader.load("dev_comfy.safetensors", "bf16", "none", "cudnn")
    assert old.attention_backend == "auto" and cudnn.attention_backend == "cudnn"
    assert cudnn.base_key == old.base_key  # the same base weights: switching never reloads
    with pytest.raises(InputError, match="'attention_backend' is 'flash3': not one of the choices"):
        loader.load("dev_comfy.safetensors", "bf16", "none", "flash3")
