"""LoRA stacks (issue 6): every layout against hand-merged weights, stacking, exact unload, no reloads, mismatches."""

from __future__ import annotations

import json
import logging

import layout_fixtures
import pytest
import torch
from flux2_accel.optim.errors import InputError, ModelFileError
from flux2_accel.optim.features.api import RunReport
from flux2_accel.optim.features.lora import FEATURE, LoraSpec, prepare_for_compile, stack
from flux2_accel.optim.handle import ModelHandle
from flux2_accel.optim.models import tiny
from flux2_accel.optim.run.store import ModelStore
from safetensors.torch import save_file

pytestmark = pytest.mark.usefixtures("comfyui_inference_mode")  # as ComfyUI runs prompts

SPEC = tiny.TINY
RANK = 4


# ---------------------------------------------------------------- tiny model, BFL names, references

def to_bfl(sd: dict) -> dict:
    """diffusers -> BFL names (the inverse of diffusers' single-file converter), as fresh tensors."""
    bfl = layout_fixtures.transformer_to_bfl(sd, SPEC.num_layers, SPEC.num_single_layers)
    return {k: v.clone() for k, v in bfl.items()}


def inputs():
    g = torch.Generator().manual_seed(7)
    h = w = 4
    n_txt = 6
    return dict(
        hidden_states=torch.randn(1, h * w, 4 * SPEC.latent_channels, generator=g),
        encoder_hidden_states=torch.randn(1, n_txt, 3 * SPEC.text_hidden_size, generator=g),
        timestep=torch.tensor([0.5]), guidance=torch.tensor([4.0]),
        img_ids=torch.cartesian_prod(torch.arange(1), torch.arange(h), torch.arange(w), torch.arange(1))[None],
        txt_ids=torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(n_txt))[None],
        return_dict=False)


INPUTS = inputs()


@torch.no_grad()
def forward(model) -> torch.Tensor:
    return model(**INPUTS)[0]


@pytest.fixture(scope="module")
def base_sd():
    return {k: v.clone() for k, v in tiny.build_transformer(SPEC, seed=0).state_dict().items()}


@pytest.fixture
def model(base_sd):
    m = tiny.build_transformer(SPEC, seed=0)
    m.load_state_dict(base_sd)
    return m


@pytest.fixture(scope="module")
def base_out(base_sd):
    m = tiny.build_transformer(SPEC, seed=0)
    m.load_state_dict(base_sd)
    return forward(m)


def reference_from_bfl(base_sd, deltas):
    """Output of the tiny transformer with W + s * (alpha/r) * B @ A merged into BFL-named weights."""
    from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers

    bfl = to_bfl(base_sd)
    for lora, scale in deltas:
        for target, (A, B) in lora.items():
            bfl[target + ".weight"] += scale * (B @ A)
    m = tiny.build_transformer(SPEC, seed=0)
    m.load_state_dict(convert_flux2_transformer_checkpoint_to_diffusers(bfl))
    return forward(m)


def reference_from_diffusers(base_sd, deltas):
    sd = {k: v.clone() for k, v in base_sd.items()}
    for lora, scale in deltas:
        for target, (A, B) in lora.items():
            sd[target + ".weight"] += scale * (B @ A)
    m = tiny.build_transformer(SPEC, seed=0)
    m.load_state_dict(sd)
    return forward(m)


def bfl_targets(base_sd, kohya=False):
    bfl = to_bfl(base_sd)
    names = [k[: -len(".weight")] for k, v in bfl.items() if k.endswith(".weight") and v.ndim == 2]
    if kohya:  # diffusers' kohya converter maps the blocks and in/out layers, not the modulation layers
        names = [n for n in names if "blocks" in n or n in ("img_in", "txt_in", "final_layer.linear")]
    return names, bfl


def rand_lora(base_sd, seed, kohya=False):
    names, bfl = bfl_targets(base_sd, kohya)
    g = torch.Generator().manual_seed(seed)
    out = {}
    for t in names:
        n, k = bfl[t + ".weight"].shape
        out[t] = (torch.randn(RANK, k, generator=g) * 0.2, torch.randn(n, RANK, generator=g) * 0.2)
    return out


# ---------------------------------------------------------------- file layouts

def fmt_ai_toolkit(lora):
    o = {}
    for t, (A, B) in lora.items():
        o[f"diffusion_model.{t}.lora_A.weight"] = A.contiguous()
        o[f"diffusion_model.{t}.lora_B.weight"] = B.contiguous()
    return o


