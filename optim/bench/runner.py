"""The bench's runner: options, the rows' timing loop (sequential or round-robin, paired speedups), and the
machine description. `flux2-accel bench` (this package's __init__) and the device check (device_check.py) call
`run_bench`."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import platform
import signal
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

import diffusers

from ..devices import torch_device
from ..errors import InputError
from ..features import registry as features  # noqa: F401 (loaded before the memory floor is read)
from ..run import engine  # noqa: F401 (loaded before the memory floor is read)
from .measure import median, speedup
from .models import CONFIGS, REAL_CONFIGS, BenchModel
from .rows import (DEFAULT_ROWS, ERROR, OK, ROW_NAMES, ROWS, UNAVAILABLE, BenchContext, RowResult, Unavailable,
                   fidelity, release)
from .settings import DEFAULT_CONFIG, DEFAULT_REPEATS, DEFAULT_SIZE, DEFAULT_STEPS, DEFAULT_WARMUP, SEED

log = logging.getLogger("flux2_accel")

WORKDIR_PREFIX = "flux2-accel-bench-"
FAIL_ROWS_ENV = "FLUX2_ACCEL_BENCH_FAIL_ROWS"  # test hook: comma-separated rows that raise when they start


@dataclass(frozen=True)
class BenchOptions:
    config: str = DEFAULT_CONFIG
    height: int = DEFAULT_SIZE
    width: int = DEFAULT_SIZE
    steps: int = DEFAULT_STEPS
    repeats: int = DEFAULT_REPEATS
    warmup: int = DEFAULT_WARMUP
    device: str = "cpu"
    rows: tuple[str, ...] = DEFAULT_ROWS
    text_tokens: int | None = None  # None: 512 for the real sizes (what the pipelines pad prompts to), else 32
    seed: int = SEED
    guidance: float = 4.0
    interleave: bool | None = None  # None: interleave unless the real sizes (their modules would not fit together)
    attention_backend: str = "sdpa"  # every pack row's (features.attention.BACKENDS); the attn-* rows set their own
    compile_backend: str = "inductor"  # torch.compile backend of the compile and all-on rows
    warmup_steps: int | None = None  # steps of a warm-up run (same shapes, so everything is warm); None: --steps
    cold_process_compile: bool = True  # the compile row also compiles in a fresh process (cold compile time)
    deadline_s: float | None = None  # rows not started this many seconds after the start are not run (reported)
    temp_dir: str | None = None  # where the run's work folder (flux2-accel-bench-*) goes; None: the system's temp

    def validate(self) -> None:
        from ..features.attention import BACKENDS

        if self.attention_backend not in BACKENDS:
            raise InputError(f"--attention-backend is '{self.attention_backend}': choose one of "
                             f"{', '.join(BACKENDS)}.")
        if self.warmup_steps is not None and self.warmup_steps < 1:
            raise InputError(f"--warmup-steps is {self.warmup_steps}: it must be at least 1.")
        if self.config not in CONFIGS:
            raise InputError(f"--config is '{self.config}': choose one of {', '.join(CONFIGS)}.")
        unknown = [r for r in self.rows if r not in ROW_NAMES]
        if unknown:
            raise InputError(f"--rows names unknown rows {', '.join(unknown)}: choose from {', '.join(ROW_NAMES)}.")
        for name, low in (("steps", 1), ("repeats", 1), ("warmup", 0)):
            if getattr(self, name) < low:
                raise InputError(f"--{name} is {getattr(self, name)}: it must be at least {low}.")
        if self.text_tokens is not None and self.text_tokens < 1:
            raise InputError(f"--text-tokens is {self.text_tokens}: it must be at least 1.")
        torch_device(self.device)

    @property
    def interleaved(self) -> bool:
        return self.config not in REAL_CONFIGS if self.interleave is None else self.interleave

    @property
    def tokens(self) -> int:
        if self.text_tokens is not None:
            return self.text_tokens
        return 512 if self.config in REAL_CONFIGS else 32


def run_bench(options: BenchOptions, progress=None, on_row=None) -> tuple[list[RowResult], dict]:
    """Run the rows of `options` (baseline always first: it is the reference). Returns the rows, in the order asked
    (baseline first), and a description of the machine. on_row(results): called with every row's result so far
    each time a row is done (the device check writes its JSON then, so a run cut short still leaves one)."""
    from ..run.sampling import SamplingParams

    options.validate()
    say = progress or (lambda text: None)
    device = torch.device(options.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    model = BenchModel(options.config, CONFIGS[options.config], device, options.seed)
    params = SamplingParams(width=options.width, height=options.height, steps=options.steps,
                            guidance=options.guidance, seed=options.seed)
    _import_everything()
    vae = model.vae()
    params.validate(multiple=2 ** (len(vae.config.block_out_channels) - 1) * 2)
    names = ["baseline"] + [n for n in options.rows if n != "baseline"]
    rows = [r for name in names for r in ROWS if r.name == name]
    results = {r.name: RowResult(r.name, OK, options.config, str(device), options.steps, r.description)
               for r in rows}
    warm_params = (params if options.warmup_steps is None
                   else dataclasses.replace(params, steps=min(options.warmup_steps, options.steps)))
    with terminate_unwinds(), tempfile.TemporaryDirectory(prefix=WORKDIR_PREFIX, dir=options.temp_dir) as workdir:
        ctx = BenchContext(model, params, model.prompt_embeds(options.tokens), vae, options.warmup, Path(workdir),
                           warm_params=warm_params, attention_backend=options.attention_backend,
                           compile_backend=options.compile_backend,
                           cold_process_compile=options.cold_process_compile)
        bench = _Bench(ctx, results, say, paired=options.interleaved, on_row=on_row,
                       deadline=None if options.deadline_s is None else time.monotonic() + options.deadline_s)
        if options.interleaved:
            bench.interleaved(rows, options.repeats)
        else:
            bench.sequential(rows, options.repeats)
    machine = machine_description(device)
    if ctx.calibrated_threshold is not None:
        machine["fbcache_half_threshold"] = ctx.calibrated_threshold
        machine["fbcache_half_skips_on_baseline"] = ctx.calibrated_skips
    return list(results.values()), machine


@contextlib.contextmanager
def terminate_unwinds():
    """SIGTERM raises SystemExit(143) while the block runs, as SIGINT raises KeyboardInterrupt, so a bench stopped
    either way unwinds and removes its work folder (the default SIGTERM action ends the process on the spot). Only in
    the main thread, where Python runs signal handlers; the previous handler comes back afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def injected_failures() -> set[str]:
    """Rows the test hook FLUX2_ACCEL_BENCH_FAIL_ROWS asks to fail (the device check's test proves a failed row is
    recorded and the next one runs)."""
    return {n.strip() for n in os.environ.get(FAIL_ROWS_ENV, "").split(",") if n.strip()}


