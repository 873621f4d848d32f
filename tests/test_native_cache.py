"""The step cache's BFL-layout adapter (optim/features/caching/bfl_layout.py) on a tiny BFL-layout model, without
ComfyUI."""

from __future__ import annotations

import contextlib

import pytest
import torch
from bfl_tiny import TinyBflFlux2
from flux2_accel.optim.errors import InputError
from flux2_accel.optim.features.caching import CacheSettings
from flux2_accel.optim.features.caching.bfl_layout import (STATE_KEY, BflStepCache, block_replacements, branch_names,
                                                           modulated_input)

METHODS = ("fbcache", "teacache")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return TinyBflFlux2().eval()


def sample(model, settings=None, steps=8, batch=1, cfg=False, ref=False, split_cfg=False, seed=1, guidance=3.0,
           table_per_call=True, other_replacements=None):
    """Euler flow sampling the way ComfyUI calls a model: cond and uncond batched in one call marked by
    cond_or_uncond (or, split_cfg, one call per branch), each call wrapped in the cache's model_call and, as the
    native node does (table_per_call), given its own copy of the block-replacement table. `other_replacements`:
    replacements another patch put there before the cache."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 6, 8, generator=g)
    cond, uncond = torch.randn(batch, 4, 12, generator=g), torch.zeros(batch, 4, 12)
    reference = torch.randn(batch, 3, 8, generator=g) if ref else None
    cache = None
    options = {}
    if settings is not None:
        cache = BflStepCache(settings, steps, "dev", model.double_blocks[0], len(model.double_blocks),
                             len(model.single_blocks))
        table = {**(other_replacements or {}),
                 **block_replacements(len(model.double_blocks), len(model.single_blocks))}
        options = {"patches_replace": {"dit": table}, STATE_KEY: cache}
    sigmas = torch.linspace(1.0, 0.0, steps + 1)

    def call(xin, context, t, marks):
        refs = None if reference is None else reference.repeat(xin.shape[0] // batch, 1, 1)
        call_options = {**options, "cond_or_uncond": marks}
        block_table = None
        if cache and table_per_call:
            block_table = dict(options["patches_replace"]["dit"])
            call_options["patches_replace"] = {"dit": block_table}
        scope = cache.model_call(marks, xin.shape[0], xin.device, block_table) if cache else contextlib.nullcontext()
        with scope:
            return model(xin, context, t.expand(xin.shape[0]), ref=refs, transformer_options=call_options)

    with torch.inference_mode():
        for i in range(steps):
            t = sigmas[i]
            if not cfg:
                v = call(x, cond, t, [0])
            elif split_cfg:
                v_cond, v_uncond = call(x, cond, t, [0]), call(x, uncond, t, [1])
                v = v_uncond + guidance * (v_cond - v_uncond)
            else:
                both = call(torch.cat((x, x)), torch.cat((cond, uncond)), t, [0, 1])
                v_cond, v_uncond = both.chunk(2)
                v = v_uncond + guidance * (v_cond - v_uncond)
            x = x + (sigmas[i + 1] - t) * v
    return x, cache


def count_runs(module):
    counter = [0]
    handle = module.register_forward_pre_hook(lambda m, a: counter.__setitem__(0, counter[0] + 1))
    return counter, handle


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("batch, cfg, ref", [(1, False, False), (2, True, False), (1, True, True)])
def test_never_skipping_is_bit_identical(model, method, batch, cfg, ref):
    plain, _ = sample(model, batch=batch, cfg=cfg, ref=ref)
    cached, cache = sample(model, CacheSettings(method, threshold=1e-12), batch=batch, cfg=cfg, ref=ref)
    assert torch.equal(plain, cached)
    stats = cache.stats()
    calls = 8 * (2 if cfg else 1)
    assert (stats["computed_steps"], stats["skipped_steps"], stats["total_steps"]) == (calls, 0, calls)


def test_replacements_without_a_run_state_run_the_blocks(model):
    plain, _ = sample(model)
    g = torch.Generator().manual_seed(1)
    x, cond = torch.randn(1, 6, 8, generator=g), torch.randn(1, 4, 12, generator=g)
    options = {"patches_replace": {"dit": block_replacements(2, 3)}}
    with torch.inference_mode():
        assert torch.equal(model(x, cond, torch.ones(1), transformer_options=options),
                           model(x, cond, torch.ones(1)))


@pytest.mark.parametrize("method", METHODS)
def test_high_threshold_skips_with_warmup_and_consecutive_limit(model, method):
    """Every call may skip: warmup 1 and at most 3 in a row give C S S S C S S S; skipped calls run no block after
    the first double block (fbcache) or none at all (teacache)."""
    first, h1 = count_runs(model.double_blocks[0])
    last, h2 = count_runs(model.single_blocks[-1])
    try:
        out, cache = sample(model, CacheSettings(method, threshold=5.0, warmup_steps=1, max_consecutive_cached=3))
    finally:
        h1.remove(), h2.remove()
    stats = cache.stats()
    assert (stats["computed_steps"], stats["skipped_steps"]) == (2, 6)
    assert last[0] == 2
    assert first[0] == (8 if method == "fbcache" else 2)
    plain, _ = sample(model)
    assert torch.isfinite(out).all() and not torch.equal(out, plain)
    assert stats["method"] == method and stats["estimated_time_saved_s"] >= 0


def test_only_the_first_and_last_blocks_carry_a_replacement_for_the_run():
    assert sorted(block_replacements(2, 3)) == [("double_block", 0), ("single_block", 2)]
    assert sorted(block_replacements(1, 1)) == [("double_block", 0), ("single_block", 0)]


@pytest.mark.parametrize("method", METHODS)
def test_skipped_calls_run_no_block_between_and_leave_the_table_as_found(model, method):
    """A skipped call lets the blocks between the first and the last through (none of them runs) with
    pass-throughs in the call's own table; a computed call runs them untouched; the table the call was given is
    as it was after the call, another patch's replacement of a block between included."""
    between = [model.double_blocks[1], *model.single_blocks[:-1]]
    counters = [count_runs(block) for block in between]
    seen_tables = []
    other_calls = [0]

    def other_patch(args, extra):  # another pack's replacement of single block 0: runs only on computed calls
        other_calls[0] += 1
        return extra["original_block"](args)

    settings = CacheSettings(method, threshold=5.0, warmup_steps=1, max_consecutive_cached=3)
    original_model_call = BflStepCache.model_call

    @contextlib.contextmanager
    def watching(self, marks, rows, device, block_table=None):
        before = dict(block_table)
        with original_model_call(self, marks, rows, device, block_table) as call:
            yield call
        seen_tables.append(block_table == before)

    BflStepCache.model_call = watching
    try:
        out, cache = sample(model, settings, other_replacements={("single_block", 0): other_patch})
    finally:
        BflStepCache.model_call = original_model_call
        for _, handle in counters:
            handle.remove()
    assert (cache.stats()["computed_steps"], cache.stats()["skipped_steps"]) == (2, 6)
    assert [counter[0] for counter, _ in counters] == [2] * len(between)  # the two computed calls only
    assert other_calls[0] == 2
    assert seen_tables == [True] * 8
    reference, _ = sample(model, settings, table_per_call=False)
    assert torch.equal(out, reference)


