"""Measuring one row: wall time, peak memory, weight bytes, and fidelity against the baseline.

Peak memory of a row = its weights (`weight_bytes`) + the most any one of its timed runs needed above what was in use
when the run started. Measured per run, so it holds whether rows run one after another or interleaved with the other
rows' modules resident.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ..precision import rel_l2

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
