"""flux2-accel engine: pure torch / diffusers / transformers code, never imports ComfyUI."""

from .library_warnings import drop_irrelevant_library_warnings

__version__ = "0.1.0"

drop_irrelevant_library_warnings()  # first, before any library the engine imports can emit them
