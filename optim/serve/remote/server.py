"""`flux2-accel serve-text-encoder`: one machine encodes prompts for many ComfyUI workers.

An aiohttp application serving the public FLUX.2 remote text encoder contract (POST /predict, JSON
`{"prompt": ...}`, bearer token) from a local optim TextEncoder. Requests that arrive within a few milliseconds of
each other are encoded as one batch on a single worker thread, so the event loop keeps accepting while the model runs.
Replies are safetensors unless the client's Accept header asks for the torch format.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from aiohttp import web

from ...errors import InputError
from ...options import REMOTE_BODY_TIMEOUT_S as DEFAULT_BODY_TIMEOUT_S
from .protocol import FORMATS, PREDICT_PATH, choose_format, encode_tensor, parse_prompts

log = logging.getLogger("flux2_accel")

MAX_PROMPTS_PER_REQUEST = 16
MAX_PROMPT_CHARS = 20_000
BATCHER_KEY = web.AppKey("flux2_accel_batcher", object)
STATS_KEY = web.AppKey("flux2_accel_stats", dict)


@dataclass
class _Pending:
    prompts: list[str]
    future: asyncio.Future = field(repr=False)


class EncodeBatcher:
    """Collects requests for `window_s`, encodes them as one batch, hands each caller its rows."""

    def __init__(self, text_encoder, window_s: float = 0.005, max_batch: int = 16, stats: dict | None = None):
        self.text_encoder = text_encoder
        self.window_s = window_s
        self.max_batch = max_batch
        self.stats = stats if stats is not None else {}
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        # One thread: the model serves one batch at a time, and torch is not re-entrant on one module anyway.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flux2-accel-encoder")

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def encode(self, prompts: list[str]):
        future = asyncio.get_running_loop().create_future()
        await self._queue.put(_Pending(prompts, future))
        return await future

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            size = len(batch[0].prompts)
            deadline = loop.time() + self.window_s
            while size < self.max_batch and (left := deadline - loop.time()) > 0:
                try:
                    item = await asyncio.wait_for(self._queue.get(), left)
                except asyncio.TimeoutError:
                    break
                batch.append(item)
                size += len(item.prompts)
            batch = [p for p in batch if not p.future.done()]  # callers that hung up
            if not batch:
                continue
            prompts = [p for pending in batch for p in pending.prompts]
            try:
                cond = await loop.run_in_executor(self._executor, self.text_encoder.encode, prompts)
                embeds = cond.prompt_embeds.detach().to("cpu")
            except Exception as e:  # every caller in the batch gets the failure
                log.exception("flux2-accel: encoding a batch of %d prompt(s) failed", len(prompts))
                for pending in batch:
                    if not pending.future.done():
                        pending.future.set_exception(e)
                continue
            self.stats["batches"] = self.stats.get("batches", 0) + 1
            self.stats["prompts"] = self.stats.get("prompts", 0) + len(prompts)
            start = 0
            for pending in batch:
                stop = start + len(pending.prompts)
                if not pending.future.done():
                    pending.future.set_result(embeds[start:stop])
                start = stop


def _error(status: int, message: str, **headers) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers or None)


def create_app(text_encoder, *, token: str | None = None, no_auth: bool = False, batch_window_ms: float = 5.0,
               max_batch: int = 16, default_format: str = "safetensors",
               body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S) -> web.Application:
    """The server application around a loaded `optim.models.text_encoding.TextEncoder`.

    A token is required unless `no_auth=True` is given explicitly; clients send it as `Authorization: Bearer`.
    A request body must arrive whole within `body_timeout_s` (else 408 and the connection is closed), and its JSON
    may nest at most protocol.MAX_JSON_DEPTH levels (else 400).
    """
    if not token and not no_auth:
        raise InputError("the text encoder server needs a token (or no_auth=True to serve without one).")
    if not body_timeout_s > 0:
        raise InputError(f"body_timeout_s must be a positive number of seconds; got {body_timeout_s!r}.")
    if default_format not in FORMATS:
        raise InputError(f"default_format '{default_format}' is not one of {sorted(FORMATS)}.")
    expected = f"Bearer {token}".encode() if token else None
    stats = {"requests": 0, "batches": 0, "prompts": 0, "refused": 0, "timed_out": 0}
    batcher = EncodeBatcher(text_encoder, batch_window_ms / 1000.0, max_batch, stats)

    async def predict(request: web.Request) -> web.StreamResponse:
        stats["requests"] += 1
        if expected is not None:
            given = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                stats["refused"] += 1
                return _error(401, "missing or wrong token", **{"WWW-Authenticate": "Bearer"})
        try:
            body = await asyncio.wait_for(request.read(), body_timeout_s)
        except asyncio.TimeoutError:
            stats["timed_out"] += 1
            reply = _error(408, f"the request body did not arrive within {body_timeout_s:g} s")
            reply.force_close()
            await reply.prepare(request)
            await reply.write_eof()
            # The rest of the body may never come: close now (after the reply is flushed) rather than let aiohttp
            # linger, draining it, for another 10 s.
            if request.transport is not None:
                request.transport.close()
            return reply
        try:
            prompts = parse_prompts(body)
        except (ValueError, UnicodeDecodeError) as e:
            return _error(400, f"bad request: {e}")
        if len(prompts) > MAX_PROMPTS_PER_REQUEST:
            return _error(413, f"at most {MAX_PROMPTS_PER_REQUEST} prompts per request, got {len(prompts)}")
        if any(len(p) > MAX_PROMPT_CHARS for p in prompts):
            return _error(413, f"prompts are limited to {MAX_PROMPT_CHARS} characters")
        try:
            embeds = await batcher.encode(prompts)
        except Exception as e:
            return _error(500, f"encoding failed: {type(e).__name__}")
        fmt = choose_format(request.headers.get("Accept"), default_format)
        # Serializing a [dev] batch is hundreds of MB: keep it off the event loop.
        body, content_type = await asyncio.get_running_loop().run_in_executor(None, encode_tensor, embeds, fmt)
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "family": text_encoder.family,
                                  "width": getattr(text_encoder, "embed_dim", None)})

    async def on_startup(app):
        await batcher.start()

    async def on_cleanup(app):
        await batcher.stop()

    app = web.Application(client_max_size=1024**2)
    app[BATCHER_KEY] = batcher
    app[STATS_KEY] = stats
    app.router.add_post(PREDICT_PATH, predict)
    app.router.add_get("/health", health)
    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    return app


# ---------------------------------------------------------------- command line


def check_port_free(host: str, port: int) -> None:
    """Bind and release (host, port), so a port in use or an address this machine lacks is one clear error."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family, _, _, _, address = infos[0]
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind(address)
    except OSError as e:
        raise InputError(f"--host {host} --port {port}: cannot listen there ({e.strerror or e}); choose another "
                         "--port, or stop what uses it.") from None


