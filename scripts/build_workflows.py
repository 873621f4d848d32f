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
          {"model_name": "flux2_dev_fp8mixed.safetensors", "precision": "fp8_e4m3fn", "offload": "model_cpu",
           "attention_backend": "auto"}, {}),
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
           "max_consecutive_cached": 3, "warmup_steps": 1, "teacache_coefficients": "", "min_steps": 6},
          {"model": ("1", 0)}),
    "8": ("Flux2AccelCompile", "Torch Compile (FLUX.2)",
          {"scope": "regional", "mode": "default", "dynamic": "auto", "fullgraph": False, "backend": "inductor",
           "compile_vae_decoder": False}, {"model": ("7", 0)}),
}
FLUX2_T2I_FAST["5"] = (*FLUX2_T2I["5"][:3], {**FLUX2_T2I["5"][3], "model": ("8", 0)})


def with_node(graph: dict, nid: str, widgets: dict | None = None, links: dict | None = None, **fields) -> dict:
    """A copy of `graph` whose node `nid` has some widget values and links replaced (or class/title via fields)."""
    cls, title, old_widgets, old_links = graph[nid]
    return {**graph, nid: (fields.get("cls", cls), fields.get("title", title), {**old_widgets, **(widgets or {})},
                           {**old_links, **(links or {})})}


# Editing: two reference images, batched by ComfyUI's own ImageBatch (it scales the second to the first's size),
# into the sampler's reference_images (each batch item is one reference).
FLUX2_EDIT_TWO_REFERENCES = with_node({
    **with_node(FLUX2_T2I, "4", {"prompt": "The cat from image 1 sitting on the armchair from image 2, soft window "
                                           "light, photo"}),
    "9": ("LoadImage", "Reference image 1", {"image": "reference_1.png"}, {}),
    "10": ("LoadImage", "Reference image 2", {"image": "reference_2.png"}, {}),
    "11": ("ImageBatch", "Batch the references", {}, {"image1": ("9", 0), "image2": ("10", 0)}),
}, "5", links={"reference_images": ("11", 0)})

# [klein] 4B distilled: 4 steps, no step cache (on 4 steps a skipped step is a quarter of the run), no CFG.
FLUX2_KLEIN_4B_DISTILLED = with_node(with_node(with_node(with_node(
    FLUX2_T2I, "1", {"model_name": "flux-2-klein-4b.safetensors", "precision": "bf16", "offload": "none"}),
    "2", {"text_encoder_name": "qwen_3_4b.safetensors", "precision": "bf16"}),
    "4", {"prompt": "A red fox sitting in fresh snow at golden hour, photo"}),
    "5", {"steps": 4, "guidance": 1.0})

# [klein] base (undistilled) with a negative prompt: CFG through the sampler's `negative`; guidance = CFG scale.
FLUX2_KLEIN_BASE_CFG = with_node(with_node({
    **FLUX2_KLEIN_4B_DISTILLED,
    "12": ("Flux2AccelTextEncode", "Negative prompt (FLUX.2)",
           {"prompt": "blurry, low quality, distorted, watermark, text"}, {"text_encoder": ("2", 0)}),
}, "1", {"model_name": "flux-2-klein-base-4b.safetensors"}),
    "5", {"steps": 50, "guidance": 4.0}, {"negative": ("12", 0)})

# Two LoRAs in one LoRA Stack (slots 1 and 2; slots 3 and 4 empty) between the loader and the sampler.
FLUX2_LORA_STACK = with_node({
    **FLUX2_T2I,
    "13": ("Flux2AccelLoraStack", "LoRA Stack (FLUX.2)",
           {"lora_1": "my_style_lora.safetensors", "strength_1": 1.0, "enabled_1": True,
            "lora_2": "my_subject_lora.safetensors", "strength_2": 0.8, "enabled_2": True,
            "lora_3": "None", "strength_3": 1.0, "enabled_3": True,
            "lora_4": "None", "strength_4": 1.0, "enabled_4": True}, {"model": ("1", 0)}),
}, "5", links={"model": ("13", 0)})

