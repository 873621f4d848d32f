"""ComfyUI node adapters. Each module owns one concern and exports NODE_CLASS_MAPPINGS / NODE_DISPLAY_NAME_MAPPINGS."""

from __future__ import annotations

import importlib

from . import input_checks

# Explicit registry: add a module here when it defines nodes.
NODE_MODULES = ("loaders", "text", "sampler", "vae", "remote", "cache", "lora", "compile", "bridges", "native_cache",
                "native_compile", "parallel")

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}

for _name in NODE_MODULES:
    _module = importlib.import_module(f".{_name}", __name__)
    NODE_CLASS_MAPPINGS.update(_module.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(_module.NODE_DISPLAY_NAME_MAPPINGS)

for _node_id, _node_class in NODE_CLASS_MAPPINGS.items():  # every node checks its widgets' values at entry
    input_checks.install(_node_class, _node_id, NODE_DISPLAY_NAME_MAPPINGS.get(_node_id, _node_id))

from .routes import register_with_comfyui  # noqa: E402  (the frontend's HTTP routes; nothing outside ComfyUI)

register_with_comfyui()
