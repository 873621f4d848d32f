"""torch.compile feature: no recompiles across prompt/seed/steps/guidance/cache/LoRA changes (dynamo's counters),
one recompile per block kind at the first size change, compiled == eager, LoRA strengths seen by compiled code, eager
fallback when compiling fails, eager handles untouched, the VAE decoder, the cache folder, the node.

Most tests compile with backend="eager" (dynamo traces and guards exactly as with inductor, without code generation:
seconds instead of minutes on 2 cores) through the same code path; one aot_eager test checks numerics through
AOTAutograd. The inductor tests (cold/warm compile in fresh processes, the bench's compile row) need a C++
compiler, as inductor on a CPU does: about half a minute together.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch
from flux2_accel.optim.errors import InputError
from flux2_accel.optim.features import compile as compiling
from flux2_accel.optim.features.api import RunReport
from flux2_accel.optim.features.caching import CacheSettings
from flux2_accel.optim.features.compile import CompileSettings, graph_count, vae_decoder_compiled
from flux2_accel.optim.features.lora import LoraSpec
from flux2_accel.optim.handle import ModelHandle
from flux2_accel.optim.models import tiny
from flux2_accel.optim.models.text_encoding import Flux2Conditioning
from flux2_accel.optim.run.latents import decode
from flux2_accel.optim.run.sampling import SamplingParams, sample
from flux2_accel.optim.run.store import ModelStore
from safetensors.torch import save_file

pytestmark = pytest.mark.usefixtures("comfyui_inference_mode", "one_torch_thread")  # inference mode: as ComfyUI runs prompts

EAGER = CompileSettings(backend="eager")
BLOCK_KINDS = 2  # Flux2TransformerBlock, Flux2SingleTransformerBlock: one graph each, shared by every block


@pytest.fixture(autouse=True)
def pack_cache_folder(tmp_path_factory, monkeypatch):
    """Compile caches in a test folder; the process environment is restored afterwards."""
    base = tmp_path_factory.getbasetemp()
    monkeypatch.setenv(compiling.CACHE_ENV, str(base / "compile-cache"))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(base / "inductor-before"))  # restored after the test
    monkeypatch.setattr(compiling, "_configured", {"inductor_dir": None, "root": None, "mega_loaded": set()})


def tiny_lora(transformer, seed: int) -> dict:
    """A rank-2 diffusers-format LoRA on every block linear layer."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, w in transformer.state_dict().items():
        if name.endswith(".weight") and w.ndim == 2 and "blocks" in name:
            n, k = w.shape
            out[f"transformer.{name[:-7]}.lora_A.weight"] = torch.randn(2, k, generator=g) * 0.3
            out[f"transformer.{name[:-7]}.lora_B.weight"] = torch.randn(n, 2, generator=g) * 0.3
    return out


class Session:
    """A shared tiny transformer in its own store, sampled through every registered feature like the sampler."""

    def __init__(self, tmp_path, seed=3):
        self.transformer = tiny.build_transformer(tiny.TINY, seed=seed)
        self.vae = tiny.build_vae(tiny.TINY, seed=4)
        self.store = ModelStore()
        self.base = ModelHandle(source=str(tmp_path / f"tiny{seed}.safetensors"), family="dev")
        self.store.get(self.base.base_key, lambda: self.transformer)
        self.lora_path = str(tmp_path / f"lora{seed}.safetensors")
        save_file(tiny_lora(self.transformer, seed + 10), self.lora_path)
        g = torch.Generator().manual_seed(seed)
        dim = self.transformer.config.joint_attention_dim
        self.prompts = [Flux2Conditioning(torch.randn(1, 16, dim, generator=g), "mistral") for _ in range(2)]

    def lora(self, strength=1.0, enabled=True):
        return (LoraSpec(self.lora_path, strength, enabled),)

    def run(self, compile=EAGER, loras=(), cache=None, prompt=0, width=64, height=64, steps=2, guidance=4.0,
            seed=0, inspect=None):
        handle = self.base.replace(compile=compile, loras=loras, cache=cache)
        report = RunReport(params=SamplingParams(width, height, steps, guidance, seed, 1))
        with self.store.prepared(handle, report) as transformer:
            if inspect is not None:
                inspect(transformer)
            latent = sample(transformer, self.vae, self.prompts[prompt], report.params)
        return latent, report.stats


