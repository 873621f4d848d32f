"""The bridges inside a real ComfyUI, over its HTTP API. Runs when COMFYUI_DIR points at a ComfyUI checkout.

ComfyUI runs with the pack and a test-only node folder (tests/comfyui_test_nodes: a tiny native CONDITIONING, since
ComfyUI's FLUX.2 CLIP loader only builds full-size Mistral 3), and with FLUX2_ACCEL_REMOTE_TOKEN in its environment
for the pack's own text-encoder server (`flux2-accel serve-text-encoder`), started on loopback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from comfyui_harness import (ROOT, comfyui_base, free_port, get_json, history_entry, needs_comfyui, post_json,
                             running_comfyui, stop, wait_until_serving)
from flux2_accel.optim.models import tiny
from test_comfyui_real import _run, _write_comfy_lora, place_tiny_dev_models

pytestmark = needs_comfyui
TOKEN = "bridge-tok-93c1d7"
MEDIUM = tiny.ComponentSpec(num_layers=1, num_single_layers=4, attention_head_dim=64, num_attention_heads=16)


@pytest.fixture(scope="module")
def bridged(tiny_models, tmp_path_factory):
    import torch
    from safetensors.torch import save_file

    base = comfyui_base(tmp_path_factory, "comfy_bridges",
                        (ROOT / "tests" / "comfyui_test_nodes" / "flux2_accel_test_nodes",))
    models = base / "models"
    place_tiny_dev_models(models, tiny_models)
    (models / "loras").mkdir()
    _write_comfy_lora(tiny_models.files["dev_comfy"], models / "loras" / "tiny_style.safetensors")
    # big enough (~190 MB in bf16) that freeing it shows in the process's resident memory
    medium = tiny.build_transformer(MEDIUM, seed=3, dtype=torch.bfloat16)
    save_file({k: v.contiguous() for k, v in medium.state_dict().items()},
              str(models / "diffusion_models" / "medium_flux2_dev.safetensors"))
    del medium
    python = sys.executable  # the encoder server is the pack's own command, from the Python running the tests
    # The token lives only in ComfyUI's environment; the loopback text-encoder server is a host it is bound to.
    env = {"FLUX2_ACCEL_REMOTE_TOKEN": TOKEN, "FLUX2_ACCEL_REMOTE_HOSTS": "127.0.0.1",
           "FLUX2_ACCEL_EMBEDDING_CACHE_DIR": str(base / "embeddings")}
    te_port = free_port()
    with open(base / "text_encoder.log", "w") as te_log:
        te = subprocess.Popen(
            [python, "-c", "import sys; from flux2_accel.optim.cli import main as cli; sys.exit(cli.main(sys.argv[1:]))",
             "serve-text-encoder", "--text-encoder", str(tiny_models.files["mistral_comfy"]), "--device", "cpu",
             "--host", "127.0.0.1", "--port", str(te_port)],
            stdout=te_log, stderr=subprocess.STDOUT, env={**os.environ, **env})
        try:
            with running_comfyui(base, env=env) as (url, log_path, proc):
                wait_until_serving(f"http://127.0.0.1:{te_port}/", te, base / "text_encoder.log",
                                   "the text encoder server")
                yield url, base, log_path, f"http://127.0.0.1:{te_port}/predict", proc.pid
        finally:
            stop(te)


def _queue_error(url, log_path, graph, timeout=240) -> dict:
    """Queue `graph`; it must fail at run time. Returns the execution_error message of its history."""
    prompt_id = post_json(url + "/prompt", {"prompt": graph, "client_id": "flux2-accel-test"})["prompt_id"]
    deadline = time.time() + timeout
    while time.time() < deadline:
        history = get_json(url + f"/history/{prompt_id}")
        if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
            break
        time.sleep(1)
    else:
        pytest.fail(f"prompt did not finish; log:\n{log_path.read_text()[-3000:]}")
    status = history[prompt_id]["status"]
    assert status["status_str"] == "error", json.dumps(status)[-2000:]
    errors = [m[1] for m in status["messages"] if m[0] == "execution_error"]
    assert errors, status
    return errors[0]


def _png(base, entry, node="9"):
    from PIL import Image

    saved = entry["outputs"][node]["images"][0]
    return Image.open(base / "output" / saved.get("subfolder", "") / saved["filename"])


def _native_graph(model_name="tiny_flux2_dev.safetensors", precision="bf16", positive=None, steps=2, width=64,
                  height=48) -> dict:
    """The pack's loader -> Model to ComfyUI -> KSampler (euler, simple) -> the pack's VAE decode -> SaveImage."""
    graph = {
        "1": {"class_type": "Flux2AccelLoadDiffusionModel",
              "inputs": {"model_name": model_name, "precision": precision, "offload": "none"}},
        "2": {"class_type": "Flux2AccelToModel", "inputs": {"model": ["1", 0]}},
        "3": {"class_type": "Flux2AccelLoadTextEncoder",
              "inputs": {"text_encoder_name": "tiny_mistral.safetensors", "precision": "bf16"}},
        "4": {"class_type": "Flux2AccelTextEncode", "inputs": {"text_encoder": ["3", 0], "prompt": "a red dog"}},
        "5": {"class_type": "Flux2AccelToConditioning", "inputs": {"conditioning": ["4", 0]}},
        "6": {"class_type": "Flux2AccelTestEmptyLatent", "inputs": {"channels": 16, "width": width, "height": height}},
        "7": {"class_type": "KSampler",
              "inputs": {"model": ["2", 0], "positive": positive or ["5", 0], "negative": positive or ["5", 0],
                         "latent_image": ["6", 0], "seed": 4, "steps": steps, "cfg": 1.0, "sampler_name": "euler",
                         "scheduler": "simple", "denoise": 1.0}},
        "8": {"class_type": "Flux2AccelVAEDecode", "inputs": {"vae": ["10", 0], "latent": ["7", 0]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "bridge"}},
        "10": {"class_type": "Flux2AccelLoadVAE", "inputs": {"vae_name": "tiny_flux2_vae.safetensors",
                                                             "dtype": "fp32"}},
    }
    return graph


def test_pack_model_through_ksampler_with_guidance_and_reference(bridged):
    """nf4 weights (bitsandbytes) through the MODEL bridge into KSampler; FluxGuidance and ReferenceLatent change
    the image, so both reach the pack's transformer."""
    url, base, log_path, _, _ = bridged
    plain_graph = _native_graph(precision="nf4")
    plain = _png(base, _run(url, log_path, plain_graph))
    assert plain.size == (64, 48)
    graph = _native_graph(precision="nf4")
    graph["11"] = {"class_type": "FluxGuidance", "inputs": {"conditioning": ["5", 0], "guidance": 9.0}}
    graph["7"]["inputs"]["positive"] = ["11", 0]
    guided = _png(base, _run(url, log_path, graph))
    assert guided.tobytes() != plain.tobytes()
    graph["12"] = {"class_type": "Flux2AccelVAEEncode", "inputs": {"vae": ["10", 0], "image": ["8", 0]}}
    graph["13"] = {"class_type": "ReferenceLatent", "inputs": {"conditioning": ["11", 0], "latent": ["12", 0]}}
    graph["14"] = {"class_type": "KSampler", "inputs": {**graph["7"]["inputs"], "positive": ["13", 0],
                                                        "negative": ["13", 0]}}
    graph["15"] = {"class_type": "Flux2AccelVAEDecode", "inputs": {"vae": ["10", 0], "latent": ["14", 0]}}
    graph["9"]["inputs"]["images"] = ["15", 0]
    referenced = _png(base, _run(url, log_path, graph))
    assert referenced.size == (64, 48) and referenced.tobytes() != guided.tobytes()


