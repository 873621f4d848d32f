"""Hostile and damaged model inputs, one case each: every one is refused with a pack error naming the file, field or
setting at fault, before anything is built or applied, and leaves the shared model store as it was."""

from __future__ import annotations

import json
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from flux2_accel.nodes import comfy_services
from flux2_accel.optim.errors import ModelFileError
from flux2_accel.optim.features.lora import LoraSpec
from flux2_accel.optim.features.lora.stack import tuner_layers
from flux2_accel.optim.handle import ModelHandle, TextEncoderHandle, VaeHandle
from flux2_accel.optim.run.store import STORE
from safetensors.torch import load_file, save_file

pytestmark = pytest.mark.usefixtures("comfyui_inference_mode")  # as ComfyUI runs prompts


# ---------------------------------------------------------------- building bad inputs

def _pipeline_copy(tiny_models, tmp_path) -> Path:
    """A private copy of the tiny [dev] diffusers pipeline folder, to damage."""
    return Path(shutil.copytree(tiny_models.files["dev_folder"], tmp_path / "pipe"))


def _edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _edit_weights(path: Path, edit: Callable[[dict], None]) -> None:
    sd = load_file(str(path))
    edit(sd)
    save_file(sd, str(path))


def _raw_safetensors(path: Path, header: dict, data: bytes = b"\0" * 16) -> Path:
    """A file with exactly this header, as a hand-edited or hostile file would have it."""
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)
    return path


def _deep_header(path: Path, where: str) -> Path:
    """A safetensors file whose header JSON nests 100,000 deep (`where`: in a tensor entry, the metadata, or the
    whole header), as no writer makes one: json's parser would recurse until RecursionError."""
    deep = "[" * 100_000 + "]" * 100_000
    entry = '{"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}'
    header = {"entry": '{"x_embedder.weight": {"dtype": "F32", "shape": %s, "data_offsets": [0, 16]}}' % deep,
              "metadata": '{"__metadata__": {"a": %s}, "x_embedder.weight": %s}' % (deep, entry),
              "whole": deep}[where].encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    return path


def _with_dtype(source_key: str, key: str, dtype: torch.dtype, name: str):
    """A copy of a tiny single file with one tensor stored as `dtype` (an integer or bool)."""
    def build(tiny_models, tmp_path):
        sd = load_file(str(tiny_models.files[source_key]))
        sd[key] = sd[key].round().to(dtype)
        path = tmp_path / name
        save_file(sd, str(path))
        return path
    return build


