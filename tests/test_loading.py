"""Loaders: every layout loads, every architecture parameter reads back, bad files fail clearly."""

from __future__ import annotations

import json

import layout_fixtures
import pytest
import torch
from flux2_accel.optim.errors import ModelFileError
from flux2_accel.optim.models import arch, loading
from flux2_accel.optim.models.checkpoint import open_checkpoint
from layout_fixtures import TEKKEN_SPECIALS, tekken_tensor
from safetensors.torch import save_file

TRANSFORMER_LAYOUTS = ["bfl", "comfy", "diffusers_file", "folder"]


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k].float(), sb[k].float()) for k in sa)


@pytest.mark.parametrize("family", ["dev", "klein"])
@pytest.mark.parametrize("layout", TRANSFORMER_LAYOUTS)
def test_transformer_layouts_load_exactly(tiny_models, family, layout):
    ref = getattr(tiny_models, family).transformer
    model = loading.load_transformer(tiny_models.files[f"{family}_{layout}"], dtype=torch.float32)
    for key, value in ref.config.items():
        if not key.startswith("_"):
            got = model.config[key]
            assert (tuple(got) if isinstance(got, (list, tuple)) else got) == \
                (tuple(value) if isinstance(value, (list, tuple)) else value), key
    assert _same_weights(model, ref)


def test_transformer_config_at_real_sizes():
    """dev, klein-4B and klein-9B proportions read back from shapes alone (meta tensors, no weights)."""
    from diffusers import Flux2Transformer2DModel

    cases = {"dev": dict(num_layers=8, num_single_layers=48, num_attention_heads=48, joint_attention_dim=15360,
                         guidance_embeds=True),
             "klein-4b": dict(num_layers=5, num_single_layers=20, num_attention_heads=24, joint_attention_dim=7680,
                              guidance_embeds=False),
             "klein-9b": dict(num_layers=8, num_single_layers=24, num_attention_heads=32, joint_attention_dim=12288,
                              guidance_embeds=False)}
    for name, cfg in cases.items():
        with torch.device("meta"):
            m = Flux2Transformer2DModel(**cfg)
        got = arch.transformer_config({k: tuple(v.shape) for k, v in m.state_dict().items()}, name)
        for key, value in cfg.items():
            assert got[key] == value, (name, key)
        assert got["in_channels"] == 128 and got["attention_head_dim"] == 128 and got["axes_dims_rope"] == (32,) * 4


@pytest.mark.parametrize("label", ["vae_ldm", "vae_diffusers_file", "dev_folder"])
def test_vae_layouts_load_exactly(tiny_models, label):
    ref = tiny_models.dev.vae
    vae = loading.load_vae(tiny_models.files[label])
    for key in ("block_out_channels", "latent_channels", "layers_per_block", "use_quant_conv", "use_post_quant_conv",
                "mid_block_add_attention", "norm_num_groups", "in_channels", "out_channels"):
        assert vae.config[key] == ref.config[key] or tuple(vae.config[key]) == tuple(ref.config[key]), key
    assert _same_weights(vae, ref)


def _reference_embeds(components, prompt):
    pipe = layout_fixtures.full_pipeline(components)
    embeds, _ = pipe.encode_prompt(prompt, text_encoder_out_layers=components.spec.text_out_layers)
    return embeds


@pytest.mark.parametrize("label,family", [("mistral_comfy", "dev"), ("mistral_hf_file", "dev"),
                                          ("dev_folder", "dev"), ("qwen_comfy", "klein"), ("klein_folder", "klein")])
def test_text_encoder_layouts_match_diffusers(tiny_models, label, family):
    comps = getattr(tiny_models, family)
    path = tiny_models.files[label]
    tok = None
    if label == "mistral_hf_file":
        tok = tiny_models.root / "text_encoders" / "mistral_comfy_tokenizer"
    enc = loading.load_text_encoder(path, dtype=torch.float32, tokenizer_path=tok)
    assert enc.out_layers == comps.spec.text_out_layers
    got = enc.encode("a red dog in a green house").prompt_embeds
    assert torch.equal(got, _reference_embeds(comps, "a red dog in a green house"))