def blocks(transformer):
    return list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks)


def assert_eager(transformer):
    assert all(module._compiled_call_impl is None for module in [transformer, *blocks(transformer)])


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    return Session(tmp_path_factory.mktemp("compile"))


# ---------------------------------------------------------------- recompiles

def test_no_recompiles_across_prompt_seed_steps_guidance_cache_and_lora_changes(session):
    torch._dynamo.reset()
    fbcache = CacheSettings("fbcache", 0.1)
    # Each LoRA configuration (none loaded, adapter on, adapter off) traces once: after that, nothing may compile.
    _, first = session.run()
    assert first["compile"]["compiled"] and first["compile"]["graphs"] == BLOCK_KINDS
    assert first["compile"]["recompiles"] == 0 and first["compile"]["fallback"] is None
    session.run(loras=session.lora(1.0))
    session.run(loras=session.lora(1.0, enabled=False))

    before = graph_count()
    changes = [
        dict(loras=session.lora(1.0)),
        dict(loras=session.lora(1.0), prompt=1),
        dict(loras=session.lora(1.0), seed=7),
        dict(loras=session.lora(1.0), steps=3),
        dict(loras=session.lora(1.0), guidance=2.5),
        dict(loras=session.lora(1.0), cache=fbcache),
        dict(loras=session.lora(1.0), cache=CacheSettings("fbcache", 0.3)),
        dict(loras=session.lora(1.0), cache=CacheSettings("teacache", 0.2)),
        dict(loras=session.lora(0.5)),
        dict(loras=session.lora(-0.7), cache=fbcache),
        dict(loras=session.lora(0.5, enabled=False)),  # LoRA switched off ...
        dict(loras=session.lora(0.2)),  # ... and on again
        dict(),  # no LoRA at all
    ]
    outputs = []
    for change in changes:
        latent, stats = session.run(**change)
        outputs.append(latent)
        assert stats["compile"]["graphs"] == 0 and stats["compile"]["recompiles"] == 0, change
        assert stats["compile"]["compiled"] and stats["compile"]["fallback"] is None
    assert graph_count() == before  # dynamo's own counter: not one graph compiled during the sequence
    assert not torch.equal(outputs[0], outputs[8])  # strength 1.0 vs 0.5: the compiled code saw the change
    assert not torch.equal(outputs[8], outputs[10])  # on vs off
    assert torch.equal(outputs[10], outputs[12])  # switched off == no LoRA: the exact base


def test_new_resolution_recompiles_once_per_block_kind(tmp_path):
    torch._dynamo.reset()
    s = Session(tmp_path, seed=5)
    _, stats = s.run(width=64, height=64)
    assert stats["compile"]["graphs"] == BLOCK_KINDS and stats["compile"]["recompiles"] == 0
    _, stats = s.run(width=96, height=64)  # first new size: sizes become symbolic, once per block kind
    assert stats["compile"]["recompiles"] == BLOCK_KINDS
    before = graph_count()
    for width, height in ((128, 96), (64, 128), (160, 64), (64, 64)):
        _, stats = s.run(width=width, height=height)
        assert stats["compile"]["graphs"] == 0, (width, height)
    assert graph_count() == before


def test_full_scope_with_a_step_cache_compiles_the_blocks_without_recompiles(session):
    full = CompileSettings(backend="eager", scope="full")
    _, stats = session.run(compile=full)
    assert stats["compile"]["scope"] == "full" and stats["compile"]["compiled"]
    _, stats = session.run(compile=full, cache=CacheSettings("fbcache", 0.1))
    # A whole-forward graph would guard on the cache's per-run state: the blocks compile instead.
    assert stats["compile"]["scope"] == "regional" and "cache" in stats
    before = graph_count()
    for cache in (CacheSettings("fbcache", 0.1), CacheSettings("fbcache", 0.3), CacheSettings("teacache", 0.2), None):
        _, stats = session.run(compile=full, cache=cache, seed=11)
        assert stats["compile"]["graphs"] == 0, cache
    assert graph_count() == before


