"""Remote text encoding: our aiohttp server and the client/node, on 127.0.0.1 only, with a tiny Mistral encoder.

Failure modes are played by small fake aiohttp servers; every loop and wait in here is bounded.
"""

from __future__ import annotations

import asyncio
import errno
import http.client
import io
import json
import logging
import os
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch
from aiohttp import web
from flux2_accel.optim.errors import InputError, Interrupted
from flux2_accel.optim.models import tiny
from flux2_accel.optim.models.text_encoding import TextEncoder
from flux2_accel.optim.run.sampling import check_conditioning
from flux2_accel.optim.serve.remote import client as client_module
from flux2_accel.optim.serve.remote.client import (RemoteAuthError, RemoteEncoderConfig, RemoteEncoderError,
                                                   RemoteTextEncoder, RetryPolicy, TokenNotAllowedError, resolve_token,
                                                   safe_url)
from flux2_accel.optim.serve.remote.embedding_cache import EmbeddingCache
from flux2_accel.optim.serve.remote.protocol import PUBLIC_URL, TORCH_TYPE, decode_tensor, encode_tensor
from flux2_accel.optim.serve.remote.server import STATS_KEY, create_app
from flux2_accel.optim.serve.ray_serve.config import TextEncoderConfig
from flux2_accel.optim.serve.ray_serve.runtime import ServedTextEncoder

TOKEN = "tok-S3CRET-7f1e9a"
WIDTH = 3 * tiny.TINY.text_hidden_size  # the tiny Mistral's conditioning width (96)
FAST_RETRY = RetryPolicy(max_attempts=3, backoff_s=0.01, max_backoff_s=0.05)


# ---------------------------------------------------------------- servers on loopback


