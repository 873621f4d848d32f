"""Step caching on FLUX.2: exactness when nothing is skipped, skip counts from real block executions, state
isolation between runs and handles, CFG branches, reference editing, diffusers' methods, calibration, the node."""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest
import torch
from flux2_accel.optim.errors import InputError, Interrupted
from flux2_accel.optim.features.api import RunReport
from flux2_accel.optim.features.caching import FEATURE, CacheSettings, parse_coefficients
from flux2_accel.optim.features.caching.calibrate import fit_coefficients, recording
from flux2_accel.optim.handle import ModelHandle
from flux2_accel.optim.models import tiny
from flux2_accel.optim.models.text_encoding import Flux2Conditioning
from flux2_accel.optim.run.sampling import SamplingParams, sample
from flux2_accel.optim.run.store import ModelStore

FAMILY_TE = {"dev": "mistral", "klein": "qwen3"}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def models():
    out = {}
    for spec in (tiny.TINY, tiny.TINY_KLEIN):
        transformer = tiny.build_transformer(spec, seed=3)
        vae = tiny.build_vae(spec, seed=4)
        g = torch.Generator().manual_seed(7)
        cond = Flux2Conditioning(torch.randn(1, 16, transformer.config.joint_attention_dim, generator=g),
                                 FAMILY_TE[spec.family])
        negative = Flux2Conditioning(torch.randn(1, 12, transformer.config.joint_attention_dim, generator=g),
                                     FAMILY_TE[spec.family])
        out[spec.family] = (transformer, vae, cond, negative)
    return out


@contextlib.contextmanager
def block_counter(transformer):
    """Real executions of the first double-stream block and the last single-stream block, seen from a layer inside
    each (diffusers' cache hooks skip a block by replacing its forward, so the block's own hooks still fire)."""
    counts = {"first": 0, "last": 0}
    probes = {"first": transformer.transformer_blocks[0].attn.to_q,
              "last": transformer.single_transformer_blocks[-1].attn.to_qkv_mlp_proj}
    hooks = [module.register_forward_pre_hook(lambda *a, key=key: counts.__setitem__(key, counts[key] + 1))
             for key, module in probes.items()]
    try:
        yield counts
    finally:
        for h in hooks:
            h.remove()


def cached_sample(transformer, vae, cond, params, settings, family="dev", **kwargs):
    handle = ModelHandle(source="/nonexistent/tiny.safetensors", cache=settings, family=family)
    report = RunReport(params=params)
    with FEATURE.activate(None, transformer, handle, report):
        latent = sample(transformer, vae, cond, params, **kwargs)
    return latent, report.stats.get("cache")


def assert_untouched(transformer):
    assert "forward" not in transformer.__dict__ and "cache_context" not in transformer.__dict__
    assert "forward" not in transformer.pos_embed.__dict__
    assert isinstance(transformer.transformer_blocks[0], type(transformer.transformer_blocks[-1]))
    assert len(transformer.transformer_blocks) == transformer.config.num_layers
    assert len(transformer.single_transformer_blocks) == transformer.config.num_single_layers
    assert not transformer.single_stream_modulation._forward_hooks
    assert not transformer.is_cache_enabled


P6 = SamplingParams(width=64, height=64, steps=6, guidance=4.0, seed=11)
# min_steps=0: these tests check the methods themselves, on runs shorter than the few-step rule's 6 steps too.
HIGH = dict(threshold=50.0, warmup_steps=1, max_consecutive_cached=2, min_steps=0)


def test_threshold_zero_leaves_module_alone_and_output_bit_identical(models):
    transformer, vae, cond, _ = models["dev"]
    base = sample(transformer, vae, cond, P6)
    latent, stats = cached_sample(transformer, vae, cond, P6, CacheSettings("fbcache", threshold=0.0))
    assert torch.equal(latent, base) and stats is None
    assert_untouched(transformer)


