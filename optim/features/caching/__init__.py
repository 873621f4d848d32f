"""Step caching for FLUX.2: skip the transformer's blocks on steps whose result barely changes.

Methods (`CacheSettings.method`), one module each, with its own settings and per-branch state:
- "fbcache": First Block Cache, the relative change of the first block's residual (fbcache.py);
- "teacache": TeaCache, the rescaled relative L1 change of the first block's modulated input (teacache.py);
- "magcache", "taylorseer": diffusers' own hooks, which do run on Flux2Transformer2DModel (magcache.py,
  taylorseer.py, sharing diffusers_cache.py).
Shared: decision.py (the skip gate, per-branch state, statistics: layout-independent), transformer_hook.py (the one
install mechanism: a diffusers ModelHook that also follows the pipeline's cache_context), blocks.py (the FLUX.2 block
runner fbcache and teacache use).

A handle asks for caching with `ModelHandle.cache = CacheSettings(...)` (what the cache node's widgets say; each
method's module translates it into its own settings); `FEATURE.activate` installs the cache on the shared
transformer for exactly one run, with fresh state, and removes it when the run ends, however it ends.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import math
from dataclasses import dataclass

from ...errors import InputError
from ...models.arch import family_of
from ..api import Feature
from .decision import SkipGate

log = logging.getLogger("flux2_accel")

METHODS = ("fbcache", "teacache", "magcache", "taylorseer")  # each the name of its module here
# Starting points per method. fbcache: 0.12 gave ~2x on FLUX.1. teacache: with the [dev] polynomial every step adds
# at least ~0.05, so 0.1 skips about every other step in the smooth middle of a run. magcache: diffusers' default.
DEFAULT_THRESHOLDS = {"fbcache": 0.12, "teacache": 0.1, "magcache": 0.06, "taylorseer": 1.0}


@dataclass(frozen=True)
class CacheSettings:
    """How to cache steps. Frozen and hashable: it lives inside a ModelHandle.

    These are the cache node's widgets; each method's module reads them into its own settings (see there).
    threshold: 0 turns caching off. For fbcache, the relative change of the first block's residual below which a
    step reuses the previous one (0.08-0.12 on FLUX.1); for teacache, the accumulated rescaled change; for magcache,
    the accumulated magnitude error; taylorseer ignores its value beyond on/off.
    start_percent / end_percent: fractions (0..1) of the run's steps between which steps may be skipped.
    max_consecutive_cached: at most this many skipped steps in a row (0 = no limit).
    warmup_steps: the first steps are always computed.
    coefficients: TeaCache rescaling polynomial (highest power first); empty = the model family's default.
    min_steps: runs with fewer steps than this never skip (distilled 4-step runs gain little and lose quality);
    0 caches any run. See decision.py.
    """

    method: str = "fbcache"
    threshold: float = 0.12
    start_percent: float = 0.0
    end_percent: float = 1.0
    max_consecutive_cached: int = 3
    warmup_steps: int = 1
    coefficients: tuple[float, ...] = ()
    min_steps: int = 6

    @property
    def enabled(self) -> bool:
        return self.threshold > 0

    @property
    def gate(self) -> SkipGate:
        """The skip gate every method shares (decision.py)."""
        return SkipGate(warmup_steps=self.warmup_steps, start_percent=self.start_percent,
                        end_percent=self.end_percent, max_consecutive_cached=self.max_consecutive_cached,
                        min_steps=self.min_steps)

    def validate(self) -> None:
        if self.method not in METHODS:
            raise InputError(f"cache method is '{self.method}': choose one of {', '.join(METHODS)}.")
        if not math.isfinite(self.threshold) or self.threshold < 0:
            raise InputError(f"cache threshold is {self.threshold}: it must be 0 (off) or positive.")
        for name in ("start_percent", "end_percent"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise InputError(f"cache {name} is {value}: it is a fraction of the steps, between 0 and 1.")
        if self.start_percent >= self.end_percent:
            raise InputError(f"cache start_percent ({self.start_percent}) must be below end_percent "
                             f"({self.end_percent}), or no step could ever be skipped.")
        if self.max_consecutive_cached < 0:
            raise InputError(f"max_consecutive_cached is {self.max_consecutive_cached}: use 0 (no limit) or more.")
        if self.warmup_steps < 0:
            raise InputError(f"warmup_steps is {self.warmup_steps}: it cannot be negative.")
        if self.min_steps < 0:
            raise InputError(f"min_steps is {self.min_steps}: use 0 (cache runs of any length) or more.")
        if self.coefficients and not all(math.isfinite(c) for c in self.coefficients):
            raise InputError("TeaCache coefficients must be finite numbers (highest power first).")


def parse_coefficients(text: str) -> tuple[float, ...]:
    """'1.2, -3e-2, 0.05' -> (1.2, -0.03, 0.05); empty text -> () (the family default)."""
    text = (text or "").strip().strip("[]")
    if not text:
        return ()
    try:
        return tuple(float(part) for part in text.replace(";", ",").split(",") if part.strip())
    except ValueError:
        raise InputError(f"TeaCache coefficients '{text}' are not a comma-separated list of numbers, e.g. the "
                         "output of `flux2-accel calibrate-teacache`.") from None


def cache_settings(method: str, threshold: float, start_percent: float, end_percent: float,
                   max_consecutive_cached: int, warmup_steps: int, teacache_coefficients: str = "",
                   min_steps: int = CacheSettings.min_steps) -> CacheSettings:
    """Validated settings from the Step Cache node's widgets (or `generate`'s --cache flags, named after them)."""
    settings = CacheSettings(method, float(threshold), float(start_percent), float(end_percent),
                             int(max_consecutive_cached), int(warmup_steps), parse_coefficients(teacache_coefficients),
                             int(min_steps))
    settings.validate()
    return settings


@contextlib.contextmanager
def activate(store, transformer, handle, report):
    settings = handle.cache
    if settings is None or not settings.enabled:
        yield
        return
    settings.validate()
    from diffusers import Flux2Transformer2DModel

    # By class, not by name prefix: FLUX.1 and FLUX.2 transformers share the "Flux" prefix (para-attn's adapter
    # picking by name goes wrong exactly there).
    if not isinstance(transformer, Flux2Transformer2DModel):
        raise InputError(f"step caching supports FLUX.2 transformers (Flux2Transformer2DModel); got "
                         f"{type(transformer).__name__}.")
    method = importlib.import_module(f".{settings.method}", __package__)  # one module per method, named after it
    params = getattr(report, "params", None)
    run = method.new_run(settings, getattr(params, "steps", None), handle.family or family_of(transformer))
    # Too few steps: the gate refuses every skip, so no method (diffusers' own hooks included) is installed; the
    # calls are only counted.
    # The modules that load torch are imported here, by name, as the methods are: this package stays torch-free
    # for `flux2-accel --help`.
    installed = (importlib.import_module(".transformer_hook", __package__).counted_only if run.skips_nothing
                 else method.installed)
    try:
        with installed(transformer, run):
            yield
    finally:
        stats = run.stats()
        report.stats["cache"] = stats
        log.info("flux2-accel step cache: %s computed %d, skipped %d of %d transformer calls, about %.2f s saved",
                 stats["method"], stats["computed_steps"], stats["skipped_steps"], stats["total_steps"],
                 stats["estimated_time_saved_s"])
        if "note" in stats:
            log.info("flux2-accel step cache: %s", stats["note"])


def _decides_in_forward(handle) -> bool:
    return handle.cache is not None and handle.cache.enabled


FEATURE = Feature("caching", activate, decides_in_forward=_decides_in_forward)
