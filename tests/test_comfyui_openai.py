"""The OpenAI image API in a real ComfyUI (COMFYUI_DIR), driven by the `openai` SDK: the routes the pack registers on
ComfyUI's server, its own prompt queue behind them, user workflows as models (the tiny models stand in for the
real ones), the key from the environment, a client going away, and a UI prompt queued beside the API's.

The stream's previews come from a test-only node (tests/comfyui_test_nodes) that sends them through ComfyUI's
progress bar, as a sampler does: the tiny models' latents have no preview factors."""

from __future__ import annotations

import base64
import io
import json
import socket
import time
import urllib.request

import pytest
from comfyui_harness import ROOT, comfyui_base, get_json, history_entry, needs_comfyui, post_json, running_comfyui
from PIL import Image
from test_comfyui_real import _tiny_graph, place_tiny_dev_models

openai = pytest.importorskip("openai")

pytestmark = needs_comfyui

KEY = "sk-comfyui-openai-test-5e1"
TEST_NODES = ROOT / "tests" / "comfyui_test_nodes" / "flux2_accel_test_nodes"
# Slow enough on the tiny models (seconds) that a prompt is still queued or running when its client leaves.
SLOW = {"size": "1024x1024", "steps": 200}


def _png(color, size=(80, 64)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return buffer.getvalue()


def _user_models(folder) -> None:
    """The user's API workflows on the tiny models, under the shipped names (a user model replaces a shipped one),
    and one with previews for the stream."""
    folder.mkdir(parents=True)
    (folder / "flux2-dev.json").write_text(json.dumps(_tiny_graph("flux2_t2i")))
    (folder / "flux2-dev-edit.json").write_text(json.dumps(_tiny_graph("flux2_edit_two_references")))
    previews = _tiny_graph("flux2_t2i")
    previews["7"] = {"class_type": "Flux2AccelTestPreviews", "inputs": {"images": ["5", 0], "count": 3}}
    previews["6"]["inputs"]["images"] = ["7", 0]
    (folder / "flux2-dev-previews.json").write_text(json.dumps(previews))


@pytest.fixture(scope="module")
def comfyui(tiny_models, tmp_path_factory):
    base = comfyui_base(tmp_path_factory, "comfy_openai", (TEST_NODES,))
    place_tiny_dev_models(base / "models", tiny_models)
    _user_models(base / "user" / "flux2-accel" / "openai")
    with running_comfyui(base, env={"FLUX2_ACCEL_API_KEY": KEY}) as (url, log_path, _):
        yield url, base, log_path


def _client(url, key=KEY):
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=300)


