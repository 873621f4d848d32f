"""The OpenAI API's executor (optim/serve/openai_executor.py) against a stand-in for ComfyUI's HTTP API on loopback:
a prompt without a client id (its progress goes to every client), its end read from /history, only its own
previews, errors naming the node, cancel taking it off the queue. The real one: test_comfyui_openai.py."""

from __future__ import annotations

import asyncio
import io
import socket
import uuid

import pytest
from flux2_accel.optim.serve.openai_api import OpenAIError
from flux2_accel.optim.serve.openai_executor import ComfyUIExecutor, OutputImage
from PIL import Image

aiohttp = pytest.importorskip("aiohttp")
from aiohttp import web  # noqa: E402


def _png(color) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buffer, "PNG")
    return buffer.getvalue()


def _preview_frame(data: bytes) -> bytes:  # ComfyUI 0.8's form: event type 1, image type 2 (PNG), the image
    return (1).to_bytes(4, "big") + (2).to_bytes(4, "big") + data


class BroadcastingComfyUI:
    """ComfyUI's API as the executor uses it. A prompt with no client id broadcasts its progress and previews and
    sends no end message (as ComfyUI does); its end is its /history entry. `hold` keeps prompts pending."""

    def __init__(self):
        self.sockets, self.history, self.requests = [], {}, []
        self.hold = False
        self.fail = False
        self.answer_prompt = asyncio.Event()  # cleared: POST /prompt queues, then keeps its answer back
        self.answer_prompt.set()
        app = web.Application()
        app.add_routes([web.get("/system_stats", self.ok), web.get("/ws", self.ws), web.post("/prompt", self.prompt),
                        web.get("/history/{prompt_id}", self.get_history), web.get("/queue", self.queue),
                        web.post("/queue", self.record), web.post("/interrupt", self.record),
                        web.get("/view", self.view)])
        self.app = app

    async def ok(self, request):
        return web.json_response({"system": {}})

    async def ws(self, request):
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self.sockets.append(ws)
        async for _ in ws:
            pass
        return ws

    async def broadcast(self, kind, data=None, frame=None):
        for ws in list(self.sockets):
            await (ws.send_bytes(frame) if frame is not None else ws.send_json({"type": kind, "data": data}))

    async def prompt(self, request):
        body = await request.json()
        assert "client_id" not in body  # broadcast: every client (the UI's) sees its progress
        self.requests.append(("prompt", body))
        prompt_id = str(uuid.uuid4())
        asyncio.get_running_loop().create_task(self.execute(prompt_id))
        await self.answer_prompt.wait()
        return web.json_response({"prompt_id": prompt_id, "number": 1, "node_errors": {}})

    async def execute(self, prompt_id):
        await self.broadcast(None, frame=_preview_frame(_png((9, 9, 9))))  # another prompt's, before ours runs
        while self.hold:
            await asyncio.sleep(0.01)
        await self.broadcast("executing", {"node": "5", "prompt_id": prompt_id})
        for step in (1, 2):
            await self.broadcast("progress", {"value": step, "max": 2, "node": "5", "prompt_id": prompt_id})
            await self.broadcast(None, frame=_preview_frame(_png((step, 0, 0))))
        if self.fail:
            error = {"node_id": "5", "node_type": "Flux2AccelSampler", "exception_type": "RuntimeError",
                     "exception_message": "latents are NaN", "prompt_id": prompt_id}
            self.history[prompt_id] = {"outputs": {}, "status": {"status_str": "error", "completed": False,
                                                                 "messages": [["execution_error", error]]}}
        else:
            self.history[prompt_id] = {"outputs": {"6": {"images": [{"filename": "out.png", "subfolder": "",
                                                                      "type": "output"}]}},
                                       "status": {"status_str": "success", "completed": True, "messages": []}}

    async def get_history(self, request):
        prompt_id = request.match_info["prompt_id"]
        return web.json_response({prompt_id: self.history[prompt_id]} if prompt_id in self.history else {})

    async def queue(self, request):
        return web.json_response({"queue_running": [[0, "a"]], "queue_pending": [[1, "b"], [2, "c"]]})

    async def record(self, request):
        self.requests.append((request.path, await request.json()))
        return web.Response()

    async def view(self, request):
        return web.Response(body=_png((1, 2, 3)), content_type="image/png")


