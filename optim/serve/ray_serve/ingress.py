"""The API ingress of `flux2-accel serve`:

- ApiIngress: the OpenAI image API (GET /v1/models, POST /v1/images/generations and /v1/images/edits, streaming),
  on the schema module the ComfyUI routes use (openai_api). It checks the key, parses and bounds the request,
  and hands a GenerationJob to the model's Generator through its Serve handle.
Serve does the routing, queueing (max_queued_requests: 429 beyond it), restarts and autoscaling; this module only
maps its outcomes to OpenAI's statuses: a replica that died mid-request is 503, a model whose replicas cannot load
is 503 naming the reason (and /v1/models lists it as unavailable with it).
"""

import asyncio
import json
import logging
import secrets
import time

import ray
from fastapi import FastAPI, Request
from ray import serve
from ray.serve.exceptions import BackPressureError
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.responses import JSONResponse, Response, StreamingResponse

from ...errors import Flux2AccelError
from ...options import MAX_SEED
from ..openai_api import (EDIT_IMAGE_FIELDS, MAX_REFERENCE_IMAGES, OpenAIError, bad_field, bad_key, body_too_large,
                          check_api_key_digest, completed_event, error_body, images_response, is_loopback,
                          not_ready, parse_edit_request, parse_generation_request, partial_image_event, queue_full,
                          sse_event)
from ..openai_models import ModelList, models_response
from ..openai_server import GENERATIONS_PATH, EDITS_PATH, MODELS_PATH, timed_out
from .config import ModelConfig, ServeConfig
from .jobs import GenerationJob, GenerationResult, job_for
from .status import model_availability

log = logging.getLogger("flux2_accel")

STATS_PATH = "/v1/flux2-accel/stats"  # the pack's extension: per-deployment counters (the benchmark reads them)
REPLICA_HEADER = "x-flux2-accel-replica"  # which Generator replica served the request
LOADS_HEADER = "x-flux2-accel-model-loads"  # how many models that replica has loaded since it started
STATUS_TTL_S = 1.0  # how long the ingress reuses Serve's status of the Generators

# Serve pickles a deployment's class when it is decorated, with the module globals it uses as they are then: the
# helpers the class calls are defined above it.
def queue_full_of(model: str, error: BackPressureError) -> OpenAIError:
    """429: the model's Generator queue is full (Serve's max_queued_requests)."""
    e = queue_full(getattr(error, "num_queued_requests", 0) or 0)
    e.message = f"Model '{model}': {e.message}"
    return e


api = FastAPI(title="flux2-accel", docs_url=None, redoc_url=None, openapi_url=None)


# --- ApiIngress ----------------------------------------------------------------------------------------------

