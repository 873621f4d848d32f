"""flux2-accel engine: pure torch / diffusers / transformers code, never imports ComfyUI."""

__version__ = "0.1.0"
