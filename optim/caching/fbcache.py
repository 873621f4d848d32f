"""First Block Cache for FLUX.2, on para-attn's first-block-cache machinery.

Per call, the first double-stream block runs; when the relative change of its residual against the previous
call's (same CFG branch) is under the threshold, the rest of the blocks are skipped and their last residual reused.
para-attn's CacheContext holds the buffers and step counter, and its `get_can_use_cache` / `set_*_residual` /
`apply_prev_hidden_states_residual` make the decision and reuse the residual. The gate (warmup, window,
consecutive limit) is the shared one of `decision.py`; the block runner is `blocks.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from para_attn.first_block_cache import utils as fbc

from . import blocks
from .decision import CacheRun


@dataclass(frozen=True)
class FBCacheSettings:
    """threshold: the relative change of the first block's residual below which a call reuses the previous one
    (0.08-0.12 on FLUX.1)."""

    method: ClassVar[str] = "fbcache"
    threshold: float = 0.12


@dataclass
class FBCacheState:
    """One branch's First Block Cache buffers (a para-attn CacheContext)."""

    context: object


def new_run(settings, total_steps: int | None, family: str) -> CacheRun:
    own = FBCacheSettings(threshold=settings.threshold)
    return CacheRun(own, settings.gate, total_steps, new_state=lambda: FBCacheState(fbc.create_cache_context(
        residual_diff_threshold=own.threshold, num_inference_steps=total_steps or -1)))


def run_blocks(runner: blocks.Flux2CachedTransformerBlocks, branch, hidden_states, encoder_hidden_states,
               block_kwargs):
    with fbc.cache_context(branch.state.context):
        before_first = hidden_states
        encoder_hidden_states, hidden_states = runner.transformer_blocks[0](
            hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states, **block_kwargs)
        first_residual = hidden_states - before_first
        del before_first
        fbc.mark_step_begin()
        skip = runner.run.may_skip(branch) and fbc.get_can_use_cache(first_residual)
        torch._dynamo.graph_break()
        if skip:
            del first_residual
            hidden_states, _ = fbc.apply_prev_hidden_states_residual(hidden_states)
        else:
            fbc.set_first_hidden_states_residual(first_residual)
            del first_residual
            after_first = hidden_states
            encoder_hidden_states, hidden_states = runner.remaining_blocks(
                hidden_states, encoder_hidden_states, block_kwargs, start=1)
            fbc.set_hidden_states_residual(hidden_states - after_first)
        torch._dynamo.graph_break()
    return encoder_hidden_states, hidden_states, skip


def installed(transformer, run: CacheRun):
    return blocks.installed(transformer, run, run_blocks)