# Low VRAM: transformer and text encoder quantized to NF4 at load, whole models moved to the GPU only while they run.
FLUX2_LOW_VRAM = with_node(with_node(
    FLUX2_T2I, "1", {"model_name": "flux2-dev.safetensors", "precision": "nf4", "offload": "model_cpu"}),
    "2", {"text_encoder_name": "mistral_3_small_flux2_bf16.safetensors", "precision": "nf4"})

# Remote text encoding: no local text encoder; the prompt goes to the public FLUX.2 [dev] encoder (or your own
# `flux2-accel serve-text-encoder`).
FLUX2_REMOTE_TEXT_ENCODE = {nid: node for nid, node in FLUX2_T2I.items() if nid != "2"}
FLUX2_REMOTE_TEXT_ENCODE["4"] = ("Flux2AccelRemoteTextEncode", "Remote Text Encode (FLUX.2)",
                                 {"prompt": "A red fox sitting in fresh snow at golden hour, photo",
                                  "endpoint_url": "https://remote-text-encoder-flux-2.huggingface.co/predict",
                                  "expects": "dev (Mistral 3, width 15360)", "use_cache": True, "timeout": 120}, {})

# One image on two GPUs: the Parallel node between the loader and the sampler (Ulysses over the attention heads).
FLUX2_MULTI_GPU = with_node({
    **with_node(FLUX2_T2I, "1", {"offload": "none"}),  # every GPU holds the whole model: no offload
    "14": ("Flux2AccelParallel", "Parallel (FLUX.2)", {"gpus": 2, "mode": "ulysses"}, {"model": ("1", 0)}),
}, "5", links={"model": ("14", 0)})

