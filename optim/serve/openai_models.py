"""The OpenAI image API's models: each model is an API-format ComfyUI workflow, and this module finds where a
request's values go in it (its slots) and builds the graph to queue.

Slots are found by node type (the pack's nodes and ComfyUI's standard ones); what detection cannot decide (two
samplers, a seed fed by a link, two SaveImage nodes) is refused with the reason, never guessed, and a map file
beside the workflow (NAME.map.json) says where instead. The shipped models are the pack's workflows/*_api.json;
the user's are ComfyUI's user/flux2-accel/openai/NAME.json and replace a shipped model of the same name.
docs/openai-api.md ("Your own workflow as a model") documents the rules.

Pure: no ComfyUI, no torch; the routes (openai_server.py) call load_models() on every request, so a workflow
added or fixed in the user folder is served at once.
"""

from __future__ import annotations

import copy
import json
import re
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError
from ..options import MAX_STEPS
from .openai_api import QUALITY_STEPS, OpenAIError, bad_field, unknown_model

WORKFLOWS_DIR = Path(__file__).resolve().parents[2] / "workflows"
MAX_WORKFLOW_BYTES = 4 * 1024 * 1024  # an API workflow is kilobytes; a bigger file is refused before it is read
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
MAP_SUFFIX = ".map.json"

FIELDS = ("prompt", "negative_prompt", "width", "height", "seed", "steps", "batch_size", "guidance", "images")
MAP_KEYS = FIELDS + ("output", "quality_steps")

# A distilled model samples in a few steps: its quality presets are a few steps too.
DISTILLED_QUALITY_STEPS = {"low": 2, "medium": 4, "high": 8, "standard": 4, "hd": 8, "auto": None}

# name -> (workflow file in workflows/, overrides in the map file's format)
SHIPPED = {
    "flux2-dev": ("flux2_t2i_api.json", {}),
    "flux2-dev-fast": ("flux2_t2i_fast_api.json", {}),
    "flux2-klein-4b": ("flux2_klein_4b_distilled_api.json", {"quality_steps": DISTILLED_QUALITY_STEPS}),
    "flux2-dev-edit": ("flux2_edit_two_references_api.json", {}),
}

# --- what detection looks for, by node type ----------------------------------------------------------------------

TEXT_INPUTS = {"Flux2AccelTextEncode": "prompt", "Flux2AccelRemoteTextEncode": "prompt", "CLIPTextEncode": "text"}
# The sampler (or guider) inputs a conditioning ends in: class -> {input: "positive" | "negative"}.
CONDITIONING_INPUTS = {
    "KSampler": {"positive": "positive", "negative": "negative"},
    "KSamplerAdvanced": {"positive": "positive", "negative": "negative"},
    "SamplerCustom": {"positive": "positive", "negative": "negative"},
    "CFGGuider": {"positive": "positive", "negative": "negative"},
    "BasicGuider": {"conditioning": "positive"},
    "Flux2AccelSampler": {"conditioning": "positive", "negative": "negative"},
}
# A conditioning zeroed out no longer carries its text: a prompt reaching a sampler only through this node does
# not count (the common native graph wires its positive through it into the negative input).
TEXT_ERASING_NODES = ("ConditioningZeroOut",)
SIZE_NODES = ("EmptyFlux2LatentImage", "EmptySD3LatentImage", "EmptyLatentImage", "Flux2Scheduler",
              "Flux2AccelSampler")
LATENT_NODES = ("EmptyFlux2LatentImage", "EmptySD3LatentImage", "EmptyLatentImage")
SEED_INPUTS = {"RandomNoise": "noise_seed", "KSampler": "seed", "KSamplerAdvanced": "noise_seed",
               "Flux2AccelSampler": "seed"}
STEPS_INPUTS = {"Flux2Scheduler": "steps", "BasicScheduler": "steps", "KSampler": "steps", "KSamplerAdvanced": "steps",
                "Flux2AccelSampler": "steps"}
BATCH_INPUTS = {**{name: "batch_size" for name in LATENT_NODES}, "Flux2AccelSampler": "batch_size"}
GUIDANCE_INPUTS = {"FluxGuidance": "guidance", "Flux2AccelSampler": "guidance"}
IMAGE_INPUTS = {"LoadImage": "image"}
OUTPUT_NODES = ("SaveImage",)

