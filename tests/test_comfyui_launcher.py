"""The launcher the real-ComfyUI tests start ComfyUI with: its torchvision and torchaudio stand-ins import with the
submodules ComfyUI's core imports, answer probes with "not there", fail real uses clearly, and never make
transformers believe either package is installed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent

CHECK = r"""
import importlib, sys
sys.path.insert(0, sys.argv[1])
import comfyui_launcher as launcher
real = {name: launcher.really_importable(name) for name in launcher.STAND_INS}
installed = launcher.install_stand_in()
print("installed", sorted(installed), "real", sorted(name for name, ok in real.items() if ok))
assert set(installed) == {name for name, ok in real.items() if not ok}
# the submodules ComfyUI's core imports (0.8.0 and 0.33.0), in each form it uses
SUBMODULES = {"torchvision": ["ops", "models", "models.optical_flow", "io", "transforms", "transforms.functional"],
              "torchaudio": ["functional", "transforms"]}
for package in installed:
    top = importlib.import_module(package)
    for sub in SUBMODULES[package]:
        module = importlib.import_module(f"{package}.{sub}")
        assert module is sys.modules[f"{package}.{sub}"]
        parent, _, child = f"{package}.{sub}".rpartition(".")
        assert getattr(sys.modules[parent], child) is module  # `from package import sub` gives the same module
    assert not hasattr(top, "__version__") and getattr(top, "load", None) is None  # probes see "not there"
    try:
        top.functional.resize if package == "torchvision" else top.functional.resample
    except launcher.StandInAttributeError as e:
        assert "stand-in" in str(e) and package in str(e), e
    else:
        raise AssertionError(f"a real use of the {package} stand-in did not fail")
if "torchvision" in installed:
    from torchvision import transforms
    import torchvision.transforms.functional as TF
    assert TF is transforms.functional and getattr(transforms, "Compose", None) is None
from transformers.utils import import_utils
seen = {probe: getattr(import_utils, probe)() for probe in launcher.TRANSFORMERS_PROBES}
print("transformers_sees", sorted(probe for probe, yes in seen.items() if yes))
assert launcher.check_probe_unchanged(installed)
"""


def test_stand_ins_import_fail_real_uses_and_stay_invisible_to_transformers():
    done = subprocess.run([sys.executable, "-c", CHECK, str(TESTS)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    if "real []" in done.stdout:  # the machines this project tests on: neither loads beside this torch
        assert "installed ['torchaudio', 'torchvision']" in done.stdout
        assert "transformers_sees []" in done.stdout


def test_probes_answered_after_a_stand_in_would_be_caught():
    """The check that guards the launcher fails when transformers is asked only after the stand-ins are in place
    (what the memoizing prevents), so a transformers release that stops memoizing is caught, not silently
    served a stand-in."""
    check = r"""
import sys
sys.path.insert(0, sys.argv[1])
import comfyui_launcher as launcher
missing = tuple(n for n in launcher.STAND_INS if not launcher.really_importable(n))
if not missing:
    print("nothing to stand in"); raise SystemExit(0)
sys.meta_path.insert(0, launcher._StandInFinder(missing))  # stand-ins first, probes never asked before
print("unchanged", launcher.check_probe_unchanged(missing))
"""
    done = subprocess.run([sys.executable, "-c", check, str(TESTS)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    if "nothing to stand in" not in done.stdout:
        assert "unchanged False" in done.stdout, done.stdout
