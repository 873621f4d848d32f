"""The bench's names and defaults, as plain values (no torch): `flux2-accel bench --help` and its argument checks
read them without loading torch or diffusers. rows.py and models.py check that their registries match these names."""

from __future__ import annotations

CONFIG_NAMES = ("tiny", "tiny-klein", "small", "klein-4b", "klein-9b", "dev")  # models.CONFIGS, in order
ROW_NAMES = ("baseline", "pack-bf16", "fp8", "fp8-fast", "nf4", "fbcache-0", "fbcache", "fbcache-noskip",
             "fbcache-skip", "fbcache-half", "teacache", "compile", "lora-restrength", "all-on", "nf4-offload",
             "attn-cudnn", "attn-flash", "attn-sage", "cp2", "cp4")  # rows.ROWS, in order
GPU_ONLY_ROWS = ("nf4-offload", "attn-cudnn", "attn-flash", "attn-sage")
MULTI_DEVICE_ROWS = ("cp2", "cp4")  # ranks on Ray (the [parallel] extra); on a CPU, one core per rank
DEFAULT_ROWS = tuple(n for n in ROW_NAMES if n not in GPU_ONLY_ROWS + MULTI_DEVICE_ROWS)

DEFAULT_CONFIG = "small"
DEFAULT_SIZE = 128
DEFAULT_STEPS = 6
DEFAULT_REPEATS = 3
DEFAULT_WARMUP = 1
SEED = 0
