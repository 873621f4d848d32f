"""flux2-accel: a ComfyUI node pack that makes FLUX.2 fast and light.

ComfyUI imports this folder under whatever name it was cloned to; `pip install -e .` exposes it as `flux2_accel`.
Only relative imports are used inside the pack (ComfyUI has its own top-level `nodes` module).
"""

if __package__:  # as ComfyUI (under the clone's folder name) and `import flux2_accel` load it
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
else:
    # pytest reads this file without a package when it sets up the checkout's folder as a package and the folder's
    # name is not a Python identifier (a clone in 'flux2-accel/', say). Nothing to register then: tests import the
    # pack as `flux2_accel`.
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}

WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