@serve.deployment
@serve.ingress(api)
class ApiIngress:
    """config: the whole ServeConfig; key_digest: the API key's SHA-256 (the key itself never leaves the process
    that read it from the environment), None when no key is set; generators / text_encoders: Serve handles."""

    def __init__(self, config: ServeConfig, key_digest: str | None, generators: dict, text_encoders: dict):
        self.config, self.server, self.key_digest = config, config.server, key_digest
        self.generators, self.text_encoders = generators, text_encoders
        self.app_name = serve.get_replica_context().app_name
        self._status, self._status_at = {}, 0.0

    # -- routes ---------------------------------------------------------------------------------------------------

    @api.get(MODELS_PATH)
    async def list_models(self, request: Request) -> Response:
        return await self._answer(request, self._list_models)

    @api.post(GENERATIONS_PATH)
    async def generations(self, request: Request) -> Response:
        return await self._answer(request, self._generations)

    @api.post(EDITS_PATH)
    async def edits(self, request: Request) -> Response:
        return await self._answer(request, self._edits)

    @api.get(STATS_PATH)
    async def stats(self, request: Request) -> Response:
        return await self._answer(request, self._stats)

    async def _answer(self, request: Request, handle) -> Response:
        try:
            self._authorize(request)
            return await handle(request)
        except OpenAIError as e:
            if e.status >= 500:
                log.warning("flux2-accel serve: %s %s: %s", request.method, request.url.path, e.message)
            headers = {"Retry-After": str(self.server.retry_after_s)} if e.status in (429, 503) else None
            return JSONResponse(e.body(), status_code=e.status, headers=headers)
        except Exception:  # a bug answers 500 and leaves the replica serving
            log.exception("flux2-accel serve: %s %s failed", request.method, request.url.path)
            return JSONResponse(error_body("The server failed to answer; see its log.", "server_error"),
                                status_code=500)

    def _authorize(self, request: Request) -> None:
        if self.key_digest:
            check_api_key_digest(request.headers.get("authorization"), self.key_digest)
        elif not (is_loopback(self.server.host) or self.server.allow_open):
            raise bad_key(f"The server listens on '{self.server.host}', beyond loopback, and no API key is set: "
                          f"set ${self.server.api_key_env}, or allow open access explicitly.")

    async def _list_models(self, request: Request) -> Response:
        status = self._statuses()
        ready = {name: model for name, model in self.config.models.items() if status.get(name) is None}
        refused = {name: reason for name, reason in status.items() if reason is not None}
        return JSONResponse(models_response(ModelList(ready, refused), int(time.time())))

    async def _stats(self, request: Request) -> Response:
        encoders = {name: await handle.stats.remote() for name, handle in self.text_encoders.items()}
        return JSONResponse({"text_encoders": encoders, "models": {
            name: {"available": reason is None, "reason": reason} for name, reason in self._statuses().items()}})

    async def _generations(self, request: Request) -> Response:
        body = await self._body(request)
        try:
            parsed = json.loads(body)
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise bad_field(None, f"The request body is not valid JSON ({str(e)[:200]}); send a JSON object with "
                            "Content-Type: application/json.", "invalid_json") from None
        return await self._serve(parse_generation_request(parsed, max_n=self.server.max_n), edit=False)

    async def _edits(self, request: Request) -> Response:
        fields, images = await self._form(request)
        return await self._serve(parse_edit_request(fields, images, max_n=self.server.max_n), edit=True)

    # -- one request ----------------------------------------------------------------------------------------------

    async def _serve(self, image_request, edit: bool) -> Response:
        if image_request.response_format == "url":
            raise bad_field("response_format", "this server returns images inline: use b64_json (the default).",
                            "unsupported_value")
        model = self.config.models.get(image_request.model)
        if model is None:
            ModelList({name: None for name in self.config.models}).get(image_request.model)  # raises 404
        reason = self._statuses().get(model.name)
        if reason is not None:
            raise not_ready(f"The model '{model.name}' is not available: {reason}")
        seed = image_request.seed if image_request.seed is not None else secrets.randbelow(MAX_SEED + 1)
        job = job_for(image_request, model, seed)
        log.info("flux2-accel serve: %s model %s, n %d, %dx%d, user %s", "edit" if edit else "generation",
                 model.name, job.n, job.width, job.height, image_request.user or "-")
        handle = self.generators[model.name]
        if image_request.stream:
            return await self._stream(handle, model, image_request, job, edit)
        response = handle.generate.remote(job)
        try:
            result = await asyncio.wait_for(self._outcome(model, response), self.server.request_timeout_s)
        except asyncio.TimeoutError:
            response.cancel()
            raise timed_out(self.server.request_timeout_s) from None
        except asyncio.CancelledError:  # the client went away: Serve cancels the request in the replica too
            response.cancel()
            raise
        reply = images_response(int(time.time()), result.images, "b64_json", request=image_request)
        return JSONResponse(reply, headers=self._headers(result))

    async def _outcome(self, model: ModelConfig, awaitable):
        """What a Generator call returned, its failures mapped to OpenAI's statuses."""
        try:
            return await awaitable
        except BackPressureError as e:
            raise queue_full_of(model.name, e) from None
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as e:
            raise not_ready(f"The replica of model '{model.name}' running this request stopped "
                            f"({type(e).__name__}); Serve restarts it: retry the request.") from None
        except Flux2AccelError as e:  # the pack refused a value (Ray re-raises it as its own type)
            cause = getattr(e, "cause", e)  # the pack's own error, without Ray's traceback around it
            raise bad_field(None, str(cause) or type(cause).__name__) from None
        except ray.exceptions.RayTaskError as e:
            log.error("flux2-accel serve: model %s failed: %s", model.name, e)
            raise OpenAIError(500, f"Generation failed in model '{model.name}': {type(e.cause).__name__}: "
                              f"{e.cause}", "server_error", None, "execution_error") from None

    def _headers(self, result: GenerationResult) -> dict:
        loads = next((line.split(": ", 1)[1] for line in result.stats if line.startswith("loads: ")), "0")
        return {REPLICA_HEADER: result.replica, LOADS_HEADER: loads}

    async def _stream(self, handle, model: ModelConfig, image_request, job: GenerationJob, edit: bool) -> Response:
        """OpenAI's image stream: partial_image events, then one completed event per image. Refusals before a
        replica took the job (queue full, replica gone) are plain HTTP errors; a failure after is an `error` event."""
        events = handle.options(stream=True).stream.remote(job)
        try:
            kind, replica = await asyncio.wait_for(self._outcome(model, events.__anext__()),
                                                   self.server.request_timeout_s)
        except asyncio.TimeoutError:
            events.cancel()
            raise timed_out(self.server.request_timeout_s) from None
        created = int(time.time())

        async def body():
            index = 0
            try:
                while True:
                    try:
                        kind, value = await self._outcome(model, events.__anext__())
                    except StopAsyncIteration:
                        return
                    if kind == "partial":
                        payload = partial_image_event(image_request, created, index, value, edit=edit)
                        index += 1
                        yield sse_event(payload["type"], payload)
                    elif kind == "done":
                        for encoded in value.images:
                            payload = completed_event(image_request, created, encoded, edit=edit)
                            yield sse_event(payload["type"], payload)
            except OpenAIError as e:
                log.warning("flux2-accel serve: stream of model %s: %s", model.name, e.message)
                yield sse_event("error", {"type": "error", **e.body()})
            finally:
                events.cancel()  # a client gone mid-stream stops its run

        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", REPLICA_HEADER: replica})

    # -- helpers --------------------------------------------------------------------------------------------------

    def _statuses(self) -> dict:
        """model -> None when a replica of its Generator serves, else why not (status.model_availability), asked
        of Serve at most every STATUS_TTL_S."""
        now = time.monotonic()
        if now - self._status_at > STATUS_TTL_S:
            deployments = serve.status().applications[self.app_name].deployments
            self._status, self._status_at = model_availability(deployments, self.config.models), now
        return self._status

    async def _body(self, request: Request) -> bytes:
        limit = self.server.max_body_bytes
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > limit:
            raise body_too_large(int(length), limit)
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > limit:
                raise body_too_large(len(data), limit)
        return bytes(data)

    async def _form(self, request: Request):
        """(text fields, [(filename, bytes)] of the image parts), like the ComfyUI route's read_form."""
        content_type = request.headers.get("content-type", "")
        if not content_type.startswith("multipart/form-data"):
            raise bad_field(None, f"{EDITS_PATH} takes multipart/form-data, not '{content_type or 'none'}'.",
                            "invalid_content_type")
        body = await self._body(request)

        async def replay():
            yield body

        parser = MultiPartParser(request.headers, replay(), max_files=MAX_REFERENCE_IMAGES + 4, max_fields=64,
                                 max_part_size=self.server.max_body_bytes)
        try:
            form = await parser.parse()
        except MultiPartException as e:
            raise bad_field(None, f"The multipart body cannot be read ({e.message}).", "invalid_multipart") from None
        fields, images = {}, []
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                data = await value.read()
                if name in EDIT_IMAGE_FIELDS:
                    images.append((value.filename or name, data))
                    continue
                value = data
            if name in fields:
                raise bad_field(name, f"{name} is given more than once.", "duplicate_field")
            fields[name] = value
        return fields, images
