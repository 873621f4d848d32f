"""flux2-accel: a ComfyUI node pack that makes FLUX.2 fast and light.

ComfyUI imports this folder under whatever name it was cloned to; `pip install -e .` exposes it as `flux2_accel`.
Only relative imports are used inside the pack (ComfyUI has its own top-level `nodes` module).
"""

import importlib

WEB_DIRECTORY = "./web"
_NODE_MAPPINGS = ("NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS")


def __getattr__(name: str):
    """The node mappings, imported from .nodes when first read (PEP 562): ComfyUI reads them right after importing
    the pack, but `flux2-accel` (optim/cli/main.py) passes through this file too, and its `--help` must not wait for
    torch and diffusers, which the nodes import."""
    if name not in _NODE_MAPPINGS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if not __package__:
        # pytest reads this file without a package when it sets up the checkout's folder as a package and the
        # folder's name is not a Python identifier (a clone in 'flux2-accel/', say). Nothing to register then: tests
        # import the pack as `flux2_accel`.
        return {}
    return getattr(importlib.import_module(".nodes", __package__), name)


__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
