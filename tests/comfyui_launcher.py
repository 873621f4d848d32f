"""Start a real ComfyUI for the tests on a machine where torchvision cannot be installed.

ComfyUI's core imports torchvision at start-up (Stable Cascade, Cosmos and ACE models, one extra node), but PyPI has
no torchvision that loads beside the CPU build of torch used here. None of the code paths the pack's tests drive
use it. This launcher gives ComfyUI an import-only stand-in: `import torchvision.transforms` works, and any use of
an attribute raises an error that says torchvision is a stand-in.

transformers must not take the stand-in for a real torchvision (it would pick torchvision-backed image processors).
Its probe, `is_torchvision_available`, is memoized, so the launcher asks it first, while nothing named torchvision
can be found, and only then installs the stand-in. `check_probe_unchanged` verifies the answer stayed "no".

Usage: python tests/comfyui_launcher.py COMFYUI_DIR [ComfyUI's main.py arguments...]
When a real torchvision imports, the launcher does nothing but run ComfyUI.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import runpy
import sys
import types

STAND_IN = "torchvision"


class StandInAttributeError(AttributeError):
    """An attribute of the stand-in was used. An AttributeError, so probes (hasattr, getattr with a default, as
    torch's inductor makes of torchvision) see "not there" and carry on, while a real use fails with this message."""


class _StandInModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        raise StandInAttributeError(f"{self.__name__}.{name}: torchvision is a test stand-in here (no CPU build of "
                                    "torchvision loads beside this torch); this code path needs the real package.")


class _StandInFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname == STAND_IN or fullname.startswith(STAND_IN + "."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _StandInModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        parent, _, child = module.__name__.rpartition(".")
        if parent:  # `from torchvision import transforms` reads the attribute on the parent
            setattr(sys.modules[parent], child, module)


def real_torchvision_importable() -> bool:
    try:
        import torchvision  # noqa: F401
    except Exception:
        sys.modules.pop(STAND_IN, None)
        return False
    return True


def install_stand_in() -> bool:
    """Install the stand-in unless a real torchvision loads. Returns True when the stand-in is in place."""
    if real_torchvision_importable():
        return False
    if importlib.util.find_spec("transformers") is not None:
        from transformers.utils import import_utils

        # Memoize transformers' answer ("not installed") before anything named torchvision can be found.
        import_utils.is_torchvision_available()
        import_utils.is_torchvision_v2_available()
    sys.meta_path.insert(0, _StandInFinder())
    return True


def check_probe_unchanged() -> bool:
    """True when transformers still believes torchvision is absent (or transformers is not installed)."""
    if importlib.util.find_spec("transformers") is None:
        return True
    from transformers.utils import import_utils

    return not import_utils.is_torchvision_available() and not import_utils.is_torchvision_v2_available()


def main(argv: list[str]) -> None:
    comfyui_dir, *comfy_args = argv
    stand_in = install_stand_in()
    if stand_in and not check_probe_unchanged():
        raise SystemExit("comfyui_launcher: transformers would take the torchvision stand-in for a real install")
    os.chdir(comfyui_dir)
    sys.path.insert(0, comfyui_dir)
    sys.argv = [os.path.join(comfyui_dir, "main.py"), *comfy_args]
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
