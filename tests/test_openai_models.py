"""The OpenAI image API's models (optim/serve/openai_models.py): which slots are detected in every shipped workflow,
what build_prompt writes (and nothing more), the refusals of ambiguous or broken workflows with their reasons, map
files, the user folder, and the GET /v1/models shape."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
from flux2_accel.optim.errors import InputError
from flux2_accel.optim.serve import openai_api as api
from flux2_accel.optim.serve import openai_models as om
from flux2_accel.optim.serve.openai_models import Slot

WORKFLOWS = Path(__file__).resolve().parents[1] / "workflows"


def load(file_name: str) -> dict:
    return json.loads((WORKFLOWS / file_name).read_text())


def request(**fields) -> api.ImageRequest:
    return api.parse_generation_request({"model": "m", "prompt": "a red fox in the snow", **fields})


def refused(call, *args, **kwargs) -> api.OpenAIError:
    with pytest.raises(api.OpenAIError) as info:
        call(*args, **kwargs)
    return info.value


def refusal(graph, mapping=None, name="mine", error=InputError) -> str:
    with pytest.raises(error) as info:
        om.detect(graph, name, mapping)
    return str(info.value)


def sampler_slots(*, images=(), negative=()) -> dict:
    """The slots of the pack's one-sampler workflows: text node 4, sampler 5."""
    return {"prompt": (Slot("4", "prompt"),), "negative_prompt": tuple(negative),
            "width": (Slot("5", "width"),), "height": (Slot("5", "height"),), "seed": (Slot("5", "seed"),),
            "steps": (Slot("5", "steps"),), "batch_size": (Slot("5", "batch_size"),),
            "guidance": (Slot("5", "guidance"),), "images": tuple(images)}


def native_slots(text, size_nodes, seed, steps, batch, guidance) -> dict:
    return {"prompt": (text,), "negative_prompt": (),
            "width": tuple(Slot(n, "width") for n in size_nodes),
            "height": tuple(Slot(n, "height") for n in size_nodes),
            "seed": (seed,), "steps": (steps,), "batch_size": (batch,), "guidance": (guidance,), "images": ()}


# Every workflows/*_api.json: the slots detection finds and the output node (none is refused: each is served as is).
DETECTED = {
    "flux2_t2i_api.json": (sampler_slots(), ("6",)),
    "flux2_t2i_fast_api.json": (sampler_slots(), ("6",)),
    "flux2_klein_4b_distilled_api.json": (sampler_slots(), ("6",)),
    "flux2_edit_two_references_api.json": (sampler_slots(images=(Slot("9", "image"), Slot("10", "image"))), ("6",)),
    "flux2_klein_base_negative_api.json": (sampler_slots(negative=(Slot("12", "prompt"),)), ("6",)),
    "flux2_lora_stack_api.json": (sampler_slots(), ("6",)),
    "flux2_low_vram_nf4_api.json": (sampler_slots(), ("6",)),
    "flux2_remote_text_encode_api.json": (sampler_slots(), ("6",)),
    "flux2_multi_gpu_api.json": (sampler_slots(), ("6",)),
    # Native graphs: the size is on both the empty latent and Flux2Scheduler, and both are set.
    "flux2_native_t2i_fast_api.json": (native_slots(Slot("104", "text"), ("108", "112"), Slot("109", "noise_seed"),
                                                    Slot("112", "steps"), Slot("108", "batch_size"),
                                                    Slot("105", "guidance")), ("115",)),
    "flux2_remote_native_api.json": (native_slots(Slot("2", "prompt"), ("6", "9"), Slot("8", "noise_seed"),
                                                  Slot("6", "steps"), Slot("9", "batch_size"),
                                                  Slot("4", "guidance")), ("13",)),
    # KSampler with cfg 1: the one text node reaches both positive and negative, so it is the prompt and there is
    # no negative prompt to set.
    "flux2_nf4_ksampler_api.json": (native_slots(Slot("4", "prompt"), ("7",), Slot("8", "seed"), Slot("8", "steps"),
                                                 Slot("7", "batch_size"), Slot("6", "guidance")), ("11",)),
}