# The literal each field's input must hold.
_TEXT, _INT, _NUMBER = "a string", "an integer", "a number"
FIELD_TYPES = {"prompt": _TEXT, "negative_prompt": _TEXT, "width": _INT, "height": _INT, "seed": _INT,
               "steps": _INT, "batch_size": _INT, "guidance": _NUMBER, "images": _TEXT}
# The server always sets these (a seed per request, a prompt per request): a map may not leave them out.
REQUIRED_FIELDS = ("prompt", "seed")


class AmbiguousWorkflow(InputError):
    """A workflow whose slots detection cannot decide (two candidates, or a linked one): the reason says which and
    how a map file settles it."""


@dataclass(frozen=True)
class Slot:
    """One literal input of one node: where a request value is written."""
    node: str
    input: str

    def __str__(self) -> str:
        return f"{self.node}.{self.input}"


@dataclass(frozen=True)
class WorkflowModel:
    """One served model: its workflow (never mutated), the slots each request field is written to, its output
    nodes and its quality presets."""
    name: str
    graph: dict
    slots: dict  # field -> tuple[Slot, ...]; an empty tuple (or a missing key): the workflow cannot take it
    outputs: tuple
    quality_steps: dict = field(default_factory=lambda: dict(QUALITY_STEPS))
    source: str = ""

    @property
    def is_edit(self) -> bool:
        return bool(self.slots.get("images"))

    def accepts(self, field: str) -> bool:
        """Whether the workflow has somewhere to write `field` (a FIELDS name, or "size" for width and height)."""
        if field == "size":
            return self.accepts("width") and self.accepts("height")
        return bool(self.slots.get(field))

    def build_prompt(self, request, *, seed: int, image_names: tuple = (), batch_size: int = 1) -> dict:
        """A copy of the workflow with the request's values written into its slots; a value it has no slot for is a
        400 naming the request field."""
        graph = copy.deepcopy(self.graph)
        image_names = tuple(image_names)

        def put(field_name: str, value) -> None:
            for slot in self.slots.get(field_name, ()):
                graph[slot.node]["inputs"][slot.input] = value

        if self.is_edit and not image_names:
            raise bad_field("model", f"The model '{self.name}' edits reference images: send them to "
                            "/v1/images/edits.", "unsupported_value")
        if image_names and not self.is_edit:
            raise bad_field("image", f"The model '{self.name}' takes no reference images (its workflow has no "
                            "LoadImage node); use an edit model, e.g. flux2-dev-edit.", "unsupported_parameter")
        image_slots = self.slots.get("images", ())
        if image_names and len(image_names) != len(image_slots):
            raise bad_field("image", f"The model '{self.name}' takes exactly {len(image_slots)} reference "
                            f"image{'s' if len(image_slots) != 1 else ''} (its workflow's LoadImage nodes "
                            f"{', '.join(s.node for s in image_slots)}); {len(image_names)} were sent.")
        for slot, name in zip(image_slots, image_names):
            graph[slot.node]["inputs"][slot.input] = name

        put("prompt", request.prompt)
        if request.negative_prompt is not None:
            self._require("negative_prompt", "negative_prompt", "a negative prompt (no text node reaches a "
                          "sampler's negative input)")
            put("negative_prompt", request.negative_prompt)
        if request.size is not None:
            self._require("width", "size", "a width to set (no literal width input on an empty latent, "
                          "Flux2Scheduler or Flux2AccelSampler)")
            self._require("height", "size", "a height to set (no literal height input on an empty latent, "
                          "Flux2Scheduler or Flux2AccelSampler)")
            put("width", request.size[0])
            put("height", request.size[1])
        self._require("seed", "seed", "a seed input")
        put("seed", seed)
        steps = request.steps
        if steps is None:
            steps = self.quality_steps.get(request.quality)
        if steps is not None:
            self._require("steps", "steps" if request.steps is not None else "quality",
                          "a steps input to set the step count")
            put("steps", steps)
        if self.accepts("batch_size"):
            put("batch_size", batch_size)
        elif batch_size != 1:
            raise bad_field("n", f"The model '{self.name}' has no batch size input: it makes one image per run "
                            f"(asked for a batch of {batch_size}).")
        if request.guidance is not None:
            self._require("guidance", "guidance", "a guidance input (no literal FluxGuidance or "
                          "Flux2AccelSampler guidance)")
            put("guidance", request.guidance)
        return graph

    def _require(self, field_name: str, param: str, what: str) -> None:
        if not self.accepts(field_name):
            raise bad_field(param, f"The model '{self.name}' cannot take {param}: its workflow lacks {what}. Leave "
                            f"{param} out, or map it in {self.name}{MAP_SUFFIX}.", "unsupported_parameter")


