"""The pack as ComfyUI and pip see it: metadata, imports under any folder name, the engine/adapter boundary."""

from __future__ import annotations

import ast
import importlib.util
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _names(reqs):
    return {re.split(r"[<>=!~\[ ;]", r.strip(), maxsplit=1)[0].lower() for r in reqs if r.strip()}


def test_requirements_match_pyproject():
    lines = [l for l in (ROOT / "requirements.txt").read_text().splitlines() if l.strip() and not l.startswith("#")]
    deps = _pyproject()["project"]["dependencies"]
    assert _names(lines) == _names(deps)
    assert {"torch", "diffusers", "transformers", "bitsandbytes", "safetensors", "para-attn", "pillow",
            "comfyui-frontend-package"} <= _names(deps)
    assert not any(re.match(r"torch\s*==", d) for d in deps)  # torch is never pinned by the pack


def test_pyproject_metadata():
    meta = _pyproject()
    assert meta["project"]["name"] == "flux2-accel"
    assert "test" in meta["project"]["optional-dependencies"]
    assert meta["project"]["scripts"]["flux2-accel"] == "flux2_accel.optim.cli:main"
    comfy = meta["tool"]["comfy"]
    assert {"PublisherId", "DisplayName", "Icon"} <= set(comfy)
    assert meta["tool"]["setuptools"]["package-dir"]["flux2_accel"] == "."


def test_pack_imports_under_any_folder_name():
    """ComfyUI imports custom_nodes/<whatever>/__init__.py under a name derived from the folder path."""
    name = "custom_nodes_x_Flux2-Accel-clone"
    spec = importlib.util.spec_from_file_location(name, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
        assert "Flux2AccelSampler" in module.NODE_CLASS_MAPPINGS
        assert module.WEB_DIRECTORY == "./web" and (ROOT / "web").is_dir()
    finally:
        for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
            del sys.modules[key]


def _imports(path: Path):
    tree = ast.parse(path.read_text())
    for n in ast.walk(tree):
        if isinstance(n, ast.Import):
            yield from ((a.name, 0) for a in n.names)
        elif isinstance(n, ast.ImportFrom):
            yield (n.module or "", n.level)


def test_engine_never_imports_comfyui_and_pack_imports_are_relative():
    comfy_modules = ("comfy", "folder_paths", "server", "latent_preview", "execution", "nodes")
    for path in (ROOT / "optim").rglob("*.py"):
        for module, level in _imports(path):
            if level == 0:
                assert module.split(".")[0] not in comfy_modules, f"{path} imports {module}"
    for path in list((ROOT / "nodes").rglob("*.py")) + list((ROOT / "optim").rglob("*.py")) + [ROOT / "__init__.py"]:
        for module, level in _imports(path):
            if level == 0:
                assert module.split(".")[0] not in ("optim", "nodes", "flux2_accel"), f"{path}: absolute {module}"


def test_tests_run_in_a_checkout_whose_folder_is_not_an_identifier(tmp_path):
    """pytest sets the checkout up as a package (it has __init__.py); in a folder such as 'flux2-accel' it reads
    __init__.py without a package. That must not fail every test."""
    import shutil
    import subprocess

    checkout = tmp_path / "flux2-accel"
    shutil.copytree(ROOT, checkout, ignore=shutil.ignore_patterns(".git", ".venv", "__pycache__", "*.egg-info"))
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "tests/test_packaging.py::test_requirements_match_pyproject"],
                          cwd=checkout, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "1 passed" in done.stdout, done.stdout[-2000:]