def _one_tensor(**entry) -> dict:
    return {"x_embedder.weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16], **entry}}


def _lora(tmp_path, name: str, poison=None, **extra) -> Path:
    """A diffusers-layout LoRA on one attention projection of the tiny transformer (32 -> 32, rank 4)."""
    g = torch.Generator().manual_seed(3)
    sd = {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(4, 32, generator=g),
          "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(32, 4, generator=g)}
    if poison is not None:
        sd["transformer.transformer_blocks.0.attn.to_q.lora_B.weight"][5, 1] = poison
    sd.update(extra.pop("tensors", {}))
    path = tmp_path / name
    save_file(sd, str(path), metadata=extra.pop("metadata", None))
    return path


def _fp8_with_one_scaled_tensor(tiny_models, tmp_path, peak: float) -> Path:
    """A BFL fp8 file without scale tensors: block weights plainly cast, one scaled to reach `peak`."""
    bfl = load_file(str(tiny_models.files["dev_bfl"]))
    out = {}
    for k, v in bfl.items():
        if "blocks." in k and k.endswith(".weight") and v.ndim == 2:
            v = v * (peak / v.abs().max()) if k == "single_blocks.0.linear1.weight" else v
            v = v.to(torch.float8_e4m3fn)
        out[k] = v
    path = tmp_path / f"fp8_peak{peak:g}.safetensors"
    save_file(out, str(path))
    return path


# ---------------------------------------------------------------- the cases

@dataclass
class Case:
    build: Callable  # (tiny_models, tmp_path) -> what to load
    load: str  # "transformer", "vae", "text_encoder", "lora" (on the good transformer), "resolve" (a folder name)
    match: str  # what the message must name
    builds_model: bool = False  # refused by the library's own loading report, after it built the model


def _folder(edit):
    def build(tiny_models, tmp_path):
        pipe = _pipeline_copy(tiny_models, tmp_path)
        edit(pipe)
        return pipe
    return build


def _huge_transformer_config(pipe):
    _edit_json(pipe / "transformer" / "config.json", num_layers=10000, num_attention_heads=100000,
               joint_attention_dim=1 << 20)


def _gap_in_blocks(tiny_models, tmp_path):
    sd = load_file(str(tiny_models.files["dev_diffusers_file"]))
    sd["single_transformer_blocks.9999.attn.norm_q.weight"] = torch.ones(16)
    path = tmp_path / "gap.safetensors"
    save_file(sd, str(path))
    return path


def _weights_as_bin(pipe):
    weights = pipe / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.rename(weights.with_suffix(".bin"))


CASES = {
    # 1. model names resolve only inside the models folder (a symlink there is fine: test_nodes)
    "name_with_dotdot": Case(lambda t, p: "../vae", "resolve", r"'\.\./vae' was not found in models/diffusers"),
    "name_escaping_after_a_folder": Case(lambda t, p: "tiny_dev/../../vae", "resolve",
                                         r"'tiny_dev/\.\./\.\./vae' was not found"),
    "absolute_name": Case(lambda t, p: str(t.files["dev_folder"]), "resolve", r"tiny_dev' was not found"),
    # 2. fp8 without scales whose values no real weight reaches
    "fp8_without_scales_peak_200": Case(
        lambda t, p: _fp8_with_one_scaled_tensor(t, p, 200.0), "transformer",
        r"fp8_peak200\.safetensors.*'single_blocks\.0\.linear1\.weight' reaches 208 "  # 200 rounded to e4m3
        r"\(a real weight stays below 64\).*no scale tensors"),
    # 3. a folder's weights must fill its model exactly
    "folder_weights_missing_a_key": Case(
        _folder(lambda pipe: _edit_weights(pipe / "transformer" / "diffusion_pytorch_model.safetensors",
                                           lambda sd: sd.pop("transformer_blocks.0.ff.linear_out.weight"))),
        "transformer", r"pipe/transformer'.*1 missing keys.*transformer_blocks\.0\.ff\.linear_out\.weight", True),
    "vae_folder_with_unexpected_key": Case(
        _folder(lambda pipe: _edit_weights(pipe / "vae" / "diffusion_pytorch_model.safetensors",
                                           lambda sd: sd.update({"decoder.stray.weight": torch.ones(3)}))),
        "vae", r"pipe/vae'.*1 unexpected keys.*decoder\.stray\.weight", True),
    "text_encoder_folder_missing_a_key": Case(
        _folder(lambda pipe: _edit_weights(pipe / "text_encoder" / "model.safetensors",
                                           lambda sd: sd.pop("language_model.model.layers.0.mlp.down_proj.weight"))),
        "text_encoder", r"pipe/text_encoder'.*missing keys.*layers\.0\.mlp\.down_proj\.weight", True),
    # 4. damaged headers and configs: pack errors naming the file
    "header_offsets_not_numbers": Case(
        lambda t, p: _raw_safetensors(p / "offsets.safetensors", _one_tensor(data_offsets=["0", "abc"])),
        "transformer", r"offsets\.safetensors.*'x_embedder\.weight'.*'data_offsets'"),
    "header_metadata_a_list": Case(
        lambda t, p: _raw_safetensors(p / "metadata.safetensors", {"__metadata__": [1, 2, 3], **_one_tensor()}),
        "transformer", r"metadata\.safetensors.*'__metadata__'"),
    "header_shape_larger_than_its_bytes": Case(
        lambda t, p: _raw_safetensors(p / "span.safetensors", _one_tensor(shape=[1000, 1000])),
        "transformer", r"span\.safetensors.*'x_embedder\.weight'.*needs 4000000 bytes"),
    "config_not_json": Case(_folder(lambda pipe: (pipe / "transformer" / "config.json").write_text("{oops")),
                            "transformer", r"pipe/transformer/config\.json' is not valid JSON"),
    "config_a_list": Case(_folder(lambda pipe: (pipe / "vae" / "config.json").write_text("[1, 2]")),
                          "vae", r"pipe/vae/config\.json' holds a JSON list"),
    "text_encoder_config_a_list": Case(_folder(lambda pipe: (pipe / "text_encoder" / "config.json").write_text("[]")),
                                       "text_encoder", r"pipe/text_encoder/config\.json' holds a JSON list"),
    "model_index_not_json": Case(_folder(lambda pipe: (pipe / "model_index.json").write_text("nope")),
                                 "transformer", r"pipe/model_index\.json' is not valid JSON"),
    # 5. config sizes against the weights, before anything is allocated
    "config_says_3_layers_weights_hold_1": Case(
        _folder(lambda pipe: _edit_json(pipe / "transformer" / "config.json", num_layers=3)),
        "transformer", r"pipe/transformer/config\.json.*num_layers is 3 in the config but the weights hold 1"),
    "config_with_huge_sizes": Case(_folder(_huge_transformer_config), "transformer",
                                   r"transformer/config\.json.*num_layers is 10000 .*weights hold 1"),
    "vae_config_with_huge_channels": Case(
        _folder(lambda pipe: _edit_json(pipe / "vae" / "config.json", block_out_channels=[65536] * 4)),
        "vae", r"vae/config\.json.*block_out_channels is \[65536, 65536, 65536, 65536\] .*"
               r"weights hold \(32, 32, 32, 32\)"),
    "text_encoder_config_with_huge_sizes": Case(
        _folder(lambda pipe: _edit_json(pipe / "text_encoder" / "config.json",
                                        text_config={**json.loads((pipe / "text_encoder" / "config.json").read_text())
                                                     ["text_config"], "num_hidden_layers": 10000})),
        "text_encoder", r"text_encoder/config\.json.*num_hidden_layers is 10000 .*weights hold 4"),
    # 6. LoRAs with non-finite values
    "lora_with_nan": Case(lambda t, p: _lora(p, "nan_lora.safetensors", float("nan")), "lora",
                          r"nan_lora\.safetensors.*NaN or infinite.*'transformer\.transformer_blocks\.0\.attn\.to_q"
                          r"\.lora_B\.weight'"),
    "lora_with_inf": Case(lambda t, p: _lora(p, "inf_lora.safetensors", float("-inf")), "lora",
                          r"inf_lora\.safetensors.*NaN or infinite.*'transformer\.transformer_blocks\.0\.attn\.to_q"
                          r"\.lora_B\.weight'"),
    # further cases found on the way
    "lora_of_rank_0": Case(lambda t, p: _lora(p, "rank0.safetensors", tensors={
        "transformer.transformer_blocks.0.attn.to_k.lora_A.weight": torch.zeros(0, 32),
        "transformer.transformer_blocks.0.attn.to_k.lora_B.weight": torch.zeros(32, 0)}), "lora",
        r"rank0\.safetensors.*'transformer\.transformer_blocks\.0\.attn\.to_k\.lora_A\.weight' is empty"),
    "lora_alpha_not_one_number": Case(lambda t, p: _lora(p, "alphas.safetensors", tensors={
        "transformer.transformer_blocks.0.attn.to_q.alpha": torch.ones(3)}), "lora",
        r"alphas\.safetensors.*alpha 'transformer\.transformer_blocks\.0\.attn\.to_q\.alpha' holds 3 values"),
    "lora_metadata_not_an_object": Case(lambda t, p: _lora(p, "meta.safetensors",
                                                           metadata={"lora_adapter_metadata": "[4, 8]"}), "lora",
                                        r"meta\.safetensors.*'lora_adapter_metadata'"),
    "lora_alpha_metadata_infinite": Case(lambda t, p: _lora(p, "meta_inf.safetensors", metadata={
        "lora_adapter_metadata": '{"lora_alpha": Infinity, "r": 4}'}), "lora",
        r"meta_inf\.safetensors.*'lora_alpha'.*not a finite number"),
    # 7. headers and configs nested too deep to parse (RecursionError)
    **{f"header_nested_deep_in_{where}": Case(
        lambda t, p, where=where: _deep_header(p / f"deep_{where}.safetensors", where), "transformer",
        rf"deep_{where}\.safetensors' has a corrupt safetensors header: its JSON nests too deeply")
        for where in ("entry", "metadata", "whole")},
    "config_nested_deep": Case(_folder(lambda pipe: (pipe / "vae" / "config.json").write_text(
        '{"a": ' + "[" * 100_000 + "]" * 100_000 + "}")), "vae", r"pipe/vae/config\.json' nests its JSON too deeply"),
    "model_index_nested_deep": Case(_folder(lambda pipe: (pipe / "model_index.json").write_text("[" * 100_000)),
                                    "transformer", r"pipe/model_index\.json' nests its JSON too deeply"),
    # 8. weights and LoRA matrices stored as integers or bools
    "transformer_weight_int32": Case(_with_dtype("dev_bfl", "img_in.weight", torch.int32, "int_w.safetensors"),
                                     "transformer", r"int_w\.safetensors.*'x_embedder\.weight' is stored as int32; "
                                                    r"model weights must be float32"),
    "transformer_norm_int64": Case(_with_dtype("dev_bfl", "double_blocks.0.img_attn.norm.query_norm.scale",
                                               torch.int64, "int_n.safetensors"), "transformer",
                                   r"int_n\.safetensors.*'transformer_blocks\.0\.attn\.norm_q\.weight' is stored "
                                   r"as int64"),
    "vae_weight_bool": Case(_with_dtype("vae_ldm", "decoder.conv_in.weight", torch.bool, "bool_vae.safetensors"),
                            "vae", r"bool_vae\.safetensors.*'decoder\.conv_in\.weight' is stored as bool"),
    **{f"lora_{part}_{dtype}": Case(
        lambda t, p, part=part, dtype=dtype: _lora(p, f"int_{part}.safetensors", tensors={
            f"transformer.transformer_blocks.0.attn.to_q.lora_{part}.weight":
                torch.ones((4, 32) if part == "A" else (32, 4), dtype=getattr(torch, dtype))}), "lora",
        rf"int_{part}\.safetensors.*'transformer\.transformer_blocks\.0\.attn\.to_q\.lora_{part}\.weight' is stored "
        rf"as {dtype}; LoRA matrices must be float")
        for part, dtype in (("A", "int32"), ("B", "int64"), ("A", "uint8"))},
    "block_numbers_with_a_gap": Case(_gap_in_blocks, "transformer",
                                     r"gap\.safetensors.*single_transformer_blocks\.9999.*no tensors of block 2"),
    "folder_with_pickled_weights_only": Case(_folder(_weights_as_bin), "transformer",
                                             r"pipe/transformer' has no \.safetensors weights"),
}


# ---------------------------------------------------------------- the suite

@pytest.fixture
def store(tiny_models, monkeypatch):
    """The process-wide store holding a good transformer, VAE and text encoder, as in a running ComfyUI."""
    monkeypatch.setenv("FLUX2_ACCEL_MODELS_DIR", str(tiny_models.root))
    STORE.clear()
    good = (ModelHandle(str(tiny_models.files["dev_bfl"])), VaeHandle(str(tiny_models.files["vae_ldm"]), "fp32"),
            TextEncoderHandle(str(tiny_models.files["mistral_comfy"])))
    yield good
    STORE.clear()


def _attempt(case: Case, target, good) -> None:
    transformer_handle, vae_handle, te_handle = good
    if case.load == "transformer":
        STORE.transformer(ModelHandle(str(target)))
    elif case.load == "vae":
        STORE.vae(VaeHandle(str(target), "fp32"))
    elif case.load == "text_encoder":
        STORE.text_encoder(TextEncoderHandle(str(target)))
    elif case.load == "lora":
        with STORE.prepared(transformer_handle.replace(loras=(LoraSpec(str(target)),))):
            pass
    else:
        comfy_services.resolve_model("diffusers", target)


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_bad_input_is_refused_naming_it_and_the_store_stays_good(tiny_models, tmp_path, store, case, monkeypatch):
    transformer = STORE.transformer(store[0])
    before = {k: v.clone() for k, v in transformer.state_dict().items()}
    entries, loads = len(STORE), STORE.load_count
    target = case.build(tiny_models, tmp_path)
    if case.load in ("transformer", "vae", "text_encoder"):  # refused before any model is built from the file
        import diffusers
        import transformers

        def never(*args, **kwargs):
            raise AssertionError("a model was built before the bad input was refused")

        for cls in (diffusers.Flux2Transformer2DModel, diffusers.AutoencoderKLFlux2,
                    transformers.Mistral3ForConditionalGeneration):
            if not case.builds_model:
                monkeypatch.setattr(cls, "from_pretrained", never)
    with pytest.raises(ModelFileError, match=case.match):
        _attempt(case, target, store)
    monkeypatch.undo()
    # nothing of the refused input stays behind: the store and its shared transformer are as they were
    assert (len(STORE), STORE.load_count) == (entries, loads)
    assert STORE.transformer(store[0]) is transformer and not tuner_layers(transformer)
    after = transformer.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    # and good loads of every kind still work
    assert STORE.vae(store[1]).config.latent_channels == tiny_models.dev.vae.config.latent_channels
    assert STORE.text_encoder(store[2]).encode("a red dog").prompt_embeds.isfinite().all()