@dataclass(frozen=True)
class ModelList:
    """The served models and the refused ones (name -> reason), each sorted by name."""
    models: dict
    refused: dict = field(default_factory=dict)

    def get(self, name: str) -> WorkflowModel:
        """The model `name`; 404 naming the available ones otherwise (with the reason, for a refused one)."""
        model = self.models.get(name)
        if model is not None:
            return model
        if name in self.refused:
            available = ", ".join(self.models) or "none"
            raise OpenAIError(404, f"The model '{name}' is not available: {self.refused[name]} Available models: "
                              f"{available}.", "invalid_request_error", "model", "model_not_found")
        raise unknown_model(name, self.models)


def models_response(model_list: ModelList, created: int) -> dict:
    """GET /v1/models in OpenAI's list shape; the extension key "unavailable" lists the refused models and why."""
    return {
        "object": "list",
        "data": [{"id": name, "object": "model", "created": int(created), "owned_by": "flux2-accel"}
                 for name in sorted(model_list.models)],
        "unavailable": [{"id": name, "reason": reason} for name, reason in sorted(model_list.refused.items())],
    }


# --- detection -----------------------------------------------------------------------------------------------------

def _is_link(value) -> bool:
    """An API-format link: [source node id, output index]."""
    return (isinstance(value, list) and len(value) == 2 and isinstance(value[0], (str, int))
            and not isinstance(value[0], bool) and isinstance(value[1], int) and not isinstance(value[1], bool))


def _node_order(node_id: str):
    return (0, int(node_id), "") if node_id.isdigit() else (1, 0, node_id)


def _describe(graph: dict, slot: Slot) -> str:
    return f"node {slot.node} ({graph[slot.node]['class_type']}) input {slot.input}"


def _check_graph(graph) -> None:
    """Refuse what is not an API-format workflow, saying what is wrong."""
    if isinstance(graph, dict) and isinstance(graph.get("nodes"), list):
        raise InputError("a UI-format workflow (it has a 'nodes' list): export it with Save (API) (in ComfyUI: "
                         "Workflow > Export (API)) and use that file.")
    if not isinstance(graph, dict):
        raise InputError("not an API-format workflow: expected a JSON object of node ids, not "
                         f"{_json_kind(graph)}.")
    if not graph:
        raise InputError("an empty workflow: it has no nodes.")
    for node_id, node in graph.items():
        if not isinstance(node, dict) or not isinstance(node.get("class_type"), str):
            raise InputError(f"node {node_id} has no class_type: not an API-format workflow; export it with Save "
                             "(API).")
        inputs = node.get("inputs", {})
        if not isinstance(inputs, dict):
            raise InputError(f"node {node_id} ({node['class_type']}) has inputs that are not an object.")
        for input_name, value in inputs.items():
            if _is_link(value) and str(value[0]) not in graph:
                raise InputError(f"node {node_id} ({node['class_type']}) input {input_name} links to node "
                                 f"{value[0]}, which is not in the workflow.")


def _json_kind(value) -> str:
    return {list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number",
            type(None): "null"}.get(type(value), type(value).__name__)


def _consumers(graph: dict) -> dict:
    """node id -> [(consumer node id, consumer input name)] for every link."""
    consumers = {node_id: [] for node_id in graph}
    for node_id, node in graph.items():
        for input_name, value in node.get("inputs", {}).items():
            if _is_link(value):
                consumers[str(value[0])].append((node_id, input_name))
    return consumers


