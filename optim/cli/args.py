"""The command line's arguments, checked before any work: torch-free, so `--help` and every argument error answer
at once (each subcommand's runner, which loads torch and diffusers, is imported only once its arguments are good).

Flags are named after the nodes' widgets (widget `threshold` of the Step Cache node -> `--cache-threshold`), choices
and limits come from the same definitions the widgets use (optim/options.py, optim/caching, optim/compile_settings).
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

from ..bench import settings as bench
from ..errors import InputError
from ..features.caching import DEFAULT_THRESHOLDS, METHODS, CacheSettings
from ..features.compile_settings import DYNAMIC, MODES, SCOPES, CompileSettings
from ..features.parallel_settings import ParallelSettings
from ..options import (ATTENTION_BACKENDS, DEFAULT_ATTENTION_BACKEND, MAX_BATCH_SIZE, MAX_GUIDANCE, MAX_RESOLUTION,
                       MAX_SEED, MAX_STEPS, OFFLOAD_MODES, REMOTE_BODY_TIMEOUT_S, REMOTE_REPLY_FORMATS,
                       REMOTE_TOKEN_ENV, SIZE_MULTIPLE,
                       MAX_PARALLEL_GPUS, PARALLEL_MODES, TEXT_ENCODER_PRECISIONS, TRANSFORMER_PRECISIONS)

DEMO_SIZE = 64
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
MAX_PORT = 65535
MODEL_FLAGS = ("transformer", "text_encoder", "vae", "tokenizer")


class OneLineParser(argparse.ArgumentParser):
    """argparse's parser, whose argument errors are one line on stderr (exit status 2), as the pack's errors are."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# ---------------------------------------------------------------- value types (argparse `type=`)

def int_between(low: int, high: int, multiple: int = 1):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
        if not low <= value <= high or value % multiple:
            extra = f" and a multiple of {multiple}" if multiple > 1 else ""
            raise argparse.ArgumentTypeError(f"{value} is out of range: it must be between {low} and {high}{extra}")
        return value

    parse.__name__ = "int"  # argparse names the type in its "invalid value" message
    return parse


def float_between(low: float, high: float):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
        if not math.isfinite(value) or not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{text} is out of range: it must be between {low:g} and {high:g}")
        return value

    parse.__name__ = "float"
    return parse


def lora_argument(text: str) -> tuple[str, float]:
    """FILE or FILE:STRENGTH (strength 1 when left out; a drive letter's colon is not taken for a strength)."""
    path, sep, strength = text.rpartition(":")
    if sep:
        try:
            return path, float(strength)
        except ValueError:
            pass
    return text, 1.0


# ---------------------------------------------------------------- shared groups

def add_model_arguments(p, transformer_help: str = "diffusion model: .safetensors file or diffusers folder",
                        demo_help: str = "build tiny random-weight components and run the whole path (the image is "
                                         "noise); refuses model files") -> None:
    g = p.add_argument_group("models (the loader nodes)")
    g.add_argument("--demo", action="store_true", help=demo_help)
    g.add_argument("--transformer", help=transformer_help)
    g.add_argument("--text-encoder", help="text encoder: .safetensors file or diffusers folder")
    g.add_argument("--vae", help="VAE: .safetensors file or diffusers folder")
    g.add_argument("--tokenizer", help="tokenizer folder, for single-file text encoders without one embedded")
    return g


def add_size_arguments(p) -> None:
    size = int_between(SIZE_MULTIPLE, MAX_RESOLUTION, SIZE_MULTIPLE)
    p.add_argument("--width", type=size, default=None, help=f"default 1024 ({DEMO_SIZE} with --demo)")
    p.add_argument("--height", type=size, default=None, help=f"default 1024 ({DEMO_SIZE} with --demo)")
    p.add_argument("--guidance", type=float_between(0.0, MAX_GUIDANCE), default=4.0,
                   help="[dev]: embedded guidance; [klein] base: CFG scale with --negative-prompt (default 4.0)")


def add_device_argument(p) -> None:
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")


def add_output_argument(p, default: str, help_text: str) -> None:
    p.add_argument("--output", "-o", default=default, help=help_text)


# ---------------------------------------------------------------- generate

