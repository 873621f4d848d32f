"""The OpenAI image API's routes, over any executor: GET /v1/models, POST /v1/images/generations and /v1/images/edits.

The routes read and bound the request, check the key, parse it with openai_api (the schema), find the model
(openai_models: a workflow), build its graph and hand it to an executor: ComfyUI's own queue inside ComfyUI
(openai_executor.ComfyUIExecutor), a stand-in in the tests, and the Ray Serve app next. An executor has:
    async check_ready() -> None                      raise openai_api.not_ready when it cannot take work
    async queue_depth() -> int                       prompts running or waiting
    async upload_image(data, filename) -> str        a reference image, as the workflow's LoadImage takes it
    async run(graph, outputs, on_preview) -> [OutputImage]
                                                     run one graph; cancelling the task cancels its prompt only
    async image_bytes(OutputImage) -> bytes          an image it saved (view_path() names it for `url` replies)
Every refusal is OpenAI's error body with its status; an unexpected failure is a 500 with the log naming it, never a
traceback to the client and never a dead server. A client that goes away cancels its own prompt and nothing else.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
import uuid
from dataclasses import dataclass
from typing import Callable

from aiohttp import web

from ..images import open_image_bytes
from ..options import MAX_SEED
from .openai_api import (DEFAULT_MAX_N, EDIT_IMAGE_FIELDS, MAX_BODY_BYTES, ImageRequest, OpenAIError, authorize,
                         bad_field, body_too_large, completed_event, encode_image, error_body, images_response,
                         parse_edit_request, parse_generation_request, partial_image_event, queue_full, sse_event)
from .openai_models import ModelList, WorkflowModel, models_response

log = logging.getLogger("flux2_accel")

MODELS_PATH = "/v1/models"
GENERATIONS_PATH = "/v1/images/generations"
EDITS_PATH = "/v1/images/edits"
DEFAULT_MAX_QUEUE_DEPTH = 16  # prompts running or waiting (the UI's included) beyond which a request gets 429
DEFAULT_REQUEST_TIMEOUT_S = 900.0  # one request's whole run; past it the prompt is cancelled and the client told
DISCONNECT_POLL_S = 0.25  # how often a waiting request looks whether its client is still there
_CHUNK = 64 * 1024


@dataclass(frozen=True)
class ApiSettings:
    """What the routes enforce. api_key None: no key set (allowed on loopback, or with allow_open)."""
    api_key: str | None = None
    listen_host: str = "127.0.0.1"
    allow_open: bool = False
    max_n: int = DEFAULT_MAX_N
    max_body_bytes: int = MAX_BODY_BYTES
    max_queue_depth: int = DEFAULT_MAX_QUEUE_DEPTH
    request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S


class ClientGone(Exception):
    """The client closed its connection while its request ran."""


def timed_out(seconds: float) -> OpenAIError:
    return OpenAIError(504, f"The request did not finish within {seconds:g} s; its prompt was cancelled.",
                       "server_error", None, "timeout")


class OpenAIRoutes:
    """The three routes; `executor_for(request)` gives the executor a request runs on (ComfyUI's: the server it came
    in on). `models()` and `settings()` are asked on every request, so new user workflows and a changed key apply
    without a restart."""

    def __init__(self, executor_for: Callable, models: Callable[[], ModelList], settings: Callable[[], ApiSettings]):
        self.executor_for, self.models, self.settings = executor_for, models, settings

    def register(self, routes: web.RouteTableDef) -> None:
        routes.get(MODELS_PATH)(self.list_models)
        routes.post(GENERATIONS_PATH)(self.generations)
        routes.post(EDITS_PATH)(self.edits)

    # -- handlers -------------------------------------------------------------------------------------------------

    async def list_models(self, request: web.Request) -> web.StreamResponse:
        return await self._answer(request, self._list_models)

    async def generations(self, request: web.Request) -> web.StreamResponse:
        return await self._answer(request, self._generations)

    async def edits(self, request: web.Request) -> web.StreamResponse:
        return await self._answer(request, self._edits)

    async def _answer(self, request, handle):
        try:
            settings = self.settings()
            settings_check(settings)
            _authorize(request, settings)
            return await handle(request, settings)
        except OpenAIError as e:
            if e.status >= 500:
                log.warning("flux2-accel OpenAI API: %s %s: %s", request.method, request.path, e.message)
            return web.json_response(e.body(), status=e.status)
        except ClientGone:
            log.info("flux2-accel OpenAI API: %s %s: the client went away", request.method, request.path)
            return web.Response(status=499)
        except Exception:  # a bug must answer 500 and leave the server running
            log.exception("flux2-accel OpenAI API: %s %s failed", request.method, request.path)
            return web.json_response(error_body("The server failed to answer; see its log.", "server_error"),
                                     status=500)

    async def _list_models(self, request, settings):
        return web.json_response(models_response(self.models(), int(time.time())))

    async def _generations(self, request, settings):
        body = await read_body(request, settings.max_body_bytes)
        try:
            parsed = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise bad_field(None, f"The request body is not valid JSON ({_first_line(e)}); send a JSON object with "
                            "Content-Type: application/json.", "invalid_json") from None
        image_request = parse_generation_request(parsed, max_n=settings.max_n)
        return await self._serve(request, settings, image_request, edit=False)

    async def _edits(self, request, settings):
        fields, images = await read_form(request, settings.max_body_bytes)
        image_request = parse_edit_request(fields, images, max_n=settings.max_n)
        return await self._serve(request, settings, image_request, edit=True)

    # -- one request ----------------------------------------------------------------------------------------------

    async def _serve(self, request, settings, image_request: ImageRequest, edit: bool):
        model = self.models().get(image_request.model)
        executor = self.executor_for(request)
        if image_request.response_format == "url" and image_request.output_format != "png":
            raise bad_field("output_format", "response_format 'url' serves the PNG the workflow saved; use "
                            "b64_json for jpeg or webp.", "unsupported_value")
        if image_request.stream and image_request.response_format == "url":
            raise bad_field("response_format", "a stream carries its images as b64_json; leave response_format "
                            "out, or set stream to false for a url.", "unsupported_value")
        seed = image_request.seed if image_request.seed is not None else secrets.randbelow(MAX_SEED + 1)
        placeholder = tuple(f"reference_{i}.png" for i in range(len(image_request.images)))
        graphs(model, image_request, seed, placeholder)  # a field the model cannot take is refused before any work
        await executor.check_ready()
        depth = await executor.queue_depth()
        if depth >= settings.max_queue_depth:
            raise queue_full(depth)
        tag = uuid.uuid4().hex[:12]
        names = []
        for index, image in enumerate(image_request.images):
            names.append(await executor.upload_image(encode_image(image, "png"),
                                                          f"flux2-accel-openai-{tag}-{index + 1}.png"))
        log.info("flux2-accel OpenAI API: %s model %s, n %d, size %s, user %s", "edit" if edit else "generation",
                 model.name, image_request.n, image_request.size_name, image_request.user or "-")
        jobs = graphs(model, image_request, seed, tuple(names))
        if image_request.stream:
            return await self._stream(request, settings, executor, model, image_request, jobs, edit)
        outputs = await self._watched(request, settings, self._run_all(executor, model, jobs))
        if not outputs:
            raise OpenAIError(500, f"The workflow of model '{model.name}' saved no image.", "server_error", None,
                              "no_image")
        created = int(time.time())
        if image_request.response_format == "url":
            origin = f"{request.scheme}://{request.host}"
            urls = [origin + image.view_path() for image in outputs]
            return web.json_response(images_response(created, outputs, "url", urls=urls, request=image_request))
        encoded = [await self._encoded(executor, image, image_request) for image in outputs]
        return web.json_response(images_response(created, encoded, "b64_json", request=image_request))

    async def _run_all(self, executor, model: WorkflowModel, jobs, on_preview=None, on_image=None) -> list:
        outputs = []
        for graph in jobs:
            saved = await executor.run(graph, model.outputs, on_preview=on_preview)
            outputs += saved
            if on_image is not None:
                for image in saved:
                    await on_image(image)
        return outputs

    async def _encoded(self, executor, image, image_request: ImageRequest) -> bytes:
        # Re-encoded, never passed through: ComfyUI's PNG carries the whole workflow in its metadata, and the
        # request may ask for jpeg or webp.
        data = await executor.image_bytes(image)
        return encode_image(open_image_bytes(data, "the saved image"), image_request.output_format,
                            image_request.output_compression)

    async def _watched(self, request, settings, work):
        """Await `work` while the client is there, within the request's time; otherwise cancel it (its prompt)."""
        task = asyncio.ensure_future(work)
        deadline = asyncio.get_running_loop().time() + settings.request_timeout_s
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
                if done:
                    return task.result()
                if client_gone(request):
                    await _cancelled(task)
                    raise ClientGone()
                if asyncio.get_running_loop().time() > deadline:
                    await _cancelled(task)
                    raise timed_out(settings.request_timeout_s)
        except asyncio.CancelledError:
            await _cancelled(task)
            raise

    async def _stream(self, request, settings, executor, model, image_request: ImageRequest, jobs, edit: bool):
        """OpenAI's image stream: partial_image events from ComfyUI's previews (up to partial_images of them, per
        image), then one completed event per image; a failure after the stream began is an `error` event."""
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        created = int(time.time())
        previews: asyncio.Queue = asyncio.Queue()
        sent = {"partial": 0}

        async def write(kind: str, payload: dict) -> None:
            try:
                await response.write(sse_event(kind, payload))
            except (ConnectionResetError, RuntimeError):  # aiohttp raises either once the client is gone
                raise ClientGone() from None

        order = asyncio.Lock()  # one event at a time, and a preview queued before an image goes out before it

        async def send_preview(data: bytes) -> None:
            if sent["partial"] >= image_request.partial_images:
                return
            try:
                encoded = encode_image(open_image_bytes(data, "a preview"), image_request.output_format,
                                       image_request.output_compression)
            except Exception:  # a preview that does not decode is skipped, the run goes on
                log.debug("flux2-accel OpenAI API: a preview did not decode", exc_info=True)
                return
            payload = partial_image_event(image_request, created, sent["partial"], encoded, edit=edit)
            sent["partial"] += 1
            await write(payload["type"], payload)

        async def send_previews():
            while True:
                data = await previews.get()
                async with order:
                    await send_preview(data)

        async def send_image(image):
            encoded = await self._encoded(executor, image, image_request)
            async with order:
                while not previews.empty():
                    await send_preview(previews.get_nowait())
                payload = completed_event(image_request, created, encoded, edit=edit)
                await write(payload["type"], payload)
                sent["partial"] = 0  # the next image's previews count from 0 again

        def on_preview(data: bytes) -> None:
            if image_request.partial_images:
                previews.put_nowait(data)

        writer = asyncio.ensure_future(send_previews())
        try:
            outputs = await self._watched(request, settings, self._run_all(
                executor, model, jobs, on_preview=on_preview if image_request.partial_images else None, on_image=send_image))
            if not outputs:
                raise OpenAIError(500, f"The workflow of model '{model.name}' saved no image.", "server_error", None,
                                  "no_image")
            await _cancelled(writer)
            await write_eof(response)
        except OpenAIError as e:
            await _cancelled(writer)
            log.warning("flux2-accel OpenAI API: stream of model %s: %s", model.name, e.message)
            try:
                await write("error", {"type": "error", **e.body()})
                await write_eof(response)
            except ClientGone:
                pass
        except ClientGone:
            await _cancelled(writer)
            log.info("flux2-accel OpenAI API: the stream's client went away")
        return response


