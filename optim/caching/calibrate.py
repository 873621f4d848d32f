"""`flux2-accel calibrate-teacache`: fit TeaCache's rescaling polynomial for a FLUX.2 model (or model + LoRA).

During ordinary runs, every transformer call records two numbers against the previous call of the same CFG branch:
x = relative L1 change of the first block's modulated input (what TeaCache sees), and y = relative L1 change of the
model output (what skipping costs). numpy.polyfit(x, y, degree) then gives the coefficients, highest power first,
that the cache node takes in its teacache_coefficients widget.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np

from ..errors import InputError
from .decision import Branch, CacheRun, SkipGate
from .teacache import modulated_input, relative_l1
from .transformer_hook import step_cache_installed


def fit_coefficients(x, y, degree: int = 4) -> tuple[float, ...]:
    """Least-squares polynomial y ~ P(x), highest power first (numpy.poly1d order)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise InputError(f"calibration needs paired 1-D samples; got shapes {x.shape} and {y.shape}.")
    if len(x) <= degree:
        raise InputError(f"{len(x)} samples cannot fit a degree-{degree} polynomial: run more steps, prompts or "
                         "seeds.")
    return tuple(float(c) for c in np.polyfit(x, y, degree))


class Recording:
    method = "recording"  # nothing is skipped: every call is computed and measured


@contextlib.contextmanager
def recording(transformer, samples: list):
    """Append (input change, output change) for every transformer call after a branch's first."""
    run = CacheRun(Recording(), SkipGate(), total_steps=None, new_state=dict)
    captured: dict = {}

    def capture(block, args, kwargs):
        if "x" not in captured:
            captured["x"] = modulated_input(block, kwargs["hidden_states"], kwargs["temb_mod_img"]).float()

    def call(original_forward, branch: Branch, args, kwargs):
        captured.clear()
        output = original_forward(*args, **kwargs)
        y = (output[0] if isinstance(output, tuple) else output.sample).float()
        x = captured.pop("x")
        previous = branch.state.get("previous")
        if previous is not None and previous[0].shape == x.shape:
            samples.append((relative_l1(x, previous[0]), relative_l1(y, previous[1])))
        branch.state["previous"] = (x, y)
        return output, False

    hook = transformer.transformer_blocks[0].register_forward_pre_hook(capture, with_kwargs=True)
    try:
        with step_cache_installed(transformer, run, call):
            yield
    finally:
        hook.remove()


DEFAULT_PROMPTS = ("a red dog in a green house", "portrait of an old man, photo", "a city street at night")


def run(args) -> int:
    from .. import cli_args, cli_models, engine
    from ..sampling import SamplingParams, family_of
    from ..store import ModelStore

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
