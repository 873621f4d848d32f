"""`flux2-accel` command line: the pack's engine without ComfyUI.

Each subcommand is a `Command` in COMMANDS: a function that adds its arguments, an optional check of the parsed
arguments, and the module whose `run(args) -> int` does the work. Only the chosen subcommand's arguments are built,
and its runner module is imported only once they are good: the runners load torch and diffusers (seconds), the
argument modules do not, so `--help`, a typo or a refused value answers at once. A user error (any pack error, see
optim/errors.py) prints one line, `error: ...`, and exits with status 2, as argparse does for bad arguments.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass

from ..errors import Flux2AccelError
from . import args as cli_args


@dataclass(frozen=True)
class Command:
    help: str
    arguments: str  # "module:function" adding the arguments to a parser (modules relative to this package)
    runner: str  # module with run(args) -> int
    check: str | None = None  # "module:function" raising InputError for arguments that cannot be honoured


COMMANDS = {
    "generate": Command("text-to-image (or edit) with given model files, or --demo with tiny random weights",
                        ".args:add_generate_arguments", ".generate", ".args:check_generate"),
    "serve-text-encoder": Command("serve a local text encoder over HTTP for Remote Text Encode nodes",
                                  ".args:add_serve_arguments", "..serve.remote.server"),
    "serve": Command("serve the OpenAI-compatible image API on Ray Serve (a TOML config, or --demo)",
                     ".args:add_serve_app_arguments", ".serve", ".args:check_serve_app"),
    "calibrate-teacache": Command("fit TeaCache coefficients for a FLUX.2 model from real runs",
                                  ".args:add_calibrate_arguments", ".calibrate", ".args:check_calibrate"),
    "bench": Command("benchmark the pack's rows against bare diffusers on random weights (time, memory, fidelity)",
                     ".args:add_bench_arguments", ".bench"),
    "queue": Command("queue an API-format workflow on a running ComfyUI, show progress, save its images",
                     "..serve.queue_client:add_arguments", "..serve.queue_client"),
}


def _function(reference: str):
    module, name = reference.split(":")
    return getattr(importlib.import_module(module, __package__), name)


def build_parser(argv: list[str]) -> cli_args.OneLineParser:
    """The parser, with the arguments of the subcommand `argv` names (the first word that is one), if any."""
    parser = cli_args.OneLineParser(prog="flux2-accel", description="Fast and light FLUX.2, without ComfyUI.")
    sub = parser.add_subparsers(dest="command", required=True)
    chosen = next((word for word in argv if word in COMMANDS), None)
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.help, description=command.help)
        if name == chosen:
            _function(command.arguments)(p)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv).parse_args(argv)
    command = COMMANDS[args.command]
    try:
        if command.check:
            _function(command.check)(args)
        module = importlib.import_module(command.runner, __package__)
        return int(module.run(args) or 0)
    except Flux2AccelError as e:
        print(f"error: {one_line(str(e))}", file=sys.stderr)
        return 2


def one_line(message: str) -> str:
    return " ".join(message.split())


if __name__ == "__main__":
    sys.exit(main())
