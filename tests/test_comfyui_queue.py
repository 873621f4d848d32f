"""`flux2-accel queue` against a real ComfyUI (COMFYUI_DIR), with the pack's tiny-model workflow."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flux2_accel.optim.cli import main as cli
from PIL import Image
from test_comfyui_real import COMFYUI_DIR, _tiny_graph, comfyui  # noqa: F401  (comfyui is a fixture)

pytestmark = pytest.mark.skipif(not COMFYUI_DIR, reason="set COMFYUI_DIR to run the pack in a real ComfyUI")


@pytest.fixture
def tiny_workflow(tmp_path):
    path = tmp_path / "tiny_api.json"
    path.write_text(json.dumps(_tiny_graph()))
    return path


def _pixels(path):
    return np.asarray(Image.open(path))


def test_queue_saves_images_with_set_and_repeat(comfyui, tiny_workflow, tmp_path, capsys):
    url, _, log_path = comfyui
    out = tmp_path / "out"
    rc = cli.main(["queue", str(tiny_workflow), "--server", url, "-o", str(out), "--repeat", "2",
                   "--set", "5.seed=3", "--set", "5.steps=2"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err + log_path.read_text()[-3000:]
    lines = captured.out.splitlines()
    assert [l.split()[0] for l in lines] == ["[1/2]", "[2/2]"]
    prompt_ids = [l.split()[1].rstrip(":") for l in lines]
    saved = sorted(out.iterdir())
    assert [p.name for p in saved] == sorted(f"{pid}_6_0.png" for pid in prompt_ids)  # node 6 saves the image
    assert all(Image.open(p).size == (64, 48) for p in saved)
    assert np.array_equal(_pixels(saved[0]), _pixels(saved[1]))  # same graph, same seed: same image
    assert "Flux2AccelSampler" in captured.err  # the progress bar named the sampler node

    other = tmp_path / "other"
    assert cli.main(["queue", str(tiny_workflow), "--server", url, "-o", str(other), "--set", "5.seed=4"]) == 0
    (changed,) = other.iterdir()
    assert not np.array_equal(_pixels(changed), _pixels(saved[0]))  # --set reached the sampler


def test_validation_error_names_the_node(comfyui, tiny_workflow, tmp_path, capsys):
    url, _, _ = comfyui
    rc = cli.main(["queue", str(tiny_workflow), "--server", url, "-o", str(tmp_path / "out"),
                   "--set", "1.model_name=missing.safetensors"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "node 1 (Flux2AccelLoadDiffusionModel): Value not in list" in err and "missing.safetensors" in err
    assert not (tmp_path / "out").exists()


def test_execution_error_names_node_type_and_message(comfyui, tiny_workflow, tmp_path, capsys):
    url, base, _ = comfyui
    (base / "models" / "diffusion_models" / "broken_queue.safetensors").write_bytes(b"not a safetensors file")
    rc = cli.main(["queue", str(tiny_workflow), "--server", url, "-o", str(tmp_path / "out"),
                   "--set", "1.model_name=broken_queue.safetensors"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "node 1 (Flux2AccelLoadDiffusionModel) failed: " in err and "broken_queue.safetensors" in err
    assert not (tmp_path / "out").exists()
