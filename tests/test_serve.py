"""`flux2-accel serve` on Ray Serve: the OpenAI image API over the engine (optim/serve/ray_serve).

One server for the module: the real command (`flux2-accel serve --config`) in a subprocess, on a local Ray bound to
loopback, serving three models of tiny random weights: `flux2-demo` (2 replicas), `queue` (1 replica, a queue of 1)
and `broken` (its files are not models). The clients are the OpenAI SDK and urllib, on 127.0.0.1 only; every load
is bounded in count and time. The last test stops the server with Ctrl-C while a request runs.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from flux2_accel.optim.cli import args as cli_args
from flux2_accel.optim.cli.main import build_parser
from flux2_accel.optim.cli.main import main as cli_main
from flux2_accel.optim.serve.ray_serve import config as serve_config
from flux2_accel.optim.serve.ray_serve import install as serve_install
from flux2_accel.optim.serve.ray_serve.jobs import GenerationJob, partial_steps
from flux2_accel.optim.serve.ray_serve.runtime import ServedModel, ServedTextEncoder, conditioning
from PIL import Image

pytest.importorskip("ray.serve")
from flux2_accel.optim.serve.ray_serve import launcher  # noqa: E402  (imports Ray Serve)
openai = pytest.importorskip("openai")

KEY = "test-key-0123456789"
KEY_ENV = "FLUX2_ACCEL_SERVE_TEST_KEY"
START_TIMEOUT_S = 150


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CONFIG = """
[server]
port = {port}
api_key_env = "{key_env}"
graceful_shutdown_timeout_s = 60

[text_encoders.demo]
demo = true
num_cpus = 0

[models.flux2-demo]
demo = true
text_encoder = "demo"
gpus_per_replica = 0
num_cpus = 0
width = 64
height = 64
steps = 4
replicas = {{ count = 2, max_queued_requests = 16 }}

[models.queue]
demo = true
text_encoder = "demo"
gpus_per_replica = 0
num_cpus = 0
width = 64
height = 64
steps = 4
replicas = {{ count = 1, max_queued_requests = 1 }}

