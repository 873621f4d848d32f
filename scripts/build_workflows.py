"""Writes the shipped example workflows from one description, in both of ComfyUI's formats.

    python scripts/build_workflows.py

workflows/<name>.json      UI format (drag onto the canvas)
workflows/<name>_api.json  API format (POST /prompt)
example_workflows/<name>.json  the UI file again, where ComfyUI's template browser looks

The files are generated, never hand-edited: tests/test_workflows.py fails when they drift from this script.
"""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# node id -> (class_type, title, widget values in INPUT_TYPES order, {input name: (source id, output slot)})
FLUX2_T2I = {
    "1": ("Flux2AccelLoadDiffusionModel", "Load Diffusion Model (FLUX.2)",
          {"model_name": "flux2_dev_fp8mixed.safetensors", "precision": "fp8_e4m3fn", "offload": "model_cpu"}, {}),
    "2": ("Flux2AccelLoadTextEncoder", "Load Text Encoder (FLUX.2)",
          {"text_encoder_name": "mistral_3_small_flux2_fp8.safetensors", "precision": "fp8_e4m3fn"}, {}),
    "3": ("Flux2AccelLoadVAE", "Load VAE (FLUX.2)", {"vae_name": "flux2-vae.safetensors", "dtype": "bf16"}, {}),
    "4": ("Flux2AccelTextEncode", "Text Encode (FLUX.2)",
          {"prompt": "A red fox sitting in fresh snow at golden hour, photo"}, {"text_encoder": ("2", 0)}),
    "5": ("Flux2AccelSampler", "Sampler (FLUX.2)",
          {"width": 1024, "height": 1024, "steps": 28, "guidance": 4.0, "seed": 42, "batch_size": 1},
          {"model": ("1", 0), "vae": ("3", 0), "conditioning": ("4", 0)}),
    "6": ("SaveImage", "Save Image", {"filename_prefix": "flux2-accel"}, {"images": ("5", 0)}),
}
# The same graph with the speed nodes between the loader and the sampler: step cache, then regional compile.
FLUX2_T2I_FAST = {
    **FLUX2_T2I,
    "7": ("Flux2AccelStepCache", "Step Cache (FLUX.2)",
          {"method": "fbcache", "threshold": 0.12, "start_percent": 0.0, "end_percent": 1.0,
           "max_consecutive_cached": 3, "warmup_steps": 1, "teacache_coefficients": ""}, {"model": ("1", 0)}),
    "8": ("Flux2AccelCompile", "Torch Compile (FLUX.2)",
          {"scope": "regional", "mode": "default", "dynamic": "auto", "fullgraph": False, "backend": "inductor",
           "compile_vae_decoder": False}, {"model": ("7", 0)}),
}
FLUX2_T2I_FAST["5"] = (*FLUX2_T2I["5"][:3], {**FLUX2_T2I["5"][3], "model": ("8", 0)})
# ComfyUI's own FLUX.2 text-to-image graph (native nodes only), with the pack's native-MODEL speed nodes between the
# diffusion-model loader and the guider: step cache, then regional compile.
FLUX2_NATIVE_T2I_FAST = {
    "101": ("UNETLoader", "Load Diffusion Model",
            {"unet_name": "flux2_dev_fp8mixed.safetensors", "weight_dtype": "default"}, {}),
    "102": ("CLIPLoader", "Load CLIP",
            {"clip_name": "mistral_3_small_flux2_fp8.safetensors", "type": "flux2", "device": "default"}, {}),
    "103": ("VAELoader", "Load VAE", {"vae_name": "flux2-vae.safetensors"}, {}),
    "104": ("CLIPTextEncode", "CLIP Text Encode (Prompt)",
            {"text": "A red fox sitting in fresh snow at golden hour, photo"}, {"clip": ("102", 0)}),
    "105": ("FluxGuidance", "FluxGuidance", {"guidance": 4.0}, {"conditioning": ("104", 0)}),
    "106": ("Flux2AccelNativeStepCache", "Step Cache (FLUX.2, native MODEL)",
            {"method": "fbcache", "threshold": 0.12, "start_percent": 0.0, "end_percent": 1.0,
             "max_consecutive_cached": 3, "warmup_steps": 1, "teacache_coefficients": ""}, {"model": ("101", 0)}),
    "107": ("Flux2AccelNativeCompile", "Torch Compile (FLUX.2, native MODEL)",
            {"mode": "default", "dynamic": "auto", "fullgraph": False, "backend": "inductor"}, {"model": ("106", 0)}),
    "108": ("EmptyFlux2LatentImage", "Empty Flux 2 Latent", {"width": 1024, "height": 1024, "batch_size": 1}, {}),
    "109": ("RandomNoise", "RandomNoise", {"noise_seed": 42}, {}),
    "110": ("BasicGuider", "BasicGuider", {}, {"model": ("107", 0), "conditioning": ("105", 0)}),
    "111": ("KSamplerSelect", "KSamplerSelect", {"sampler_name": "euler"}, {}),
    "112": ("Flux2Scheduler", "Flux2Scheduler", {"steps": 28, "width": 1024, "height": 1024}, {}),
    "113": ("SamplerCustomAdvanced", "SamplerCustomAdvanced", {},
            {"noise": ("109", 0), "guider": ("110", 0), "sampler": ("111", 0), "sigmas": ("112", 0),
             "latent_image": ("108", 0)}),
    "114": ("VAEDecode", "VAE Decode", {}, {"samples": ("113", 0), "vae": ("103", 0)}),
    "115": ("SaveImage", "Save Image", {"filename_prefix": "flux2-native"}, {"images": ("114", 0)}),
}
WORKFLOWS = {"flux2_t2i": FLUX2_T2I, "flux2_t2i_fast": FLUX2_T2I_FAST, "flux2_native_t2i_fast": FLUX2_NATIVE_T2I_FAST}
# Canvas positions [x, y]: loaders in a column, then encode, sampler (tall: its statistics box grows), save; the
# speed nodes below the loaders.
LAYOUT = {"1": [40, 60], "2": [40, 220], "3": [40, 380], "4": [420, 60], "5": [420, 330], "6": [800, 60],
          "7": [40, 540], "8": [40, 820],
          # the native graph: loaders, prompt, speed nodes, sampling parts, decode and save
          "101": [40, 60], "102": [40, 200], "103": [40, 360], "104": [420, 200], "105": [420, 420],
          "106": [40, 500], "107": [40, 780], "108": [800, 60], "109": [800, 220], "110": [800, 340],
          "111": [800, 460], "112": [800, 560], "113": [1180, 60], "114": [1180, 320], "115": [1540, 60]}
