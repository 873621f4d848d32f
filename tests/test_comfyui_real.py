"""The pack inside a real ComfyUI, over its HTTP API. Runs when COMFYUI_DIR points at a ComfyUI checkout.

COMFYUI_PYTHON names the interpreter that has ComfyUI's requirements (default: the one running pytest).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from comfyui_harness import COMFYUI_DIR, ROOT, comfyui_base, get_json, needs_comfyui, post_json, running_comfyui
from flux2_accel import NODE_CLASS_MAPPINGS

pytestmark = needs_comfyui


def _write_comfy_lora(transformer_file: Path, path: Path, rank: int = 2, seed: int = 5) -> None:
    """A ComfyUI-format LoRA (diffusion_model.* lora_down / lora_up + alpha) over the tiny model's block layers."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    tensors = {}
    with safe_open(str(transformer_file), "pt") as f:
        for key in f.keys():
            if "blocks." in key and key.endswith(".weight") and len(f.get_slice(key).get_shape()) == 2:
                out_features, in_features = f.get_slice(key).get_shape()
                name = "diffusion_model." + key.removeprefix("model.diffusion_model.")[: -len(".weight")]
                tensors[f"{name}.lora_down.weight"] = torch.randn(rank, in_features, generator=g) * 0.5
                tensors[f"{name}.lora_up.weight"] = torch.randn(out_features, rank, generator=g) * 0.5
                tensors[f"{name}.alpha"] = torch.tensor(float(rank))
    save_file(tensors, str(path))


def _write_qwen3_for_comfy_tokenizer(qwen_file: Path, path: Path) -> None:
    """The tiny Qwen3 text encoder with its embedding grown to the vocabulary of the Qwen tokenizer ComfyUI ships
    (which the text-encoder loader uses for Qwen3 files inside ComfyUI): the first rows are the tiny model's own."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(Path(COMFYUI_DIR) / "comfy" / "text_encoders" / "qwen25_tokenizer"))
    sd = load_file(str(qwen_file))
    key = next(k for k in sd if k.endswith("embed_tokens.weight"))
    rows, width = sd[key].shape
    grown = torch.randn(max(vocab, rows), width, generator=torch.Generator().manual_seed(8)) * 0.02
    grown[:rows] = sd[key]
    sd[key] = grown
    save_file(sd, str(path))


def _write_reference_images(folder: Path) -> None:
    """Two different reference images for LoadImage, of different sizes (ImageBatch scales the second)."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for name, (w, h), seed in (("reference_1.png", (64, 64), 1), ("reference_2.png", (96, 80), 2)):
        pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / name)


# What the tiny models stand in for: the file names of the shipped workflows -> the fixture's files.
TINY_FILES = {
    "flux2_dev_fp8mixed.safetensors": "tiny_flux2_dev.safetensors",
    "flux2-dev.safetensors": "tiny_flux2_dev.safetensors",
    "flux-2-klein-4b.safetensors": "tiny_flux2_klein.safetensors",
    "flux-2-klein-base-4b.safetensors": "tiny_flux2_klein.safetensors",
    "mistral_3_small_flux2_fp8.safetensors": "tiny_mistral.safetensors",
    "mistral_3_small_flux2_bf16.safetensors": "tiny_mistral.safetensors",
    "qwen_3_4b.safetensors": "tiny_qwen3.safetensors",
    "flux2-vae.safetensors": "tiny_flux2_vae.safetensors",
    "my_style_lora.safetensors": "tiny_style.safetensors",
    "my_subject_lora.safetensors": "tiny_detail.safetensors",
}
# The remote text encoder ComfyUI is started for: the token and the loopback host it may go to (unless the
# environment names its own, as tests/test_remote.py does).
REMOTE_ENV = {"FLUX2_ACCEL_REMOTE_TOKEN": "tok-workflow-test-41c7", "FLUX2_ACCEL_REMOTE_HOSTS": "127.0.0.1"}


