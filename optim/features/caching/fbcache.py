"""First Block Cache for FLUX.2: skip the blocks after the first while the first block's residual barely changes.

Per call, the first double-stream block runs. Its residual (output minus input, image tokens) is compared with the
residual of the branch's last computed call: relative L1 = mean|previous - current| / mean|previous|, in the
tensors' own dtype. Under the threshold (strictly), the remaining blocks are skipped and the image stream gets the
residual they added on that last computed call; otherwise they run, and the call's first-block residual and
remaining-blocks residual become the branch's new reference. A skipped call keeps the reference it compared
against, so a run of skipped calls is always measured against the last computed one.

Steps are counted by the shared `decision.CacheRun` (every call, skipped or not, is one step of its branch), and the
gate (warmup, start..end window, consecutive limit, too few steps) is its shared one: this module only adds the
method's own signal and memory. The arithmetic is that of para-attn's first-block-cache (0.3.x), which the pack
used before; the same runs give bit-identical outputs and decisions (tests/test_caching.py pins the semantics).

The decision is layout-free (a branch, a residual tensor); `run_blocks` is the adapter for diffusers'
Flux2Transformer2DModel (with the block runner in `blocks.py`), and `bfl_layout.py` the one for BFL's layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from . import blocks
from .decision import Branch, CacheRun


@dataclass(frozen=True)
class FBCacheSettings:
    """threshold: the relative change of the first block's residual below which a call reuses the previous one
    (0.08-0.12 on FLUX.1); 0 never reuses."""

    method: ClassVar[str] = "fbcache"
    threshold: float = 0.12


@dataclass
class FBCacheState:
    """One branch's First Block Cache memory, both from its last computed call."""

    first_residual: torch.Tensor | None = None  # the first block's output minus its input
    residual: torch.Tensor | None = None  # the remaining blocks' image output minus their input


def new_run(settings, total_steps: int | None, family: str) -> CacheRun:
    return CacheRun(FBCacheSettings(threshold=settings.threshold), settings.gate, total_steps,
                    new_state=FBCacheState)


def relative_change(current: torch.Tensor, previous: torch.Tensor, sum_across_ranks=None) -> float:
    """First Block Cache's measure: mean |previous - current| / mean |previous|, computed in the tensors' dtype.
    With `sum_across_ranks` (context parallelism: every rank holds an equal part of the tokens), the ratio of the
    sums over all ranks, in float32: the whole image's measure, the same on every rank."""
    if sum_across_ranks is None:
        return float((previous - current).abs().mean() / previous.abs().mean())
    sums = sum_across_ranks(torch.stack([(previous - current).abs().sum(dtype=torch.float32),
                                         previous.abs().sum(dtype=torch.float32)]))
    return float(sums[0] / sums[1])


@torch.compiler.disable
def may_reuse(run: CacheRun, branch: Branch, first_residual: torch.Tensor) -> bool:
    """True when this call of `branch` may reuse the last computed call's residual: the shared gate allows a skip and
    the first block's residual changed less than the threshold since that call. Changes no state."""
    if not run.may_skip(branch):
        return False
    threshold = run.settings.threshold
    previous = branch.state.first_residual
    if threshold <= 0.0 or previous is None or previous.shape != first_residual.shape:
        return False
    if branch.state.residual is None:  # a computed call that did not finish (its forward raised): nothing to reuse
        return False
    return relative_change(first_residual, previous, run.sum_across_ranks) < threshold


@torch.compiler.disable
def reused(branch: Branch, hidden_states: torch.Tensor) -> torch.Tensor:
    """A skipped call's image stream: the first block's output plus the remaining blocks' last residual."""
    return (branch.state.residual + hidden_states).contiguous()


@torch.compiler.disable
def keep_first_residual(branch: Branch, first_residual: torch.Tensor) -> None:
    """On a computed call: the first block's residual becomes the one later calls compare against."""
    branch.state.first_residual = first_residual


@torch.compiler.disable
def keep_residual(branch: Branch, residual: torch.Tensor) -> None:
    """On a computed call: the remaining blocks' residual becomes the one a skipped call adds."""
    branch.state.residual = residual


def run_blocks(runner: blocks.Flux2CachedTransformerBlocks, branch, hidden_states, encoder_hidden_states,
               block_kwargs):
    before_first = hidden_states
    encoder_hidden_states, hidden_states = runner.transformer_blocks[0](
        hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states, **block_kwargs)
    first_residual = hidden_states - before_first
    del before_first
    skip = may_reuse(runner.run, branch, first_residual)
    torch._dynamo.graph_break()
    if skip:
        del first_residual
        hidden_states = reused(branch, hidden_states)
    else:
        keep_first_residual(branch, first_residual)
        del first_residual
        after_first = hidden_states
        encoder_hidden_states, hidden_states = runner.remaining_blocks(
            hidden_states, encoder_hidden_states, block_kwargs, start=1)
        keep_residual(branch, hidden_states - after_first)
    torch._dynamo.graph_break()
    return encoder_hidden_states, hidden_states, skip


def installed(transformer, run: CacheRun):
    return blocks.installed(transformer, run, run_blocks)
