"""Shipped workflows agree with the pack's own node definitions, in both UI and API format."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from flux2_accel import NODE_CLASS_MAPPINGS

ROOT = Path(__file__).resolve().parents[1]
# Native ComfyUI nodes the workflows use, with the inputs and outputs they have in ComfyUI 0.8 (a list = a combo).
NATIVE = {"SaveImage": ({"images": "IMAGE", "filename_prefix": "STRING"}, []),
          "PreviewImage": ({"images": "IMAGE"}, []),
          "LoadImage": ({"image": ["<files in input/>"]}, ["IMAGE", "MASK"]),
          "ImageBatch": ({"image1": "IMAGE", "image2": "IMAGE"}, ["IMAGE"])}
SAMPLERS = ["euler", "euler_ancestral", "heun", "dpmpp_2m", "res_multistep"]  # a few of ComfyUI's
NATIVE.update({
    "KSampler": ({"model": "MODEL", "seed": "INT", "steps": "INT", "cfg": "FLOAT", "sampler_name": SAMPLERS,
                  "scheduler": ["simple", "normal", "karras", "beta"], "positive": "CONDITIONING",
                  "negative": "CONDITIONING", "latent_image": "LATENT", "denoise": "FLOAT"}, ["LATENT"]),
    "EmptyFlux2LatentImage": ({"width": "INT", "height": "INT", "batch_size": "INT"}, ["LATENT"]),
    "FluxGuidance": ({"conditioning": "CONDITIONING", "guidance": "FLOAT"}, ["CONDITIONING"]),
    "VAELoader": ({"vae_name": []}, ["VAE"]),
    "VAEDecode": ({"samples": "LATENT", "vae": "VAE"}, ["IMAGE"]),
    "UNETLoader": ({"unet_name": [], "weight_dtype": ["default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2"]},
                   ["MODEL"]),
    "BasicGuider": ({"model": "MODEL", "conditioning": "CONDITIONING"}, ["GUIDER"]),
    "Flux2Scheduler": ({"steps": "INT", "width": "INT", "height": "INT"}, ["SIGMAS"]),
    "KSamplerSelect": ({"sampler_name": SAMPLERS}, ["SAMPLER"]),
    "RandomNoise": ({"noise_seed": "INT"}, ["NOISE"]),
    "SamplerCustomAdvanced": ({"noise": "NOISE", "guider": "GUIDER", "sampler": "SAMPLER", "sigmas": "SIGMAS",
                               "latent_image": "LATENT"}, ["LATENT", "LATENT"]),
    "CLIPLoader": ({"clip_name": [], "type": ["flux2"], "device": ["default", "cpu"]}, ["CLIP"]),
    "CLIPTextEncode": ({"text": "STRING", "clip": "CLIP"}, ["CONDITIONING"]),
})
# Frontend-only nodes: in UI files only, never sent to the server.
FRONTEND_ONLY = {"Note": ({"text": "STRING"}, []), "MarkdownNote": ({"text": "STRING"}, [])}
# Combos filled from model folders (or ComfyUI's input/ folder): any file name is valid in a shipped workflow.
DYNAMIC_COMBOS = {"model_name", "text_encoder_name", "vae_name", "lora_name", "lora_1", "lora_2", "lora_3", "lora_4",
                  "image", "unet_name", "clip_name"}
# What the loaders read, and from which models/ folder: each workflow's canvas note must name both.
LOADER_FILES = {"Flux2AccelLoadDiffusionModel": ("model_name", "diffusion_models"),
                "Flux2AccelLoadTextEncoder": ("text_encoder_name", "text_encoders"),
                "Flux2AccelLoadVAE": ("vae_name", "vae")}


def _builder():
    spec = importlib.util.spec_from_file_location("build_workflows", ROOT / "scripts" / "build_workflows.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _inputs(class_type):
    if class_type in NATIVE or class_type in FRONTEND_ONLY:
        return {k: (v, {}) for k, v in {**NATIVE, **FRONTEND_ONLY}[class_type][0].items()}
    types = NODE_CLASS_MAPPINGS[class_type].INPUT_TYPES()
    return {k: (spec[0], spec[1] if len(spec) > 1 else {}) for section in ("required", "optional")
            for k, spec in types.get(section, {}).items()}


def _outputs(class_type):
    if class_type in NATIVE or class_type in FRONTEND_ONLY:
        return {**NATIVE, **FRONTEND_ONLY}[class_type][1]
    return list(NODE_CLASS_MAPPINGS[class_type].RETURN_TYPES)


def check_widget(class_type, name, value):
    kind, opts = _inputs(class_type)[name]
    where = f"{class_type}.{name}={value!r}"
    if isinstance(kind, list):
        if name in DYNAMIC_COMBOS:
            assert isinstance(value, str) and value, where
        else:
            assert value in kind, where
    elif kind == "INT":
        assert isinstance(value, int) and opts.get("min", value) <= value <= opts.get("max", value), where
        if "step" in opts and "min" in opts:
            assert (value - opts["min"]) % opts["step"] == 0 or value % opts["step"] == 0, where
    elif kind == "FLOAT":
        assert isinstance(value, (int, float)) and opts.get("min", value) <= value <= opts.get("max", value), where
    elif kind in ("STRING", "BOOLEAN"):
        assert isinstance(value, str if kind == "STRING" else bool), where
    else:
        raise AssertionError(f"{where}: {kind} is a socket, not a widget")


def api_files():
    return sorted((ROOT / "workflows").glob("*_api.json"))


def ui_files():
    return sorted(p for d in ("workflows", "example_workflows") for p in (ROOT / d).glob("*.json")
                  if not p.name.endswith("_api.json"))


def test_workflows_exist_in_both_formats():
    names = {p.stem for p in ui_files() if p.parent.name == "workflows"}
    assert "flux2_t2i" in names
    assert {p.stem[:-4] for p in api_files()} == names
    assert {p.name for p in (ROOT / "example_workflows").glob("*.json")} == {f"{n}.json" for n in names}


def test_generated_files_are_current():
    for path, text in _builder().render().items():
        assert path.read_text() == text, f"{path.name} drifted from scripts/build_workflows.py; run it"


@pytest.mark.parametrize("path", api_files(), ids=lambda p: p.name)
def test_api_workflow_is_valid(path):
    graph = json.loads(path.read_text())
    for nid, node in graph.items():
        ct = node["class_type"]
        assert ct in NODE_CLASS_MAPPINGS or ct in NATIVE, f"unknown node type {ct}"
        spec = _inputs(ct)
        required = NODE_CLASS_MAPPINGS[ct].INPUT_TYPES()["required"] if ct in NODE_CLASS_MAPPINGS else spec
        assert set(required) <= set(node["inputs"]), f"{ct} lacks {set(required) - set(node['inputs'])}"
        for name, value in node["inputs"].items():
            assert name in spec, f"{ct} has no input {name}"
            if isinstance(value, list):  # a link [source id, output slot]
                src = graph[value[0]]["class_type"]
                assert _outputs(src)[value[1]] == spec[name][0], f"{src}[{value[1]}] -> {ct}.{name}"
            else:
                check_widget(ct, name, value)


@pytest.mark.parametrize("path", ui_files(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_ui_workflow_is_valid(path):
    wf = json.loads(path.read_text())
    nodes = {n["id"]: n for n in wf["nodes"]}
    for n in wf["nodes"]:
        ct = n["type"]
        spec = _inputs(ct)
        linked = {i["name"] for i in n["inputs"]}
        widget_names = [k for k, (kind, _) in spec.items()
                        if k not in linked and (isinstance(kind, list) or kind in ("INT", "FLOAT", "STRING", "BOOLEAN"))]
        values = list(n["widgets_values"])
        for name in widget_names:
            check_widget(ct, name, values.pop(0))
            if name in ("seed", "noise_seed"):
                assert values.pop(0) in ("fixed", "increment", "decrement", "randomize")
            if ct == "LoadImage" and name == "image":
                assert values.pop(0) == "image"  # the frontend's upload button
        assert values == [], f"{ct}: extra widget values {values}"
    for link_id, src, src_slot, dst, dst_slot, typ in wf["links"]:
        src_type = _outputs(nodes[src]["type"])[src_slot]
        dst_input = nodes[dst]["inputs"][dst_slot]
        assert src_type == typ == _inputs(nodes[dst]["type"])[dst_input["name"]][0] and dst_input["link"] == link_id


NEW_WORKFLOWS = {"flux2_edit_two_references", "flux2_klein_4b_distilled", "flux2_klein_base_negative",
                 "flux2_lora_stack", "flux2_low_vram_nf4", "flux2_remote_text_encode"}


def _api(name):
    return json.loads((ROOT / "workflows" / f"{name}_api.json").read_text())


def _only(graph, class_type):
    found = [nid for nid, node in graph.items() if node["class_type"] == class_type]
    assert len(found) == 1, (class_type, found)
    return graph[found[0]]


def test_every_feature_workflow_ships():
    names = {p.stem for p in ui_files() if p.parent.name == "workflows"}
    assert {"flux2_t2i", "flux2_t2i_fast"} | NEW_WORKFLOWS <= names


@pytest.mark.parametrize("path", ui_files(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_canvas_notes_name_every_file_and_its_folder(path):
    """Each UI workflow carries a note naming every model file its loaders pick and the models/ folder it goes in;
    the notes exist only on the canvas, never in the API file."""
    wf = json.loads(path.read_text())
    notes = [n for n in wf["nodes"] if n["type"] in FRONTEND_ONLY]
    assert notes, f"{path.name} has no note on the canvas"
    text = "\n".join(n["widgets_values"][0] for n in notes)
    for node in wf["nodes"]:
        if node["type"] in LOADER_FILES:
            field, folder = LOADER_FILES[node["type"]]
            file_name = node["widgets_values"][list(_inputs(node["type"])).index(field)]
            assert f"`{file_name}` | `models/{folder}/`" in text, (path.name, file_name)
    assert len({n["id"] for n in wf["nodes"]}) == len(wf["nodes"]) and wf["last_node_id"] == max(
        n["id"] for n in wf["nodes"])
    api = _api(path.stem)
    assert not {node["class_type"] for node in api.values()} & set(FRONTEND_ONLY)
    assert {str(n["id"]) for n in wf["nodes"] if n["type"] not in FRONTEND_ONLY} == set(api)


def test_feature_workflows_wire_what_their_names_say():
    edit = _api("flux2_edit_two_references")
    batch = _only(edit, "ImageBatch")["inputs"]
    assert {edit[batch[k][0]]["class_type"] for k in ("image1", "image2")} == {"LoadImage"}
    assert batch["image1"][0] != batch["image2"][0]
    assert edit[_only(edit, "Flux2AccelSampler")["inputs"]["reference_images"][0]]["class_type"] == "ImageBatch"

    distilled = _api("flux2_klein_4b_distilled")
    assert _only(distilled, "Flux2AccelSampler")["inputs"]["steps"] == 4
    assert "klein" in _only(distilled, "Flux2AccelLoadDiffusionModel")["inputs"]["model_name"]
    assert not any(n["class_type"] == "Flux2AccelStepCache" for n in distilled.values())

    base = _api("flux2_klein_base_negative")
    sampler = _only(base, "Flux2AccelSampler")["inputs"]
    positive, negative = base[sampler["conditioning"][0]], base[sampler["negative"][0]]
    assert positive["class_type"] == negative["class_type"] == "Flux2AccelTextEncode"
    assert positive["inputs"]["prompt"] != negative["inputs"]["prompt"] and sampler["guidance"] > 1.0
    assert "base" in _only(base, "Flux2AccelLoadDiffusionModel")["inputs"]["model_name"]

    lora = _api("flux2_lora_stack")
    stack = _only(lora, "Flux2AccelLoraStack")["inputs"]
    assert "None" not in (stack["lora_1"], stack["lora_2"]) and stack["lora_1"] != stack["lora_2"]
    assert lora[_only(lora, "Flux2AccelSampler")["inputs"]["model"][0]]["class_type"] == "Flux2AccelLoraStack"

    low = _api("flux2_low_vram_nf4")
    assert _only(low, "Flux2AccelLoadDiffusionModel")["inputs"]["precision"] == "nf4"
    assert _only(low, "Flux2AccelLoadDiffusionModel")["inputs"]["offload"] == "model_cpu"
    assert _only(low, "Flux2AccelLoadTextEncoder")["inputs"]["precision"] == "nf4"

    remote = _api("flux2_remote_text_encode")
    assert not any(n["class_type"] == "Flux2AccelLoadTextEncoder" for n in remote.values())
    conditioning = _only(remote, "Flux2AccelSampler")["inputs"]["conditioning"][0]
    assert remote[conditioning]["class_type"] == "Flux2AccelRemoteTextEncode"
    assert not any("token" in key.lower() for node in remote.values() for key in node["inputs"])