def run(args) -> int:
    import torch

    from ...models.loading import load_text_encoder
    from ...models.precision import apply_text_encoder_precision

    token = os.environ.get(args.token_env, "").strip() or None
    if token is None and not args.no_auth:
        raise InputError(f"no token: set the {args.token_env} environment variable to the token clients must send, "
                         "or pass --no-auth to serve without one.")
    if args.no_auth and args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("flux2-accel: serving without a token on %s: anyone who can reach it can use it.", args.host)
    check_port_free(args.host, args.port)  # before loading the encoder, which takes a while
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    encoder = load_text_encoder(args.text_encoder, dtype=torch.bfloat16, tokenizer_path=args.tokenizer)
    encoder.model = apply_text_encoder_precision(encoder.model, args.precision)
    encoder.model.to(device)
    app = create_app(encoder, token=token, no_auth=args.no_auth, batch_window_ms=args.batch_window_ms,
                     max_batch=args.max_batch, default_format=args.default_format,
                     body_timeout_s=args.body_timeout)
    print(f"serving {encoder.family} text encoder (width {encoder.embed_dim}, {args.precision}, {device}) on "
          f"http://{args.host}:{args.port}{PREDICT_PATH}" + (" without a token" if args.no_auth else ""))
    web.run_app(app, host=args.host, port=args.port, print=None)
    return 0