def _roles(graph: dict, consumers: dict, text_node: str) -> set:
    """The sampler inputs ("positive", "negative") the text node's conditioning reaches, following links through
    any node in between (guidance, reference latents, conversions) and stopping at samplers."""
    roles, seen, queue = set(), {text_node}, deque([text_node])
    while queue:
        node_id = queue.popleft()
        for consumer, input_name in consumers[node_id]:
            class_type = graph[consumer]["class_type"]
            role = CONDITIONING_INPUTS.get(class_type, {}).get(input_name)
            if role:
                roles.add(role)
            if class_type in CONDITIONING_INPUTS or class_type in TEXT_ERASING_NODES or consumer in seen:
                continue
            seen.add(consumer)
            queue.append(consumer)
    return roles


def _candidates(graph: dict, inputs_by_type: dict) -> list:
    """Every node of one of the types with its input present, in node-id order."""
    found = []
    for node_id in sorted(graph, key=_node_order):
        input_name = inputs_by_type.get(graph[node_id]["class_type"])
        if input_name is not None and input_name in graph[node_id].get("inputs", {}):
            found.append(Slot(node_id, input_name))
    return found


def _linked_reason(graph: dict, field_name: str, slot: Slot, name: str) -> str:
    source = graph[slot.node]["inputs"][slot.input][0]
    return (f"{field_name}: {_describe(graph, slot)} is linked from node {source}, not a value the API can set; "
            f"name the input that holds it in {name}{MAP_SUFFIX} (e.g. {{\"{field_name}\": \"{source}.value\"}}).")


def _ambiguous_reason(graph: dict, field_name: str, slots, name: str) -> str:
    listed = "; ".join(_describe(graph, slot) for slot in slots)
    return (f"{field_name}: {len(slots)} candidates ({listed}); name the one to set in {name}{MAP_SUFFIX} "
            f"(e.g. {{\"{field_name}\": \"{slots[0]}\"}}).")


def _one(graph, field_name: str, candidates: list, name: str, required: bool, looked_for: str = "") -> tuple:
    """Exactly one literal candidate (zero allowed when not `required`); otherwise the workflow is ambiguous."""
    if len(candidates) > 1:
        raise AmbiguousWorkflow(_ambiguous_reason(graph, field_name, candidates, name))
    if not candidates:
        if required:
            raise AmbiguousWorkflow(f"{field_name}: no {looked_for or 'input'} found; name the input that sets it "
                                    f"in {name}{MAP_SUFFIX} (e.g. {{\"{field_name}\": \"NODE.input\"}}).")
        return ()
    slot = candidates[0]
    if _is_link(graph[slot.node]["inputs"][slot.input]):
        if required:
            raise AmbiguousWorkflow(_linked_reason(graph, field_name, slot, name))
        return ()  # an optional field fed by a link is simply not offered
    return (slot,)


def _text_roles(graph: dict) -> tuple:
    """(positive, negative): the text inputs whose conditioning reaches a sampler's positive input, and those
    reaching only a negative one."""
    consumers = _consumers(graph)
    positive, negative = [], []
    for slot in _candidates(graph, TEXT_INPUTS):
        roles = _roles(graph, consumers, slot.node)
        # One text wired into both inputs (cfg 1 graphs pass the positive as the negative too) is the prompt: a
        # negative prompt written there would overwrite it.
        if "positive" in roles:
            positive.append(slot)
        elif "negative" in roles:
            negative.append(slot)
    return positive, negative


def _detect_prompt(graph: dict, name: str, positive: list) -> tuple:
    if not positive:
        raise InputError(f"no text prompt: no {', '.join(TEXT_INPUTS)} node reaches a sampler's positive input; "
                         f"name the prompt input in {name}{MAP_SUFFIX} (e.g. {{\"prompt\": \"6.text\"}}).")
    if len(positive) > 1:
        raise AmbiguousWorkflow(f"prompt: {len(positive)} text nodes reach a sampler's positive input ("
                                + "; ".join(_describe(graph, s) for s in positive)
                                + f"); name the one the request's prompt goes to in {name}{MAP_SUFFIX} "
                                f"(e.g. {{\"prompt\": \"{positive[0]}\"}}).")
    return _one(graph, "prompt", positive, name, required=True)


