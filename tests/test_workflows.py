"""Shipped workflows agree with the pack's own node definitions, in both UI and API format."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from flux2_accel import NODE_CLASS_MAPPINGS

ROOT = Path(__file__).resolve().parents[1]
# Native ComfyUI nodes the workflows use, with the inputs and outputs they have in ComfyUI 0.8.
NATIVE = {"SaveImage": ({"images": "IMAGE", "filename_prefix": "STRING"}, []),
          "PreviewImage": ({"images": "IMAGE"}, []),
          # ComfyUI's own FLUX.2 text-to-image nodes (inputs in ComfyUI's order; combos list the values we use)
          "UNETLoader": ({"unet_name": ["*"], "weight_dtype": ["default", "fp8_e4m3fn", "fp8_e4m3fn_fast",
                                                                "fp8_e5m2"]}, ["MODEL"]),
          "CLIPLoader": ({"clip_name": ["*"], "type": ["flux2"], "device": ["default", "cpu"]}, ["CLIP"]),
          "VAELoader": ({"vae_name": ["*"]}, ["VAE"]),
          "CLIPTextEncode": ({"text": "STRING", "clip": "CLIP"}, ["CONDITIONING"]),
          "FluxGuidance": ({"conditioning": "CONDITIONING", "guidance": "FLOAT"}, ["CONDITIONING"]),
          "EmptyFlux2LatentImage": ({"width": "INT", "height": "INT", "batch_size": "INT"}, ["LATENT"]),
          "RandomNoise": ({"noise_seed": "INT"}, ["NOISE"]),
          "BasicGuider": ({"model": "MODEL", "conditioning": "CONDITIONING"}, ["GUIDER"]),
          "KSamplerSelect": ({"sampler_name": ["euler", "euler_ancestral", "dpmpp_2m"]}, ["SAMPLER"]),
          "Flux2Scheduler": ({"steps": "INT", "width": "INT", "height": "INT"}, ["SIGMAS"]),
          "SamplerCustomAdvanced": ({"noise": "NOISE", "guider": "GUIDER", "sampler": "SAMPLER", "sigmas": "SIGMAS",
                                     "latent_image": "LATENT"}, ["LATENT", "LATENT"]),
          "VAEDecode": ({"samples": "LATENT", "vae": "VAE"}, ["IMAGE"])}
# filled from model folders
DYNAMIC_COMBOS = {"model_name", "text_encoder_name", "vae_name", "lora_name", "unet_name", "clip_name"}


def _builder():
    spec = importlib.util.spec_from_file_location("build_workflows", ROOT / "scripts" / "build_workflows.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _inputs(class_type):
    if class_type in NATIVE:
        return {k: (v, {}) for k, v in NATIVE[class_type][0].items()}
    types = NODE_CLASS_MAPPINGS[class_type].INPUT_TYPES()
    return {k: (spec[0], spec[1] if len(spec) > 1 else {}) for section in ("required", "optional")
            for k, spec in types.get(section, {}).items()}


def _outputs(class_type):
    if class_type in NATIVE:
        return NATIVE[class_type][1]
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
        assert values == [], f"{ct}: extra widget values {values}"
    for link_id, src, src_slot, dst, dst_slot, typ in wf["links"]:
        src_type = _outputs(nodes[src]["type"])[src_slot]
        dst_input = nodes[dst]["inputs"][dst_slot]
        assert src_type == typ == _inputs(nodes[dst]["type"])[dst_input["name"]][0] and dst_input["link"] == link_id