WORKFLOWS = {
    "flux2_t2i": FLUX2_T2I,
    "flux2_t2i_fast": FLUX2_T2I_FAST,
    "flux2_edit_two_references": FLUX2_EDIT_TWO_REFERENCES,
    "flux2_klein_4b_distilled": FLUX2_KLEIN_4B_DISTILLED,
    "flux2_klein_base_negative": FLUX2_KLEIN_BASE_CFG,
    "flux2_lora_stack": FLUX2_LORA_STACK,
    "flux2_low_vram_nf4": FLUX2_LOW_VRAM,
    "flux2_remote_text_encode": FLUX2_REMOTE_TEXT_ENCODE,
    "flux2_multi_gpu": FLUX2_MULTI_GPU,
}
# The pack's NF4 model in ComfyUI's own sampling graph: loader -> Model to ComfyUI -> KSampler, with the pack's text
# encoder bridged to CONDITIONING, FluxGuidance, and ComfyUI's VAE.
FLUX2_NF4_KSAMPLER = {
    "1": ("Flux2AccelLoadDiffusionModel", "Load Diffusion Model (FLUX.2)",
          {"model_name": "flux2-dev.safetensors", "precision": "nf4", "offload": "none",
           "attention_backend": "auto"}, {}),
    "2": ("Flux2AccelLoadTextEncoder", "Load Text Encoder (FLUX.2)",
          {"text_encoder_name": "mistral_3_small_flux2_fp8.safetensors", "precision": "fp8_e4m3fn"}, {}),
    "3": ("Flux2AccelToModel", "Model to ComfyUI (FLUX.2)", {}, {"model": ("1", 0)}),
    "4": ("Flux2AccelTextEncode", "Text Encode (FLUX.2)",
          {"prompt": "A red fox sitting in fresh snow at golden hour, photo"}, {"text_encoder": ("2", 0)}),
    "5": ("Flux2AccelToConditioning", "Conditioning to ComfyUI (FLUX.2)", {}, {"conditioning": ("4", 0)}),
    "6": ("FluxGuidance", "FluxGuidance", {"guidance": 4.0}, {"conditioning": ("5", 0)}),
    "7": ("EmptyFlux2LatentImage", "Empty Flux 2 Latent", {"width": 1024, "height": 1024, "batch_size": 1}, {}),
    "8": ("KSampler", "KSampler",
          {"seed": 42, "steps": 28, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0},
          {"model": ("3", 0), "positive": ("6", 0), "negative": ("6", 0), "latent_image": ("7", 0)}),
    "9": ("VAELoader", "Load VAE", {"vae_name": "flux2-vae.safetensors"}, {}),
    "10": ("VAEDecode", "VAE Decode", {}, {"samples": ("8", 0), "vae": ("9", 0)}),
    "11": ("SaveImage", "Save Image", {"filename_prefix": "flux2-accel-nf4"}, {"images": ("10", 0)}),
}
# Remote Text Encode feeding ComfyUI's own FLUX.2 graph (its loader, guider, FLUX.2 scheduler, sampler and VAE).
FLUX2_REMOTE_NATIVE = {
    "1": ("UNETLoader", "Load Diffusion Model", {"unet_name": "flux2_dev_fp8mixed.safetensors",
                                                 "weight_dtype": "default"}, {}),
    "2": ("Flux2AccelRemoteTextEncode", "Remote Text Encode (FLUX.2)",
          {"prompt": "A red fox sitting in fresh snow at golden hour, photo",
           "endpoint_url": "https://remote-text-encoder-flux-2.huggingface.co/predict",
           "expects": "dev (Mistral 3, width 15360)", "use_cache": True, "timeout": 120}, {}),
    "3": ("Flux2AccelToConditioning", "Conditioning to ComfyUI (FLUX.2)", {}, {"conditioning": ("2", 0)}),
    "4": ("FluxGuidance", "FluxGuidance", {"guidance": 4.0}, {"conditioning": ("3", 0)}),
    "5": ("BasicGuider", "BasicGuider", {}, {"model": ("1", 0), "conditioning": ("4", 0)}),
    "6": ("Flux2Scheduler", "Flux2Scheduler", {"steps": 28, "width": 1024, "height": 1024}, {}),
    "7": ("KSamplerSelect", "KSamplerSelect", {"sampler_name": "euler"}, {}),
    "8": ("RandomNoise", "RandomNoise", {"noise_seed": 42}, {}),
    "9": ("EmptyFlux2LatentImage", "Empty Flux 2 Latent", {"width": 1024, "height": 1024, "batch_size": 1}, {}),
    "10": ("SamplerCustomAdvanced", "SamplerCustomAdvanced", {},
           {"noise": ("8", 0), "guider": ("5", 0), "sampler": ("7", 0), "sigmas": ("6", 0),
            "latent_image": ("9", 0)}),
    "11": ("VAELoader", "Load VAE", {"vae_name": "flux2-vae.safetensors"}, {}),
    "12": ("VAEDecode", "VAE Decode", {}, {"samples": ("10", 0), "vae": ("11", 0)}),
    "13": ("SaveImage", "Save Image", {"filename_prefix": "flux2-accel-remote"}, {"images": ("12", 0)}),
}
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
             "max_consecutive_cached": 3, "warmup_steps": 1, "teacache_coefficients": "", "min_steps": 6},
            {"model": ("101", 0)}),
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
WORKFLOWS.update({"flux2_nf4_ksampler": FLUX2_NF4_KSAMPLER, "flux2_remote_native": FLUX2_REMOTE_NATIVE,
                  "flux2_native_t2i_fast": FLUX2_NATIVE_T2I_FAST})
