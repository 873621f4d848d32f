"""Measuring one row: wall time, peak memory, weight bytes, and fidelity against the baseline.

Peak memory of a row = its weights (`weight_bytes`) + the most any one of its timed runs needed above what was in use
when the run started. Measured per run, so it holds whether rows run one after another or interleaved with the other
rows' modules resident.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..models.precision import rel_l2

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Stopwatch:
    """Wall time of a block, with the device's queued work included."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds = 0.0

    def __enter__(self):
        synchronize(self.device)
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        synchronize(self.device)
        self.seconds = time.perf_counter() - self._start


def _status_kib(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def resident_bytes() -> int | None:
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024


class PeakMemory:
    """Memory a block of work needs above what was in use when it started (`bytes`, None where it cannot be read):
    activations, workspaces and temporaries, not what was already resident (weights). On CUDA from
    `torch.cuda.max_memory_allocated`; on the CPU from the peak resident set, VmHWM, reset through clear_refs."""

    def __init__(self, device: torch.device):
        self.device = device
        self.bytes: int | None = None
        self.device_peak: int | None = None  # CUDA: torch.cuda.max_memory_allocated over the block, everything held

    def __enter__(self):
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            self._start = resident_bytes()
            try:
                _CLEAR_REFS.write_text("5")  # VmHWM := the current resident set
            except OSError:
                self._start = None  # VmHWM would hold the process's peak so far: no honest figure
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            synchronize(self.device)
            self.device_peak = int(torch.cuda.max_memory_allocated(self.device))
            self.bytes = max(0, self.device_peak - self._start)
        elif self._start is not None:
            kib = _status_kib("VmHWM")
            self.bytes = None if kib is None else max(0, kib * 1024 - self._start)


def latent_deviation(latent: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """(max |a - b|, ||a - b|| / ||b||), in float64."""
    return float((latent.double() - reference.double()).abs().max()), rel_l2(latent, reference)


def median(values: list[float]) -> float:
    s = sorted(values)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


# ---------------------------------------------------------------- speedups, their spread, and when to trust them

MIN_ROUNDS = 3  # fewer timed rounds give no speedup: the median of two ratios is their mean, one outlier decides it
REFERENCE, CLEAR, WITHIN_NOISE, TOO_FEW_ROUNDS = "reference", "clear", "within noise", "too few rounds"


@dataclass(frozen=True)
class Speedup:
    """How many times faster than the baseline a row ran, and how far to trust it.

    `ratios`: the comparable ratios of baseline time to row time. Paired (rows timed round-robin): one per round,
    the baseline's time over the row's in the same round, so load that drifts between rounds cancels out. Not paired
    (one row after another): every baseline run over every row run. `value` is their median (paired) or the ratio
    of the median times; `low`-`high` their spread (min-max). `verdict`: `reference` (the baseline itself),
    `too few rounds` (under MIN_ROUNDS: no figure), `within noise` (the spread is larger than the figure's distance
    from 1.0: it cannot tell faster from slower) or `clear`."""

    value: float
    low: float
    high: float
    rounds: int
    paired: bool
    reference: bool = False

    @property
    def verdict(self) -> str:
        if self.reference:
            return REFERENCE
        if self.rounds < MIN_ROUNDS:
            return TOO_FEW_ROUNDS
        return WITHIN_NOISE if self.high - self.low > abs(self.value - 1.0) else CLEAR

    @property
    def shown(self) -> float | None:
        """The figure to print, None where there is none to trust the median of (too few rounds)."""
        return None if self.verdict == TOO_FEW_ROUNDS else self.value


def speedup(baseline_seconds: list[float], row_seconds: list[float], paired: bool,
            reference: bool = False) -> Speedup:
    """The row's Speedup over the baseline from both rows' timed runs (see `Speedup`); paired only where both ran
    the same rounds."""
    paired = paired and len(baseline_seconds) == len(row_seconds)
    if paired:
        ratios = [b / r for b, r in zip(baseline_seconds, row_seconds)]
        value = median(ratios)
    else:
        ratios = [b / r for b in baseline_seconds for r in row_seconds]
        value = median(baseline_seconds) / median(row_seconds)
    return Speedup(value, min(ratios), max(ratios), min(len(baseline_seconds), len(row_seconds)), paired,
                   reference)


def speedup_warnings(rounds: list[int]) -> list[str]:
    """What the output must say about the rows' timed rounds (`rounds`: each timed row's)."""
    few = min(rounds, default=MIN_ROUNDS)
    if few >= MIN_ROUNDS:
        return []
    return [f"warning: {few} timed round{'s' if few != 1 else ''} per row, fewer than {MIN_ROUNDS}: speedups are "
            f"n/a (the median of so few ratios is one outlier's); run with --repeats {MIN_ROUNDS} or more"]