def _detect_all(graph: dict, name: str, field_name: str, inputs_by_type: dict) -> tuple:
    """Every candidate (a native graph has the size on both its latent and its scheduler): all set together, so
    one fed by a link would leave them disagreeing."""
    candidates = _candidates(graph, inputs_by_type)
    linked = [slot for slot in candidates if _is_link(graph[slot.node]["inputs"][slot.input])]
    if linked and len(linked) < len(candidates):
        raise AmbiguousWorkflow(f"{field_name}: {_describe(graph, linked[0])} is linked while "
                                f"{_describe(graph, next(s for s in candidates if s not in linked))} holds a value; "
                                f"a size set on one only would disagree: name every {field_name} input to set in "
                                f"{name}{MAP_SUFFIX}.")
    return () if linked else tuple(candidates)


def _detect_field(graph: dict, name: str, field_name: str) -> tuple:
    if field_name in ("width", "height"):
        return _detect_all(graph, name, field_name, {t: field_name for t in SIZE_NODES})
    if field_name == "images":
        candidates = _candidates(graph, IMAGE_INPUTS)
        for slot in candidates:
            if _is_link(graph[slot.node]["inputs"][slot.input]):
                raise AmbiguousWorkflow(_linked_reason(graph, "images", slot, name))
        return tuple(candidates)
    inputs, required = {"seed": (SEED_INPUTS, True), "steps": (STEPS_INPUTS, True),
                        "batch_size": (BATCH_INPUTS, False), "guidance": (GUIDANCE_INPUTS, False)}[field_name]
    looked_for = " or ".join(f"{kind}.{input_name}" for kind, input_name in inputs.items())
    return _one(graph, field_name, _candidates(graph, inputs), name, required, looked_for)


def _detect_output(graph: dict, name: str) -> tuple:
    saves = [node_id for node_id in sorted(graph, key=_node_order) if graph[node_id]["class_type"] in OUTPUT_NODES]
    if not saves:
        raise InputError(f"no output: the workflow has no {' or '.join(OUTPUT_NODES)} node; add one, or name the "
                         f"output node in {name}{MAP_SUFFIX} (\"output\": \"NODE\").")
    if len(saves) > 1:
        raise AmbiguousWorkflow(f"output: {len(saves)} SaveImage nodes ({', '.join(saves)}); name the one whose "
                                f"images are returned in {name}{MAP_SUFFIX} (e.g. {{\"output\": \"{saves[0]}\"}}).")
    return (saves[0],)


# --- the map file --------------------------------------------------------------------------------------------------

def _map_slots(graph: dict, key: str, value) -> tuple:
    entries = [value] if isinstance(value, str) else value
    if not isinstance(entries, list) or not all(isinstance(entry, str) for entry in entries):
        raise InputError(f"map key '{key}': give \"NODE.input\" or a list of them, not {json.dumps(value)[:60]}.")
    if not entries and key in REQUIRED_FIELDS:
        raise InputError(f"map key '{key}': the model needs a {key} input; name at least one.")
    slots = []
    for entry in entries:
        node_id, dot, input_name = entry.rpartition(".")  # node ids may hold dots or colons, input names never
        if not dot or not node_id or not input_name:
            raise InputError(f"map key '{key}': '{entry}' is not \"NODE.input\" (e.g. \"5.seed\").")
        if node_id not in graph:
            raise InputError(f"map key '{key}': node {node_id} is not in the workflow.")
        inputs = graph[node_id].get("inputs", {})
        if input_name not in inputs:
            raise InputError(f"map key '{key}': node {node_id} ({graph[node_id]['class_type']}) has no input "
                             f"'{input_name}' (its inputs: {', '.join(inputs) or 'none'}).")
        if _is_link(inputs[input_name]):
            raise InputError(f"map key '{key}': node {node_id} input {input_name} is linked from node "
                             f"{inputs[input_name][0]}; name the input that holds the value.")
        slots.append(Slot(node_id, input_name))
    return tuple(slots)