@pytest.mark.parametrize("method", METHODS)
def test_a_forward_that_ignores_the_table_still_gets_the_cached_result(model, method):
    """Without a table of the call's own (a forward that looks blocks up elsewhere), the blocks between run on a
    skipped call, and the last single block still hands on the cached image: the same latent as with the table."""
    between = count_runs(model.single_blocks[0])
    settings = CacheSettings(method, threshold=5.0, warmup_steps=1, max_consecutive_cached=3)
    try:
        without, cache = sample(model, settings, table_per_call=False, cfg=True)
    finally:
        between[1].remove()
    assert cache.stats()["skipped_steps"] == 12
    assert between[0][0] == 8  # it ran on every call, skipped ones included
    with_table, _ = sample(model, settings, cfg=True)
    assert torch.equal(without, with_table)


@pytest.mark.parametrize("method", METHODS)
def test_start_and_end_percent_bound_the_skipped_steps(model, method):
    settings = CacheSettings(method, threshold=5.0, warmup_steps=0, max_consecutive_cached=0,
                             start_percent=0.5, end_percent=0.75)
    _, cache = sample(model, settings)
    # steps 4 and 5 of 8 are inside [0.5, 0.75): both skip (step 3 computed a residual to reuse)
    assert cache.stats()["skipped_steps"] == 2


