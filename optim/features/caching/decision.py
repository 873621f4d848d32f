"""The skip decision every step-cache method shares, per-branch state, and statistics. Layout-independent.

Nothing here knows a model layout or a library: an adapter (diffusers' Flux2Transformer2DModel in `blocks.py`, or
any other layout) asks `CacheRun.branch()` for the branch of the call in progress, `may_skip(branch)` whether the
gate lets this call be skipped, makes its method's own decision, and calls `record(branch, skipped, seconds)` after
the call. `stats()` sums the run up.

State lives only here and only for one run: a new run (other size, batch size, handle, or after an interrupted run)
starts from nothing. CFG branches: diffusers' [klein] pipeline names its transformer calls "cond" / "uncond"; the
adapter sets `CacheRun.branch_name` while such a call runs, and every branch keeps its own state. Calls outside any
named context (the [dev] pipeline) form the branch "cond".

Steps and calls: by default a branch's step is its count of calls (the pack's own sampler and euler-like samplers
make one call per step and branch). Where a sampler calls the model more than once per step (heun, dpm_2, the SDE
samplers), an adapter that knows the run's sigma schedule sets `CacheRun.step_index` for the call in progress, so
warmup and the start..end window count the run's steps, not its calls.

Few-step runs: a run of fewer than `SkipGate.min_steps` steps (default 6) never skips, whatever the method's signal:
on 4-step distilled models a skipped step is a quarter of the run, so caching barely saves time and visibly costs
quality. `CacheRun.stats()` then carries one `note` saying so. The rule needs the run's step count: a run made with
`total_steps=None` (unknown) is not subject to it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

DEFAULT_BRANCH = "cond"


@dataclass(frozen=True)
class SkipGate:
    """When a method may skip at all, whatever its own signal says.

    warmup_steps: the first steps of a branch are always computed.
    start_percent / end_percent: fractions (0..1) of the run's steps between which steps may be skipped.
    max_consecutive_cached: at most this many skipped calls in a row (0 = no limit).
    min_steps: runs with fewer steps than this never skip (0 = any run may); not applied when the step count is
    unknown.
    """

    warmup_steps: int = 1
    start_percent: float = 0.0
    end_percent: float = 1.0
    max_consecutive_cached: int = 3
    min_steps: int = 6

    def too_few_steps(self, total_steps: int | None) -> bool:
        """True when a run of `total_steps` steps is too short to skip any (False when the count is unknown)."""
        return bool(total_steps) and total_steps < self.min_steps

    def allows(self, index: int, consecutive_cached: int, total_steps: int | None) -> bool:
        if self.too_few_steps(total_steps):
            return False
        if index < self.warmup_steps:
            return False
        if self.max_consecutive_cached and consecutive_cached >= self.max_consecutive_cached:
            return False
        if total_steps:
            fraction = index / total_steps
            if fraction < self.start_percent or fraction >= self.end_percent:
                return False
        return True


# The per-branch decisions in `CacheRun.stats()`: structured data for the frontend, left out of the text lines.
TIMELINE_KEY = "timeline"


@dataclass
class Branch:
    """What one CFG branch remembers from step to step. `state` is the method's own (e.g. TeaCacheState)."""

    name: str
    index: int = 0  # transformer calls so far in this branch = the current step index
    consecutive_cached: int = 0
    skipped: bool = False  # the decision for the call in progress
    state: Any = None
    timeline: str = ""  # one letter per finished call: C (computed) or S (skipped), for the frontend's strip


class CacheRun:
    """One cached run: the method's settings, the shared gate, the branches, and the counts.

    settings: the method's own settings object (its `method` names it in the statistics).
    new_state: makes a branch's method state the first time the branch is seen."""

    def __init__(self, settings, gate: SkipGate, total_steps: int | None,
                 new_state: Callable[[], Any] = lambda: None):
        self.settings = settings
        self.gate = gate
        self.total_steps = total_steps
        self.new_state = new_state
        self.branches: dict[str, Branch] = {}
        self.branch_name: str | None = None
        self.step_index: int | None = None  # the step of the call in progress, where the adapter knows it
        # Under context parallelism each rank sees a part of the tokens: the adapter sets a function that sums a
        # tensor of partial sums over the ranks, so a method's statistic, and so its decision, is the same on all.
        self.sum_across_ranks: Callable[[Any], Any] | None = None
        self.computed = 0
        self.skipped = 0
        self.time_computed = 0.0
        self.time_skipped = 0.0

    @property
    def method(self) -> str:
        return self.settings.method

    @property
    def skips_nothing(self) -> bool:
        """The gate refuses every skip of this run (too few steps): a method need not even decide."""
        return self.gate.too_few_steps(self.total_steps)

    def branch(self) -> Branch:
        """The branch of the call in progress (made on first use, with fresh method state)."""
        name = self.branch_name or DEFAULT_BRANCH
        b = self.branches.get(name)
        if b is None:
            b = self.branches[name] = Branch(name, state=self.new_state())
        return b

    def may_skip(self, branch: Branch) -> bool:
        """The gate every method shares: warmup, the start..end window, and the consecutive limit."""
        index = branch.index if self.step_index is None else self.step_index
        return self.gate.allows(index, branch.consecutive_cached, self.total_steps)

    def record(self, branch: Branch, skipped: bool, seconds: float) -> None:
        """After each transformer call."""
        branch.index += 1
        branch.consecutive_cached = branch.consecutive_cached + 1 if skipped else 0
        branch.timeline += "S" if skipped else "C"
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
        stats = {
            "method": self.method,
            "computed_steps": self.computed,
            "skipped_steps": self.skipped,
            "total_steps": self.computed + self.skipped,
            "estimated_time_saved_s": round(saved, 3),
            TIMELINE_KEY: {name: branch.timeline for name, branch in self.branches.items()},
        }
        if self.skips_nothing:
            stats["note"] = (f"run has {self.total_steps} steps (< {self.gate.min_steps}): nothing skipped; "
                             "set min_steps to 0 to cache anyway")
        return stats