@pytest.mark.parametrize("scope", ["full", "regional"])
def test_a_bf16_model_compiles_once_with_its_float32_latents(tmp_path, scope):
    """A bf16 transformer samples with the float32-latent hook on it during each run (sampling.py): the compiled
    code is reused by the next runs (new seed, prompt, steps), nothing recompiles, and the result is the eager
    one."""
    bf16 = Session(tmp_path, seed=5)
    bf16.transformer.to(torch.bfloat16)
    bf16.prompts = [Flux2Conditioning(p.prompt_embeds.to(torch.bfloat16), "mistral") for p in bf16.prompts]
    settings = CompileSettings(backend="eager", scope=scope)
    eager, _ = bf16.run(compile=None, seed=2)
    compiled, stats = bf16.run(compile=settings, seed=2)
    assert stats["compile"]["compiled"] and stats["compile"]["scope"] == scope
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    before = graph_count()
    for seed, prompt, steps in ((3, 0, 2), (4, 1, 2), (5, 1, 3)):
        _, stats = bf16.run(compile=settings, seed=seed, prompt=prompt, steps=steps)
        assert stats["compile"]["graphs"] == 0, (seed, prompt, steps)
    assert graph_count() == before


def test_interrupted_run_leaves_the_module_eager(session):
    from flux2_accel.optim.errors import Interrupted

    handle = session.base.replace(compile=EAGER)
    report = RunReport(params=SamplingParams(64, 64, 3, 4.0, 0, 1))
    with pytest.raises(Interrupted):
        with session.store.prepared(handle, report) as transformer:
            sample(transformer, session.vae, session.prompts[0], report.params, should_interrupt=lambda: True)
    assert_eager(session.transformer)
    assert report.stats["compile"]["compiled"]


# ---------------------------------------------------------------- numerics and LoRA

def test_compiled_matches_eager_and_follows_lora_strength(session):
    settings = CompileSettings(backend="aot_eager")  # through AOTAutograd, as inductor is
    compiled, eager = {}, {}
    for strength in (1.0, 0.3):
        compiled[strength], stats = session.run(compile=settings, loras=session.lora(strength))
        assert stats["compile"]["compiled"] and stats["compile"]["recompiles"] == 0
        eager[strength], stats = session.run(compile=None, loras=session.lora(strength))
        assert "compile" not in stats
    for strength in compiled:
        torch.testing.assert_close(compiled[strength], eager[strength], atol=1e-5, rtol=1e-4)
    assert (compiled[1.0] - compiled[0.3]).abs().max() > 1e-2  # no stale weights after the strength change


def test_eager_handle_runs_eager_and_switching_back_reuses_compiled_code(session):
    compiled, _ = session.run()
    seen = []
    eager, stats = session.run(compile=None, inspect=lambda t: seen.append(
        [m._compiled_call_impl for m in [t, *blocks(t)]]))
    assert seen == [[None] * (1 + len(blocks(session.transformer)))] and "compile" not in stats
    assert torch.equal(compiled, eager)
    before = graph_count()
    _, stats = session.run()
    assert stats["compile"]["graphs"] == 0 and graph_count() == before
    assert_eager(session.transformer)  # compiled code is installed only for the duration of a run


# ---------------------------------------------------------------- fallback

def _broken_backend(gm, example_inputs):
    raise RuntimeError("no working C++ compiler found")


def test_compile_failure_warns_once_and_runs_eager(session, caplog):
    settings = CompileSettings(backend=_broken_backend, scope="full")
    expected, _ = session.run(compile=None)
    with caplog.at_level(logging.WARNING, logger="flux2_accel"):
        for _ in range(2):
            latent, stats = session.run(compile=settings)
            torch.testing.assert_close(latent, expected, atol=0, rtol=0)
            assert not stats["compile"]["compiled"]
            assert "no working C++ compiler found" in stats["compile"]["fallback"]
            assert_eager(session.transformer)
    warnings = [r for r in caplog.records if "torch.compile failed" in r.getMessage()]
    assert len(warnings) == 1 and "running eager" in warnings[0].getMessage()