def fmt_kohya(lora, alpha):
    o = {}
    for t, (A, B) in lora.items():
        k = "lora_unet_" + t.replace(".", "_")
        o[k + ".lora_down.weight"] = A.contiguous()
        o[k + ".lora_up.weight"] = B.contiguous()
        o[k + ".alpha"] = torch.tensor(float(alpha))
    return o


def fmt_comfy_down_up(lora, alpha):
    o = {}
    for t, (A, B) in lora.items():
        o[f"diffusion_model.{t}.lora_down.weight"] = A.contiguous()
        o[f"diffusion_model.{t}.lora_up.weight"] = B.contiguous()
        o[f"diffusion_model.{t}.alpha"] = torch.tensor(float(alpha))
    return o


def fmt_comfy_ab_alpha(lora, alpha):
    o = fmt_ai_toolkit(lora)
    for t in lora:
        o[f"diffusion_model.{t}.alpha"] = torch.tensor(float(alpha))
    return o


def diffusers_lora(base_sd, seed):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, w in base_sd.items():
        if name.endswith(".weight") and w.ndim == 2 and "blocks" in name:
            n, k = w.shape
            out[name[: -len(".weight")]] = (torch.randn(RANK, k, generator=g) * 0.2,
                                            torch.randn(n, RANK, generator=g) * 0.2)
    return out


def fmt_diffusers(lora, prefix="transformer."):
    o = {}
    for t, (A, B) in lora.items():
        o[f"{prefix}{t}.lora_A.weight"] = A.contiguous()
        o[f"{prefix}{t}.lora_B.weight"] = B.contiguous()
    return o


# ---------------------------------------------------------------- running the feature

class Session:
    """One shared transformer in a store, run through the lora feature like the sampler does."""

    def __init__(self, model):
        self.store = ModelStore()
        self.model = model
        self.handle = ModelHandle(source="/nonexistent/tiny.safetensors", precision="bf16")
        self.store.get(self.handle.base_key, lambda: model)

    def run(self, *specs):
        handle = self.handle.replace(loras=tuple(specs))
        report = RunReport()
        with FEATURE.activate(self.store, self.model, handle, report):
            out = forward(self.model)
        return out, report

    @property
    def state(self):
        return stack.state_for(self.store, self.handle.base_key, self.model)


def write(tmp_path, name, tensors, metadata=None):
    path = tmp_path / name
    save_file(tensors, str(path), metadata=metadata)
    return str(path)


def close(a, b):
    return torch.allclose(a, b, atol=2e-5, rtol=1e-4)


# ---------------------------------------------------------------- tests

@pytest.mark.parametrize("layout,alpha", [("ai_toolkit", None), ("kohya", 2.0), ("comfy_down_up", 2.0),
                                          ("comfy_ab_alpha", 8.0)])
def test_bfl_layouts_match_hand_merged_weights(tmp_path, model, base_sd, base_out, layout, alpha):
    lora = rand_lora(base_sd, seed=1, kohya=layout == "kohya")
    tensors = {"ai_toolkit": lambda: fmt_ai_toolkit(lora), "kohya": lambda: fmt_kohya(lora, alpha),
               "comfy_down_up": lambda: fmt_comfy_down_up(lora, alpha),
               "comfy_ab_alpha": lambda: fmt_comfy_ab_alpha(lora, alpha)}[layout]()
    path = write(tmp_path, f"{layout}.safetensors", tensors)
    strength = 0.7
    out, report = Session(model).run(LoraSpec(path, strength))
    scale = strength * (1.0 if alpha is None else alpha / RANK)
    expected = reference_from_bfl(base_sd, [(lora, scale)])
    assert (expected - base_out).abs().max() > 1e-2  # the LoRA really changes the output
    assert close(out, expected), (out - expected).abs().max()
    assert report.stats["lora"]["matched_keys"] == {f"{layout}.safetensors": f"{len(tensors)}/{len(tensors)}"}


def test_final_layer_modulation_lora_uses_diffusers_half_order(tmp_path, model, base_sd, base_out):
    """BFL's adaLN output is (shift, scale); diffusers' norm_out is (scale, shift): lora_B rows must follow."""
    lora = {k: v for k, v in rand_lora(base_sd, seed=5).items() if k == "final_layer.adaLN_modulation.1"}
    path = write(tmp_path, "final.safetensors", fmt_ai_toolkit(lora))
    out, _ = Session(model).run(LoraSpec(path, 1.0))
    expected = reference_from_bfl(base_sd, [(lora, 1.0)])
    assert (expected - base_out).abs().max() > 1e-3
    assert close(out, expected)


