"""Command-line arguments shared by subcommands, defined once, and the model components they name."""

from __future__ import annotations

import torch

from .errors import InputError
from .handle import ModelHandle, TextEncoderHandle, VaeHandle

DEMO_SIZE = 64


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def add_model_arguments(p, transformer_help: str = "diffusion model: .safetensors file or diffusers folder",
                        demo_help: str = "build tiny random-weight components and run the whole path (the image is "
                                         "noise)") -> None:
    p.add_argument("--demo", action="store_true", help=demo_help)
    p.add_argument("--transformer", help=transformer_help)
    p.add_argument("--text-encoder", help="text encoder: .safetensors file or diffusers folder")
    p.add_argument("--vae", help="VAE: .safetensors file or diffusers folder")
    p.add_argument("--tokenizer", help="tokenizer folder, for single-file text encoders without one embedded")


def add_size_arguments(p) -> None:
    p.add_argument("--width", type=int, default=None, help=f"default 1024 ({DEMO_SIZE} with --demo)")
    p.add_argument("--height", type=int, default=None, help=f"default 1024 ({DEMO_SIZE} with --demo)")
    p.add_argument("--guidance", type=float, default=4.0)


def add_device_argument(p) -> None:
    p.add_argument("--device", default=default_device())


def size(args) -> tuple[int, int]:
    default = DEMO_SIZE if args.demo else 1024
    return args.width or default, args.height or default


def device(args) -> torch.device:
    return torch_device(args.device)


def torch_device(name: str) -> torch.device:
    """The `--device` value as a torch device this torch can use, or an InputError naming it."""
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise InputError(f"--device '{name}' is not a torch device ({e}).") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {name}: this torch has no CUDA device; use --device cpu.")
    return dev


def components(args, store):
    """(ModelHandle, VaeHandle, TextEncoderHandle) for the files the arguments name, or for tiny random-weight
    components placed in `store` with --demo."""
    if args.demo:
        from . import tiny
        from .text_encoding import TextEncoder

        c = tiny.build_components(tiny.TINY)
        handles = (ModelHandle("<demo transformer>", family=c.spec.family), VaeHandle("<demo vae>"),
                   TextEncoderHandle("<demo text encoder>"))
        encoder = TextEncoder(c.text_encoder, c.tokenizer, "mistral", tiny.TINY.text_out_layers)
        for handle, module in zip(handles, (c.transformer, c.vae, encoder)):
            store.get(handle.base_key, lambda m=module: m)
        return handles
    missing = [n for n in ("transformer", "text_encoder", "vae") if not getattr(args, n)]
    if missing:
        raise InputError("give --" + ", --".join(m.replace("_", "-") for m in missing) + " (or use --demo)")
    # fp32 VAE: the CLI decodes at full precision, as `loading.load_vae` does by default
    return (ModelHandle(args.transformer), VaeHandle(args.vae, dtype="fp32"),
            TextEncoderHandle(args.text_encoder, tokenizer_path=args.tokenizer))