@pytest.mark.parametrize("use_schedule, timeline", [(True, "CCCCCCCSSSSCCCCC"), (False, "CCCCSSCCCCCCCCCC")])
def test_two_calls_per_step_count_steps_by_sigma(model, use_schedule, timeline):
    """A heun-like sampler calls the model at sigma_i and sigma_i+1 for each step i. Given the schedule, the window
    [0.5, 0.75) of 8 steps covers the calls at steps 4 and 5 (four calls); counted by calls it would cover calls 4
    and 5 (steps 2 and 3)."""
    settings = CacheSettings("fbcache", threshold=5.0, warmup_steps=0, max_consecutive_cached=0,
                             start_percent=0.5, end_percent=0.75, min_steps=0)
    sigmas = torch.linspace(1.0, 0.0, 9)
    cache = BflStepCache(settings, 8, "dev", model.double_blocks[0], 2, 3, schedule=sigmas if use_schedule else None)
    g = torch.Generator().manual_seed(2)
    x, cond = torch.randn(1, 6, 8, generator=g), torch.randn(1, 4, 12, generator=g)
    with torch.inference_mode():
        for i in range(8):
            for sigma in (sigmas[i], sigmas[i + 1]):
                table = dict(block_replacements(2, 3))
                options = {"patches_replace": {"dit": table}, STATE_KEY: cache, "cond_or_uncond": [0]}
                with cache.model_call([0], 1, x.device, table, sigma=sigma.reshape(1)):
                    model(x, cond, sigma.reshape(1), transformer_options=options)
    assert cache.run.branches["cond"].timeline == timeline
    assert cache.run.step_index is None  # only set while a call runs