def test_fullgraph_with_a_graph_break_falls_back(tmp_path, caplog):
    s = Session(tmp_path, seed=6)
    block = s.transformer.single_transformer_blocks[0]
    block.register_forward_pre_hook(lambda module, args: torch._dynamo.graph_break())
    expected, _ = s.run(compile=None)
    with caplog.at_level(logging.WARNING, logger="flux2_accel"):
        latent, stats = s.run(compile=CompileSettings(backend="eager", fullgraph=True))
    assert torch.equal(latent, expected) and stats["compile"]["fallback"]
    assert any("torch.compile failed" in r.getMessage() for r in caplog.records)


def test_graph_breaks_without_fullgraph_compile_around_them_and_warn_once(tmp_path, caplog):
    s = Session(tmp_path, seed=7)
    s.transformer.single_transformer_blocks[0].register_forward_pre_hook(
        lambda module, args: torch._dynamo.graph_break())  # as a layer dynamo cannot trace (some quantized ones)
    expected, _ = s.run(compile=None)
    with caplog.at_level(logging.WARNING, logger="flux2_accel"):
        for _ in range(2):
            latent, stats = s.run(compile=CompileSettings(backend="eager", dynamic="true"))
            assert torch.equal(latent, expected) and stats["compile"]["compiled"]
    notes = [r for r in caplog.records if "graph break" in r.getMessage()]
    assert len(notes) == 1


def test_errors_eager_raises_too_propagate_and_keep_compiled_code(session):
    handle = session.base.replace(compile=EAGER)
    block = session.transformer.single_transformer_blocks[0]
    with session.store.prepared(handle, RunReport()):
        with pytest.raises(RuntimeError):  # wrong hidden size: the call's own error, not compile's
            block(hidden_states=torch.randn(1, 8, 3), encoder_hidden_states=None,
                  temb_mod=torch.randn(1, 3 * 3 * 32), image_rotary_emb=None)
    _, stats = session.run()
    assert stats["compile"]["compiled"] and stats["compile"]["fallback"] is None


def test_quantized_nf4_blocks_compile_and_match_eager():
    from flux2_accel.optim.handle import ModelHandle as Handle
    from flux2_accel.optim.models.precision import apply_precision

    model = apply_precision(tiny.build_transformer(tiny.TINY, seed=8, dtype=torch.bfloat16), "nf4")
    inputs = tiny.forward_inputs(model)
    handle = Handle(source="<tiny nf4>", precision="nf4", compile=EAGER)
    with torch.no_grad():
        expected = model(**inputs)[0]
        for run in range(2):
            report = RunReport()
            with compiling.activate(None, model, handle, report):
                out = model(**inputs)[0]
            assert torch.equal(out, expected)
            assert report.stats["compile"]["compiled"] and report.stats["compile"]["recompiles"] == 0
            assert (report.stats["compile"]["graphs"] > 0) == (run == 0)


# ---------------------------------------------------------------- VAE decoder

def test_vae_decoder_compiled_on_request(session):
    latent = torch.randn(1, 4 * 4, 4, 4, generator=torch.Generator().manual_seed(1))
    expected = decode(session.vae, latent)
    report = RunReport()
    with vae_decoder_compiled(session.vae, EAGER, report):  # not asked for: eager
        assert session.vae.decoder._compiled_call_impl is None
    assert "compile_vae" not in report.stats
    settings = CompileSettings(backend="eager", compile_vae_decoder=True)
    for graphs in ("first", "again"):
        with vae_decoder_compiled(session.vae, settings, report):
            assert session.vae.decoder._compiled_call_impl is not None
            image = decode(session.vae, latent)
        torch.testing.assert_close(image, expected, atol=1e-6, rtol=0)
        assert report.stats["compile_vae"]["compiled"]
        assert (report.stats["compile_vae"]["graphs"] > 0) == (graphs == "first")
    assert session.vae.decoder._compiled_call_impl is None


# ---------------------------------------------------------------- caches

def test_cache_folder_from_env_settings_or_temp(tmp_path, monkeypatch):
    root = compiling.configure_caches("")
    assert root == Path(os.environ[compiling.CACHE_ENV])
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str((root / "inductor").resolve())
    monkeypatch.delenv(compiling.CACHE_ENV)
    chosen = tmp_path / "user" / "flux2-accel" / "compile-cache"
    assert compiling.configure_caches(str(chosen)) == chosen
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str((chosen / "inductor").resolve())
    assert (chosen / "inductor").is_dir()
    monkeypatch.setenv(compiling.CACHE_ENV, str(tmp_path / "env"))  # the environment wins over the node's folder
    assert compiling.configure_caches(str(chosen)) == tmp_path / "env"


