"""One sampling job, from handles and parameters to latents and image: the single run path of the pack.

    node / `flux2-accel generate` / calibrate / bench  ->  engine.run(model handle, VAE handle, conditioning, params)
        -> memory check -> store.prepared (features: LoRA, compile, step cache) -> offload and devices
        -> sampling.sample -> VAE decode (compiled if the handle asks) -> RunResult (latent, image, report)

Callers keep only their own concerns: the node its widgets, progress, previews and interrupt; the CLI its arguments
and files; the bench its timing.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from ..devices import execution_device
from ..errors import NonFiniteError
from ..features.api import RunReport
from ..features.caching.decision import TIMELINE_KEY
from ..features.compile import vae_decoder_compiled
from ..models.text_encoding import Flux2Conditioning
from . import latents
from .memory import check_fits, estimate_run_bytes
from .offload import offloaded
from .sampling import SamplingParams, StepCallback, sample
from .store import STORE, ModelStore


@dataclass
class RunResult:
    latent: torch.Tensor  # LATENT [B, 4C, H/16, W/16], float32, CPU
    image: torch.Tensor | None  # IMAGE [B, H, W, 3] in 0..1, float32, CPU (None when not decoded)
    report: RunReport

    def stats_lines(self) -> list[str]:
        return format_stats(self.report.stats)

    def cache_timeline(self) -> list[str]:
        """The step cache's decisions, one "branch:CCSC..." row per CFG branch (C computed, S skipped); empty
        without a step cache."""
        rows = self.report.stats.get("cache", {}).get(TIMELINE_KEY, {})
        return [f"{name}:{decisions}" for name, decisions in rows.items()]


def format_stats(stats: dict) -> list[str]:
    """What the features reported, one line per feature ("cache: method=fbcache, computed_steps=20, ...")."""
    lines = []
    for name, values in stats.items():
        if isinstance(values, dict):
            body = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items()
                             if k != TIMELINE_KEY)  # the cache's per-call decisions go to the frontend's strip
        else:
            body = str(values)
        lines.append(f"{name}: {body}")
    return lines


def _describe(model) -> str:
    loras = ", ".join(f"{spec.path.replace(chr(92), '/').rsplit('/', 1)[-1]} x{spec.strength:g}"
                      for spec in model.loras if spec.enabled)
    return (f"Model '{model.source}', precision {model.precision}" + (f", LoRAs: {loras}" if loras else "")
            + ".")


def check_memory(transformer, vae, conditioning: Flux2Conditioning, params: SamplingParams, device,
                 decode: bool = True) -> None:
    """Refuse a job the device cannot hold, before anything is allocated for it (see optim.run.memory)."""
    needed = estimate_run_bytes(
        transformer.config, width=params.width, height=params.height, batch_size=params.batch_size,
        text_tokens=conditioning.prompt_embeds.shape[1], act_bytes=torch.finfo(transformer.dtype).bits // 8,
        vae_channels=vae.config.block_out_channels[0], decode=decode)
    check_fits(needed, device, width=params.width, height=params.height, batch_size=params.batch_size)


@torch.no_grad()
def run(model, vae, conditioning: Flux2Conditioning, params: SamplingParams, *, store: ModelStore = STORE,
        reference_images=None, negative: Flux2Conditioning | None = None, device=None, decode: bool = True,
        on_step: StepCallback | None = None, should_interrupt: Callable[[], bool] | None = None,
        around: Iterable[Callable] = ()) -> RunResult:
    """Sample `params` with the transformer of `model` (a ModelHandle) and the VAE of `vae` (a VaeHandle), both
    materialized by `store`.

    device: where to run (default: the current CUDA GPU, else the CPU). decode: also decode to an image.
    on_step(i, n, latent_fn) and should_interrupt() are called after each step (progress, previews, interrupt).
    around: callables `transformer -> context manager`, entered after the features (calibration's recording)."""
    report = RunReport(params=params)
    vae_module = store.vae(vae)
    with store.prepared(model, report) as transformer:
        report.stats = {"model": {"precision": precision_of(transformer), "offload": model.offload}, **report.stats}
        target = torch.device(device) if device is not None else None
        check_memory(transformer, vae_module, conditioning, params, target or execution_device(), decode)
        with offloaded(model.offload, transformer=transformer, vae=vae_module, device=target) as dev:
            if model.offload == "none":
                transformer.to(dev), vae_module.to(dev)
            with contextlib.ExitStack() as stack:
                for enter in around:
                    stack.enter_context(enter(transformer))
                try:
                    latent = sample(transformer, vae_module, conditioning, params, reference_images=reference_images,
                                    negative=negative, on_step=on_step, should_interrupt=should_interrupt)
                except NonFiniteError as e:
                    raise NonFiniteError(f"{e} {_describe(model)}") from None
            image = None
            if decode:
                with vae_decoder_compiled(vae_module, model.compile, report):
                    image = latents.decode(vae_module, latent, device=dev)
    return RunResult(latent, image, report)


def precision_of(module) -> str:
    """The precision the weights were brought to (optim.models.precision marks it), else the module's dtype."""
    return getattr(module, "flux2_precision", None) or str(next(module.parameters()).dtype).removeprefix("torch.")

