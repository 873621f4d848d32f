"""The OpenAI image API's routes (optim/serve/openai_server.py) on loopback over a stand-in executor, driven by the
real `openai` SDK: generations, edits with two images, n, url and b64 replies, streams with partial images, every
error status, a client that goes away. The routes over ComfyUI's own queue: test_comfyui_openai.py."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import socket
import threading
import time

import pytest
from flux2_accel.optim.options import MAX_SEED
from flux2_accel.optim.serve import openai_api
from flux2_accel.optim.serve.openai_executor import OutputImage
from flux2_accel.optim.serve.queue_client import preview_image
from flux2_accel.optim.serve.openai_models import load_models
from flux2_accel.optim.serve.openai_server import ApiSettings, OpenAIRoutes, graphs
from PIL import Image

openai = pytest.importorskip("openai")
from aiohttp import web  # noqa: E402

KEY = "sk-test-0123456789"


def _png(size=(64, 64), color=(200, 30, 40)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return buffer.getvalue()


def _literal(graph: dict, name: str, default):
    """The first literal value of input `name` in the graph (what the stand-in 'runs' with)."""
    for node in graph.values():
        value = node["inputs"].get(name)
        if value is not None and not isinstance(value, list):
            return value
    return default


class StandInExecutor:
    """An executor that runs nothing: it records each graph and 'saves' one PNG per batch item, of the graph's
    size, colored by its seed. `hold` keeps a run waiting (until cancelled); `fail` makes runs fail as a node would."""

    def __init__(self):
        self.graphs: list[dict] = []
        self.uploads: dict[str, bytes] = {}
        self.saved: dict[str, bytes] = {}
        self.cancelled = 0
        self.depth = 0
        self.ready = True
        self.fail = False
        self.crash = False
        self.hold = False
        self.previews = 3

    async def check_ready(self):
        if not self.ready:
            raise openai_api.not_ready("ComfyUI's queue is not reachable: connection refused")

    async def queue_depth(self):
        return self.depth

    async def upload_image(self, data, filename):
        self.uploads[filename] = data
        return filename

    async def run(self, graph, outputs=(), on_preview=None):
        self.graphs.append(graph)
        if self.crash:
            raise RuntimeError("a bug in an executor")
        if self.fail:
            raise openai_api.execution_error("5 (Flux2AccelSampler)", "RuntimeError: latents are NaN")
        if on_preview is not None:
            for step in range(self.previews):
                on_preview(_png((8, 8), (step * 40, 0, 0)))
        try:
            while self.hold:
                await asyncio.sleep(0.01)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        width, height = _literal(graph, "width", 64), _literal(graph, "height", 64)
        seed, batch = _literal(graph, "seed", 0), _literal(graph, "batch_size", 1)
        saved = []
        for item in range(batch):
            name = f"flux2-accel_{len(self.saved):05d}_.png"
            self.saved[name] = _png((width, height), (seed % 256, item, 7))
            saved.append(OutputImage(name))
        return saved

    async def image_bytes(self, image):
        return self.saved[image.filename]


@pytest.fixture
def api(tmp_path):
    """The routes on a free loopback port (their own event loop, on a thread), the stand-in behind them, and a way
    to change the settings between requests."""
    executor = StandInExecutor()
    state = {"settings": ApiSettings()}
    routes = web.RouteTableDef()
    OpenAIRoutes(lambda request: executor, lambda: load_models(tmp_path / "user"),
                 lambda: state["settings"]).register(routes)
    app = web.Application()
    app.add_routes(routes)
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app)
    loop.run_until_complete(runner.setup())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port).start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"

    class Api:
        url = base
        stand_in = executor

        @staticmethod
        def settings(**values):
            state["settings"] = ApiSettings(**values)

        @staticmethod
        def client(key=KEY, **options):
            return openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=30, **options)

    yield Api
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=10)


def _decoded(b64: str) -> Image.Image:
    assert not b64.startswith("data:")  # bare base64, as OpenAI sends it
    return Image.open(io.BytesIO(base64.b64decode(b64)))


# --- generations ----------------------------------------------------------------------------------------------

def test_generate_returns_a_png_of_the_size_asked_and_sets_the_workflow(api):
    result = api.client().images.generate(model="flux2-dev", prompt="a red fox in the snow", size="64x48",
                                          extra_body={"seed": 7, "steps": 3, "guidance": 3.5})
    image = _decoded(result.data[0].b64_json)
    assert (image.format, image.size) == ("PNG", (64, 48))
    assert image.info.get("prompt") is None and image.info.get("workflow") is None  # no graph in the metadata
    assert result.size == "64x48" and result.output_format == "png"
    (graph,) = api.stand_in.graphs
    assert graph["4"]["inputs"]["prompt"] == "a red fox in the snow"
    sampler = graph["5"]["inputs"]
    assert (sampler["width"], sampler["height"], sampler["seed"], sampler["steps"], sampler["guidance"],
            sampler["batch_size"]) == (64, 48, 7, 3, 3.5, 1)


def test_n_is_one_batch_and_each_image_comes_back(api):
    result = api.client().images.generate(model="flux2-dev", prompt="a fox", n=2, size="32x32")
    assert len(result.data) == 2 and len(api.stand_in.graphs) == 1
    assert api.stand_in.graphs[0]["5"]["inputs"]["batch_size"] == 2
    assert [_decoded(d.b64_json).size for d in result.data] == [(32, 32), (32, 32)]


def test_more_than_max_n_is_refused_not_capped(api):
    api.settings(max_n=2)
    with pytest.raises(openai.BadRequestError) as e:
        api.client().images.generate(model="flux2-dev", prompt="a fox", n=3)
    assert e.value.body["param"] == "n" and "between 1 and 2" in e.value.body["message"]
    assert api.stand_in.graphs == []


def test_a_model_without_a_batch_input_runs_n_graphs_with_consecutive_seeds():
    model = load_models(None).get("flux2-dev")
    no_batch = type(model)(**{**model.__dict__, "slots": {k: v for k, v in model.slots.items() if k != "batch_size"}})
    request = openai_api.parse_generation_request({"model": "flux2-dev", "prompt": "a fox", "n": 3})
    jobs = graphs(no_batch, request, MAX_SEED - 1, ())
    assert [job["5"]["inputs"]["seed"] for job in jobs] == [MAX_SEED - 1, MAX_SEED, 0]
    assert [job["5"]["inputs"]["batch_size"] for job in jobs] == [1, 1, 1]  # the workflow's own, untouched
    assert len(graphs(model, request, 5, ())) == 1


def test_url_replies_name_the_saved_image_on_the_servers_view_route(api):
    result = api.client().images.generate(model="flux2-dev", prompt="a fox", response_format="url")
    (name,) = api.stand_in.saved
    assert result.data[0].url == f"{api.url}/view?filename={name}&subfolder=&type=output"
    assert result.data[0].b64_json is None


def test_jpeg_and_webp_are_encoded_at_the_compression_asked(api):
    jpeg = api.client().images.generate(model="flux2-dev", prompt="a fox", output_format="jpeg",
                                        output_compression=40, size="32x32")
    assert _decoded(jpeg.data[0].b64_json).format == "JPEG"
    webp = api.client().images.generate(model="flux2-dev", prompt="a fox", output_format="webp", size="32x32")
    assert _decoded(webp.data[0].b64_json).format == "WEBP"
    with pytest.raises(openai.BadRequestError) as e:
        api.client().images.generate(model="flux2-dev", prompt="a fox", output_format="jpeg", response_format="url")
    assert e.value.body["param"] == "output_format"


def test_quality_maps_to_the_models_own_steps(api):
    api.client().images.generate(model="flux2-dev", prompt="a fox", quality="low")
    api.client().images.generate(model="flux2-klein-4b", prompt="a fox", quality="low")
    api.client().images.generate(model="flux2-klein-4b", prompt="a fox")  # auto: the workflow's own
    assert [g["5"]["inputs"]["steps"] for g in api.stand_in.graphs] == [12, 2, 4]


# --- edits ----------------------------------------------------------------------------------------------------

def test_edit_with_two_images_uploads_both_and_feeds_the_workflows_load_image_nodes(api):
    first, second = _png((96, 64), (255, 0, 0)), _png((64, 80), (0, 0, 255))
    result = api.client().images.edit(model="flux2-dev-edit", prompt="the cat on the chair", size="32x32",
                                      image=[("cat.png", first, "image/png"), ("chair.png", second, "image/png")])
    assert _decoded(result.data[0].b64_json).size == (32, 32)
    (graph,) = api.stand_in.graphs
    names = [graph["9"]["inputs"]["image"], graph["10"]["inputs"]["image"]]
    assert names == sorted(api.stand_in.uploads) and len(set(names)) == 2
    uploaded = [Image.open(io.BytesIO(api.stand_in.uploads[n])) for n in names]
    assert [u.size for u in uploaded] == [(96, 64), (64, 80)]
    assert [u.getpixel((0, 0)) for u in uploaded] == [(255, 0, 0), (0, 0, 255)]
    assert graph["4"]["inputs"]["prompt"] == "the cat on the chair"


def test_edit_refuses_a_mask_and_a_wrong_image_count_before_anything_runs(api):
    image = ("a.png", _png(), "image/png")
    with pytest.raises(openai.BadRequestError) as e:
        api.client().images.edit(model="flux2-dev-edit", prompt="x", image=[image], mask=image)
    assert e.value.body["param"] == "mask"
    with pytest.raises(openai.BadRequestError) as e:
        api.client().images.edit(model="flux2-dev-edit", prompt="x", image=[image])
    assert e.value.body["param"] == "image" and "2" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        api.client().images.generate(model="flux2-dev-edit", prompt="x")
    assert "/v1/images/edits" in e.value.body["message"]
    assert api.stand_in.graphs == [] and api.stand_in.uploads == {}


def test_edit_takes_a_form_only(api):
    import urllib.request

    request = urllib.request.Request(api.url + "/v1/images/edits", data=b'{"model": "flux2-dev-edit"}',
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(request, timeout=10)
    body = json.loads(e.value.read())
    assert e.value.code == 400 and "multipart/form-data" in body["error"]["message"]


# --- streams --------------------------------------------------------------------------------------------------

def test_stream_sends_partial_images_then_the_completed_image(api):
    events = list(api.client().images.generate(model="flux2-dev", prompt="a fox", size="32x32", stream=True,
                                               partial_images=2))
    assert [e.type for e in events] == ["image_generation.partial_image", "image_generation.partial_image",
                                        "image_generation.completed"]
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    assert _decoded(events[0].b64_json).size == (8, 8) and _decoded(events[-1].b64_json).size == (32, 32)
    assert events[-1].usage.total_tokens == 0


def test_an_edit_stream_uses_the_edit_event_names(api):
    images = [("a.png", _png(), "image/png"), ("b.png", _png(), "image/png")]
    events = list(api.client().images.edit(model="flux2-dev-edit", prompt="x", image=images, stream=True,
                                           partial_images=1))
    assert [e.type for e in events] == ["image_edit.partial_image", "image_edit.completed"]


def test_a_failure_after_the_stream_began_is_an_error_event(api):
    api.stand_in.fail = True
    with pytest.raises(openai.APIError) as e:
        list(api.client().images.generate(model="flux2-dev", prompt="a fox", stream=True, partial_images=1))
    assert "5 (Flux2AccelSampler)" in str(e.value) and "NaN" in str(e.value)


# --- errors ---------------------------------------------------------------------------------------------------

def test_unknown_fields_and_bad_values_are_400_naming_the_field(api):
    with pytest.raises(openai.BadRequestError) as e:
        api.client().images.generate(model="flux2-dev", prompt="a fox", extra_body={"cfg_scale": 3})
    assert e.value.status_code == 400 and e.value.body["param"] == "cfg_scale"
    with pytest.raises(openai.BadRequestError) as e:
        api.client().images.generate(model="flux2-dev", prompt="a fox", size="1000x1000")
    assert e.value.body["param"] == "size"
    with pytest.raises(openai.BadRequestError) as e:
        api.client().images.generate(model="flux2-klein-4b", prompt="a fox", extra_body={"negative_prompt": "blur"})
    assert e.value.body["param"] == "negative_prompt" and "flux2-klein-4b" in e.value.body["message"]


def test_an_unknown_model_is_404_listing_the_models(api):
    with pytest.raises(openai.NotFoundError) as e:
        api.client().images.generate(model="dall-e-3", prompt="a fox")
    assert e.value.body["code"] == "model_not_found"
    for name in ("flux2-dev", "flux2-dev-fast", "flux2-klein-4b", "flux2-dev-edit"):
        assert name in e.value.body["message"]


def test_models_are_listed_in_openais_shape(api):
    names = [m.id for m in api.client().models.list()]
    assert names == sorted(names) and {"flux2-dev", "flux2-dev-fast", "flux2-klein-4b", "flux2-dev-edit"} <= set(names)


def test_a_key_is_required_once_set_and_compared(api):
    api.settings(api_key=KEY)
    with pytest.raises(openai.AuthenticationError) as e:
        api.client(key="sk-wrong").images.generate(model="flux2-dev", prompt="a fox")
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        api.client(key="sk-wrong").models.list()
    assert api.client(key=KEY).images.generate(model="flux2-dev", prompt="a fox").data
    assert api.stand_in.graphs and len(api.stand_in.graphs) == 1


def test_beyond_loopback_without_a_key_every_route_is_401_unless_allowed(api):
    api.settings(listen_host="0.0.0.0")
    with pytest.raises(openai.AuthenticationError) as e:
        api.client().images.generate(model="flux2-dev", prompt="a fox")
    assert "FLUX2_ACCEL_API_KEY" in e.value.body["message"]
    api.settings(listen_host="0.0.0.0", allow_open=True)
    assert api.client(key="anything").images.generate(model="flux2-dev", prompt="a fox").data


def test_a_body_over_the_limit_is_413(api):
    api.settings(max_body_bytes=2000)
    with pytest.raises(openai.APIStatusError) as e:
        api.client().images.generate(model="flux2-dev", prompt="a fox " * 500)
    assert e.value.status_code == 413 and e.value.body["code"] == "request_too_large"
    with pytest.raises(openai.APIStatusError) as e:
        api.client().images.edit(model="flux2-dev-edit", prompt="x", image=[("a.png", b"\0" * 5000, "image/png")])
    assert e.value.status_code == 413
    assert api.stand_in.graphs == []


def test_a_full_queue_is_429_and_nothing_is_queued(api):
    api.stand_in.depth = 16
    with pytest.raises(openai.RateLimitError) as e:
        api.client().images.generate(model="flux2-dev", prompt="a fox")
    assert e.value.body["code"] == "queue_full" and api.stand_in.graphs == []


def test_an_execution_error_is_500_naming_the_node(api):
    api.stand_in.fail = True
    with pytest.raises(openai.InternalServerError) as e:
        api.client().images.generate(model="flux2-dev", prompt="a fox")
    assert e.value.status_code == 500 and "node 5 (Flux2AccelSampler)" in e.value.body["message"]


def test_not_ready_is_503(api):
    api.stand_in.ready = False
    with pytest.raises(openai.APIStatusError) as e:
        api.client().images.generate(model="flux2-dev", prompt="a fox")
    assert e.value.status_code == 503 and e.value.body["code"] == "not_ready"


def test_a_bug_is_a_500_and_the_server_keeps_serving(api):
    api.stand_in.crash = True
    with pytest.raises(openai.InternalServerError) as e:
        api.client().images.generate(model="flux2-dev", prompt="a fox")
    assert "see its log" in e.value.body["message"] and "Traceback" not in str(e.value.body)
    api.stand_in.crash = False
    assert api.client().images.generate(model="flux2-dev", prompt="a fox").data


def test_a_request_over_its_time_is_cancelled_and_answered_504(api):
    api.settings(request_timeout_s=0.5)
    api.stand_in.hold = True
    with pytest.raises(openai.APIStatusError) as e:
        api.client().images.generate(model="flux2-dev", prompt="a fox")
    assert e.value.status_code == 504 and api.stand_in.cancelled == 1


def test_a_client_that_goes_away_cancels_its_run_and_the_next_request_runs(api):
    api.stand_in.hold = True
    body = json.dumps({"model": "flux2-dev", "prompt": "a fox"}).encode()
    port = int(api.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        deadline = time.time() + 10
        while not api.stand_in.graphs and time.time() < deadline:
            time.sleep(0.01)
        assert len(api.stand_in.graphs) == 1  # it is running
    deadline = time.time() + 10
    while not api.stand_in.cancelled and time.time() < deadline:
        time.sleep(0.02)
    assert api.stand_in.cancelled == 1
    api.stand_in.hold = False
    assert api.client().images.generate(model="flux2-dev", prompt="a fox").data
    assert api.stand_in.cancelled == 1 and len(api.stand_in.graphs) == 2


# --- the executor's preview frames ------------------------------------------------------------------------------

def test_preview_frames_of_both_comfyui_forms_give_their_image():
    image = _png((4, 4))
    old = (1).to_bytes(4, "big") + (2).to_bytes(4, "big") + image
    metadata = json.dumps({"prompt_id": "p1", "node_id": "5"}).encode()
    new = (4).to_bytes(4, "big") + len(metadata).to_bytes(4, "big") + metadata + image
    assert preview_image(old) == (image, {})
    assert preview_image(new) == (image, {"prompt_id": "p1", "node_id": "5"})
    assert preview_image((3).to_bytes(4, "big") + b"text....") is None  # a TEXT frame
    assert preview_image(new[:12]) is None  # cut short