@pytest.mark.parametrize("method", ["fbcache", "teacache"])
@pytest.mark.parametrize("batch,reference", [(1, False), (2, False), (2, True)])
def test_nothing_skipped_is_bit_identical(models, method, batch, reference):
    """A threshold no step can meet runs every block through the cache adapter: the output must not move a bit."""
    transformer, vae, cond, _ = models["dev"]
    params = SamplingParams(width=64, height=48, steps=4, guidance=4.0, seed=2, batch_size=batch)
    extra = {"reference_images": torch.linspace(0, 1, 64 * 64 * 3).reshape(1, 64, 64, 3)} if reference else {}
    base = sample(transformer, vae, cond, params, **extra)
    with block_counter(transformer) as counts:
        latent, stats = cached_sample(transformer, vae, cond, params,
                                      CacheSettings(method, threshold=1e-12, min_steps=0), **extra)
    assert torch.equal(latent, base)
    assert stats["computed_steps"] == 4 and stats["skipped_steps"] == 0 and stats["total_steps"] == 4
    assert counts == {"first": 4, "last": 4}
    assert_untouched(transformer)


@pytest.mark.parametrize("method", ["fbcache", "teacache"])
def test_inference_mode_as_comfyui_runs_nodes(models, method):
    """ComfyUI executes nodes under torch.inference_mode(), whose tensors have no version counter: every method must
    run there and give the same output as outside it, skipping the same steps."""
    transformer, vae, cond, _ = models["dev"]
    outside, outside_stats = cached_sample(transformer, vae, cond, P6, CacheSettings(method, **HIGH))
    with torch.inference_mode():
        inside, inside_stats = cached_sample(transformer, vae, cond, P6, CacheSettings(method, **HIGH))
        nothing_skipped, _ = cached_sample(transformer, vae, cond, P6, CacheSettings(method, threshold=1e-12))
        base = sample(transformer, vae, cond, P6)
    counts = ("computed_steps", "skipped_steps", "total_steps")
    assert torch.equal(inside, outside) and inside_stats["skipped_steps"] > 0
    assert [inside_stats[k] for k in counts] == [outside_stats[k] for k in counts]
    assert torch.equal(nothing_skipped, base)
    assert_untouched(transformer)


def test_rotary_memo_recomputes_when_ids_change_in_place(models):
    from flux2_accel.optim.features.caching.blocks import rotary_memoized

    transformer = models["dev"][0]
    ids = torch.cartesian_prod(torch.arange(1), torch.arange(3), torch.arange(4), torch.arange(1))
    with torch.inference_mode():
        ids_inference = ids.clone()
    with rotary_memoized(transformer.pos_embed):
        for tensor in (ids, ids_inference):
            first = transformer.pos_embed(tensor)
            assert transformer.pos_embed(tensor) is first  # same ids: computed once
            with torch.inference_mode():
                tensor[:, 1] += 1  # same storage, new values
            changed = transformer.pos_embed(tensor)
            expected = transformer.pos_embed.__class__.forward(transformer.pos_embed, tensor)
            assert changed is not first and all(torch.equal(a, b) for a, b in zip(changed, expected))
    assert "forward" not in transformer.pos_embed.__dict__


@pytest.mark.parametrize("method,first_block_runs", [("fbcache", 6), ("teacache", 2)])
def test_high_threshold_skips_with_warmup_and_consecutive_limit(models, method, first_block_runs):
    transformer, vae, cond, _ = models["dev"]
    base = sample(transformer, vae, cond, P6)
    with block_counter(transformer) as counts:
        latent, stats = cached_sample(transformer, vae, cond, P6, CacheSettings(method, **HIGH))
    # step 0 warmup, 1-2 skipped, 3 forced by the consecutive limit, 4-5 skipped
    assert (stats["computed_steps"], stats["skipped_steps"], stats["total_steps"]) == (2, 4, 6)
    assert stats["timeline"] == {"cond": "CSSCSS"}
    assert counts == {"first": first_block_runs, "last": 2}
    assert stats["method"] == method and stats["estimated_time_saved_s"] >= 0.0
    assert not torch.equal(latent, base) and torch.isfinite(latent).all()
    assert (latent - base).abs().max() < 1.0  # reused residuals, not garbage
    assert_untouched(transformer)


