"""flux2-accel: a ComfyUI node pack that makes FLUX.2 fast and light.

ComfyUI imports this folder under whatever name it was cloned to; `pip install -e .` exposes it as `flux2_accel`.
Only relative imports are used inside the pack (ComfyUI has its own top-level `nodes` module).
"""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