class _Bench:
    """Drives the rows' stages; a row that raises is marked and the others go on (the baseline must not fail)."""

    def __init__(self, ctx: BenchContext, results: dict[str, RowResult], say, paired: bool, on_row=None,
                 deadline: float | None = None):
        self.ctx, self.results, self.say = ctx, results, say
        self.paired = paired  # repeat k of every row ran in one round: compare rows round by round
        self.reference = None  # (latent, image, RowResult) of the baseline
        self.on_row = on_row or (lambda results: None)
        self.deadline = deadline
        self.fail = injected_failures()

    def _stage(self, name: str, stage, *args):
        try:
            return stage(*args)
        except Unavailable as e:
            self.results[name].status, self.results[name].reason = UNAVAILABLE, str(e)
        except Exception as e:  # reported in the row; the other rows still run
            if name == "baseline":
                raise
            log.debug("bench row %s failed:\n%s", name, traceback.format_exc())
            self.results[name].status, self.results[name].reason = ERROR, f"{type(e).__name__}: {e}"
        self.say(f"bench: {name} {self.results[name].status} ({self.results[name].reason})")
        return None

    def _build(self, row):
        if row.name in self.fail:
            raise RuntimeError(f"injected failure ({FAIL_ROWS_ENV})")
        return row.start(self.ctx)

    def _start(self, row):
        if row.name != "baseline" and self.deadline is not None and time.monotonic() > self.deadline:
            self.results[row.name].status = UNAVAILABLE
            self.results[row.name].reason = "not run: the time budget for starting rows was spent"
            self.say(f"bench: {row.name} skipped (time budget)")
            return None
        self.say(f"bench: {row.name}: building and warming up")
        run = self._stage(row.name, self._build, row)
        if run is not None and self._stage(row.name, self._warm, run) is None:
            run.close()
            return None
        return run

    @staticmethod
    def _warm(run):
        run.warm()
        return True

    def _timed(self, name: str, run) -> bool:
        if self._stage(name, self._timed_once, run) is None:
            run.close()
            return False
        return True

    @staticmethod
    def _timed_once(run):
        run.timed()
        return True

    def _finish(self, name: str, run) -> None:
        from ..run.latents import decode

        measured = self._stage(name, run.result)
        run.close()
        if measured is None:
            return
        result = self.results[name]
        _fill(result, measured, self.ctx.params)
        image = decode(self.ctx.vae, measured.latent)
        if self.reference is None:
            self.reference = (measured.latent, image, result)
        reference_latent, reference_image, baseline = self.reference
        fidelity(result, measured.latent, reference_latent, image, reference_image)
        ratio = speedup(baseline.run_seconds, result.run_seconds, self.paired, reference=result is baseline)
        result.speedup_vs_baseline, result.speedup_verdict = ratio.value, ratio.verdict
        result.speedup_min, result.speedup_max, result.speedup_rounds = ratio.low, ratio.high, ratio.rounds
        self.say(f"bench: {name} ok, {result.sec_per_step:.4f} s/step")

    def sequential(self, rows, repeats: int) -> None:
        for row in rows:
            run = self._start(row)
            if run is not None and all(self._timed(row.name, run) for _ in range(repeats)):
                self._finish(row.name, run)
            run = None
            release()  # a failed row's memory too: its module went with `run` and the exception
            self.on_row(self.results)

    def interleaved(self, rows, repeats: int) -> None:
        """Every row built and warmed, then timed round-robin: repeat k of every row before repeat k+1 of any."""
        runs = {}
        for row in rows:
            run = self._start(row)
            if run is not None:
                runs[row.name] = run
        for k in range(repeats):
            self.say(f"bench: timed round {k + 1}/{repeats} over {len(runs)} rows")
            for name in list(runs):
                if not self._timed(name, runs[name]):
                    del runs[name]
        for name in list(runs):
            self._finish(name, runs.pop(name))
        release()
        self.on_row(self.results)