def test_start_and_end_percent_bound_the_skipped_steps(models):
    transformer, vae, cond, _ = models["dev"]
    params = SamplingParams(width=64, height=64, steps=8, seed=1)
    settings = CacheSettings("fbcache", threshold=50.0, start_percent=0.25, end_percent=0.75, warmup_steps=0,
                             max_consecutive_cached=0)
    with block_counter(transformer) as counts:
        _, stats = cached_sample(transformer, vae, cond, params, settings)
    assert (stats["computed_steps"], stats["skipped_steps"]) == (4, 4)  # steps 2..5 skipped
    assert counts["last"] == 4


def test_stats_are_logged(models, caplog):
    transformer, vae, cond, _ = models["dev"]
    with caplog.at_level("INFO", logger="flux2_accel"):
        cached_sample(transformer, vae, cond, P6, CacheSettings("teacache", **HIGH))
    assert any("teacache computed 2, skipped 4 of 6" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("method", ["fbcache", "teacache"])
def test_klein_cfg_branches_keep_separate_state(models, method):
    transformer, vae, cond, negative = models["klein"]
    params = SamplingParams(width=64, height=64, steps=4, guidance=4.0, seed=3)
    base = sample(transformer, vae, cond, params, negative=negative)
    latent, stats = cached_sample(transformer, vae, cond, params,
                                  CacheSettings(method, threshold=1e-12, min_steps=0), family="klein",
                                  negative=negative)
    assert torch.equal(latent, base) and stats["total_steps"] == 8  # two calls per step
    with block_counter(transformer) as counts:
        _, stats = cached_sample(transformer, vae, cond, params,
                                 CacheSettings(method, threshold=50.0, warmup_steps=1, max_consecutive_cached=0,
                                               min_steps=0),
                                 family="klein", negative=negative)
    # Each branch computes its own first step: shared state would let "uncond" reuse the "cond" residual.
    assert (stats["computed_steps"], stats["skipped_steps"]) == (2, 6)
    assert stats["timeline"] == {"cond": "CSSS", "uncond": "CSSS"}
    assert counts["last"] == 2


@pytest.mark.parametrize("method", ["fbcache", "teacache"])
def test_state_resets_between_runs_sizes_and_batches(models, method):
    transformer, vae, cond, _ = models["dev"]
    settings = CacheSettings(method, **HIGH)
    runs = [SamplingParams(width=64, height=64, steps=6, seed=1),
            SamplingParams(width=80, height=48, steps=6, seed=1),
            SamplingParams(width=64, height=64, steps=5, seed=1, batch_size=2)]
    alone = [cached_sample(transformer, vae, cond, p, settings) for p in runs]
    again = [cached_sample(transformer, vae, cond, p, settings) for p in reversed(runs)][::-1]
    for (a, sa), (b, sb) in zip(alone, again):
        assert torch.equal(a, b) and sa == {**sb, "estimated_time_saved_s": sa["estimated_time_saved_s"]}


@pytest.mark.parametrize("method", ["fbcache", "teacache", "taylorseer"])
def test_interrupted_run_leaves_module_clean(models, method):
    transformer, vae, cond, _ = models["dev"]
    settings = CacheSettings(method, **HIGH)
    first, _ = cached_sample(transformer, vae, cond, P6, settings)
    steps_seen = []

    def stop_after_three():
        steps_seen.append(1)
        return len(steps_seen) >= 3

    with pytest.raises(Interrupted):
        cached_sample(transformer, vae, cond, P6, settings, should_interrupt=stop_after_three)
    assert_untouched(transformer)

    def fail(i, n, get):
        if i == 2:
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        cached_sample(transformer, vae, cond, P6, settings, on_step=fail)
    assert_untouched(transformer)
    again, stats = cached_sample(transformer, vae, cond, P6, settings)
    assert torch.equal(again, first) and stats["total_steps"] == 6


def test_two_cached_handles_do_not_share_state(models):
    transformer, vae, cond, _ = models["dev"]
    other_transformer, _, _, _ = models["klein"]
    a = CacheSettings("fbcache", **HIGH)
    b = CacheSettings("teacache", threshold=0.3, warmup_steps=2, max_consecutive_cached=1)
    alone_a, _ = cached_sample(transformer, vae, cond, P6, a)
    alone_b, _ = cached_sample(transformer, vae, cond, P6, b)
    plain = sample(transformer, vae, cond, P6)
    # Interleaved on the same base module, as two handles of one graph are.
    assert torch.equal(cached_sample(transformer, vae, cond, P6, b)[0], alone_b)
    assert torch.equal(cached_sample(transformer, vae, cond, P6, a)[0], alone_a)
    assert torch.equal(sample(transformer, vae, cond, P6), plain)
    # Two different modules cached at the same time keep their own runs.
    h1 = ModelHandle("/x/a", cache=a, family="dev")
    h2 = ModelHandle("/x/b", cache=b, family="klein")
    r1, r2 = RunReport(params=P6), RunReport(params=P6)
    with FEATURE.activate(None, transformer, h1, r1), FEATURE.activate(None, other_transformer, h2, r2):
        both_a = sample(transformer, vae, cond, P6)
    assert torch.equal(both_a, alone_a)
    assert r1.stats["cache"]["total_steps"] == 6 and r2.stats["cache"]["total_steps"] == 0


def test_store_prepared_applies_the_cache_feature(models):
    from flux2_accel.optim.features import registry as features

    assert "caching" in features.FEATURE_MODULES
    transformer, vae, cond, _ = models["dev"]
    store = ModelStore()
    handle = ModelHandle("/nonexistent/tiny.safetensors", family="dev")
    store.get(handle.base_key, lambda: transformer)
    cached = handle.replace(cache=CacheSettings("fbcache", **HIGH))
    report = RunReport(params=P6)
    with block_counter(transformer) as counts, store.prepared(cached, report) as live:
        assert live is transformer
        sample(live, vae, cond, P6)
    assert counts["last"] == 2 and report.stats["cache"]["skipped_steps"] == 4
    report = RunReport(params=P6)
    with store.prepared(handle, report) as live:
        assert torch.equal(sample(live, vae, cond, P6), sample(transformer, vae, cond, P6))
    assert "cache" not in report.stats


@pytest.mark.parametrize("variant", ["lora", "fp8_e4m3fn", "nf4"])
def test_cache_with_lora_and_quantized_weights(models, variant):
    from flux2_accel.optim.models.precision import apply_precision

    _, vae, cond, _ = models["dev"]
    transformer = tiny.build_transformer(tiny.TINY, seed=3)
    if variant == "lora":
        from peft import LoraConfig

        transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                           target_modules=["to_q", "to_k", "to_v", "to_qkv_mlp_proj"]))
    else:
        apply_precision(transformer, variant)
    base = sample(transformer, vae, cond, P6)
    exact, _ = cached_sample(transformer, vae, cond, P6, CacheSettings("fbcache", threshold=1e-12))
    assert torch.equal(exact, base)
    with block_counter(transformer) as counts:
        _, stats = cached_sample(transformer, vae, cond, P6, CacheSettings("teacache", **HIGH))
    assert stats["skipped_steps"] == 4 and counts["last"] == 2