# Canvas positions [x, y]: loaders in a column, then encode, sampler (tall: its statistics box grows), save; the
# speed nodes below the loaders.
LAYOUT = {"1": [40, 60], "2": [40, 220], "3": [40, 380], "4": [420, 60], "5": [420, 330], "6": [800, 60],
          "7": [40, 540], "8": [40, 820],
          # the reference images below the loaders, their batch below the sampler; a negative prompt or a LoRA
          # stack where the speed nodes go
          "9": [40, 540], "10": [40, 900], "11": [420, 720], "12": [40, 540], "13": [40, 540], "14": [40, 540]}
# Workflows laid out on their own grid: id -> [x, y]
LAYOUTS = {
    "flux2_nf4_ksampler": {"1": [40, 60], "2": [40, 220], "3": [420, 60], "4": [420, 200], "5": [420, 420],
                           "6": [420, 540], "7": [40, 380], "8": [800, 60], "9": [800, 420], "10": [1180, 60],
                           "11": [1180, 200]},
    "flux2_remote_native": {"1": [40, 60], "2": [40, 220], "3": [420, 220], "4": [420, 340], "5": [800, 60],
                            "6": [40, 520], "7": [420, 480], "8": [420, 600], "9": [40, 680], "10": [800, 220],
                            "11": [800, 500], "12": [1180, 60], "13": [1180, 200]},
    # loaders, prompt, speed nodes, sampling parts, decode and save
    "flux2_native_t2i_fast": {"101": [40, 60], "102": [40, 200], "103": [40, 360], "104": [420, 200],
                              "105": [420, 420], "106": [40, 500], "107": [40, 780], "108": [800, 60],
                              "109": [800, 220], "110": [800, 340], "111": [800, 460], "112": [800, 560],
                              "113": [1180, 60], "114": [1180, 320], "115": [1540, 60]},
}
# Node heights on the canvas (the frontend grows a node to fit its widgets).
HEIGHTS = {"Flux2AccelSampler": 330, "Flux2AccelStepCache": 280, "Flux2AccelCompile": 230, "LoadImage": 320,
           "Flux2AccelLoraStack": 330, "Flux2AccelRemoteTextEncode": 250, "ImageBatch": 60,
           "Flux2AccelNativeStepCache": 280, "Flux2AccelNativeCompile": 180, "CLIPTextEncode": 180}

# Widgets the frontend adds after a value: seeds get a "control after generate" entry, LoadImage an upload button.
CONTROL_AFTER = {"seed": "fixed", "noise_seed": "fixed", "image": "image"}
# Socket types of each node's outputs and linked inputs, for the UI format.
OUTPUT_TYPES = {
    "Flux2AccelLoadDiffusionModel": [("model", "FLUX2_MODEL")],
    "Flux2AccelLoadTextEncoder": [("text_encoder", "FLUX2_TEXT_ENCODER")],
    "Flux2AccelLoadVAE": [("vae", "FLUX2_VAE")],
    "Flux2AccelTextEncode": [("conditioning", "FLUX2_CONDITIONING")],
    "Flux2AccelSampler": [("image", "IMAGE"), ("latent", "LATENT")],
    "Flux2AccelStepCache": [("model", "FLUX2_MODEL")],
    "Flux2AccelCompile": [("model", "FLUX2_MODEL")],
    "Flux2AccelParallel": [("model", "FLUX2_MODEL")],
    "Flux2AccelLoraStack": [("model", "FLUX2_MODEL")],
    "Flux2AccelRemoteTextEncode": [("conditioning", "FLUX2_CONDITIONING")],
    "SaveImage": [],
    "LoadImage": [("IMAGE", "IMAGE"), ("MASK", "MASK")],
    "ImageBatch": [("IMAGE", "IMAGE")],
    "Flux2AccelNativeStepCache": [("MODEL", "MODEL")],
    "Flux2AccelNativeCompile": [("MODEL", "MODEL")],
    "CLIPLoader": [("CLIP", "CLIP")],
    "CLIPTextEncode": [("CONDITIONING", "CONDITIONING")],
    "Flux2AccelToModel": [("model", "MODEL")],
    "Flux2AccelToConditioning": [("conditioning", "CONDITIONING")],
    "Flux2AccelFromConditioning": [("conditioning", "FLUX2_CONDITIONING")],
    "FluxGuidance": [("CONDITIONING", "CONDITIONING")],
    "EmptyFlux2LatentImage": [("LATENT", "LATENT")],
    "KSampler": [("LATENT", "LATENT")],
    "VAELoader": [("VAE", "VAE")],
    "VAEDecode": [("IMAGE", "IMAGE")],
    "UNETLoader": [("MODEL", "MODEL")],
    "BasicGuider": [("GUIDER", "GUIDER")],
    "Flux2Scheduler": [("SIGMAS", "SIGMAS")],
    "KSamplerSelect": [("SAMPLER", "SAMPLER")],
    "RandomNoise": [("NOISE", "NOISE")],
    "SamplerCustomAdvanced": [("output", "LATENT"), ("denoised_output", "LATENT")],
}

