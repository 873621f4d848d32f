"""Prompt embeddings from a remote FLUX.2 text encoder: the public endpoint or `flux2-accel serve-text-encoder`.

The request runs on a worker thread over the standard library's http.client so that the caller can keep polling for
an interrupt and abort the socket mid-request. Connection failures, 429 and 5xx replies are retried with exponential
backoff (bounded); a timeout, an auth failure or any other 4xx ends the call at once with a clear message.

Deadlines are per attempt and cover the whole exchange: `connect_timeout` bounds name resolution, TCP and TLS set-up;
then `read_timeout` bounds sending the request AND receiving the entire reply, so a server that drips one byte at a
time cannot hold a call past it. A call makes at most `retry.max_attempts` attempts with bounded backoff in between.

A token is bound to hosts. It is sent only to the default endpoint's host (PUBLIC_URL) or to a host the user listed
in FLUX2_ACCEL_REMOTE_HOSTS or the ComfyUI setting "flux2accel.remote_hosts" (never a widget, so a shared workflow
cannot add one), and over plain http only to a listed host. A pack token (FLUX2_ACCEL_REMOTE_TOKEN or the setting
"flux2accel.remote_token") aimed at any other host is refused with an error before anything is sent: the user set
it for this pack, so dropping it silently would turn into a confusing 401, or send the prompt somewhere the user did
not mean. A Hugging Face token (HF_TOKEN, `hf auth login`) is a general credential the pack only borrows for the
official endpoint and listed hosts; elsewhere it is simply not used and the request goes without a token, which is
what a no-auth server wants. Without any token, requests go unauthenticated to whatever endpoint is set.

The token never leaves this module except in the Authorization header: it is not part of the config's repr, the
conditioning, the cache key, or any message (replies are masked before they are quoted).
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import logging
import math
import os
import re
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import Callable
from urllib.parse import urlsplit

import torch

from ...errors import Flux2AccelError, InputError, Interrupted
from ...models.text_encoding import Flux2Conditioning
from ...options import REMOTE_TOKEN_ENV as TOKEN_ENV
from .embedding_cache import EmbeddingCache
from .protocol import CLIENT_ACCEPT, FLOAT_DTYPES, ReplyFormatError, decode_tensor
from .urls import PUBLIC_URL, SETTINGS_TOKEN_ID, safe_url, validate_url

log = logging.getLogger("flux2_accel")

HF_TOKEN_ENV = "HF_TOKEN"
HOSTS_ENV = "FLUX2_ACCEL_REMOTE_HOSTS"
SETTINGS_HOSTS_ID = "flux2accel.remote_hosts"
DEFAULT_HOST = urlsplit(PUBLIC_URL).hostname  # the official FLUX.2 remote text encoder
# Widths of the FLUX.2 family's conditioning: Mistral 3 for [dev], Qwen3 for [klein] 9B and 4B.
from ...models.text_encoding import FAMILY_BY_EMBED_WIDTH as FAMILY_BY_WIDTH  # noqa: E402

MAX_REPLY_BYTES_PER_PROMPT = 64 * 1024**2  # [1, 512, 15360] is 31 MiB in float32
_ERROR_BODY_BYTES = 64 * 1024
_POLL_S = 0.05


class RemoteEncoderError(Flux2AccelError):
    """The remote text encoder could not be reached or gave an unusable reply."""


class RemoteAuthError(RemoteEncoderError):
    """The endpoint refused the token (HTTP 401/403)."""


class TokenNotAllowedError(InputError):
    """A token would go to a host it is not bound to, or over plain http to a host not listed."""


# ---------------------------------------------------------------- configuration


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 4
    backoff_s: float = 1.0  # waits backoff_s, 2x, 4x ... between attempts
    max_backoff_s: float = 30.0

    def delay(self, attempt: int, retry_after: str | None = None) -> float:
        wait = self.backoff_s * 2 ** (attempt - 1)
        if retry_after:
            try:
                wait = max(wait, float(retry_after))
            except ValueError:  # an HTTP date: keep our own backoff
                pass
        return min(wait, self.max_backoff_s)


@dataclass(frozen=True)
class RemoteEncoderConfig:
    url: str = PUBLIC_URL
    token: str | None = field(default=None, repr=False)
    token_source: str = ""  # where the token came from, for messages ("FLUX2_ACCEL_REMOTE_TOKEN", ...)
    connect_timeout: float = 10.0
    read_timeout: float = 120.0
    retry: RetryPolicy = RetryPolicy()
    expected_width: int | None = None  # None: accept any width; the sampler checks it against the model
    family: str | None = None  # None: inferred from the width
    # Hosts the user listed (FLUX2_ACCEL_REMOTE_HOSTS / flux2accel.remote_hosts): "host" or "host:port" entries.
    allowed_hosts: tuple[str, ...] = ()


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _normal_host(host: str) -> str:
    host = host.strip().lower().rstrip(".")
    try:
        return str(ipaddress.ip_address(host))  # one spelling per address ("0:0::1" is "::1")
    except ValueError:
        return host


def parse_host_list(value, origin: str) -> tuple[str, ...]:
    """The entries of a host list ("host" or "host:port", comma-separated, or a JSON list of them) in normal form.

    `origin` names where the list came from, for the error on a malformed entry.
    """
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        entries = value.split(",")
    elif isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        entries = list(value)
    else:
        raise InputError(f"{origin} must be a comma-separated list of hosts (host or host:port); "
                         f"got a {type(value).__name__}.")
    hosts = []
    for entry in (e.strip() for e in entries):
        if not entry:
            continue
        if entry.count(":") > 1 and not entry.startswith("["):
            entry = f"[{entry}]"  # a bare IPv6 address
        try:
            if re.search(r"[/@?#\s]", entry):
                raise ValueError("give a host or host:port, not a URL")
            parts = urlsplit(f"//{entry}")
            port = parts.port
            if not parts.hostname:
                raise ValueError("no host name")
        except ValueError as e:
            raise InputError(f"{origin}: '{entry[:100]}' is not a host or host:port ({e}). Example: "
                             "encoder.example.com,127.0.0.1:8199") from None
        host = _normal_host(parts.hostname)
        hosts.append(f"[{host}]:{port}" if ":" in host and port is not None
                     else f"{host}:{port}" if port is not None else host)
    return tuple(dict.fromkeys(hosts))


def _host_is_listed(url: str, allowed_hosts) -> bool:
    parts = urlsplit(url)
    host = _normal_host(parts.hostname or "")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    for entry in allowed_hosts:
        listed = urlsplit(f"//{entry}")
        if _normal_host(listed.hostname or "") == host and listed.port in (None, port):
            return True
    return False


def token_bound_to(url: str, allowed_hosts=()) -> bool:
    """Whether a token may go to `url`'s host: the default endpoint's host or a listed one (scheme not considered)."""
    return _normal_host(urlsplit(url).hostname or "") == DEFAULT_HOST or _host_is_listed(url, allowed_hosts)


_HOW_TO_LIST = (f"list the host in the {HOSTS_ENV} environment variable or the ComfyUI setting '{SETTINGS_HOSTS_ID}' "
                "(comma-separated host or host:port)")


def check_token_destination(url: str, token_source: str, allowed_hosts=()) -> None:
    """Raises TokenNotAllowedError unless a token from `token_source` may be sent to `url`."""
    parts = urlsplit(url)
    listed = _host_is_listed(url, allowed_hosts)
    where = f" (from {token_source})" if token_source else ""
    if not token_bound_to(url, allowed_hosts):
        raise TokenNotAllowedError(
            f"endpoint_url '{safe_url(url)}': the remote text encoder token{where} is only sent to {DEFAULT_HOST} "
            f"and to hosts you list, so a shared workflow cannot send it elsewhere. If you trust "
            f"{parts.hostname}, {_HOW_TO_LIST}; otherwise keep the default endpoint_url.")
    if parts.scheme == "http" and not (listed or _is_loopback(parts.hostname or "")):
        raise TokenNotAllowedError(
            f"endpoint_url '{safe_url(url)}' is plain http: the token{where} would travel unencrypted, so it is only "
            f"sent over http to hosts you list. Use https://, or {_HOW_TO_LIST}.")


def setting_from_settings_file(path, key: str):
    """The value of `key` in a ComfyUI user settings file (`comfy.settings.json`), or None."""
    if not path or not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f).get(key)
    except (OSError, ValueError, AttributeError, RecursionError) as e:
        log.warning("flux2-accel: could not read ComfyUI settings %s (%s)", path, type(e).__name__)
        return None


def token_from_settings_file(path) -> str | None:
    """The token saved in a ComfyUI user settings file under SETTINGS_TOKEN_ID."""
    value = setting_from_settings_file(path, SETTINGS_TOKEN_ID)
    return value.strip() if isinstance(value, str) and value.strip() else None


def listed_hosts(settings_file=None, environ=None) -> tuple[str, ...]:
    """The hosts the user allows tokens to go to: FLUX2_ACCEL_REMOTE_HOSTS plus the ComfyUI setting, together."""
    environ = os.environ if environ is None else environ
    hosts = parse_host_list(environ.get(HOSTS_ENV, ""), f"the {HOSTS_ENV} environment variable")
    hosts += parse_host_list(setting_from_settings_file(settings_file, SETTINGS_HOSTS_ID),
                             f"the ComfyUI setting '{SETTINGS_HOSTS_ID}'")
    return tuple(dict.fromkeys(hosts))


def resolve_token(url: str, settings_file=None, environ=None, allowed_hosts=()) -> tuple[str | None, str]:
    """(token, where it came from) for `url`.

    FLUX2_ACCEL_REMOTE_TOKEN, then the ComfyUI setting, whatever the host: the client refuses to send them to a host
    they are not bound to. A Hugging Face token (HF_TOKEN, or the one `hf auth login` stored) is offered only for the
    official endpoint's host and listed hosts; elsewhere none is returned, and the request goes without a token.
    """
    environ = os.environ if environ is None else environ
    if environ.get(TOKEN_ENV, "").strip():
        return environ[TOKEN_ENV].strip(), TOKEN_ENV
    token = token_from_settings_file(settings_file)
    if token:
        return token, f"ComfyUI setting {SETTINGS_TOKEN_ID}"
    if token_bound_to(url, allowed_hosts):
        if environ.get(HF_TOKEN_ENV, "").strip():
            return environ[HF_TOKEN_ENV].strip(), HF_TOKEN_ENV
        try:
            from huggingface_hub import get_token

            token = get_token()
        except Exception:
            token = None
        if token:
            return token, "Hugging Face login"
    return None, ""


# ---------------------------------------------------------------- one HTTP exchange


class _ReplyTooLarge(Exception):
    pass


# The connection class per scheme; one place, so a test can stand in for TLS with a loopback server.
CONNECTION_CLASSES = {"http": http.client.HTTPConnection, "https": http.client.HTTPSConnection}


class _Exchange:
    """One POST on a worker thread; `abort()` shuts the socket so a blocked read returns at once."""

    def __init__(self, url: str, body: bytes, headers: dict, connect_timeout: float, read_timeout: float,
                 max_bytes: int):
        self.parts = urlsplit(url)
        self.body, self.headers = body, headers
        self.connect_timeout, self.read_timeout, self.max_bytes = connect_timeout, read_timeout, max_bytes
        self.phase = "connect"
        self.connected_at: float | None = None  # time.monotonic() once connected: the read deadline starts here
        self.result: tuple[int, dict, bytes] | None = None
        self.error: BaseException | None = None
        self.done = threading.Event()
        self._conn = None

    def run(self) -> None:
        try:
            cls = CONNECTION_CLASSES[self.parts.scheme]
            self._conn = conn = cls(self.parts.hostname, self.parts.port, timeout=self.connect_timeout)
            conn.connect()
            self.connected_at = time.monotonic()
            conn.sock.settimeout(self.read_timeout)  # per read; the caller holds the overall deadline
            self.phase = "send"
            target = self.parts.path or "/"
            if self.parts.query:
                target += "?" + self.parts.query
            conn.request("POST", target, body=self.body, headers=self.headers)
            self.phase = "read"
            response = conn.getresponse()
            limit = self.max_bytes if response.status == 200 else _ERROR_BODY_BYTES
            chunks, size = [], 0
            while size < limit or response.status == 200:
                chunk = response.read(min(1 << 20, limit + 1 - size))
                if not chunk:
                    break
                size += len(chunk)
                if size > limit:
                    if response.status == 200:
                        raise _ReplyTooLarge()
                    break
                chunks.append(chunk)
            self.result = (response.status, {k.lower(): v for k, v in response.getheaders()}, b"".join(chunks))
        except BaseException as e:  # handed to the waiting thread
            self.error = e
        finally:
            if self._conn is not None:
                self._conn.close()
            self.done.set()

    def abort(self) -> None:
        sock = getattr(self._conn, "sock", None)
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _wait(seconds: float, should_interrupt: Callable[[], bool] | None) -> None:
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        if should_interrupt is not None and should_interrupt():
            raise Interrupted("remote text encoding was cancelled")
        time.sleep(min(_POLL_S, left))


# ---------------------------------------------------------------- the client


class RemoteTextEncoder:
    """Encodes prompts through an HTTP endpoint; a drop-in for `TextEncoder.encode` that returns the same type."""

    def __init__(self, config: RemoteEncoderConfig, cache: EmbeddingCache | None = None):
        validate_url(config.url)
        for name, value in (("timeout", config.read_timeout), ("connect timeout", config.connect_timeout)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value <= 0:
                raise InputError(f"{name} {value!r}: give a number of seconds above 0.")
        self.config = config
        self.cache = cache
        self.url = safe_url(config.url)
        self.identity = f"remote:{self.url}"
        self.requests_sent = 0
        if config.token:
            check_token_destination(config.url, config.token_source, config.allowed_hosts)

    def __repr__(self) -> str:
        cache = "on" if self.cache is not None and self.cache.enabled else "off"
        return f"RemoteTextEncoder({self.url!r}, cache={cache})"

    # -- public

    def encode(self, prompts, should_interrupt: Callable[[], bool] | None = None) -> Flux2Conditioning:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise InputError("no prompt to encode.")
        rows: dict[int, torch.Tensor] = {}
        keys = [EmbeddingCache.key(p, self.identity) for p in prompts]
        if self.cache is not None:
            for i, key in enumerate(keys):
                row = self.cache.get(key)
                if row is not None and self._problem(row, 1) is None:
                    rows[i] = row
        missing = list(dict.fromkeys(prompts[i] for i in range(len(prompts)) if i not in rows))
        if missing:
            started = time.perf_counter()
            embeds = self._request(missing, should_interrupt)
            fetched = {p: embeds[j:j + 1] for j, p in enumerate(missing)}
            for i, p in enumerate(prompts):
                if i not in rows:
                    rows[i] = fetched[p]
            if self.cache is not None:
                for p, row in fetched.items():
                    self.cache.put(EmbeddingCache.key(p, self.identity), row)
            log.info("flux2-accel: remote text encoder %s encoded %d prompt(s) in %.1f s (%d from cache)", self.url,
                     len(missing), time.perf_counter() - started, len(prompts) - len(missing))
        else:
            log.info("flux2-accel: %d prompt(s) from the embedding cache, no request sent", len(prompts))
        if len({tuple(r.shape[1:]) for r in rows.values()}) > 1:
            raise RemoteEncoderError(f"{self.url} returned embeddings of different shapes for one batch: "
                                     f"{sorted({tuple(r.shape) for r in rows.values()})}.")
        embeds = torch.cat([rows[i] for i in range(len(prompts))])
        family = self.config.family or FAMILY_BY_WIDTH.get(embeds.shape[-1], "mistral")
        return Flux2Conditioning(embeds, family, self.identity, tuple(prompts))

    # -- internals

    def _mask(self, text: str) -> str:
        text = re.sub(r"(?i)(bearer\s+)[^\s\"',;]+", r"\1***", text)
        if self.config.token:
            text = text.replace(self.config.token, "***")
        return text

    def _problem(self, embeds: torch.Tensor, batch: int) -> str | None:
        width = self.config.expected_width
        want = f"[{batch}, 512, {width}]" if width else f"[{batch}, L, D]"
        if embeds.dim() != 3 or embeds.shape[0] != batch:
            return f"embeddings of shape {tuple(embeds.shape)}, expected {want} ({batch} prompt(s))"
        if 0 in embeds.shape:
            return f"empty embeddings of shape {tuple(embeds.shape)} (0 tokens or width 0), expected {want}"
        if embeds.dtype not in FLOAT_DTYPES:
            return f"embeddings of dtype {embeds.dtype}, expected one of float32, bfloat16, float16"
        if width and embeds.shape[-1] != width:
            return (f"embeddings of shape {tuple(embeds.shape)} (width {embeds.shape[-1]}) but the model expects "
                    f"width {width}, shape {want}: the endpoint serves a different text encoder than the model")
        if not bool(torch.isfinite(embeds).all()):
            nan, inf = int(torch.isnan(embeds).sum()), int(torch.isinf(embeds).sum())
            return (f"embeddings with non-finite values ({nan} NaN, {inf} Inf of {embeds.numel()}): the server's "
                    "text encoder is broken (e.g. overflowing in float16)")
        return None

    def _headers(self) -> dict:
        headers = {"Content-Type": "application/json", "Accept": CLIENT_ACCEPT, "User-Agent": "flux2-accel"}
        if self.config.token:
            headers["Authorization"] = f"Bearer {self.config.token}"
        return headers

    def _server_message(self, body: bytes) -> str:
        text = body.decode("utf-8", "replace").strip()
        try:
            payload = json.loads(text)
            if isinstance(payload, dict):
                text = str(payload.get("error") or payload.get("detail") or payload.get("message") or text)
        except (ValueError, RecursionError):
            pass
        text = " ".join(text.split())[:300]
        return self._mask(text)

    def _request(self, prompts: list[str], should_interrupt) -> torch.Tensor:
        cfg = self.config
        body = json.dumps({"prompt": prompts}).encode("utf-8")
        attempts = max(1, cfg.retry.max_attempts)
        last = ""
        for attempt in range(1, attempts + 1):
            status, headers, reply, failure = self._exchange(body, len(prompts), should_interrupt)
            retry_after = None
            if failure is not None:
                last = failure
            elif status == 200:
                try:
                    embeds = decode_tensor(reply)
                except ReplyFormatError as e:
                    raise RemoteEncoderError(f"{self.url} sent an unusable reply: {self._mask(str(e))}") from None
                problem = self._problem(embeds, len(prompts))
                if problem:
                    raise RemoteEncoderError(f"{self.url} returned {problem}.")
                return embeds
            elif status in (401, 403):
                raise RemoteAuthError(self._auth_message(status, self._server_message(reply)))
            elif status == 429 or status >= 500:
                last = f"HTTP {status}: {self._server_message(reply) or http.client.responses.get(status, '')}"
                retry_after = headers.get("retry-after")
            else:
                reason = self._server_message(reply) or http.client.responses.get(status, "")
                hint = " (a redirect: give the final URL)" if 300 <= status < 400 else ""
                raise RemoteEncoderError(f"{self.url} answered HTTP {status}{hint}: {reason}")
            if attempt < attempts:
                wait = cfg.retry.delay(attempt, retry_after)
                log.warning("flux2-accel: remote text encoder %s: %s; retrying in %.1f s (attempt %d of %d)",
                            self.url, last, wait, attempt + 1, attempts)
                _wait(wait, should_interrupt)
        raise RemoteEncoderError(f"{self.url} failed {attempts} time(s); last error: {last}. Check that the server "
                                 "is running and reachable, or try again later.")

    def _auth_message(self, status: int, reason: str) -> str:
        if not self.config.token:
            listing = "" if token_bound_to(self.config.url, self.config.allowed_hosts) else (
                f", and {_HOW_TO_LIST} (tokens, HF_TOKEN included, only go to {DEFAULT_HOST} and listed hosts)")
            return (f"{self.url} needs a token (HTTP {status}) and none is set for it: put it in the {TOKEN_ENV} "
                    f"environment variable or the ComfyUI setting '{SETTINGS_TOKEN_ID}'{listing}"
                    + (f". Server said: {reason}" if reason else "."))
        source = f" from {self.config.token_source}" if self.config.token_source else ""
        return (f"{self.url} refused the token{source} (HTTP {status}): check it is valid and allowed to use this "
                f"endpoint." + (f" Server said: {reason}" if reason else ""))

    def _timeout_error(self) -> RemoteEncoderError:
        return RemoteEncoderError(f"{self.url} did not send its whole reply within {self.config.read_timeout:g} s "
                                  "(read timeout). The server may be busy or slow: raise the timeout or try again.")

    def _exchange(self, body: bytes, n_prompts: int, should_interrupt):
        """(status, headers, body, None) for a reply, (None, None, None, reason) for a retryable failure."""
        cfg = self.config
        exchange = _Exchange(cfg.url, body, self._headers(), cfg.connect_timeout, cfg.read_timeout,
                             MAX_REPLY_BYTES_PER_PROMPT * n_prompts)
        self.requests_sent += 1
        worker = threading.Thread(target=exchange.run, name="flux2-accel-remote-encode", daemon=True)
        started = time.monotonic()
        worker.start()
        while not exchange.done.wait(_POLL_S):
            if should_interrupt is not None and should_interrupt():
                exchange.abort()
                worker.join(1.0)
                raise Interrupted("remote text encoding was cancelled while waiting for the server")
            now, connected_at = time.monotonic(), exchange.connected_at
            if connected_at is None and now > started + cfg.connect_timeout:
                # Name resolution has no timeout of its own; a worker stuck in it is left behind (daemon thread).
                exchange.abort()
                return None, None, None, f"no connection within {cfg.connect_timeout:g} s (connect timeout)"
            if connected_at is not None and now > connected_at + cfg.read_timeout:
                exchange.abort()  # whatever the worker makes of the cut connection, the deadline has passed
                worker.join(1.0)
                raise self._timeout_error()
        error = exchange.error
        if error is None:
            return (*exchange.result, None)
        reason = self._mask(f"{type(error).__name__}: {error}")
        if isinstance(error, _ReplyTooLarge):
            raise RemoteEncoderError(f"{self.url} sent more than {MAX_REPLY_BYTES_PER_PROMPT * n_prompts} bytes for "
                                     f"{n_prompts} prompt(s); refusing it.")
        if isinstance(error, (socket.timeout, TimeoutError)) and exchange.phase != "connect":
            raise self._timeout_error()
        if isinstance(error, (socket.timeout, TimeoutError)):
            return None, None, None, f"no connection within {cfg.connect_timeout:g} s (connect timeout)"
        if isinstance(error, ssl.SSLError):
            raise RemoteEncoderError(f"TLS with {self.url} failed: {reason}")
        if isinstance(error, (OSError, http.client.HTTPException)):
            return None, None, None, f"could not connect or the connection dropped ({reason})"
        raise error
