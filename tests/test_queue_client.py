"""`flux2-accel queue` against a stand-in for ComfyUI's HTTP API on loopback (the real one: test_comfyui_queue.py)."""

from __future__ import annotations

import asyncio
import io
import json
import socket
import threading
import uuid
from pathlib import Path

import pytest
from flux2_accel.optim.cli import main as cli
from PIL import Image

aiohttp = pytest.importorskip("aiohttp")
from aiohttp import web  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

GRAPH = {
    "3": {"class_type": "KSampler", "inputs": {"seed": 1, "steps": 3, "cfg": 4.0, "model": ["4", 0]}},
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "x.safetensors"}},
    "9": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "ComfyUI"}},
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 6), (seed % 256, 7, 9)).save(buf, "PNG")
    return buf.getvalue()


class FakeComfyUI:
    """ComfyUI's API as the queue client uses it. The graph decides the outcome: a node whose class_type is
    'Invalid' fails validation (HTTP 400), one whose class_type is 'Boom' fails at execution."""

    def __init__(self):
        self.prompts: list[dict] = []  # every graph POSTed, in order
        self.history: dict = {}
        self.sockets: dict = {}
        self.images: dict = {}  # filename -> bytes served by /view
        app = web.Application()
        app.add_routes([web.get("/system_stats", self.system_stats), web.post("/prompt", self.prompt),
                        web.get("/ws", self.ws), web.get("/history/{prompt_id}", self.get_history),
                        web.get("/view", self.view)])
        self.app = app

    async def system_stats(self, request):
        return web.json_response({"system": {"os": "fake", "comfyui_version": "0.8.0"}, "devices": []})

    async def ws(self, request):
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        client_id = request.query["clientId"]
        self.sockets[client_id] = ws
        await ws.send_json({"type": "status", "data": {"status": {"exec_info": {"queue_remaining": 0}}, "sid": client_id}})
        async for _ in ws:
            pass
        return ws

    async def prompt(self, request):
        body = await request.json()
        graph = body["prompt"]
        invalid = {nid: n for nid, n in graph.items() if n["class_type"] == "Invalid"}
        if invalid:
            return web.json_response({
                "error": {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation",
                          "details": "", "extra_info": {}},
                "node_errors": {nid: {"errors": [{"type": "value_not_in_list", "message": "Value not in list",
                                                  "details": "ckpt_name: 'nope.safetensors' not in []"}],
                                      "dependent_outputs": ["9"], "class_type": n["class_type"]}
                                for nid, n in invalid.items()}}, status=400)
        self.prompts.append(graph)
        prompt_id = str(uuid.uuid4())
        asyncio.get_running_loop().create_task(self.execute(prompt_id, graph, body["client_id"]))
        return web.json_response({"prompt_id": prompt_id, "number": len(self.prompts), "node_errors": {}})

    async def execute(self, prompt_id, graph, client_id):
        ws = self.sockets[client_id]
        send = lambda kind, data: ws.send_json({"type": kind, "data": {**data, "prompt_id": prompt_id}})  # noqa: E731
        messages = [("execution_start", {})]
        await send("execution_start", {})
        outputs, failed = {}, None
        for node_id in sorted(graph, key=int):
            node = graph[node_id]
            await send("executing", {"node": node_id, "display_node": node_id})
            if node["class_type"] == "Boom":
                failed = {"node_id": node_id, "node_type": "Boom", "executed": [], "exception_type": "ValueError",
                          "exception_message": "tensor shapes do not match", "traceback": ["..."],
                          "current_inputs": {}, "current_outputs": []}
                break
            steps = node["inputs"].get("steps")
            for value in range(1, (steps or 0) + 1):
                await send("progress", {"value": value, "max": steps, "node": node_id})
                await ws.send_bytes(b"\x00\x00\x00\x01preview")  # a latent preview frame
            if node["class_type"] == "SaveImage":
                name = f"ComfyUI_{len(self.images):05d}_.png"
                self.images[name] = _png(graph["3"]["inputs"]["seed"])
                ui = {"images": [{"filename": name, "subfolder": "", "type": "output"}]}
                outputs[node_id] = ui
                await send("executed", {"node": node_id, "display_node": node_id, "output": ui})
        if failed:
            await send("execution_error", failed)
            messages.append(("execution_error", {**failed, "prompt_id": prompt_id}))
        else:
            await send("execution_success", {})
            messages.append(("execution_success", {"prompt_id": prompt_id}))
        self.history[prompt_id] = {"prompt": [0, prompt_id, graph, {}, []], "outputs": outputs, "status": {
            "status_str": "error" if failed else "success", "completed": not failed, "messages": messages}}
        await send("executing", {"node": None})

    async def get_history(self, request):
        prompt_id = request.match_info["prompt_id"]
        return web.json_response({prompt_id: self.history[prompt_id]} if prompt_id in self.history else {})

    async def view(self, request):
        name = request.query["filename"]
        assert request.query["type"] == "output" and request.query["subfolder"] == ""
        if name not in self.images:
            return web.Response(status=404)
        return web.Response(body=self.images[name], content_type="image/png")


