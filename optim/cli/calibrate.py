"""`flux2-accel calibrate-teacache`: fit TeaCache's rescaling polynomial for a FLUX.2 model (or model + LoRA) from
real runs of the engine (the recording and the fit are the feature's, optim/features/caching/calibrate.py)."""

from __future__ import annotations

import json
from pathlib import Path

from ..features.caching.calibrate import fit_coefficients, recording
from ..models.arch import family_of
from ..run import engine
from ..run.sampling import SamplingParams
from ..run.store import ModelStore
from . import args as cli_args
from . import models as cli_models

DEFAULT_PROMPTS = ("a red dog in a green house", "portrait of an old man, photo", "a city street at night")


def run(args) -> int:
    device = cli_models.device(args)
    store = ModelStore()
    model, vae, text_encoder = cli_models.components(args, store)
    encoder = store.text_encoder(text_encoder)
    encoder.model.to(device)
    width, height = cli_args.size(args)
    steps = args.steps or (8 if args.demo else 28)
    samples: list = []
    prompts = args.prompt or list(DEFAULT_PROMPTS)
    for prompt in prompts:
        conditioning = encoder.encode(prompt)
        for seed in range(args.seeds):
            params = SamplingParams(width=width, height=height, steps=steps, guidance=args.guidance, seed=seed)
            # one recording per run: runs are not consecutive steps
            engine.run(model, vae, conditioning, params, store=store, device=device, decode=False,
                       around=(lambda transformer: recording(transformer, samples),))
            print(f"recorded {prompt!r} seed {seed}: {len(samples)} samples")
    x, y = zip(*samples) if samples else ((), ())
    coefficients = fit_coefficients(x, y, args.degree)
    result = {"family": family_of(store.transformer(model)), "degree": args.degree, "steps": steps,
              "samples": len(samples), "coefficients": list(coefficients), "x": list(x), "y": list(y)}
    Path(args.output).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.output}\nteacache_coefficients: {', '.join(f'{c:.8e}' for c in coefficients)}")
    return 0
