"""`flux2-accel generate`: images from model files, or from tiny random weights with --demo, with every feature the
nodes offer. Its arguments (cli_args.add_generate_arguments) were checked before this module, which loads torch and
diffusers, is imported.

The handles are built as the nodes build them: the loader's ModelHandle, then `with_loras` (LoRA Stack),
`with_step_cache(cache_settings(...))` (Step Cache), `compile_settings(...)` (Torch Compile), `--gpus` (Parallel); the run is the
sampler node's (`parallel.group.run`: `engine.run`, or the actor group for --gpus 2+), and the statistics printed are the lines the sampler node shows (`RunResult.stats_lines`).
"""

from __future__ import annotations

import time
from pathlib import Path

from ..errors import InputError
from ..features.caching import DEFAULT_THRESHOLDS, CacheSettings, cache_settings
from ..features.compile_settings import compile_settings
from ..features.lora import LoraSpec
from ..images import open_image
from ..parallel import group
from ..run import engine
from ..run.latents import to_pil
from ..run.sampling import SamplingParams
from ..run.store import ModelStore
from . import args as cli_args
from . import models as cli_models


def open_references(paths: list[str]):
    """The --reference images as RGB, each decoded only after its size is known to be bounded (optim/images.py)."""
    images = [open_image(path, f"--reference '{path}'") for path in paths]
    return images or None


def output_paths(output: str, count: int) -> list[Path]:
    out = Path(output)
    return [out] if count == 1 else [out.with_name(f"{out.stem}_{i + 1}{out.suffix}") for i in range(count)]


def with_features(model, args):
    """The model handle with the feature nodes' settings the flags ask for, built by the nodes' own functions."""
    model = model.with_loras(LoraSpec(str(Path(path).resolve()), strength) for path, strength in args.lora)
    if args.cache_method:
        d = CacheSettings()
        pick = lambda value, default: default if value is None else value  # noqa: E731
        model = model.with_step_cache(cache_settings(
            args.cache_method, pick(args.cache_threshold, DEFAULT_THRESHOLDS[args.cache_method]),
            pick(args.cache_start_percent, d.start_percent), pick(args.cache_end_percent, d.end_percent),
            pick(args.cache_max_consecutive_cached, d.max_consecutive_cached),
            pick(args.cache_warmup_steps, d.warmup_steps), pick(args.teacache_coefficients, ""),
            pick(args.cache_min_steps, d.min_steps)))
    if args.compile:
        model = model.replace(compile=compile_settings(args.compile_scope, args.compile_mode, args.compile_dynamic,
                                                       args.compile_fullgraph, args.compile_backend,
                                                       args.compile_vae_decoder))
    return model.replace(parallel=cli_args.parallel_settings(args))


def run(args) -> int:
    t0 = time.perf_counter()
    device = cli_models.device(args)
    width, height = cli_args.size(args)
    params = SamplingParams(width=width, height=height, steps=args.steps or (4 if args.demo else 28),
                            guidance=args.guidance, seed=args.seed, batch_size=args.batch_size)
    params.validate()
    paths = output_paths(args.output, params.batch_size)
    refs = open_references(args.reference)
    store = ModelStore()
    model, vae, text_encoder = cli_models.components(args, store)
    model = with_features(model, args)
    encoder = store.text_encoder(text_encoder)
    encoder.model.to(device)
    loaded = time.perf_counter()
    conditioning = encoder.encode(args.prompt)
    negative = encoder.encode(args.negative_prompt) if args.negative_prompt is not None else None
    result = group.run(model, vae, conditioning, params, store=store, reference_images=refs, negative=negative,
                       device=device)
    for img, path in zip(to_pil(result.image), paths):
        try:
            img.save(path)
        except (OSError, ValueError) as e:
            raise InputError(f"--output '{path}' could not be written ({e}).") from None
    done = time.perf_counter()
    print(f"wrote {', '.join(map(str, paths))} ({params.width}x{params.height}, {params.steps} steps, seed "
          f"{params.seed}); load {loaded - t0:.1f}s, sample+decode {done - loaded:.1f}s")
    print(f"text encoder: precision={engine.precision_of(encoder.model)}")
    for line in result.stats_lines():
        print(line)
    if args.demo:
        print("note: --demo uses tiny RANDOM weights, so the image is noise. It checks that the whole path runs; "
              "give --transformer/--text-encoder/--vae for a real image.")
    return 0
