"""ComfyUI's FLUX.2 model config is built from the model's own keys (CI, no ComfyUI).

The pack describes its diffusers transformer to ComfyUI's model detection by the names and shapes a BFL-layout
checkpoint of it would hold (optim/models/layouts.py `transformer_bfl_shapes`), and takes the config detection makes
(nodes/native_model.py `flux2_model_config`). These tests check those names and shapes against the recorded
detection rules and config reads of each tested ComfyUI version (tests/comfyui_flux2_config.py), so a config
hand-built again, or names detection would not recognise, fail here.
"""

from __future__ import annotations

import sys
import types

import comfyui_flux2_config as recorded
import pytest
import torch
from flux2_accel.nodes import native_model
from flux2_accel.optim.errors import Flux2AccelError
from flux2_accel.optim.models import layouts, precision, tiny


@pytest.fixture(scope="module")
def transformers():
    dev = tiny.build_components(tiny.TINY, seed=0)
    klein = tiny.build_components(tiny.TINY_KLEIN, seed=10)
    return {"dev": dev, "klein": klein}


def _sizes(transformer) -> dict:
    c = transformer.config
    return {"hidden_size": c.num_attention_heads * c.attention_head_dim, "in_channels": c.in_channels,
            "context_in_dim": c.joint_attention_dim, "depth": c.num_layers, "depth_single_blocks": c.num_single_layers,
            "guidance_embed": bool(c.guidance_embeds)}


@pytest.mark.parametrize("version", sorted(recorded.CONFIG_READS))
@pytest.mark.parametrize("name", ["dev", "klein"])
def test_bfl_names_and_shapes_make_detection_yield_every_key_the_version_reads(transformers, name, version):
    transformer = transformers[name].transformer
    detected = recorded.detected_keys(layouts.transformer_bfl_shapes(transformer))
    assert detected, "ComfyUI's detection would not recognise the names as FLUX.2"
    assert recorded.CONFIG_READS[version] <= set(detected), recorded.CONFIG_READS[version] - set(detected)
    assert {k: detected[k] for k in _sizes(transformer)} == _sizes(transformer)


def test_bfl_shapes_are_the_bfl_checkpoints_shapes_without_memory(transformers):
    transformer = transformers["dev"].transformer
    spec = transformers["dev"].spec
    checkpoint = layouts.transformer_to_bfl(transformer.state_dict(), spec.num_layers, spec.num_single_layers)
    shapes = layouts.transformer_bfl_shapes(transformer)
    assert {k: tuple(v.shape) for k, v in shapes.items()} == {k: tuple(v.shape) for k, v in checkpoint.items()}
    assert all(v.device.type == "meta" for v in shapes.values())


@pytest.mark.parametrize("target", ["fp8_e4m3fn", "nf4"])
def test_quantized_layers_give_their_logical_shapes(transformers, target):
    if target == "nf4":
        pytest.importorskip("bitsandbytes")
    plain = layouts.transformer_bfl_shapes(transformers["klein"].transformer)
    quantized = tiny.build_components(tiny.TINY_KLEIN, seed=10).transformer
    precision.apply_precision(quantized, target)
    assert any(type(m).__name__ in ("Fp8Linear", "Linear4bit") for m in quantized.modules())
    shapes = layouts.transformer_bfl_shapes(quantized)
    assert {k: tuple(v.shape) for k, v in shapes.items()} == {k: tuple(v.shape) for k, v in plain.items()}


def test_lora_wrapped_layers_give_the_layers_names(transformers):
    peft = pytest.importorskip("peft")
    model = tiny.build_components(tiny.TINY_KLEIN, seed=10).transformer
    plain = layouts.transformer_bfl_shapes(model)
    model.add_adapter(peft.LoraConfig(r=2, target_modules=["to_q", "x_embedder", "linear_in"]), adapter_name="a")
    assert any(".base_layer" in n for n, _ in model.named_modules())
    wrapped = layouts.transformer_bfl_shapes(model)
    assert {k: tuple(v.shape) for k, v in wrapped.items()} == {k: tuple(v.shape) for k, v in plain.items()}


class _RecordedDetection:
    """A stand-in for comfy.model_detection that applies the recorded FLUX.2 rules, and remembers what it was fed."""

    def __init__(self, version):
        self.version, self.fed = version, None

    def model_config_from_unet(self, state_dict, unet_key_prefix, use_base_if_no_match=False, metadata=None):
        self.fed = (state_dict, unet_key_prefix)
        detected = recorded.detected_keys(state_dict)
        if not detected:
            return None
        detected["image_model"] = "flux2"
        return types.SimpleNamespace(unet_config=detected)


@pytest.fixture
def comfy_stand_in(monkeypatch):
    def install(version):
        detection = _RecordedDetection(version)
        comfy = types.ModuleType("comfy")
        modules = {"comfy": comfy, "comfy.model_detection": detection}
        for name in ("model_base", "model_management", "model_patcher", "patcher_extension", "supported_models"):
            modules[f"comfy.{name}"] = types.ModuleType(f"comfy.{name}")
        for name, module in modules.items():
            monkeypatch.setitem(sys.modules, name, module)
            if "." in name:
                setattr(comfy, name.split(".")[1], module)
        return detection
    return install


@pytest.mark.parametrize("version", sorted(recorded.CONFIG_READS))
def test_model_config_is_comfyuis_detection_of_the_models_own_keys(transformers, comfy_stand_in, version):
    detection = comfy_stand_in(version)
    transformer = transformers["dev"].transformer
    config = native_model.flux2_model_config(transformer)
    fed, prefix = detection.fed
    assert prefix == ""
    assert {k: tuple(v.shape) for k, v in fed.items()} == \
        {k: tuple(v.shape) for k, v in layouts.transformer_bfl_shapes(transformer).items()}
    assert recorded.CONFIG_READS[version] <= set(config.unet_config)
    assert config.unet_config["hidden_size"] == _sizes(transformer)["hidden_size"]
    assert config.unet_config["disable_unet_model_creation"] is True  # the pack's module is the network


def test_a_model_detection_does_not_call_flux2_is_refused_clearly(comfy_stand_in):
    comfy_stand_in("0.33.0")
    not_flux2 = torch.nn.Linear(2, 2)
    not_flux2.config = types.SimpleNamespace(num_layers=0, num_single_layers=0)
    with pytest.raises(Flux2AccelError, match="not FLUX.2"):
        native_model.flux2_model_config(not_flux2)