# Node heights on the canvas (the frontend grows a node to fit its widgets).
HEIGHTS = {"Flux2AccelSampler": 330, "Flux2AccelStepCache": 250, "Flux2AccelCompile": 230,
           "Flux2AccelNativeStepCache": 250, "Flux2AccelNativeCompile": 180, "CLIPTextEncode": 180}

# Widgets the frontend adds after a value: seeds get a "control after generate" entry.
CONTROL_AFTER = {"seed": "fixed", "noise_seed": "fixed"}
# Socket types of each node's outputs and linked inputs, for the UI format.
OUTPUT_TYPES = {
    "Flux2AccelLoadDiffusionModel": [("model", "FLUX2_MODEL")],
    "Flux2AccelLoadTextEncoder": [("text_encoder", "FLUX2_TEXT_ENCODER")],
    "Flux2AccelLoadVAE": [("vae", "FLUX2_VAE")],
    "Flux2AccelTextEncode": [("conditioning", "FLUX2_CONDITIONING")],
    "Flux2AccelSampler": [("image", "IMAGE"), ("latent", "LATENT")],
    "Flux2AccelStepCache": [("model", "FLUX2_MODEL")],
    "Flux2AccelCompile": [("model", "FLUX2_MODEL")],
    "SaveImage": [],
    "Flux2AccelNativeStepCache": [("MODEL", "MODEL")],
    "Flux2AccelNativeCompile": [("MODEL", "MODEL")],
    # ComfyUI's own nodes (0.8)
    "UNETLoader": [("MODEL", "MODEL")],
    "CLIPLoader": [("CLIP", "CLIP")],
    "VAELoader": [("VAE", "VAE")],
    "CLIPTextEncode": [("CONDITIONING", "CONDITIONING")],
    "FluxGuidance": [("CONDITIONING", "CONDITIONING")],
    "EmptyFlux2LatentImage": [("LATENT", "LATENT")],
    "RandomNoise": [("NOISE", "NOISE")],
    "BasicGuider": [("GUIDER", "GUIDER")],
    "KSamplerSelect": [("SAMPLER", "SAMPLER")],
    "Flux2Scheduler": [("SIGMAS", "SIGMAS")],
    "SamplerCustomAdvanced": [("output", "LATENT"), ("denoised_output", "LATENT")],
    "VAEDecode": [("IMAGE", "IMAGE")],
}


