"""Library warnings a pack user cannot act on are dropped; everything else from those loggers still shows."""

from __future__ import annotations

import logging

import flux2_accel.optim  # noqa: F401  (installs the filters)
from flux2_accel.optim.library_warnings import drop_irrelevant_library_warnings


def test_bitsandbytes_optional_kernel_warning_is_dropped_and_others_pass(caplog):
    drop_irrelevant_library_warnings()  # twice is the same as once
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    assert len(logger.filters) == 1
    with caplog.at_level(logging.WARNING):
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you "
                       "already `pip install kernels`", "No module named 'kernels'")
        logger.warning("some other bitsandbytes problem")
        logging.getLogger("bitsandbytes.other").warning("Failed to load CPU gemm_4bit_forward from elsewhere")
    assert [r.getMessage() for r in caplog.records] == ["some other bitsandbytes problem",
                                                        "Failed to load CPU gemm_4bit_forward from elsewhere"]