@pytest.mark.parametrize("prefix", ["transformer.", "base_model.model."])
def test_diffusers_and_peft_layouts(tmp_path, model, base_sd, prefix):
    lora = diffusers_lora(base_sd, seed=3)
    path = write(tmp_path, "d.safetensors", fmt_diffusers(lora, prefix))
    out, _ = Session(model).run(LoraSpec(path, -0.6))
    assert close(out, reference_from_diffusers(base_sd, [(lora, -0.6)]))


def test_diffusers_metadata_alpha_is_applied(tmp_path, model, base_sd):
    lora = diffusers_lora(base_sd, seed=4)
    meta = {"lora_adapter_metadata": json.dumps({"transformer.r": RANK, "transformer.lora_alpha": 2})}
    path = write(tmp_path, "meta.safetensors", fmt_diffusers(lora), metadata=meta)
    out, _ = Session(model).run(LoraSpec(path, 1.0))
    assert close(out, reference_from_diffusers(base_sd, [(lora, 2 / RANK)]))


def test_two_stacked_loras_with_strengths_and_exact_removal(tmp_path, model, base_sd, base_out):
    l1, l2 = rand_lora(base_sd, seed=1), rand_lora(base_sd, seed=2, kohya=True)
    p1 = write(tmp_path, "one.safetensors", fmt_ai_toolkit(l1))
    p2 = write(tmp_path, "two.safetensors", fmt_kohya(l2, alpha=RANK))
    s = Session(model)
    out, report = s.run(LoraSpec(p1, 0.8), LoraSpec(p2, -0.4))
    assert close(out, reference_from_bfl(base_sd, [(l1, 0.8), (l2, -0.4)]))
    assert report.stats["lora"]["active"] == ["one.safetensors x0.8", "two.safetensors x-0.4"]
    # removing the LoRAs (a handle without any) runs the base weights bit for bit
    out_base, report = s.run()
    assert torch.equal(out_base, base_out)
    assert "lora" not in report.stats
    # switched off, both present in the stack: the base too
    out_off, _ = s.run(LoraSpec(p1, 0.8, enabled=False), LoraSpec(p2, -0.4, enabled=False))
    assert torch.equal(out_off, base_out)
    # and outside a run the shared module is the base again
    assert torch.equal(forward(model), base_out)


def test_strength_change_and_toggle_reuse_loaded_adapters(tmp_path, model, base_sd, monkeypatch):
    l1, l2 = rand_lora(base_sd, seed=1), rand_lora(base_sd, seed=2)
    p1 = write(tmp_path, "one.safetensors", fmt_ai_toolkit(l1))
    p2 = write(tmp_path, "two.safetensors", fmt_comfy_down_up(l2, alpha=RANK))
    s = Session(model)
    reads = []
    real_read = stack.read_lora_file
    monkeypatch.setattr(stack, "read_lora_file", lambda p: reads.append(p) or real_read(p))
    s.run(LoraSpec(p1, 1.0), LoraSpec(p2, 1.0))
    assert len(reads) == 2 and s.state.adapter_loads == 2
    scalings = {id(t) for layer in stack.tuner_layers(model) for t in layer.scaling.values()}
    out, _ = s.run(LoraSpec(p1, 0.3), LoraSpec(p2, -1.2))
    assert close(out, reference_from_bfl(base_sd, [(l1, 0.3), (l2, -1.2)]))
    out, _ = s.run(LoraSpec(p1, 0.3, enabled=False), LoraSpec(p2, 0.5))  # toggle one off
    assert close(out, reference_from_bfl(base_sd, [(l2, 0.5)]))
    out, _ = s.run(LoraSpec(p2, 0.5))
    assert close(out, reference_from_bfl(base_sd, [(l2, 0.5)]))
    assert len(reads) == 2 and s.state.adapter_loads == 2 and s.state.file_reads == 2
    # strengths were written into the same scaling tensors (what keeps torch.compile from recompiling)
    after = {id(t) for layer in stack.tuner_layers(model) for t in layer.scaling.values()}
    assert after == scalings
    assert all(torch.is_tensor(t) for layer in stack.tuner_layers(model) for t in layer.scaling.values())


