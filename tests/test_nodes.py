"""Every node's function end to end on tiny models, through the same model-folder lookup ComfyUI uses."""

from __future__ import annotations

import dataclasses
import shutil

import pytest
import torch

from flux2_accel import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from flux2_accel.nodes import comfy_services
from flux2_accel.nodes.loaders import DIFFUSERS_PREFIX
from flux2_accel.optim.errors import InputError, ModelFileError
from flux2_accel.optim.handle import STORE

pytestmark = pytest.mark.usefixtures("comfyui_inference_mode")  # as ComfyUI runs prompts


@pytest.fixture
def models_dir(tiny_models, monkeypatch):
    monkeypatch.setenv("FLUX2_ACCEL_MODELS_DIR", str(tiny_models.root))
    STORE.clear()
    yield tiny_models
    STORE.clear()


def node(name):
    return NODE_CLASS_MAPPINGS[name]()


def widgets(name):
    return NODE_CLASS_MAPPINGS[name].INPUT_TYPES()


def test_every_node_is_prefixed_named_and_documented():
    for name, cls in NODE_CLASS_MAPPINGS.items():
        assert name.startswith("Flux2Accel") and name in NODE_DISPLAY_NAME_MAPPINGS
        for kind, section in cls.INPUT_TYPES().items():
            if kind == "hidden":  # ComfyUI's hidden inputs ("UNIQUE_ID"...) are filled by ComfyUI, never shown
                continue
            for input_name, spec in section.items():
                opts = spec[1] if len(spec) > 1 else {}
                assert opts.get("tooltip"), f"{name}.{input_name} has no tooltip"
        assert callable(getattr(cls, cls.FUNCTION))


def test_loader_dropdowns_list_model_folders(models_dir):
    choices = widgets("Flux2AccelLoadDiffusionModel")["required"]["model_name"][0]
    assert "dev_bfl.safetensors" in choices and DIFFUSERS_PREFIX + "tiny_dev" in choices
    assert "flux2-vae-tiny.safetensors" in widgets("Flux2AccelLoadVAE")["required"]["vae_name"][0]


def _generate(width=64, height=48, steps=2, seed=0, batch_size=1, model_name="dev_comfy.safetensors", **extra):
    (model,) = node("Flux2AccelLoadDiffusionModel").load(model_name, "bf16")
    (vae,) = node("Flux2AccelLoadVAE").load("flux2-vae-tiny.safetensors", "fp32")
    (te,) = node("Flux2AccelLoadTextEncoder").load("mistral_comfy.safetensors", "bf16")
    (cond,) = node("Flux2AccelTextEncode").encode(te, "a red dog")
    out = node("Flux2AccelSampler").generate(model, vae, cond, width, height, steps, 4.0, seed, batch_size, **extra)
    return model, vae, cond, out


def test_text_to_image_graph(models_dir):
    model, vae, cond, out = _generate(batch_size=2)
    image, latent = out["result"]
    assert image.shape == (2, 48, 64, 3) and image.dtype == torch.float32
    assert 0 <= image.min() and image.max() <= 1 and image.std() > 0
    assert latent["samples"].shape == (2, 16, 3, 4)
    assert isinstance(out["ui"]["flux2_stats"], list)
    # decode node reproduces the sampler's image; encode node gives the native layout back
    (decoded,) = node("Flux2AccelVAEDecode").decode(vae, latent)
    assert torch.equal(decoded, image)
    (encoded,) = node("Flux2AccelVAEEncode").encode(vae, image)
    assert encoded["samples"].shape == (2, 16, 3, 4)


def test_models_are_loaded_once_and_reused(models_dir):
    _generate(seed=1)
    loads = STORE.load_count
    _, _, _, out_a = _generate(seed=2)
    _, _, _, out_b = _generate(seed=2)
    assert STORE.load_count == loads  # same files: nothing reloaded
    assert torch.equal(out_a["result"][0], out_b["result"][0])
    STORE.clear()
    assert len(STORE) == 0


def test_reference_images_input(models_dir):
    ref = torch.rand(2, 64, 64, 3)
    *_, out = _generate(reference_images=ref)
    *_, plain = _generate()
    assert not torch.equal(out["result"][0], plain["result"][0])


