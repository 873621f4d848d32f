"""The benchmark's rows: what each one runs, and how it is measured.

`baseline` is bare diffusers (Flux2Pipeline / Flux2KleinPipeline built here from diffusers alone, a scheduler from
FLUX.2's shipped config, embeddings in, latents out): no pack code on its path. Every other row goes through the
pack's own run path, exactly as the sampler node does: a `ModelHandle` asking for the feature, and
`optim.run.engine.run` (the store switching the registered features on for the run, then sampling; the bench decodes
outside the timing).

Each row gets a fresh `ModelStore` holding its own transformer built from the same seed (`BenchModel.transformer`),
injected under the handle's base key with the precision applied as `ModelStore.transformer` applies it, so no row
sees another's precision, adapters, compiled code or cache state.
"""

from __future__ import annotations

import dataclasses
import gc
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import save_file

from ..features.caching.fbcache import relative_change
from ..features.compile import CompileSettings
from ..handle import ModelHandle, VaeHandle
from ..features.parallel_settings import ParallelSettings
from ..models.precision import apply_precision, fast_fp8_supported, psnr, weight_bytes
from ..parallel import group
from ..run import engine
from ..run.sampling import float32_latents
from ..run.store import ModelStore
from .compile_time import fresh_process_compile
from .measure import PeakMemory, Stopwatch, latent_deviation, median
from .models import SCHEDULER_CONFIG, BenchModel
from .settings import DEFAULT_ROWS, GPU_ONLY_ROWS, MULTI_DEVICE_ROWS, ROW_NAMES  # noqa: F401 (re-exported)

OK, UNAVAILABLE, ERROR = "ok", "unavailable", "error"


class Unavailable(Exception):
    """This machine cannot run what a row measures (the row is reported `unavailable`, with the reason)."""


# ---------------------------------------------------------------- results

@dataclass
class RowResult:
    """One row of the table and of the JSON file (docs/benchmark.md describes every field)."""

    name: str
    status: str
    config: str
    device: str
    steps: int
    description: str = ""
    reason: str | None = None  # why a row is unavailable or failed
    note: str | None = None  # how to read a row that ran
    sec_per_step: float | None = None
    sec_per_image: float | None = None
    speedup_vs_baseline: float | None = None  # the median ratio; read it with speedup_verdict (measure.Speedup)
    speedup_min: float | None = None  # the spread of the ratios it is the median of
    speedup_max: float | None = None
    speedup_rounds: int | None = None  # timed rounds it is over
    speedup_verdict: str | None = None  # reference, clear, within noise, too few rounds
    peak_mem_bytes: int | None = None
    peak_vram_bytes: int | None = None  # CUDA only: torch.cuda.max_memory_allocated over the timed runs
    weight_bytes: int | None = None
    computed_steps: int | None = None
    skipped_steps: int | None = None
    compile_s_cold: float | None = None
    compile_s_warm: float | None = None
    recompiles: int | None = None
    max_abs_diff: float | None = None
    rel_l2: float | None = None
    psnr: float | None = None
    run_seconds: list[float] = field(default_factory=list)  # every timed repeat, in order
    stats: dict = field(default_factory=dict)  # what the pack's features reported (RunReport.stats)

    def to_json(self) -> dict:
        out = dict(self.__dict__)
        if out["psnr"] is not None and out["psnr"] == float("inf"):
            out["psnr"] = "inf"  # identical images; JSON has no infinity
        return out


@dataclass
class Measured:
    """What a row's run hands back; the bench turns it into a RowResult."""

    run_seconds: list[float]
    latent: torch.Tensor
    weight_bytes: int | None = None
    peak_mem_bytes: int | None = None
    peak_vram_bytes: int | None = None
    computed_steps: int | None = None
    skipped_steps: int | None = None
    compile_s_cold: float | None = None
    compile_s_warm: float | None = None
    recompiles: int | None = None
    stats: dict = field(default_factory=dict)
    note: str | None = None