# --- shipped models and every shipped workflow ---------------------------------------------------------------------

def test_the_shipped_models_are_detected_without_a_map():
    models = om.load_models(None)
    assert models.refused == {}
    assert list(models.models) == sorted(["flux2-dev", "flux2-dev-fast", "flux2-klein-4b", "flux2-dev-edit"])
    for name, (file_name, overrides) in om.SHIPPED.items():
        assert set(overrides) <= {"quality_steps"}  # no field is mapped: every slot is detected
        model = models.get(name)
        assert (model.name, model.source) == (name, f"shipped: workflows/{file_name}")
        assert model.graph == load(file_name)
        slots, outputs = DETECTED[file_name]
        assert model.slots == slots and model.outputs == outputs


def test_the_shipped_models_slots_exactly():
    models = om.load_models(None)
    dev = models.get("flux2-dev")
    assert dev.slots["prompt"] == (Slot("4", "prompt"),)
    assert (dev.slots["width"], dev.slots["height"]) == ((Slot("5", "width"),), (Slot("5", "height"),))
    assert dev.slots["seed"] == (Slot("5", "seed"),) and dev.slots["steps"] == (Slot("5", "steps"),)
    assert dev.slots["negative_prompt"] == () and dev.slots["images"] == ()
    assert not dev.is_edit and dev.accepts("batch_size") and dev.accepts("size") and not dev.accepts("negative_prompt")
    edit = models.get("flux2-dev-edit")
    assert edit.is_edit and edit.slots["images"] == (Slot("9", "image"), Slot("10", "image"))
    assert models.get("flux2-dev-fast").slots == dev.slots


def test_quality_presets_per_model():
    models = om.load_models(None)
    assert models.get("flux2-dev").quality_steps == api.QUALITY_STEPS
    assert models.get("flux2-klein-4b").quality_steps == {"low": 2, "medium": 4, "high": 8, "standard": 4, "hd": 8,
                                                          "auto": None}


@pytest.mark.parametrize("file_name", sorted(p.name for p in WORKFLOWS.glob("*_api.json")))
def test_every_shipped_api_workflow_is_detected(file_name):
    assert file_name in DETECTED, f"{file_name} is new: add what detection must find in it"
    model = om.detect(load(file_name), "x", source=f"shipped: workflows/{file_name}")
    slots, outputs = DETECTED[file_name]
    assert model.slots == slots and model.outputs == outputs


@pytest.mark.parametrize("file_name", sorted(p.name for p in WORKFLOWS.glob("*.json") if "_api" not in p.name))
def test_every_shipped_ui_workflow_is_refused_with_the_export_guidance(file_name):
    with pytest.raises(InputError) as info:
        om.detect(load(file_name), "x", source=str(WORKFLOWS / file_name))
    assert str(info.value).startswith(f"{file_name}: a UI-format workflow") and "Save (API)" in str(info.value)


# --- build_prompt ---------------------------------------------------------------------------------------------------

def test_build_prompt_writes_each_field_where_expected_and_nothing_else():
    model = om.load_models(None).get("flux2-dev")
    before = copy.deepcopy(model.graph)
    graph = model.build_prompt(request(size="512x768", steps=9, guidance=2.5), seed=7, batch_size=3)
    expected = copy.deepcopy(before)
    expected["4"]["inputs"]["prompt"] = "a red fox in the snow"
    expected["5"]["inputs"].update(width=512, height=768, steps=9, guidance=2.5, seed=7, batch_size=3)
    assert graph == expected
    assert model.graph == before  # the model's own graph is never touched
    graph["5"]["inputs"]["seed"] = 0
    assert model.graph == before  # and the result shares nothing with it


