"""First Block Cache's decision semantics, pinned (optim/features/caching/fbcache.py): the relative L1 change of the
first block's residual against the threshold, measured from the branch's last computed call; every call counted as a
step of its branch (skipped or not) for the shared gate; a skipped call reuses the last computed residual. The pack
took these from para-attn 0.3.x and must keep them: cached runs made before give the same bits now."""

from __future__ import annotations

import contextlib

import pytest
import torch
from bfl_tiny import TinyBflFlux2
from flux2_accel.optim.features.caching import CacheSettings, fbcache
from flux2_accel.optim.features.caching.bfl_layout import STATE_KEY, BflStepCache, block_replacements
from flux2_accel.optim.models import tiny
from flux2_accel.optim.run.sampling import SamplingParams
from test_caching import FAMILY_TE, Flux2Conditioning, cached_sample

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def new_run(threshold, warmup_steps=0, max_consecutive_cached=0, steps=None):
    settings = CacheSettings("fbcache", threshold=threshold, warmup_steps=warmup_steps,
                             max_consecutive_cached=max_consecutive_cached, min_steps=0)
    return fbcache.new_run(settings, steps, "dev")


def drive(run, first_residuals, residual_of=lambda i: None):
    """The adapters' sequence for one branch: decide, then keep (computed) or reuse (skipped), then count the call.
    Returns the timeline."""
    for i, first in enumerate(first_residuals):
        branch = run.branch()
        skip = fbcache.may_reuse(run, branch, first)
        if not skip:
            fbcache.keep_first_residual(branch, first)
            fbcache.keep_residual(branch, residual_of(i) if residual_of(i) is not None else torch.zeros_like(first))
        run.record(branch, skip, 0.0)
    return run.stats()["timeline"]["cond"]


def hand_relative_l1(current, previous):
    return ((previous - current).abs().mean() / previous.abs().mean()).item()


def test_relative_change_is_mean_abs_difference_over_mean_abs_previous_in_the_tensors_dtype():
    g = torch.Generator().manual_seed(0)
    previous, current = torch.randn(2, 7, 5, generator=g), torch.randn(2, 7, 5, generator=g)
    value = fbcache.relative_change(current, previous)
    assert value == hand_relative_l1(current, previous)
    assert value == pytest.approx(float((previous.double() - current.double()).abs().mean()
                                        / previous.double().abs().mean()), rel=1e-5)
    low = previous.bfloat16(), current.bfloat16()
    assert fbcache.relative_change(low[1], low[0]) == hand_relative_l1(low[1], low[0])  # bf16 arithmetic, as ran
    assert fbcache.relative_change(previous * 1.25, previous) == pytest.approx(0.25, rel=1e-6)


def test_reuse_needs_a_change_strictly_under_the_threshold():
    previous = torch.linspace(1.0, 2.0, 12).reshape(1, 3, 4)
    current = previous * 1.25
    change = fbcache.relative_change(current, previous)
    for threshold, reused in ((change, False), (change * (1 + 1e-6), True), (change * 0.999, False)):
        run = new_run(threshold)
        assert drive(run, [previous, current]) == ("CS" if reused else "CC"), threshold
    assert drive(new_run(0.0), [previous, previous]) == "CC"  # 0 never reuses, even an unchanged residual
    assert drive(new_run(5.0), [previous, torch.ones(1, 4, 4)]) == "CC"  # another shape is never similar


def test_first_call_of_each_branch_computes_and_branches_keep_their_own_reference():
    x = torch.ones(1, 2, 3)
    run = new_run(5.0)
    for name in ("cond", "uncond", "cond", "uncond"):
        run.branch_name = name
        branch = run.branch()
        skip = fbcache.may_reuse(run, branch, x)
        if not skip:
            fbcache.keep_first_residual(branch, x)
            fbcache.keep_residual(branch, x)
        run.record(branch, skip, 0.0)
    assert run.stats()["timeline"] == {"cond": "CS", "uncond": "CS"}


def test_change_is_measured_from_the_last_computed_call_not_the_last_call():
    """Each residual differs by 10% of the first from the one before: a chain of small steps drifts away from the
    reference, and the call where the drift passes the threshold computes and becomes the new reference."""
    base = torch.full((1, 4, 2), 10.0)
    firsts = [base + i for i in range(6)]  # 10, 11, 12, ...: vs 10 the changes are 0.1, 0.2, 0.3
    assert drive(new_run(0.25), firsts) == "CSSCSS"  # 11, 12 vs 10; 13 vs 10 = 0.3 computes; 14, 15 vs 13
    assert drive(new_run(0.05), firsts) == "CCCCCC"


def test_every_call_counts_as_a_step_for_warmup_and_the_consecutive_limit():
    same = [torch.ones(1, 2, 2)] * 7
    assert drive(new_run(5.0, warmup_steps=2), same) == "CCSSSSS"
    assert drive(new_run(5.0, warmup_steps=1, max_consecutive_cached=2), same) == "CSSCSSC"
    assert drive(new_run(5.0, warmup_steps=0, steps=8), same) == "CSSSSSS"  # the first call has nothing to compare
    run = new_run(5.0, warmup_steps=1, max_consecutive_cached=2)
    drive(run, same)
    assert run.branch().index == 7 and run.stats()["skipped_steps"] == 4


