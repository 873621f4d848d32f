"""flux2-accel engine: pure torch / diffusers / transformers code, never imports ComfyUI."""

from .library_warnings import keep_library_imports_offline

__version__ = "0.1.0"

keep_library_imports_offline()  # first, before any library the engine imports looks up hub kernels