def test_build_prompt_on_a_native_graph_sets_both_sizes():
    model = om.detect(load("flux2_native_t2i_fast_api.json"), "native")
    graph = model.build_prompt(request(size="256x128", quality="low", guidance=3.0), seed=11, batch_size=2)
    expected = load("flux2_native_t2i_fast_api.json")
    expected["104"]["inputs"]["text"] = "a red fox in the snow"
    expected["105"]["inputs"]["guidance"] = 3.0
    expected["108"]["inputs"].update(width=256, height=128, batch_size=2)
    expected["109"]["inputs"]["noise_seed"] = 11
    expected["112"]["inputs"].update(width=256, height=128, steps=12)
    assert graph == expected


def test_size_auto_and_quality_auto_keep_the_workflows_own():
    model = om.load_models(None).get("flux2-dev")
    graph = model.build_prompt(request(), seed=3)
    expected = load("flux2_t2i_api.json")
    expected["4"]["inputs"]["prompt"] = "a red fox in the snow"
    expected["5"]["inputs"]["seed"] = 3
    assert graph == expected  # width, height 1024, steps 28, guidance 4.0, batch 1: the workflow's


@pytest.mark.parametrize("name, quality, steps", [
    ("flux2-dev", "low", 12), ("flux2-dev", "medium", 28), ("flux2-dev", "hd", 50), ("flux2-dev", "auto", 28),
    ("flux2-klein-4b", "low", 2), ("flux2-klein-4b", "standard", 4), ("flux2-klein-4b", "high", 8),
    ("flux2-klein-4b", "auto", 4),
])
def test_quality_sets_the_models_steps(name, quality, steps):
    graph = om.load_models(None).get(name).build_prompt(request(quality=quality), seed=1)
    assert graph["5"]["inputs"]["steps"] == steps


def test_steps_overrides_the_preset():
    graph = om.load_models(None).get("flux2-klein-4b").build_prompt(request(steps=17), seed=1)
    assert graph["5"]["inputs"]["steps"] == 17


def test_negative_prompt_lands_on_the_negative_text_node():
    model = om.detect(load("flux2_klein_base_negative_api.json"), "klein-base")
    graph = model.build_prompt(request(negative_prompt="blurry"), seed=1)
    assert (graph["4"]["inputs"]["prompt"], graph["12"]["inputs"]["prompt"]) == ("a red fox in the snow", "blurry")


def test_edit_writes_the_image_names_in_node_order():
    model = om.load_models(None).get("flux2-dev-edit")
    request_ = api.ImageRequest(model="flux2-dev-edit", prompt="the cat on the chair", images=(object(), object()))
    graph = model.build_prompt(request_, seed=5, image_names=("cat.png", "chair.png"))
    expected = load("flux2_edit_two_references_api.json")
    expected["4"]["inputs"]["prompt"] = "the cat on the chair"
    expected["5"]["inputs"]["seed"] = 5
    expected["9"]["inputs"]["image"] = "cat.png"
    expected["10"]["inputs"]["image"] = "chair.png"
    assert graph == expected


@pytest.mark.parametrize("fields, param, words", [
    ({"negative_prompt": "blurry"}, "negative_prompt", "negative prompt"),
    ({"guidance": 2.0}, "guidance", "guidance input"),
])
def test_a_value_without_a_slot_is_refused_naming_the_field(fields, param, words):
    # The nf4 KSampler graph has no negative text node; strip its FluxGuidance to lose the guidance slot too.
    graph = load("flux2_nf4_ksampler_api.json")
    graph["8"]["inputs"]["positive"] = ["5", 0]
    graph["8"]["inputs"]["negative"] = ["5", 0]
    del graph["6"]
    model = om.detect(graph, "no-guidance")
    error = refused(model.build_prompt, request(**fields), seed=1)
    assert (error.status, error.param) == (400, param)
    assert "'no-guidance'" in error.message and words in error.message


