"""`flux2-accel` command line: the pack's engine without ComfyUI.

Subcommands are listed in COMMANDS (name -> module); each module has `add_arguments(parser)` and `run(args) -> int`
(arguments several subcommands share are defined once, in cli_args.py). A user error (any pack error, see
optim/errors.py) prints one line, `error: ...`, and exits with status 2, as argparse does for bad arguments.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .errors import Flux2AccelError

COMMANDS = {
    "generate": ("generate", "text-to-image (or edit) with given model files, or --demo with tiny random weights"),
    "serve-text-encoder": ("remote.server", "serve a local text encoder over HTTP for Remote Text Encode nodes"),
    "calibrate-teacache": ("caching.calibrate", "fit TeaCache coefficients for a FLUX.2 model from real runs"),
    "bench": ("bench", "benchmark the pack's rows against bare diffusers on random weights (time, memory, fidelity)"),
    "queue": ("queue_client", "queue an API-format workflow on a running ComfyUI, show progress, save its images"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flux2-accel", description="Fast and light FLUX.2, without ComfyUI.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(f".{module}", __package__).add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    module = importlib.import_module(f".{args._module}", __package__)
    try:
        return int(module.run(args) or 0)
    except Flux2AccelError as e:
        print(f"error: {one_line(str(e))}", file=sys.stderr)
        return 2


def one_line(message: str) -> str:
    return " ".join(message.split())


if __name__ == "__main__":
    sys.exit(main())
