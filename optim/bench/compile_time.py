"""Cold and warm compile time, as a user sees them: fresh processes sharing one compile-cache folder.

The first process starts from an empty folder (cold: dynamo traces, inductor generates and builds code); a second
finds what the first left there, the FX graph cache and the mega-cache (warm: what a second ComfyUI start pays).
Each process builds the bench's random-weight transformer of a `--config`, compiles it through the compile feature
and runs one forward; the feature reports the seconds spent in calls that compiled.

    python -m flux2_accel.optim.bench.compile_time --config small --height 128 --width 128
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

from ..features.api import RunReport
from ..features.compile import MODES, SCOPES, CompileSettings, activate
from ..handle import ModelHandle
from ..models.tiny import forward_inputs
from .models import CONFIGS, BenchModel


def compile_once(config: str = "small", height: int = 128, width: int = 128, device: str = "cpu",
                 scope: str = "regional", mode: str = "default", text_tokens: int = 32) -> dict:
    """Compile the bench's `config` transformer in this process and run one forward; the compile feature's stats."""
    model = BenchModel(config, CONFIGS[config], torch.device(device)).transformer()
    settings = CompileSettings(scope=scope, mode=mode)
    handle = ModelHandle(source=f"<bench {config}>", compile=settings)
    report = RunReport()
    inputs = forward_inputs(model, height, width, text_tokens=text_tokens)
    with torch.no_grad(), activate(None, model, handle, report):
        model(**inputs)
    return report.stats["compile"]


def fresh_process_compile(config: str = "small", height: int = 128, width: int = 128, device: str = "cpu",
                          scope: str = "regional", mode: str = "default", text_tokens: int = 32,
                          cache_dir: str = "", timeout: float = 1800) -> dict:
    """`compile_once` in a new Python process whose compile caches live in `cache_dir`; its stats plus the
    process's wall time (`process_s`)."""
    from ..features.compile import CACHE_ENV

    env = dict(os.environ, **{CACHE_ENV: str(cache_dir)})
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    command = [sys.executable, "-m", __name__, "--config", config, "--height", str(height), "--width", str(width),
               "--device", device, "--scope", scope, "--mode", mode, "--text-tokens", str(text_tokens)]
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"compile process failed (exit {done.returncode}): {' / '.join(tail)}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["process_s"] = round(time.perf_counter() - start, 3)
    return result


def cold_and_warm(config: str = "small", height: int = 128, width: int = 128, device: str = "cpu",
                  scope: str = "regional", mode: str = "default", text_tokens: int = 32,
                  cache_dir: str | None = None, timeout: float = 1800) -> dict:
    """Compile seconds of a first and a second fresh process sharing one (initially empty) cache folder."""
    with contextlib.ExitStack() as stack:
        root = cache_dir or stack.enter_context(tempfile.TemporaryDirectory(prefix="flux2-accel-compile-"))
        cold, warm = (fresh_process_compile(config, height, width, device, scope, mode, text_tokens, str(root),
                                            timeout) for _ in range(2))
    return {"cold_s": cold["compile_s"], "warm_s": warm["compile_s"], "cold_process_s": cold["process_s"],
            "warm_process_s": warm["process_s"], "fallback": cold["fallback"] or warm["fallback"]}


def _main(argv=None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Compile the bench's random-weight FLUX.2 transformer once; "
                                                 "print the compile feature's stats as JSON.")
    parser.add_argument("--config", default="small", choices=tuple(CONFIGS))
    parser.add_argument("--height", type=int, default=128)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--scope", default="regional", choices=SCOPES)
    parser.add_argument("--mode", default="default", choices=MODES)
    parser.add_argument("--text-tokens", type=int, default=32)
    args = parser.parse_args(argv)
    print(json.dumps(compile_once(args.config, args.height, args.width, args.device, args.scope, args.mode,
                                  args.text_tokens)))


if __name__ == "__main__":
    _main()