def _latent(base, entry, node):
    from safetensors.torch import load_file

    saved = entry["outputs"][node]["latents"][0]
    return load_file(str(base / "output" / saved.get("subfolder", "") / saved["filename"]))["latent_tensor"]


def test_pack_model_under_comfyuis_sampler_lands_where_the_pack_sampler_lands(bridged):
    """bf16 weights, same seed: the pack's sampler against the same model through the MODEL bridge into
    SamplerCustomAdvanced (euler, FluxGuidance 4, ComfyUI's Flux2Scheduler, which gives diffusers' FLUX.2 sigmas).
    Both keep the latents in float32 and draw the same float32 noise, so they land on the same latent (target: rel
    L2 <= 1e-3). KSampler's 'simple' scheduler is another schedule (ComfyUI's FLUX shift), hence matched sigmas."""
    import torch

    url, base, log_path, _, _ = bridged
    graph = _native_graph(steps=4)
    for node in ("7", "8", "9"):
        del graph[node]
    graph.update({
        "20": {"class_type": "Flux2AccelSampler",
               "inputs": {"model": ["1", 0], "vae": ["10", 0], "conditioning": ["4", 0], "width": 64, "height": 48,
                          "steps": 4, "guidance": 4.0, "seed": 4, "batch_size": 1}},
        "21": {"class_type": "SaveLatent", "inputs": {"samples": ["20", 1], "filename_prefix": "pack_sampler"}},
        "22": {"class_type": "FluxGuidance", "inputs": {"conditioning": ["5", 0], "guidance": 4.0}},
        "23": {"class_type": "BasicGuider", "inputs": {"model": ["2", 0], "conditioning": ["22", 0]}},
        "24": {"class_type": "RandomNoise", "inputs": {"noise_seed": 4}},
        "25": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "26": {"class_type": "Flux2Scheduler", "inputs": {"steps": 4, "width": 64, "height": 48}},
        "27": {"class_type": "SamplerCustomAdvanced",
               "inputs": {"noise": ["24", 0], "guider": ["23", 0], "sampler": ["25", 0], "sigmas": ["26", 0],
                          "latent_image": ["6", 0]}},
        "28": {"class_type": "SaveLatent", "inputs": {"samples": ["27", 0], "filename_prefix": "bridge_sampler"}},
    })
    entry = _run(url, log_path, graph)
    pack, bridge = _latent(base, entry, "21"), _latent(base, entry, "28")
    assert pack.shape == bridge.shape == (1, 16, 3, 4) and torch.isfinite(pack).all()
    rel = ((bridge.float() - pack.float()).norm() / pack.float().norm()).item()
    assert rel <= 1e-3, rel


