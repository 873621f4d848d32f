"""The worker deployments of `flux2-accel serve`:

- Generator: one per model; each replica keeps its model loaded (and compiled) and runs one job at a time, on its
  GPU, a CPU, or the multi-GPU actor group. Its health check fails while its model cannot load, with the reason,
  which Serve logs and the ingress reports (/v1/models, 503).
- TextEncoder: shared by the Generators of the models that name it; Serve batches concurrent prompts into one
  forward (serve.batch), and an in-memory cache answers repeated prompts.
"""

import asyncio
import logging
import threading

from ray import serve

from .config import ModelConfig, TextEncoderConfig
from .jobs import GenerationJob, GenerationResult
from .runtime import ServedModel, ServedTextEncoder, conditioning

log = logging.getLogger("flux2_accel")


# --- TextEncoder ---------------------------------------------------------------------------------------------

@serve.deployment
class TextEncoder:
    def __init__(self, config: TextEncoderConfig):
        self.served = ServedTextEncoder(config)
        self.encode.set_max_batch_size(config.max_batch_size)
        self.encode.set_batch_wait_timeout_s(config.batch_wait_timeout_s)

    @serve.batch
    async def encode(self, prompts: list[str]) -> list:
        """(embedding [L, D], family) per prompt."""
        rows = await asyncio.to_thread(self.served.encode_batch, prompts)
        return [(row, self.served.family) for row in rows]

    def stats(self) -> dict:
        return dict(self.served.counts)


# --- Generator -----------------------------------------------------------------------------------------------

@serve.deployment
class Generator:
    def __init__(self, config: ModelConfig, text_encoder):
        self.name, self.text_encoder = config.name, text_encoder
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.served, self.error = None, None
        try:
            self.served = ServedModel(config)
        except Exception as e:  # kept for the health check, which Serve logs and reports
            self.error = f"model '{config.name}' cannot load: {type(e).__name__}: {e}"
            log.error("flux2-accel serve: %s", self.error)

    def check_health(self) -> None:
        if self.error is not None:
            raise RuntimeError(self.error)

    async def _conditionings(self, job: GenerationJob):
        prompts = [job.prompt] + ([job.negative_prompt] if job.negative_prompt is not None else [])
        encoded = await asyncio.gather(*(self.text_encoder.encode.remote(p) for p in prompts))
        embeds = [conditioning(row, family) for row, family in encoded]
        return embeds[0], (embeds[1] if len(embeds) > 1 else None)

    def _result(self, result: GenerationResult) -> GenerationResult:
        result.replica, result.stats = self.replica, result.stats + [f"loads: {self.served.loads}"]
        return result

    async def generate(self, job: GenerationJob) -> GenerationResult:
        self.check_health()
        positive, negative = await self._conditionings(job)
        stop = threading.Event()
        try:
            result = await asyncio.to_thread(self.served.generate, job, positive, negative, None, stop.is_set)
        except asyncio.CancelledError:  # the client went away: the engine stops after its current step
            stop.set()
            raise
        return self._result(result)

    async def stream(self, job: GenerationJob):
        """("started", replica), then ("partial", bytes) per partial image, then ("done", GenerationResult)."""
        self.check_health()
        yield "started", self.replica
        positive, negative = await self._conditionings(job)
        loop, partials, stop = asyncio.get_running_loop(), asyncio.Queue(), threading.Event()
        run = asyncio.ensure_future(asyncio.to_thread(
            self.served.generate, job, positive, negative,
            lambda data: loop.call_soon_threadsafe(partials.put_nowait, data), stop.is_set))
        try:
            while not run.done() or not partials.empty():
                getter = asyncio.ensure_future(partials.get())
                await asyncio.wait({run, getter}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield "partial", getter.result()
                else:
                    getter.cancel()
            yield "done", self._result(run.result())
        finally:
            stop.set()  # a cancelled stream stops the engine after its current step

    def loads(self) -> int:
        return self.served.loads if self.served else 0
