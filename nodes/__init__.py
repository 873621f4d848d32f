"""ComfyUI node adapters. Each module owns one concern and exports NODE_CLASS_MAPPINGS / NODE_DISPLAY_NAME_MAPPINGS."""

from __future__ import annotations

import importlib

# Explicit registry: add a module here when it defines nodes.
NODE_MODULES = ("loaders", "text", "sampler", "vae", "remote", "cache", "lora", "compile", "bridges", "native_cache",
                "native_compile")

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}

for _name in NODE_MODULES:
    _module = importlib.import_module(f".{_name}", __name__)
    NODE_CLASS_MAPPINGS.update(_module.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(_module.NODE_DISPLAY_NAME_MAPPINGS)

from .routes import register_with_comfyui  # noqa: E402  (the frontend's HTTP routes; nothing outside ComfyUI)

register_with_comfyui()
