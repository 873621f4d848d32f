"""Importing the libraries the pack uses makes no hub lookup for optional kernels, and says nothing about one.

Each case runs in a fresh interpreter (imports are the subject), with a stand-in `kernels` package on the path that
records every `get_kernel` call. Each has a control without the pack, which shows the lookup does happen there, so
the test can fail."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

FAKE_KERNELS = '''
import json, os
def get_kernel(repo_id, *args, **kwargs):
    with open(os.environ["KERNEL_CALLS"], "a") as f:
        f.write(json.dumps(repo_id) + "\\n")
    raise RuntimeError("could not verify publisher trust status for " + repo_id)  # what an air-gapped hub gives
'''

# A module that behaves as bitsandbytes' CPU backend does at import: look the kernel up, warn when that fails.
FAKE_IMPORTER = '''
import logging
logger = logging.getLogger(__name__)
try:
    from kernels import get_kernel
    KERNEL = get_kernel("kernels-community/quantization-bitsandbytes", version=1)
except Exception as exc:
    KERNEL = None
    logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s", exc)
'''

# bitsandbytes takes the lookup path only on a CPU with AVX512-BF16: answer yes, whatever this CPU is.
AS_IF_AVX512BF16 = '''
import importlib.abc, sys
class Patch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "bitsandbytes.functional":
            return None
        sys.meta_path.remove(self)
        import importlib.util
        spec = importlib.util.find_spec(name)
        real = spec.loader
        class Loader(importlib.abc.Loader):
            def create_module(self, spec):
                return real.create_module(spec)
            def exec_module(self, module):
                real.exec_module(module)
                module.has_avx512bf16 = lambda: True
        spec.loader = Loader()
        return spec
sys.meta_path.insert(0, Patch())
'''


def _run(tmp_path, code: str) -> tuple[list, str, dict]:
    """Run `code` with the stand-ins on the path: (kernel lookups made, stderr, the JSON it printed last)."""
    (tmp_path / "kernels").mkdir(exist_ok=True)
    (tmp_path / "kernels" / "__init__.py").write_text(FAKE_KERNELS)
    (tmp_path / "fake_backend").mkdir(exist_ok=True)
    (tmp_path / "fake_backend" / "__init__.py").write_text("")
    (tmp_path / "fake_backend" / "ops.py").write_text(FAKE_IMPORTER)
    calls = tmp_path / "calls.txt"
    calls.unlink(missing_ok=True)
    env = {"KERNEL_CALLS": str(calls), "PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                          timeout=180)
    assert done.returncode == 0, done.stderr
    lookups = [json.loads(line) for line in calls.read_text().splitlines()] if calls.exists() else []
    return lookups, done.stderr, json.loads(done.stdout.strip().splitlines()[-1])


def test_the_finder_hides_kernels_only_while_the_importing_module_runs(tmp_path):
    lookups, stderr, seen = _run(tmp_path, '''
        import json, sys
        from flux2_accel.optim.library_warnings import HubKernelImporterFinder
        sys.meta_path.insert(0, HubKernelImporterFinder(("fake_backend.ops",)))
        import fake_backend.ops
        import kernels  # still importable for everything else
        print(json.dumps({"kernel": fake_backend.ops.KERNEL, "kernels": kernels.__name__,
                          "logger_enabled": not __import__("logging").getLogger("fake_backend.ops").disabled}))
    ''')
    assert lookups == [] and "kernels-community" not in stderr
    assert seen == {"kernel": None, "kernels": "kernels", "logger_enabled": True}


def test_an_already_imported_kernels_package_comes_back_after_the_window(tmp_path):
    lookups, _, seen = _run(tmp_path, '''
        import json, sys
        import kernels
        from flux2_accel.optim.library_warnings import HubKernelImporterFinder
        sys.meta_path.insert(0, HubKernelImporterFinder(("fake_backend.ops",)))
        import fake_backend.ops
        print(json.dumps({"same": sys.modules["kernels"] is kernels}))
    ''')
    assert lookups == [] and seen == {"same": True}


def test_control_without_the_finder_the_module_looks_the_kernel_up_and_warns(tmp_path):
    lookups, stderr, _ = _run(tmp_path, 'import fake_backend.ops\nprint("{}")')
    assert lookups == ["kernels-community/quantization-bitsandbytes"]
    assert "could not verify publisher trust status" in stderr


@pytest.mark.parametrize("with_pack", [True, False])
def test_importing_bitsandbytes_after_the_pack_makes_no_hub_kernel_lookup(tmp_path, with_pack):
    lookups, stderr, seen = _run(tmp_path, AS_IF_AVX512BF16 + ("import flux2_accel.optim\n" if with_pack else "") +
                                 '''
import json, bitsandbytes, torch
print(json.dumps({"bnb": bitsandbytes.__version__}))
''')
    if with_pack:
        assert lookups == [], lookups
        assert "kernels-community" not in stderr and "publisher trust" not in stderr, stderr
    else:  # the control: bitsandbytes itself does look the kernel up here, so the case above can fail
        assert lookups == ["kernels-community/quantization-bitsandbytes"]
    assert seen["bnb"]


def test_the_finder_is_installed_once_under_two_import_names():
    """ComfyUI imports the pack as its custom-node folder, the CLI as flux2_accel: two copies of the module."""
    import importlib.util

    import flux2_accel.optim  # noqa: F401
    from flux2_accel.optim import library_warnings

    spec = importlib.util.spec_from_file_location("custom_nodes_copy_library_warnings", library_warnings.__file__)
    second_copy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(second_copy)
    assert second_copy.HubKernelImporterFinder is not library_warnings.HubKernelImporterFinder
    second_copy.keep_library_imports_offline()
    library_warnings.keep_library_imports_offline()
    assert sum(bool(getattr(f, library_warnings.HubKernelImporterFinder.MARK, False)) for f in sys.meta_path) == 1
