"""Precision (bf16 / fp8 / fp8-fast / nf4), pre-quantized checkpoints and offloading, on tiny random models."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import sys

import layout_fixtures
import pytest
import torch
from flux2_accel.optim.errors import InputError, ModelFileError
from flux2_accel.optim.models import loading, precision, tiny
from flux2_accel.optim.models.precision import Fp8Linear
from flux2_accel.optim.models.text_encoding import Flux2Conditioning, TextEncoder
from flux2_accel.optim.run import offload
from flux2_accel.optim.run.sampling import SamplingParams, sample
from safetensors.torch import save_file

QUANTIZED = ("fp8_e4m3fn", "fp8_e4m3fn_fast", "nf4")
# Deviation of the final latents from bf16 on the same seed (measured on TINY: fp8 0.0025, nf4 0.0041).
LATENT_BOUND = {"fp8_e4m3fn": 0.01, "fp8_e4m3fn_fast": 0.01, "nf4": 0.02}
# Deviation of the text embeddings (measured: Mistral fp8 0.014, nf4 0.054; Qwen3 fp8 0.032, nf4 0.116).
TEXT_BOUND = {"fp8_e4m3fn": 0.06, "fp8_e4m3fn_fast": 0.06, "nf4": 0.20}


def _linear_types(model) -> dict[str, str]:
    return {n: type(m).__name__ for n, m in model.named_modules()
            if isinstance(m, (torch.nn.Linear, Fp8Linear)) or type(m).__name__ == "Linear4bit"}


@pytest.fixture(scope="module")
def parts():
    # The transformer in bf16 as loaded; the VAE in float32 (it only decodes, and bf16 convolutions are slow on CPU).
    return tiny.TinyComponents(tiny.TINY, tiny.build_transformer(tiny.TINY, dtype=torch.bfloat16),
                               tiny.build_vae(tiny.TINY, seed=1), None, None)


@pytest.fixture(scope="module")
def conditioning(parts):
    embeds = torch.randn(1, 16, parts.transformer.config.joint_attention_dim, generator=torch.Generator().manual_seed(3))
    return Flux2Conditioning(embeds.to(torch.bfloat16), "mistral")


PARAMS = SamplingParams(width=64, height=64, steps=2, guidance=4.0, seed=7)


@pytest.fixture(scope="module")
def bf16_latent(parts, conditioning):
    return sample(parts.transformer, parts.vae, conditioning, PARAMS)


def _forward_inputs(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg, h, w, length = model.config, 4, 4, 6
    return dict(
        hidden_states=torch.randn(1, h * w, cfg.in_channels, generator=g).bfloat16(),
        encoder_hidden_states=torch.randn(1, length, cfg.joint_attention_dim, generator=g).bfloat16(),
        timestep=torch.tensor([0.5]),
        img_ids=torch.cartesian_prod(torch.arange(1), torch.arange(h), torch.arange(w), torch.arange(1))[None],
        txt_ids=torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(length))[None],
        guidance=torch.tensor([4.0]) if cfg.guidance_embeds else None, return_dict=False)


@torch.no_grad()
def _forward(model, inputs):
    return model(**inputs)[0].float()


# ---------------------------------------------------------------- precisions on the transformer

@pytest.mark.parametrize("name", QUANTIZED)
def test_each_precision_samples_close_to_bf16(parts, conditioning, bf16_latent, name):
    model = precision.apply_precision(copy.deepcopy(parts.transformer), name)
    types = _linear_types(model)
    quantized_type = "Linear4bit" if name == "nf4" else "Fp8Linear"
    assert types["transformer_blocks.0.attn.to_q"] == quantized_type
    assert types["single_transformer_blocks.0.attn.to_qkv_mlp_proj"] == quantized_type
    for kept in ("x_embedder", "context_embedder", "proj_out", "norm_out.linear", "single_stream_modulation.linear",
                 "time_guidance_embed.timestep_embedder.linear_1"):
        assert types[kept] == "Linear" and model.get_submodule(kept).weight.dtype == torch.bfloat16
    assert model.dtype == torch.bfloat16
    latent = sample(model, parts.vae, conditioning, PARAMS)
    deviation = precision.rel_l2(latent, bf16_latent)
    assert 0 < deviation < LATENT_BOUND[name]


def test_decoded_image_psnr_against_bf16(parts, conditioning, bf16_latent):
    from flux2_accel.optim.run.latents import decode

    model = precision.apply_precision(copy.deepcopy(parts.transformer), "fp8_e4m3fn")
    image = decode(parts.vae, sample(model, parts.vae, conditioning, PARAMS))
    reference = decode(parts.vae, bf16_latent)
    assert precision.psnr(reference, reference) == float("inf")
    assert 40.0 < precision.psnr(image, reference) < float("inf")  # measured 59 dB


def test_bf16_precision_leaves_a_bf16_model_untouched(parts):
    model = copy.deepcopy(parts.transformer)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    precision.apply_precision(model, "bf16")
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_keep_list_is_overridable(parts):
    model = precision.apply_precision(copy.deepcopy(parts.transformer), "fp8_e4m3fn", keep=("proj_out",))
    types = _linear_types(model)
    assert types["x_embedder"] == "Fp8Linear" and types["single_stream_modulation.linear"] == "Fp8Linear"
    assert types["proj_out"] == "Linear"
    everything = precision.apply_precision(copy.deepcopy(parts.transformer), "fp8_e4m3fn", keep=())
    assert _linear_types(everything)["x_embedder"] == "Fp8Linear"
    assert everything.dtype == torch.bfloat16  # fp8 weights never make the model report an fp8 dtype


def test_conversions_between_precisions_dequantize_layer_by_layer(parts):
    fp8 = precision.apply_precision(copy.deepcopy(parts.transformer), "fp8_e4m3fn")
    layer = fp8.transformer_blocks[0].attn.to_q
    expected = layer.dequantized_weight()
    back = precision.apply_precision(fp8, "bf16")
    assert type(back.transformer_blocks[0].attn.to_q) is torch.nn.Linear
    assert torch.equal(back.transformer_blocks[0].attn.to_q.weight, expected)
    assert not any(isinstance(m, Fp8Linear) for m in back.modules())


def test_unknown_precision_is_an_input_error(parts):
    with pytest.raises(InputError, match="int3.*bf16, fp8_e4m3fn, fp8_e4m3fn_fast, nf4"):
        precision.apply_precision(copy.deepcopy(parts.transformer), "int3")


def test_fast_fp8_falls_back_with_one_warning_on_cpu(parts, caplog):
    assert not precision.fast_fp8_supported()
    inputs = _forward_inputs(parts.transformer)
    with caplog.at_level(logging.WARNING, logger="flux2_accel"):
        fast = precision.apply_precision(copy.deepcopy(parts.transformer), "fp8_e4m3fn_fast")
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "fp8_e4m3fn_fast" in warnings[0].getMessage()
    assert "\n" not in warnings[0].getMessage()
    layers = [m for m in fast.modules() if isinstance(m, Fp8Linear)]
    assert layers and not any(m.fast for m in layers)
    plain = precision.apply_precision(copy.deepcopy(parts.transformer), "fp8_e4m3fn")
    assert torch.equal(_forward(fast, inputs), _forward(plain, inputs))


def test_fast_fp8_matmul_matches_the_dequantized_layer():
    # torch._scaled_mm also runs on CPU, so the fp8-matmul arithmetic is checked here; on a GPU of compute
    # capability 8.9+ apply_precision turns it on.
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48).bfloat16()
    layer = Fp8Linear.from_weight(linear.weight, linear.bias)
    x = torch.randn(2, 5, 64, dtype=torch.bfloat16)
    slow = layer(x).float()
    layer.fast = True
    fast = layer(x).float()
    assert fast.shape == (2, 5, 48)
    assert not torch.equal(fast, slow)  # the fp8 path really ran (it also rounds the input to fp8)
    assert precision.rel_l2(fast, slow) < 0.05
    assert precision.rel_l2(slow, linear(x).float()) < 0.03


def test_nf4_without_bitsandbytes_is_a_clear_error(parts, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` raise ImportError
    model = copy.deepcopy(parts.transformer)
    with pytest.raises(InputError, match="nf4.*bitsandbytes.*pip install bitsandbytes"):
        precision.apply_precision(model, "nf4")
    assert all(t == "Linear" for t in _linear_types(model).values())  # nothing half-converted


def test_nf4_double_quant_option():
    # Double quantization pays off from layers of a few hundred thousand weights (a 1 KB code table per layer).
    layer = torch.nn.Sequential(torch.nn.Linear(1024, 1024)).bfloat16()
    on = precision.apply_precision(copy.deepcopy(layer), "nf4", keep=())
    off = precision.apply_precision(copy.deepcopy(layer), "nf4", keep=(), double_quant=False)
    assert on[0].weight.quant_state.nested and not off[0].weight.quant_state.nested
    assert precision.weight_bytes(on) < precision.weight_bytes(off)
    x = torch.randn(4, 1024, dtype=torch.bfloat16)
    assert abs(precision.rel_l2(on(x), layer(x)) - precision.rel_l2(off(x), layer(x))) < 0.01


# ---------------------------------------------------------------- memory

@pytest.mark.parametrize("spec,name,double_quant", [(tiny.TINY, "fp8_e4m3fn", True), (tiny.SMALL, "nf4", True),
                                                     (tiny.TINY, "nf4", False)], ids=["fp8", "nf4-small", "nf4-no-dq"])
def test_weight_bytes_estimate_equals_actual_tensor_bytes(spec, name, double_quant):
    model = tiny.build_transformer(spec, dtype=torch.bfloat16)
    estimate = precision.estimated_weight_bytes(model, name, double_quant=double_quant)
    bf16 = precision.weight_bytes(model)
    assert precision.estimated_weight_bytes(model, "bf16") == bf16
    precision.apply_precision(model, name, double_quant=double_quant)
    assert precision.weight_bytes(model) == estimate < bf16


def test_memory_ratio_at_dev_proportions():
    from accelerate import init_empty_weights
    from diffusers import Flux2Transformer2DModel

    with init_empty_weights():  # FLUX.2 [dev]'s real configuration, counted without memory
        dev = Flux2Transformer2DModel(patch_size=1, in_channels=128, num_layers=8, num_single_layers=48,
                                      attention_head_dim=128, num_attention_heads=48, joint_attention_dim=15360,
                                      timestep_guidance_channels=256, axes_dims_rope=(32, 32, 32, 32),
                                      guidance_embeds=True)
    bf16 = precision.estimated_weight_bytes(dev, "bf16")
    assert 64.0e9 < bf16 < 65.0e9  # 32.2B parameters
    assert precision.estimated_weight_bytes(dev, "fp8_e4m3fn") / bf16 <= 0.52
    assert precision.estimated_weight_bytes(dev, "nf4") / bf16 <= 0.30


# ---------------------------------------------------------------- text encoder

# Text widths that are multiples of bitsandbytes' 64-value block, as in every real FLUX.2 text encoder: with
# narrower rows, bitsandbytes 0.49-0.50's x86 AVX-512 CPU kernel reads one block scale for a whole row and the nf4
# error measured here would be its bug's, not the quantization's.
@pytest.fixture(scope="module", params=[tiny.TINY, tiny.TINY_KLEIN], ids=["mistral", "qwen3"])
def text_parts(request):
    spec = dataclasses.replace(request.param, text_hidden_size=64, text_head_dim=64)
    model = tiny.build_text_encoder(spec, dtype=torch.bfloat16)
    tokenizer = tiny.build_tokenizer(spec.family)
    family = "mistral" if spec.family == "dev" else "qwen3"
    reference = TextEncoder(model, tokenizer, family, spec.text_out_layers).encode(["a red dog in the city"],
                                                                                     max_sequence_length=32)
    return model, tokenizer, family, spec, reference


@pytest.mark.parametrize("name", QUANTIZED)
def test_text_encoder_precisions_encode_close_to_bf16(text_parts, name):
    model, tokenizer, family, spec, reference = text_parts
    quantized = precision.apply_text_encoder_precision(copy.deepcopy(model), name)
    types = _linear_types(quantized)
    want = "Linear4bit" if name == "nf4" else "Fp8Linear"
    projections = [n for n in types if n.endswith("self_attn.q_proj") or n.endswith("mlp.down_proj")]
    assert projections and all(types[n] == want for n in projections)
    embed = quantized.get_input_embeddings()
    assert type(embed) is torch.nn.Embedding and embed.weight.dtype == torch.bfloat16
    out = TextEncoder(quantized, tokenizer, family, spec.text_out_layers).encode(["a red dog in the city"],
                                                                                 max_sequence_length=32)
    assert out.prompt_embeds.shape == reference.prompt_embeds.shape
    assert 0 < precision.rel_l2(out.prompt_embeds, reference.prompt_embeds) < TEXT_BOUND[name]


# ---------------------------------------------------------------- pre-quantized checkpoints

def _block_linear(key: str, value: torch.Tensor) -> bool:
    return "blocks." in key and key.endswith(".weight") and value.ndim == 2


def _comfy_quant(fmt: str) -> torch.Tensor:
    return torch.tensor(list(json.dumps({"format": fmt}).encode()), dtype=torch.uint8)


def _quantize_file(bfl: dict, kind: str) -> tuple[dict, dict]:
    """(file tensors, dequantized reference tensors) with the blocks' Linear weights quantized as `kind`."""
    from diffusers.quantizers.bfl.utils import dequantize_nvfp4, quantize_fp8r, quantize_nvfp4

    file, reference = {}, {}
    for k, v in bfl.items():
        base = k[: -len(".weight")]
        if not _block_linear(k, v):
            file[k] = reference[k] = v
        elif kind == "comfy_fp8":  # Comfy-Org "mixed": scalar per-tensor scale + .comfy_quant
            scale = (v.float().abs().max() / 448.0).float()
            file[k] = (v.float() / scale).clamp(-448, 448).to(torch.float8_e4m3fn)
            file[base + ".weight_scale"], file[base + ".comfy_quant"] = scale, _comfy_quant("float8_e4m3fn")
            reference[k] = (file[k].float() * scale).bfloat16()
        elif kind == "fp8r":  # BFL fp8r: one scale per row
            file[k], file[base + ".weight_scale"] = quantize_fp8r(v)
            reference[k] = (file[k].float() * file[base + ".weight_scale"][:, None]).bfloat16()
        elif kind == "nvfp4":  # BFL nvfp4: element 2i in the low nibble, row-major block scales
            q, s, s2 = quantize_nvfp4(v)
            file[k], file[base + ".weight_scale"], file[base + ".weight_scale_2"] = q, s, s2.float()
            file[base + ".input_scale"] = torch.tensor(1.0)
            reference[k] = dequantize_nvfp4(q, s, s2.float()).bfloat16()
        else:  # ComfyUI nvfp4 (comfy-kitchen): high nibble first, block scales in cuBLAS 128x4 tiles
            q, s, s2 = quantize_nvfp4(v)
            file[k] = (q << 4) | (q >> 4)
            file[base + ".weight_scale"] = _swizzle(s)
            file[base + ".weight_scale_2"], file[base + ".comfy_quant"] = s2.float(), _comfy_quant("nvfp4")
            reference[k] = dequantize_nvfp4(q, s, s2.float()).bfloat16()
    return file, reference