# ---------------------------------------------------------------- notes on the canvas
# ComfyUI "MarkdownNote" nodes: frontend-only, so they are in the UI file and never in the API file. Each workflow's
# notes say which files to download and where they go (README, "Which file goes where").

FILES = {  # key -> (file name, models/ subfolder, what it is)
    "dev_fp8": ("flux2_dev_fp8mixed.safetensors", "diffusion_models", "FLUX.2 [dev] transformer, fp8 (Comfy-Org)"),
    "dev_bf16": ("flux2-dev.safetensors", "diffusion_models", "FLUX.2 [dev] transformer, bf16 (Black Forest Labs)"),
    "mistral_fp8": ("mistral_3_small_flux2_fp8.safetensors", "text_encoders",
                    "Mistral Small 3.1 text encoder, fp8 (its tokenizer is inside the file)"),
    "mistral_bf16": ("mistral_3_small_flux2_bf16.safetensors", "text_encoders",
                     "Mistral Small 3.1 text encoder, bf16 (its tokenizer is inside the file)"),
    "klein_4b": ("flux-2-klein-4b.safetensors", "diffusion_models", "FLUX.2 [klein] 4B, distilled (4 steps)"),
    "klein_base_4b": ("flux-2-klein-base-4b.safetensors", "diffusion_models",
                      "FLUX.2 [klein] base 4B (undistilled, for CFG)"),
    "qwen3_4b": ("qwen_3_4b.safetensors", "text_encoders",
                 "Qwen3 4B text encoder (tokenizer: ComfyUI's bundled Qwen tokenizer)"),
    "vae": ("flux2-vae.safetensors", "vae", "FLUX.2 VAE"),
}


def downloads(*keys: str) -> str:
    rows = "\n".join(f"| `{FILES[k][0]}` | `models/{FILES[k][1]}/` | {FILES[k][2]} |" for k in keys)
    return ("## Files to download\n\n| File | Put it in | What it is |\n| --- | --- | --- |\n" + rows +
            "\n\nThen press R on the canvas (or restart ComfyUI) so the loaders list the files. Other layouts "
            "(BFL, Comfy-Org, diffusers folders in `models/diffusers/`) load too.")


