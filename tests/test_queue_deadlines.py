"""`flux2-accel queue --timeout`: every HTTP exchange has one deadline, against loopback servers that stall at each
step (connect, headers, body, websocket, /view); the error names the server and the step."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import pytest
from flux2_accel.optim.cli import main as cli
from flux2_accel.optim.serve.queue_client import Client, QueueError

aiohttp = pytest.importorskip("aiohttp")
from aiohttp import web  # noqa: E402

DEADLINE = 0.6
MARGIN = 2.0  # start-up of the CLI's event loop and session, closing sockets; far below a stalled server's hold
FOREVER = 3600
GRAPH = {"9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "x"}}}


class StallingComfyUI:
    """Answers like ComfyUI except at `stall`, where it never answers or drips its reply one byte at a time."""

    def __init__(self, stall: str):
        self.stall = stall
        self.sockets = {}
        app = web.Application()
        app.add_routes([web.get("/system_stats", self.system_stats), web.post("/prompt", self.prompt),
                        web.get("/ws", self.ws), web.get("/history/{prompt_id}", self.history),
                        web.get("/view", self.view)])
        self.app = app

    async def _reply(self, request, step: str, body: bytes):
        if self.stall == step + " headers":
            await asyncio.sleep(FOREVER)
        if self.stall != step + " body":
            return web.Response(body=body, content_type="application/json")
        reply = web.StreamResponse(headers={"Content-Length": str(len(body) + 1000)})
        await reply.prepare(request)
        for byte in (body * 100)[:len(body) + 1000]:
            await reply.write(bytes([byte]))
            await asyncio.sleep(0.1)
        return reply

    async def system_stats(self, request):
        return await self._reply(request, "system_stats", json.dumps({"system": {"os": "stub"}}).encode())

    async def ws(self, request):
        if self.stall == "ws handshake":
            await asyncio.sleep(FOREVER)
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self.sockets[request.query["clientId"]] = ws
        async for _ in ws:
            pass
        return ws

    async def prompt(self, request):
        body = await request.json()
        if self.stall != "ws run":  # the prompt "finishes" at once
            ws = self.sockets[body["client_id"]]
            asyncio.get_running_loop().call_later(0.05, lambda: asyncio.ensure_future(ws.send_json(
                {"type": "executing", "data": {"node": None, "prompt_id": "p1"}})))
        return await self._reply(request, "prompt", json.dumps({"prompt_id": "p1", "node_errors": {}}).encode())

    async def history(self, request):
        entry = {"p1": {"outputs": {"9": {"images": [{"filename": "a.png", "subfolder": "", "type": "output"}]}},
                        "status": {"status_str": "success", "messages": []}}}
        return await self._reply(request, "history", json.dumps(entry).encode())

    async def view(self, request):
        if self.stall == "view headers":
            await asyncio.sleep(FOREVER)
        reply = web.StreamResponse(headers={"Content-Length": "100000", "Content-Type": "image/png"})
        await reply.prepare(request)
        for _ in range(100000):
            await reply.write(b"\x89")
            await asyncio.sleep(0.1)
        return reply


def _serve(loop, coro):
    return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout=10)


@pytest.fixture
def server_loop():
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop

    async def cancel_stalled_handlers():
        for task in asyncio.all_tasks():
            if task is not asyncio.current_task():
                task.cancel()

    _serve(loop, cancel_stalled_handlers())
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=10)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_stub(loop, stall: str) -> str:
    runner = web.AppRunner(StallingComfyUI(stall).app, handler_cancellation=True, shutdown_timeout=0.1)
    port = _free_port()

    async def start():
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()

    _serve(loop, start())
    return f"http://127.0.0.1:{port}"


def _start_silent_tls_peer(loop) -> str:
    """A TCP server that accepts and then says nothing: an https client stalls in its TLS handshake (connect)."""
    async def silent(reader, writer):
        await asyncio.sleep(FOREVER)

    server = _serve(loop, asyncio.start_server(silent, "127.0.0.1", 0))
    return f"https://127.0.0.1:{server.sockets[0].getsockname()[1]}"


def _queue_with_deadline(url: str, tmp_path):
    workflow = tmp_path / "graph_api.json"
    workflow.write_text(json.dumps(GRAPH))
    start = time.perf_counter()
    code = cli.main(["queue", str(workflow), "--server", url, "--timeout", str(DEADLINE), "-o",
                     str(tmp_path / "out")])
    return code, time.perf_counter() - start


@pytest.mark.parametrize("stall, step", [
    ("connect", "GET /system_stats"),
    ("system_stats headers", "GET /system_stats"),
    ("system_stats body", "GET /system_stats"),
    ("ws handshake", "websocket /ws"),
    ("prompt headers", "POST /prompt"),
    ("prompt body", "POST /prompt"),
    ("history body", "GET /history/p1"),
    ("view headers", "GET /view for 'a.png'"),
    ("view body", "GET /view for 'a.png'"),
])
def test_each_exchange_ends_at_its_deadline_naming_server_and_step(server_loop, tmp_path, capsys, stall, step):
    url = _start_silent_tls_peer(server_loop) if stall == "connect" else _start_stub(server_loop, stall)
    code, seconds = _queue_with_deadline(url, tmp_path)
    err = capsys.readouterr().err
    assert code == 2, err
    assert seconds < DEADLINE + MARGIN, (stall, seconds)
    assert url.split("://")[1] in err and step in err and f"{DEADLINE:g} s" in err and "--timeout" in err, err


def test_a_prompt_that_never_ends_is_bounded_by_timeout(server_loop, tmp_path, capsys):
    """The websocket is open but ComfyUI never reports the prompt's end: --timeout bounds the wait."""
    code, seconds = _queue_with_deadline(_start_stub(server_loop, "ws run"), tmp_path)
    err = capsys.readouterr().err
    assert code == 2 and seconds < DEADLINE + MARGIN, (err, seconds)
    assert "prompt p1 did not finish within --timeout" in err


@pytest.mark.parametrize("value", ["-1", "nan", "inf"])
def test_bad_timeout_is_refused_before_connecting(tmp_path, capsys, value):
    workflow = tmp_path / "graph_api.json"
    workflow.write_text(json.dumps(GRAPH))
    assert cli.main(["queue", str(workflow), "--server", "http://127.0.0.1:9", "--timeout", value]) == 2
    assert f"--timeout {float(value)}" in capsys.readouterr().err


def test_a_cancel_that_lands_as_the_exchange_finishes_is_not_swallowed():
    """Python 3.11's wait_for returned the exchange's result here and dropped the cancel (CPython gh-86296): a
    cancelled OpenAI API run then polled /history for ever (the hang of CI stop 35)."""
    async def cancel_as_it_finishes():
        answer = asyncio.get_running_loop().create_future()

        async def exchange():
            return await answer

        client = Client(None, "http://127.0.0.1:1", "id", deadline=30)
        task = asyncio.ensure_future(client.within_deadline("GET /history", exchange()))
        await asyncio.sleep(0)  # the task now waits on the exchange
        answer.set_result("the reply")  # the reply arrives ...
        task.cancel()  # ... in the same turn of the loop as the cancel
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancel_as_it_finishes())


def test_an_exchange_past_its_deadline_names_server_and_step_while_the_caller_is_not_cancelled():
    async def stalled():
        await asyncio.sleep(FOREVER)

    with pytest.raises(QueueError, match=r"127\.0\.0\.1:1 did not answer GET /queue within 0\.05 s"):
        asyncio.run(Client(None, "http://127.0.0.1:1", "id", deadline=0.05).within_deadline("GET /queue", stalled()))