class LoopbackServer:
    """Serves an aiohttp app on 127.0.0.1 (a free port) from its own thread and event loop."""

    def __init__(self, app: web.Application):
        self.app = app
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)
        return self

    async def _start(self):
        self.runner = web.AppRunner(self.app, shutdown_timeout=0.2)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = self.runner.addresses[0][1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/predict"

    async def _stop(self):
        await self.runner.cleanup()
        # Handlers of the slow fake servers may still sleep: end them so the loop closes clean.
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)

    def __exit__(self, *exc):
        asyncio.run_coroutine_threadsafe(self._stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


SEEN = web.AppKey("seen", list)


def fake_server(*handlers) -> LoopbackServer:
    """Answers the n-th POST with handlers[n] (the last one repeats); records each request's headers and body."""
    app = web.Application()
    app[SEEN] = []

    async def predict(request):
        n = len(request.app[SEEN])
        request.app[SEEN].append({"headers": dict(request.headers), "body": await request.read()})
        return await handlers[min(n, len(handlers) - 1)](request)

    app.router.add_post("/predict", predict)
    return LoopbackServer(app)


def tensor_reply(tensor, fmt="safetensors"):
    async def handler(request):
        return web.Response(body=encode_tensor(tensor, fmt)[0], content_type="application/octet-stream")
    return handler


def status_reply(status, text="", headers=None):
    async def handler(request):
        return web.Response(status=status, text=text, headers=headers)
    return handler


def client(url, expected_width=WIDTH, cache=None, **config) -> RemoteTextEncoder:
    config.setdefault("retry", FAST_RETRY)
    config.setdefault("token", TOKEN)
    config.setdefault("allowed_hosts", ("127.0.0.1",))  # as a user lists the loopback server the token is for
    return RemoteTextEncoder(RemoteEncoderConfig(url=url, expected_width=expected_width, **config), cache)


@pytest.fixture(scope="module")
def text_encoder():
    te = TextEncoder(tiny.build_text_encoder(tiny.TINY), tiny.build_tokenizer("dev"), "mistral",
                     tiny.TINY.text_out_layers, identity="tiny-mistral")
    te.encode("warm up")  # first call pays transformers' lazy setup
    return te


@pytest.fixture()
def our_server(text_encoder):
    with LoopbackServer(create_app(text_encoder, token=TOKEN)) as server:
        yield server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- our server, exact results


def test_remote_embeddings_equal_local_encoding_exactly(text_encoder, our_server):
    cond = client(our_server.url).encode("a red dog in a green house")
    local = text_encoder.encode("a red dog in a green house")
    assert torch.equal(cond.prompt_embeds, local.prompt_embeds)
    assert cond.prompt_embeds.dtype == local.prompt_embeds.dtype and cond.prompt_embeds.shape == (1, 512, WIDTH)
    assert cond.family == "mistral" and cond.prompts == ("a red dog in a green house",)
    assert cond.encoder_identity == f"remote:{our_server.url}"
    assert our_server.app[STATS_KEY]["requests"] == 1


@pytest.mark.parametrize("accept", [TORCH_TYPE, f"{TORCH_TYPE}, application/x-safetensors;q=0.2"])
def test_server_sends_torch_format_when_asked(text_encoder, our_server, accept):
    request = urllib.request.Request(our_server.url, data=json.dumps({"prompt": "a cat"}).encode(), headers={
        "Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json", "Accept": accept})
    with urllib.request.urlopen(request, timeout=30) as reply:
        assert reply.headers["Content-Type"] == TORCH_TYPE
        body = reply.read()
    assert body[:4] == b"PK\x03\x04"  # torch.save's zip, as the public endpoint sends
    assert torch.equal(decode_tensor(body), text_encoder.encode(["a cat"]).prompt_embeds)


def test_concurrent_requests_are_encoded_as_one_batch(text_encoder):
    prompts = ["a red dog", "a green house", "a cat on a chair"]
    app = create_app(text_encoder, token=TOKEN, batch_window_ms=400)
    results, barrier = {}, threading.Barrier(len(prompts))

    def ask(prompt):
        barrier.wait(10)
        results[prompt] = client(server.url).encode(prompt).prompt_embeds

    with LoopbackServer(app) as server:
        threads = [threading.Thread(target=ask, args=(p,)) for p in prompts]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        stats = dict(app[STATS_KEY])
    assert stats["requests"] == 3 and stats["prompts"] == 3 and stats["batches"] == 1
    for p in prompts:
        assert torch.equal(results[p], text_encoder.encode(p).prompt_embeds)


def test_server_refuses_a_wrong_token_at_once(our_server):
    remote = client(our_server.url, token="not-the-token")
    with pytest.raises(RemoteAuthError, match="HTTP 401") as err:
        remote.encode("a cat")
    assert "refused the token" in str(err.value) and "Server said: missing or wrong token" in str(err.value)
    assert our_server.app[STATS_KEY]["requests"] == 1 and our_server.app[STATS_KEY]["refused"] == 1


def test_server_rejects_bad_requests(our_server):
    def post(payload):
        request = urllib.request.Request(our_server.url, data=payload, headers={"Authorization": f"Bearer {TOKEN}"})
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(request, timeout=30)
        return err.value.code, json.loads(err.value.read())["error"]

    assert post(b"{not json")[0] == 400
    assert post(json.dumps({"prompt": []}).encode()) == (400, 'bad request: "prompt" must be a string or a '
                                                               'non-empty list of strings')
    assert post(json.dumps({"prompt": ["x"] * 17}).encode())[0] == 413
    assert our_server.app[STATS_KEY]["batches"] == 0


def test_server_needs_a_token_unless_told_otherwise(text_encoder, monkeypatch, capsys, tmp_path):
    with pytest.raises(InputError, match="needs a token"):
        create_app(text_encoder)
    create_app(text_encoder, no_auth=True)  # explicit opt-out is allowed
    from flux2_accel.optim.cli import main as cli

    monkeypatch.delenv("FLUX2_ACCEL_REMOTE_TOKEN", raising=False)
    rc = cli.main(["serve-text-encoder", "--text-encoder", str(tmp_path / "te.safetensors")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "FLUX2_ACCEL_REMOTE_TOKEN" in err and "--no-auth" in err


def test_cli_serves_a_text_encoder_file(text_encoder, monkeypatch, tmp_path, capsys):
    from flux2_accel.optim.cli import main as cli
    from flux2_accel.optim.models.loading import load_text_encoder
    from flux2_accel.optim.serve.remote import server as server_module
    from safetensors.torch import save_file

    path = tmp_path / "mistral_tiny.safetensors"
    save_file({k: v.clone() for k, v in text_encoder.model.state_dict().items()}, str(path))  # clone: tied weights
    text_encoder.tokenizer.save_pretrained(tmp_path / "mistral_tiny_tokenizer")
    served = {}
    monkeypatch.setattr(server_module.web, "run_app", lambda app, **kw: served.update(app=app, **kw))
    monkeypatch.setenv("MY_TOKEN", TOKEN)
    rc = cli.main(["serve-text-encoder", "--text-encoder", str(path), "--token-env", "MY_TOKEN", "--port", "8765",
                   "--device", "cpu"])
    assert rc == 0 and served["host"] == "127.0.0.1" and served["port"] == 8765
    assert "serving mistral text encoder (width 96, bf16, cpu)" in capsys.readouterr().out
    with LoopbackServer(served["app"]) as server:
        cond = client(server.url).encode("a red dog")
        with pytest.raises(RemoteAuthError):
            client(server.url, token="wrong").encode("a red dog")
    local = load_text_encoder(path).encode("a red dog")  # the same file, loaded the same way (bf16)
    assert cond.prompt_embeds.dtype == torch.bfloat16 and torch.equal(cond.prompt_embeds, local.prompt_embeds)


# ---------------------------------------------------------------- failures


@pytest.mark.parametrize("status", [500, 503, 429])
def test_retryable_status_then_success_is_retried(status):
    embeds = torch.randn(1, 512, WIDTH)
    with fake_server(status_reply(status, "busy", {"Retry-After": "0"}), tensor_reply(embeds)) as server:
        cond = client(server.url).encode("a cat")
        assert len(server.app[SEEN]) == 2
    assert torch.equal(cond.prompt_embeds, embeds)


def test_retries_are_bounded():
    with fake_server(status_reply(502, "bad gateway")) as server:
        with pytest.raises(RemoteEncoderError, match=r"failed 3 time\(s\); last error: HTTP 502"):
            client(server.url).encode("a cat")
        assert len(server.app[SEEN]) == 3


@pytest.mark.parametrize("status", [401, 403])
def test_auth_failure_is_reported_at_once(status):
    with fake_server(status_reply(status, json.dumps({"error": "invalid token"}))) as server:
        with pytest.raises(RemoteAuthError, match=f"HTTP {status}.*invalid token"):
            client(server.url, token_source="FLUX2_ACCEL_REMOTE_TOKEN").encode("a cat")
        assert len(server.app[SEEN]) == 1


def test_missing_token_says_where_to_put_it():
    with fake_server(status_reply(401)) as server:
        with pytest.raises(RemoteAuthError, match="none is set.*FLUX2_ACCEL_REMOTE_TOKEN.*flux2accel.remote_token"):
            client(server.url, token=None).encode("a cat")
        assert "Authorization" not in server.app[SEEN][0]["headers"]


@pytest.mark.parametrize("status", [400, 404, 422])
def test_other_client_errors_fail_at_once(status):
    with fake_server(status_reply(status, "no such model")) as server:
        with pytest.raises(RemoteEncoderError, match=f"HTTP {status}: no such model"):
            client(server.url).encode("a cat")
        assert len(server.app[SEEN]) == 1


def test_read_timeout():
    async def slow(request):
        await asyncio.sleep(3)
        return await tensor_reply(torch.zeros(1, 512, WIDTH))(request)

    with fake_server(slow) as server:
        with pytest.raises(RemoteEncoderError, match=r"did not send its whole reply within 0.3 s \(read timeout\)"):
            client(server.url, read_timeout=0.3).encode("a cat")
        assert len(server.app[SEEN]) == 1  # a timed-out request is not sent again


def test_server_down_is_reported_after_bounded_retries():
    url = f"http://127.0.0.1:{free_port()}/predict"
    remote = client(url)
    with pytest.raises(RemoteEncoderError, match=r"failed 3 time\(s\).*could not connect.*running"):
        remote.encode("a cat")
    assert remote.requests_sent == 3


@pytest.mark.parametrize("body", [b"<html>502 Bad Gateway</html>", b"", b"\x00" * 64, b"PK\x03\x04broken zip"])
def test_garbage_body_is_refused(body):
    async def garbage(request):
        return web.Response(body=body, content_type="application/octet-stream")

    with fake_server(garbage) as server:
        with pytest.raises(RemoteEncoderError, match="unusable reply"):
            client(server.url).encode("a cat")


class _CreatesFile:
    """Unpickling this calls open(path, "w"): code run by the reply, which safe loading must refuse."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _pickle_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def test_pickle_that_would_run_code_is_refused(tmp_path):
    control = tmp_path / "control"  # proves the payload really runs code when unpickled unsafely
    torch.load(io.BytesIO(_pickle_bytes(_CreatesFile(control))), weights_only=False).close()
    assert control.exists()

    target = tmp_path / "pwned"
    payload = _pickle_bytes({"prompt_embeds": torch.zeros(1, 512, WIDTH), "x": _CreatesFile(target)})

    async def malicious(request):
        return web.Response(body=payload, content_type="application/octet-stream")

    with fake_server(malicious) as server:
        with pytest.raises(RemoteEncoderError, match=r"refused: it references (io|builtins)\.open, which is not a "
                                                     r"tensor \(unpickling it could run code"):
            client(server.url).encode("a cat")
    assert not target.exists()


def test_public_contract_torch_reply_is_accepted():
    embeds = torch.randn(1, 512, WIDTH).to(torch.bfloat16)  # what the public endpoint sends
    with fake_server(tensor_reply(embeds, "torch")) as server:
        cond = client(server.url).encode("a cat")
        sent = server.app[SEEN][0]
    assert torch.equal(cond.prompt_embeds, embeds) and cond.prompt_embeds.dtype == torch.bfloat16
    assert json.loads(sent["body"]) == {"prompt": ["a cat"]}
    assert sent["headers"]["Authorization"] == f"Bearer {TOKEN}"


@pytest.mark.parametrize("reply, message", [
    (torch.zeros(1, 512, 64), r"shape \(1, 512, 64\) \(width 64\) but the model expects width 96, "
                              r"shape \[1, 512, 96\]"),
    (torch.zeros(2, 512, WIDTH), r"shape \(2, 512, 96\), expected \[1, 512, 96\] \(1 prompt"),
    (torch.zeros(512, WIDTH), r"shape \(512, 96\), expected \[1, 512, 96\]"),
    (torch.zeros(1, 512, WIDTH, dtype=torch.int32), "dtype torch.int32"),
])
def test_wrong_shape_or_dtype_is_refused(reply, message, tmp_path):
    cache = EmbeddingCache(tmp_path / "cache")
    with fake_server(tensor_reply(reply)) as server:
        with pytest.raises(RemoteEncoderError, match=message):
            client(server.url, cache=cache).encode("a cat")
    assert len(cache) == 0  # a bad reply is never cached


def test_width_mismatch_is_caught_by_the_node_or_by_the_sampler(our_server, monkeypatch, tmp_path):
    from flux2_accel.nodes.remote import Flux2AccelRemoteTextEncode

    monkeypatch.setenv("FLUX2_ACCEL_REMOTE_TOKEN", TOKEN)
    monkeypatch.setenv("FLUX2_ACCEL_REMOTE_HOSTS", "127.0.0.1")
    monkeypatch.setenv("FLUX2_ACCEL_EMBEDDING_CACHE_DIR", str(tmp_path))
    node = Flux2AccelRemoteTextEncode()
    with pytest.raises(RemoteEncoderError, match=r"shape \(1, 512, 96\).*expects width 15360, shape \[1, 512, 15360\]"):
        node.encode("a cat", our_server.url, "dev (Mistral 3, width 15360)", False, 30)
    (cond,) = node.encode("a cat", our_server.url, "any (the sampler checks)", False, 30)
    check_conditioning(tiny.build_transformer(tiny.TINY), cond)  # the right model takes it
    small = tiny.build_transformer(tiny.SMALL)  # joint_attention_dim 192
    with pytest.raises(InputError, match=r"width 96 \(shape \(1, 512, 96\)\) but this transformer expects width 192"):
        check_conditioning(small, cond)


def test_interrupt_cancels_the_request_in_flight():
    async def slow(request):
        await asyncio.sleep(2)
        return await tensor_reply(torch.zeros(1, 512, WIDTH))(request)

    pressed = threading.Event()
    timer = threading.Timer(0.2, pressed.set)
    with fake_server(slow) as server:
        timer.start()
        # Without cancellation the call would succeed after 2 s (read timeout 30 s).
        with pytest.raises(Interrupted, match="cancelled"):
            client(server.url, read_timeout=30).encode("a cat", should_interrupt=pressed.is_set)
        assert len(server.app[SEEN]) == 1
    timer.cancel()


# ---------------------------------------------------------------- cache


def test_repeated_prompt_is_served_from_the_cache(text_encoder, our_server, tmp_path):
    cache = EmbeddingCache(tmp_path / "cache")
    first = client(our_server.url, cache=cache).encode("a red dog")
    second = client(our_server.url, cache=cache).encode("a red dog")
    assert our_server.app[STATS_KEY]["requests"] == 1 and cache.hits == 1
    assert torch.equal(first.prompt_embeds, second.prompt_embeds)
    assert torch.equal(second.prompt_embeds, text_encoder.encode("a red dog").prompt_embeds)
    # Only the prompt not yet cached is sent; the order of the batch is kept.
    both = client(our_server.url, cache=cache).encode(["a cat", "a red dog"])
    assert our_server.app[STATS_KEY]["requests"] == 2 and our_server.app[STATS_KEY]["prompts"] == 2
    assert torch.equal(both.prompt_embeds, text_encoder.encode(["a cat", "a red dog"]).prompt_embeds)
    fresh = client(our_server.url, cache=cache).encode(["one cat", "two dogs", "one cat"])
    again = client(our_server.url, cache=cache).encode("two dogs")
    assert our_server.app[STATS_KEY]["requests"] == 3 and our_server.app[STATS_KEY]["prompts"] == 4  # deduplicated
    assert torch.equal(again.prompt_embeds, fresh.prompt_embeds[1:2])
    assert torch.equal(fresh.prompt_embeds[0], fresh.prompt_embeds[2])


def test_cache_off_switch_and_identity(our_server, tmp_path):
    off = EmbeddingCache(tmp_path / "off", enabled=False)
    client(our_server.url, cache=off).encode("a red dog")
    client(our_server.url, cache=off).encode("a red dog")
    assert our_server.app[STATS_KEY]["requests"] == 2 and len(off) == 0
    assert EmbeddingCache.key("a red dog", "remote:http://a/predict") != EmbeddingCache.key(
        "a red dog", "remote:http://b/predict")


def test_cache_is_bounded_least_recently_used_first(tmp_path):
    row = torch.zeros(1, 512, WIDTH)
    cache = EmbeddingCache(tmp_path)
    cache.put("probe", row)
    size = (tmp_path / "probe.safetensors").stat().st_size
    cache = EmbeddingCache(tmp_path, max_bytes=2 * size)
    cache.clear()
    cache.put("a", row), cache.put("b", row)
    os.utime(tmp_path / "a.safetensors", ns=(10**9, 10**9))
    os.utime(tmp_path / "b.safetensors", ns=(2 * 10**9, 2 * 10**9))
    assert cache.get("a") is not None  # reading "a" makes "b" the least recently used
    cache.put("c", row)
    assert sorted(p.stem for p in tmp_path.glob("*.safetensors")) == ["a", "c"]


# ---------------------------------------------------------------- the token stays secret


def test_token_never_lands_in_workflow_metadata_outputs_or_logs(our_server, monkeypatch, tmp_path, caplog):
    from flux2_accel.nodes.remote import Flux2AccelRemoteTextEncode, remote_encoder
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    monkeypatch.setenv("FLUX2_ACCEL_REMOTE_TOKEN", TOKEN)
    monkeypatch.setenv("FLUX2_ACCEL_REMOTE_HOSTS", "127.0.0.1")
    monkeypatch.setenv("FLUX2_ACCEL_EMBEDDING_CACHE_DIR", str(tmp_path / "cache"))
    caplog.set_level(logging.DEBUG)
    node = Flux2AccelRemoteTextEncode()
    inputs = {"prompt": "a red dog", "endpoint_url": our_server.url, "expects": "any (the sampler checks)",
              "use_cache": True, "timeout": 30}
    outputs = node.encode(**inputs)
    assert our_server.app[STATS_KEY]["refused"] == 0  # the token was sent and accepted
    (cond,) = outputs

    # What ComfyUI saves: the API prompt and the UI workflow (widget values), also written into PNG metadata.
    api_prompt = {"1": {"class_type": "Flux2AccelRemoteTextEncode", "inputs": inputs}}
    workflow = {"nodes": [{"id": 1, "type": "Flux2AccelRemoteTextEncode", "widgets_values": list(inputs.values())}]}
    metadata = PngInfo()
    metadata.add_text("prompt", json.dumps(api_prompt))
    metadata.add_text("workflow", json.dumps(workflow))
    Image.new("RGB", (8, 8)).save(tmp_path / "out.png", pnginfo=metadata)

    everything = [json.dumps(Flux2AccelRemoteTextEncode.INPUT_TYPES()), json.dumps(api_prompt), json.dumps(workflow),
                  repr(outputs), repr(cond), cond.encoder_identity, " ".join(cond.prompts), caplog.text]
    encoder = remote_encoder(our_server.url, "any (the sampler checks)", True, 30)
    assert encoder.config.token == TOKEN  # it is there, only never shown
    everything += [repr(encoder), repr(encoder.config)]
    assert "cache=on" in repr(encoder)
    for text in everything:
        assert TOKEN not in text
    assert TOKEN.encode() not in (tmp_path / "out.png").read_bytes()
    for path in (tmp_path / "cache").iterdir():
        assert TOKEN.encode() not in path.read_bytes() and TOKEN not in path.name
    assert "remote text encoder" in caplog.text  # the log was captured, and it is clean


def test_token_is_masked_in_errors_even_when_the_server_echoes_it(caplog):
    async def echo(request):
        return web.Response(status=401, text=f"bad credentials: {request.headers['Authorization']}")

    async def echo_500(request):
        return web.Response(status=500, text=f"crashed on token {TOKEN}")

    caplog.set_level(logging.DEBUG)
    with fake_server(echo) as server:
        with pytest.raises(RemoteAuthError) as err:
            client(server.url).encode("a cat")
    assert TOKEN not in str(err.value) and "bad credentials: Bearer ***" in str(err.value)
    with fake_server(echo_500) as server:
        with pytest.raises(RemoteEncoderError) as err:
            client(server.url).encode("a cat")
    assert TOKEN not in str(err.value) and "crashed on token ***" in str(err.value)
    assert TOKEN not in caplog.text


def test_token_sources(tmp_path, monkeypatch):
    settings = tmp_path / "default" / "comfy.settings.json"
    settings.parent.mkdir()
    settings.write_text(json.dumps({"flux2accel.remote_token": "from-settings",
                                    "flux2accel.remote_hosts": "127.0.0.1:8199"}))
    local = "http://127.0.0.1:8199/predict"
    assert resolve_token(local, settings, {"FLUX2_ACCEL_REMOTE_TOKEN": "from-env"}) == (
        "from-env", "FLUX2_ACCEL_REMOTE_TOKEN")
    assert resolve_token(local, settings, {"HF_TOKEN": "hf"}) == (
        "from-settings", "ComfyUI setting flux2accel.remote_token")
    # A Hugging Face token goes to the official endpoint's host and listed hosts only.
    assert resolve_token(local, None, {"HF_TOKEN": "hf"}) == (None, "")
    assert resolve_token("https://evil.hf.space/predict", None, {"HF_TOKEN": "hf"}) == (None, "")
    assert resolve_token(PUBLIC_URL, None, {"HF_TOKEN": "hf"}) == ("hf", "HF_TOKEN")
    assert resolve_token(local, None, {"HF_TOKEN": "hf"}, allowed_hosts=("127.0.0.1",)) == ("hf", "HF_TOKEN")

    from flux2_accel.nodes import comfy_services, remote

    monkeypatch.setattr(comfy_services, "user_directory", lambda: str(tmp_path))
    monkeypatch.delenv("FLUX2_ACCEL_REMOTE_TOKEN", raising=False)
    monkeypatch.setenv("FLUX2_ACCEL_EMBEDDING_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("FLUX2_ACCEL_REMOTE_HOSTS", raising=False)
    encoder = remote.remote_encoder(local, "any (the sampler checks)", True, 30)
    assert encoder.config.token == "from-settings" and encoder.config.allowed_hosts == ("127.0.0.1:8199",)


# ---------------------------------------------------------------- tokens go only to the hosts they are bound to

OFFICIAL_HOST = "remote-text-encoder-flux-2.huggingface.co"


@pytest.fixture()
def resolve_to_loopback(monkeypatch):
    """Makes foreign host names resolve to 127.0.0.1 (and a given port) for this test only; others resolve as usual.

    With `tls_on_loopback=True`, https:// goes over plain TCP to the loopback server, standing in for TLS.
    """
    real = socket.getaddrinfo

    def install(names: dict[str, int], tls_on_loopback: bool = False):
        def getaddrinfo(host, port, *args, **kwargs):
            if isinstance(host, str) and host.lower() in names:
                return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "",
                         ("127.0.0.1", names[host.lower()]))]
            return real(host, port, *args, **kwargs)

        monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
        if tls_on_loopback:
            monkeypatch.setitem(client_module.CONNECTION_CLASSES, "https", http.client.HTTPConnection)

    return install


@pytest.fixture()
def node_env(monkeypatch, tmp_path):
    """The node outside ComfyUI with no token, hosts or settings of the machine: each test sets its own."""
    from flux2_accel.nodes import comfy_services

    for name in ("FLUX2_ACCEL_REMOTE_TOKEN", "FLUX2_ACCEL_REMOTE_HOSTS", "HF_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_IMPLICIT_TOKEN", "1")
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)  # no token that `hf auth login` stored
    monkeypatch.setattr(comfy_services, "user_directory", lambda: str(tmp_path / "user"))
    monkeypatch.setenv("FLUX2_ACCEL_EMBEDDING_CACHE_DIR", str(tmp_path / "cache"))

    def settings(**values):
        path = tmp_path / "user" / "default" / "comfy.settings.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))

    return settings


def node_encode(url, prompt="a cat"):
    from flux2_accel.nodes.remote import remote_encoder

    encoder = remote_encoder(url, "any (the sampler checks)", False, 30)
    return encoder.encode(prompt)


def authorizations(server) -> list:
    return [seen["headers"].get("Authorization") for seen in server.app[SEEN]]


EMBEDS = torch.randn(1, 512, WIDTH)


def test_pack_token_goes_only_to_a_listed_host(node_env, resolve_to_loopback, monkeypatch):
    monkeypatch.setenv("FLUX2_ACCEL_REMOTE_TOKEN", TOKEN)
    with fake_server(tensor_reply(EMBEDS)) as server:
        resolve_to_loopback({"encoder.example.com": server.port})
        url = f"http://encoder.example.com:{server.port}/predict"
        with pytest.raises(TokenNotAllowedError, match=r"endpoint_url 'http://encoder.example.com:\d+/predict'.*"
                                                       r"only sent to remote-text-encoder-flux-2.huggingface.co.*"
                                                       r"FLUX2_ACCEL_REMOTE_HOSTS.*'flux2accel.remote_hosts'"):
            node_encode(url)
        assert authorizations(server) == []  # refused before anything was sent
        monkeypatch.setenv("FLUX2_ACCEL_REMOTE_HOSTS", "other.example.com, encoder.example.com:1")  # wrong port
        with pytest.raises(TokenNotAllowedError, match="FLUX2_ACCEL_REMOTE_HOSTS"):
            node_encode(url)
        monkeypatch.setenv("FLUX2_ACCEL_REMOTE_HOSTS", f"other.example.com, Encoder.Example.com:{server.port}")
        assert torch.equal(node_encode(url).prompt_embeds, EMBEDS)
        assert authorizations(server) == [f"Bearer {TOKEN}"]


def test_hosts_and_token_from_the_comfyui_settings(node_env, resolve_to_loopback):
    with fake_server(tensor_reply(EMBEDS)) as server:
        resolve_to_loopback({"encoder.example.com": server.port})
        url = f"http://encoder.example.com:{server.port}/predict"
        node_env(**{"flux2accel.remote_token": TOKEN})
        with pytest.raises(TokenNotAllowedError, match=r"from ComfyUI setting flux2accel.remote_token.*"
                                                       r"'flux2accel.remote_hosts'"):
            node_encode(url)
        node_env(**{"flux2accel.remote_token": TOKEN, "flux2accel.remote_hosts": ["encoder.example.com"]})
        node_encode(url)
        assert authorizations(server) == [f"Bearer {TOKEN}"]


def test_hf_token_goes_only_to_the_official_host_or_a_listed_one(node_env, resolve_to_loopback, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_S3CRET")
    with fake_server(tensor_reply(EMBEDS)) as server:
        resolve_to_loopback({"evil.hf.space": server.port, OFFICIAL_HOST: server.port}, tls_on_loopback=True)
        # Anyone can host a *.hf.space: it gets the request (the user chose the endpoint), not the token.
        node_encode("https://evil.hf.space/predict")
        node_encode(PUBLIC_URL)  # the official endpoint does get it
        monkeypatch.setenv("FLUX2_ACCEL_REMOTE_HOSTS", "evil.hf.space")
        node_encode("https://evil.hf.space/predict", prompt="listed now")
        assert authorizations(server) == [None, "Bearer hf_S3CRET", "Bearer hf_S3CRET"]


def test_no_token_over_plain_http_unless_the_host_is_listed(node_env, resolve_to_loopback, monkeypatch):
    monkeypatch.setenv("FLUX2_ACCEL_REMOTE_TOKEN", TOKEN)
    with fake_server(tensor_reply(EMBEDS)) as server:
        resolve_to_loopback({OFFICIAL_HOST: server.port})
        url = f"http://{OFFICIAL_HOST}:{server.port}/predict"  # the bound host, but unencrypted
        with pytest.raises(TokenNotAllowedError, match=r"is plain http.*Use https://, or list the host in the "
                                                       r"FLUX2_ACCEL_REMOTE_HOSTS .*'flux2accel.remote_hosts'"):
            node_encode(url)
        assert authorizations(server) == []
        monkeypatch.setenv("FLUX2_ACCEL_REMOTE_HOSTS", OFFICIAL_HOST)
        node_encode(url)
        assert authorizations(server) == [f"Bearer {TOKEN}"]


def test_without_any_token_a_request_goes_anywhere_and_a_401_says_what_to_set(node_env, resolve_to_loopback):
    with fake_server(tensor_reply(EMBEDS), status_reply(401)) as server:
        resolve_to_loopback({"encoder.example.com": server.port})
        url = f"http://encoder.example.com:{server.port}/predict"
        assert torch.equal(node_encode(url).prompt_embeds, EMBEDS)  # e.g. a --no-auth server
        with pytest.raises(RemoteAuthError, match=r"none is set for it.*FLUX2_ACCEL_REMOTE_TOKEN.*"
                                                  r"FLUX2_ACCEL_REMOTE_HOSTS.*flux2accel.remote_hosts"):
            node_encode(url, prompt="another")
        assert authorizations(server) == [None, None]


# ---------------------------------------------------------------- bad input: a pack error naming the field or setting


@pytest.mark.parametrize("url, env, settings, error, message", [
    ("http://127.0.0.1:99999/predict", {}, {}, InputError, r"endpoint_url 'http://127.0.0.1:99999/predict' is not a "
                                                           r"valid URL \(Port out of range"),
    ("http://[::1", {}, {}, InputError, r"endpoint_url 'http://\[::1' is not a valid URL \(Invalid IPv6 URL\)"),
    ("http://127.0.0.1:abc/predict", {}, {}, InputError, r"endpoint_url .* not a valid URL \(Port could not be cast"),
    ("http://u:pw@127.0.0.1:99999/p?key=v", {}, {}, InputError, r"endpoint_url 'http://127.0.0.1:99999/p' is not"),
    ("ftp://127.0.0.1/predict", {}, {}, InputError, r"endpoint_url must be an http:// or https:// URL"),
    ("", {}, {}, InputError, r"endpoint_url must be an http:// or https:// URL"),
    ("http://exa mple.com/predict", {}, {}, InputError, r"endpoint_url .* contains spaces or control characters"),
    ("http://user:pw@127.0.0.1:1/predict", {}, {}, InputError, r"endpoint_url must not contain credentials"),
    (PUBLIC_URL, {"FLUX2_ACCEL_REMOTE_HOSTS": "host:abc"}, {}, InputError,
     r"FLUX2_ACCEL_REMOTE_HOSTS environment variable: 'host:abc' is not a host or host:port"),
    (PUBLIC_URL, {"FLUX2_ACCEL_REMOTE_HOSTS": "https://host/predict"}, {}, InputError,
     r"FLUX2_ACCEL_REMOTE_HOSTS environment variable: 'https://host/predict' is not a host.*not a URL"),
    (PUBLIC_URL, {}, {"flux2accel.remote_hosts": "ok.example.com, bad:99999"}, InputError,
     r"ComfyUI setting 'flux2accel.remote_hosts': 'bad:99999' is not a host or host:port"),
    (PUBLIC_URL, {}, {"flux2accel.remote_hosts": 8199}, InputError,
     r"ComfyUI setting 'flux2accel.remote_hosts' must be a comma-separated list of hosts"),
    ("https://encoder.example.com/predict", {"FLUX2_ACCEL_REMOTE_TOKEN": TOKEN}, {}, TokenNotAllowedError,
     r"from FLUX2_ACCEL_REMOTE_TOKEN\) is only sent to .*FLUX2_ACCEL_REMOTE_HOSTS.*'flux2accel.remote_hosts'"),
    ("http://127.0.0.1:8199/predict", {}, {"flux2accel.remote_token": TOKEN}, TokenNotAllowedError,
     r"endpoint_url 'http://127.0.0.1:8199/predict'.*FLUX2_ACCEL_REMOTE_HOSTS.*'flux2accel.remote_hosts'"),
    (f"http://{OFFICIAL_HOST}/predict", {"FLUX2_ACCEL_REMOTE_TOKEN": TOKEN}, {}, TokenNotAllowedError,
     r"is plain http.*FLUX2_ACCEL_REMOTE_HOSTS.*'flux2accel.remote_hosts'"),
])
def test_bad_input_names_the_field_or_setting(node_env, monkeypatch, url, env, settings, error, message):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    node_env(**settings)
    with pytest.raises(error, match=message) as err:
        node_encode(url)
    assert TOKEN not in str(err.value) and "pw" not in str(err.value)
    assert isinstance(err.value, InputError)  # a pack error about what the user set, not a raw ValueError
    safe_url(url)  # the error path's own helper never fails


def test_bad_endpoint_url_is_refused_by_the_library_too():
    for url in ("http://127.0.0.1:99999/predict", "http://[::1", "http://127.0.0.1:abc/predict"):
        with pytest.raises(InputError, match="endpoint_url .* is not a valid URL"):
            client(url)


# ---------------------------------------------------------------- replies, deadlines, cache, server limits


def _one_inf() -> torch.Tensor:
    reply = torch.zeros(1, 512, WIDTH)
    reply[0, 3, 5] = float("inf")
    return reply


@pytest.mark.parametrize("reply, counts", [
    (torch.full((1, 512, WIDTH), float("nan")), f"{512 * WIDTH} NaN, 0 Inf"),
    (_one_inf(), "0 NaN, 1 Inf"),
])
def test_non_finite_reply_is_refused(reply, counts, tmp_path):
    cache = EmbeddingCache(tmp_path / "cache")
    with fake_server(tensor_reply(reply.to(torch.bfloat16))) as server:
        url = server.url + "?sig=QUERYSECRET"
        with pytest.raises(RemoteEncoderError) as err:
            client(url, cache=cache).encode("a cat")
    message = str(err.value)
    assert message.startswith(f"{server.url} returned embeddings with non-finite values ({counts} of ")
    assert "QUERYSECRET" not in message and len(cache) == 0


def test_a_slow_drip_reply_fails_at_the_overall_deadline():
    async def drip(request):
        response = web.StreamResponse(headers={"Content-Length": "1000", "Content-Type": "application/octet-stream"})
        await response.prepare(request)
        for _ in range(1000):  # one byte every 0.2 s: each read is quick, the whole reply takes 200 s
            await response.write(b"x")
            await asyncio.sleep(0.2)
        return response

    with fake_server(drip) as server:
        started = time.monotonic()
        with pytest.raises(RemoteEncoderError, match=r"did not send its whole reply within 1 s \(read timeout\)"):
            client(server.url, read_timeout=1).encode("a cat")
        assert time.monotonic() - started < 4  # a behaviour bound (per-read timeouts alone would take 200 s)
        assert len(server.app[SEEN]) == 1  # not retried


def _fill_disk(self, path, data):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("how", ["parent is a file", "disk full"])
def test_unwritable_cache_warns_once_and_encoding_goes_on(node_env, monkeypatch, tmp_path, caplog, how):
    monkeypatch.setenv("FLUX2_ACCEL_REMOTE_HOSTS", "127.0.0.1")
    if how == "parent is a file":
        (tmp_path / "a_file").write_text("")
        monkeypatch.setenv("FLUX2_ACCEL_EMBEDDING_CACHE_DIR", str(tmp_path / "a_file" / "embeddings"))
    else:
        monkeypatch.setattr(EmbeddingCache, "_write", _fill_disk)
    from flux2_accel.nodes.remote import Flux2AccelRemoteTextEncode

    caplog.set_level(logging.WARNING, logger="flux2_accel")
    node = Flux2AccelRemoteTextEncode()
    with fake_server(tensor_reply(EMBEDS)) as server:
        for _ in range(2):
            (cond,) = node.encode("a cat", server.url, "any (the sampler checks)", True, 30)
            assert torch.equal(cond.prompt_embeds, EMBEDS)
        assert len(server.app[SEEN]) == 2  # nothing was cached, both calls asked the server
    warnings = [r for r in caplog.records if "embedding cache folder" in r.getMessage()]
    assert len(warnings) == 1 and "cannot be written" in warnings[0].getMessage()
    assert ("No space left" in warnings[0].getMessage()) == (how == "disk full")


def test_server_drops_a_request_whose_body_never_comes(text_encoder):
    app = create_app(text_encoder, token=TOKEN, body_timeout_s=0.5)
    with LoopbackServer(app) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer " + TOKEN.encode()
                         + b"\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"prompt\": ")
            received = b""
            while chunk := sock.recv(65536):  # ends when the server closes the connection (timeout 10 s otherwise)
                received += chunk
        assert received.startswith(b"HTTP/1.1 408 ")
        assert b"did not arrive within 0.5 s" in received
        assert app[STATS_KEY]["timed_out"] == 1 and app[STATS_KEY]["batches"] == 0


def test_server_refuses_deeply_nested_json_without_a_traceback(our_server, caplog):
    caplog.set_level(logging.DEBUG)
    nested_prompt = b'{"prompt": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"
    for body, depth in ((b"[" * 100_000, 100_000), (nested_prompt, 50_001)):
        request = urllib.request.Request(our_server.url, data=body, headers={"Authorization": f"Bearer {TOKEN}"})
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(request, timeout=30)
        assert err.value.code == 400
        assert json.loads(err.value.read())["error"].startswith(
            f"bad request: the JSON body nests {depth} levels deep; at most 8 are accepted")
    assert "Traceback" not in caplog.text and "RecursionError" not in caplog.text
    assert our_server.app[STATS_KEY]["batches"] == 0


def test_node_is_registered_with_tooltips():
    from flux2_accel import nodes

    node = nodes.NODE_CLASS_MAPPINGS["Flux2AccelRemoteTextEncode"]
    assert nodes.NODE_DISPLAY_NAME_MAPPINGS["Flux2AccelRemoteTextEncode"] == "Remote Text Encode (FLUX.2)"
    widgets = node.INPUT_TYPES()["required"]
    assert set(widgets) == {"prompt", "endpoint_url", "expects", "use_cache", "timeout"}
    assert all(spec[1].get("tooltip") for spec in widgets.values())
    assert widgets["endpoint_url"][1]["default"] == PUBLIC_URL and node.RETURN_TYPES == ("FLUX2_CONDITIONING",)


# ---------------------------------------------------------------- inside a real ComfyUI (opt-in, like test_comfyui_real)


@pytest.fixture(scope="module")
def token_in_environment():
    """The token as a user sets it: in the environment ComfyUI starts with (requested before `comfyui`)."""
    names = ("FLUX2_ACCEL_REMOTE_TOKEN", "FLUX2_ACCEL_REMOTE_HOSTS")
    previous = {name: os.environ.get(name) for name in names}
    os.environ.update({"FLUX2_ACCEL_REMOTE_TOKEN": TOKEN, "FLUX2_ACCEL_REMOTE_HOSTS": "127.0.0.1"})
    yield
    for name, value in previous.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


if os.environ.get("COMFYUI_DIR"):
    from test_comfyui_real import comfyui  # noqa: F401  (the fixture: a real ComfyUI with the tiny models)


@pytest.mark.skipif(not os.environ.get("COMFYUI_DIR"), reason="set COMFYUI_DIR to run the pack in a real ComfyUI")
def test_remote_node_in_real_comfyui_keeps_the_token_out_of_outputs(token_in_environment, comfyui, text_encoder):
    from test_comfyui_real import _run, _tiny_graph

    url, base, log_path = comfyui
    graph = _tiny_graph()
    del graph["2"]
    app = create_app(text_encoder, token=TOKEN)
    with LoopbackServer(app) as server:
        graph["4"] = {"class_type": "Flux2AccelRemoteTextEncode", "inputs": {
            "prompt": "a red dog", "endpoint_url": server.url, "expects": "any (the sampler checks)",
            "use_cache": True, "timeout": 60}}
        workflow = {"nodes": [{"id": 4, "type": "Flux2AccelRemoteTextEncode",
                               "widgets_values": list(graph["4"]["inputs"].values())}]}
        entry = _run(url, log_path, graph, extra_data={"extra_pnginfo": {"workflow": workflow}})
    assert app[STATS_KEY]["requests"] == 1 and app[STATS_KEY]["refused"] == 0  # ComfyUI sent the token
    image = entry["outputs"]["6"]["images"][0]
    png = (base / "output" / image.get("subfolder", "") / image["filename"]).read_bytes()
    assert b"Flux2AccelRemoteTextEncode" in png  # the workflow and prompt were written into the PNG...
    assert TOKEN.encode() not in png  # ...without the token
    assert TOKEN not in json.dumps(entry) and TOKEN not in log_path.read_text()
    cached = list((base / "user" / "flux2-accel" / "embeddings").glob("*.safetensors"))
    assert len(cached) == 1 and TOKEN.encode() not in cached[0].read_bytes()


def test_a_serve_text_encoder_on_the_remote_endpoint_sends_one_request_per_batch(text_encoder, our_server,
                                                                                monkeypatch):
    # `flux2-accel serve` with [text_encoders.X] endpoint_url: the shared TextEncoder deployment asks our server.
    monkeypatch.setenv("FLUX2_ACCEL_REMOTE_TOKEN", TOKEN)
    monkeypatch.setenv("FLUX2_ACCEL_REMOTE_HOSTS", "127.0.0.1")
    served = ServedTextEncoder(TextEncoderConfig("remote", endpoint_url=our_server.url))
    rows = served.encode_batch(["a red dog", "a cat", "a red dog"])
    assert our_server.app[STATS_KEY]["requests"] == 1
    assert torch.equal(torch.stack(rows[:2]), text_encoder.encode(["a red dog", "a cat"]).prompt_embeds)
    assert torch.equal(rows[0], rows[2])
    served.encode_batch(["a cat"])  # cached: no second request
    assert our_server.app[STATS_KEY]["requests"] == 1 and served.family == "mistral"