@pytest.mark.parametrize("method", ["magcache", "taylorseer"])
def test_diffusers_methods_skip_and_clean_up(models, method):
    transformer, vae, cond, _ = models["dev"]
    params = SamplingParams(width=64, height=64, steps=8, seed=5)
    base = sample(transformer, vae, cond, params)
    settings = CacheSettings(method, threshold=1.0, warmup_steps=1, max_consecutive_cached=2)
    with block_counter(transformer) as counts:
        latent, stats = cached_sample(transformer, vae, cond, params, settings)
    assert stats["total_steps"] == 8 and stats["skipped_steps"] > 0
    assert counts["last"] == stats["computed_steps"]
    assert torch.isfinite(latent).all() and not torch.equal(latent, base)
    assert_untouched(transformer)
    assert torch.equal(sample(transformer, vae, cond, params), base)


def test_settings_validation():
    with pytest.raises(InputError, match="method"):
        CacheSettings("nope").validate()
    with pytest.raises(InputError, match="start_percent"):
        CacheSettings(start_percent=0.8, end_percent=0.5).validate()
    with pytest.raises(InputError, match="end_percent"):
        CacheSettings(end_percent=1.5).validate()
    assert parse_coefficients(" [1.5, -2e-1, 3] ") == (1.5, -0.2, 3.0) and parse_coefficients("") == ()
    with pytest.raises(InputError, match="calibrate-teacache"):
        parse_coefficients("1, x")