def test_same_file_twice_adds_strengths(tmp_path, model, base_sd):
    lora = rand_lora(base_sd, seed=1)
    p = write(tmp_path, "one.safetensors", fmt_ai_toolkit(lora))
    s = Session(model)
    out, _ = s.run(LoraSpec(p, 0.5), LoraSpec(p, 0.25))
    assert close(out, reference_from_bfl(base_sd, [(lora, 0.75)]))
    assert s.state.adapter_loads == 1


def test_strength_change_does_not_recompile(tmp_path, model, base_sd):
    from torch._dynamo.testing import CompileCounter

    lora = diffusers_lora(base_sd, seed=3)
    p = write(tmp_path, "d.safetensors", fmt_diffusers(lora))
    s = Session(model)
    handle = s.handle.replace(loras=(LoraSpec(p, 1.0),))
    block = model.single_transformer_blocks[0]
    x = torch.randn(1, 8, block.attn.to_qkv_mlp_proj.in_features)
    torch._dynamo.reset()
    counter = CompileCounter()
    outs = []
    for strength in (1.0, 0.5, -0.3):
        with FEATURE.activate(s.store, model, handle.replace(loras=(LoraSpec(p, strength),)), RunReport()):
            prepare_for_compile(model)
            layer = block.attn.to_qkv_mlp_proj  # a peft LoRA layer now
            compiled = torch.compile(layer, backend=counter, fullgraph=True)
            with torch.no_grad():
                outs.append((compiled(x), layer.base_layer(x)))
    assert counter.frame_count == 1
    A, B = lora["single_transformer_blocks.0.attn.to_qkv_mlp_proj"]
    for (got, base), strength in zip(outs, (1.0, 0.5, -0.3)):
        assert close(got, base + strength * (x @ A.T @ B.T))
    torch._dynamo.reset()


def test_flux1_lora_is_refused_with_examples(tmp_path, model):
    g = torch.Generator().manual_seed(0)
    flux1 = {  # FLUX.1 modulation layers and a qkv of FLUX.1's width
        "diffusion_model.double_blocks.0.img_mod.lin.lora_A.weight": torch.randn(RANK, 32, generator=g),
        "diffusion_model.double_blocks.0.img_mod.lin.lora_B.weight": torch.randn(192, RANK, generator=g),
        "diffusion_model.single_blocks.0.modulation.lin.lora_A.weight": torch.randn(RANK, 32, generator=g),
        "diffusion_model.single_blocks.0.modulation.lin.lora_B.weight": torch.randn(96, RANK, generator=g),
        "diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight": torch.randn(RANK, 48, generator=g),
        "diffusion_model.double_blocks.0.img_attn.qkv.lora_B.weight": torch.randn(144, RANK, generator=g),
    }
    path = write(tmp_path, "flux1_style.safetensors", flux1)
    s = Session(model)
    with pytest.raises(ModelFileError) as e:
        s.run(LoraSpec(path, 1.0))
    msg = str(e.value)
    assert "flux1_style.safetensors" in msg and "none of its 6 tensors" in msg
    assert "double_blocks.0.img_mod.lin.lora_A.weight (no such layer in FLUX.2)" in msg
    assert ("img_attn.qkv.lora_A.weight (LoRA maps 48->48 features but the layer is 32->32: "
            "transformer_blocks.0.attn.to_") in msg
    assert s.state.adapter_loads == 0 and not stack.tuner_layers(model)


def test_partial_match_is_reported(tmp_path, model, base_sd, caplog):
    lora = rand_lora(base_sd, seed=1)
    tensors = fmt_ai_toolkit(lora)
    tensors["diffusion_model.double_blocks.0.img_mod.lin.lora_A.weight"] = torch.randn(RANK, 32)
    tensors["diffusion_model.double_blocks.0.img_mod.lin.lora_B.weight"] = torch.randn(192, RANK)
    tensors["diffusion_model.double_blocks.0.img_attn.norm.query_norm.diff"] = torch.randn(16)
    path = write(tmp_path, "partial.safetensors", tensors)
    with caplog.at_level(logging.WARNING, logger="flux2_accel"):
        out, report = Session(model).run(LoraSpec(path, 1.0))
    total = len(tensors)
    assert report.stats["lora"]["matched_keys"] == {"partial.safetensors": f"{total - 3}/{total}"}
    assert f"matched {total - 3} of {total} tensors" in caplog.text and "img_mod.lin" in caplog.text
    assert close(out, reference_from_bfl(base_sd, [(lora, 1.0)]))


