"""The native-MODEL nodes (step cache, regional compile) on ComfyUI's own FLUX.2 model, in a real ComfyUI over HTTP.

Runs when COMFYUI_DIR points at a ComfyUI checkout (COMFYUI_PYTHON: its interpreter). ComfyUI 0.8 cannot detect a
small FLUX.2 file, so a TEST-ONLY custom node folder (tests/comfyui_test_nodes, linked into this ComfyUI's
custom_nodes by the fixture, never part of the pack) builds ComfyUI's Flux2 model from its classes with seeded
random weights, and a text CONDITIONING of the right width. Sampling: ComfyUI's KSampler and
SamplerCustomAdvanced; latents saved with SaveLatent and compared here.
"""

from __future__ import annotations

import asyncio
import json
import re
import struct
import time
from pathlib import Path

import pytest

from comfyui_harness import ROOT, comfyui_base, get_json, needs_comfyui, running_comfyui

TEST_NODES = ROOT / "tests" / "comfyui_test_nodes" / "flux2_accel_native_test_nodes"
pytestmark = needs_comfyui
TEXT_EVENT = 3  # ComfyUI's BinaryEventTypes.TEXT (progress text shown on a node)
HIDDEN = 64  # FLUX2_TINY in the test nodes


def write_native_lora(path: Path) -> None:
    """A ComfyUI-format LoRA over attention layers of both block kinds of the tiny model (hidden 64, 2 + 3 blocks)."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(3)
    shapes = {}
    for i in range(2):
        for stream in ("img", "txt"):
            shapes[f"double_blocks.{i}.{stream}_attn.qkv"] = (3 * HIDDEN, HIDDEN)
            shapes[f"double_blocks.{i}.{stream}_attn.proj"] = (HIDDEN, HIDDEN)
    for i in range(3):
        shapes[f"single_blocks.{i}.linear2"] = (HIDDEN, HIDDEN + 3 * HIDDEN)
    tensors = {}
    for name, (out_features, in_features) in shapes.items():
        tensors[f"diffusion_model.{name}.lora_down.weight"] = torch.randn(2, in_features, generator=g) * 0.5
        tensors[f"diffusion_model.{name}.lora_up.weight"] = torch.randn(out_features, 2, generator=g) * 0.5
        tensors[f"diffusion_model.{name}.alpha"] = torch.tensor(2.0)
    save_file(tensors, str(path))


@pytest.fixture(scope="module")
def comfyui(tmp_path_factory):
    base = comfyui_base(tmp_path_factory, "comfy_native", (TEST_NODES,))
    (base / "models" / "loras").mkdir(parents=True)
    write_native_lora(base / "models" / "loras" / "tiny_native_style.safetensors")
    # pytorch attention: ComfyUI's CPU default (sub-quadratic) asks for free memory inside the blocks, which no
    # compile can trace; on GPUs ComfyUI uses pytorch attention anyway.
    with running_comfyui(base, extra_args=("--use-pytorch-cross-attention",)) as (url, log_path, _):
        yield url, base, log_path


def run_prompt(url, log_path, graph, timeout=300, expect_success=True) -> tuple[dict, list]:
    """Queue `graph` with a websocket open; returns its history entry and the (node id, text) progress texts."""
    import aiohttp

    client_id = f"flux2-accel-native-{time.time_ns()}"
    texts = []

    async def go():
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(f"{url.replace('http', 'ws')}/ws?clientId={client_id}") as ws:
                async with session.post(url + "/prompt", json={"prompt": graph, "client_id": client_id}) as r:
                    body = await r.json()
                    assert r.status == 200, body
                prompt_id = body["prompt_id"]
                deadline = time.time() + timeout
                while time.time() < deadline:
                    msg = await ws.receive(timeout=timeout)
                    if msg.type == aiohttp.WSMsgType.BINARY:
                        event = struct.unpack(">I", msg.data[:4])[0]
                        if event == TEXT_EVENT:
                            size = struct.unpack(">I", msg.data[4:8])[0]
                            texts.append((msg.data[8:8 + size].decode(), msg.data[8 + size:].decode()))
                    elif msg.type == aiohttp.WSMsgType.TEXT:
                        data = json.loads(msg.data)
                        if data["type"] in ("execution_success", "execution_error", "execution_interrupted") and \
                                data["data"].get("prompt_id") == prompt_id:
                            return prompt_id
                    else:
                        break
                pytest.fail(f"prompt did not finish; log:\n{log_path.read_text()[-3000:]}")

    prompt_id = asyncio.run(go())
    for _ in range(30):
        history = get_json(url + f"/history/{prompt_id}")
        if prompt_id in history:
            break
        time.sleep(0.5)
    entry = history[prompt_id]
    if expect_success:
        assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[-3000:]
    return entry, texts


def graph_for(cache=None, compile_backend=None, lora=None, lora_after_compile=False, seed=1, steps=4, cfg=2.0,
              sampler="ksampler", model_node="Flux2AccelTestNativeFlux2Model", sampler_name="euler",
              start_percent=0.0, reference=False, lora_after_cache=None):
    """TestModel -> [LoRA] -> [compile] -> [step cache] -> [LoRA] -> KSampler / SamplerCustomAdvanced ->
    SaveLatent; `reference`: a ReferenceLatent (a 32x32 empty latent) on the positive conditioning."""
    g = {
        "1": {"class_type": model_node, "inputs": {"config": "tiny", "seed": 0}}
        if model_node == "Flux2AccelTestNativeFlux2Model" else {"class_type": model_node, "inputs": {}},
        "2": {"class_type": "Flux2AccelTestConditioning", "inputs": {"width": 192, "tokens": 8, "seed": 1}},
        "3": {"class_type": "Flux2AccelTestConditioning", "inputs": {"width": 192, "tokens": 8, "seed": 2}},
        "4": {"class_type": "FluxGuidance", "inputs": {"conditioning": ["2", 0], "guidance": 4.0}},
        "5": {"class_type": "EmptyFlux2LatentImage", "inputs": {"width": 64, "height": 48, "batch_size": 2}},
    }
    model = ["1", 0]

    def add_lora(model):
        g["10"] = {"class_type": "LoraLoaderModelOnly", "inputs": {"model": model, "lora_name":
                                                                   "tiny_native_style.safetensors",
                                                                   "strength_model": lora}}
        return ["10", 0]

    if lora is not None and not lora_after_compile:
        model = add_lora(model)
    if compile_backend is not None:
        g["11"] = {"class_type": "Flux2AccelNativeCompile", "inputs": {"model": model, "mode": "default",
                                                                      "dynamic": "auto", "fullgraph": False,
                                                                      "backend": compile_backend}}
        model = ["11", 0]
    if lora is not None and lora_after_compile:
        model = add_lora(model)
    if cache is not None:
        method, threshold = cache
        g["12"] = {"class_type": "Flux2AccelNativeStepCache",
                   "inputs": {"model": model, "method": method, "threshold": threshold,
                              "start_percent": start_percent,
                              "end_percent": 1.0, "max_consecutive_cached": 3, "warmup_steps": 1,
                              "teacache_coefficients": ""}}
        model = ["12", 0]
    if lora_after_cache is not None:
        g["13"] = {"class_type": "LoraLoaderModelOnly", "inputs": {"model": model, "lora_name":
                                                                   "tiny_native_style.safetensors",
                                                                   "strength_model": lora_after_cache}}
        model = ["13", 0]
    if reference:
        g["14"] = {"class_type": "EmptyFlux2LatentImage", "inputs": {"width": 32, "height": 32, "batch_size": 1}}
        g["15"] = {"class_type": "ReferenceLatent", "inputs": {"conditioning": ["2", 0], "latent": ["14", 0]}}
        g["4"]["inputs"]["conditioning"] = ["15", 0]
    if sampler == "ksampler":
        g["6"] = {"class_type": "KSampler", "inputs": {"model": model, "positive": ["4", 0], "negative": ["3", 0],
                                                        "latent_image": ["5", 0], "seed": seed, "steps": steps,
                                                        "cfg": cfg, "sampler_name": sampler_name, "scheduler": "simple",
                                                        "denoise": 1.0}}
        latent = ["6", 0]
    else:
        g.update({
            "20": {"class_type": "CFGGuider", "inputs": {"model": model, "positive": ["4", 0], "negative": ["3", 0],
                                                         "cfg": cfg}},
            "21": {"class_type": "RandomNoise", "inputs": {"noise_seed": seed}},
            "22": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": sampler_name}},
            "23": {"class_type": "BasicScheduler", "inputs": {"model": model, "scheduler": "simple", "steps": steps,
                                                              "denoise": 1.0}},
            "24": {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["21", 0], "guider": ["20", 0],
                                                                     "sampler": ["22", 0], "sigmas": ["23", 0],
                                                                     "latent_image": ["5", 0]}},
        })
        latent = ["24", 0]
    g["7"] = {"class_type": "SaveLatent", "inputs": {"samples": latent, "filename_prefix": "native"}}
    return g


def saved_latent(base: Path, entry: dict):
    from safetensors.torch import load_file

    saved = entry["outputs"]["7"]["latents"][0]
    return load_file(str(base / "output" / saved.get("subfolder", "") / saved["filename"]))["latent_tensor"]


def log_lines_since(log_path: Path, offset: int, pattern: str) -> list[str]:
    return [line for line in log_path.read_text()[offset:].splitlines() if re.search(pattern, line)]


@pytest.mark.parametrize("sampler", ["ksampler", "custom_advanced"])
def test_cache_at_threshold_zero_and_never_skipping_gives_the_plain_latent(comfyui, sampler):
    import torch

    url, base, log_path = comfyui
    plain = saved_latent(base, run_prompt(url, log_path, graph_for(sampler=sampler))[0])
    off = saved_latent(base, run_prompt(url, log_path, graph_for(("fbcache", 0.0), sampler=sampler))[0])
    offset = len(log_path.read_text())
    never = saved_latent(base, run_prompt(url, log_path, graph_for(("teacache", 0.001), sampler=sampler,
                                                                   cfg=2.0))[0])
    assert plain.shape == (2, 128, 3, 4) and torch.isfinite(plain).all()
    assert torch.equal(plain, off)
    stats = log_lines_since(log_path, offset, r"step cache \(native MODEL\): teacache")
    assert stats and "skipped 0 of" in stats[-1], stats
    assert torch.equal(plain, never)


@pytest.mark.parametrize("sampler", ["ksampler", "custom_advanced"])
def test_skipping_threshold_skips_and_reports_on_the_node_and_in_the_log(comfyui, sampler):
    import torch

    url, base, log_path = comfyui
    plain = saved_latent(base, run_prompt(url, log_path, graph_for(sampler=sampler, steps=6))[0])
    offset = len(log_path.read_text())
    entry, texts = run_prompt(url, log_path, graph_for(("fbcache", 5.0), sampler=sampler, steps=6))
    cached = saved_latent(base, entry)
    lines = log_lines_since(log_path, offset, r"step cache \(native MODEL\): fbcache")
    assert lines, log_path.read_text()[-3000:]
    computed, skipped, total = map(int, re.search(r"computed (\d+), skipped (\d+) of (\d+)", lines[-1]).groups())
    # CFG batched: two branches per step; warmup 1 and at most 3 in a row: C S S S C S per branch
    assert (computed, skipped, total) == (4, 8, 12)
    on_node = [text for node, text in texts if node == "12"]
    assert on_node and "skipped_steps=8" in on_node[-1] and "computed_steps=4" in on_node[-1], texts
    assert torch.isfinite(cached).all() and not torch.equal(cached, plain)


def test_cache_with_a_reference_latent_and_a_lora_after_it(comfyui):
    """ReferenceLatent on the positive conditioning and ComfyUI's LoRA loader after the cache node: at threshold 0
    the latent is the uncached one bit for bit; at a skipping threshold steps are skipped, and the reference still
    conditions the result."""
    import torch

    url, base, log_path = comfyui
    plain = saved_latent(base, run_prompt(url, log_path, graph_for(reference=True, lora_after_cache=0.7))[0])
    no_reference = saved_latent(base, run_prompt(url, log_path, graph_for(lora_after_cache=0.7))[0])
    assert not torch.equal(plain, no_reference)
    off = saved_latent(base, run_prompt(url, log_path, graph_for(("fbcache", 0.0), reference=True,
                                                                 lora_after_cache=0.7))[0])
    assert torch.equal(off, plain)
    for method in ("fbcache", "teacache"):
        entry, texts = run_prompt(url, log_path, graph_for((method, 5.0), reference=True, lora_after_cache=0.7,
                                                           steps=6))
        on_node = "\n".join(text for node, text in texts if node == "12")
        skipped = int(re.search(r"skipped_steps=(\d+)", on_node).group(1))
        # fbcache: the limits decide (C S S S C S per branch, two branches); teacache's signal skips some
        assert skipped == 8 if method == "fbcache" else skipped > 0, on_node
        cached = saved_latent(base, entry)
        assert torch.isfinite(cached).all() and cached.shape == plain.shape


def test_a_two_call_sampler_counts_the_window_in_steps(comfyui):
    """heun calls the model at sigma_i and sigma_i+1 for each of 6 steps but the last (11 calls per branch, at
    steps 0 1 1 2 2 3 3 4 4 5 5). With start_percent 0.5, the first call that may skip is the first one at step 3
    (the 6th call), not the 4th call; then at most 3 in a row."""
    url, base, log_path = comfyui
    entry, texts = run_prompt(url, log_path, graph_for(("fbcache", 5.0), steps=6, sampler_name="heun",
                                                       start_percent=0.5))
    on_node = "\n".join(text for node, text in texts if node == "12")
    assert "cond: CCCCCSSSCSS" in on_node and "uncond: CCCCCSSSCSS" in on_node, on_node


def test_native_lora_strength_changes_under_compile_recompile_nothing(comfyui):
    """Compile + step cache with a native LoRA: after the first prompt compiled, changing the LoRA strength,
    removing it, placing it after the compile node, and changing prompt seed, steps and cache threshold compile no
    graph (dynamo's graph counter, reported per run by the node)."""
    import torch

    url, base, log_path = comfyui
    runs = [dict(lora=0.5), dict(lora=1.0), dict(lora=None), dict(lora=0.8, lora_after_compile=True),
            dict(lora=0.8, seed=7), dict(lora=0.8, steps=3), dict(lora=0.8, cache=("fbcache", 0.3))]
    latents, compile_lines = [], []
    for changes in runs:
        options = {"cache": ("fbcache", 0.05), "compile_backend": "eager", **changes}
        offset = len(log_path.read_text())
        entry, _ = run_prompt(url, log_path, graph_for(**options))
        latents.append(saved_latent(base, entry))
        lines = log_lines_since(log_path, offset, r"\(native MODEL\) compile: ")
        assert lines, log_path.read_text()[-3000:]
        compile_lines.append(lines[-1])
    assert "graphs=0" not in compile_lines[0] and "fallback=None" in compile_lines[0], compile_lines[0]
    for line in compile_lines[1:]:
        assert "graphs=0" in line and "recompiles=0" in line, compile_lines
    assert not torch.equal(latents[0], latents[1]) and not torch.equal(latents[1], latents[2])  # LoRA applied


def test_a_model_that_is_not_flux2_is_refused_and_the_next_prompt_works(comfyui):
    url, base, log_path = comfyui
    entry, _ = run_prompt(url, log_path, graph_for(("fbcache", 0.1), model_node="Flux2AccelTestOtherModel"),
                          expect_success=False)
    assert entry["status"]["status_str"] == "error"
    errors = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert errors and errors[0]["node_type"] == "Flux2AccelNativeStepCache", errors
    message = errors[0]["exception_message"]
    assert "FLUX.2" in message and "holding Flux " in message, message
    run_prompt(url, log_path, graph_for(("fbcache", 0.1)))


def test_native_workflow_matches_this_comfyuis_node_definitions(comfyui):
    """The generated native FLUX.2 workflow uses only node classes, inputs and output types this ComfyUI defines."""
    url, _, log_path = comfyui
    info = get_json(url + "/object_info", timeout=60)
    graph = json.loads((ROOT / "workflows" / "flux2_native_t2i_fast_api.json").read_text())
    for node in graph.values():
        spec = info.get(node["class_type"])
        assert spec is not None, f"{node['class_type']} missing; log:\n{log_path.read_text()[-2000:]}"
        known = {**spec["input"].get("required", {}), **spec["input"].get("optional", {})}
        for name, value in node["inputs"].items():
            assert name in known, f"{node['class_type']} has no input {name}"
            if isinstance(value, list):
                source = info[graph[value[0]]["class_type"]]
                assert source["output"][value[1]] == known[name][0], (node["class_type"], name)
            elif isinstance(known[name][0], list) and name not in ("unet_name", "clip_name", "vae_name"):
                assert value in known[name][0], (node["class_type"], name, value)