@dataclass
class BenchContext:
    model: BenchModel
    params: Any  # optim.run.sampling.SamplingParams
    prompt_embeds: torch.Tensor
    vae: torch.nn.Module
    warmup: int
    workdir: Path
    warm_params: Any = None  # the warm-up runs' parameters (fewer steps, same shapes); None: `params`
    attention_backend: str = "sdpa"  # what every pack row asks for (features.attention.BACKENDS), attn-* rows aside
    compile_backend: str = "inductor"  # torch.compile backend of the compiling rows
    cold_process_compile: bool = True  # the compile row also times a cold compile in a fresh process
    first_block_residuals: list = field(default_factory=list)  # the baseline's, per step (FirstBlockRecorder)
    calibrated_threshold: float | None = None  # fixed by the first row that asks (`fbcache_half_threshold`)
    calibrated_skips: int | None = None  # what it skips on the baseline's trajectory
    model_files: tuple[Path, Path, int] | None = None  # (transformer, vae, weight bytes), written by `written_model`

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def can_calibrate(self) -> bool:
        return self.calibrated_threshold is not None or len(self.first_block_residuals) >= MIN_CALIBRATION_STEPS

    def fbcache_half_threshold(self) -> float:
        """A First Block Cache threshold that skips about half the steps on these weights (whatever their per-step
        change: 0.4-0.8 on random weights, about 0.1 on real FLUX weights): found by replaying the cache's decision,
        gate included, on the first-block residuals the baseline recorded (`half_skip_threshold`)."""
        if self.calibrated_threshold is None:
            if not self.can_calibrate:
                raise RuntimeError("fbcache-half calibrates from the baseline's first-block residuals, and the "
                                   f"baseline has not run yet with {MIN_CALIBRATION_STEPS} steps or more")
            from ..features.caching import CacheSettings

            threshold, skips = half_skip_threshold(
                self.first_block_residuals,
                lambda t: CacheSettings(method="fbcache", threshold=t, min_steps=0).gate)
            self.calibrated_threshold, self.calibrated_skips = round(threshold, 6), skips
        return self.calibrated_threshold

    def written_model(self) -> tuple[Path, Path, int]:
        """The seeded transformer (bf16) and VAE as .safetensors files in the bench's folder, once per bench run:
        rows whose models load in other processes (the parallel ranks) read them as a user's files."""
        if self.model_files is None:
            transformer = self.model.transformer()
            files = (self.workdir / "transformer.safetensors", self.workdir / "vae.safetensors")
            save_file({k: v.cpu().contiguous() for k, v in transformer.state_dict().items()}, str(files[0]))
            save_file({k: v.cpu().float().contiguous() for k, v in self.vae.state_dict().items()}, str(files[1]))
            self.model_files = (*files, weight_bytes(transformer))
            del transformer
            release()
        return self.model_files

    def conditioning(self):
        from ..models.text_encoding import Flux2Conditioning

        return Flux2Conditioning(prompt_embeds=self.prompt_embeds, family="mistral" if self.model.family == "dev"
                                 else "qwen3", encoder_identity=f"bench-random-{self.model.seed}")


# ---------------------------------------------------------------- one row's run, in stages

class RowRun:
    """A row in three stages, so the bench can run rows one after another or interleave their timed runs (on a
    shared machine, load that drifts over minutes then hits every row alike).

    `__init__` builds what the row needs (raising `Unavailable` if this machine cannot run it), `warm()` runs the
    untimed runs, each `timed()` call one timed run, and `result()` collects the measurement.
    """

    module: torch.nn.Module

    def __init__(self, ctx: BenchContext):
        self.ctx = ctx
        self.times: list[float] = []
        self.transient: int | None = None
        self.latent: torch.Tensor | None = None
        self.stats: dict = {}
        self.counter: BlockCounter | None = None
        self.note: str | None = None

        self.device_peak: int | None = None

    def run_once(self, params=None) -> torch.Tensor:
        """One run with `params` (None: the bench's); returns the latents."""
        raise NotImplementedError

    def warm(self) -> None:
        for _ in range(self.ctx.warmup):
            self.run_once(self.ctx.warm_params)

    def timed(self) -> None:
        if self.counter is not None:
            self.counter.count = 0
        with PeakMemory(self.ctx.device) as peak, Stopwatch(self.ctx.device) as watch:
            self.latent = self.run_once()
        self.times.append(watch.seconds)
        if peak.bytes is not None:
            self.transient = max(self.transient or 0, peak.bytes)
        if peak.device_peak is not None:
            self.device_peak = max(self.device_peak or 0, peak.device_peak)

    def result(self) -> Measured:
        weights = weight_bytes(self.module)
        m = Measured(self.times, self.latent, weights, None if self.transient is None else weights + self.transient,
                     peak_vram_bytes=self.device_peak, stats=_plain(self.stats), note=self.note)
        steps = self.ctx.params.steps
        cache = self.stats.get("cache")
        if cache:
            m.computed_steps, m.skipped_steps = cache["computed_steps"], cache["skipped_steps"]
            if self.counter is not None and self.counter.count != m.computed_steps:
                m.note = (f"the cache reports {m.computed_steps} computed steps but the last block ran "
                          f"{self.counter.count} times")
        elif self.counter is not None:
            m.computed_steps, m.skipped_steps = self.counter.count, steps - self.counter.count
        return m

    def close(self) -> None:
        if self.counter is not None:
            self.counter.remove()