def _fill(result: RowResult, measured, params) -> None:
    """Copy a row's measurement into its result; times per step from the median timed run (a batch of one)."""
    result.run_seconds = [round(s, 6) for s in measured.run_seconds]
    result.sec_per_image = median(measured.run_seconds) / params.batch_size
    result.sec_per_step = result.sec_per_image / params.steps
    for name in ("weight_bytes", "peak_mem_bytes", "peak_vram_bytes", "computed_steps", "skipped_steps",
                 "compile_s_cold", "compile_s_warm", "recompiles"):
        setattr(result, name, getattr(measured, name))
    result.stats = measured.stats
    result.note = measured.note


def _import_everything() -> None:
    """Load the libraries before the memory floor is read, so a row's peak counts what the row holds."""
    from diffusers import AutoencoderKLFlux2, Flux2KleinPipeline, Flux2Pipeline, Flux2Transformer2DModel  # noqa: F401


def machine_description(device: torch.device) -> dict:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    desc = {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "load_average_1min": _load_average(),
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "diffusers": diffusers.__version__}
    if device.type == "cuda":
        desc["gpu"] = torch.cuda.get_device_name(device)
        desc["cuda"] = torch.version.cuda
        desc["compute_capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
    from ..features.attention import resolve

    auto = resolve("auto", device, torch.bfloat16)
    desc["attention_auto"] = auto.backend  # what attention_backend "auto" picks here (diffusers' name)
    return desc


def _load_average() -> float | None:
    """Other processes' CPU use at the end of the run: on a shared machine it explains noisy timings."""
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


# ---------------------------------------------------------------- command line
