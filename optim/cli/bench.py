"""`flux2-accel bench`'s runner (its arguments are `args.add_bench_arguments`, torch-free): the options from
the arguments, the run, the table, the JSON and the chart."""

from __future__ import annotations

import sys

from ..bench.rows import ERROR
from ..bench.runner import BenchOptions, run_bench
from ..devices import default_device
from ..errors import InputError
from .args import require_writable


def device(args) -> str:
    return args.device or default_device()


def options_from_args(args) -> BenchOptions:
    rows = tuple(r.strip() for r in args.rows.split(",") if r.strip())
    return BenchOptions(config=args.config, height=args.height, width=args.width, steps=args.steps,
                        repeats=args.repeats, warmup=args.warmup, rows=rows,
                        device=device(args),
                        text_tokens=args.text_tokens, seed=args.seed,
                        interleave={"auto": None, "on": True, "off": False}[args.interleave],
                        attention_backend=args.attention_backend, compile_backend=args.compile_backend,
                        warmup_steps=args.warmup_steps)


def run(args) -> int:
    from ..bench.report import document, format_table, plot, write_json

    # before the minutes of benchmarking, not after
    require_writable("--json", args.json)
    require_writable("--plot", args.plot, image=True)
    if args.preset == "device-check":
        from ..bench.device_check import run_device_check

        if not args.out:
            raise InputError("--preset device-check needs --out DIR, the folder its files go to.")
        return run_device_check(args.out, sizes=args.sizes, device=device(args), compile_backend=args.compile_backend)
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