def api_format(graph: dict) -> dict:
    return {nid: {"class_type": cls, "_meta": {"title": title},
                  "inputs": {**widgets, **{k: [src, slot] for k, (src, slot) in links.items()}}}
            for nid, (cls, title, widgets, links) in graph.items()}


def ui_format(graph: dict) -> dict:
    nodes, links = [], []
    out_links = {}
    for nid, (cls, _, _, inputs) in graph.items():
        for name, (src, slot) in inputs.items():
            link_id = len(links) + 1
            src_type = OUTPUT_TYPES[graph[src][0]][slot][1]
            links.append([link_id, int(src), slot, int(nid), name, src_type])
            out_links.setdefault((src, slot), []).append(link_id)
    for order, (nid, (cls, title, widgets, inputs)) in enumerate(graph.items()):
        values = []
        for name, value in widgets.items():
            values.append(value)
            if name in CONTROL_AFTER:
                values.append(CONTROL_AFTER[name])
        node_inputs = []
        for name, (src, slot) in inputs.items():
            link = next(l for l in links if l[3] == int(nid) and l[4] == name)
            node_inputs.append({"name": name, "type": link[5], "link": link[0]})
        outputs = [{"name": name, "type": typ, "links": out_links.get((nid, slot), []), "slot_index": slot}
                   for slot, (name, typ) in enumerate(OUTPUT_TYPES[cls])]
        nodes.append({"id": int(nid), "type": cls, "title": title, "pos": LAYOUT[nid],
                      "size": [340, HEIGHTS.get(cls, 120)], "flags": {}, "order": order,
                      "mode": 0, "inputs": node_inputs, "outputs": outputs,
                      "properties": {"Node name for S&R": cls}, "widgets_values": values})
    # UI links carry target slot indices, not names
    for link in links:
        target = next(n for n in nodes if n["id"] == link[3])
        link[4] = [i["name"] for i in target["inputs"]].index(link[4])
    return {"last_node_id": max(int(k) for k in graph), "last_link_id": len(links), "nodes": nodes, "links": links,
            "groups": [], "config": {}, "extra": {"flux2_accel": "generated by scripts/build_workflows.py"},
            "version": 0.4}


def render() -> dict[Path, str]:
    files = {}
    for name, graph in WORKFLOWS.items():
        ui = json.dumps(ui_format(graph), indent=2) + "\n"
        files[ROOT / "workflows" / f"{name}.json"] = ui
        files[ROOT / "workflows" / f"{name}_api.json"] = json.dumps(api_format(graph), indent=2) + "\n"
        files[ROOT / "example_workflows" / f"{name}.json"] = ui
    return files


if __name__ == "__main__":
    for path, text in render().items():
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
        print("wrote", path.relative_to(ROOT))
