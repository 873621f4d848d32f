"""`flux2-accel bench`: the pack against bare diffusers, side by side, in one run.

Builds a random-weight FLUX.2 transformer (and VAE, and seeded random text embeddings) of a chosen size, runs every
row on the same embeddings, seed and size, and reports time, memory and fidelity against the `baseline` row (bare
diffusers). Rows are listed in `rows.ROWS`; the JSON schema is documented in docs/benchmark.md.

    flux2-accel bench                                  # small config on this machine, about 2.5 minutes on 2 cores
    flux2-accel bench --config dev --height 1024 --width 1024 --steps 28 --json dev.json --plot dev.png
"""

from __future__ import annotations

import sys

import torch

from ..attention import BACKENDS as ATTENTION_CHOICES
from ..cli_args import require_writable
from ..errors import InputError
from .models import CONFIGS
from .rows import DEFAULT_ROWS, ERROR, ROW_NAMES
from .runner import (DEFAULT_CONFIG, DEFAULT_REPEATS, DEFAULT_SIZE, DEFAULT_STEPS, DEFAULT_WARMUP, FAIL_ROWS_ENV,
                     SEED, BenchOptions, run_bench, speedup)

__all__ = ["BenchOptions", "FAIL_ROWS_ENV", "add_arguments", "options_from_args", "run", "run_bench", "speedup"]


def add_arguments(p) -> None:
    p.add_argument("--config", choices=tuple(CONFIGS), default=DEFAULT_CONFIG,
                   help="model size: tiny, small (CPU-sized), or the real klein-4b, klein-9b, dev (for GPUs)")
    p.add_argument("--height", type=int, default=DEFAULT_SIZE)
    p.add_argument("--width", type=int, default=DEFAULT_SIZE)
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    p.add_argument("--repeats", type=int, default=DEFAULT_REPEATS, help="timed runs per row (the median is reported)")
    p.add_argument("--warmup", type=int, default=DEFAULT_WARMUP, help="untimed runs per row before the timed ones")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--rows", default=",".join(DEFAULT_ROWS),
                   help=f"comma-separated rows to run (baseline always runs): {','.join(ROW_NAMES)} (default: all "
                        "but the GPU-only nf4-offload and attn-*)")
    p.add_argument("--text-tokens", type=int, default=None,
                   help="length of the random text embeddings (default 512 for real sizes, 32 otherwise)")
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--interleave", choices=("auto", "on", "off"), default="auto",
                   help="time the rows round-robin (every row's modules resident at once), so load that drifts on "
                        "a shared machine hits all rows alike; auto: on except for the real sizes")
    p.add_argument("--attention-backend", choices=ATTENTION_CHOICES, default="sdpa",
                   help="attention kernel of every pack row (the attn-* rows each measure one); default sdpa, so "
                        "pack-bf16 stays comparable bit for bit with bare diffusers")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend of the compile and all-on rows (aot_eager: no code generation)")
    p.add_argument("--warmup-steps", type=int, default=None,
                   help="steps of each warm-up run (same shapes, so kernels and compiled code are warm); "
                        "default: --steps")
    p.add_argument("--preset", choices=("device-check",),
                   help="device-check: the prepared GPU check, FLUX.2 [dev] and [klein] 4B at 1024x1024 with every "
                        "row that matters, into --out (see scripts/device_check.sh); other options are ignored "
                        "but --sizes, --device and --compile-backend")
    p.add_argument("--out", metavar="DIR", help="--preset: the folder for its JSON, table, charts")
    p.add_argument("--sizes", choices=("real", "tiny"), default="real",
                   help="--preset: real model sizes, or tiny ones (the same path on a CPU in seconds, for tests)")
    p.add_argument("--json", metavar="FILE", help="write the results as JSON (schema: docs/benchmark.md)")
    p.add_argument("--plot", metavar="FILE.png", help="write a chart of speedup against deviation")


def options_from_args(args) -> BenchOptions:
    rows = tuple(r.strip() for r in args.rows.split(",") if r.strip())
    return BenchOptions(config=args.config, height=args.height, width=args.width, steps=args.steps,
                        repeats=args.repeats, warmup=args.warmup, device=args.device, rows=rows,
                        text_tokens=args.text_tokens, seed=args.seed,
                        interleave={"auto": None, "on": True, "off": False}[args.interleave],
                        attention_backend=args.attention_backend, compile_backend=args.compile_backend,
                        warmup_steps=args.warmup_steps)


def run(args) -> int:
    from .report import document, format_table, plot, write_json

    # before the minutes of benchmarking, not after
    require_writable("--json", args.json)
    require_writable("--plot", args.plot, image=True)
    if args.preset == "device-check":
        from .device_check import run_device_check

        if not args.out:
            raise InputError("--preset device-check needs --out DIR, the folder its files go to.")
        return run_device_check(args.out, sizes=args.sizes, device=args.device, compile_backend=args.compile_backend)
    options = options_from_args(args)
    rows, machine = run_bench(options, progress=lambda text: print(text, file=sys.stderr, flush=True))
    title = (f"{options.config} {options.width}x{options.height}, {options.steps} steps, {machine['cpu'] if 'gpu' not in machine else machine['gpu']}")
    print(f"flux2-accel bench: {title}; {machine['torch_threads']} torch threads, torch {machine['torch']}, "
          f"diffusers {machine['diffusers']}")
    print(format_table(rows))
    if args.json:
        write_json(args.json, document(rows, machine, {**options.__dict__, "rows": list(options.rows),
                                                       "text_tokens": options.tokens,
                                                       "interleave": options.interleaved}))
        print(f"wrote {args.json}")
    if args.plot:
        plot(args.plot, rows, title)
        print(f"wrote {args.plot}")
    return 0 if all(r.status != ERROR for r in rows) else 1