DEV_FILES = downloads("dev_fp8", "mistral_fp8", "vae")
KLEIN_9B = "\n\n**[klein] 9B:** `flux-2-klein-9b.safetensors` with `qwen_3_8b.safetensors`, same folders."
NOTES = {  # workflow -> [(markdown, [x, y], [width, height])]
    "flux2_t2i": [(DEV_FILES + "\n\n**Text to image** with FLUX.2 [dev], 28 steps.", [800, 380], [460, 340])],
    "flux2_t2i_fast": [(DEV_FILES + "\n\n**Speed nodes.** Step Cache (First Block Cache at 0.12) skips steps "
                        "whose result barely changes; runs under `min_steps` (6) steps never skip. Torch Compile "
                        "(regional) compiles at the first prompt (tens of seconds to minutes); later prompts reuse "
                        "it.", [800, 380], [460, 380])],
    "flux2_edit_two_references": [(
        DEV_FILES + "\n\n**Your images.** Put two images in ComfyUI's `input/` folder as `reference_1.png` and "
        "`reference_2.png`, or click *choose file to upload* on each Load Image node. Each image is one reference "
        "(at least 64 px a side); ImageBatch scales the second to the first's size. Say in the prompt what to take "
        "from which image. For a third reference, chain another ImageBatch.", [800, 380], [460, 420])],
    "flux2_klein_4b_distilled": [(
        downloads("klein_4b", "qwen3_4b", "vae") + "\n\n**Distilled: 4 steps, no CFG.** Guidance is unused "
        "without a negative prompt. No step cache: on 4 steps a skipped step is a quarter of the run, so it "
        "saves little and costs quality (the Step Cache node skips nothing under 6 steps anyway)."
        + KLEIN_9B, [800, 380], [460, 420])],
    "flux2_klein_base_negative": [(
        downloads("klein_base_4b", "qwen3_4b", "vae") + "\n\n**Base model with CFG.** The negative prompt goes "
        "to the sampler's `negative` input; `guidance` is then the CFG scale (4.0). Base models need about 50 "
        "steps. CFG runs the transformer twice per step.", [800, 380], [460, 420])],
    "flux2_lora_stack": [(
        DEV_FILES + "\n\n**LoRAs.** Put your FLUX.2 [dev] LoRA files (`.safetensors`; diffusers, ai-toolkit, "
        "kohya, ComfyUI or LoKr layout) in `models/loras/` and pick them in slots 1 and 2 (the names here are "
        "placeholders). Strength and on/off change without reloading the model.", [800, 380], [460, 400])],
    "flux2_low_vram_nf4": [(
        downloads("dev_bf16", "mistral_bf16", "vae") + "\n\n**Low VRAM.** Transformer and text encoder are "
        "quantized to NF4 (bitsandbytes 4-bit) while loading, and `model_cpu` keeps each model in CPU memory "
        "until it runs. The fp8 files work too (`flux2_dev_fp8mixed.safetensors`, "
        "`mistral_3_small_flux2_fp8.safetensors`).", [800, 380], [460, 420])],
    "flux2_nf4_ksampler": [(
        downloads("dev_bf16", "mistral_fp8", "vae") + "\n\n**The pack's NF4 model in ComfyUI's own sampler.** The "
        "transformer is quantized to NF4 while loading; Model to ComfyUI (FLUX.2) makes it a native MODEL for "
        "KSampler and any other sampler, scheduler or guider, and Conditioning to ComfyUI (FLUX.2) passes the "
        "prompt embeddings unchanged. Put LoRAs on a LoRA Stack (FLUX.2) before the bridge: ComfyUI's LoRA loaders "
        "are refused on this model.", [800, 580], [460, 440])],
    "flux2_remote_native": [(
        downloads("dev_fp8", "vae") + "\n\n**Remote text encoding in ComfyUI's own FLUX.2 graph.** The prompt is "
        "encoded on the remote endpoint (token in `FLUX2_ACCEL_REMOTE_TOKEN`, never in the workflow); Conditioning "
        "to ComfyUI (FLUX.2) feeds it to FluxGuidance, BasicGuider and SamplerCustomAdvanced with Flux2Scheduler "
        "(diffusers' FLUX.2 schedule).", [1180, 560], [460, 400])],
    "flux2_native_t2i_fast": [(
        downloads("dev_fp8", "mistral_fp8", "vae") + "\n\n**ComfyUI's own FLUX.2 graph, faster.** Step Cache "
        "(FLUX.2, native MODEL) skips steps whose result barely changes (First Block Cache at 0.12), and Torch "
        "Compile (FLUX.2, native MODEL) compiles the transformer blocks at the first prompt; later prompts, LoRA "
        "strengths, seeds and thresholds reuse it. Both work on any MODEL ComfyUI loads for FLUX.2 (bf16, fp8, "
        "GGUF from another pack). Load CLIP's type must be `flux2`.", [1180, 620], [460, 420])],
    "flux2_multi_gpu": [(
        DEV_FILES + "\n\n**One image on two GPUs.** Parallel (FLUX.2) splits each image over `gpus` GPUs (Ulysses: "
        "the attention heads; each GPU holds the whole model, so fp8 or nf4 for [dev] below 80 GB). Needs Ray "
        "(`pip install \"ray>=2.50\"`): it starts on this machine at the first prompt, or joins the cluster at "
        "`RAY_ADDRESS`, and stays warm between prompts.", [800, 380], [460, 400])],
    "flux2_remote_text_encode": [(
        downloads("dev_fp8", "vae") + "\n\n**No text encoder download.** The prompt is encoded on the remote "
        "endpoint. Set the token in the environment variable `FLUX2_ACCEL_REMOTE_TOKEN` (or the ComfyUI setting "
        "`flux2accel.remote_token`) before starting ComfyUI; it is never stored in the workflow. For your own "
        "`flux2-accel serve-text-encoder`, put its `http://host:port/predict` in `endpoint_url` and list the host "
        "in `FLUX2_ACCEL_REMOTE_HOSTS`.", [800, 380], [460, 440])],
}


