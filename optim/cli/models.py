"""The model components and device the CLI's model-running subcommands (generate, calibrate-teacache) ask for:
imported only by their runners, after the arguments were checked (this module loads torch)."""

from __future__ import annotations

import torch

from ..devices import default_device, torch_device
from ..handle import ModelHandle, TextEncoderHandle, VaeHandle
from ..models import tiny
from ..models.precision import apply_precision, apply_text_encoder_precision
from ..models.text_encoding import TextEncoder


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
        c = tiny.build_components(tiny.TINY)
        # The random weights stay float32 at bf16 (nothing to convert), as the demo always ran; other precisions
        # convert them as loading a file would.
        transformer = c.transformer if precision == "bf16" else apply_precision(c.transformer, precision)
        text_model = (c.text_encoder if text_precision == "bf16"
                      else apply_text_encoder_precision(c.text_encoder, text_precision))
        handles = (ModelHandle("<demo transformer>", family=c.spec.family, **model_options),
                   VaeHandle("<demo vae>"), TextEncoderHandle("<demo text encoder>", precision=text_precision))
        encoder = TextEncoder(text_model, c.tokenizer, "mistral", tiny.TINY.text_out_layers)
        for handle, module in zip(handles, (transformer, c.vae, encoder)):
            store.get(handle.base_key, lambda m=module: m)
        return handles
    # fp32 VAE: the CLI decodes at full precision, as `loading.load_vae` does by default
    return (ModelHandle(args.transformer, **model_options), VaeHandle(args.vae, dtype="fp32"),
            TextEncoderHandle(args.text_encoder, precision=text_precision, tokenizer_path=args.tokenizer))
