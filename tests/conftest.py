"""Shared fixtures: tiny random-weight FLUX.2 components written in every layout the loaders read."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import layout_fixtures
import pytest
import torch
from flux2_accel.optim.models import tiny
from safetensors.torch import save_file

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))



@dataclass
class TinyModels:
    root: Path  # a ComfyUI-style models folder
    dev: tiny.TinyComponents
    klein: tiny.TinyComponents
    files: dict = field(default_factory=dict)  # label -> path


def _save(path: Path, sd: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    seen, out = set(), {}
    for k, v in sd.items():  # tied weights share storage; safetensors wants each tensor on its own
        v = v.contiguous()
        out[k] = v.clone() if v.data_ptr() in seen else v
        seen.add(v.data_ptr())
    save_file(out, str(path))
    return path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> TinyModels:
    root = tmp_path_factory.mktemp("models")
    dev = tiny.build_components(tiny.TINY, seed=0)
    klein = tiny.build_components(tiny.TINY_KLEIN, seed=10)
    t = TinyModels(root, dev, klein)
    f = t.files
    for name, comps in (("dev", dev), ("klein", klein)):
        spec = comps.spec
        sd = comps.transformer.state_dict()
        bfl = layout_fixtures.transformer_to_bfl(sd, spec.num_layers, spec.num_single_layers)
        f[f"{name}_bfl"] = _save(root / "diffusion_models" / f"{name}_bfl.safetensors", bfl)
        f[f"{name}_comfy"] = _save(root / "diffusion_models" / f"{name}_comfy.safetensors",
                                   {"model.diffusion_model." + k: v for k, v in bfl.items()})
        f[f"{name}_diffusers_file"] = _save(root / "diffusion_models" / f"{name}_diffusers.safetensors", sd)
        layout_fixtures.full_pipeline(comps).save_pretrained(root / "diffusers" / f"tiny_{name}")
        f[f"{name}_folder"] = root / "diffusers" / f"tiny_{name}"
    vae_sd = dev.vae.state_dict()
    f["vae_ldm"] = _save(root / "vae" / "flux2-vae-tiny.safetensors",
                         layout_fixtures.vae_to_ldm(vae_sd, len(tiny.TINY.vae_block_out_channels)))
    f["vae_diffusers_file"] = _save(root / "vae" / "vae_diffusers.safetensors", vae_sd)
    # Mistral: transformers' layout (model.language_model.* + vision tower) and Comfy-Org's text-only layout.
    mistral_sd = dev.text_encoder.state_dict()
    f["mistral_hf_file"] = _save(root / "text_encoders" / "mistral_hf.safetensors", mistral_sd)
    comfy_mistral = {"model." + k[len("model.language_model."):]: v for k, v in mistral_sd.items()
                     if k.startswith("model.language_model.")}
    f["mistral_comfy"] = _save(root / "text_encoders" / "mistral_comfy.safetensors", comfy_mistral)
    dev.tokenizer.save_pretrained(root / "text_encoders" / "mistral_comfy_tokenizer")
    qwen_sd = {k: v for k, v in klein.text_encoder.state_dict().items() if k != "lm_head.weight"}
    f["qwen_comfy"] = _save(root / "text_encoders" / "qwen3_comfy.safetensors", qwen_sd)
    klein.tokenizer.save_pretrained(root / "text_encoders" / "qwen3_comfy_tokenizer")
    return t


@pytest.fixture
def comfyui_inference_mode():
    """ComfyUI executes every prompt under torch.inference_mode(): tests of what runs inside a prompt use it too."""
    with torch.inference_mode():
        yield


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models on a shared 2-core machine: a second intra-op thread only adds contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