def _swizzle(scales: torch.Tensor) -> torch.Tensor:
    """Row-major [rows, cols] block scales -> cuBLAS' tiled layout, element by element from its definition: 128x4
    tiles, row-major over tiles, (r, c) at (r % 32) * 16 + (r // 32) * 4 + c inside a tile."""
    rows, cols = scales.shape
    tile_cols = -(-cols // 4)
    out = torch.zeros(-(-rows // 128) * 128 * tile_cols * 4, dtype=torch.uint8)
    flat = scales.view(torch.uint8)
    for r in range(rows):
        for c in range(cols):
            tile = (r // 128) * tile_cols + c // 4
            out[tile * 512 + (r % 32) * 16 + ((r % 128) // 32) * 4 + c % 4] = flat[r, c]
    return out.view(torch.float8_e4m3fn)


@pytest.fixture(scope="module")
def bfl_reference(parts):
    cfg = parts.transformer.config
    return layout_fixtures.transformer_to_bfl(parts.transformer.state_dict(), cfg.num_layers, cfg.num_single_layers)


def _reference_model(reference_bfl: dict, tmp_path) -> torch.nn.Module:
    path = tmp_path / "reference.safetensors"
    save_file(reference_bfl, str(path))
    return loading.load_transformer(path)


@pytest.mark.parametrize("kind,prefix", [("comfy_fp8", "model.diffusion_model."), ("fp8r", ""), ("nvfp4", ""),
                                         ("comfy_nvfp4", "model.diffusion_model.")])
def test_prequantized_single_files_load_within_tolerance(parts, bfl_reference, tmp_path, kind, prefix):
    file, reference = _quantize_file(bfl_reference, kind)
    path = tmp_path / f"{kind}.safetensors"
    save_file({prefix + k: v for k, v in file.items()}, str(path))
    loaded = loading.load_transformer(path)
    expected = _reference_model(reference, tmp_path)
    inputs = _forward_inputs(parts.transformer)
    if kind.endswith("nvfp4"):  # dequantized at load: exactly its reference
        assert not any(isinstance(m, Fp8Linear) for m in loaded.modules())
        assert torch.equal(_forward(loaded, inputs), _forward(expected, inputs))
        return
    # fp8 stays fp8 with the file's own values (qkv split from the fused BFL tensor, scales split alike)...
    to_k = loaded.transformer_blocks[0].attn.to_k
    assert isinstance(to_k, Fp8Linear) and to_k.weight.dtype == torch.float8_e4m3fn
    fused = file["double_blocks.0.img_attn.qkv.weight"]
    assert torch.equal(to_k.weight.view(torch.uint8), fused.chunk(3)[1].view(torch.uint8))
    assert precision.rel_l2(_forward(loaded, inputs), _forward(expected, inputs)) < 0.02
    # ...keeps them at fp8 precision, and is exactly its dequantized reference at bf16.
    kept = precision.apply_precision(loaded, "fp8_e4m3fn")
    assert kept.transformer_blocks[0].attn.to_k is to_k
    as_bf16 = precision.apply_precision(loaded, "bf16")
    assert torch.equal(_forward(as_bf16, inputs), _forward(expected, inputs))


def test_fp8_file_asked_for_float32_is_dequantized(bfl_reference, tmp_path):
    file, _ = _quantize_file(bfl_reference, "fp8r")
    path = tmp_path / "fp8r.safetensors"
    save_file(file, str(path))
    loaded = loading.load_transformer(path, dtype=torch.float32)
    to_v = loaded.transformer_blocks[0].attn.to_v
    assert type(to_v) is torch.nn.Linear and to_v.weight.dtype == torch.float32
    q, scale = file["double_blocks.0.img_attn.qkv.weight"], file["double_blocks.0.img_attn.qkv.weight_scale"]
    assert torch.equal(to_v.weight, (q.float() * scale[:, None]).chunk(3)[2])


def test_fp8_weight_missing_its_scale_is_caught(bfl_reference, tmp_path):
    file, _ = _quantize_file(bfl_reference, "comfy_fp8")
    del file["single_blocks.1.linear2.weight_scale"]
    path = tmp_path / "damaged.safetensors"
    save_file(file, str(path))
    with pytest.raises(ModelFileError, match=r"damaged.safetensors.*single_blocks\.1\.linear2\.weight.*no scale"):
        loading.load_transformer(path)


def test_fp8_file_stripped_of_all_scales_is_caught(bfl_reference, tmp_path):
    file, _ = _quantize_file(bfl_reference, "comfy_fp8")
    stripped = {k: v for k, v in file.items() if not k.endswith((".weight_scale", ".comfy_quant"))}
    path = tmp_path / "stripped.safetensors"
    save_file(stripped, str(path))
    with pytest.raises(ModelFileError, match="stored scaled.*no scale tensors"):
        loading.load_transformer(path)


def test_plain_fp8_cast_without_scales_loads_as_is(parts, bfl_reference, tmp_path):
    file = {k: (v.to(torch.float8_e4m3fn) if _block_linear(k, v) else v) for k, v in bfl_reference.items()}
    reference = {k: (v.bfloat16() if v.dtype == torch.float8_e4m3fn else v) for k, v in file.items()}
    path = tmp_path / "plain_fp8.safetensors"
    save_file(file, str(path))
    loaded = precision.apply_precision(loading.load_transformer(path), "bf16")
    inputs = _forward_inputs(parts.transformer)
    assert torch.equal(_forward(loaded, inputs), _forward(_reference_model(reference, tmp_path), inputs))


def test_fp8_weights_in_a_plain_diffusers_folder_are_refused(parts, tmp_path):
    folder = tmp_path / "fp8_folder"
    parts.transformer.save_pretrained(folder)
    sd = {k: (v.to(torch.float8_e4m3fn) if "blocks" in k and v.ndim == 2 else v)
          for k, v in parts.transformer.state_dict().items()}
    save_file(sd, str(folder / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(ModelFileError, match="fp8 weights.*no quantization_config"):
        loading.load_transformer(folder)


def test_bnb_4bit_diffusers_folder_loads_on_cpu(parts, tmp_path):
    from diffusers import BitsAndBytesConfig

    quantized = precision.apply_precision(copy.deepcopy(parts.transformer), "nf4")
    folder = tmp_path / "FLUX.2-tiny-bnb-4bit" / "transformer"
    parts.transformer.save_config(folder)
    config = json.loads((folder / "config.json").read_text())
    qcfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
                              bnb_4bit_use_double_quant=True)
    config["quantization_config"] = json.loads(json.dumps(qcfg.to_dict(), default=str))
    (folder / "config.json").write_text(json.dumps(config))
    # The keys diffusers writes for a bnb model: Linear4bit's own state dict (weight + quant_state tensors).
    state = {k: v.contiguous() for k, v in quantized.state_dict().items()}
    assert "transformer_blocks.0.attn.to_q.weight.quant_state.bitsandbytes__nf4" in state
    save_file(state, str(folder / "diffusion_pytorch_model.safetensors"))

    loaded = loading.load_transformer(folder.parent / "transformer")
    assert type(loaded.transformer_blocks[0].attn.to_q).__name__ == "Linear4bit"
    inputs = _forward_inputs(parts.transformer)
    assert torch.equal(_forward(loaded, inputs), _forward(quantized, inputs))
    # Asked for another precision, the 4-bit layers are dequantized (nf4 keeps them as they came).
    assert precision.apply_precision(loaded, "nf4").transformer_blocks[0].attn.to_q.weight.quant_state.nested
    dequantized = precision.apply_precision(loaded, "bf16")
    assert precision.rel_l2(_forward(dequantized, inputs), _forward(quantized, inputs)) < 0.02


def test_prequantized_text_encoder_file_keeps_fp8(tmp_path):
    model = tiny.build_text_encoder(tiny.TINY, dtype=torch.bfloat16)
    tokenizer = tiny.build_tokenizer("dev")
    sd = {k: v for k, v in model.state_dict().items() if k.startswith("model.language_model.")}
    file, reference = {}, {}
    for k, v in sd.items():
        if ".layers." in k and k.endswith("proj.weight"):
            scale = (v.float().abs().max() / 448.0).float()
            file[k] = (v.float() / scale).to(torch.float8_e4m3fn)
            file[k[: -len(".weight")] + ".weight_scale"] = scale
            reference[k] = (file[k].float() * scale).bfloat16()
        else:
            file[k] = reference[k] = v
    path = tmp_path / "te_fp8.safetensors"
    save_file(file, str(path))
    save_file(reference, str(tmp_path / "te_ref.safetensors"))
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    loaded = loading.load_text_encoder(path)
    assert isinstance(loaded.model.layers[0].mlp.gate_proj, Fp8Linear)
    expected = loading.load_text_encoder(tmp_path / "te_ref.safetensors")
    got = loaded.encode(["a red dog"], max_sequence_length=32).prompt_embeds
    want = expected.encode(["a red dog"], max_sequence_length=32).prompt_embeds
    assert precision.rel_l2(got, want) < 0.02
    as_bf16 = precision.apply_text_encoder_precision(loaded.model, "bf16")
    assert torch.equal(TextEncoder(as_bf16, loaded.tokenizer, "mistral", loaded.out_layers)
                       .encode(["a red dog"], max_sequence_length=32).prompt_embeds, want)


# ---------------------------------------------------------------- offloading

def test_offload_on_cpu_is_a_logged_no_op(parts, caplog):
    with caplog.at_level(logging.INFO, logger="flux2_accel"):
        with offload.offloaded("group", transformer=parts.transformer, vae=parts.vae) as device:
            assert device.type == "cpu"
            assert not offload.has_offload_hooks(parts.transformer)
    assert any("no effect without a GPU" in r.getMessage() for r in caplog.records)


def test_offload_mode_errors(parts):
    with pytest.raises(InputError, match="'disk'.*none, model_cpu, sequential, group"):
        with offload.offloaded("disk", transformer=parts.transformer):
            pass
    nf4 = precision.apply_precision(copy.deepcopy(parts.transformer), "nf4")
    with pytest.raises(InputError, match="sequential.*nf4"):
        with offload.offloaded("sequential", transformer=nf4):
            pass


@pytest.mark.parametrize("name", ["bf16", "fp8_e4m3fn"])
@pytest.mark.parametrize("mode", ["model_cpu", "sequential", "group"])
def test_offload_hooks_run_and_come_off_again(parts, mode, name):
    # With the CPU as the "GPU" the hooks do real work (moving tensors, onloading groups) and must leave the
    # shared modules exactly as they were.
    model = precision.apply_precision(copy.deepcopy(parts.transformer), name)
    vae = copy.deepcopy(parts.vae)
    inputs = _forward_inputs(model)
    latent = torch.randn(1, tiny.TINY.latent_channels, 4, 4, generator=torch.Generator().manual_seed(1))

    def decode(vae, z):  # the VAE runs through `decode`, which the offload hooks must cover too
        with torch.no_grad():
            return vae.decode(z, return_dict=False)[0]

    expected, expected_image = _forward(model, inputs), decode(vae, latent)
    cpu = torch.device("cpu")
    hooks = offload._install(mode, [model, vae], cpu, num_blocks_per_group=1, use_stream=False, block_level=(model,))
    assert offload.has_offload_hooks(model) and offload.has_offload_hooks(vae)
    if mode == "sequential":  # every weight, fp8 buffers included, waits off the execution device
        assert {t.device.type for t in list(model.parameters()) + list(model.buffers())} == {"meta"}
    assert torch.equal(_forward(model, inputs), expected)
    assert torch.equal(decode(vae, latent), expected_image)
    offload._remove(mode, [model, vae], hooks)
    assert not offload.has_offload_hooks(model) and not offload.has_offload_hooks(vae)
    assert all(p.device == cpu for p in list(model.parameters()) + list(vae.parameters()))
    assert torch.equal(_forward(model, inputs), expected)


def test_bnb_4bit_text_encoder_folder_loads_on_cpu(tmp_path):
    # transformers reads bitsandbytes 4-bit folders on CPU itself; the precision step keeps or dequantizes them.
    from transformers import BitsAndBytesConfig, Qwen3ForCausalLM

    folder = tmp_path / "qwen_bf16"
    tiny.build_text_encoder(tiny.TINY_KLEIN, dtype=torch.bfloat16).save_pretrained(folder)
    qcfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    reference = Qwen3ForCausalLM.from_pretrained(folder, quantization_config=qcfg, device_map="cpu")
    precision.keep_portable_4bit_layouts(reference)  # as the pack's loader does (AVX512-BF16 CPUs repack otherwise)
    reference.save_pretrained(tmp_path / "qwen_nf4")
    tiny.build_tokenizer("klein").save_pretrained(tmp_path / "qwen_nf4")
    loaded = loading.load_text_encoder(tmp_path / "qwen_nf4")
    assert type(loaded.model.model.layers[0].mlp.gate_proj).__name__ == "Linear4bit"
    want = TextEncoder(reference, loaded.tokenizer, "qwen3", loaded.out_layers).encode(["a cat"], 32).prompt_embeds
    kept = precision.apply_text_encoder_precision(loaded.model, "nf4")
    assert type(kept.model.layers[0].mlp.gate_proj).__name__ == "Linear4bit"
    assert torch.equal(loaded.encode(["a cat"], 32).prompt_embeds, want)