def _image(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def _wait(condition, what: str, timeout: float = 120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}")


def _queue(url) -> dict:
    return get_json(url + "/queue")


def _prompt_ids(items) -> list[str]:
    return [item[1] for item in items]


def _with_marker(queue_items, marker: str) -> list[str]:
    """Prompt ids of queue items whose graph carries `marker` as its prompt text."""
    return [item[1] for item in queue_items if any(node.get("inputs", {}).get("prompt") == marker
                                                   for node in item[2].values())]


def test_generate_returns_a_decodable_png_of_the_size_asked(comfyui):
    url, _, log_path = comfyui
    result = _client(url).images.generate(model="flux2-dev", prompt="a red fox", size="64x48",
                                          extra_body={"steps": 2, "seed": 3})
    image = _image(result.data[0].b64_json)
    assert (image.format, image.size) == ("PNG", (64, 48)), log_path.read_text()[-2000:]
    url_reply = _client(url).images.generate(model="flux2-dev", prompt="a red fox", size="32x32",
                                             response_format="url", extra_body={"steps": 2})
    with urllib.request.urlopen(url_reply.data[0].url, timeout=30) as reply:
        assert Image.open(io.BytesIO(reply.read())).size == (32, 32)


def test_models_lists_the_user_workflows(comfyui):
    url, _, _ = comfyui
    names = {model.id for model in _client(url).models.list()}
    assert {"flux2-dev", "flux2-dev-edit", "flux2-dev-previews", "flux2-klein-4b"} <= names


def test_edit_with_two_images(comfyui):
    url, base, _ = comfyui
    images = [("cat.png", _png((250, 10, 10)), "image/png"), ("chair.png", _png((10, 10, 250), (64, 96)), "image/png")]
    result = _client(url).images.edit(model="flux2-dev-edit", prompt="the cat on the chair", image=images,
                                      size="64x48", extra_body={"steps": 2})
    assert _image(result.data[0].b64_json).size == (64, 48)
    uploaded = sorted(p.name for p in (base / "input").glob("flux2-accel-openai-*.png"))
    assert len(uploaded) == 2 and [Image.open(base / "input" / n).size for n in uploaded] == [(80, 64), (64, 96)]


def test_stream_sends_partial_images_then_the_image(comfyui):
    url, _, _ = comfyui
    events = list(_client(url).images.generate(model="flux2-dev-previews", prompt="a fox", size="64x48",
                                               stream=True, partial_images=2, extra_body={"steps": 2}))
    kinds = [event.type for event in events]
    assert kinds[-1] == "image_generation.completed" and kinds.count("image_generation.completed") == 1
    partial = [event for event in events if event.type == "image_generation.partial_image"]
    assert 1 <= len(partial) <= 2, kinds
    width, height = _image(partial[0].b64_json).size  # the preview node's image, which ComfyUI fits to 512
    assert width * 48 == height * 64
    assert _image(events[-1].b64_json).size == (64, 48)


def test_a_wrong_key_is_401_then_a_good_request_works(comfyui):
    url, _, _ = comfyui
    with pytest.raises(openai.AuthenticationError) as e:
        _client(url, key="sk-wrong").images.generate(model="flux2-dev", prompt="a fox", extra_body={"steps": 2})
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    assert _client(url).images.generate(model="flux2-dev", prompt="a fox", size="32x32", extra_body={"steps": 2}).data


def _send_and_leave(url, body: dict, until) -> None:
    """POST a generation on a raw connection, wait until `until()` holds, then close the connection."""
    data = json.dumps(body).encode()
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as conn:
        conn.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
        _wait(until, "the API's prompt to be queued")


def test_a_client_that_leaves_a_pending_prompt_takes_it_off_the_queue_and_a_ui_prompt_still_completes(comfyui):
    url, _, log_path = comfyui
    ui_graph = _tiny_graph("flux2_t2i")
    # Long enough to be running throughout the pending prompt's few seconds. On a CPU without AVX-512 it takes about
    # 400 s, most of it the bf16 VAE decode at 1024x1024, hence the long wait for its end.
    ui_graph["5"]["inputs"].update(width=1024, height=1024, steps=60)
    ui_prompt = post_json(url + "/prompt", {"prompt": ui_graph, "client_id": "ui"})["prompt_id"]
    _wait(lambda: ui_prompt in _prompt_ids(_queue(url)["queue_running"]), "the UI prompt to run")
    marker = "left while waiting"
    _send_and_leave(url, {"model": "flux2-dev", "prompt": marker, "steps": 2},
                    lambda: _with_marker(_queue(url)["queue_pending"], marker))
    _wait(lambda: not _with_marker(_queue(url)["queue_pending"], marker), "the pending prompt to leave the queue", 30)
    assert ui_prompt in _prompt_ids(_queue(url)["queue_running"])  # not interrupted
    assert history_entry(url, ui_prompt, timeout=600)["status"]["status_str"] == "success", log_path.read_text()[-2000:]


def test_a_client_that_leaves_a_running_prompt_interrupts_it_and_the_next_request_runs(comfyui):
    url, _, log_path = comfyui
    marker = "left while running"
    running = []
    _send_and_leave(url, {"model": "flux2-dev", "prompt": marker, **SLOW},
                    lambda: running.extend(_with_marker(_queue(url)["queue_running"], marker)) or running)
    started = time.time()
    _wait(lambda: not _queue(url)["queue_running"], "the running prompt to stop", 60)
    assert time.time() - started < 60
    assert history_entry(url, running[0])["status"]["status_str"] == "error"  # interrupted, not finished
    result = _client(url).images.generate(model="flux2-dev", prompt="after", size="32x32", extra_body={"steps": 2})
    assert _image(result.data[0].b64_json).size == (32, 32), log_path.read_text()[-2000:]


def test_the_apis_progress_shows_in_the_ui_as_for_any_prompt(comfyui):
    """Another client's websocket (the UI's) sees the API prompt's sampler count its steps."""
    import asyncio
    import threading

    import aiohttp

    url, _, _ = comfyui
    seen, connected, done = [], threading.Event(), threading.Event()

    async def watch():
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(url.replace("http", "ws", 1) + "/ws?clientId=the-ui") as ws:
                connected.set()
                while not done.is_set():
                    try:
                        message = await ws.receive(timeout=0.2)
                    except asyncio.TimeoutError:
                        continue
                    if message.type == aiohttp.WSMsgType.TEXT:
                        seen.append(json.loads(message.data))

    watcher = threading.Thread(target=lambda: asyncio.run(watch()), daemon=True)
    watcher.start()
    assert connected.wait(30)
    _client(url).images.generate(model="flux2-dev", prompt="watched", size="32x32", extra_body={"steps": 3})
    time.sleep(0.5)
    done.set()
    watcher.join(30)
    progress = [(m["data"]["value"], m["data"]["max"]) for m in seen
                if m.get("type") == "progress" and m["data"].get("node") == "5"]
    assert progress and progress[-1] == (3, 3), seen[-10:]  # the sampler's steps, as the UI's progress bar reads them
