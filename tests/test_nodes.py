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
from flux2_accel.optim.run.store import STORE

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
    with pytest.raises(InputError, match="Flux2AccelSampler.*widget .steps. is 0: below the minimum 1"):
        _generate(steps=0)
    *_, out = _generate()  # the loaded model is still fine
    assert out["result"][0].shape == (1, 48, 64, 3)


def test_services_degrade_without_comfyui():
    assert comfy_services.IN_COMFYUI is False
    assert comfy_services.interrupt_requested() is False
    comfy_services.raise_if_interrupted()
    comfy_services.Progress(3).update(1, lambda: torch.zeros(1, 128, 2, 2))


def test_compile_node_in_the_graph_matches_eager_and_compiles_the_vae_decoder(models_dir):
    from flux2_accel.optim.features.compile import CompileSettings

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


def test_symlinked_models_resolve_and_escaping_names_do_not(tiny_models, tmp_path, monkeypatch):
    """A folder or file the user linked into a models folder (a shared model store) loads; names still cannot
    leave the models folders. Both inside ComfyUI (folder_paths) and outside it."""
    import types

    models = tmp_path / "models"
    (models / "diffusers").mkdir(parents=True)
    (models / "vae").mkdir()
    (models / "diffusers" / "flux2-tiny").symlink_to(tiny_models.files["dev_folder"], target_is_directory=True)
    (models / "vae" / "linked-vae.safetensors").symlink_to(tiny_models.files["vae_ldm"])
    fake_folder_paths = types.SimpleNamespace(get_folder_paths=lambda name: [str(models / name)],
                                              get_full_path=lambda name, file: None)
    for folder_paths in (None, fake_folder_paths):
        monkeypatch.setattr(comfy_services, "_folder_paths", folder_paths)
        monkeypatch.setenv("FLUX2_ACCEL_MODELS_DIR", str(models))
        assert "flux2-tiny" in comfy_services.list_diffusers_folders()
        folder = comfy_services.resolve_model("diffusers", "flux2-tiny")
        assert folder == str(models / "diffusers" / "flux2-tiny")  # the name as given, not the link's target
        (model,) = node("Flux2AccelLoadDiffusionModel").load(DIFFUSERS_PREFIX + "flux2-tiny", "bf16")
        assert model.source == folder
        for escaping in ("../vae", "flux2-tiny/../../vae", "flux2-tiny/../flux2-tiny", str(models / "diffusers"),
                         "/etc"):
            with pytest.raises(ModelFileError, match="not found"):
                comfy_services.resolve_model("diffusers", escaping)
    monkeypatch.setattr(comfy_services, "_folder_paths", None)  # files: outside ComfyUI (ComfyUI resolves its own)
    assert "linked-vae.safetensors" in comfy_services.list_models("vae")
    linked_vae = comfy_services.resolve_model("vae", "linked-vae.safetensors")
    assert linked_vae == str(models / "vae" / "linked-vae.safetensors")
    (vae,) = node("Flux2AccelLoadVAE").load("linked-vae.safetensors", "fp32")
    assert STORE.vae(vae).config.latent_channels == tiny_models.dev.vae.config.latent_channels
    with pytest.raises(ModelFileError, match="not found"):
        comfy_services.resolve_model("vae", "../vae/linked-vae.safetensors")
    STORE.clear()


def test_sampler_sends_the_step_cache_timeline_to_the_frontend(models_dir):
    """With a step cache, the sampler's ui message carries one row per CFG branch, one letter per step (C computed,
    S skipped), agreeing with the text statistics; without one it carries no timeline, and the text stays short."""
    (model,) = node("Flux2AccelLoadDiffusionModel").load("dev_comfy.safetensors", "bf16")
    (cached,) = node("Flux2AccelStepCache").apply(model, "fbcache", 5.0, 0.0, 1.0, 0, 1)
    _, vae, cond, plain = _generate(steps=8)
    out = node("Flux2AccelSampler").generate(cached, vae, cond, 64, 48, 8, 4.0, 0, 1)
    assert out["ui"]["flux2_timeline"] == ["cond:CSSSSSSS"]
    stats = "\n".join(out["ui"]["flux2_stats"])
    assert "skipped_steps=7" in stats and "timeline" not in stats
    assert "flux2_timeline" not in plain["ui"]
