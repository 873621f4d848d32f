"""`flux2-accel generate`: one image from model files, or from tiny random weights with --demo."""

from __future__ import annotations

import time
from pathlib import Path

from . import cli_args
from .errors import InputError
from .images import open_image


def add_arguments(p) -> None:
    cli_args.add_model_arguments(p)
    p.add_argument("--prompt", default="a red dog in a green house")
    p.add_argument("--reference", action="append", default=[], help="reference image for editing (repeatable)")
    cli_args.add_size_arguments(p)
    p.add_argument("--steps", type=int, default=None, help="default 28 (4 with --demo)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=1)
    cli_args.add_device_argument(p)
    p.add_argument("--output", "-o", default="flux2.png", help="output PNG (batch items get _1, _2... suffixes)")


def _open_references(paths: list[str]):
    images = [open_image(path, f"--reference '{path}'") for path in paths]
    return images or None


def output_paths(output: str, count: int) -> list[Path]:
    out = Path(output)
    if not out.parent.is_dir():
        raise InputError(f"--output '{output}': the folder '{out.parent}' does not exist.")
    return [out] if count == 1 else [out.with_name(f"{out.stem}_{i + 1}{out.suffix}") for i in range(count)]


def run(args) -> int:
    from . import engine
    from .latents import to_pil
    from .sampling import SamplingParams
    from .store import ModelStore

    t0 = time.perf_counter()
    device = cli_args.device(args)
    width, height = cli_args.size(args)
    params = SamplingParams(width=width, height=height, steps=args.steps or (4 if args.demo else 28),
                            guidance=args.guidance, seed=args.seed, batch_size=args.batch_size)
    params.validate()
    paths = output_paths(args.output, params.batch_size)
    refs = _open_references(args.reference)
    store = ModelStore()
    model, vae, text_encoder = cli_args.components(args, store)
    encoder = store.text_encoder(text_encoder)
    encoder.model.to(device)
    loaded = time.perf_counter()
    conditioning = encoder.encode(args.prompt)
    result = engine.run(model, vae, conditioning, params, store=store, reference_images=refs, device=device)
    for img, path in zip(to_pil(result.image), paths):
        try:
            img.save(path)
        except (OSError, ValueError) as e:
            raise InputError(f"--output '{path}' could not be written ({e}).") from None
    done = time.perf_counter()
    print(f"wrote {', '.join(map(str, paths))} ({params.width}x{params.height}, {params.steps} steps, seed "
          f"{params.seed}); load {loaded - t0:.1f}s, sample+decode {done - loaded:.1f}s")
    if args.demo:
        print("note: --demo uses tiny RANDOM weights, so the image is noise. It checks that the whole path runs; "
              "give --transformer/--text-encoder/--vae for a real image.")
    return 0