[models.broken]
transformer = "not-a-model.safetensors"
vae = "not-a-model.safetensors"
text_encoder = "demo"
gpus_per_replica = 0
num_cpus = 0
"""


class Server:
    def __init__(self, process: subprocess.Popen, url: str, lines: list):
        self.process, self.url, self.lines = process, url, lines

    def client(self, key: str = KEY):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=120)

    def post_json(self, path: str, body: dict, key: str | None = KEY, timeout: float = 120):
        request = urllib.request.Request(self.url + path, data=json.dumps(body).encode(), method="POST",
                                         headers={"Content-Type": "application/json",
                                                  **({"Authorization": f"Bearer {key}"} if key else {})})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as r:
                return r.status, dict(r.headers), json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), json.loads(e.read())

    def get_json(self, path: str, key: str | None = KEY):
        request = urllib.request.Request(self.url + path, headers={"Authorization": f"Bearer {key}"} if key else {})
        try:
            with urllib.request.urlopen(request, timeout=30) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    (root / "not-a-model.safetensors").write_bytes(os.urandom(1000))
    port = free_port()
    (root / "serve.toml").write_text(CONFIG.format(port=port, key_env=KEY_ENV))
    env = {**os.environ, KEY_ENV: KEY, "RAY_DEDUP_LOGS": "0"}
    env.pop("RAY_ADDRESS", None)
    process = subprocess.Popen([sys.executable, "-m", "flux2_accel.optim.cli.main", "serve", "--config",
                                str(root / "serve.toml"), "--num-cpus", "4"], cwd=root, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    ready = threading.Event()

    def read():
        for line in process.stdout:
            lines.append(line)
            if "answers on" in line or line.startswith("error:"):
                ready.set()
        ready.set()

    threading.Thread(target=read, daemon=True).start()
    ready.wait(START_TIMEOUT_S)
    if not any("answers on" in line for line in lines):
        process.kill()
        pytest.fail("serve did not start:\n" + "".join(lines[-40:]))
    deadline = time.monotonic() + 30  # the model lines follow the address line
    while not any("model broken:" in line for line in lines) and time.monotonic() < deadline:
        time.sleep(0.1)
    yield Server(process, f"http://127.0.0.1:{port}", lines)
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()


def png(data_b64: str) -> Image.Image:
    raw = base64.b64decode(data_b64)
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    return Image.open(io.BytesIO(raw))


# --- the configuration, refused before Ray starts ----------------------------------------------------------------

@pytest.mark.parametrize("text, key", [
    ('[models.a]\ndemo = true\ntext_encoder = "te"\n', "models.a.text_encoder"),
    ('[text_encoders.te]\ndemo = true\n[models.a]\ndemo = true\ntext_encoder = "te"\nprecison = "fp8"\n',
     "models.a.precison"),
    ('[text_encoders.te]\ndemo = true\n[models.a]\ndemo = true\ntext_encoder = "te"\n[models.a.step_cache]\n'
     'method = "fbcache"\nthreshold = "high"\n', "models.a.step_cache.threshold"),
    ('[text_encoders.te]\ndemo = true\n[models.a]\ntext_encoder = "te"\ntransformer = "missing.safetensors"\n',
     "models.a.transformer"),
    ('[text_encoders.te]\ndemo = true\n[models.a]\ndemo = true\ntext_encoder = "te"\n'
     'replicas = { min = 3, max = 2 }\n', "models.a.replicas.min"),
    ('[server]\nport = 70000\n[text_encoders.te]\ndemo = true\n[models.a]\ndemo = true\ntext_encoder = "te"\n',
     "server.port"),
    ('[text_encoders.te]\nendpoint_url = "ftp://x"\n[models.a]\ndemo = true\ntext_encoder = "te"\n',
     "text_encoders.te.endpoint_url"),
    ("[server]\n", "no [models.NAME] table"),
    ('[text_encoders.te]\ndemo = true\n[models.a]\ndemo = true\ntext_encoder = "te"\ngpus_per_replica = 2\n',
     "models.a.gpus_per_replica"),
])
def test_bad_config_is_refused_naming_the_key(tmp_path, text, key):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(serve_config.ServeConfigError) as e:
        serve_config.load_config(path)
    assert key in str(e.value) and str(path) in str(e.value)


def test_bad_config_from_the_command_line_exits_before_ray(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[text_encoders.te]\ndemo = true\n[models.a]\ndemo = true\ntext_encoder = "te"\nsteps = 0\n')
    started = time.monotonic()
    run = subprocess.run([sys.executable, "-m", "flux2_accel.optim.cli.main", "serve", "--config", str(path)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert run.stderr.startswith("error: ") and "models.a.steps is 0" in run.stderr
    assert "Ray" not in run.stderr + run.stdout and time.monotonic() - started < 30


class RayStarted(Exception):
    pass


def _raise_ray_started(**_):
    raise RayStarted


def test_a_port_already_in_use_is_refused_before_ray_starts(monkeypatch):
    # Ray's proxy would retry binding forever and serve.start() would never return.
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(launcher.group.require_ray(), "is_initialized", lambda: False)
    monkeypatch.setattr(launcher.group, "ray_started", _raise_ray_started)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(launcher.ServeError) as refused:
            launcher.deploy(serve_config.demo_config(port=port))
        assert str(refused.value).startswith(f"127.0.0.1:{port} is not free to serve on")
        assert "--port" in str(refused.value)
        # A process that has deployed before (bench_serve deploys three times) holds the port in Serve's own
        # proxy, which the next app shares; and on a cluster the port is the head node's.
        monkeypatch.setattr(launcher.group.require_ray(), "is_initialized", lambda: True)
        with pytest.raises(RayStarted):
            launcher.deploy(serve_config.demo_config(port=port))
        monkeypatch.setattr(launcher.group.require_ray(), "is_initialized", lambda: False)
        with pytest.raises(RayStarted):
            launcher.deploy(serve_config.demo_config(port=port), address="127.0.0.1:6379")
    launcher.check_port_free("127.0.0.1", port)  # free again once its holder closes


def test_without_ray_serve_the_command_gives_the_install_hint(monkeypatch, capsys):
    monkeypatch.setattr(serve_install, "REQUIRED_MODULES", ("ray.serve", "flux2_accel_no_such_module.sub"))
    assert cli_main(["serve", "--demo"]) == 2
    assert capsys.readouterr().err == f"error: {serve_install.INSTALL_HINT}\n"


def test_beyond_loopback_needs_a_key_or_the_explicit_flag(monkeypatch):
    monkeypatch.delenv(serve_config.DEFAULT_API_KEY_ENV, raising=False)
    config = serve_config.demo_config(host="0.0.0.0")
    with pytest.raises(serve_config.ServeConfigError, match="beyond loopback"):
        config.check_security()
    config.with_server(allow_open=True).check_security()
    monkeypatch.setenv(serve_config.DEFAULT_API_KEY_ENV, "k")
    config.check_security()
    assert serve_config.demo_config().server.host == "127.0.0.1"


def test_demo_flag_serves_the_tiny_model_on_loopback_8000():
    args = build_parser(["serve", "--demo"]).parse_args(["serve", "--demo", "--replicas", "2"])
    cli_args.check_serve_app(args)
    config = args.serve_config
    assert (config.server.host, config.server.port) == ("127.0.0.1", 8000)
    assert list(config.models) == [serve_config.DEMO_MODEL]
    assert config.models[serve_config.DEMO_MODEL].replica.replicas == 2 and config.models["flux2-demo"].demo


def test_the_config_sets_each_deployment_replicas_queue_and_resources(tmp_path):
    (tmp_path / "t.safetensors").write_bytes(b"x")
    (tmp_path / "serve.toml").write_text(
        '[text_encoders.te]\ndemo = true\nnum_gpus = 0.5\nreplicas = 2\nmax_batch_size = 12\n'
        '[models.auto]\ntransformer = "t.safetensors"\nvae = "t.safetensors"\ntext_encoder = "te"\n'
        'replicas = { min = 1, max = 4, target_ongoing_requests = 2, max_queued_requests = 9 }\n'
        '[models.group]\ntransformer = "t.safetensors"\nvae = "t.safetensors"\ntext_encoder = "te"\n'
        'gpus_per_replica = 4\nparallel = "cfg"\nreplicas = 3\nloras = [{ file = "t.safetensors", strength = 0.5 }]\n')
    config = serve_config.load_config(tmp_path / "serve.toml")
    auto = serve_config.generator_options(config.models["auto"], config.server)
    assert auto["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 2.0}
    assert "num_replicas" not in auto and auto["max_queued_requests"] == 9 and auto["max_ongoing_requests"] == 1
    assert auto["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 1.0} and auto["name"] == "Generator:auto"
    group = config.models["group"]
    options = serve_config.generator_options(group, config.server)
    assert options["num_replicas"] == 3 and options["ray_actor_options"]["num_gpus"] == 0  # its ranks hold the GPUs
    # One placement group per replica on one machine: the replica (1 CPU) with rank 0, then a GPU per rank.
    assert options["placement_group_strategy"] == "STRICT_PACK"
    assert options["placement_group_bundles"] == [{"GPU": 1.0, "CPU": 1.0}] + [{"GPU": 1.0}] * 3
    on_cpus = serve_config.generator_options(group, config.server, on_gpu=False)["placement_group_bundles"]
    assert on_cpus == [{"CPU": 2.0}] + [{"CPU": 1.0}] * 3
    assert "placement_group_bundles" not in auto
    assert (group.parallel_settings.gpus, group.parallel_settings.mode) == (4, "cfg")
    assert group.loras == ((str((tmp_path / "t.safetensors").resolve()), 0.5),)
    encoder = serve_config.text_encoder_options(config.text_encoders["te"])
    assert encoder["num_replicas"] == 2 and encoder["ray_actor_options"]["num_gpus"] == 0.5
    assert encoder["max_ongoing_requests"] >= 12


def test_the_example_config_is_valid(tmp_path):
    example = Path(__file__).resolve().parents[1] / "examples" / "serve.toml"
    text = example.read_text()
    for name in ("flux2-dev-fp8.safetensors", "flux2-vae.safetensors", "mistral_3_small_flux2_fp8.safetensors",
                 "flux-2-klein-4b.safetensors", "qwen_3_4b.safetensors"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "serve.toml").write_text(text.replace("/models/", str(tmp_path) + "/"))
    config = serve_config.load_config(tmp_path / "serve.toml")
    assert sorted(config.models) == ["flux2-dev", "flux2-klein-4b"]


# --- the work the replicas do, in one process ----------------------------------------------------------------------

def test_text_encoder_batches_uncached_prompts_into_one_forward():
    encoder = ServedTextEncoder(serve_config.TextEncoderConfig("te", demo=True, cache_entries=8))
    calls = []
    encode = encoder.encoder.encode
    encoder.encoder.encode = lambda prompts: calls.append(list(prompts)) or encode(prompts)
    rows = encoder.encode_batch(["a red dog", "a blue cat", "a red dog"])
    assert calls == [["a red dog", "a blue cat"]]
    single = encode(["a blue cat"]).prompt_embeds[0]
    assert torch.allclose(rows[1], single, atol=1e-5) and torch.equal(rows[0], rows[2])
    again = encoder.encode_batch(["a blue cat"])
    assert len(calls) == 1 and torch.equal(again[0], rows[1])
    # the repeated prompt in the first batch is encoded once; only the later call is answered by the cache
    assert encoder.counts == {"prompts": 4, "batches": 2, "encoded": 2, "cache_hits": 1}


def test_served_model_matches_across_calls_and_streams_partials():
    config = serve_config.demo_config().models[serve_config.DEMO_MODEL]
    model = ServedModel(config)
    encoder = ServedTextEncoder(serve_config.TextEncoderConfig("te", demo=True))
    cond = conditioning(encoder.encode_batch(["a red dog"])[0], encoder.family)
    job = GenerationJob("a red dog", 64, 32, 6, 4.0, seed=7, n=2, partial_images=2)
    partials = []
    first = model.generate(job, cond, None, on_partial=partials.append)
    second = model.generate(job, cond, None)
    assert first.images == second.images and len(first.images) == 2  # same seed, same bytes; no reload between
    assert Image.open(io.BytesIO(first.images[0])).size == (64, 32)
    assert len(partials) == 2 and partials[0] != first.images[0]
    assert partial_steps(6, 2) == {2, 4} and partial_steps(4, 3) == {1, 2, 3} and partial_steps(1, 2) == set()
    loads = model.loads
    model.generate(job, cond, None)
    assert model.loads == loads


# --- the running server --------------------------------------------------------------------------------------------

def test_generate_answers_a_png_of_the_asked_size(server):
    reply = server.client().images.with_raw_response.generate(model="flux2-demo", prompt="a red dog",
                                                              size="128x64", n=2)
    images = reply.parse().data
    assert [png(image.b64_json).size for image in images] == [(128, 64), (128, 64)]
    assert reply.headers["x-flux2-accel-replica"]


def test_edit_takes_two_images(server):
    buffer = io.BytesIO()
    Image.new("RGB", (96, 64), (200, 20, 20)).save(buffer, "PNG")
    result = server.client().images.edit(
        model="flux2-demo", prompt="make it blue", size="64x64",
        image=[("a.png", buffer.getvalue(), "image/png"), ("b.png", buffer.getvalue(), "image/png")])
    assert png(result.data[0].b64_json).size == (64, 64)


def test_stream_sends_partial_images_then_the_image(server):
    events = list(server.client().images.generate(model="flux2-demo", prompt="a cat", stream=True,
                                                  partial_images=2, extra_body={"steps": 6}))
    assert [e.type for e in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    assert png(events[-1].b64_json).size == (64, 64)


def test_a_wrong_or_missing_key_is_401(server):
    with pytest.raises(openai.AuthenticationError):
        server.client("wrong-key").images.generate(model="flux2-demo", prompt="x")
    status, body = server.get_json("/v1/models", key=None)
    assert status == 401 and body["error"]["code"] == "invalid_api_key"


def test_a_value_the_engine_refuses_is_400_naming_it(server):
    status, _, body = server.post_json("/v1/images/generations", {"model": "flux2-demo", "prompt": "x",
                                                                  "negative_prompt": "blurry"})
    assert status == 400 and body["error"]["message"].startswith("negative_prompt: model 'flux2-demo' is FLUX.2 [dev]")


def test_a_model_that_cannot_load_is_listed_unavailable_with_its_reason(server):
    status, listing = server.get_json("/v1/models")
    assert status == 200
    assert sorted(m["id"] for m in listing["data"]) == ["flux2-demo", "queue"]
    (broken,) = listing["unavailable"]
    assert broken["id"] == "broken" and "cannot load" in broken["reason"]
    assert "not-a-model.safetensors" in broken["reason"]
    status, headers, body = server.post_json("/v1/images/generations", {"model": "broken", "prompt": "x"})
    assert status == 503 and "cannot load" in body["error"]["message"] and headers.get("retry-after")
    assert any("model broken: UNAVAILABLE" in line for line in server.lines)


def test_two_replicas_serve_eight_concurrent_requests_without_reloading(server):
    client = server.client()

    def one(i):
        reply = client.images.with_raw_response.generate(model="flux2-demo", prompt=f"prompt {i}", size="256x256",
                                                         extra_body={"steps": 30, "seed": i})
        assert png(reply.parse().data[0].b64_json).size == (256, 256)
        return reply.headers["x-flux2-accel-replica"], int(reply.headers["x-flux2-accel-model-loads"])

    with ThreadPoolExecutor(8) as pool:
        served = list(pool.map(one, range(8), timeout=120))
    assert len(served) == 8 and len({replica for replica, _ in served}) == 2
    loads = {}
    for replica, count in served:
        loads.setdefault(replica, set()).add(count)
    assert all(len(counts) == 1 for counts in loads.values())  # no replica loaded a model for a request


def test_bench_serve_drives_the_server_and_counts_the_text_encoder_calls(server):
    script = Path(__file__).resolve().parents[1] / "scripts" / "bench_serve.py"
    run = subprocess.run([sys.executable, str(script), "--url", server.url, "--model", "flux2-demo", "--key-env",
                          KEY_ENV, "--requests", "6", "--concurrency", "3", "--size", "64", "--steps", "4", "--json"],
                         capture_output=True, text=True, timeout=120, env={**os.environ, KEY_ENV: KEY})
    assert run.returncode == 0, run.stderr[-2000:]
    (result,) = json.loads(run.stdout).values()
    assert result["completed"] == 6 and result["statuses"] == {"200": 6}
    assert result["encoder_prompts"] == 6 and 1 <= result["encoder_calls"] <= 6  # distinct prompts: no cache hit
    assert 0 < result["p50_s"] <= result["p95_s"] and result["rps"] > 0


def test_a_full_queue_answers_429_with_retry_after(server):
    def one(i):
        return server.post_json("/v1/images/generations", {"model": "queue", "prompt": f"p {i}", "size": "512x512",
                                                           "steps": 100})

    with ThreadPoolExecutor(5) as pool:
        replies = list(pool.map(one, range(5), timeout=180))
    statuses = sorted(status for status, _, _ in replies)
    assert set(statuses) <= {200, 429} and 200 in statuses and 429 in statuses, statuses
    for status, headers, body in replies:
        if status == 429:
            assert headers.get("retry-after") == "1" and body["error"]["code"] == "queue_full"
        else:
            assert png(body["data"][0]["b64_json"]).size == (512, 512)


def replica_pids(deployment: str) -> list[int]:
    out = subprocess.run(["pgrep", "-f", f"ServeReplica:flux2-accel:{deployment}$"], capture_output=True, text=True)
    return [int(pid) for pid in out.stdout.split()]


def test_a_replica_killed_mid_request_gives_503_then_serves_again(server):
    (pid,) = replica_pids("Generator:queue")
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(server.post_json, "/v1/images/generations",
                              {"model": "queue", "prompt": "killed", "size": "512x512", "steps": 200})
        time.sleep(2.0)  # the request is running in the replica
        os.kill(pid, signal.SIGKILL)
        status, _, body = pending.result(timeout=120)
    assert status == 503 and "stopped" in body["error"]["message"], body
    deadline = time.monotonic() + 90
    while True:
        status, _, body = server.post_json("/v1/images/generations", {"model": "queue", "prompt": "again"})
        if status == 200:
            break
        assert status == 503 and time.monotonic() < deadline, body
        time.sleep(1.0)
    assert png(body["data"][0]["b64_json"]).size == (64, 64)
    assert replica_pids("Generator:queue") != [pid]


def test_ctrl_c_finishes_the_running_request_then_exits(server):
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(server.post_json, "/v1/images/generations",
                              {"model": "flux2-demo", "prompt": "last", "size": "512x512", "steps": 120})
        time.sleep(1.5)
        server.process.send_signal(signal.SIGINT)
        status, _, body = pending.result(timeout=120)
    assert status == 200 and png(body["data"][0]["b64_json"]).size == (512, 512)
    assert server.process.wait(60) == 0
    assert any("stopping" in line for line in server.lines)