def api_format(graph: dict) -> dict:
    return {nid: {"class_type": cls, "_meta": {"title": title},
                  "inputs": {**widgets, **{k: [src, slot] for k, (src, slot) in links.items()}}}
            for nid, (cls, title, widgets, links) in graph.items()}


def ui_format(graph: dict, notes=(), layout: dict | None = None) -> dict:
    """The UI file: `graph`'s nodes and links (at `layout`'s positions, LAYOUT by default), and the canvas `notes`
    [(markdown, pos, size)] as MarkdownNote nodes."""
    layout = layout or LAYOUT
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
        nodes.append({"id": int(nid), "type": cls, "title": title, "pos": layout[nid],
                      "size": [340, HEIGHTS.get(cls, 120)], "flags": {}, "order": order,
                      "mode": 0, "inputs": node_inputs, "outputs": outputs,
                      "properties": {"Node name for S&R": cls}, "widgets_values": values})
    # UI links carry target slot indices, not names
    for link in links:
        target = next(n for n in nodes if n["id"] == link[3])
        link[4] = [i["name"] for i in target["inputs"]].index(link[4])
    last_id = max(int(k) for k in graph)
    for text, pos, size in notes:
        last_id += 1
        nodes.append({"id": last_id, "type": "MarkdownNote", "title": "Read me: files and settings", "pos": pos,
                      "size": size, "flags": {}, "order": len(nodes), "mode": 0, "inputs": [], "outputs": [],
                      "properties": {}, "widgets_values": [text], "color": "#432", "bgcolor": "#653"})
    return {"last_node_id": last_id, "last_link_id": len(links), "nodes": nodes, "links": links,
            "groups": [], "config": {}, "extra": {"flux2_accel": "generated by scripts/build_workflows.py"},
            "version": 0.4}


def render() -> dict[Path, str]:
    files = {}
    for name, graph in WORKFLOWS.items():
        ui = json.dumps(ui_format(graph, NOTES.get(name, ()), LAYOUTS.get(name)), indent=2) + "\n"
        files[ROOT / "workflows" / f"{name}.json"] = ui
        files[ROOT / "workflows" / f"{name}_api.json"] = json.dumps(api_format(graph), indent=2) + "\n"
        files[ROOT / "example_workflows" / f"{name}.json"] = ui
    return files


if __name__ == "__main__":
    for path, text in render().items():
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
        print("wrote", path.relative_to(ROOT))
