"""Start a real ComfyUI for the tests on a machine where torchvision and torchaudio cannot be installed.

ComfyUI's core imports torchvision (Stable Cascade, Cosmos and ACE models, `torchvision.ops`, `.models`, `.io`,
`.transforms`) and, since about 0.2x, torchaudio (audio VAEs: `torchaudio.functional`, `.transforms`) at start-up,
but PyPI has no torchvision or torchaudio that loads beside the CPU build of torch used here. None of the code paths
the pack's tests drive use them. This launcher gives ComfyUI import-only stand-ins for both packages and every
submodule: `import torchvision.ops` or `import torchaudio.functional` works, and any use of an attribute raises an
error that says the package is a stand-in.

transformers must not take a stand-in for a real package (it would pick torchvision-backed image processors or
torchaudio-backed feature extractors). Its probes (`is_torchvision_available`, `is_torchaudio_available`...) are
memoized, so the launcher asks them first, while nothing by those names can be found, and only then installs the
stand-ins. `check_probe_unchanged` verifies every answer stayed "no".

Usage: python tests/comfyui_launcher.py COMFYUI_DIR [ComfyUI's main.py arguments...]
A package that really imports gets no stand-in; when both do, the launcher does nothing but run ComfyUI.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import runpy
import sys
import types

STAND_INS = ("torchvision", "torchaudio")  # packages ComfyUI's core imports that have no CPU build here
# transformers' memoized probes for them, asked before a stand-in exists (each must keep answering "no")
TRANSFORMERS_PROBES = ("is_torchvision_available", "is_torchvision_v2_available", "is_torchaudio_available")


class StandInAttributeError(AttributeError):
    """An attribute of the stand-in was used. An AttributeError, so probes (hasattr, getattr with a default, as
    torch's inductor makes of torchvision) see "not there" and carry on, while a real use fails with this message."""


class _StandInModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        package = self.__name__.partition(".")[0]
        raise StandInAttributeError(f"{self.__name__}.{name}: {package} is a test stand-in here (no CPU build of "
                                    f"{package} loads beside this torch); this code path needs the real package.")


class _StandInFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, packages):
        self.packages = tuple(packages)

    def find_spec(self, fullname, path=None, target=None):
        if any(fullname == name or fullname.startswith(name + ".") for name in self.packages):
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


def really_importable(package: str) -> bool:
    try:
        importlib.import_module(package)
    except Exception:
        for name in [n for n in sys.modules if n == package or n.startswith(package + ".")]:
            sys.modules.pop(name, None)
        return False
    return True


def install_stand_in() -> tuple[str, ...]:
    """Install stand-ins for the packages of STAND_INS that do not really import. Returns those packages."""
    missing = tuple(name for name in STAND_INS if not really_importable(name))
    if not missing:
        return ()
    if importlib.util.find_spec("transformers") is not None:
        from transformers.utils import import_utils

        # Memoize transformers' answers ("not installed") before anything by these names can be found.
        for probe in TRANSFORMERS_PROBES:
            getattr(import_utils, probe)()
    sys.meta_path.insert(0, _StandInFinder(missing))
    return missing


def check_probe_unchanged(stand_ins: tuple[str, ...] = STAND_INS) -> bool:
    """True when transformers still believes every stand-in package is absent (or transformers is not installed)."""
    if importlib.util.find_spec("transformers") is None:
        return True
    from transformers.utils import import_utils

    answers = {probe: getattr(import_utils, probe)() for probe in TRANSFORMERS_PROBES}
    return not any(seen for probe, seen in answers.items() if any(name in probe for name in stand_ins))


def main(argv: list[str]) -> None:
    comfyui_dir, *comfy_args = argv
    stand_ins = install_stand_in()
    if stand_ins and not check_probe_unchanged(stand_ins):
        raise SystemExit(f"comfyui_launcher: transformers would take a stand-in ({', '.join(stand_ins)}) for a "
                         "real install")
    os.chdir(comfyui_dir)
    sys.path.insert(0, comfyui_dir)
    sys.argv = [os.path.join(comfyui_dir, "main.py"), *comfy_args]
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
