"""Weight memory estimated from a file's header equals the bytes of the model the loaders build at that precision."""

from __future__ import annotations

import pytest
import torch
from flux2_accel.optim.errors import ModelFileError
from flux2_accel.optim.models import layouts, loading, precision
from flux2_accel.optim.models.checkpoint import open_checkpoint
from flux2_accel.optim.models.estimate import estimate_weight_bytes, format_bytes
from safetensors.torch import save_file

PRECISIONS = ("bf16", "fp8_e4m3fn", "nf4")


def _loaded_transformer_bytes(path, name):
    return precision.weight_bytes(precision.apply_precision(loading.load_transformer(path), name))


@pytest.mark.parametrize("label", ["dev_bfl", "dev_comfy", "dev_diffusers_file", "dev_folder", "klein_comfy"])
def test_transformer_estimate_equals_loaded_bytes(tiny_models, one_torch_thread, label):
    path = tiny_models.files[label]
    got = {p: estimate_weight_bytes(path, p, layouts.TRANSFORMER) for p in PRECISIONS}
    assert got == {p: _loaded_transformer_bytes(path, p) for p in PRECISIONS}
    assert got["nf4"] < got["fp8_e4m3fn"] < got["bf16"]
    assert estimate_weight_bytes(path, "fp8_e4m3fn_fast") == got["fp8_e4m3fn"]


@pytest.mark.parametrize("label", ["mistral_comfy", "mistral_hf_file", "qwen_comfy"])
def test_text_encoder_estimate_equals_loaded_bytes(tiny_models, one_torch_thread, label):
    path = tiny_models.files[label]
    for name in PRECISIONS:
        model = loading.load_text_encoder(path, tokenizer_path=_tokenizer(tiny_models, label)).model
        actual = precision.weight_bytes(precision.apply_text_encoder_precision(model, name)) - _rope_bytes(model)
        assert estimate_weight_bytes(path, name, layouts.TEXT_ENCODER) == actual, name


def _rope_bytes(model):
    """Rotary tables the model computes from its config (not in the file; 256 bytes for Mistral 3 Small)."""
    saved = set(model.state_dict())
    return sum(b.numel() * b.element_size() for n, b in model.named_buffers() if n not in saved)


def _tokenizer(tiny_models, label):
    folder = "qwen3_comfy_tokenizer" if label.startswith("qwen") else "mistral_comfy_tokenizer"
    return tiny_models.root / "text_encoders" / folder


def _prequantized(bfl_file, kind, path):
    from diffusers.quantizers.bfl.utils import quantize_fp8r, quantize_nvfp4

    out = {}
    for k, v in open_checkpoint(bfl_file).load().items():
        base = k[: -len(".weight")]
        if not ("blocks." in k and k.endswith(".weight") and v.ndim == 2):
            out[k] = v
        elif kind == "fp8r":
            out[k], out[base + ".weight_scale"] = quantize_fp8r(v)
        else:
            out[k], out[base + ".weight_scale"], s2 = quantize_nvfp4(v)
            out[base + ".weight_scale_2"], out[base + ".input_scale"] = s2.float(), torch.tensor(1.0)
    save_file(out, str(path))
    return path


@pytest.mark.parametrize("kind", ["fp8r", "nvfp4"])
def test_prequantized_file_estimate_equals_loaded_bytes(tiny_models, one_torch_thread, tmp_path, kind):
    path = _prequantized(tiny_models.files["dev_bfl"], kind, tmp_path / f"{kind}.safetensors")
    for name in PRECISIONS:
        assert estimate_weight_bytes(path, name) == _loaded_transformer_bytes(path, name), name


def test_estimate_at_dev_proportions_reads_only_the_header(tmp_path):
    """A FLUX.2 [dev]-shaped header over no data: [dev]'s 17.8 GB at nf4 (README), 64.4 GB at bf16."""
    from accelerate import init_empty_weights
    from diffusers import Flux2Transformer2DModel

    with init_empty_weights():
        dev = Flux2Transformer2DModel(patch_size=1, in_channels=128, num_layers=8, num_single_layers=48,
                                      attention_head_dim=128, num_attention_heads=48, joint_attention_dim=15360,
                                      timestep_guidance_channels=256, axes_dims_rope=(32, 32, 32, 32),
                                      guidance_embeds=True)
    path = _header_only_file(tmp_path / "dev_header.safetensors", dev.state_dict())
    for name in PRECISIONS:
        assert estimate_weight_bytes(path, name) == precision.estimated_weight_bytes(dev, name), name
    assert format_bytes(estimate_weight_bytes(path, "nf4")) == "17.8 GB"