async def write_eof(response) -> None:
    try:
        await response.write_eof()
    except (ConnectionResetError, RuntimeError):
        raise ClientGone() from None


def graphs(model: WorkflowModel, image_request: ImageRequest, seed: int, image_names: tuple) -> list[dict]:
    """The graphs one request runs: one with a batch of n where the workflow has a batch input, else n graphs
    with consecutive seeds."""
    n = image_request.n
    if model.accepts("batch_size") or n == 1:
        return [model.build_prompt(image_request, seed=seed, image_names=image_names, batch_size=n)]
    return [model.build_prompt(image_request, seed=(seed + i) % (MAX_SEED + 1), image_names=image_names)
            for i in range(n)]


def settings_check(settings: ApiSettings) -> None:
    if settings.max_n < 1 or settings.max_body_bytes < 1 or settings.max_queue_depth < 1:
        raise OpenAIError(500, "The OpenAI API's limits are misconfigured (each must be 1 or more).", "server_error")


def _authorize(request, settings: ApiSettings) -> None:
    authorize(request.headers.get("Authorization"), settings.listen_host, settings.api_key, settings.allow_open)


def client_gone(request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


async def _cancelled(task) -> None:
    """Cancel `task` and wait until it has finished cancelling (its prompt is off ComfyUI's queue by then)."""
    if not task.done():
        task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def read_body(request, limit: int) -> bytes:
    """The whole body, refused with 413 as soon as it is known to be over `limit` (Content-Length, or reading)."""
    if request.content_length is not None and request.content_length > limit:
        raise body_too_large(request.content_length, limit)
    data = bytearray()
    async for chunk in request.content.iter_chunked(_CHUNK):
        data += chunk
        if len(data) > limit:
            raise body_too_large(len(data), limit)
    return bytes(data)


async def read_form(request, limit: int) -> tuple[dict, list]:
    """A multipart/form-data body as (text fields, [(filename, bytes)] of the image parts), read within `limit`
    bytes in all. Another file part is kept as bytes under its name, so the schema refuses it by name."""
    if request.content_length is not None and request.content_length > limit:
        raise body_too_large(request.content_length, limit)
    if not request.content_type.startswith("multipart/form-data"):
        raise bad_field(None, f"/v1/images/edits takes multipart/form-data, not '{request.content_type or 'none'}'.",
                        "invalid_content_type")
    try:
        reader = await request.multipart()
    except (ValueError, AssertionError) as e:
        raise bad_field(None, f"The multipart body cannot be read ({_first_line(e)}).", "invalid_multipart") from None
    fields, images, total = {}, [], 0
    while True:
        try:
            part = await reader.next()
        except (ValueError, AssertionError) as e:
            raise bad_field(None, f"The multipart body cannot be read ({_first_line(e)}).",
                            "invalid_multipart") from None
        if part is None:
            break
        name = part.name or ""
        data = bytearray()
        while chunk := await part.read_chunk(_CHUNK):
            data += chunk
            total += len(chunk)
            if total > limit:
                raise body_too_large(total, limit)
        if name in EDIT_IMAGE_FIELDS:
            images.append((part.filename or name, bytes(data)))
        elif name in fields:
            raise bad_field(name, f"{name} is given more than once.", "duplicate_field")
        elif part.filename is not None:
            fields[name] = bytes(data)
        else:
            try:
                fields[name] = data.decode(part.get_charset("utf-8"))
            except (UnicodeDecodeError, LookupError):
                raise bad_field(name, f"{name} is not text in UTF-8.", "invalid_type") from None
    return fields, images


def _first_line(error: Exception) -> str:
    return (str(error).splitlines() or [type(error).__name__])[0][:200]