def test_diffusers_folder_through_nodes(models_dir):
    *_, out = _generate(model_name=DIFFUSERS_PREFIX + "tiny_dev")
    *_, ref = _generate(model_name="dev_bfl.safetensors")
    assert torch.equal(out["result"][1]["samples"], ref["result"][1]["samples"])


def test_nodes_do_not_mutate_inputs(models_dir):
    model, vae, cond, _ = _generate()
    before = (dataclasses.astuple(model), cond.prompt_embeds.clone())
    node("Flux2AccelSampler").generate(model, vae, cond, 32, 32, 1, 4.0, 0, 1)
    assert dataclasses.astuple(model) == before[0] and torch.equal(cond.prompt_embeds, before[1])


def test_bad_inputs_fail_clearly_and_keep_models_usable(models_dir):
    misplaced = models_dir.root / "diffusion_models" / "misplaced_vae.safetensors"
    shutil.copy(models_dir.files["vae_ldm"], misplaced)
    with pytest.raises(ModelFileError, match="misplaced_vae.safetensors.*a VAE.*models/vae"):
        node("Flux2AccelLoadDiffusionModel").load("misplaced_vae.safetensors", "bf16")
    misplaced.unlink()
    with pytest.raises(ModelFileError, match="missing.safetensors.*not found"):
        node("Flux2AccelLoadVAE").load("missing.safetensors", "bf16")
    with pytest.raises(ModelFileError, match="not found"):
        node("Flux2AccelLoadVAE").load("../../etc/passwd", "bf16")
    with pytest.raises(InputError, match="width is 40"):
        _generate(width=40)
    with pytest.raises(InputError, match="steps is 0"):
        _generate(steps=0)
    *_, out = _generate()  # the loaded model is still fine
    assert out["result"][0].shape == (1, 48, 64, 3)


def test_services_degrade_without_comfyui():
    assert comfy_services.IN_COMFYUI is False
    assert comfy_services.interrupt_requested() is False
    comfy_services.raise_if_interrupted()
    comfy_services.Progress(3).update(1, lambda: torch.zeros(1, 128, 2, 2))


def test_models_are_released_when_comfyui_frees_memory(models_dir, monkeypatch):
    """ComfyUI's unload_all_models (the "Free model and node cache" button) also empties our store."""
    import types

    calls = []
    fake_mm = types.SimpleNamespace(unload_all_models=lambda: calls.append("comfy"),
                                    get_torch_device=lambda: torch.device("cpu"), processing_interrupted=lambda: False)
    monkeypatch.setattr(comfy_services, "_mm", fake_mm)
    comfy_services.on_free_memory(STORE.clear)
    _generate()
    assert len(STORE) == 3  # transformer, VAE, text encoder
    fake_mm.unload_all_models()
    assert calls == ["comfy"] and len(STORE) == 0
    comfy_services.on_free_memory(lambda: calls.append("second hook"))  # hooks chain onto one wrapper
    fake_mm.unload_all_models()
    assert calls == ["comfy", "comfy", "second hook"]


def test_compile_node_in_the_graph_matches_eager_and_compiles_the_vae_decoder(models_dir):
    from flux2_accel.optim.compile import CompileSettings

    model, vae, cond, eager = _generate()
    (compiled_model,) = node("Flux2AccelCompile").apply(model, "regional", "default", "auto", False, "eager", True)
    assert compiled_model.compile == dataclasses.replace(CompileSettings(backend="eager", compile_vae_decoder=True),
                                                         cache_dir=compiled_model.compile.cache_dir)
    out = node("Flux2AccelSampler").generate(compiled_model, vae, cond, 64, 48, 2, 4.0, 0, 1)
    for got, expected in zip(out["result"][0:1] + (out["result"][1]["samples"],),
                             eager["result"][0:1] + (eager["result"][1]["samples"],)):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    stats = "\n".join(out["ui"]["flux2_stats"])
    assert "compile: compiled=True" in stats and "compile_vae: compiled=True" in stats
    assert "compile" not in "\n".join(eager["ui"]["flux2_stats"])
