"""Listing model folders follows links into shared stores but survives link loops: each real folder is visited
once, and depth and folder count are bounded (checked by counting directory reads, not by wall time)."""

from __future__ import annotations

import os

import pytest

from flux2_accel.nodes import comfy_services


@pytest.fixture
def scans(monkeypatch):
    """The folders the walk reads, in order."""
    seen = []
    real_scandir = os.scandir

    def counting_scandir(path):
        seen.append(os.path.realpath(path))
        return real_scandir(path)

    monkeypatch.setattr(comfy_services.os, "scandir", counting_scandir)
    monkeypatch.setattr(comfy_services, "_folder_paths", None)
    return seen


def _models(tmp_path, monkeypatch):
    models = tmp_path / "models"
    monkeypatch.setenv("FLUX2_ACCEL_MODELS_DIR", str(models))
    return models


@pytest.mark.parametrize("loops", [
    ["dot_a -> .", "dot_b -> ."],  # the example: two links to '.'
    ["pipe/up -> ..", "comp/sub/top -> ../.."],  # links to ancestors
    ["ring1 -> ring2", "ring2/next -> ../ring1"],  # two folders linking to each other
    ["comp/self -> ../comp", "dot_a -> ."],
])
def test_diffusers_listing_survives_link_loops(tmp_path, monkeypatch, scans, loops):
    root = _models(tmp_path, monkeypatch) / "diffusers"
    for folder, marker in (("pipe", "model_index.json"), ("pipe/transformer", "config.json"),
                           ("comp", "config.json")):
        (root / folder).mkdir(parents=True, exist_ok=True)
        (root / folder / marker).write_text("{}")
    for loop in loops:
        link, target = loop.split(" -> ")
        if link == "ring1":
            (root / "ring2").mkdir(exist_ok=True)
        (root / link).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(target, root / link, target_is_directory=True)
    assert comfy_services.list_diffusers_folders() == ["comp", "pipe"]
    assert len(scans) == len(set(scans))  # each real folder read once
    real_folders = {os.path.realpath(d) for d, _, _ in os.walk(root)}  # os.walk does not follow links: no loop
    assert set(scans) <= real_folders


@pytest.mark.parametrize("loops", [["self -> ."], ["sub/back -> .."], ["a -> sub", "sub/b -> ../a"]])
def test_file_listing_outside_comfyui_survives_link_loops(tmp_path, monkeypatch, scans, loops):
    root = _models(tmp_path, monkeypatch) / "loras"
    (root / "sub").mkdir(parents=True)
    (root / "one.safetensors").write_bytes(b"")
    (root / "sub" / "two.safetensors").write_bytes(b"")
    for loop in loops:
        link, target = loop.split(" -> ")
        os.symlink(target, root / link, target_is_directory=True)
    listed = comfy_services.list_models("loras")
    assert sorted(os.path.basename(f) for f in listed) == ["one.safetensors", "two.safetensors"]
    assert len(scans) == len(set(scans)) == 2  # loras and loras/sub, whatever the links


def test_a_linked_store_is_listed_once_under_its_first_name(tmp_path, monkeypatch, scans):
    root = _models(tmp_path, monkeypatch) / "diffusers"
    store = tmp_path / "store" / "flux"
    store.mkdir(parents=True)
    (store / "model_index.json").write_text("{}")
    root.mkdir(parents=True)
    for name in ("a_link", "b_link"):
        os.symlink(store, root / name, target_is_directory=True)
    assert comfy_services.list_diffusers_folders() == ["a_link"]


def test_depth_and_folder_count_are_bounded(tmp_path, monkeypatch, scans):
    root = _models(tmp_path, monkeypatch) / "loras"
    deep = root.joinpath(*[f"d{i}" for i in range(12)])
    deep.mkdir(parents=True)
    (deep / "too_deep.safetensors").write_bytes(b"")
    (root / "d0" / "shallow.safetensors").write_bytes(b"")
    monkeypatch.setattr(comfy_services, "WALK_MAX_DEPTH", 4)
    assert comfy_services.list_models("loras") == [os.path.join("d0", "shallow.safetensors")]
    assert len(scans) == 5  # loras, d0 .. d3

    scans.clear()
    for i in range(30):
        (root / f"wide{i:02d}").mkdir()
    monkeypatch.setattr(comfy_services, "WALK_MAX_FOLDERS", 7)
    comfy_services.list_models("loras")
    assert len(scans) == 7