def test_lokr_on_separate_layers_and_fused_qkv_refused(tmp_path, model, base_sd, base_out):
    g = torch.Generator().manual_seed(9)
    w1, w2 = torch.randn(4, 4, generator=g) * 0.2, torch.randn(8, 8, generator=g) * 0.2  # 32x32 = to_out.0
    lycoris = {"lycoris_transformer_blocks_0_attn_to_out_0.lokr_w1": w1,
               "lycoris_transformer_blocks_0_attn_to_out_0.lokr_w2": w2}
    path = write(tmp_path, "lokr.safetensors", lycoris)
    out, _ = Session(model).run(LoraSpec(path, 0.5))
    sd = {k: v.clone() for k, v in base_sd.items()}
    sd["transformer_blocks.0.attn.to_out.0.weight"] += 0.5 * torch.kron(w1, w2)
    m = tiny.build_transformer(SPEC, seed=0)
    m.load_state_dict(sd)
    assert (forward(m) - base_out).abs().max() > 1e-3
    assert close(out, forward(m))

    fused = {"diffusion_model.double_blocks.0.img_attn.qkv.lokr_w1": torch.randn(4, 4),
             "diffusion_model.double_blocks.0.img_attn.qkv.lokr_w2": torch.randn(24, 8)}
    path = write(tmp_path, "lokr_qkv.safetensors", fused)
    with pytest.raises(ModelFileError, match="lokr_qkv.safetensors.*fused q/k/v"):
        Session(tiny.build_transformer(SPEC, seed=0)).run(LoraSpec(path, 1.0))


def test_non_safetensors_and_bad_specs_refused(tmp_path, model):
    p = tmp_path / "evil.ckpt"
    p.write_bytes(b"not a pickle we would ever open")
    with pytest.raises(ModelFileError, match="evil.ckpt"):
        Session(model).run(LoraSpec(str(p), 1.0))
    with pytest.raises(InputError):
        LoraSpec("", 1.0)
    with pytest.raises(InputError):
        LoraSpec("/x.safetensors", float("nan"))


def test_failed_load_leaves_base_and_loaded_stack_usable(tmp_path, model, base_sd, base_out):
    lora = rand_lora(base_sd, seed=1)
    good = write(tmp_path, "good.safetensors", fmt_ai_toolkit(lora))
    bad = write(tmp_path, "bad.safetensors", {"diffusion_model.foo.lora_A.weight": torch.randn(RANK, 3),
                                              "diffusion_model.foo.lora_B.weight": torch.randn(3, RANK)})
    s = Session(model)
    with pytest.raises(ModelFileError, match="bad.safetensors"):
        s.run(LoraSpec(good, 1.0), LoraSpec(bad, 1.0))
    assert torch.equal(forward(model), base_out)
    out, _ = s.run(LoraSpec(good, 1.0))
    assert close(out, reference_from_bfl(base_sd, [(lora, 1.0)]))


def test_store_prepared_runs_the_lora_feature(tmp_path, model, base_sd, base_out):
    from flux2_accel.optim.features import registry as features

    assert features.FEATURE_MODULES[0] == "lora"
    lora = rand_lora(base_sd, seed=1)
    p = write(tmp_path, "one.safetensors", fmt_ai_toolkit(lora))
    s = Session(model)
    report = RunReport()
    with s.store.prepared(s.handle.replace(loras=(LoraSpec(p, 1.0),)), report) as t:
        out = forward(t)
    assert close(out, reference_from_bfl(base_sd, [(lora, 1.0)]))
    assert report.stats["lora"]["active"] == ["one.safetensors x1"]
    with s.store.prepared(s.handle) as t:
        assert torch.equal(forward(t), base_out)


