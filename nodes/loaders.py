"""Loader nodes: pick files from ComfyUI's model folders and return lazy, immutable model handles.

Loading is deferred to the first node that needs weights, and shared (optim.handle.STORE); the loader only reads the
file's header, so a wrong file is reported here, on the node that picked it.
"""

from __future__ import annotations

from pathlib import Path

from ..optim.features import attention
from ..optim.handle import ModelHandle, TextEncoderHandle, VaeHandle
from ..optim.models import layouts
from ..optim.models.checkpoint import open_checkpoint
from ..optim.models.precision import TEXT_ENCODER_PRECISIONS, TRANSFORMER_PRECISIONS
from ..optim.run.offload import OFFLOAD_MODES
from . import comfy_services

DIFFUSERS_PREFIX = "[diffusers] "


def model_choices(folder_name: str) -> list[str]:
    files = [f for f in comfy_services.list_models(folder_name) if f.lower().endswith((".safetensors", ".sft"))]
    return files + [DIFFUSERS_PREFIX + d for d in comfy_services.list_diffusers_folders()]


def resolve_choice(folder_name: str, choice: str) -> str:
    if choice.startswith(DIFFUSERS_PREFIX):
        return comfy_services.resolve_model("diffusers", choice[len(DIFFUSERS_PREFIX):])
    return comfy_services.resolve_model(folder_name, choice)


def check_file(path: str, component: str) -> layouts.Layout | None:
    """Read the header now so a wrong or broken file fails on the loader node; folders are checked at load."""
    if Path(path).is_dir():
        return None
    ckpt = open_checkpoint(path)
    layout = layouts.identify(ckpt)
    layouts.require(layout, component, ckpt)
    return layout


class Flux2AccelLoadDiffusionModel:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model_name": (model_choices("diffusion_models"), {
                "tooltip": "FLUX.2 [dev] or [klein] diffusion model from models/diffusion_models (BFL, Comfy-Org or "
                           "diffusers single files, fp8 files included) or a diffusers folder from models/diffusers."}),
            "precision": (list(TRANSFORMER_PRECISIONS), {
                "default": "bf16",
                "tooltip": "Weight precision. bf16: exact. fp8_e4m3fn: fp8 storage, bf16 compute (about half the "
                           "memory). fp8_e4m3fn_fast: fp8 matmuls on GPUs with compute capability 8.9+, else falls "
                           "back to fp8_e4m3fn. nf4: bitsandbytes 4-bit (about 0.28x of bf16)."}),
            "offload": (list(OFFLOAD_MODES), {
                "default": "none",
                "tooltip": "Keep weights in CPU memory between uses. model_cpu: whole models move to the GPU when "
                           "they run. sequential: layer by layer (least VRAM, slowest). group: transformer blocks "
                           "prefetched on a CUDA stream. No effect on CPU-only machines."}),
        }, "optional": {
            "attention_backend": (list(attention.BACKENDS), {
                "default": attention.DEFAULT_BACKEND,
                "tooltip": "Attention kernel, switched per run (no reload). auto: the fastest exact one here (cuDNN "
                           "or flash-attn 3 on Hopper GPUs, else sdpa). sdpa: PyTorch's. cudnn: PyTorch's cuDNN "
                           "kernel. flash: flash-attn (3 on Hopper, else 2). sage: SageAttention, 8-bit, fastest, "
                           "drifts from sdpa. One that cannot run here falls back to sdpa with a warning."}),
        }}

    RETURN_TYPES = ("FLUX2_MODEL",)
    RETURN_NAMES = ("model",)
    FILE_WIDGETS = ("model_name",)  # checked by resolve_choice, which names the folder
    FUNCTION = "load"
    CATEGORY = "flux2-accel/loaders"
    DESCRIPTION = "Describes a FLUX.2 transformer to load. Weights load lazily at the first sampling and are reused."

    def load(self, model_name, precision, offload="none", attention_backend=attention.DEFAULT_BACKEND):
        attention.validate(attention_backend)
        path = resolve_choice("diffusion_models", model_name)
        check_file(path, layouts.TRANSFORMER)
        return (ModelHandle(source=path, precision=precision, offload=offload,
                            attention_backend=attention_backend),)


class Flux2AccelLoadTextEncoder:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "text_encoder_name": (model_choices("text_encoders"), {
                "tooltip": "Mistral Small 3.1 (FLUX.2 [dev]) or Qwen3 (FLUX.2 [klein]) from models/text_encoders, "
                           "e.g. mistral_3_small_flux2_bf16.safetensors, or a diffusers folder."}),
            "precision": (list(TEXT_ENCODER_PRECISIONS), {
                "default": "bf16", "tooltip": "Weight precision of the text encoder: bf16, fp8 storage "
                                             "(fp8_e4m3fn, _fast), or bitsandbytes nf4. Embeddings and norms "
                                             "stay bf16."}),
        }}

    RETURN_TYPES = ("FLUX2_TEXT_ENCODER",)
    RETURN_NAMES = ("text_encoder",)
    FILE_WIDGETS = ("text_encoder_name",)  # checked by resolve_choice, which names the folder
    FUNCTION = "load"
    CATEGORY = "flux2-accel/loaders"
    DESCRIPTION = "Describes a FLUX.2 text encoder to load. Weights load lazily at the first encode and are reused."

    def load(self, text_encoder_name, precision):
        path = resolve_choice("text_encoders", text_encoder_name)
        layout = check_file(path, layouts.TEXT_ENCODER)
        tokenizer = None
        if layout is not None and layout.family == "qwen3":
            # Qwen3 files carry no tokenizer; ComfyUI ships the Qwen tokenizer FLUX.2 [klein] uses.
            shipped = comfy_services.comfy_dir("comfy", "text_encoders", "qwen25_tokenizer")
            tokenizer = shipped if shipped and Path(shipped).is_dir() else None
        return (TextEncoderHandle(source=path, precision=precision, tokenizer_path=tokenizer),)


class Flux2AccelLoadVAE:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vae_name": (model_choices("vae"), {
                "tooltip": "The FLUX.2 VAE (flux2-vae.safetensors) from models/vae, or a diffusers folder."}),
            "dtype": (["bf16", "fp32"], {"default": "bf16",
                                         "tooltip": "VAE compute precision. fp32 is slower and exact."}),
        }}

    RETURN_TYPES = ("FLUX2_VAE",)
    RETURN_NAMES = ("vae",)
    FILE_WIDGETS = ("vae_name",)  # checked by resolve_choice, which names the folder
    FUNCTION = "load"
    CATEGORY = "flux2-accel/loaders"
    DESCRIPTION = "Describes the FLUX.2 VAE to load. Weights load lazily and are reused."

    def load(self, vae_name, dtype):
        path = resolve_choice("vae", vae_name)
        check_file(path, layouts.VAE)
        return (VaeHandle(source=path, dtype=dtype),)


NODE_CLASS_MAPPINGS = {
    "Flux2AccelLoadDiffusionModel": Flux2AccelLoadDiffusionModel,
    "Flux2AccelLoadTextEncoder": Flux2AccelLoadTextEncoder,
    "Flux2AccelLoadVAE": Flux2AccelLoadVAE,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "Flux2AccelLoadDiffusionModel": "Load Diffusion Model (FLUX.2)",
    "Flux2AccelLoadTextEncoder": "Load Text Encoder (FLUX.2)",
    "Flux2AccelLoadVAE": "Load VAE (FLUX.2)",
}