@pytest.fixture
def comfy():
    fake = BroadcastingComfyUI()
    loop = asyncio.new_event_loop()

    async def start():
        runner = web.AppRunner(fake.app, shutdown_timeout=5)
        await runner.setup()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        await web.TCPSite(runner, "127.0.0.1", port).start()
        return runner, port

    runner, port = loop.run_until_complete(start())
    yield fake, loop, ComfyUIExecutor(f"http://127.0.0.1:{port}")
    loop.run_until_complete(runner.cleanup())
    loop.close()


def test_a_run_returns_its_image_and_only_its_own_previews(comfy):
    fake, loop, executor = comfy
    previews = []
    images = loop.run_until_complete(executor.run({"5": {}}, ("6",), on_preview=previews.append))
    assert images == [OutputImage("out.png")]
    assert [Image.open(io.BytesIO(p)).getpixel((0, 0)) for p in previews] == [(1, 0, 0), (2, 0, 0)]
    (_, body), = fake.requests
    assert body["extra_data"] == {"preview_method": "latent2rgb"}  # asked for previews, per prompt
    assert loop.run_until_complete(executor.queue_depth()) == 3


def test_an_execution_error_names_the_node(comfy):
    fake, loop, executor = comfy
    fake.fail = True
    with pytest.raises(OpenAIError) as e:
        loop.run_until_complete(executor.run({"5": {}}, ("6",)))
    assert e.value.status == 500 and "node 5 (Flux2AccelSampler)" in e.value.message and "NaN" in e.value.message


async def _run_then_cancel(fake, executor):
    """Start a run, cancel it once its POST /prompt has reached the stand-in, and wait for the cancel to finish."""
    task = asyncio.ensure_future(executor.run({"5": {}}, ("6",)))
    async with asyncio.timeout(30):
        while not fake.requests:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


def _assert_cancelled_only_its_prompt(fake):
    cancels = fake.requests[1:]
    assert [path for path, _ in cancels] == ["/queue", "/interrupt"]
    (prompt_id,) = cancels[0][1]["delete"]
    assert cancels[1][1] == {"prompt_id": prompt_id}  # a targeted interrupt: another running prompt is left alone
    assert fake.history == {}  # it never ran


def test_cancelling_a_run_takes_its_prompt_off_the_queue_and_interrupts_only_it(comfy):
    fake, loop, executor = comfy
    fake.hold = True
    loop.run_until_complete(_run_then_cancel(fake, executor))
    _assert_cancelled_only_its_prompt(fake)
    fake.hold = False  # let the stand-in's own task end before its loop closes
    loop.run_until_complete(asyncio.sleep(0.2))


def test_a_run_cancelled_while_its_prompt_is_being_queued_takes_it_off_the_queue(comfy):
    fake, loop, executor = comfy
    fake.hold = True
    fake.answer_prompt.clear()  # ComfyUI has queued the prompt; its answer (the prompt id) is still on its way

    async def cancel_then_answer():
        cancelling = asyncio.ensure_future(_run_then_cancel(fake, executor))
        async with asyncio.timeout(30):
            while not fake.requests:
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.1)  # the run is cancelled while it waits for the answer
            fake.answer_prompt.set()
            await cancelling

    loop.run_until_complete(cancel_then_answer())
    _assert_cancelled_only_its_prompt(fake)
    fake.hold = False
    loop.run_until_complete(asyncio.sleep(0.2))


def test_an_unreachable_comfyui_is_not_ready():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    with pytest.raises(OpenAIError) as e:
        asyncio.run(ComfyUIExecutor(f"http://127.0.0.1:{port}", deadline=5).check_ready())
    assert e.value.status == 503 and e.value.code == "not_ready"