def test_size_and_batch_without_slots_are_refused():
    graph = {"1": {"class_type": "CLIPTextEncode", "inputs": {"text": "x", "clip": ["9", 0]}},
             "2": {"class_type": "KSampler", "inputs": {"seed": 1, "steps": 20, "positive": ["1", 0],
                                                        "negative": ["1", 0], "latent_image": ["3", 0]}},
             "3": {"class_type": "VAEEncode", "inputs": {"pixels": ["9", 0]}},
             "4": {"class_type": "SaveImage", "inputs": {"images": ["2", 0]}},
             "9": {"class_type": "Loader", "inputs": {}}}
    model = om.detect(graph, "img2img")
    assert not model.accepts("size") and not model.accepts("batch_size")
    assert refused(model.build_prompt, request(size="512x512"), seed=1).param == "size"
    assert refused(model.build_prompt, request(), seed=1, batch_size=2).param == "n"
    assert model.build_prompt(request(), seed=1)["2"]["inputs"]["seed"] == 1


def test_edit_model_refusals():
    models = om.load_models(None)
    edit = models.get("flux2-dev-edit")
    error = refused(edit.build_prompt, request(), seed=1)
    assert error.param == "model" and "/v1/images/edits" in error.message
    error = refused(edit.build_prompt, request(), seed=1, image_names=("only.png",))
    assert error.param == "image" and "exactly 2 reference images" in error.message and "1 were sent" in error.message
    error = refused(models.get("flux2-dev").build_prompt, request(), seed=1, image_names=("a.png",))
    assert error.param == "image" and "'flux2-dev' takes no reference images" in error.message


# --- refusals: ambiguous and broken workflows ----------------------------------------------------------------------

def two_samplers() -> dict:
    graph = load("flux2_t2i_api.json")
    graph["7"] = copy.deepcopy(graph["5"])
    graph["8"] = {"class_type": "SaveImage", "inputs": {"filename_prefix": "b", "images": ["7", 0]}}
    return graph


def test_two_samplers_are_ambiguous_naming_both_seeds():
    reason = refusal(two_samplers(), error=om.AmbiguousWorkflow)
    assert reason.startswith("model 'mine': ")
    assert "node 5 (Flux2AccelSampler) input seed" in reason and "node 7 (Flux2AccelSampler) input seed" in reason
    assert "mine.map.json" in reason


def test_two_positive_text_nodes_are_ambiguous():
    graph = load("flux2_t2i_api.json")
    graph["7"] = copy.deepcopy(graph["4"])
    graph["8"] = {"class_type": "ConditioningCombine",
                  "inputs": {"conditioning_1": ["4", 0], "conditioning_2": ["7", 0]}}
    graph["5"]["inputs"]["conditioning"] = ["8", 0]
    reason = refusal(graph, error=om.AmbiguousWorkflow)
    assert "prompt: 2 text nodes reach a sampler's positive input" in reason and "node 7" in reason


def test_two_save_image_nodes_are_ambiguous_and_a_map_names_the_output():
    graph = load("flux2_t2i_api.json")
    graph["9"] = {"class_type": "SaveImage", "inputs": {"filename_prefix": "again", "images": ["5", 0]}}
    assert "output: 2 SaveImage nodes (6, 9)" in refusal(graph, error=om.AmbiguousWorkflow)
    assert om.detect(graph, "mine", {"output": "9"}).outputs == ("9",)


def test_a_linked_seed_is_ambiguous_and_a_map_resolves_it():
    graph = load("flux2_native_t2i_fast_api.json")
    graph["120"] = {"class_type": "PrimitiveInt", "inputs": {"value": 42}}
    graph["109"]["inputs"]["noise_seed"] = ["120", 0]
    reason = refusal(graph, error=om.AmbiguousWorkflow)
    assert "seed: node 109 (RandomNoise) input noise_seed is linked from node 120" in reason
    model = om.detect(graph, "mine", {"seed": "120.value"})
    assert model.slots["seed"] == (Slot("120", "value"),)
    assert model.slots["steps"] == (Slot("112", "steps"),)  # the rest still detected
    assert model.build_prompt(request(), seed=99)["120"]["inputs"]["value"] == 99


