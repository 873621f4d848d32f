"""Warnings from libraries that say nothing a user of the pack can act on, dropped before they reach stderr or a log.

bitsandbytes (0.49+) on a CPU with AVX512-BF16 tries, when it is imported, to download an optional nf4 kernel from
the Hugging Face hub through the `kernels` package, and warns when that package is missing. The pack keeps 4-bit
layers in bitsandbytes' portable layout (precision.keep_portable_4bit_layout), which that kernel does not serve, and
fetches no code from the hub; the warning would only tell users to install something the pack does not use.
"""

from __future__ import annotations

import logging

IRRELEVANT = {
    "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward from kernels-community",
}


class DropMessage(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.dropped_prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.dropped_prefix)


def drop_irrelevant_library_warnings() -> None:
    """Filter the IRRELEVANT messages on their loggers (once, even when the pack is imported under two names, as
    ComfyUI's custom-node folder and as flux2_accel; before the library is imported, to catch them)."""
    for logger_name, prefix in IRRELEVANT.items():
        logger = logging.getLogger(logger_name)
        if not any(getattr(f, "dropped_prefix", None) == prefix for f in logger.filters):
            logger.addFilter(DropMessage(prefix))