def test_step_of_a_sigma():
    cache = BflStepCache(CacheSettings("fbcache", 0.1), 4, "dev", torch.nn.Linear(1, 1), 2, 3,
                         schedule=torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    assert [cache.step_of(v) for v in (1.0, 0.9, 0.75, 0.6, 0.5, 0.25, 0.1, 0.0)] == [0, 1, 1, 2, 2, 3, 4, 4]
    assert cache.step_of(torch.tensor([0.5, 0.5])) == 2 and cache.step_of(None) is None
    assert BflStepCache(CacheSettings("fbcache", 0.1), 4, "dev", torch.nn.Linear(1, 1), 2, 3).step_of(0.5) is None


@pytest.mark.parametrize("method", METHODS)
def test_cfg_branches_keep_separate_state(model, method):
    """cond and uncond batched in one call give what separate calls per branch give: each branch reuses its own
    residual (a mix-up would hand the uncond rows the cond residual)."""
    settings = CacheSettings(method, threshold=5.0, warmup_steps=1, max_consecutive_cached=2)
    batched, cache = sample(model, settings, cfg=True)
    split, split_cache = sample(model, settings, cfg=True, split_cfg=True)
    assert set(cache.run.branches) == {"cond", "uncond"}
    assert all(b.index == 8 for b in cache.run.branches.values())
    assert cache.stats()["skipped_steps"] == split_cache.stats()["skipped_steps"] == 2 * 5
    torch.testing.assert_close(batched, split, rtol=1e-4, atol=1e-5)
    plain, _ = sample(model, cfg=True)
    assert (batched - plain).abs().max() > 1e-3  # it did reuse residuals


@pytest.mark.parametrize("method", METHODS)
def test_batch_rows_match_single_runs(model, method):
    settings = CacheSettings(method, threshold=5.0, warmup_steps=1, max_consecutive_cached=3)
    both, _ = sample(model, settings, batch=2, seed=4)
    g = torch.Generator().manual_seed(4)
    # the same rows one at a time: draw the batch as `sample` does, then run each row through the same steps
    x = torch.randn(2, 6, 8, generator=g)
    cond = torch.randn(2, 4, 12, generator=g)
    for row in range(2):
        cache = BflStepCache(settings, 8, "dev", model.double_blocks[0], 2, 3)
        options = {"patches_replace": {"dit": block_replacements(2, 3)}, STATE_KEY: cache}
        xr = x[row:row + 1]
        sigmas = torch.linspace(1.0, 0.0, 9)
        with torch.inference_mode():
            for i in range(8):
                with cache.model_call([0], 1, xr.device):
                    v = model(xr, cond[row:row + 1], sigmas[i].expand(1), transformer_options=options)
                xr = xr + (sigmas[i + 1] - sigmas[i]) * v
        torch.testing.assert_close(both[row:row + 1], xr, rtol=1e-4, atol=1e-5)


def test_a_branch_that_cannot_skip_computes_the_whole_call(model):
    """The call skips only when every branch may: after the first call, uncond is marked as having used up its
    consecutive skips, so the second batched call computes both branches and neither records a skip; a third call,
    where both may skip, skips both."""
    settings = CacheSettings("fbcache", threshold=5.0, warmup_steps=0, max_consecutive_cached=1, min_steps=0)
    cache = BflStepCache(settings, 4, "dev", model.double_blocks[0], 2, 3)
    options = {"patches_replace": {"dit": block_replacements(2, 3)}, STATE_KEY: cache}
    x, cond = torch.randn(2, 6, 8), torch.randn(2, 4, 12)
    counts = []
    with torch.inference_mode():
        for step in range(3):
            if step == 1:
                cache.run.branches["uncond"].consecutive_cached = 1
            with cache.model_call([0, 1], 2, x.device):
                model(x, cond, torch.ones(2), transformer_options={**options, "cond_or_uncond": [0, 1]})
            counts.append((cache.stats()["computed_steps"], cache.stats()["skipped_steps"]))
    assert counts == [(2, 0), (4, 0), (4, 2)]


def test_teacache_signal_is_the_first_blocks_modulated_input(model):
    img = torch.randn(1, 5, 32)
    vec = (model.double_stream_modulation_img(torch.randn(1, 32)), model.double_stream_modulation_txt(torch.randn(1, 32)))
    block = model.double_blocks[0]
    mod1 = vec[0][0]
    expected = (1 + mod1.scale) * block.img_norm1(img) + mod1.shift
    assert torch.equal(modulated_input(block, img, vec), expected)


def test_custom_teacache_coefficients_change_decisions(model):
    _, never = sample(model, CacheSettings("teacache", threshold=0.5, warmup_steps=1, max_consecutive_cached=0,
                                           coefficients=(1000.0,)))
    _, always = sample(model, CacheSettings("teacache", threshold=0.5, warmup_steps=1, max_consecutive_cached=0,
                                            coefficients=(0.0,)))
    assert never.stats()["skipped_steps"] == 0
    assert always.stats()["skipped_steps"] == 8 - 1  # a zero polynomial skips every step after the first


def test_branch_names_follow_cond_or_uncond():
    assert branch_names(None) == ["cond"]
    assert branch_names([0, 1]) == ["cond", "uncond"]
    assert branch_names([1, 0, 0]) == ["uncond", "cond", "cond#2"]


def test_unsupported_method_and_bad_settings_are_refused(model):
    with pytest.raises(InputError, match="magcache"):
        BflStepCache(CacheSettings("magcache", threshold=0.1), 8, "dev", model.double_blocks[0], 2, 3)
    with pytest.raises(InputError, match="start_percent"):
        BflStepCache(CacheSettings("fbcache", threshold=0.1, start_percent=0.9, end_percent=0.5), 8, "dev",
                     model.double_blocks[0], 2, 3)


@pytest.mark.parametrize("method", ["fbcache", "teacache"])
def test_short_runs_never_skip_unless_min_steps_allows(model, method):
    """The shared few-step rule reaches the BFL-layout cache: a 4-step run at a skipping threshold computes every
    call, gives the uncached result bit for bit, and says so once; with min_steps=0 the same run skips."""
    plain, _ = sample(model, steps=4)
    short, cache = sample(model, CacheSettings(method, threshold=5.0, warmup_steps=1, max_consecutive_cached=0),
                          steps=4)
    stats = cache.stats()
    assert (stats["computed_steps"], stats["skipped_steps"]) == (4, 0) and torch.equal(short, plain)
    assert stats["note"].startswith("run has 4 steps (< 6)")
    _, allowed = sample(model, CacheSettings(method, threshold=5.0, warmup_steps=1, max_consecutive_cached=0,
                                             min_steps=0), steps=4)
    assert allowed.stats()["skipped_steps"] == 3 and "note" not in allowed.stats()