def test_a_map_resolves_two_samplers():
    mapping = {"seed": ["5.seed", "7.seed"], "steps": "5.steps", "width": ["5.width", "7.width"],
               "height": ["5.height", "7.height"], "batch_size": [], "guidance": "5.guidance", "output": "8"}
    model = om.detect(two_samplers(), "mine", mapping)
    assert model.slots["seed"] == (Slot("5", "seed"), Slot("7", "seed")) and model.slots["batch_size"] == ()
    graph = model.build_prompt(request(size="128x64"), seed=4)
    assert [graph[n]["inputs"]["seed"] for n in ("5", "7")] == [4, 4]
    assert [graph[n]["inputs"]["width"] for n in ("5", "7")] == [128, 128]
    assert model.outputs == ("8",)


def test_a_size_linked_on_one_node_only_is_ambiguous():
    graph = load("flux2_native_t2i_fast_api.json")
    graph["120"] = {"class_type": "PrimitiveInt", "inputs": {"value": 512}}
    graph["112"]["inputs"]["width"] = ["120", 0]
    reason = refusal(graph, error=om.AmbiguousWorkflow)
    assert "width: node 112 (Flux2Scheduler) input width is linked" in reason and "node 108" in reason


def test_an_optional_field_fed_by_a_link_is_not_offered():
    graph = load("flux2_native_t2i_fast_api.json")
    graph["120"] = {"class_type": "PrimitiveFloat", "inputs": {"value": 3.5}}
    graph["105"]["inputs"]["guidance"] = ["120", 0]
    model = om.detect(graph, "mine")
    assert model.slots["guidance"] == ()
    assert refused(model.build_prompt, request(guidance=1.0), seed=1).param == "guidance"


def test_a_text_through_conditioning_zero_out_is_not_a_negative_prompt():
    graph = load("flux2_nf4_ksampler_api.json")
    graph["12"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "ignored", "clip": ["2", 0]}}
    graph["13"] = {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["12", 0]}}
    graph["8"]["inputs"]["negative"] = ["13", 0]
    assert om.detect(graph, "mine").slots["negative_prompt"] == ()
    del graph["13"]
    graph["8"]["inputs"]["negative"] = ["12", 0]
    assert om.detect(graph, "mine").slots["negative_prompt"] == (Slot("12", "text"),)


@pytest.mark.parametrize("graph, words", [
    ({"nodes": [], "links": []}, "a UI-format workflow (it has a 'nodes' list): export it with Save (API)"),
    ([1, 2], "not an API-format workflow: expected a JSON object of node ids, not an array"),
    ({}, "an empty workflow"),
    ({"1": {"inputs": {}}}, "node 1 has no class_type"),
    ({"1": {"class_type": "SaveImage", "inputs": {"images": ["7", 0]}}}, "links to node 7, which is not in"),
    ({"1": {"class_type": "SaveImage", "inputs": {}}}, "no text prompt"),
])
def test_broken_workflows_are_refused_with_the_reason(graph, words):
    assert words in refusal(graph)


def test_a_workflow_without_an_output_is_refused():
    graph = load("flux2_t2i_api.json")
    del graph["6"]
    assert "no output: the workflow has no SaveImage node" in refusal(graph)


def test_a_slot_of_the_wrong_type_is_refused():
    graph = load("flux2_t2i_api.json")
    graph["5"]["inputs"]["steps"] = "28"
    assert 'steps: node 5 (Flux2AccelSampler) input steps holds "28", not an integer' in refusal(graph)


