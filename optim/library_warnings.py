"""No hub lookup, and no message about one, when a library the pack uses is imported.

bitsandbytes (0.49 to 0.50.2 at least), on a CPU with AVX512-BF16, runs `kernels.get_kernel(
"kernels-community/quantization-bitsandbytes")` while `bitsandbytes.backends.cpu.ops` is imported, whenever the
`kernels` package can be imported (transformers 5.25 installs it). That is a Hugging Face hub request (a publisher
trust check, then a download): on an air-gapped machine it stalls the import for seconds and logs "Failed to load CPU
gemm_4bit_forward from kernels-community: ... could not verify publisher trust status" (or, offline, "Skipping
publisher trust check"). Neither bitsandbytes nor kernels has a setting that turns the lookup off (kernels only
reads huggingface_hub's process-wide offline switch, and then still fails and bitsandbytes still warns), and the
pack keeps 4-bit layers in bitsandbytes' portable layout (precision.keep_portable_4bit_layout), which that kernel
does not serve.

So the source is switched off where it is: while, and only while, that one bitsandbytes module executes, `kernels`
is not importable and that module's logger is silent; bitsandbytes then uses its own built-in CPU kernel. Nothing
else in the process loses `kernels` or the hub (other custom nodes in ComfyUI may use both). If bitsandbytes was
imported before the pack (by another custom node), the lookup already happened and is not the pack's to undo.
"""

from __future__ import annotations

import importlib.abc
import logging
import sys

HUB_KERNEL_IMPORTERS = ("bitsandbytes.backends.cpu.ops",)  # modules that call kernels.get_kernel at import
HUB_KERNEL_PACKAGE = "kernels"


class ImportWithoutHubKernels(importlib.abc.Loader):
    """Executes a module with `kernels` unimportable and the module's own logger silenced, then restores both."""

    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        saved = sys.modules.get(HUB_KERNEL_PACKAGE, _ABSENT)
        logger = logging.getLogger(module.__name__)
        was_disabled = logger.disabled
        sys.modules[HUB_KERNEL_PACKAGE] = None  # `from kernels import ...` raises ImportError inside the module
        logger.disabled = True
        try:
            self.loader.exec_module(module)
        finally:
            logger.disabled = was_disabled
            if saved is _ABSENT:
                sys.modules.pop(HUB_KERNEL_PACKAGE, None)
            else:
                sys.modules[HUB_KERNEL_PACKAGE] = saved

    def __getattr__(self, name):  # get_resource_reader, is_package, ... from the real loader
        return getattr(self.loader, name)


_ABSENT = object()


class HubKernelImporterFinder(importlib.abc.MetaPathFinder):
    """Finds HUB_KERNEL_IMPORTERS through the other finders and wraps their loader in ImportWithoutHubKernels."""

    MARK = "flux2_accel_hub_kernel_finder"  # one per process, whatever name the pack was imported under

    def __init__(self, modules=HUB_KERNEL_IMPORTERS):
        self.modules = frozenset(modules)
        setattr(self, self.MARK, True)

    def find_spec(self, fullname, path, target=None):
        if fullname not in self.modules:
            return None
        for finder in sys.meta_path:
            if getattr(finder, HubKernelImporterFinder.MARK, False) or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = ImportWithoutHubKernels(spec.loader)
                return spec
        return None


def keep_library_imports_offline() -> None:
    """Install the finder once per process (the pack may be imported under two names: ComfyUI's custom-node folder
    and flux2_accel), before any library the engine imports."""
    if not any(getattr(f, HubKernelImporterFinder.MARK, False) for f in sys.meta_path):
        sys.meta_path.insert(0, HubKernelImporterFinder())
