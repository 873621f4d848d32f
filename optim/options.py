"""The choices and limits that the nodes' widgets, the engine's checks and the CLI's flags share, defined once.

Plain values, no torch: `flux2-accel --help` and its argument checks read them without loading torch or diffusers
(the modules that use them, precision.py, offload.py, attention.py, sampling.py, import them from here).
"""

from __future__ import annotations

TRANSFORMER_PRECISIONS = ("bf16", "fp8_e4m3fn", "fp8_e4m3fn_fast", "nf4")
TEXT_ENCODER_PRECISIONS = ("bf16", "fp8_e4m3fn", "fp8_e4m3fn_fast", "nf4")
OFFLOAD_MODES = ("none", "model_cpu", "sequential", "group")
ATTENTION_BACKENDS = ("auto", "sdpa", "cudnn", "flash", "sage")
DEFAULT_ATTENTION_BACKEND = "auto"
PARALLEL_MODES = ("ulysses", "ring", "cfg", "auto")  # one image over several GPUs (features/context_parallel.py)
MAX_PARALLEL_GPUS = 8

# Sampling parameters (the sampler node's widgets, SamplingParams.validate, `generate`'s flags).
SIZE_MULTIPLE = 16  # width and height: multiples of the VAE's factor times the 2x2 patch
MAX_RESOLUTION = 8192
MAX_STEPS = 200
MIN_REFERENCE_SIDE = 64  # the shorter side, in pixels, of a reference image the sampler takes
MAX_BATCH_SIZE = 64
MAX_SEED = 0xFFFF_FFFF_FFFF_FFFF
MAX_GUIDANCE = 100.0

# Remote text encoding (the client, `serve-text-encoder`'s flags and its server).
REMOTE_TOKEN_ENV = "FLUX2_ACCEL_REMOTE_TOKEN"  # the token variable, client and server
REMOTE_REPLY_FORMATS = ("safetensors", "torch")  # reply formats of the encoder endpoint (remote/protocol.py)
REMOTE_BODY_TIMEOUT_S = 30.0  # a client that announces a body and does not send it is dropped after this
