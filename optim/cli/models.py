"""The model components and device the CLI's model-running subcommands (generate, calibrate-teacache) ask for:
imported only by their runners, after the arguments were checked (this module loads torch)."""

from __future__ import annotations

import torch

from ..devices import default_device, torch_device
from ..handle import ModelHandle, TextEncoderHandle, VaeHandle
from ..models.demo import place_demo_components


def device(args) -> torch.device:
    return torch_device(args.device or default_device())


def components(args, store):
    """(ModelHandle, VaeHandle, TextEncoderHandle) for the files the arguments name (their precisions included, as
    the loader nodes build them), or for tiny random-weight components placed in `store` with --demo."""
    precision = getattr(args, "precision", "bf16")
    text_precision = getattr(args, "text_encoder_precision", "bf16")
    model_options = dict(precision=precision, offload=getattr(args, "offload", "none"),
                         attention_backend=getattr(args, "attention_backend", "auto"))
    if args.demo:
        return place_demo_components(store, text_precision=text_precision, **model_options)
    # fp32 VAE: the CLI decodes at full precision, as `loading.load_vae` does by default
    return (ModelHandle(args.transformer, **model_options), VaeHandle(args.vae, dtype="fp32"),
            TextEncoderHandle(args.text_encoder, precision=text_precision, tokenizer_path=args.tokenizer))