@pytest.mark.parametrize("mapping, words", [
    ({"seed": "99.seed"}, "map key 'seed': node 99 is not in the workflow"),
    ({"seed": "5.sed"}, "map key 'seed': node 5 (Flux2AccelSampler) has no input 'sed'"),
    ({"prompt": "5.conditioning"}, "map key 'prompt': node 5 input conditioning is linked from node 4"),
    ({"seed": "seed"}, "map key 'seed': 'seed' is not \"NODE.input\""),
    ({"seed": 5}, "map key 'seed': give \"NODE.input\" or a list of them"),
    ({"seed": []}, "map key 'seed': the model needs a seed input"),
    ({"output": "77"}, "map key 'output': node 77 is not in the workflow"),
    ({"cfg": "5.guidance", "sampler": "x"}, "unknown map keys 'cfg', 'sampler'"),
    ({"quality_steps": {"ultra": 3}}, "map key 'quality_steps': unknown quality 'ultra'"),
    ({"quality_steps": {"low": 0}}, "map key 'quality_steps': 'low' is 0"),
    ({"negative_prompt": "4.prompt"}, "prompt and negative_prompt both write node 4 (Flux2AccelTextEncode) input"),
    (["seed"], "the map (mine.map.json) must be a JSON object"),
])
def test_a_bad_map_is_refused_naming_its_key(mapping, words):
    assert words in refusal(load("flux2_t2i_api.json"), mapping)


def test_map_quality_steps_override_only_what_they_name():
    model = om.detect(load("flux2_t2i_api.json"), "mine", {"quality_steps": {"low": 6, "auto": None}})
    assert model.quality_steps == {**api.QUALITY_STEPS, "low": 6}
    assert model.build_prompt(request(quality="low"), seed=1)["5"]["inputs"]["steps"] == 6


# --- the user folder ------------------------------------------------------------------------------------------------

def write(folder: Path, file_name: str, content) -> Path:
    path = folder / file_name
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def test_load_models_reads_the_user_folder(tmp_path):
    user = tmp_path / "openai"
    user.mkdir()
    native = load("flux2_native_t2i_fast_api.json")
    write(user, "my-native.json", native)
    replaced = load("flux2_t2i_api.json")
    replaced["5"]["inputs"]["steps"] = 3
    write(user, "flux2-dev.json", replaced)
    write(user, "two.json", two_samplers())
    write(user, "mapped.json", two_samplers())
    write(user, "mapped.map.json", {"seed": "5.seed", "steps": "5.steps", "width": "5.width", "height": "5.height",
                                    "batch_size": "5.batch_size", "guidance": "5.guidance", "output": "6"})
    write(user, "broken.json", "{not json")
    write(user, "ui.json", load("flux2_t2i.json"))
    write(user, "bad name.json", native)
    write(user, "orphan.map.json", {})
    write(user, "notes.txt", "not a workflow")
    (user / "sub").mkdir()
    write(user / "sub", "nested.json", native)  # only direct children are read

    models = om.load_models(user)
    assert list(models.models) == ["flux2-dev", "flux2-dev-edit", "flux2-dev-fast", "flux2-klein-4b", "mapped",
                                   "my-native"]
    assert models.get("my-native").source == str(user / "my-native.json")
    assert models.get("my-native").slots["width"] == (Slot("108", "width"), Slot("112", "width"))
    assert models.get("flux2-dev").graph == replaced  # the user's replaces the shipped one
    assert models.get("flux2-dev").source == str(user / "flux2-dev.json")
    assert models.get("mapped").outputs == ("6",)
    assert list(models.refused) == ["bad name", "broken", "orphan", "two", "ui"]
    assert models.refused["two"].startswith("two.json: seed: 2 candidates")
    assert models.refused["broken"].startswith("broken.json is not valid JSON (line 1, column 2")
    assert "ui.json: a UI-format workflow" in models.refused["ui"] and "Save (API)" in models.refused["ui"]
    assert "rename the file" in models.refused["bad name"]
    assert models.refused["orphan"] == "orphan.map.json has no workflow orphan.json beside it."