@pytest.fixture
def fake_comfyui():
    """The stand-in, served on a free loopback port by its own event loop on a thread (the CLI runs its own)."""
    fake = FakeComfyUI()
    loop = asyncio.new_event_loop()
    port = _free_port()
    runner = web.AppRunner(fake.app)
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port).start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield fake, f"http://127.0.0.1:{port}"
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=10)
    loop.close()


@pytest.fixture
def workflow(tmp_path):
    path = tmp_path / "graph_api.json"
    path.write_text(json.dumps(GRAPH))
    return path


def _queue(*args):
    return cli.main(["queue", *map(str, args)])


# ---------------------------------------------------------------- errors before anything is queued


@pytest.mark.parametrize("item, words", [
    ("3seed=4", ["--set '3seed=4'", "NODE_ID.input=value"]),
    ("3.seed", ["--set '3.seed'", "NODE_ID.input=value"]),
    (".seed=4", ["NODE_ID.input=value"]),
    ("77.seed=4", ["no node '77'", "3, 4, 9"]),
    ("3.sede=4", ["node 3 (KSampler) has no input 'sede'", "seed, steps, cfg, model"]),
])
def test_bad_set_is_named_and_nothing_is_queued(fake_comfyui, workflow, tmp_path, capsys, item, words):
    fake, url = fake_comfyui
    assert _queue(workflow, "--server", url, "--set", item, "-o", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    for w in words:
        assert w in err
    assert fake.prompts == [] and not (tmp_path / "out").exists()


def test_missing_file_is_named(tmp_path, capsys):
    assert _queue(tmp_path / "nope_api.json") == 2
    assert "nope_api.json" in capsys.readouterr().err


def test_ui_format_workflow_is_recognised(fake_comfyui, capsys):
    fake, url = fake_comfyui
    ui = ROOT / "workflows" / "flux2_t2i.json"
    assert _queue(ui, "--server", url) == 2
    err = capsys.readouterr().err
    assert "flux2_t2i.json" in err and "UI-format" in err and "Export (API)" in err
    assert fake.prompts == []


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"3": {"inputs": {}}}'])
def test_non_api_json_is_refused(tmp_path, capsys, content):
    path = tmp_path / "odd.json"
    path.write_text(content)
    assert _queue(path) == 2
    err = capsys.readouterr().err
    assert "odd.json" in err and ("API-format" in err or "not readable JSON" in err)


def test_unreachable_server_is_a_clear_error(workflow, capsys):
    port = _free_port()  # bound, then released: nothing listens there
    assert _queue(workflow, "--server", f"http://127.0.0.1:{port}") == 2
    err = capsys.readouterr().err
    assert f"127.0.0.1:{port}" in err and "not reachable" in err and "--server" in err


def test_bad_repeat_and_server_are_refused(workflow, capsys):
    assert _queue(workflow, "--repeat", "0") == 2
    assert "--repeat 0" in capsys.readouterr().err
    assert _queue(workflow, "--server", "ftp://127.0.0.1:1") == 2
    assert "--server 'ftp://127.0.0.1:1'" in capsys.readouterr().err


# ---------------------------------------------------------------- prompts