def test_a_skipped_call_adds_the_last_computed_residual_of_the_remaining_blocks():
    run = new_run(5.0)
    branch = run.branch()
    first, kept = torch.ones(1, 3, 2), torch.arange(6.0).reshape(1, 2, 3).transpose(1, 2)
    fbcache.keep_first_residual(branch, first)
    fbcache.keep_residual(branch, kept)
    run.record(branch, False, 0.0)
    assert fbcache.may_reuse(run, branch, first)
    hidden = torch.linspace(0, 1, 6).reshape(1, 2, 3).transpose(1, 2)  # not contiguous, as kept: the sum is not
    out = fbcache.reused(branch, hidden)
    assert torch.equal(out, kept + hidden) and out.is_contiguous()
    assert branch.state.first_residual is first and branch.state.residual is kept  # a skip changes no reference


def test_a_computed_call_that_never_finished_leaves_nothing_to_reuse():
    run = new_run(5.0)
    branch = run.branch()
    fbcache.keep_first_residual(branch, torch.ones(2))  # the forward raised before the remaining blocks' residual
    run.record(branch, False, 0.0)
    assert not fbcache.may_reuse(run, branch, torch.ones(2))


# ---------------------------------------------------------------- whole runs: the decisions follow the semantics

def replayed_timeline(firsts, threshold, warmup_steps, max_consecutive_cached):
    """The timeline the semantics give for these first-block residuals, computed here from scratch."""
    timeline, reference, consecutive = "", None, 0
    for i, first in enumerate(firsts):
        allowed = i >= warmup_steps and not (max_consecutive_cached and consecutive >= max_consecutive_cached)
        skip = (allowed and reference is not None and hand_relative_l1(first, reference) < threshold)
        timeline += "S" if skip else "C"
        consecutive = consecutive + 1 if skip else 0
        if not skip:
            reference = first
    return timeline


@contextlib.contextmanager
def first_block_residuals(block, inputs_key, output_of):
    seen, inputs = [], []

    def before(module, args, kwargs):
        inputs.append(kwargs[inputs_key].clone())  # BFL-layout blocks may add to their input in place

    def after(module, args, kwargs, output):
        seen.append(output_of(output) - inputs.pop())

    hooks = [block.register_forward_pre_hook(before, with_kwargs=True),
             block.register_forward_hook(after, with_kwargs=True)]
    try:
        yield seen
    finally:
        for h in hooks:
            h.remove()


@pytest.mark.parametrize("threshold,max_consecutive", [(0.6, 0), (0.8, 2), (1.0, 0)])
def test_diffusers_layout_run_decides_as_the_semantics_say(threshold, max_consecutive):
    transformer = tiny.build_transformer(tiny.TINY, seed=3)
    vae = tiny.build_vae(tiny.TINY, seed=4)
    g = torch.Generator().manual_seed(7)
    cond = Flux2Conditioning(torch.randn(1, 16, transformer.config.joint_attention_dim, generator=g),
                             FAMILY_TE["dev"])
    params = SamplingParams(width=64, height=48, steps=10, guidance=4.0, seed=5)
    settings = CacheSettings("fbcache", threshold=threshold, warmup_steps=1, max_consecutive_cached=max_consecutive,
                             min_steps=0)
    with first_block_residuals(transformer.transformer_blocks[0], "hidden_states", lambda out: out[1]) as firsts:
        _, stats = cached_sample(transformer, vae, cond, params, settings)
    timeline = stats["timeline"]["cond"]
    assert len(firsts) == 10 and "S" in timeline and timeline.count("C") > 1  # the signal decided, not only the gate
    assert timeline == replayed_timeline(firsts, threshold, 1, max_consecutive)


@pytest.mark.parametrize("threshold", [0.08, 0.2, 0.3])
def test_bfl_layout_run_decides_as_the_semantics_say(threshold):
    torch.manual_seed(0)
    model = TinyBflFlux2().eval()
    steps = 12
    settings = CacheSettings("fbcache", threshold=threshold, warmup_steps=1, max_consecutive_cached=0, min_steps=0)
    cache = BflStepCache(settings, steps, "dev", model.double_blocks[0], len(model.double_blocks),
                         len(model.single_blocks))
    table = block_replacements(len(model.double_blocks), len(model.single_blocks))
    g = torch.Generator().manual_seed(1)
    x, context = torch.randn(1, 6, 8, generator=g), torch.randn(1, 4, 12, generator=g)
    sigmas = torch.linspace(1.0, 0.0, steps + 1)
    with first_block_residuals(model.double_blocks[0], "img", lambda out: out[0]) as firsts, torch.inference_mode():
        for i in range(steps):
            block_table = dict(table)
            options = {"patches_replace": {"dit": block_table}, STATE_KEY: cache, "cond_or_uncond": [0]}
            with cache.model_call([0], 1, x.device, block_table):
                v = model(x, context, sigmas[i].expand(1), transformer_options=options)
            x = x + (sigmas[i + 1] - sigmas[i]) * v
    timeline = cache.stats()["timeline"]["cond"]
    assert len(firsts) == steps and "S" in timeline and timeline.count("C") > 1
    assert timeline == replayed_timeline(firsts, threshold, 1, 0)
