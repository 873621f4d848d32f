"""The launcher the real-ComfyUI tests start ComfyUI with: its torchvision stand-in imports, answers probes with
"not there", fails real uses clearly, and never makes transformers believe torchvision is installed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent

CHECK = r"""
import importlib.util, sys
sys.path.insert(0, sys.argv[1])
import comfyui_launcher as launcher
real = launcher.real_torchvision_importable()
installed = launcher.install_stand_in()
print("installed", installed, "real", real)
if installed:
    import torchvision
    import torchvision.transforms.functional as TF
    from torchvision import transforms
    assert transforms is sys.modules["torchvision.transforms"] and TF is sys.modules["torchvision.transforms.functional"]
    assert not hasattr(torchvision, "models") and getattr(transforms, "Compose", None) is None
    try:
        torchvision.models.efficientnet_v2_s()
    except launcher.StandInAttributeError as e:
        assert "stand-in" in str(e)
    else:
        raise AssertionError("a real use of the stand-in did not fail")
from transformers.utils import import_utils
print("transformers_sees_torchvision", import_utils.is_torchvision_available())
assert launcher.check_probe_unchanged()
"""


def test_stand_in_imports_fails_real_uses_and_stays_invisible_to_transformers():
    done = subprocess.run([sys.executable, "-c", CHECK, str(TESTS)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    if "real False" in done.stdout:  # the machines this project tests on: no torchvision loads beside torch
        assert "installed True" in done.stdout and "transformers_sees_torchvision False" in done.stdout