def test_success_saves_each_image_named_by_prompt_and_node(fake_comfyui, workflow, tmp_path, capsys):
    fake, url = fake_comfyui
    out = tmp_path / "out"
    assert _queue(workflow, "--server", url, "-o", out) == 0
    assert fake.prompts == [GRAPH]
    (prompt_id,) = fake.history
    saved = out / f"{prompt_id}_9_0.png"
    assert sorted(p.name for p in out.iterdir()) == [saved.name]
    assert saved.read_bytes() == fake.images["ComfyUI_00000_.png"]
    captured = capsys.readouterr()
    assert prompt_id in captured.out and " s -> " in captured.out and str(saved) in captured.out
    assert "node 3 KSampler" in captured.err and "3/3" in captured.err  # the progress bar: node and steps


def test_set_values_are_json_when_they_parse(fake_comfyui, workflow, tmp_path):
    fake, url = fake_comfyui
    assert _queue(workflow, "--server", url, "-o", tmp_path, "--set", "3.seed=42", "--set", "3.cfg=2.5",
                  "--set", "4.ckpt_name=other.safetensors", "--set", '9.filename_prefix="7"') == 0
    (sent,) = fake.prompts
    assert sent["3"]["inputs"]["seed"] == 42 and sent["3"]["inputs"]["cfg"] == 2.5
    assert sent["4"]["inputs"]["ckpt_name"] == "other.safetensors" and sent["9"]["inputs"]["filename_prefix"] == "7"
    assert sent["3"]["inputs"]["model"] == ["4", 0]
    assert json.loads(workflow.read_text()) == GRAPH  # the file is not rewritten
    (prompt_id,) = fake.history
    assert Image.open(tmp_path / f"{prompt_id}_9_0.png").getpixel((0, 0)) == (42, 7, 9)


def test_repeat_queues_the_same_graph_n_times(fake_comfyui, workflow, tmp_path, capsys):
    fake, url = fake_comfyui
    assert _queue(workflow, "--server", url, "-o", tmp_path, "--repeat", "3", "--set", "3.seed=5") == 0
    assert len(fake.prompts) == 3 and all(p["3"]["inputs"]["seed"] == 5 for p in fake.prompts)
    assert sorted(p.name for p in tmp_path.glob("*.png")) == sorted(f"{pid}_9_0.png" for pid in fake.history)
    out = capsys.readouterr().out
    assert [line.split()[0] for line in out.splitlines()] == ["[1/3]", "[2/3]", "[3/3]"]


def test_validation_error_names_node_type_and_message(fake_comfyui, workflow, tmp_path, capsys):
    fake, url = fake_comfyui
    graph = {**GRAPH, "4": {"class_type": "Invalid", "inputs": {"ckpt_name": "nope.safetensors"}}}
    workflow.write_text(json.dumps(graph))
    assert _queue(workflow, "--server", url, "-o", tmp_path / "out", "--repeat", "2") == 1
    err = capsys.readouterr().err
    assert "node 4 (Invalid): Value not in list: ckpt_name: 'nope.safetensors' not in []" in err
    assert "Prompt outputs failed validation" in err
    assert fake.prompts == [] and not (tmp_path / "out").exists()


def test_execution_error_names_node_type_and_message_and_stops(fake_comfyui, workflow, tmp_path, capsys):
    fake, url = fake_comfyui
    graph = {**GRAPH, "5": {"class_type": "Boom", "inputs": {}}}
    workflow.write_text(json.dumps(graph))
    assert _queue(workflow, "--server", url, "-o", tmp_path / "out", "--repeat", "3") == 1
    err = capsys.readouterr().err
    (prompt_id,) = fake.history  # the first failure stops the repeats
    assert f"prompt {prompt_id} failed" in err
    assert "node 5 (Boom) failed: ValueError: tensor shapes do not match" in err
    assert not (tmp_path / "out").exists()


def test_execution_error_seen_only_in_history_is_reported():
    """A client that joins late may miss the websocket message; the history's status still carries the error."""
    from flux2_accel.optim.serve.queue_client import error_from_history

    entry = {"status": {"status_str": "error", "messages": [
        ["execution_start", {"prompt_id": "p"}],
        ["execution_error", {"node_id": "12", "node_type": "VAEDecode", "exception_type": "RuntimeError",
                             "exception_message": "out of memory\n"}]]}}
    assert error_from_history(entry) == "node 12 (VAEDecode) failed: RuntimeError: out of memory"
    assert error_from_history({"status": {"status_str": "success", "messages": []}}) is None