class FirstBlockRecorder:
    """Keeps, per step, the first block's residual (its output minus its input: the signal First Block Cache
    compares), subsampled to at most SAMPLE_ELEMENTS values and left on the device until the run ends, so nothing is
    synchronized during a timed run. `residuals` holds the last run's once it ended (`end_run`)."""

    SAMPLE_ELEMENTS = 1 << 18

    def __init__(self, transformer):
        self._pending: list[torch.Tensor] = []
        self.residuals: list[torch.Tensor] = []
        self._hook = transformer.transformer_blocks[0].register_forward_hook(self._seen, with_kwargs=True)

    def _seen(self, module, args, kwargs, output):
        before = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        flat = (output[1] - before).flatten()
        stride = max(1, flat.numel() // self.SAMPLE_ELEMENTS)
        self._pending.append(flat[::stride].float())

    def end_run(self) -> list[torch.Tensor]:
        residuals = [r.cpu() for r in self._pending]
        self._pending = []
        return residuals

    def remove(self) -> None:
        self._hook.remove()


def simulate_skips(residuals: list[torch.Tensor], threshold: float, gate) -> int:
    """Steps First Block Cache would skip on this trajectory at `threshold`: each step compares its residual with the
    one of the last computed step; `gate` (a caching SkipGate) has the last word, as in the cache."""
    total, skipped, consecutive, last = len(residuals), 0, 0, None
    for i, residual in enumerate(residuals):
        if (last is not None and gate.allows(i, consecutive, total)
                and relative_change(residual, last) < threshold):
            skipped, consecutive = skipped + 1, consecutive + 1
        else:
            last, consecutive = residual, 0
    return skipped


def half_skip_threshold(residuals: list[torch.Tensor], gate_for) -> tuple[float, int]:
    """A threshold at which First Block Cache skips about half the steps (within n/8) of the recorded trajectory.

    Candidates lie halfway between two consecutive values of the trajectory's own changes (every step against every
    earlier one, as the cache may compare them); of those that skip about half, the one in the widest gap, so a
    slightly different run (fp8 weights, compiled kernels, the trajectory the skipping itself bends) makes the same
    decisions. gate_for(threshold) -> the cache's SkipGate. Returns (threshold, steps it skips on the trajectory)."""
    n = len(residuals)
    values = sorted({relative_change(residuals[i], residuals[j]) for i in range(n) for j in range(i)})
    if not values:
        raise RuntimeError("fbcache-half needs a trajectory of 2 steps or more to calibrate from")
    gaps = [(values[0] / 2, 1.0)] + [((a + b) / 2, (b - a) / (b + a)) for a, b in zip(values, values[1:])]
    scored = [(t, gap, simulate_skips(residuals, t, gate_for(t))) for t, gap in gaps]
    near_half = [c for c in scored if abs(c[2] - n / 2) <= max(1.0, n / 8)]
    if near_half:
        t, _, skips = max(near_half, key=lambda c: c[1])
    else:  # the gate allows no such count (few steps): the closest one
        t, _, skips = min(scored, key=lambda c: (abs(c[2] - n / 2), -c[1]))
    return t, skips


class BlockCounter:
    """Counts the transformer's last block running: once per step whose blocks were really computed."""

    def __init__(self, transformer):
        blocks = transformer.single_transformer_blocks or transformer.transformer_blocks
        self.count = 0
        self._hook = blocks[-1].register_forward_hook(self._seen)

    def _seen(self, module, args, output):
        self.count += 1

    def remove(self) -> None:
        self._hook.remove()


# ---------------------------------------------------------------- baseline: bare diffusers

class BaselineRun(RowRun):
    def __init__(self, ctx: BenchContext):
        super().__init__(ctx)
        from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Pipeline

        self.module = ctx.model.transformer()
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(SCHEDULER_CONFIG)
        if ctx.model.family == "dev":
            self.pipe = Flux2Pipeline(scheduler=scheduler, vae=ctx.vae, text_encoder=None, tokenizer=None,
                                      transformer=self.module)
        else:
            self.pipe = Flux2KleinPipeline(scheduler=scheduler, vae=ctx.vae, text_encoder=None, tokenizer=None,
                                           transformer=self.module, is_distilled=True)
        self.pipe.set_progress_bar_config(disable=True)
        self.counter = BlockCounter(self.module)
        self.recorder = FirstBlockRecorder(self.module)  # what fbcache-half calibrates its threshold from
        self.factor = 2 ** (len(ctx.vae.config.block_out_channels) - 1) * 2

    def run_once(self, params=None) -> torch.Tensor:
        latent = self._sample(params or self.ctx.params)
        residuals = self.recorder.end_run()
        if len(residuals) >= len(self.ctx.first_block_residuals):  # keep the longest run's
            self.ctx.first_block_residuals = residuals
        return latent

    def close(self) -> None:
        super().close()
        self.recorder.remove()

    def _sample(self, p) -> torch.Tensor:
        last = {}

        def keep_latents(pipeline, step, timestep, kwargs):
            last["latents"] = kwargs["latents"]
            return {}

        # float32 prompt embeddings and latents, as every sampler of the pack and ComfyUI's keep them (sampling.py)
        with float32_latents(self.module):
            self.pipe(prompt_embeds=self.ctx.prompt_embeds.to(self.ctx.device, torch.float32), height=p.height,
                      width=p.width, num_inference_steps=p.steps, guidance_scale=p.guidance,
                      num_images_per_prompt=p.batch_size, generator=torch.Generator("cpu").manual_seed(p.seed),
                      output_type="latent", callback_on_step_end=keep_latents)
        packed = last["latents"]  # [B, h*w, C], row-major
        b, _, c = packed.shape
        h, w = p.height // self.factor, p.width // self.factor
        return packed.reshape(b, h, w, c).permute(0, 3, 1, 2).float().cpu()


# ---------------------------------------------------------------- the pack's path

class PackRun(RowRun):
    """The pack's path from handle to latents: a store holding this row's own base module, `prepared`, `sample`.

    `handle_for(i)` gives the handle of the row's i-th run (warmups included); by default the row's handle."""

    def __init__(self, ctx: BenchContext, precision: str = "bf16", count_blocks: bool = True, **handle_fields):
        super().__init__(ctx)
        self.store = ModelStore()
        self.handle = ModelHandle(source=f"<bench {ctx.model.name} seed {ctx.model.seed}>", precision=precision,
                                  family=ctx.model.family, attention_backend=ctx.attention_backend
                                  ).replace(**handle_fields)
        # What ModelStore.transformer does with a loaded file, with the file replaced by the seeded build.
        self.module = self.store.get(self.handle.base_key,
                                     lambda: apply_precision(ctx.model.transformer(), precision))
        self.vae = VaeHandle(source=f"<bench {ctx.model.name} vae>")
        self.store.get(self.vae.base_key, lambda: ctx.vae)
        self.conditioning = ctx.conditioning()
        self.counter = BlockCounter(self.module) if count_blocks else None
        self.runs = 0
        # The cache threshold is fbcache-half's, fixed at the first run after the baseline's first: one after
        # another, the baseline ran before this row started; interleaved, before this row's first timed run.
        self.calibrate_cache = False

    def handle_for(self, i: int):
        return self.handle

    def run_once(self, params=None) -> torch.Tensor:
        if self.calibrate_cache and (params is None or self.ctx.can_calibrate):
            # A warm-up run before the baseline ran in full (interleaved) keeps the placeholder: it only warms.
            self.calibrate_cache = False
            self.handle = self.handle.replace(cache=dataclasses.replace(
                self.handle.cache, threshold=self.ctx.fbcache_half_threshold()))
        handle = self.handle_for(self.runs)
        self.runs += 1
        result = engine.run(handle, self.vae, self.conditioning, params or self.ctx.params, store=self.store,
                            device=self.ctx.device, decode=False)
        if handle.offload != "none":  # offloading parks the shared VAE on the CPU: the fidelity decode needs it back
            self.ctx.vae.to(self.ctx.device)
        self.stats = result.report.stats
        return result.latent


def _plain(stats: dict) -> dict:
    """Feature statistics as JSON-safe values."""
    def conv(v):
        if isinstance(v, dict):
            return {str(k): conv(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, (str, int, float, bool)) or v is None:
            return v
        if torch.is_tensor(v) and v.numel() == 1:
            return v.item()
        return repr(v)
    return conv(stats)


def precision_row(precision: str) -> Callable[[BenchContext], RowRun]:
    def start(ctx: BenchContext) -> RowRun:
        run = PackRun(ctx, precision)
        if precision == "fp8_e4m3fn_fast":
            if not fast_fp8_supported(ctx.device):
                run.note = "fp8 matmuls need a CUDA GPU of compute capability 8.9+: ran as fp8_e4m3fn (fp8 storage)"
        return run
    return start


def cache_row(method: str, threshold: float | str | None) -> Callable[[BenchContext], RowRun]:
    """Step caching with `method` at `threshold` (None: the method's default; "half": calibrated from the baseline
    to skip about half the steps, see `BenchContext.fbcache_half_threshold`)."""
    def start(ctx: BenchContext) -> RowRun:
        from ..features.caching import DEFAULT_THRESHOLDS, CacheSettings

        value = (DEFAULT_THRESHOLDS[method] if threshold is None
                 else PLACEHOLDER_THRESHOLD if threshold == "half" else threshold)
        # min_steps=0: a row measures the method at the bench's step count, short runs included.
        settings = CacheSettings(method=method, threshold=value, min_steps=0)
        run = CacheRun(ctx, cache=settings)
        run.calibrate_cache = threshold == "half"
        if threshold == 0:
            run.note = "threshold 0 switches the cache off: the pack runs every step uncached"
        return run
    return start


class CacheRun(PackRun):
    def result(self) -> Measured:
        m = super().result()
        m.stats["settings"] = {"method": self.handle.cache.method, "threshold": self.handle.cache.threshold}
        if "cache" in self.stats and self.handle.cache.threshold == 0:
            m.note = None  # the feature did install itself at threshold 0
        return m


# ---------------------------------------------------------------- compile

class CompileRun(PackRun):
    """Regional compile through the compile feature, timed once compiled; `handle_fields` add other features (the
    all-on row).

    `compile_s_cold`: with `cold_process`, the compile seconds of a fresh process starting from an empty cache folder
    (`compile_time.fresh_process_compile`), run before this row builds its model, so a real-size model is never
    resident twice; `compile_s_warm` is then this row's own first compile, from the folder that process filled (what
    a second ComfyUI start pays). Without `cold_process` (the device check, where a second process building a
    32B model costs a minute), `compile_s_cold` is this row's own first compile, from an empty folder, and
    `compile_s_warm` is null. Either way the bench process has compiled nothing before (dynamo is reset).
    `recompiles`: graphs dynamo compiled during the timed runs (0 when the compiled code is reused). The last block
    is not hooked: a hook would be traced into the compiled graph."""

    live = 0  # compiling rows built and not yet closed

    def __init__(self, ctx: BenchContext, precision: str = "bf16", cold_process: bool | None = None,
                 **handle_fields):
        p = ctx.params
        cache_dir = str(ctx.workdir / f"compile-cache-{id(self)}")
        self.cold_process = ctx.cold_process_compile if cold_process is None else cold_process
        self.cold = None
        if self.cold_process:
            self.cold = fresh_process_compile(ctx.model.name, p.height, p.width, str(ctx.device),
                                              text_tokens=ctx.prompt_embeds.shape[1], cache_dir=cache_dir)
        super().__init__(ctx, precision, count_blocks=False,
                         compile=CompileSettings(cache_dir=cache_dir, backend=ctx.compile_backend), **handle_fields)
        self.recompiles = 0
        self.warm_stats: dict = {}
        import torch._dynamo

        if not CompileRun.live:  # this row compiles from nothing, whatever ran before in this process; but never
            torch._dynamo.reset()  # wipe the code of a compiling row still to be timed (interleaved rows)
        CompileRun.live += 1
        self.closed = False

    def warm(self) -> None:
        self.run_once(self.ctx.warm_params)  # compiles (from the cold process's cache, if there was one)
        self.warm_stats = dict(self.stats.get("compile", {}))
        for _ in range(max(0, self.ctx.warmup - 1)):
            self.run_once(self.ctx.warm_params)

    def timed(self) -> None:
        from ..features.compile import graph_count

        before = graph_count()
        super().timed()
        self.recompiles += graph_count() - before

    def result(self) -> Measured:
        m = super().result()
        if self.cold is not None:
            m.compile_s_cold, m.compile_s_warm = self.cold["compile_s"], self.warm_stats.get("compile_s")
            m.stats["compile_cold_process"] = self.cold
        else:
            m.compile_s_cold = self.warm_stats.get("compile_s")
        m.recompiles = self.recompiles
        m.stats["compile_warm_run"] = self.warm_stats
        fallback = (self.cold or {}).get("fallback") or self.warm_stats.get("fallback")
        if fallback or not self.stats.get("compile", {}).get("compiled", False):
            m.note = f"compile fell back to eager: {fallback or self.stats.get('compile')}"
        return m

    def close(self) -> None:
        import torch._dynamo

        super().close()
        if not self.closed:
            self.closed = True
            CompileRun.live -= 1
            if not CompileRun.live:
                torch._dynamo.reset()  # leave no compiled code behind for the rows after this one


def all_on(ctx: BenchContext) -> RowRun:
    """fp8 matmuls (fp8 storage where the device has none) + regional compile + First Block Cache at the threshold
    of `fbcache-half`: the features composed, as a user would switch them all on."""
    from ..features.caching import CacheSettings
    from ..models.precision import fast_fp8_supported

    fast = fast_fp8_supported(ctx.device)
    run = AllOnRun(ctx, "fp8_e4m3fn_fast" if fast else "fp8_e4m3fn", cold_process=False,
                   cache=CacheSettings(method="fbcache", threshold=PLACEHOLDER_THRESHOLD, min_steps=0))
    run.calibrate_cache = True
    if not fast:
        run.note = "fp8_e4m3fn (fp8 storage, bf16 matmuls): this device has no fp8 matmuls"
    return run


class AllOnRun(CompileRun):
    def result(self) -> Measured:
        m = super().result()
        m.stats["settings"] = {"precision": self.handle.precision, "cache_threshold": self.handle.cache.threshold,
                               "compile_backend": self.handle.compile.backend,
                               "attention_backend": self.handle.attention_backend}
        return m


# ---------------------------------------------------------------- attention backends

def attention_row(choice: str) -> Callable[[BenchContext], RowRun]:
    """The pack's path with attention_backend `choice`; unavailable where it would fall back to SDPA (it would only
    repeat pack-bf16). Its deviation is against bare diffusers' SDPA, which pack-bf16 matches bit for bit."""
    def start(ctx: BenchContext) -> RowRun:
        from ..features.attention import resolve

        resolved = resolve(choice, ctx.device, torch.bfloat16)
        if resolved.fallback:
            raise Unavailable(resolved.fallback)
        run = PackRun(ctx, attention_backend=choice)
        run.note = f"diffusers backend {resolved.backend}; deviation is against SDPA (the baseline)"
        return run
    return start


def offload_row(precision: str, offload: str) -> Callable[[BenchContext], RowRun]:
    def start(ctx: BenchContext) -> RowRun:
        run = PackRun(ctx, precision, offload=offload)
        if ctx.device.type != "cuda":
            run.note = f"offload '{offload}' does nothing without a GPU: the weights stay where they are"
        return run
    return start


# ---------------------------------------------------------------- several devices

class ParallelRun(RowRun):
    """The pack's path with a Parallel setting: `ranks` Ray actors (one GPU each, or one CPU core each) splitting
    each image with Ulysses, loading the bench's model from files (`BenchContext.written_model`). The group starts in
    the warm-up and stays up for the timed runs. Peak memory is not reported: the ranks are other processes."""

    def __init__(self, ctx: BenchContext, ranks: int):
        super().__init__(ctx)
        if not group.ray_installed():
            raise Unavailable(group.INSTALL_HINT)
        on_gpu = ctx.device.type == "cuda"
        devices = torch.cuda.device_count() if on_gpu else (os.cpu_count() or 1)
        if devices < ranks:
            raise Unavailable(f"{ranks} ranks need {ranks} {'GPUs' if on_gpu else 'CPU cores'}; this machine has "
                              f"{devices}")
        transformer, vae, self.weights = ctx.written_model()
        self.handle = ModelHandle(str(transformer), precision="bf16", family=ctx.model.family,
                                  attention_backend=ctx.attention_backend, parallel=ParallelSettings(ranks, "ulysses"))
        self.vae = VaeHandle(str(vae), dtype="fp32")
        self.conditioning = ctx.conditioning()
        self.note = (f"{ranks} ranks, Ulysses; deviation is against the one-process baseline" if on_gpu else
                     f"{ranks} CPU ranks over gloo, one core each: a CPU is not expected to speed up (the ranks "
                     "share its cores and every attention call crosses processes); deviation is the figure")

    def run_once(self, params=None) -> torch.Tensor:
        result = group.run(self.handle, self.vae, self.conditioning, params or self.ctx.params, decode=False)
        self.stats = result.report.stats
        return result.latent.to(self.ctx.device)

    def result(self) -> Measured:
        return Measured(self.times, self.latent, self.weights, None, stats=_plain(self.stats), note=self.note)

    def close(self) -> None:
        group.release()


def parallel_row(ranks: int) -> Callable[[BenchContext], RowRun]:
    return lambda ctx: ParallelRun(ctx, ranks)


# ---------------------------------------------------------------- LoRA

LORA_STRENGTHS = (1.0, 0.5, 0.75, 0.25, 0.9, 0.6, 0.8, 0.4, 0.7, 0.3)


class LoraRestrengthRun(PackRun):
    """One LoRA, loaded by the first (untimed) run at strength 1. Each timed run follows a strength change, which is
    what a user dragging the strength slider waits for; right after it, a plain re-run at the same strength is timed
    too (`stats.plain_rerun_s`), so `stats.restrength_over_plain` is the cost of the change itself. The deviation
    from the baseline is the LoRA's own effect."""

    def __init__(self, ctx: BenchContext):
        super().__init__(ctx)
        self.path = ctx.model.write_lora(ctx.workdir / "bench_lora.safetensors")
        self.note = "deviation is the LoRA's own effect, not an error"
        self.strength_index = 0
        self.plain_times: list[float] = []

    def handle_for(self, i: int):
        strength = LORA_STRENGTHS[self.strength_index % len(LORA_STRENGTHS)]
        from ..features.lora import LoraSpec

        return self.handle.replace(loras=(LoraSpec(str(self.path), strength),))

    def warm(self) -> None:
        with Stopwatch(self.ctx.device) as watch:
            self.run_once()  # reads the file and injects the adapter
        self.first_s = watch.seconds
        for _ in range(max(0, self.ctx.warmup - 1)):
            self.run_once(self.ctx.warm_params)

    def timed(self) -> None:
        self.strength_index += 1
        super().timed()
        counted = self.counter.count  # the steps of the timed run, not of the plain one
        with Stopwatch(self.ctx.device) as watch:
            self.run_once()  # same handle again: nothing changed
        self.plain_times.append(watch.seconds)
        self.counter.count = counted

    def result(self) -> Measured:
        m = super().result()
        plain = median(self.plain_times)
        m.stats["first_run_with_lora_load_s"] = round(self.first_s, 4)
        m.stats["plain_rerun_s"] = round(plain, 6)
        m.stats["restrength_over_plain"] = round(median(self.times) / plain, 4)
        return m


# ---------------------------------------------------------------- the registry

# Random weights change the first block's residual by 40-80% per step (real FLUX weights: about 10%, hence the
# default 0.12), so the default threshold skips nothing here. These two rows pin the cache's cost and gain anyway:
# switched on but never skipping, and skipping about every other step.
NO_SKIP_THRESHOLD = 1e-9
RANDOM_WEIGHTS_SKIP_THRESHOLD = 0.8
MIN_CALIBRATION_STEPS = 3
PLACEHOLDER_THRESHOLD = 1.0  # replaced by the calibrated one at the row's first run


@dataclass(frozen=True)
class Row:
    name: str
    description: str
    start: Callable[[BenchContext], RowRun]  # builds the row's run, or raises Unavailable


ROWS: tuple[Row, ...] = (
    Row("baseline", "bare diffusers Flux2Pipeline (float32 latents), no other pack code", BaselineRun),
    Row("pack-bf16", "the pack's path (handle, store, features, sample), bf16", precision_row("bf16")),
    Row("fp8", "fp8_e4m3fn weights, bf16 matmuls", precision_row("fp8_e4m3fn")),
    Row("fp8-fast", "fp8_e4m3fn weights, fp8 matmuls where the GPU has them", precision_row("fp8_e4m3fn_fast")),
    Row("nf4", "bitsandbytes nf4 weights", precision_row("nf4")),
    Row("fbcache-0", "First Block Cache at threshold 0", cache_row("fbcache", 0.0)),
    Row("fbcache", "First Block Cache at its default threshold", cache_row("fbcache", None)),
    Row("fbcache-noskip", "First Block Cache on, at a threshold no step falls under: the cost of deciding",
        cache_row("fbcache", NO_SKIP_THRESHOLD)),
    Row("fbcache-skip", f"First Block Cache at {RANDOM_WEIGHTS_SKIP_THRESHOLD}, a threshold that skips steps on "
        "random weights", cache_row("fbcache", RANDOM_WEIGHTS_SKIP_THRESHOLD)),
    Row("fbcache-half", "First Block Cache at a threshold calibrated from the baseline to skip about half the steps",
        cache_row("fbcache", "half")),
    Row("teacache", "TeaCache at its default threshold", cache_row("teacache", None)),
    Row("compile", "regional compile (cold and warm compile time)", CompileRun),
    Row("lora-restrength", "re-runs after a LoRA strength change", LoraRestrengthRun),
    Row("all-on", "fp8 matmuls (fp8 storage without them) + regional compile + First Block Cache at fbcache-half's "
        "threshold", all_on),
    # Not in the default run (DEFAULT_ROWS): what only a GPU can show.
    Row("nf4-offload", "bitsandbytes nf4 weights, model_cpu offload (peak VRAM is the figure)",
        offload_row("nf4", "model_cpu")),
    Row("attn-cudnn", "attention_backend cudnn (torch's cuDNN attention)", attention_row("cudnn")),
    Row("attn-flash", "attention_backend flash (flash-attn 3 on Hopper, else 2)", attention_row("flash")),
    Row("attn-sage", "attention_backend sage (SageAttention, 8-bit QK)", attention_row("sage")),
    # Not in the default run either: ranks on Ray, each holding the whole model.
    Row("cp2", "2 ranks (GPUs, or CPU cores over gloo) splitting each image with Ulysses, on Ray", parallel_row(2)),
    Row("cp4", "4 ranks splitting each image with Ulysses, on Ray", parallel_row(4)),
)
if tuple(r.name for r in ROWS) != ROW_NAMES:  # the names --help lists (settings.py) are the rows that run
    raise ImportError("optim/bench/settings.py ROW_NAMES must list rows.ROWS' names, in order")


def fidelity(result: RowResult, latent: torch.Tensor, reference_latent: torch.Tensor, image: torch.Tensor,
             reference_image: torch.Tensor) -> None:
    result.max_abs_diff, result.rel_l2 = latent_deviation(latent, reference_latent)
    result.psnr = psnr(image, reference_image)


def release() -> None:
    """Give back what the previous row held before the next one is measured."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