def add_generate_arguments(p) -> None:
    g = add_model_arguments(p)
    g.add_argument("--precision", choices=TRANSFORMER_PRECISIONS, default=TRANSFORMER_PRECISIONS[0],
                   help="transformer weight precision (Load Diffusion Model: precision; default %(default)s)")
    g.add_argument("--text-encoder-precision", choices=TEXT_ENCODER_PRECISIONS, default=TEXT_ENCODER_PRECISIONS[0],
                   help="text encoder weight precision (Load Text Encoder: precision; default %(default)s)")
    g.add_argument("--offload", choices=OFFLOAD_MODES, default=OFFLOAD_MODES[0],
                   help="keep weights in CPU memory between uses (default %(default)s)")
    g.add_argument("--attention-backend", choices=ATTENTION_BACKENDS, default=DEFAULT_ATTENTION_BACKEND,
                   help="attention kernel (default %(default)s: the fastest exact one here)")

    s = p.add_argument_group("sampling (the Sampler node)")
    s.add_argument("--prompt", default="a red dog in a green house")
    s.add_argument("--negative-prompt", default=None,
                   help="[klein] base models: the negative prompt, enables CFG at --guidance > 1")
    s.add_argument("--reference", action="append", default=[], metavar="IMAGE",
                   help="reference image for editing (repeatable; at least 64 px a side)")
    add_size_arguments(s)
    s.add_argument("--steps", type=int_between(1, MAX_STEPS), default=None, help="default 28 (4 with --demo)")
    s.add_argument("--seed", type=int_between(0, MAX_SEED), default=0)
    s.add_argument("--batch-size", type=int_between(1, MAX_BATCH_SIZE), default=1)
    add_device_argument(s)

    d = CacheSettings()
    c = p.add_argument_group("step cache (the Step Cache node; off unless --cache-method is given)")
    c.add_argument("--cache-method", choices=METHODS, default=None, help="switches the step cache on")
    c.add_argument("--cache-threshold", type=float_between(0.0, 5.0), default=None,
                   help="0 = off; higher skips more (default: the method's, "
                        + ", ".join(f"{m} {v:g}" for m, v in DEFAULT_THRESHOLDS.items()) + ")")
    c.add_argument("--cache-start-percent", type=float_between(0.0, 1.0), default=None,
                   help=f"no skip before this fraction of the steps (default {d.start_percent:g})")
    c.add_argument("--cache-end-percent", type=float_between(0.0, 1.0), default=None,
                   help=f"no skip from this fraction of the steps (default {d.end_percent:g})")
    c.add_argument("--cache-max-consecutive-cached", type=int_between(0, 100), default=None,
                   help=f"most skipped steps in a row, 0 = no limit (default {d.max_consecutive_cached})")
    c.add_argument("--cache-warmup-steps", type=int_between(0, 100), default=None,
                   help=f"first steps always computed (default {d.warmup_steps})")
    c.add_argument("--cache-min-steps", type=int_between(0, MAX_STEPS), default=None,
                   help=f"runs with fewer steps never skip, 0 = cache any run (default {d.min_steps})")
    c.add_argument("--teacache-coefficients", default=None, metavar="C4,C3,C2,C1,C0",
                   help="teacache: rescaling polynomial from `flux2-accel calibrate-teacache` (default: built in)")

    k = CompileSettings()
    t = p.add_argument_group("compile (the Torch Compile node; off unless --compile is given)")
    t.add_argument("--compile", action="store_true", help="run the transformer through torch.compile")
    t.add_argument("--compile-scope", choices=SCOPES, default=k.scope, help="default %(default)s")
    t.add_argument("--compile-mode", choices=MODES, default=k.mode, help="inductor mode (default %(default)s)")
    t.add_argument("--compile-dynamic", choices=DYNAMIC, default=k.dynamic, help="default %(default)s")
    t.add_argument("--compile-fullgraph", action="store_true", help="require one graph per compiled region")
    t.add_argument("--compile-backend", default=k.backend,
                   help="torch.compile backend: inductor, aot_eager or eager (default %(default)s)")
    t.add_argument("--compile-vae-decoder", action="store_true", help="also compile the VAE decoder")

    lo = p.add_argument_group("LoRA (the LoRA Stack node)")
    lo.add_argument("--lora", action="append", default=[], type=lora_argument, metavar="FILE[:STRENGTH]",
                    help="LoRA .safetensors file and strength (default 1), applied in order (repeatable)")

    pa = p.add_argument_group("several GPUs (the Parallel node; needs Ray: pip install \"ray>=2.50\")")
    pa.add_argument("--gpus", type=int_between(1, MAX_PARALLEL_GPUS), default=1,
                    help="GPUs (Ray actors) that share each image (default 1: no Ray)")
    pa.add_argument("--parallel", choices=PARALLEL_MODES, default=None,
                    help=f"how to split it over --gpus (default {ParallelSettings().mode})")

    o = p.add_argument_group("output")
    add_output_argument(o, "flux2.png", "output image, .png/.jpg/.webp (batch items get _1, _2... suffixes)")


