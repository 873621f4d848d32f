"""Whether Ray Serve and its HTTP stack are installed, asked before `flux2-accel serve` imports them (launcher.py
imports them at its top): without them, the install hint instead of an ImportError."""

from __future__ import annotations

import importlib.util

from ...errors import ServeError

INSTALL_HINT = ('flux2-accel serve runs on Ray Serve, which is not installed in this Python: '
                'pip install "flux2-accel[serve]" (Ray Serve and its HTTP stack), then run it again.')
REQUIRED_MODULES = ("ray.serve", "fastapi", "multipart")


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # its parent package is missing
        return False


def require_serve_installed() -> None:
    """ServeError with the install hint when a module `serve` needs is missing."""
    if not all(map(_installed, REQUIRED_MODULES)):
        raise ServeError(INSTALL_HINT)
