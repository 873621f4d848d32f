"""The demo's components: tiny random-weight FLUX.2 parts placed in a ModelStore under handles, so the whole run
path (store, features, engine) works on them as on loaded files. Used by `generate --demo` and `serve --demo`."""

from __future__ import annotations

from ..handle import ModelHandle, TextEncoderHandle, VaeHandle
from . import tiny
from .precision import apply_precision, apply_text_encoder_precision
from .text_encoding import TextEncoder


def place_demo_components(store, precision: str = "bf16", text_precision: str = "bf16", **model_options):
    """(ModelHandle, VaeHandle, TextEncoderHandle) of the tiny components, placed in `store`. model_options go to
    the ModelHandle (offload, attention_backend)."""
    c = tiny.build_components(tiny.TINY)
    # The random weights stay float32 at bf16 (nothing to convert), as the demo always ran; other precisions
    # convert them as loading a file would.
    transformer = c.transformer if precision == "bf16" else apply_precision(c.transformer, precision)
    text_model = (c.text_encoder if text_precision == "bf16"
                  else apply_text_encoder_precision(c.text_encoder, text_precision))
    handles = (ModelHandle("<demo transformer>", family=c.spec.family, precision=precision, **model_options),
               VaeHandle("<demo vae>"), TextEncoderHandle("<demo text encoder>", precision=text_precision))
    encoder = TextEncoder(text_model, c.tokenizer, "mistral", tiny.TINY.text_out_layers)
    for handle, module in zip(handles, (transformer, c.vae, encoder)):
        store.get(handle.base_key, lambda m=module: m)
    return handles