CACHE_DETAIL_FLAGS = ("cache_threshold", "cache_start_percent", "cache_end_percent", "cache_max_consecutive_cached",
                      "cache_warmup_steps", "cache_min_steps", "teacache_coefficients")
COMPILE_DETAIL_FLAGS = ("compile_fullgraph", "compile_vae_decoder")


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_generate(args) -> None:
    """What the arguments ask that cannot be honoured, all of it in one error, before anything is loaded."""
    problems = model_problems(args)
    problems += [f"--lora '{path}' does not exist" for path, _ in args.lora if not Path(path).is_file()]
    problems += [f"--reference '{path}' does not exist" for path in args.reference if not Path(path).is_file()]
    if args.cache_method is None:
        problems += [f"{flag(n)} needs --cache-method" for n in CACHE_DETAIL_FLAGS if getattr(args, n) is not None]
    if not args.compile:
        problems += [f"{flag(n)} needs --compile" for n in COMPILE_DETAIL_FLAGS if getattr(args, n)]
    problems += parallel_problems(args)
    problem = output_problem("--output", args.output, image=True)
    if problem:
        problems.append(problem)
    if problems:
        raise InputError("; ".join(problems) + ".")


def parallel_problems(args) -> list[str]:
    if args.gpus == 1:
        return ["--parallel needs --gpus 2 or more"] if args.parallel is not None else []
    problems = []
    if args.demo:  # the ranks load the model from files: random weights built in this process do not reach them
        problems.append("--gpus needs model files (--transformer, --text-encoder, --vae): --demo's random weights "
                        "live in this process only")
    if args.device is not None:
        problems.append("--device does not combine with --gpus: every rank runs on a GPU of its own (or a CPU)")
    if args.offload != OFFLOAD_MODES[0]:
        problems.append(f"--offload {args.offload} does not combine with --gpus: every rank holds the whole model")
    return problems


def parallel_settings(args) -> ParallelSettings | None:
    """The Parallel node's settings the flags ask for, or None for one device."""
    if args.gpus == 1:
        return None
    return ParallelSettings(args.gpus, args.parallel or ParallelSettings().mode)


def model_problems(args) -> list[str]:
    given = [n for n in MODEL_FLAGS if getattr(args, n)]
    if args.demo:
        return ["--demo builds its own random-weight models: drop " + ", ".join(flag(n) for n in given)] if given \
            else []
    absent = [flag(n) for n in ("transformer", "text_encoder", "vae") if not getattr(args, n)]
    problems = ["give " + ", ".join(absent) + " (or use --demo)"] if absent else []
    problems += [f"{flag(n)} '{getattr(args, n)}' does not exist" for n in given
                 if not Path(getattr(args, n)).exists()]
    return problems


