"""Every node refuses values outside what its INPUT_TYPES declares, naming the node and the widget: API-format
workflows and direct calls bypass the frontend's min/max."""

from __future__ import annotations

import math

import pytest

from flux2_accel.nodes import NODE_CLASS_MAPPINGS, input_checks
from flux2_accel.optim.errors import InputError


def bad_values(kind, options):
    if isinstance(kind, (list, tuple)):
        return ["no such choice", 3] if kind else []
    if kind == "BOOLEAN":
        return ["yes", 1]
    if kind == "STRING":
        return [5, None]
    if kind not in ("INT", "FLOAT"):
        return []
    values = ["12", True, None, math.nan, math.inf]
    if kind == "INT":
        values.append(1.5)
    if options.get("min") is not None:
        values += [options["min"] - 1, options["min"] - 0.5]
    if options.get("max") is not None:
        values += [options["max"] + 1]
    return values


def cases():
    for node_id, cls in sorted(NODE_CLASS_MAPPINGS.items()):
        declared = cls.INPUT_TYPES()
        for section in ("required", "optional"):
            for widget, declaration in (declared.get(section) or {}).items():
                options = declaration[1] if len(declaration) > 1 else {}
                kind = "STRING" if widget in getattr(cls, "FILE_WIDGETS", ()) else declaration[0]
                for value in bad_values(kind, options):
                    if kind == "INT" and isinstance(value, float) and value.is_integer() and value != value:
                        continue
                    yield pytest.param(node_id, widget, value, id=f"{node_id}-{widget}-{value!r}")


CASES = list(cases())


def test_every_node_and_every_kind_of_widget_is_covered():
    nodes = {c.values[0] for c in CASES}
    only_sockets = {"Flux2AccelVAEDecode", "Flux2AccelVAEEncode", "Flux2AccelToConditioning",  # no widgets
                    "Flux2AccelFromConditioning", "Flux2AccelToModel"}
    assert nodes == set(NODE_CLASS_MAPPINGS) - only_sockets
    assert len(CASES) > 100


@pytest.mark.parametrize("node_id, widget, value", CASES)
def test_a_bad_widget_value_is_refused_before_the_node_runs(node_id, widget, value):
    cls = NODE_CLASS_MAPPINGS[node_id]
    with pytest.raises(InputError) as error:
        getattr(cls(), cls.FUNCTION)(**{widget: value})  # refused at entry: the other inputs are never needed
    message = str(error.value)
    assert node_id in message and f"widget '{widget}'" in message


@pytest.mark.parametrize("timeout", [-1, 0, math.nan, 3601, "120"])
def test_remote_text_encode_timeout_is_checked_at_the_node(timeout):
    cls = NODE_CLASS_MAPPINGS["Flux2AccelRemoteTextEncode"]
    with pytest.raises(InputError, match=r"Flux2AccelRemoteTextEncode.*widget 'timeout'"):
        cls().encode(prompt="a dog", endpoint_url="http://127.0.0.1:9/predict", expects="any (the sampler checks)", use_cache=False,
                     timeout=timeout)


def test_values_within_the_declared_limits_pass():
    cls = NODE_CLASS_MAPPINGS["Flux2AccelSampler"]
    declared = cls.INPUT_TYPES()
    required = declared["required"]
    good = {name: decl[1]["default"] for name, decl in required.items()
            if len(decl) > 1 and isinstance(decl[1], dict) and "default" in decl[1]}
    assert {"width", "height", "steps", "seed"} <= set(good)
    input_checks.check_inputs(cls, declared, "Flux2AccelSampler", "Sampler", good)  # no error
    steps = required["steps"][1]
    input_checks.check_inputs(cls, declared, "Flux2AccelSampler", "Sampler", {"steps": steps["max"]})
    input_checks.check_inputs(cls, declared, "Flux2AccelSampler", "Sampler", {"steps": float(steps["min"])})


def test_the_check_is_installed_once():
    cls = NODE_CLASS_MAPPINGS["Flux2AccelSampler"]
    before = getattr(cls, cls.FUNCTION)
    input_checks.install(cls, "Flux2AccelSampler", "Sampler")
    assert getattr(cls, cls.FUNCTION) is before