def _map_output(graph: dict, value) -> tuple:
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise InputError(f"map key 'output': give the output node's id as a string, not {json.dumps(value)[:60]}.")
    if value not in graph:
        raise InputError(f"map key 'output': node {value} is not in the workflow.")
    return (value,)


def _map_quality_steps(value) -> dict:
    if not isinstance(value, dict):
        raise InputError("map key 'quality_steps': give an object of quality -> steps (an integer, or null for the "
                         "workflow's own).")
    for quality, steps in value.items():
        if quality not in QUALITY_STEPS:
            raise InputError(f"map key 'quality_steps': unknown quality '{quality}' (known: "
                             f"{', '.join(QUALITY_STEPS)}).")
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int)
                                  or not 1 <= steps <= MAX_STEPS):
            raise InputError(f"map key 'quality_steps': '{quality}' is {json.dumps(steps)[:40]}; give an integer "
                             f"between 1 and {MAX_STEPS}, or null for the workflow's own steps.")
    return dict(value)


def _check_literal_types(graph: dict, slots: dict) -> None:
    """Each slot must hold the kind of value its field writes, and no input may take two fields."""
    owner = {}
    for field_name, field_slots in slots.items():
        expected = FIELD_TYPES[field_name]
        for slot in field_slots:
            if slot in owner and owner[slot] != field_name:
                raise InputError(f"{field_name} and {owner[slot]} both write {_describe(graph, slot)}; give each "
                                 "its own input.")
            owner[slot] = field_name
            value = graph[slot.node]["inputs"][slot.input]
            if expected == _TEXT:
                fits = isinstance(value, str)
            elif expected == _INT:
                fits = isinstance(value, int) and not isinstance(value, bool)
            else:
                fits = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not fits:
                raise InputError(f"{field_name}: {_describe(graph, slot)} holds {json.dumps(value)[:40]}, not "
                                 f"{expected}.")


def detect(graph: dict, name: str, mapping: dict | None = None, source: str = "") -> WorkflowModel:
    """The model `name` of an API-format workflow: its slots by node type, with `mapping` (a map file's content)
    replacing detection for the fields it names. Raises AmbiguousWorkflow or InputError with the reason, which
    starts with the workflow's file (from `source`) or the model's name."""
    try:
        return _detect(graph, name, {} if mapping is None else mapping, source)
    except InputError as e:
        raise type(e)(f"{_source_label(name, source)}: {e}") from None


def _source_label(name: str, source: str) -> str:
    if source.startswith("shipped: "):
        return source[len("shipped: "):]
    return Path(source).name if source else f"model '{name}'"


def _detect(graph, name: str, mapping, source: str) -> WorkflowModel:
    _check_graph(graph)
    if not isinstance(mapping, dict):
        raise InputError(f"the map ({name}{MAP_SUFFIX}) must be a JSON object of field -> \"NODE.input\", not "
                         f"{_json_kind(mapping)}.")
    unknown = [key for key in mapping if key not in MAP_KEYS]
    if unknown:
        raise InputError(f"unknown map key{'s' if len(unknown) > 1 else ''} {', '.join(repr(k) for k in unknown)} "
                         f"in {name}{MAP_SUFFIX}; the keys are {', '.join(MAP_KEYS)}.")

    slots = {key: _map_slots(graph, key, mapping[key]) for key in FIELDS if key in mapping}
    if "prompt" not in slots or "negative_prompt" not in slots:
        positive, negative = _text_roles(graph)
        if "prompt" not in slots:
            slots["prompt"] = _detect_prompt(graph, name, positive)
        if "negative_prompt" not in slots:
            # A text node the map made the prompt is not also the negative.
            mapped = {slot.node for slot in slots["prompt"]}
            slots["negative_prompt"] = _one(graph, "negative_prompt", [s for s in negative if s.node not in mapped],
                                            name, required=False)
    for key in FIELDS:
        if key not in slots:
            slots[key] = _detect_field(graph, name, key)
    outputs = _map_output(graph, mapping["output"]) if "output" in mapping else _detect_output(graph, name)
    quality_steps = {**QUALITY_STEPS, **_map_quality_steps(mapping.get("quality_steps", {}))}
    _check_literal_types(graph, slots)
    return WorkflowModel(name=name, graph=graph, slots={key: slots[key] for key in FIELDS}, outputs=outputs,
                         quality_steps=quality_steps, source=source)