def output_problem(flag_name: str, path: str, image: bool = False) -> str | None:
    """Why `path` cannot be written as the output file of `flag_name` (None: it can)."""
    out = Path(path)
    if out.is_dir():
        example = out / ("flux2.png" if image else "result.json")
        return f"{flag_name} '{path}' is a folder: give a file name in it, e.g. '{example}'"
    if image and out.suffix.lower() not in IMAGE_SUFFIXES:
        return f"{flag_name} '{path}' needs an image extension ({', '.join(IMAGE_SUFFIXES)})"
    folder = out.parent
    if not folder.is_dir():
        return f"{flag_name} '{path}': the folder '{folder}' does not exist"
    if not os.access(folder, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
        return f"{flag_name} '{path}' cannot be written (no write permission)"
    return None


def require_writable(flag_name: str, path: str | None, image: bool = False) -> None:
    problem = path and output_problem(flag_name, path, image)
    if problem:
        raise InputError(problem + ".")


def size(args) -> tuple[int, int]:
    default = DEMO_SIZE if args.demo else 1024
    return args.width or default, args.height or default


# ---------------------------------------------------------------- calibrate-teacache

def add_calibrate_arguments(p) -> None:
    add_model_arguments(p, transformer_help="diffusion model: .safetensors file or diffusers folder (LoRA fused in)",
                        demo_help="tiny random weights: checks the command, fits nothing useful")
    p.add_argument("--prompt", action="append", default=[], help="prompt to run (repeatable; several recommended)")
    p.add_argument("--seeds", type=int_between(1, 1000), default=2, help="seeds per prompt (0, 1, ...)")
    add_size_arguments(p)
    p.add_argument("--steps", type=int_between(1, MAX_STEPS), default=None,
                   help="default 28 (8 with --demo); calibrate at the steps you use")
    p.add_argument("--degree", type=int_between(1, 8), default=4, help="polynomial degree (TeaCache uses 4)")
    add_device_argument(p)
    add_output_argument(p, "teacache_coefficients.json", "JSON file for the result")


def check_calibrate(args) -> None:
    problems = model_problems(args)
    problem = output_problem("--output", args.output)
    if problem:
        problems.append(problem)
    if problems:
        raise InputError("; ".join(problems) + ".")


# ---------------------------------------------------------------- serve-text-encoder

def port_number(text: str) -> int:
    return int_between(1, MAX_PORT)(text)


port_number.__name__ = "port"


def add_serve_arguments(p) -> None:
    p.add_argument("--text-encoder", required=True, help="text encoder: .safetensors file or diffusers folder")
    p.add_argument("--tokenizer", help="tokenizer folder, for single-file text encoders without one embedded")
    p.add_argument("--precision", default=TEXT_ENCODER_PRECISIONS[0], choices=TEXT_ENCODER_PRECISIONS,
                   help="default %(default)s")
    add_device_argument(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for every interface; "
                                                       "default %(default)s)")
    p.add_argument("--port", type=port_number, default=8199, help="1-65535 (default %(default)s)")
    p.add_argument("--token-env", default=REMOTE_TOKEN_ENV,
                   help="environment variable holding the token clients must send (default %(default)s)")
    p.add_argument("--no-auth", action="store_true", help="serve without a token (only on a trusted network)")
    p.add_argument("--batch-window-ms", type=float, default=5.0,
                   help="how long to collect requests into one batch (default %(default)s)")
    p.add_argument("--max-batch", type=int, default=16, help="most prompts encoded in one batch (default %(default)s)")
    p.add_argument("--body-timeout", type=float, default=REMOTE_BODY_TIMEOUT_S,
                   help="seconds a client has to send its whole request body before it gets 408 and is dropped "
                        "(default %(default)g)")
    p.add_argument("--default-format", choices=REMOTE_REPLY_FORMATS, default=REMOTE_REPLY_FORMATS[0],
                   help="reply format for clients whose Accept header names none (torch suits diffusers' client; "
                        "default %(default)s)")


# ---------------------------------------------------------------- serve (Ray Serve app)

def add_serve_app_arguments(p) -> None:
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", metavar="FILE.toml", help="the models to serve and how (docs/serving.md)")
    source.add_argument("--demo", action="store_true",
                        help="serve the tiny random-weight model flux2-demo on this machine's CPU")
    p.add_argument("--host", default=None, help="address to bind (default: the config's, else 127.0.0.1)")
    p.add_argument("--port", type=port_number, default=None, help="default: the config's, else 8000")
    p.add_argument("--allow-open", action="store_true",
                   help="allow binding beyond loopback with no API key set (only on a trusted network)")
    p.add_argument("--address", default=None,
                   help="deploy onto the Ray cluster at this address (default: $RAY_ADDRESS, else a local Ray)")
    p.add_argument("--replicas", type=int_between(1, 64), default=1, help="--demo: Generator replicas (default 1)")
    p.add_argument("--num-cpus", type=int_between(1, 1024), default=None,
                   help="CPUs a local Ray may schedule (default: this machine's)")


def check_serve_app(args) -> None:
    """Read and check the configuration before Ray starts (a bad one is refused naming the key)."""
    from ..serve.ray_serve import config as serve_config  # noqa: PLC0415  (loads torch: after --help)
    from ..serve.ray_serve import install as serve_install  # noqa: PLC0415  (beside it)

    config = (serve_config.demo_config(args.replicas) if args.demo else serve_config.load_config(args.config))
    config = config.with_server(host=args.host, port=args.port, allow_open=args.allow_open or None)
    config.check_security()
    serve_install.require_serve_installed()
    args.serve_config = config


# ---------------------------------------------------------------- bench

def add_bench_arguments(p) -> None:
    p.add_argument("--config", choices=bench.CONFIG_NAMES, default=bench.DEFAULT_CONFIG,
                   help="model size: tiny, small (CPU-sized), or the real klein-4b, klein-9b, dev (for GPUs; "
                        "default %(default)s)")
    p.add_argument("--height", type=int, default=bench.DEFAULT_SIZE, help="default %(default)s")
    p.add_argument("--width", type=int, default=bench.DEFAULT_SIZE, help="default %(default)s")
    p.add_argument("--steps", type=int, default=bench.DEFAULT_STEPS, help="default %(default)s")
    p.add_argument("--repeats", type=int, default=bench.DEFAULT_REPEATS,
                   help="timed runs (rounds) per row; the median is reported, with the spread of the per-round "
                        "speedups; fewer than 3 give no speedup (default %(default)s)")
    p.add_argument("--warmup", type=int, default=bench.DEFAULT_WARMUP,
                   help="untimed runs per row before the timed ones (default %(default)s)")
    add_device_argument(p)
    p.add_argument("--rows", default=",".join(bench.DEFAULT_ROWS),
                   help=f"comma-separated rows to run (baseline always runs): {','.join(bench.ROW_NAMES)} (default: "
                        "all but the GPU-only " + ", ".join(bench.GPU_ONLY_ROWS) + ")")
    p.add_argument("--text-tokens", type=int, default=None,
                   help="length of the random text embeddings (default 512 for real sizes, 32 otherwise)")
    p.add_argument("--seed", type=int, default=bench.SEED, help="default %(default)s")
    p.add_argument("--interleave", choices=("auto", "on", "off"), default="auto",
                   help="time the rows round-robin (every row's modules resident at once), so load that drifts on "
                        "a shared machine hits all rows alike; auto: on except for the real sizes (default "
                        "%(default)s)")
    p.add_argument("--attention-backend", choices=ATTENTION_BACKENDS, default="sdpa",
                   help="attention kernel of every pack row (the attn-* rows each measure one); default %(default)s, "
                        "so pack-bf16 stays comparable bit for bit with bare diffusers")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend of the compile and all-on rows (aot_eager: no code generation; "
                        "default %(default)s)")
    p.add_argument("--warmup-steps", type=int, default=None,
                   help="steps of each warm-up run (same shapes, so kernels and compiled code are warm); "
                        "default: --steps")
    p.add_argument("--preset", choices=("device-check",),
                   help="device-check: the prepared GPU check, FLUX.2 [dev] and [klein] 4B at 1024x1024 with every "
                        "row that matters, into --out (see scripts/device_check.sh); other options are ignored "
                        "but --sizes, --device and --compile-backend (default: none)")
    p.add_argument("--out", metavar="DIR", help="--preset: the folder for its JSON, table, charts")
    p.add_argument("--sizes", choices=("real", "tiny"), default="real",
                   help="--preset: real model sizes, or tiny ones (the same path on a CPU in seconds, for tests; "
                        "default %(default)s)")
    p.add_argument("--json", metavar="FILE", help="write the results as JSON (schema: docs/benchmark.md)")
    p.add_argument("--plot", metavar="FILE.png", help="write a chart of speedup against deviation")
