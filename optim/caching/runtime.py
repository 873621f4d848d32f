"""One cached run: per-branch state, the skip gate shared by every method, statistics, and the forward patch.

State lives only here and only for one run: nothing is kept on the transformer between runs, so a new run (other
size, batch size, handle, or after an interrupted run) starts from nothing.

CFG branches: diffusers' [klein] pipeline wraps each transformer call in `transformer.cache_context("cond")` /
`("uncond")`. While a run is installed, `cache_context` is wrapped so the run knows the current branch name and keeps
separate state per branch; calls outside any context (the [dev] pipeline) form the branch "cond".
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any

import torch

DEFAULT_BRANCH = "cond"


@dataclass
class Branch:
    """What one CFG branch remembers from step to step."""

    name: str
    index: int = 0  # transformer calls so far in this branch = the current step index
    consecutive_cached: int = 0
    skipped: bool = False  # the decision for the call in progress
    fbc: Any = None  # para-attn CacheContext (First Block Cache buffers)
    residual: torch.Tensor | None = None  # TeaCache: blocks' output minus input, image tokens
    previous_input: torch.Tensor | None = None  # TeaCache: previous modulated input
    accumulated: float = 0.0  # TeaCache: accumulated rescaled change
    extra: dict = field(default_factory=dict)


class CacheRun:
    def __init__(self, settings, total_steps: int | None, family: str):
        self.settings = settings
        self.total_steps = total_steps
        self.family = family
        self.branches: dict[str, Branch] = {}
        self.branch_name: str | None = None
        self.computed = 0
        self.skipped = 0
        self.time_computed = 0.0
        self.time_skipped = 0.0

    # -- branches
    def branch(self) -> Branch:
        name = self.branch_name or DEFAULT_BRANCH
        b = self.branches.get(name)
        if b is None:
            b = self.branches[name] = Branch(name)
        return b

    def may_skip(self, branch: Branch) -> bool:
        """The gate every method shares: warmup, the start..end window, and the consecutive limit."""
        s = self.settings
        if branch.index < s.warmup_steps:
            return False
        if s.max_consecutive_cached and branch.consecutive_cached >= s.max_consecutive_cached:
            return False
        if self.total_steps:
            fraction = branch.index / self.total_steps
            if fraction < s.start_percent or fraction >= s.end_percent:
                return False
        return True

    # -- bookkeeping, after each transformer call
    def record(self, branch: Branch, skipped: bool, seconds: float) -> None:
        branch.index += 1
        branch.consecutive_cached = branch.consecutive_cached + 1 if skipped else 0
        if skipped:
            self.skipped += 1
            self.time_skipped += seconds
        else:
            self.computed += 1
            self.time_computed += seconds

    def stats(self) -> dict:
        """Counts are transformer calls: with CFG each step makes two, and each may be skipped on its own."""
        saved = 0.0
        if self.skipped and self.computed:
            per_computed = self.time_computed / self.computed
            per_skipped = self.time_skipped / self.skipped
            saved = max(0.0, per_computed - per_skipped) * self.skipped
        return {
            "method": self.settings.method,
            "computed_steps": self.computed,
            "skipped_steps": self.skipped,
            "total_steps": self.computed + self.skipped,
            "estimated_time_saved_s": round(saved, 3),
        }


def _synchronize(device: torch.device) -> None:
    # Per-call timings must include the GPU work; one sync per call is noise next to a FLUX.2 forward.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def forward_patched(transformer, run: CacheRun, call):
    """Route `transformer.forward` through `call(original_forward, branch, args, kwargs) -> (output, skipped)` for
    the duration of the block, with branch tracking and timing. Restores the module exactly, on any exit."""
    if getattr(transformer, "_flux2_accel_cache_run", None) is not None:
        raise RuntimeError("a step cache is already active on this transformer")
    had_forward = "forward" in transformer.__dict__
    had_context = "cache_context" in transformer.__dict__
    previous_forward = transformer.__dict__.get("forward")
    previous_context = transformer.__dict__.get("cache_context")
    original_forward = transformer.forward
    original_context = transformer.cache_context

    @contextlib.contextmanager
    def cache_context(name, *args, **kwargs):
        outer = run.branch_name
        run.branch_name = name
        try:
            with original_context(name, *args, **kwargs):
                yield
        finally:
            run.branch_name = outer

    def forward(*args, **kwargs):
        branch = run.branch()
        device = kwargs["hidden_states"].device if "hidden_states" in kwargs else args[0].device
        start = time.perf_counter()
        output, skipped = call(original_forward, branch, args, kwargs)
        _synchronize(device)
        run.record(branch, skipped, time.perf_counter() - start)
        return output

    transformer._flux2_accel_cache_run = run
    transformer.forward = forward
    transformer.cache_context = cache_context
    try:
        yield
    finally:
        for name, had, previous in (("forward", had_forward, previous_forward),
                                    ("cache_context", had_context, previous_context)):
            if had:
                setattr(transformer, name, previous)
            else:
                transformer.__dict__.pop(name, None)
        transformer.__dict__.pop("_flux2_accel_cache_run", None)
