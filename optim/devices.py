"""Which torch device the engine runs on: the features, the run path, the bench and the command line all ask here."""

from __future__ import annotations

import torch

from .errors import InputError


def execution_device() -> torch.device:
    """The current CUDA device when there is one, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def default_device() -> str:
    """The `--device` a command uses when none is given."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def torch_device(name: str) -> torch.device:
    """The `--device` value as a torch device this torch can use, or an InputError naming it."""
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise InputError(f"--device '{name}' is not a torch device ({e}).") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {name}: this torch has no CUDA device; use --device cpu.")
    return dev