def test_a_refused_user_model_with_a_shipped_name_is_not_replaced_by_the_shipped_one(tmp_path):
    write(tmp_path, "flux2-dev.json", two_samplers())
    models = om.load_models(tmp_path)
    assert "flux2-dev" not in models.models and "seed: 2 candidates" in models.refused["flux2-dev"]
    error = refused(models.get, "flux2-dev")
    assert (error.status, error.param, error.code) == (404, "model", "model_not_found")
    assert "not available: flux2-dev.json: seed" in error.message and "flux2-klein-4b" in error.message


def test_a_user_file_over_4_mib_is_refused_before_reading(tmp_path):
    path = tmp_path / "huge.json"
    with open(path, "wb") as out:
        out.truncate(om.MAX_WORKFLOW_BYTES + 1)  # sparse: not valid JSON, so reading it would say so instead
    models = om.load_models(tmp_path)
    assert "huge.json is 4,194,305 bytes, more than the 4,194,304" in models.refused["huge"]


def test_a_bad_map_file_refuses_its_model(tmp_path):
    write(tmp_path, "mine.json", load("flux2_t2i_api.json"))
    write(tmp_path, "mine.map.json", {"seed": "5.sed"})
    assert "map key 'seed': node 5 (Flux2AccelSampler) has no input 'sed'" in om.load_models(tmp_path).refused["mine"]
    write(tmp_path, "mine.map.json", "[oops")
    assert om.load_models(tmp_path).refused["mine"].startswith("mine.map.json is not valid JSON")


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="no symlinks")
def test_symlinks_outside_the_user_folder_are_refused(tmp_path):
    user, outside = tmp_path / "user", tmp_path / "elsewhere"
    user.mkdir()
    outside.mkdir()
    write(outside, "real.json", load("flux2_t2i_api.json"))
    write(user, "inside-target.json", load("flux2_t2i_api.json"))
    (user / "escape.json").symlink_to(outside / "real.json")
    (user / "alias.json").symlink_to(user / "inside-target.json")
    models = om.load_models(user)
    assert "escape.json is a link to a file outside the user folder" in models.refused["escape"]
    assert models.get("alias").graph == load("flux2_t2i_api.json")


def test_a_missing_user_folder_serves_the_shipped_models(tmp_path):
    assert list(om.load_models(tmp_path / "absent").models) == list(om.load_models(None).models)


def test_a_missing_shipped_workflow_is_refused_not_fatal(tmp_path):
    models = om.load_models(None, workflows_dir=tmp_path)
    assert models.models == {} and set(models.refused) == set(om.SHIPPED)
    assert models.refused["flux2-dev"].startswith("workflows/flux2_t2i_api.json cannot be read")


def test_an_unknown_model_is_404_listing_the_available_ones():
    error = refused(om.load_models(None).get, "dall-e-3")
    assert (error.status, error.param, error.code) == (404, "model", "model_not_found")
    assert ("Available models: flux2-dev, flux2-dev-edit, flux2-dev-fast, flux2-klein-4b." in error.message)


# --- GET /v1/models -------------------------------------------------------------------------------------------------

def test_models_response_shape(tmp_path):
    write(tmp_path, "two.json", two_samplers())
    reply = om.models_response(om.load_models(tmp_path), 1_700_000_000.7)
    assert reply["object"] == "list"
    assert reply["data"] == [{"id": name, "object": "model", "created": 1_700_000_000, "owned_by": "flux2-accel"}
                             for name in ("flux2-dev", "flux2-dev-edit", "flux2-dev-fast", "flux2-klein-4b")]
    assert [entry["id"] for entry in reply["unavailable"]] == ["two"]
    assert reply["unavailable"][0]["reason"].startswith("two.json: seed: 2 candidates")
    json.dumps(reply)  # plain JSON all through
