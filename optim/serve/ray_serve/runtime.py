"""What the Generator and TextEncoder deployments run, without Ray: a loaded model and a loaded text encoder.

The deployments (workers.py) hold one ServedModel or ServedTextEncoder each and call into it; keeping the work here
lets the tests run it in one process. A job's reference images come PNG-encoded and are decoded here with the
pack's bounded image reader.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import Callable

import torch

from ...errors import InputError
from ...features.lora import LoraSpec
from ...handle import ModelHandle, TextEncoderHandle, VaeHandle
from ...images import open_image_bytes
from ...models.arch import family_of
from ...models.demo import place_demo_components
from ...models.text_encoding import Flux2Conditioning
from ...parallel import group
from ...run.latents import decode, to_pil
from ...run.sampling import SamplingParams
from ...run.store import ModelStore
from ..openai_api import encode_image
from ..remote.client import RemoteEncoderConfig, RemoteTextEncoder, listed_hosts, resolve_token
from .config import ModelConfig, TextEncoderConfig
from .jobs import GenerationJob, GenerationResult, partial_steps


class ServedTextEncoder:
    """A text encoder loaded once (demo, file or remote endpoint), with an in-memory LRU of prompt embeddings.
    encode_batch takes the prompts Serve batched together and encodes the ones not cached in one forward."""

    def __init__(self, config: TextEncoderConfig):
        self.config = config
        self.store = ModelStore()
        if config.endpoint_url:
            token, source = resolve_token(config.endpoint_url, allowed_hosts=listed_hosts())
            self.encoder = RemoteTextEncoder(RemoteEncoderConfig(config.endpoint_url, token, source,
                                                                 allowed_hosts=listed_hosts()))
        elif config.demo:
            _, _, handle = place_demo_components(self.store, text_precision=config.precision)
            self.encoder = self.store.text_encoder(handle)
        else:
            self.encoder = self.store.text_encoder(TextEncoderHandle(config.file, config.precision, config.tokenizer))
        if hasattr(self.encoder, "model"):
            self.encoder.model.to(_device(config.num_gpus))
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()
        self.counts = {"prompts": 0, "batches": 0, "encoded": 0, "cache_hits": 0}
        self.family: str | None = getattr(self.encoder, "family", None)  # "mistral" ([dev]) or "qwen3" ([klein])

    def encode_batch(self, prompts: list[str]) -> list[torch.Tensor]:
        """One [L, D] embedding (CPU) per prompt, in order; the prompts not cached are encoded in one forward."""
        with self._lock:
            cached = {p: self._cache[p] for p in prompts if p in self._cache}
            for prompt in cached:
                self._cache.move_to_end(prompt)
            missing = list(dict.fromkeys(p for p in prompts if p not in cached))
            self.counts["prompts"] += len(prompts)
            self.counts["batches"] += 1
            self.counts["cache_hits"] += sum(1 for p in prompts if p in cached)
        encoded = {}
        if missing:
            result = self.encoder.encode(missing)
            self.family = result.family  # a remote endpoint's family is known from its first reply
            encoded = dict(zip(missing, result.prompt_embeds.detach().cpu()))
        with self._lock:
            self.counts["encoded"] += len(missing)
            if self.config.cache_entries:
                self._cache.update(encoded)
                while len(self._cache) > self.config.cache_entries:
                    self._cache.popitem(last=False)
        return [encoded[p] if p in encoded else cached[p] for p in prompts]


class ServedModel:
    """A model loaded once: its handle with the configured features, its store and its VAE. A load failure is
    kept (`error`) so the replica's health check can fail with it instead of crashing the constructor."""

    def __init__(self, config: ModelConfig):
        self.config = config
        self.store = ModelStore()
        self.device = _device(config.gpus_per_replica if config.gpus_per_replica <= 1 else 0)
        options = dict(precision=config.precision, attention_backend=config.attention_backend)
        if config.demo:
            model, self.vae, _ = place_demo_components(self.store, **options)
        else:
            model, self.vae = ModelHandle(config.transformer, **options), VaeHandle(config.vae, dtype="bf16")
        model = model.with_loras(LoraSpec(path, strength) for path, strength in config.loras)
        if config.cache is not None:
            model = model.with_step_cache(config.cache)
        if config.compile is not None:
            model = model.replace(compile=config.compile)
        self.model = model.replace(parallel=config.parallel_settings)
        self.family = self.model.family
        if self.model.parallel is None:  # a parallel replica's ranks load the weights themselves
            self.family = family_of(self.store.transformer(self.model))
            self.store.vae(self.vae)
        self.runs = 0

    @property
    def loads(self) -> int:
        return self.store.load_count

    def generate(self, job: GenerationJob, conditioning: Flux2Conditioning, negative: Flux2Conditioning | None,
                 on_partial: Callable[[bytes], None] | None = None,
                 should_interrupt: Callable[[], bool] | None = None) -> GenerationResult:
        start = time.perf_counter()
        params = SamplingParams(width=job.width, height=job.height, steps=job.steps, guidance=job.guidance,
                                seed=job.seed, batch_size=job.n)
        params.validate()
        if job.negative_prompt is not None and self.family == "dev":
            raise InputError(f"negative_prompt: model '{self.config.name}' is FLUX.2 [dev], which samples without "
                             "CFG and so has no use for a negative prompt; leave it out (FLUX.2 [klein] base takes one).")
        references = [open_image_bytes(data, f"reference image {i}") for i, data in enumerate(job.references)]
        wanted = partial_steps(job.steps, job.partial_images) if on_partial is not None else set()
        vae_module = self.store.vae(self.vae) if wanted else None

        def on_step(i, n, latent_fn):
            if i in wanted:
                image = to_pil(decode(vae_module, latent_fn()[:1]))[0]
                on_partial(encode_image(image, job.output_format, job.output_compression))

        result = group.run(self.model, self.vae, conditioning, params, store=self.store,
                           reference_images=references or None, negative=negative, device=self.device,
                           on_step=on_step if wanted else None, should_interrupt=should_interrupt)
        images = [encode_image(image, job.output_format, job.output_compression) for image in to_pil(result.image)]
        self.runs += 1
        return GenerationResult(images, seconds=time.perf_counter() - start, stats=result.stats_lines())


def conditioning(row: torch.Tensor, family: str) -> Flux2Conditioning:
    """One prompt's conditioning from its [L, D] embedding row (the engine repeats it for a batch of n images)."""
    return Flux2Conditioning(row.unsqueeze(0), family)


def _device(gpus: float) -> torch.device:
    return torch.device("cuda") if gpus > 0 and torch.cuda.is_available() else torch.device("cpu")