def test_text_encoder_config_reads_back(tiny_models):
    spec = tiny_models.dev.spec
    ckpt = open_checkpoint(tiny_models.files["mistral_comfy"])
    shapes = {k[len("model."):]: v.shape for k, v in ckpt.tensors.items()}
    cfg, out_layers = arch.text_encoder_config(shapes, "mistral")
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["head_dim"],
            cfg["num_key_value_heads"], cfg["intermediate_size"]) == (
        spec.text_hidden_size, spec.text_layers, spec.text_heads, spec.text_head_dim, spec.text_heads,
        2 * spec.text_hidden_size)
    assert out_layers == spec.text_out_layers
    assert arch.text_out_layers("mistral", 5120, 40) == (10, 20, 30)
    assert arch.text_out_layers("qwen3", 2560, 36) == (9, 18, 27)


def test_embedded_tekken_tokenizer(tiny_models, tmp_path):
    """Comfy-Org's Mistral files carry their vocabulary as a `tekken_model` tensor; it must be used."""
    from flux2_accel.optim.models import tiny

    words = ["a", " red", " dog", "You", " are", " an", " AI"]
    tekken = tekken_tensor(words, TEKKEN_SPECIALS)
    sd = {k: v for k, v in open_checkpoint(tiny_models.files["mistral_comfy"]).load().items()}
    vocab = len(TEKKEN_SPECIALS) + 256 + 40
    sd["model.embed_tokens.weight"] = torch.randn(vocab, tiny.TINY.text_hidden_size)
    path = tmp_path / "mistral_tekken.safetensors"
    save_file({**sd, "tekken_model": tekken}, str(path))
    enc = loading.load_text_encoder(path, dtype=torch.float32)
    ids = enc.tokenizer("a red dog")["input_ids"]
    assert enc.tokenizer.convert_tokens_to_ids("[INST]") == TEKKEN_SPECIALS.index("[INST]")
    assert len(ids) == 3 and all(i >= len(TEKKEN_SPECIALS) for i in ids)
    assert enc.encode("a red dog").prompt_embeds.shape == (1, 512, 3 * tiny.TINY.text_hidden_size)


def test_fp8_scaled_file_is_upcast_with_its_scales(tiny_models, tmp_path):
    ref_sd = open_checkpoint(tiny_models.files["dev_bfl"]).load()
    quant = {}
    for k, v in ref_sd.items():
        if k.endswith(".weight") and v.ndim == 2 and "blocks" in k:
            scale = v.abs().max() / 448.0
            quant[k] = (v / scale).to(torch.float8_e4m3fn)
            quant[k[:-7] + ".weight_scale"] = scale.float()
            quant[k[:-7] + ".comfy_quant"] = torch.tensor(list(json.dumps({"format": "float8_e4m3fn"}).encode()),
                                                          dtype=torch.uint8)
        else:
            quant[k] = v
    path = tmp_path / "fp8_mixed.safetensors"
    save_file({"model.diffusion_model." + k: v for k, v in quant.items()}, str(path))
    model = loading.load_transformer(path, dtype=torch.float32)
    ref = tiny_models.dev.transformer.state_dict()
    w, r = model.state_dict()["transformer_blocks.0.attn.to_q.weight"], ref["transformer_blocks.0.attn.to_q.weight"]
    assert ((w - r).norm() / r.norm()) < 0.05
    # Without its scales the same file would be off by orders of magnitude: prove the scales were applied.
    unscaled = quant["double_blocks.0.img_attn.qkv.weight"].float().chunk(3)[0]
    assert ((unscaled - r).norm() / r.norm()) > 10


# ---------------------------------------------------------------- bad input

def test_missing_file(tmp_path):
    with pytest.raises(ModelFileError, match="not found.*nope.safetensors"):
        loading.load_transformer(tmp_path / "nope.safetensors")


def test_truncated_file(tiny_models, tmp_path):
    data = tiny_models.files["dev_bfl"].read_bytes()
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match="cut.safetensors.*truncated"):
        loading.load_transformer(path)