def test_native_lora_loader_is_refused_with_a_pointer_to_the_lora_stack(bridged):
    url, base, log_path, _, _ = bridged
    graph = _native_graph()
    graph["11"] = {"class_type": "LoraLoaderModelOnly",
                   "inputs": {"model": ["2", 0], "lora_name": "tiny_style.safetensors", "strength_model": 1.0}}
    graph["7"]["inputs"]["model"] = ["11", 0]
    error = _queue_error(url, log_path, graph)
    assert error["node_type"] == "LoraLoaderModelOnly"
    assert "LoRA Stack (FLUX.2)" in error["exception_message"]


def test_remote_text_encode_feeds_comfyuis_sampler(bridged):
    """Remote Text Encode against the pack's own server (token from ComfyUI's environment) -> Conditioning to
    ComfyUI -> SamplerCustomAdvanced (BasicGuider, Flux2Scheduler, euler) on the bridged model."""
    url, base, log_path, te_url, _ = bridged
    graph = _native_graph()
    graph["4"] = {"class_type": "Flux2AccelRemoteTextEncode",
                  "inputs": {"prompt": "a red dog", "endpoint_url": te_url, "expects": "any (the sampler checks)",
                             "use_cache": False, "timeout": 60}}
    del graph["3"], graph["7"]
    graph.update({
        "20": {"class_type": "BasicGuider", "inputs": {"model": ["2", 0], "conditioning": ["5", 0]}},
        "21": {"class_type": "Flux2Scheduler", "inputs": {"steps": 2, "width": 64, "height": 48}},
        "22": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "23": {"class_type": "RandomNoise", "inputs": {"noise_seed": 4}},
        "24": {"class_type": "SamplerCustomAdvanced",
               "inputs": {"noise": ["23", 0], "guider": ["20", 0], "sampler": ["22", 0], "sigmas": ["21", 0],
                          "latent_image": ["6", 0]}},
    })
    graph["8"]["inputs"]["latent"] = ["24", 0]
    img = _png(base, _run(url, log_path, graph))
    assert img.size == (64, 48)
    assert TOKEN not in log_path.read_text()