def test_custom_teacache_coefficients_change_decisions(models):
    transformer, vae, cond, _ = models["dev"]
    never = CacheSettings("teacache", threshold=0.5, warmup_steps=0, max_consecutive_cached=0,
                          coefficients=(1.0e6,))  # constant rescaled change far over the threshold
    always = CacheSettings("teacache", threshold=0.5, warmup_steps=0, max_consecutive_cached=0,
                           coefficients=(0.0,))
    assert cached_sample(transformer, vae, cond, P6, never)[1]["skipped_steps"] == 0
    assert cached_sample(transformer, vae, cond, P6, always)[1]["skipped_steps"] == 5


# ---------------------------------------------------------------- calibration

def test_fit_recovers_known_coefficients():
    rng = np.random.default_rng(0)
    known = (4.98651651e02, -2.83781631e02, 5.58554382e01, -3.82021401e00, 2.64230861e-01)  # TeaCache FLUX.1
    x = rng.uniform(0.02, 0.5, 400)
    y = np.poly1d(known)(x)
    assert np.allclose(fit_coefficients(x, y, 4), known, rtol=1e-6)
    noisy = y + rng.normal(0, 1e-4, x.shape)
    assert np.allclose(np.poly1d(fit_coefficients(x, noisy, 4))(x), y, atol=1e-3)
    with pytest.raises(InputError, match="samples"):
        fit_coefficients([0.1, 0.2], [0.1, 0.2], 4)


def test_recording_pairs_each_branch_with_its_own_previous_call(models):
    transformer, vae, cond, negative = models["klein"]
    samples = []
    params = SamplingParams(width=64, height=64, steps=4, guidance=4.0, seed=3)
    base = sample(transformer, vae, cond, params, negative=negative)
    with recording(transformer, samples):
        latent = sample(transformer, vae, cond, params, negative=negative)
    assert torch.equal(latent, base)  # recording observes, it never changes the run
    assert len(samples) == 2 * (4 - 1) and all(x > 0 and y > 0 for x, y in samples)
    assert_untouched(transformer)