def test_corrupt_header(tmp_path):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(ModelFileError, match="junk.safetensors.*corrupt"):
        loading.load_transformer(path)


def test_pickle_files_are_refused(tmp_path):
    path = tmp_path / "model.ckpt"
    path.write_bytes(b"\x80\x04junk")
    with pytest.raises(ModelFileError, match="model.ckpt.*safetensors"):
        loading.load_transformer(path)


def test_flux1_checkpoint_is_named(tmp_path):
    path = tmp_path / "flux1-dev.safetensors"
    save_file({"double_blocks.0.img_mod.lin.weight": torch.zeros(4, 4), "vector_in.in_layer.weight": torch.zeros(4, 4)},
              str(path))
    with pytest.raises(ModelFileError, match="flux1-dev.safetensors.*FLUX.1"):
        loading.load_transformer(path)


def test_vae_given_as_transformer(tiny_models):
    with pytest.raises(ModelFileError, match="flux2-vae-tiny.safetensors.*a VAE.*models/vae"):
        loading.load_transformer(tiny_models.files["vae_ldm"])


def test_transformer_given_as_text_encoder(tiny_models):
    with pytest.raises(ModelFileError, match="dev_bfl.safetensors.*diffusion model.*not a text encoder"):
        loading.load_text_encoder(tiny_models.files["dev_bfl"])


def test_incomplete_transformer(tiny_models, tmp_path):
    sd = open_checkpoint(tiny_models.files["dev_bfl"]).load()
    del sd["single_blocks.1.linear2.weight"]
    path = tmp_path / "partial.safetensors"
    save_file(sd, str(path))
    with pytest.raises(ModelFileError, match="partial.safetensors.*missing 1 tensors"):
        loading.load_transformer(path)


def test_text_encoder_without_tokenizer(tiny_models, tmp_path):
    path = tmp_path / "lonely_qwen.safetensors"
    path.write_bytes(tiny_models.files["qwen_comfy"].read_bytes())
    with pytest.raises(ModelFileError, match="No tokenizer found for 'lonely_qwen.safetensors'"):
        loading.load_text_encoder(path)


@pytest.fixture(scope="module")
def proportioned_checkpoints(tmp_path_factory):
    """bf16 and fp32 single files of a transformer with a real model's proportions: many blocks, none of them a
    large share of the file (in [dev] the largest layer is 1% of the weights), so per-layer temporaries are small."""
    import dataclasses

    from diffusers import Flux2Transformer2DModel
    from flux2_accel.optim.models import tiny

    spec = dataclasses.replace(tiny.SMALL, num_layers=2, num_single_layers=12, attention_head_dim=64,
                               num_attention_heads=8)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Flux2Transformer2DModel(**spec.transformer_config()).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    weights = {k: torch.randn(s, generator=g) * 0.02 for k, s in shapes.items()}
    folder = tmp_path_factory.mktemp("proportioned")
    files = {"bf16": folder / "bf16.safetensors", "fp32": folder / "fp32.safetensors"}
    save_file({k: v.to(torch.bfloat16) for k, v in weights.items()}, str(files["bf16"]))
    save_file(weights, str(files["fp32"]))
    return files


@pytest.mark.parametrize("stored, precision", [("bf16", "bf16"), ("bf16", "fp8_e4m3fn"), ("bf16", "nf4"),
                                               ("fp32", "fp8_e4m3fn")])
