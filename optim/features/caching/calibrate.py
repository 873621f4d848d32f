"""TeaCache calibration, the feature's half: record what TeaCache sees and what skipping costs, and fit its
rescaling polynomial (the command line's half, `flux2-accel calibrate-teacache`, is optim/cli/calibrate.py).

During ordinary runs, every transformer call records two numbers against the previous call of the same CFG branch:
x = relative L1 change of the first block's modulated input (what TeaCache sees), and y = relative L1 change of the
model output (what skipping costs). numpy.polyfit(x, y, degree) then gives the coefficients, highest power first,
that the cache node takes in its teacache_coefficients widget.
"""

from __future__ import annotations

import contextlib

import numpy as np

from ...errors import InputError
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
