"""The pack as ComfyUI and pip see it: metadata, imports under any folder name, the engine/adapter boundary."""

from __future__ import annotations

import ast
import importlib.util
import re
import sys
from pathlib import Path

from packaging.requirements import Requirement  # pytest's own dependency
from packaging.version import Version

try:
    import tomllib  # Python 3.11+
except ImportError:  # Python 3.10, which the pack supports: pytest itself requires tomli there
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def _pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _names(reqs):
    return {re.split(r"[<>=!~\[ ;]", r.strip(), maxsplit=1)[0].lower() for r in reqs if r.strip()}


def test_requirements_match_pyproject():
    lines = [l for l in (ROOT / "requirements.txt").read_text().splitlines() if l.strip() and not l.startswith("#")]
    deps = _pyproject()["project"]["dependencies"]
    assert _names(lines) == _names(deps)
    assert {"torch", "diffusers", "transformers", "bitsandbytes", "safetensors", "pillow",
            "comfyui-frontend-package"} <= _names(deps)
    assert not any(re.match(r"torch\s*==", d) for d in deps)  # torch is never pinned by the pack


def test_para_attn_is_not_a_dependency_and_no_module_imports_it():
    """para-attn 0.3.38, its last release, declares a direct-URL dependency that pip >= 26.3 refuses from PyPI, so
    it made the pack uninstallable with pip; the pack's First Block Cache is its own
    (optim/features/caching/fbcache.py)."""
    meta = _pyproject()["project"]
    lines = [l for l in (ROOT / "requirements.txt").read_text().splitlines() if l.strip() and not l.startswith("#")]
    for names in (_names(meta["dependencies"]), _names(lines), set(_constraints()),
                  *(_names(extra) for extra in meta["optional-dependencies"].values())):
        assert not names & {"para-attn", "para_attn"}
    for path in list((ROOT / "nodes").rglob("*.py")) + list((ROOT / "optim").rglob("*.py")) + [ROOT / "__init__.py"]:
        assert not any(module.split(".")[0] == "para_attn" for module, _ in _imports(path)), path


def test_no_dependency_is_a_direct_url():
    """pip refuses direct-URL requirements in distributions from an index: the pack's own must be plain names."""
    meta = _pyproject()["project"]
    for spec in meta["dependencies"] + [d for extra in meta["optional-dependencies"].values() for d in extra]:
        assert Requirement(spec).url is None, spec


def test_pyproject_metadata():
    meta = _pyproject()
    assert meta["project"]["name"] == "flux2-accel"
    assert "test" in meta["project"]["optional-dependencies"]
    assert meta["project"]["scripts"]["flux2-accel"] == "flux2_accel.optim.cli.main:main"
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


def _constraints() -> dict[str, Version]:
    pins = {}
    for line in (ROOT / "constraints" / "ci.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and version, f"constraints/ci.txt: '{line}' is not an exact 'name==version' pin"
            pins[re.sub(r"[-_.]+", "-", name.strip().lower())] = Version(version.strip())
    return pins


def test_ci_constraints_pin_every_dependency_within_its_declared_range():
    """CI installs with constraints/ci.txt; the ranges in pyproject.toml are what users get. Every runtime and test
    dependency must be pinned there at a version its range allows, so the two cannot drift apart silently."""
    meta = _pyproject()["project"]
    pins = _constraints()
    for spec in meta["dependencies"] + meta["optional-dependencies"]["test"]:
        req = Requirement(spec)
        name = re.sub(r"[-_.]+", "-", req.name.lower())
        if name == "torch":  # installed first, exactly, by the README's set-up line, not by the constraints
            continue
        assert name in pins, f"constraints/ci.txt does not pin '{req.name}' (pyproject.toml: '{spec}')"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"constraints/ci.txt pins {req.name}=={pins[name]}, outside pyproject.toml's '{spec}'")
    assert "flux2-accel" not in pins, "constraints/ci.txt must not pin the pack itself"


def test_ci_installs_torch_then_the_pack_with_the_constraints():
    run = (ROOT / ".ci" / "run").read_text()
    torch_line = re.search(r"^pip install torch==(\S+)$", run, re.M)
    pack_line = re.search(r'^pip install -c constraints/ci\.txt -e "\.\[test\]"$', run, re.M)
    assert torch_line and pack_line and torch_line.start() < pack_line.start(), run
    torch_req = next(Requirement(d) for d in _pyproject()["project"]["dependencies"] if d.startswith("torch"))
    assert torch_req.specifier.contains(Version(torch_line.group(1).split("+")[0]))
    assert "torch" not in _constraints()