def _remote_env() -> dict:
    return {name: os.environ.get(name, default) for name, default in REMOTE_ENV.items()}


BAD_MODEL_FILES = {  # loader input -> (class, file name): each file is broken in its own way
    "model_name": ("Flux2AccelLoadDiffusionModel", "broken_header.safetensors"),
    "text_encoder_name": ("Flux2AccelLoadTextEncoder", "not_a_text_encoder.safetensors"),
    "vae_name": ("Flux2AccelLoadVAE", "truncated_vae.safetensors"),
}


def _write_bad_model_files(models: Path) -> None:
    """One bad file per loader: a header that is not JSON, a text encoder file holding an unrelated tensor, and a
    VAE whose data stops short of what its header promises."""
    import struct

    import torch
    from safetensors.torch import save_file

    header = b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]'  # cut mid-JSON
    (models / "diffusion_models" / BAD_MODEL_FILES["model_name"][1]).write_bytes(
        struct.pack("<Q", len(header)) + header + bytes(8))
    save_file({"some.other.weight": torch.zeros(4, 4)},
              str(models / "text_encoders" / BAD_MODEL_FILES["text_encoder_name"][1]))
    good_vae = (models / "vae" / "tiny_flux2_vae.safetensors").read_bytes()
    (models / "vae" / BAD_MODEL_FILES["vae_name"][1]).write_bytes(good_vae[: len(good_vae) // 2])


def place_tiny_dev_models(models: Path, tiny_models) -> None:
    """The tiny [dev] transformer, VAE and Mistral encoder (with its tokenizer folder) in ComfyUI's model folders,
    under the names the tests' graphs use."""
    for folder, label, name in (("diffusion_models", "dev_comfy", "tiny_flux2_dev.safetensors"),
                                ("vae", "vae_ldm", "tiny_flux2_vae.safetensors"),
                                ("text_encoders", "mistral_comfy", "tiny_mistral.safetensors")):
        (models / folder).mkdir(parents=True, exist_ok=True)
        shutil.copy(tiny_models.files[label], models / folder / name)
    shutil.copytree(tiny_models.root / "text_encoders" / "mistral_comfy_tokenizer",
                    models / "text_encoders" / "tiny_mistral_tokenizer")


@pytest.fixture(scope="module")
def comfyui(tiny_models, tmp_path_factory):
    base = comfyui_base(tmp_path_factory, "comfy_base")
    models = base / "models"
    place_tiny_dev_models(models, tiny_models)
    # [klein]: its transformer, and its Qwen3 encoder sized for the Qwen tokenizer ComfyUI ships.
    shutil.copy(tiny_models.files["klein_comfy"], models / "diffusion_models" / "tiny_flux2_klein.safetensors")
    _write_qwen3_for_comfy_tokenizer(tiny_models.files["qwen_comfy"],
                                     models / "text_encoders" / "tiny_qwen3.safetensors")
    _write_reference_images(base / "input")
    (models / "loras").mkdir()
    _write_comfy_lora(tiny_models.files["dev_comfy"], models / "loras" / "tiny_style.safetensors")
    _write_comfy_lora(tiny_models.files["dev_comfy"], models / "loras" / "tiny_detail.safetensors", seed=6)
    # A shared model store outside ComfyUI's folders, linked in the way users do: a folder and a file.
    (models / "diffusers").mkdir()
    os.symlink(tiny_models.files["dev_folder"], models / "diffusers" / "tiny_dev_linked", target_is_directory=True)
    os.symlink(tiny_models.files["dev_bfl"], models / "diffusion_models" / "tiny_dev_linked.safetensors")
    _write_bad_model_files(models)
    with running_comfyui(base, env=_remote_env()) as (url, log_path, proc):
        (base / "comfyui.pid").write_text(str(proc.pid))
        yield url, base, log_path


def test_object_info_lists_our_nodes(comfyui):
    url, _, log_path = comfyui
    info = get_json(url + "/object_info", timeout=60)
    missing = set(NODE_CLASS_MAPPINGS) - set(info)
    assert not missing, f"missing {missing}; log:\n{log_path.read_text()[-3000:]}"
    choices = info["Flux2AccelLoadDiffusionModel"]["input"]["required"]["model_name"][0]
    assert "tiny_flux2_dev.safetensors" in choices
    failed = [l for l in log_path.read_text().splitlines() if "IMPORT FAILED" in l and "flux2-accel" in l]
    assert not failed, failed


def test_example_workflows_are_served(comfyui):
    url, _, _ = comfyui
    templates = get_json(url + "/workflow_templates").get("flux2-accel", [])
    shipped = {p.stem for p in (ROOT / "example_workflows").glob("*.json")}
    assert {"flux2_t2i", "flux2_t2i_fast"} | FEATURE_WORKFLOWS <= shipped
    assert shipped <= set(templates)


def _tiny_graph(name: str = "flux2_t2i") -> dict:
    """A shipped API workflow on the tiny models (TINY_FILES), at 64x48 and 2 steps."""
    graph = json.loads((ROOT / "workflows" / f"{name}_api.json").read_text())
    for node in graph.values():
        inputs = node["inputs"]
        for field, value in inputs.items():
            if isinstance(value, str) and value in TINY_FILES:
                inputs[field] = TINY_FILES[value]
        if node["class_type"] == "Flux2AccelSampler":
            inputs.update(width=64, height=48, steps=2)
    return graph


def _run(url, log_path, graph, timeout=240, extra_data=None, expect_success=True) -> dict:
    """Queue `graph` over HTTP, wait for it, and return its history entry (it must have succeeded, unless
    `expect_success` is False)."""
    payload = {"prompt": graph, "client_id": "flux2-accel-test", **({"extra_data": extra_data} if extra_data else {})}
    prompt_id = post_json(url + "/prompt", payload)["prompt_id"]
    deadline = time.time() + timeout
    while time.time() < deadline:
        history = get_json(url + f"/history/{prompt_id}")
        if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
            break
        time.sleep(1)
    else:
        pytest.fail(f"prompt did not finish; log:\n{log_path.read_text()[-3000:]}")
    entry = history[prompt_id]
    if expect_success:
        assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[-3000:]
    return entry


def _execution_error(entry: dict) -> dict:
    """The execution_error message of a failed prompt's history entry."""
    assert entry["status"]["status_str"] == "error", json.dumps(entry["status"])[-2000:]
    errors = [data for kind, data in entry["status"]["messages"] if kind == "execution_error"]
    assert len(errors) == 1, entry["status"]["messages"]
    return errors[0]


def _saved_pixels(base: Path, entry: dict, node: str = "6") -> bytes:
    from PIL import Image

    saved = entry["outputs"][node]["images"][0]
    return Image.open(base / "output" / saved.get("subfolder", "") / saved["filename"]).tobytes()


def test_fast_workflow_reuses_compiled_code_across_prompts(comfyui):
    """The shipped fast workflow (loader -> step cache -> torch compile with inductor -> sampler), queued twice with
    a new seed and threshold: the second prompt compiles nothing, and the compile caches live in ComfyUI's user
    directory."""
    url, base, log_path = comfyui
    graph = _tiny_graph("flux2_t2i_fast")
    assert (graph["7"]["class_type"], graph["8"]["class_type"]) == ("Flux2AccelStepCache", "Flux2AccelCompile")
    stats = []
    for seed, threshold in ((1, 0.1), (2, 0.3)):
        graph["5"]["inputs"]["seed"] = seed
        graph["7"]["inputs"]["threshold"] = threshold
        entry = _run(url, log_path, graph, timeout=600)
        stats.append("\n".join(entry["outputs"]["5"]["flux2_stats"]))
    assert "compile: compiled=True" in stats[0] and "graphs=0" not in stats[0], stats[0]
    assert "fallback=None" in stats[0] and "cache: method=fbcache" in stats[0]
    assert "graphs=0" in stats[1] and "recompiles=0" in stats[1], stats[1]
    assert list((base / "user" / "flux2-accel" / "compile-cache" / "inductor").iterdir())


def test_api_workflow_produces_an_image(comfyui):
    url, base, log_path = comfyui
    entry = _run(url, log_path, _tiny_graph())
    images = entry["outputs"]["6"]["images"]
    from PIL import Image

    img = Image.open(base / "output" / images[0].get("subfolder", "") / images[0]["filename"])
    assert img.size == (64, 48)
    assert "flux2_stats" in entry["outputs"]["5"]


def test_lora_stack_strength_change_and_toggle(comfyui):
    """LoRA Stack between loader and sampler: the stats name the LoRA and its strength, a strength change changes
    the image, and a disabled slot gives exactly the image without any LoRA."""
    url, base, log_path = comfyui
    from PIL import Image

    def image_and_stats(lora=None):
        graph = _tiny_graph()
        graph["5"]["inputs"]["seed"] = 9
        if lora is not None:
            strength, enabled = lora
            graph["20"] = {"class_type": "Flux2AccelLoraStack",
                           "inputs": {"model": ["1", 0], "lora_1": "tiny_style.safetensors", "strength_1": strength,
                                      "enabled_1": enabled}}
            graph["5"]["inputs"]["model"] = ["20", 0]
        entry = _run(url, log_path, graph)
        saved = entry["outputs"]["6"]["images"][0]
        pixels = Image.open(base / "output" / saved.get("subfolder", "") / saved["filename"]).tobytes()
        return pixels, "\n".join(entry["outputs"]["5"]["flux2_stats"])

    plain, _ = image_and_stats()
    full, full_stats = image_and_stats((1.0, True))
    half, half_stats = image_and_stats((0.5, True))
    off, _ = image_and_stats((0.5, False))
    assert "tiny_style.safetensors x1'" in full_stats and "tiny_style.safetensors x0.5'" in half_stats
    assert "36/36" in full_stats  # every key of the file matched
    assert full != plain and half != full
    assert off == plain


def test_symlinked_model_folder_and_file_load(comfyui):
    """A diffusers folder and a single file that are symlinks into a store outside ComfyUI's folders are listed and
    load (the user placed the links); both hold the same weights as the copied file, so the images match it."""
    url, base, log_path = comfyui
    info = get_json(url + "/object_info/Flux2AccelLoadDiffusionModel")
    choices = info["Flux2AccelLoadDiffusionModel"]["input"]["required"]["model_name"][0]
    assert "[diffusers] tiny_dev_linked" in choices and "tiny_dev_linked.safetensors" in choices
    images = {}
    for name in ("tiny_flux2_dev.safetensors", "[diffusers] tiny_dev_linked", "tiny_dev_linked.safetensors"):
        graph = _tiny_graph()
        graph["1"]["inputs"].update(model_name=name, precision="bf16", offload="none")
        graph["5"]["inputs"]["seed"] = 3
        images[name] = _saved_pixels(base, _run(url, log_path, graph))
    assert images["[diffusers] tiny_dev_linked"] == images["tiny_flux2_dev.safetensors"]
    assert images["tiny_dev_linked.safetensors"] == images["tiny_flux2_dev.safetensors"]


@pytest.mark.parametrize("loader_input", sorted(BAD_MODEL_FILES))
def test_bad_model_file_fails_its_prompt_clearly_and_the_next_prompt_works(comfyui, loader_input):
    """Each loader, given a broken file: the prompt fails with the pack's error type and a message naming the file,
    no traceback of ours reaches the log as an unexpected error, and a good prompt right after still works."""
    url, base, log_path = comfyui
    class_type, bad_name = BAD_MODEL_FILES[loader_input]
    graph = _tiny_graph()
    node = next(k for k, v in graph.items() if v["class_type"] == class_type)
    graph[node]["inputs"][loader_input] = bad_name
    error = _execution_error(_run(url, log_path, graph, expect_success=False))
    assert error["node_type"] == class_type or error["node_id"] in graph, error
    assert error["exception_type"].rsplit(".", 1)[-1] in ("ModelFileError", "InputError", "Flux2AccelError"), error
    assert bad_name in error["exception_message"], error["exception_message"]
    _run(url, log_path, _tiny_graph())


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_thirty_prompts_do_not_grow_the_server(comfyui):
    """30 prompts with varied seeds after a warm-up: the server's resident memory grows less than 5%."""
    url, base, log_path = comfyui
    pid = int((base / "comfyui.pid").read_text())
    graph = _tiny_graph()
    for seed in range(3):  # warm-up: loads, first allocations, allocator pools
        graph["5"]["inputs"]["seed"] = seed
        _run(url, log_path, graph)
    before = _rss_bytes(pid)
    for seed in range(100, 130):
        graph["5"]["inputs"]["seed"] = seed
        _run(url, log_path, graph)
    after = _rss_bytes(pid)
    assert after < before * 1.05, f"RSS grew from {before / 2**20:.1f} MiB to {after / 2**20:.1f} MiB"


# ---------------------------------------------------------------- every feature workflow, queued as shipped

FEATURE_WORKFLOWS = {"flux2_edit_two_references", "flux2_klein_4b_distilled", "flux2_klein_base_negative",
                     "flux2_lora_stack", "flux2_low_vram_nf4", "flux2_remote_text_encode", "flux2_multi_gpu"}


def _queue_feature_workflow(url, log_path, name, graph, tiny_models):
    """Queue `graph` (the tiny form of workflow `name`); the remote workflow gets the pack's own server on loopback,
    holding the token ComfyUI was started with, serving the tiny Mistral encoder."""
    if name != "flux2_remote_text_encode":
        return _run(url, log_path, graph), None
    from aiohttp import web  # noqa: F401  (the server's dependency: a clear skip reason if missing)
    from flux2_accel.optim.models import tiny
    from flux2_accel.optim.models.text_encoding import TextEncoder
    from flux2_accel.optim.serve.remote.server import STATS_KEY, create_app
    from test_remote import LoopbackServer

    encoder = TextEncoder(tiny_models.dev.text_encoder, tiny_models.dev.tokenizer, "mistral",
                          tiny.TINY.text_out_layers, identity="tiny-mistral")
    app = create_app(encoder, token=_remote_env()["FLUX2_ACCEL_REMOTE_TOKEN"])
    with LoopbackServer(app) as server:
        remote = next(n for n in graph.values() if n["class_type"] == "Flux2AccelRemoteTextEncode")["inputs"]
        remote.update(endpoint_url=server.url, expects="any (the sampler checks)", use_cache=False)
        entry = _run(url, log_path, graph)
    return entry, app[STATS_KEY]


def _without(graph: dict, class_type: str, link: str) -> dict:
    """`graph` with the sampler's optional input `link` unplugged (and the node it came from left unused)."""
    graph = json.loads(json.dumps(graph))
    sampler = next(n for n in graph.values() if n["class_type"] == "Flux2AccelSampler")
    assert graph[sampler["inputs"].pop(link)[0]]["class_type"] == class_type
    return graph


@pytest.mark.parametrize("name", sorted(FEATURE_WORKFLOWS))
def test_feature_workflow_queued_over_http_yields_an_image(comfyui, tiny_models, name):
    """Each shipped feature workflow, as its API file says but on the tiny models: it runs in ComfyUI and saves an
    image of the asked size, and the feature it shows takes effect."""
    url, base, log_path = comfyui
    graph = _tiny_graph(name)
    entry, remote_stats = _queue_feature_workflow(url, log_path, name, graph, tiny_models)
    save = next(nid for nid, n in graph.items() if n["class_type"] == "SaveImage")
    sampler = next(nid for nid, n in graph.items() if n["class_type"] == "Flux2AccelSampler")
    from PIL import Image

    saved = entry["outputs"][save]["images"][0]
    image = Image.open(base / "output" / saved.get("subfolder", "") / saved["filename"])
    assert image.size == (64, 48)
    pixels = image.tobytes()
    stats = "\n".join(entry["outputs"][sampler]["flux2_stats"])
    if name == "flux2_edit_two_references":  # the references steer the image
        assert _saved_pixels(base, _run(url, log_path, _without(graph, "ImageBatch", "reference_images")),
                             save) != pixels
    elif name == "flux2_klein_base_negative":  # CFG with the negative prompt
        assert _saved_pixels(base, _run(url, log_path, _without(graph, "Flux2AccelTextEncode", "negative")),
                             save) != pixels
    elif name == "flux2_lora_stack":
        assert "tiny_style.safetensors x1" in stats and "tiny_detail.safetensors x0.8" in stats, stats
    elif name == "flux2_low_vram_nf4":  # 4-bit weights move the image off the bf16 one; model_cpu was asked for
        bf16 = json.loads(json.dumps(graph))
        for node in bf16.values():
            if node["class_type"] in ("Flux2AccelLoadDiffusionModel", "Flux2AccelLoadTextEncoder"):
                node["inputs"]["precision"] = "bf16"
        assert _saved_pixels(base, _run(url, log_path, bf16), save) != pixels
        assert "offload 'model_cpu' has no effect without a GPU" in log_path.read_text()
    elif name == "flux2_remote_text_encode":
        assert remote_stats["requests"] == 1 and remote_stats["refused"] == 0
    elif name == "flux2_multi_gpu":  # two Ray ranks inside ComfyUI's process tree, the one-device image
        assert "parallel: ulysses=2, ring=1, cfg=1, ranks=2" in stats, stats
        one_device = json.loads(json.dumps(graph))
        one_device[sampler]["inputs"]["model"] = graph[graph[sampler]["inputs"]["model"][0]]["inputs"]["model"]
        single = _saved_pixels(base, _run(url, log_path, one_device), save)
        one_device[sampler]["inputs"]["seed"] += 1
        other_seed = _saved_pixels(base, _run(url, log_path, one_device), save)
        mean_diff = lambda a, b: sum(abs(x - y) for x, y in zip(a, b)) / len(a)  # noqa: E731
        # fp8 weights and bf16 activations: the ranks' shorter matmuls round differently from one device's
        same, other = mean_diff(single, pixels), mean_diff(single, other_seed)
        assert len(single) == len(pixels) and same < 1.0 and other > 10 * max(same, 0.1), (same, other)
        # "Free model and node cache" (POST /free) tears the group down: its ranks exit
        assert _rank_processes(), "the group's ranks should be running before /free"
        request = urllib.request.Request(url + "/free", data=json.dumps({"unload_models": True}).encode(),
                                         headers={"Content-Type": "application/json"})
        urllib.request.urlopen(request, timeout=30).close()
        deadline = time.time() + 60
        while _rank_processes() and time.time() < deadline:
            time.sleep(0.5)
        assert not _rank_processes() and "ComfyUI unloaded the Parallel actor groups" in log_path.read_text()
        assert _saved_pixels(base, _run(url, log_path, graph), save) == pixels  # a new group, the same image


def _rank_processes() -> list[str]:
    """The Parallel group's Ray actors on this machine (Ray titles an actor's process ray::<class>)."""
    out = subprocess.run(["pgrep", "-f", "ray::Rank"], capture_output=True, text=True)
    return out.stdout.split()
