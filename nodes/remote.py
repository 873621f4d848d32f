"""Prompt encoding on a remote text encoder (the public FLUX.2 endpoint or `flux2-accel serve-text-encoder`).

The token is read when the node runs, from the FLUX2_ACCEL_REMOTE_TOKEN environment variable or the ComfyUI user
setting "flux2accel.remote_token" (HF_TOKEN only for the official endpoint and listed hosts); it is never a widget,
so it never lands in the workflow or the PNG metadata. It goes only to the official endpoint's host and to hosts
listed in FLUX2_ACCEL_REMOTE_HOSTS or the ComfyUI setting "flux2accel.remote_hosts" (see optim/serve/remote/client.py).
"""

from __future__ import annotations

import os

from ..optim.errors import InputError, Interrupted
from ..optim.serve.remote.client import (RemoteEncoderConfig, RemoteTextEncoder, listed_hosts, resolve_token,
                                         validate_url)
from ..optim.serve.remote.embedding_cache import DEFAULT_MAX_BYTES, EmbeddingCache
from ..optim.serve.remote.protocol import PUBLIC_URL
from . import comfy_services

CACHE_DIR_ENV = "FLUX2_ACCEL_EMBEDDING_CACHE_DIR"
CACHE_MB_ENV = "FLUX2_ACCEL_EMBEDDING_CACHE_MB"

# What the sampled model reads: the width is checked on arrival; "any" leaves it to the sampler's own check.
EXPECTATIONS = {
    "dev (Mistral 3, width 15360)": (15360, "mistral"),
    "klein 9B (Qwen3, width 12288)": (12288, "qwen3"),
    "klein 4B (Qwen3, width 7680)": (7680, "qwen3"),
    "any (the sampler checks)": (None, None),
}


def settings_file() -> str | None:
    """Where the UI stores "flux2accel.remote_token" and "flux2accel.remote_hosts"."""
    return comfy_services.user_settings_file()


def embedding_cache(enabled: bool) -> EmbeddingCache:
    root = os.environ.get(CACHE_DIR_ENV)
    if not root:
        user_dir = comfy_services.user_directory()
        root = (os.path.join(user_dir, "flux2-accel", "embeddings") if user_dir
                else os.path.join(os.path.expanduser("~"), ".cache", "flux2-accel", "embeddings"))
    return EmbeddingCache(root, max_bytes=cache_max_bytes(), enabled=enabled)


def cache_max_bytes() -> int:
    """The embedding cache's size bound from $FLUX2_ACCEL_EMBEDDING_CACHE_MB (unset or empty: the default)."""
    text = os.environ.get(CACHE_MB_ENV, "").strip()
    if not text:
        return DEFAULT_MAX_BYTES
    try:
        megabytes = float(text)
    except ValueError:
        megabytes = float("nan")
    if not 0 <= megabytes < float("inf"):
        raise InputError(f"{CACHE_MB_ENV} is '{text}': set it to a size in megabytes (e.g. 2048; 0 keeps nothing), "
                         "or unset it for the default.")
    return int(megabytes * 1024**2)


def remote_encoder(endpoint_url: str, expects: str, use_cache: bool, timeout: float) -> RemoteTextEncoder:
    if expects not in EXPECTATIONS:
        raise InputError(f"expects '{expects}' is not one of: {', '.join(EXPECTATIONS)}.")
    width, family = EXPECTATIONS[expects]
    endpoint_url = validate_url(endpoint_url, "endpoint_url")
    settings = settings_file()
    hosts = listed_hosts(settings)
    token, source = resolve_token(endpoint_url, settings, allowed_hosts=hosts)
    config = RemoteEncoderConfig(url=endpoint_url, token=token, token_source=source, read_timeout=float(timeout),
                                 expected_width=width, family=family, allowed_hosts=hosts)
    return RemoteTextEncoder(config, embedding_cache(use_cache))


class Flux2AccelRemoteTextEncode:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "prompt": ("STRING", {"multiline": True, "dynamicPrompts": True, "default": "",
                                  "tooltip": "What to draw, or for edits what to change in the reference images."}),
            "endpoint_url": ("STRING", {"default": PUBLIC_URL, "tooltip": (
                "The remote text encoder: the public FLUX.2 [dev] endpoint, or http://host:port/predict of a "
                "'flux2-accel serve-text-encoder'. The token comes from the FLUX2_ACCEL_REMOTE_TOKEN environment "
                "variable or the ComfyUI setting flux2accel.remote_token, never from this field, and goes only to "
                "the default endpoint's host and hosts listed in FLUX2_ACCEL_REMOTE_HOSTS or the setting "
                "flux2accel.remote_hosts.")}),
            "expects": (list(EXPECTATIONS), {"default": next(iter(EXPECTATIONS)), "tooltip": (
                "The model you sample with: the reply's embedding width must match it. 'any' skips this check and "
                "leaves it to the sampler.")}),
            "use_cache": ("BOOLEAN", {"default": True, "tooltip": (
                "Keep embeddings on disk, keyed by prompt and endpoint, so a repeated prompt sends no request. "
                f"Folder: ${CACHE_DIR_ENV}; size bound: ${CACHE_MB_ENV} (default 2048 MB).")}),
            "timeout": ("INT", {"default": 120, "min": 5, "max": 3600, "step": 1, "tooltip": (
                "Seconds the server has to send its whole reply, per attempt, before the call gives up (busy "
                "servers answer 429/5xx, which are retried with backoff).")}),
        }}

    RETURN_TYPES = ("FLUX2_CONDITIONING",)
    RETURN_NAMES = ("conditioning",)
    FUNCTION = "encode"
    CATEGORY = "flux2-accel/conditioning"
    DESCRIPTION = ("Encodes a prompt on a remote FLUX.2 text encoder, so this machine needs no text encoder "
                   "weights. Same output as Text Encode (FLUX.2).")

    def encode(self, prompt, endpoint_url, expects, use_cache, timeout):
        encoder = remote_encoder(endpoint_url, expects, use_cache, timeout)
        try:
            return (encoder.encode(prompt, should_interrupt=comfy_services.interrupt_requested),)
        except Interrupted:
            comfy_services.raise_if_interrupted()  # ComfyUI's own interrupt exception, when inside ComfyUI
            raise


NODE_CLASS_MAPPINGS = {"Flux2AccelRemoteTextEncode": Flux2AccelRemoteTextEncode}
NODE_DISPLAY_NAME_MAPPINGS = {"Flux2AccelRemoteTextEncode": "Remote Text Encode (FLUX.2)"}