def test_calibrate_command_demo(tmp_path):
    from flux2_accel.optim.cli import main as cli

    out = tmp_path / "coef.json"
    assert cli.main(["calibrate-teacache", "--demo", "--steps", "4", "--seeds", "1", "--prompt", "a dog",
                     "--prompt", "a cat", "--degree", "2", "--device", "cpu", "-o", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["samples"] == 6 and len(result["coefficients"]) == 3 and result["family"] == "dev"
    assert np.allclose(result["coefficients"], np.polyfit(result["x"], result["y"], 2))


# ---------------------------------------------------------------- few-step runs (the shared gate's min_steps rule)


def diffusers_cache_run(models, settings, params):
    """The diffusers-side step cache (FEATURE on Flux2Transformer2DModel): (latent, uncached latent, cache stats)."""
    transformer, vae, cond, _ = models["dev"]
    latent, stats = cached_sample(transformer, vae, cond, params, settings)
    assert_untouched(transformer)
    return latent, sample(transformer, vae, cond, params), stats


# Every step cache the few-step rule must hold for: name -> (methods, run(models, settings, params)). The rule
# lives in decision.py's SkipGate, so a cache built on it (the native-MODEL cache on ComfyUI's layout) joins here
# with its own runner returning (latent, uncached latent, stats).
CACHE_INSTALLERS = {
    "diffusers": (("fbcache", "teacache", "magcache", "taylorseer"), diffusers_cache_run),
}
# A threshold at which each method skips on the tiny random-weight model.
SKIPPING = {"fbcache": 50.0, "teacache": 50.0, "magcache": 1.0, "taylorseer": 1.0}
FEW_STEPS_NOTE = "run has 4 steps (< 6): nothing skipped; set min_steps to 0 to cache anyway"


def installer_cases():
    return [pytest.param(name, method, id=f"{name}-{method}")
            for name, (methods, _) in CACHE_INSTALLERS.items() for method in methods]


def skipping_settings(method, **overrides):
    return CacheSettings(method, threshold=SKIPPING[method], warmup_steps=1, max_consecutive_cached=2, **overrides)


@pytest.mark.parametrize("installer,method", installer_cases())
def test_four_step_run_skips_nothing_by_default_and_says_so_once(models, installer, method):
    run = CACHE_INSTALLERS[installer][1]
    params = SamplingParams(width=64, height=64, steps=4, seed=5)
    latent, uncached, stats = run(models, skipping_settings(method), params)
    assert (stats["computed_steps"], stats["skipped_steps"], stats["total_steps"]) == (4, 0, 4)
    assert stats["note"] == FEW_STEPS_NOTE
    from flux2_accel.optim.run.engine import format_stats

    assert sum("min_steps" in line for line in format_stats({"cache": stats})) == 1
    assert torch.equal(latent, uncached)  # no method ran: exactly the uncached run


@pytest.mark.parametrize("installer,method", installer_cases())
def test_four_step_run_skips_with_min_steps_zero(models, installer, method):
    run = CACHE_INSTALLERS[installer][1]
    params = SamplingParams(width=64, height=64, steps=4, seed=5)
    latent, uncached, stats = run(models, skipping_settings(method, min_steps=0), params)
    assert stats["skipped_steps"] > 0 and stats["total_steps"] == 4 and "note" not in stats
    assert not torch.equal(latent, uncached)


@pytest.mark.parametrize("installer,method", installer_cases())
def test_six_step_run_is_not_affected_by_the_rule(models, installer, method):
    run = CACHE_INSTALLERS[installer][1]
    params = SamplingParams(width=64, height=64, steps=6, seed=5)
    by_default, _, default_stats = run(models, skipping_settings(method), params)
    any_length, _, any_stats = run(models, skipping_settings(method, min_steps=0), params)
    assert default_stats["skipped_steps"] > 0 and "note" not in default_stats
    assert torch.equal(by_default, any_length)
    counts = ("computed_steps", "skipped_steps", "total_steps")
    assert [default_stats[k] for k in counts] == [any_stats[k] for k in counts]


def test_klein_four_step_cfg_run_skips_nothing_in_either_branch(models):
    transformer, vae, cond, negative = models["klein"]
    params = SamplingParams(width=64, height=64, steps=4, guidance=4.0, seed=3)
    latent, stats = cached_sample(transformer, vae, cond, params, skipping_settings("fbcache"), family="klein",
                                  negative=negative)
    assert (stats["computed_steps"], stats["skipped_steps"], stats["total_steps"]) == (8, 0, 8)
    assert stats["note"] == FEW_STEPS_NOTE  # the note counts sampling steps, not transformer calls
    assert torch.equal(latent, sample(transformer, vae, cond, params, negative=negative))


def test_gate_applies_min_steps_only_when_the_step_count_is_known():
    from flux2_accel.optim.features.caching.decision import CacheRun, SkipGate

    gate = SkipGate(warmup_steps=0, max_consecutive_cached=0, min_steps=6)
    assert not gate.allows(2, 0, total_steps=5) and gate.allows(2, 0, total_steps=6)
    assert gate.allows(2, 0, total_steps=None)  # unknown length: the rule does not apply
    assert SkipGate(min_steps=0).allows(1, 0, total_steps=2)
    assert "note" not in CacheRun(CacheSettings(), gate, total_steps=None).stats()
    assert CacheRun(CacheSettings(), gate, total_steps=3).stats()["note"].startswith("run has 3 steps (< 6)")
    assert CacheSettings().min_steps == 6 and CacheSettings().gate.min_steps == 6
    with pytest.raises(InputError, match="min_steps is -1"):
        CacheSettings(min_steps=-1).validate()


# ---------------------------------------------------------------- node

def test_node_returns_new_handle_and_leaves_input_unchanged():
    from flux2_accel.nodes.cache import NODE_CLASS_MAPPINGS, Flux2AccelStepCache

    assert NODE_CLASS_MAPPINGS["Flux2AccelStepCache"] is Flux2AccelStepCache
    inputs = Flux2AccelStepCache.INPUT_TYPES()
    for group in inputs.values():
        for name, (kind, opts) in group.items():
            assert opts.get("tooltip"), name
    assert set(inputs["required"]["method"][0]) == {"fbcache", "teacache", "magcache", "taylorseer"}
    handle = ModelHandle("/x/model.safetensors", family="dev")
    (out,) = Flux2AccelStepCache().apply(handle, "teacache", 0.2, 0.1, 0.9, 2, 3, "1.0, 0.5")
    assert handle.cache is None and out is not handle
    assert out.cache == CacheSettings("teacache", 0.2, 0.1, 0.9, 2, 3, (1.0, 0.5))
    assert out.replace(cache=None) == handle
    (off,) = Flux2AccelStepCache().apply(out, "fbcache", 0.0, 0.0, 1.0, 3, 1)
    assert off.cache is None and out.cache is not None
    with pytest.raises(InputError, match="start_percent"):
        Flux2AccelStepCache().apply(handle, "fbcache", 0.1, 0.9, 0.2, 3, 1)
    # min_steps: optional, last, default 6; workflows saved before it existed get the default.
    assert list(inputs["optional"])[-1] == "min_steps" and inputs["optional"]["min_steps"][1]["default"] == 6
    assert out.cache.min_steps == 6
    (any_run,) = Flux2AccelStepCache().apply(handle, "fbcache", 0.1, 0.0, 1.0, 3, 1, "", 0)
    assert any_run.cache.min_steps == 0


# ---------------------------------------------------------------- torch.compile

def test_regional_compile_keeps_its_graphs_with_the_cache(models):
    """Compiled blocks are called with the arguments diffusers uses, and the decision stays outside them: caching
    adds no graph, no recompile and no graph break (dynamo's eager backend: tracing without code generation)."""
    from torch._dynamo.utils import counters

    _, vae, cond, _ = models["dev"]
    transformer = tiny.build_transformer(tiny.TINY, seed=3)
    params = SamplingParams(width=64, height=64, steps=4, seed=1)
    eager = {m: cached_sample(transformer, vae, cond, params, CacheSettings(m, **HIGH))[0]
             for m in ("fbcache", "teacache")}
    torch._dynamo.reset()
    counters.clear()
    transformer.compile_repeated_blocks(fullgraph=True, backend="eager")
    plain = sample(transformer, vae, cond, params)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 2
    for method in ("fbcache", "teacache"):
        exact, _ = cached_sample(transformer, vae, cond, params,
                                 CacheSettings(method, threshold=1e-12, min_steps=0))
        skipping, stats = cached_sample(transformer, vae, cond, params, CacheSettings(method, **HIGH))
        assert torch.equal(exact, plain) and stats["skipped_steps"] == 2
        assert torch.allclose(skipping, eager[method], atol=1e-5)
    assert counters["stats"]["unique_graphs"] == graphs
    assert not counters["graph_break"] and not counters["recompiles"]
    torch._dynamo.reset()