def _header_only_file(path, state_dict):
    """A safetensors header describing `state_dict`'s shapes; the data section is a sparse hole of the right size."""
    import json
    import struct

    header, offset = {}, 0
    for k, v in state_dict.items():
        n = v.numel() * 2
        header[k] = {"dtype": "BF16", "shape": list(v.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)
    return path


def test_wrong_component_and_precision_are_named(tiny_models):
    with pytest.raises(ModelFileError, match="mistral_comfy.safetensors.*not a FLUX.2 diffusion model"):
        estimate_weight_bytes(tiny_models.files["mistral_comfy"], "bf16", layouts.TRANSFORMER)
    with pytest.raises(ModelFileError, match="precision 'int3'.*bf16, fp8_e4m3fn"):
        estimate_weight_bytes(tiny_models.files["dev_bfl"], "int3")
    with pytest.raises(ModelFileError, match="component 'vae'"):
        estimate_weight_bytes(tiny_models.files["vae_ldm"], "bf16", layouts.VAE)


def test_format_bytes():
    assert [format_bytes(n) for n in (17_800_000_000, 412_300_000, 3100, 12)] == ["17.8 GB", "412 MB", "3.1 KB",
                                                                               "12 B"]


# ---------------------------------------------------------------- the route the loader nodes' display calls


def _get_estimates(queries: list[dict]) -> list[tuple[int, dict]]:
    """GET /flux2accel/estimate through the pack's aiohttp route table, on loopback."""
    import asyncio

    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer
    from flux2_accel.nodes import routes

    async def main():
        table = web.RouteTableDef()
        routes.register(table)
        app = web.Application()
        app.add_routes(table)
        async with TestClient(TestServer(app, host="127.0.0.1")) as client:
            out = []
            for q in queries:
                reply = await client.get(routes.ESTIMATE_PATH, params=q)
                out.append((reply.status, await reply.json()))
            return out

    return asyncio.run(main())


def test_estimate_route(tiny_models, monkeypatch, tmp_path):
    pytest.importorskip("aiohttp")
    monkeypatch.setenv("FLUX2_ACCEL_MODELS_DIR", str(tiny_models.root))
    broken = tiny_models.root / "diffusion_models" / "broken_estimate.safetensors"
    broken.write_bytes(b"\x00" * 4)
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(tiny_models.files["dev_bfl"].read_bytes())
    try:
        replies = _get_estimates([
            {"kind": "diffusion_model", "name": "dev_bfl.safetensors", "precision": "nf4"},
            {"kind": "text_encoder", "name": "mistral_comfy.safetensors", "precision": "fp8_e4m3fn"},
            {"kind": "diffusion_model", "name": "[diffusers] tiny_dev", "precision": "bf16"},
            {"kind": "diffusion_model", "name": "../../" + str(outside), "precision": "bf16"},
            {"kind": "diffusion_model", "name": str(outside), "precision": "bf16"},
            {"kind": "vae", "name": "flux2-vae-tiny.safetensors", "precision": "bf16"},
            {"kind": "diffusion_model", "name": "dev_bfl.safetensors", "precision": "int3"},
            {"kind": "diffusion_model", "name": "broken_estimate.safetensors", "precision": "bf16"},
            {"kind": "text_encoder", "name": "dev_bfl.safetensors", "precision": "bf16"},
        ])
    finally:
        broken.unlink()
    f = tiny_models.files
    nf4 = estimate_weight_bytes(f["dev_bfl"], "nf4")
    assert replies[0] == (200, {"bytes": nf4, "text": f"≈{format_bytes(nf4)} at nf4"})
    te = estimate_weight_bytes(f["mistral_comfy"], "fp8_e4m3fn", layouts.TEXT_ENCODER)
    assert replies[1] == (200, {"bytes": te, "text": f"≈{format_bytes(te)} at fp8_e4m3fn"})
    assert replies[2][0] == 200 and replies[2][1]["bytes"] == estimate_weight_bytes(f["dev_folder"], "bf16")
    for status, body in replies[3:5]:  # names outside the model folders are never opened
        assert status == 400 and "is not a model in models/diffusion_models" in body["error"]
    assert replies[5] == (400, {"error": "kind 'vae' is not one of diffusion_model, text_encoder"})
    assert replies[6][0] == 400 and "precision 'int3'" in replies[6][1]["error"]
    assert replies[7][0] == 400 and "broken_estimate.safetensors" in replies[7][1]["error"]
    assert replies[8][0] == 400 and "models/text_encoders" in replies[8][1]["error"]