def test_unusable_cache_folder_only_costs_persistence(session, tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv(compiling.CACHE_ENV, str(blocker / "cache"))
    monkeypatch.setattr(compiling, "_notes", {})
    with caplog.at_level(logging.WARNING, logger="flux2_accel"):
        _, stats = session.run()
    assert stats["compile"]["compiled"] and "compile cache folder unusable" in caplog.text


def test_users_own_inductor_cache_dir_is_kept(tmp_path, monkeypatch):
    monkeypatch.delenv(compiling.CACHE_ENV)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert compiling.configure_caches("") is None
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")


def test_mega_cache_loads_only_trusted_files_and_survives_bad_ones(tmp_path, caplog):
    folder = tmp_path / compiling.MEGA_CACHE_DIR
    folder.mkdir()
    shared, garbage = folder / "1-1.bin", folder / "2-2.bin"
    shared.write_bytes(b"written by someone else")
    shared.chmod(0o666)
    garbage.write_bytes(b"not a cache")
    garbage.chmod(0o600)
    with caplog.at_level(logging.WARNING, logger="flux2_accel"):
        assert compiling.load_mega_cache(tmp_path) == 0  # neither is loaded, and neither is an error
        assert "writable by others" in caplog.text and "could not be loaded" in caplog.text
        caplog.clear()
        assert compiling.load_mega_cache(tmp_path) == 0 and not caplog.text  # once per process


# ---------------------------------------------------------------- settings and node

def test_settings_validation_names_the_field():
    for bad, field in ((CompileSettings(scope="partial"), "scope"), (CompileSettings(mode="fast"), "mode"),
                       (CompileSettings(dynamic="yes"), "dynamic"), (CompileSettings(backend=" "), "backend"),
                       (CompileSettings(backend="indcutor"), "backend 'indcutor'")):
        with pytest.raises(InputError, match=field):
            bad.validate()
    assert "mode" not in CompileSettings(backend="eager", mode="max-autotune").torch_compile_kwargs()
    assert CompileSettings(mode="max-autotune").torch_compile_kwargs()["mode"] == "max-autotune"
    assert CompileSettings(dynamic="false").torch_compile_kwargs()["dynamic"] is False


def test_node_returns_a_new_handle_and_leaves_its_input_alone():
    from flux2_accel.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
    from flux2_accel.nodes.compile import Flux2AccelCompile

    assert NODE_CLASS_MAPPINGS["Flux2AccelCompile"] is Flux2AccelCompile
    assert NODE_DISPLAY_NAME_MAPPINGS["Flux2AccelCompile"] == "Torch Compile (FLUX.2)"
    inputs = Flux2AccelCompile.INPUT_TYPES()["required"]
    assert all("tooltip" in options for _, options in inputs.values())
    handle = ModelHandle(source="/models/flux2.safetensors", family="dev")
    (out,) = Flux2AccelCompile().apply(handle, "full", "max-autotune", "true", True, " inductor ", True)
    assert handle.compile is None and out is not handle
    assert out.compile == CompileSettings("full", "max-autotune", "true", True, "inductor", True, "")
    assert out.replace(compile=None) == handle
    with pytest.raises(InputError, match="mode"):
        Flux2AccelCompile().apply(handle, "regional", "turbo", "auto", False, "inductor", False)


# ---------------------------------------------------------------- inductor (needs a C++ compiler; ~20 s here)

def test_inductor_cold_and_warm_compile_in_fresh_processes(tmp_path):
    from flux2_accel.optim.bench.compile_time import cold_and_warm

    result = cold_and_warm("tiny", 64, 64, cache_dir=str(tmp_path / "cache"))
    assert result["fallback"] is None
    assert list((tmp_path / "cache" / compiling.MEGA_CACHE_DIR).glob("*.bin"))
    assert (tmp_path / "cache" / "inductor" / "fxgraph").is_dir()
    assert result["warm_s"] < result["cold_s"]
