"""`flux2-accel generate`: one image from model files, or from tiny random weights with --demo."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .errors import InputError


def add_arguments(p) -> None:
    p.add_argument("--demo", action="store_true",
                   help="build tiny random-weight components and run the whole path (the image is noise)")
    p.add_argument("--transformer", help="diffusion model: .safetensors file or diffusers folder")
    p.add_argument("--text-encoder", help="text encoder: .safetensors file or diffusers folder")
    p.add_argument("--vae", help="VAE: .safetensors file or diffusers folder")
    p.add_argument("--tokenizer", help="tokenizer folder, for single-file text encoders without one embedded")
    p.add_argument("--prompt", default="a red dog in a green house")
    p.add_argument("--reference", action="append", default=[], help="reference image for editing (repeatable)")
    p.add_argument("--width", type=int, default=None, help="default 1024 (64 with --demo)")
    p.add_argument("--height", type=int, default=None, help="default 1024 (64 with --demo)")
    p.add_argument("--steps", type=int, default=None, help="default 28 (4 with --demo)")
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--output", "-o", default="flux2.png", help="output PNG (batch items get _1, _2... suffixes)")


def _components(args):
    from . import tiny
    from .loading import load_text_encoder, load_transformer, load_vae
    from .text_encoding import TextEncoder

    if args.demo:
        c = tiny.build_components(tiny.TINY)
        family = "mistral"
        return c.transformer, c.vae, TextEncoder(c.text_encoder, c.tokenizer, family, tiny.TINY.text_out_layers)
    missing = [n for n in ("transformer", "text_encoder", "vae") if not getattr(args, n)]
    if missing:
        raise InputError("give --" + ", --".join(m.replace("_", "-") for m in missing) + " (or use --demo)")
    return (load_transformer(args.transformer), load_vae(args.vae),
            load_text_encoder(args.text_encoder, tokenizer_path=args.tokenizer))


def run(args) -> int:
    from PIL import Image

    from .latents import decode, to_pil
    from .sampling import SamplingParams, sample

    t0 = time.perf_counter()
    transformer, vae, text_encoder = _components(args)
    transformer.to(args.device), vae.to(args.device), text_encoder.model.to(args.device)
    loaded = time.perf_counter()
    demo_default = 64 if args.demo else 1024
    params = SamplingParams(width=args.width or demo_default, height=args.height or demo_default,
                            steps=args.steps or (4 if args.demo else 28), guidance=args.guidance, seed=args.seed,
                            batch_size=args.batch_size)
    refs = [Image.open(p).convert("RGB") for p in args.reference] or None
    cond = text_encoder.encode(args.prompt)
    latent = sample(transformer, vae, cond, params, reference_images=refs)
    images = to_pil(decode(vae, latent))
    out = Path(args.output)
    paths = [out] if len(images) == 1 else [out.with_name(f"{out.stem}_{i + 1}{out.suffix}")
                                              for i in range(len(images))]
    for img, path in zip(images, paths):
        img.save(path)
    done = time.perf_counter()
    print(f"wrote {', '.join(map(str, paths))} ({params.width}x{params.height}, {params.steps} steps, seed "
          f"{params.seed}); load {loaded - t0:.1f}s, sample+decode {done - loaded:.1f}s")
    if args.demo:
        print("note: --demo uses tiny RANDOM weights, so the image is noise. It checks that the whole path runs; "
              "give --transformer/--text-encoder/--vae for a real image.")
    return 0