# --- loading -------------------------------------------------------------------------------------------------------

def _read_json(path: Path, label: str):
    """The JSON in `path`, refusing a file too big to be a workflow before reading it."""
    try:
        size = path.stat().st_size
    except OSError as e:
        raise InputError(f"{label} cannot be read: {e.strerror or e}.") from None
    if size > MAX_WORKFLOW_BYTES:
        raise InputError(f"{label} is {size:,} bytes, more than the {MAX_WORKFLOW_BYTES:,} a workflow may be.")
    try:
        return json.loads(path.read_bytes().decode("utf-8-sig"))
    except OSError as e:
        raise InputError(f"{label} cannot be read: {e.strerror or e}.") from None
    except UnicodeDecodeError:
        raise InputError(f"{label} is not UTF-8 text; save the workflow as JSON.") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{label} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}).") from None
    except RecursionError:
        raise InputError(f"{label} nests its JSON too deeply to be a workflow.") from None


def _shipped(workflows_dir: Path, models: dict, refused: dict) -> None:
    for name, (file_name, overrides) in SHIPPED.items():
        path = Path(workflows_dir) / file_name
        try:
            graph = _read_json(path, f"workflows/{file_name}")
            models[name] = detect(graph, name, overrides, f"shipped: workflows/{file_name}")
        except InputError as e:
            refused[name] = str(e)


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except (OSError, ValueError, RuntimeError):  # RuntimeError: a symlink loop
        return False


def _user_model(path: Path, user_dir: Path, name: str) -> WorkflowModel:
    label = path.name
    if path.is_symlink() and not _inside(path, user_dir):
        raise InputError(f"{label} is a link to a file outside the user folder; copy the workflow in instead.")
    if not path.is_file():
        raise InputError(f"{label} is not a file.")
    graph = _read_json(path, label)
    map_path = path.with_name(name + MAP_SUFFIX)
    mapping = None
    if map_path.exists() or map_path.is_symlink():
        if map_path.is_symlink() and not _inside(map_path, user_dir):
            raise InputError(f"{map_path.name} is a link to a file outside the user folder; copy the map in "
                             "instead.")
        if not map_path.is_file():
            raise InputError(f"{map_path.name} is not a file.")
        mapping = _read_json(map_path, map_path.name)
    return detect(graph, name, mapping, str(path))


def load_models(user_dir: Path | None, workflows_dir: Path = WORKFLOWS_DIR) -> ModelList:
    """The shipped models, then the user's NAME.json workflows in `user_dir` (a missing folder is fine), each with
    its NAME.map.json when there is one; a user model replaces a shipped one of the same name (even when refused:
    the user meant to replace it). Refused ones are listed with the reason."""
    models, refused = {}, {}
    _shipped(workflows_dir, models, refused)
    user_dir = Path(user_dir) if user_dir is not None else None
    if user_dir is not None and user_dir.is_dir():
        files = sorted(p for p in user_dir.iterdir() if p.name.endswith(".json"))
        workflow_names = {p.name[:-len(".json")] for p in files if not p.name.endswith(MAP_SUFFIX)}
        for path in files:
            if path.name.endswith(MAP_SUFFIX):
                name = path.name[:-len(MAP_SUFFIX)]
                # A map applies to the workflow beside it only; a stray one is listed unless the name is served.
                if name not in workflow_names and name not in models:
                    refused[name] = f"{path.name} has no workflow {name}.json beside it."
                continue
            name = path.name[:-len(".json")]
            models.pop(name, None)
            refused.pop(name, None)
            if not MODEL_NAME.fullmatch(name):
                refused[name] = (f"{path.name}: the model name '{name}' must be 1 to 64 letters, digits, '.', '_' "
                                 "or '-', starting with a letter or digit; rename the file.")
                continue
            try:
                models[name] = _user_model(path, user_dir, name)
            except InputError as e:
                refused[name] = str(e)
    return ModelList(models=dict(sorted(models.items())), refused=dict(sorted(refused.items())))