def test_single_file_loading_peaks_below_1_3x_the_file(proportioned_checkpoints, stored, precision):
    """Peak resident memory while loading (and converting) stays under 1.3x the file: the weights are never held
    twice, and each converted layer's file pages are given back as its copy is made."""
    import subprocess
    import sys
    import textwrap

    path = proportioned_checkpoints[stored]
    # VmHWM after a reset through clear_refs: ru_maxrss would carry over the forking pytest process's peak.
    script = textwrap.dedent(f"""
        import torch
        from flux2_accel.optim.models import loading, precision
        import accelerate, bitsandbytes.functional, bitsandbytes.nn  # imported up front: only the load is measured
        from diffusers import Flux2Transformer2DModel

        def kib(field):
            return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field))

        open("/proc/self/clear_refs", "w").write("5")
        before = kib("VmRSS:")
        model = precision.apply_precision(loading.load_transformer({str(path)!r}, dtype=torch.bfloat16),
                                          {precision!r})
        print((kib("VmHWM:") - before) * 1024, precision.weight_bytes(model))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    peak_growth, model_bytes = map(int, out.stdout.strip().splitlines()[-1].split())
    assert 0 < peak_growth <= 1.3 * path.stat().st_size, (peak_growth, path.stat().st_size)
    assert model_bytes < path.stat().st_size or precision == "bf16"


def test_released_checkpoint_pages_leave_the_resident_set_and_read_back_from_the_file(tmp_path):
    from flux2_accel.optim.models.checkpoint import MappedCheckpoints

    path = tmp_path / "pages.safetensors"
    save_file({"big": torch.arange(4 << 20, dtype=torch.float32), "after": torch.ones(3)}, str(path))
    tensors = open_checkpoint(path).load()
    expected = torch.arange(4 << 20, dtype=torch.float32)
    assert torch.equal(tensors["big"], expected)  # every page of it is resident now

    def file_rss_kib():
        return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("RssFile"))

    mapped = MappedCheckpoints.snapshot()
    before = file_rss_kib()
    released = mapped.release(tensors["big"])
    assert released >= (16 << 20) - 2 * 4096 and file_rss_kib() <= before - (released >> 10) + 64
    assert torch.equal(tensors["big"], expected) and torch.equal(tensors["after"], torch.ones(3))
    anonymous = torch.arange(4 << 20, dtype=torch.float32)
    assert mapped.release(anonymous) == 0 and torch.equal(anonymous, expected)  # only checkpoint pages, never others

def _fp8_file_without_scales(tiny_models, tmp_path, peak: float):
    """BFL fp8 file with no scale tensors: block weights plainly cast, one of them stretched to reach `peak`."""
    out = {}
    for k, v in open_checkpoint(tiny_models.files["dev_bfl"]).load().items():
        if "blocks." in k and k.endswith(".weight") and v.ndim == 2:
            v = (v * (peak / v.abs().max()) if k == "single_blocks.0.linear1.weight" else v).to(torch.float8_e4m3fn)
        out[k] = v
    path = tmp_path / f"fp8_peak{peak:g}.safetensors"
    save_file(out, str(path))
    return path


def _tiny_forward(model):
    g = torch.Generator().manual_seed(0)
    cfg = model.config
    with torch.no_grad():
        return model(hidden_states=torch.randn(1, 16, cfg.in_channels, generator=g).bfloat16(),
                     encoder_hidden_states=torch.randn(1, 6, cfg.joint_attention_dim, generator=g).bfloat16(),
                     timestep=torch.tensor([0.5]), guidance=torch.tensor([4.0]),
                     img_ids=torch.cartesian_prod(*(torch.arange(n) for n in (1, 4, 4, 1)))[None],
                     txt_ids=torch.cartesian_prod(*(torch.arange(n) for n in (1, 1, 1, 6)))[None],
                     return_dict=False)[0]


def test_unscaled_fp8_is_accepted_at_real_weight_peaks_and_refused_far_above(tiny_models, tmp_path):
    """fp8 values up to 448 are all legal; without scales, only what real weights reach (well below 30 in FLUX.2)
    is read as a weight. A tensor reaching 200 lost its scale (or is not a weight): refused, naming it."""
    realistic = loading.load_transformer(_fp8_file_without_scales(tiny_models, tmp_path, 20.0))
    assert realistic.single_transformer_blocks[0].attn.to_qkv_mlp_proj.weight.float().abs().max() == 20
    assert _tiny_forward(realistic).isfinite().all()
    with pytest.raises(ModelFileError, match=r"fp8_peak200.safetensors.*single_blocks\.0\.linear1\.weight.*reaches"):
        loading.load_transformer(_fp8_file_without_scales(tiny_models, tmp_path, 200.0))
