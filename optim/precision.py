"""Precision of loaded models: bf16 now; fp8 and nf4 arrive with the precision work (issue 3)."""

from __future__ import annotations

import torch

from .errors import InputError

TRANSFORMER_PRECISIONS = ("bf16",)
TEXT_ENCODER_PRECISIONS = ("bf16",)


def apply_precision(model: torch.nn.Module, precision: str) -> torch.nn.Module:
    if precision != "bf16":
        raise InputError(f"precision '{precision}' is not available; choose one of {TRANSFORMER_PRECISIONS}.")
    return model


def apply_text_encoder_precision(model: torch.nn.Module, precision: str) -> torch.nn.Module:
    if precision != "bf16":
        raise InputError(f"precision '{precision}' is not available; choose one of {TEXT_ENCODER_PRECISIONS}.")
    return model