def test_stack_node_returns_new_handle(tmp_path, monkeypatch):
    from flux2_accel.nodes import comfy_services
    from flux2_accel.nodes.lora import Flux2AccelLoraStack

    (tmp_path / "loras").mkdir()
    save_file({"x.lora_A.weight": torch.zeros(1, 1)}, str(tmp_path / "loras" / "style.safetensors"))
    save_file({"x.lora_A.weight": torch.zeros(1, 1)}, str(tmp_path / "loras" / "speed.safetensors"))
    monkeypatch.setenv("FLUX2_ACCEL_MODELS_DIR", str(tmp_path))
    types = Flux2AccelLoraStack.INPUT_TYPES()
    combo = types["optional"]["lora_1"][0]
    assert combo[0] == "None" and "style.safetensors" in combo
    for spec in list(types["required"].values()) + list(types["optional"].values()):
        assert "tooltip" in spec[1]
    first = ModelHandle(source="/m.safetensors")
    node = Flux2AccelLoraStack()
    (h1,) = node.apply(first, lora_1="style.safetensors", strength_1=0.8, enabled_1=True,
                       lora_2="None", strength_2=1.0, enabled_2=True)
    assert first.loras == () and h1 is not first
    assert h1.loras == (LoraSpec(comfy_services.resolve_model("loras", "style.safetensors"), 0.8, True),)
    (h2,) = node.apply(h1, lora_1="speed.safetensors", strength_1=1.0, enabled_1=False)
    assert [s.path.rsplit("/", 1)[-1] for s in h2.loras] == ["style.safetensors", "speed.safetensors"]
    assert h2.loras[1].enabled is False and h1.loras == (h2.loras[0],)
    with pytest.raises(ModelFileError):
        node.apply(first, lora_1="missing.safetensors", strength_1=1.0, enabled_1=True)


@pytest.mark.parametrize("precision", ["fp8_e4m3fn", "nf4"])
def test_quantized_bases_keep_adapters_unfused(tmp_path, base_sd, precision):
    from flux2_accel.optim.models import precision as precision_module

    model = tiny.build_transformer(SPEC, seed=0)
    model.load_state_dict(base_sd)
    try:
        model = precision_module.apply_precision(model.to(torch.bfloat16), precision)
    except InputError:
        pytest.skip(f"{precision} is not available in optim.models.precision yet")
    lora = diffusers_lora(base_sd, seed=3)
    path = write(tmp_path, "d.safetensors", fmt_diffusers(lora))
    s = Session(model)
    bf16_inputs = {k: (v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v)
                   for k, v in INPUTS.items()}
    with torch.no_grad():
        base = model(**bf16_inputs)[0]
    name = "single_transformer_blocks.0.attn.to_qkv_mlp_proj"
    A, B = (t.to(torch.bfloat16) for t in lora[name])
    x = torch.randn(1, 8, A.shape[1], dtype=torch.bfloat16)
    for strength in (1.0, -0.5):
        handle = s.handle.replace(loras=(LoraSpec(path, strength),))
        with FEATURE.activate(s.store, model, handle, RunReport()), torch.no_grad():
            layer = model.get_submodule(name)
            assert type(layer.base_layer).__name__ != "Linear"  # the quantized layer, wrapped, not fused
            assert layer.lora_A["lora0"].weight.dtype == torch.bfloat16  # never stored in fp8 / 4 bit
            got, plain = layer(x), layer.base_layer(x)
            torch.testing.assert_close(got, plain + strength * (x @ A.T @ B.T), atol=3e-2, rtol=2e-2)
            assert not torch.equal(model(**bf16_inputs)[0], base)
    assert s.state.file_reads == 1
    with torch.no_grad():
        assert torch.equal(model(**bf16_inputs)[0], base)  # unloading is exact on quantized weights too


def test_idle_adapters_are_evicted_and_dora_refused(tmp_path, model, base_sd, base_out, monkeypatch):
    monkeypatch.setattr(stack, "MAX_IDLE_ADAPTERS", 0)
    l1, l2 = diffusers_lora(base_sd, seed=1), diffusers_lora(base_sd, seed=2)
    p1, p2 = write(tmp_path, "one.safetensors", fmt_diffusers(l1)), write(tmp_path, "two.safetensors", fmt_diffusers(l2))
    s = Session(model)
    s.run(LoraSpec(p1, 1.0))
    out, _ = s.run(LoraSpec(p2, 0.5))
    assert close(out, reference_from_diffusers(base_sd, [(l2, 0.5)]))
    assert list(model.peft_config) == ["lora1"]  # one.safetensors no longer holds memory
    assert all("lora0" not in layer.scaling for layer in stack.tuner_layers(model))
    dora = fmt_diffusers(l1)
    dora["transformer.transformer_blocks.0.attn.to_q.lora_magnitude_vector"] = torch.ones(32)
    with pytest.raises(ModelFileError, match="dora.safetensors.*DoRA"):
        s.run(LoraSpec(write(tmp_path, "dora.safetensors", dora), 1.0))
    assert torch.equal(forward(model), base_out)
