"""The native-MODEL nodes' ComfyUI-facing surface without ComfyUI: widgets, refusals, wrappers and patch chaining
on stand-in patcher objects (the real patcher is exercised by tests/test_comfyui_native.py)."""

from __future__ import annotations

import types

import pytest
import torch
from bfl_tiny import TinyBflFlux2
from flux2_accel.nodes import comfy_patching, native_cache, native_compile
from flux2_accel.nodes.cache import Flux2AccelStepCache
from flux2_accel.optim.errors import InputError
from flux2_accel.optim.features.caching import CacheSettings
from flux2_accel.optim.features.caching.bfl_layout import STATE_KEY


def test_native_cache_node_has_the_pack_nodes_widgets():
    pack = Flux2AccelStepCache.INPUT_TYPES()
    native = native_cache.Flux2AccelNativeStepCache.INPUT_TYPES()
    assert list(native["required"]) == list(pack["required"])
    assert list(native["optional"]) == list(pack["optional"])
    assert native["required"]["model"][0] == "MODEL"
    assert native["required"]["method"][0] == ["fbcache", "teacache"]
    assert native["hidden"] == {"unique_id": "UNIQUE_ID"}
    assert native_cache.Flux2AccelNativeStepCache.RETURN_TYPES == ("MODEL",)


def test_native_compile_node_widgets():
    spec = native_compile.Flux2AccelNativeCompile.INPUT_TYPES()
    assert list(spec["required"]) == ["model", "mode", "dynamic", "fullgraph", "backend"]
    assert spec["required"]["model"][0] == "MODEL"


class FakeBase(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.diffusion_model = inner


def _fake_model(base):
    return types.SimpleNamespace(model=base)


@pytest.mark.parametrize("node", [native_cache.Flux2AccelNativeStepCache(), native_compile.Flux2AccelNativeCompile()])
def test_a_model_that_is_not_flux2_is_refused_naming_what_it_is(node):
    class SDXL(torch.nn.Module):
        pass

    base = SDXL()
    base.diffusion_model = torch.nn.Linear(2, 2)
    model = _fake_model(base)
    with pytest.raises(InputError) as info:
        if isinstance(node, native_cache.Flux2AccelNativeStepCache):
            node.apply(model, "fbcache", 0.1, 0.0, 1.0, 3, 1)
        else:
            node.apply(model, "default", "auto", False, "inductor")
    message = str(info.value)
    assert "SDXL" in message and "Linear" in message and "FLUX.2" in message


def test_a_flux2_class_without_bfl_blocks_is_refused():
    class Flux2(torch.nn.Module):
        pass

    base = Flux2()
    base.diffusion_model = torch.nn.Identity()
    with pytest.raises(InputError, match="double_blocks"):
        comfy_patching.flux2_diffusion_model(_fake_model(base), "node")


def test_family_follows_the_guidance_embedding():
    assert comfy_patching.family_of(types.SimpleNamespace(params=types.SimpleNamespace(guidance_embed=True))) == "dev"
    assert comfy_patching.family_of(types.SimpleNamespace(params=types.SimpleNamespace(guidance_embed=False))) == \
        "klein"


def test_replacement_chaining_runs_an_existing_patch_inside_ours():
    calls = []

    def existing(args, extra):
        calls.append("existing")
        return extra["original_block"](args)

    def ours(args, extra):
        calls.append("ours")
        return extra["original_block"](args)

    def block(args):
        calls.append("block")
        return {"img": args["img"] + 1}

    chained = comfy_patching.chained_replacement(ours, existing)
    assert chained({"img": 1}, {"original_block": block}) == {"img": 2}
    assert calls == ["ours", "existing", "block"]


def test_wrapper_transformer_options_positional_and_keyword():
    options, other = {"a": 1}, {"b": 2}
    assert comfy_patching.wrapper_transformer_options((torch.zeros(1), 1, None, options), {}) is options
    assert comfy_patching.wrapper_transformer_options((), {"transformer_options": options}) is options
    assert comfy_patching.wrapper_transformer_options((torch.zeros(1),), {}) == {}
    x = torch.zeros(1)
    args, kwargs = comfy_patching.with_transformer_options((x, 1, None, options, 5), {"k": 3}, other)
    assert args == (x, 1, None, other, 5) and kwargs == {"k": 3}
    args, kwargs = comfy_patching.with_transformer_options((x,), {"transformer_options": options}, other)
    assert args == (x,) and kwargs == {"transformer_options": other}
    assert comfy_patching.with_transformer_options((x,), {}, other) == ((x,), {"transformer_options": other})


def test_diffusion_model_wrapper_times_calls_per_branch():
    """The wrapper hands the call's cond_or_uncond and batch size to the run's cache state."""
    from flux2_accel.optim.features.caching.bfl_layout import BflStepCache

    model = TinyBflFlux2()
    cache = BflStepCache(CacheSettings("fbcache", 1e-9), 4, "dev", model.double_blocks[0], 2, 3)
    table = {("double_block", 0): "first"}
    options = {STATE_KEY: cache, "cond_or_uncond": [1, 0], "patches_replace": {"dit": table, "other": {}},
               "sigmas": torch.tensor([0.5])}
    cache.schedule = [1.0, 0.75, 0.5, 0.25, 0.0]
    seen_steps = []
    original_model_call = cache.model_call

    def model_call(*args, **kwargs):
        seen_steps.append(cache.step_of(args[4] if len(args) > 4 else kwargs.get("sigma")))
        return original_model_call(*args, **kwargs)

    cache.model_call = model_call
    handed = []

    def executor(*args, **kwargs):
        handed.append(args[-1])
        return "out"

    assert native_cache.diffusion_model_wrapper(executor, torch.zeros(4, 1), 1, options) == "out"
    # the forward got a copy of transformer_options with a block table of its own, the caller's left alone
    call_options = handed[0]
    assert call_options is not options and call_options[STATE_KEY] is cache
    assert call_options["patches_replace"]["dit"] == table and call_options["patches_replace"]["dit"] is not table
    assert options["patches_replace"]["dit"] is table and call_options["patches_replace"]["other"] == {}
    assert seen_steps == [2]  # the call's sigma reached the cache
    assert sorted(cache.run.branches) == ["cond", "uncond"]
    assert cache.stats()["computed_steps"] == 2
    # without a run state the wrapper is transparent
    assert native_cache.diffusion_model_wrapper(executor, torch.zeros(1), {}) == "out"