def _pack_sampler_graph(tokens=12, width=96) -> dict:
    """A native CONDITIONING (test node, laid out as CLIPTextEncode lays out FLUX.2's) -> Conditioning to FLUX.2 ->
    the pack's sampler."""
    return {
        "1": {"class_type": "Flux2AccelLoadDiffusionModel",
              "inputs": {"model_name": "tiny_flux2_dev.safetensors", "precision": "bf16", "offload": "none"}},
        "2": {"class_type": "Flux2AccelTestNativeConditioning", "inputs": {"tokens": tokens, "width": width,
                                                                          "seed": 1}},
        "3": {"class_type": "Flux2AccelLoadVAE", "inputs": {"vae_name": "tiny_flux2_vae.safetensors",
                                                            "dtype": "fp32"}},
        "4": {"class_type": "Flux2AccelFromConditioning", "inputs": {"conditioning": ["2", 0]}},
        "5": {"class_type": "Flux2AccelSampler",
              "inputs": {"model": ["1", 0], "vae": ["3", 0], "conditioning": ["4", 0], "width": 64, "height": 48,
                         "steps": 2, "guidance": 4.0, "seed": 2, "batch_size": 1}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": "from_native"}},
    }


def test_native_conditioning_feeds_the_pack_sampler(bridged):
    url, base, log_path, _, _ = bridged
    img = _png(base, _run(url, log_path, _pack_sampler_graph()))
    assert img.size == (64, 48)


def test_wrong_width_is_refused_clearly_and_the_next_prompt_works(bridged):
    url, base, log_path, _, _ = bridged
    # native path: a width-64 CONDITIONING into the bridged [dev] model (width 96)
    graph = _native_graph(positive=["11", 0])
    graph["11"] = {"class_type": "Flux2AccelTestNativeConditioning", "inputs": {"tokens": 9, "width": 64,
                                                                                "seed": 0}}
    error = _queue_error(url, log_path, graph)
    assert error["node_type"] == "KSampler"
    assert "width 64" in error["exception_message"] and "expects width 96" in error["exception_message"]
    # the pack's path: the same conditioning into the pack's sampler
    error = _queue_error(url, log_path, _pack_sampler_graph(width=64))
    assert error["node_type"] == "Flux2AccelSampler"
    assert "width 64" in error["exception_message"] and "expects width 96" in error["exception_message"]
    assert _png(base, _run(url, log_path, _native_graph())).size == (64, 48)


def test_progress_and_cancel_through_comfyuis_sampler(bridged):
    """A bridged MODEL under KSampler reports every step on ComfyUI's websocket (node, value, max) and stops when
    the Cancel button (POST /interrupt) is pressed mid-run; the next prompt runs."""
    import asyncio
    import uuid

    import aiohttp

    url, base, log_path, _, _ = bridged
    steps = 60
    graph = _native_graph(model_name="medium_flux2_dev.safetensors", steps=steps, width=256, height=256)
    graph["3"]["inputs"]["text_encoder_name"] = "tiny_mistral.safetensors"
    graph["5"] = {"class_type": "Flux2AccelTestNativeConditioning",
                  "inputs": {"tokens": 8, "width": MEDIUM.transformer_config()["joint_attention_dim"], "seed": 0}}
    for node in ("3", "4"):
        del graph[node]
    client_id = uuid.uuid4().hex

    async def run_and_cancel():
        progress, events = [], []
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(url.replace("http", "ws", 1) + f"/ws?clientId={client_id}") as ws:
                async with session.post(url + "/prompt", json={"prompt": graph, "client_id": client_id}) as reply:
                    prompt_id = (await reply.json())["prompt_id"]
                async for message in ws:
                    if message.type != aiohttp.WSMsgType.TEXT:
                        continue
                    event = json.loads(message.data)
                    data = event.get("data", {})
                    if data.get("prompt_id") != prompt_id:
                        continue
                    events.append(event["type"])
                    if event["type"] == "progress":
                        progress.append((data["node"], data["value"], data["max"]))
                        if len(progress) == 3:
                            async with session.post(url + "/interrupt", json={}) as reply:
                                assert reply.status == 200
                    if event["type"] in ("execution_interrupted", "execution_success", "execution_error"):
                        return prompt_id, progress, events
        raise AssertionError("the websocket closed before the prompt ended")

    prompt_id, progress, events = asyncio.run(asyncio.wait_for(run_and_cancel(), 300))
    assert events[-1] == "execution_interrupted", events
    assert progress[:3] == [("7", 1, steps), ("7", 2, steps), ("7", 3, steps)], progress
    assert len(progress) < steps
    assert history_entry(url, prompt_id)["status"]["status_str"] == "error"
    assert _png(base, _run(url, log_path, _native_graph())).size == (64, 48)


@pytest.mark.parametrize("path", ["bridge", "pack_sampler"])
def test_consecutive_runs_keep_the_pack_s_models_loaded(bridged, path):
    """ComfyUI detaches every model it loads again at the start of a run (to re-seat it); that is no unload, so
    the pack keeps its loaded models (transformer, text encoder, VAE) from one prompt to the next: no release is
    logged across three prompts with new seeds."""
    url, base, log_path, _, _ = bridged
    graph = _native_graph() if path == "bridge" else _pack_sampler_graph()
    _run(url, log_path, graph)
    offset = len(log_path.read_text())
    for seed in (11, 12, 13):
        if path == "bridge":
            graph["7"]["inputs"]["seed"] = seed
        else:
            graph["5"]["inputs"]["seed"] = seed
        _run(url, log_path, graph)
    log = log_path.read_text()[offset:]
    assert "ComfyUI unloaded a pack model" not in log, log[-3000:]


def _free(url):
    request = urllib.request.Request(url + "/free", data=json.dumps({"unload_models": True, "free_memory": True})
                                     .encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as reply:
        assert reply.status == 200


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _medium_model_graph(path: str) -> dict:
    if path == "bridge":
        return _native_graph(model_name="medium_flux2_dev.safetensors", steps=1, width=32, height=32)
    graph = _pack_sampler_graph()
    graph["1"]["inputs"]["model_name"] = "medium_flux2_dev.safetensors"
    graph["2"]["inputs"]["width"] = MEDIUM.transformer_config()["joint_attention_dim"]
    graph["5"]["inputs"].update(steps=1, width=32, height=32)
    return graph


@pytest.mark.parametrize("path", ["bridge", "pack_sampler"])
def test_free_releases_the_pack_model(bridged, path):
    """POST /free {"unload_models": true, "free_memory": true} (the "Free model and node cache" button): ComfyUI
    unloads the pack's model, whether it ran through the MODEL bridge or the pack's own sampler (offload none), the
    pack's store lets go of it, and the process's resident memory drops by about the model's size."""
    url, base, log_path, _, pid = bridged
    _free(url)
    time.sleep(3)
    before = _rss_kib(pid)
    graph = _medium_model_graph(path)
    _run(url, log_path, graph)
    loaded = _rss_kib(pid)
    model_kib = (base / "models" / "diffusion_models" / "medium_flux2_dev.safetensors").stat().st_size // 1024
    assert loaded - before > 0.8 * model_kib, (before, loaded, model_kib)
    _free(url)
    deadline = time.time() + 30
    while time.time() < deadline and _rss_kib(pid) > loaded - 0.8 * model_kib:
        time.sleep(1)
    freed = loaded - _rss_kib(pid)
    assert freed > 0.8 * model_kib, (before, loaded, _rss_kib(pid), model_kib)
    # ComfyUI's prompt worker survived the unloading (the pack drops only its weights inside ComfyUI's unloading
    # loop), and the model loads again on the same path
    again = _native_graph() if path == "bridge" else _pack_sampler_graph()
    assert _png(base, _run(url, log_path, again)).size == (64, 48)


def test_a_bridged_model_unloaded_between_runs_loads_again(bridged):
    """ComfyUI unloads the bridged model (POST /free with unload_models only: its node outputs stay cached, as when
    ComfyUI makes room for another model); the same MODEL output then runs again, loading its base anew, and
    gives the same image as before the unload."""
    url, base, log_path, _, _ = bridged
    graph = _native_graph()
    graph["7"]["inputs"]["seed"] = 21
    before = _png(base, _run(url, log_path, graph)).tobytes()
    request = urllib.request.Request(url + "/free", data=json.dumps({"unload_models": True}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as reply:
        assert reply.status == 200
    graph["7"]["inputs"]["seed"] = 22  # only the sampler runs again; the bridge's MODEL comes from the cache
    _run(url, log_path, graph)
    graph["7"]["inputs"]["seed"] = 21
    assert _png(base, _run(url, log_path, graph)).tobytes() == before
