"""Model handles: immutable descriptions of a model. Nodes pass them along and derive variants with `replace`.

A handle says *what* to run: base weights, precision, offload mode, LoRA stack, cache and compile settings. It never
holds a live module: `optim.run.store.ModelStore` turns a handle into one when a run starts (`optim.run.engine.run`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def file_identity(path: str) -> tuple:
    """Path plus size and mtime, so a file replaced on disk counts as a new file (loaded again)."""
    p = Path(path)
    try:
        st = p.stat()
        return (str(p.resolve()), st.st_size, st.st_mtime_ns)
    except OSError:
        return (str(p), None, None)


@dataclass(frozen=True)
class ModelHandle:
    """What transformer to run. Hashable and immutable; derive variants with `replace`."""

    source: str  # absolute path of a .safetensors file or diffusers folder
    precision: str = "bf16"
    offload: str = "none"
    loras: tuple = ()  # LoRA specs (optim.features.lora.LoraSpec), applied in order
    cache: Any = None  # step-cache settings (optim.features.caching.CacheSettings), or None
    compile: Any = None  # compile settings (optim.features.compile.CompileSettings), or None
    family: str = ""  # "dev" or "klein", filled in when known
    attention_backend: str = "auto"  # features.attention.BACKENDS; applied per run, never part of the base weights
    parallel: Any = None  # one image over several GPUs (optim.features.context_parallel.ParallelSettings), or None

    def replace(self, **changes) -> "ModelHandle":
        return dataclasses.replace(self, **changes)

    def with_step_cache(self, settings) -> "ModelHandle":
        """This model with step-cache `settings` (optim.features.caching.CacheSettings); a threshold of 0 means no
        cache."""
        return self.replace(cache=settings if settings.enabled else None)

    def with_loras(self, specs) -> "ModelHandle":
        """This model with the LoRA `specs` appended to its stack (stacks chain: LoRAs already on it stay first)."""
        return self.replace(loras=tuple(self.loras) + tuple(specs))

    @property
    def base_key(self) -> tuple:
        """What identifies the loaded base weights: features layered on top do not change it."""
        return ("transformer", file_identity(self.source), self.precision)


@dataclass(frozen=True)
class VaeHandle:
    source: str
    dtype: str = "bf16"

    @property
    def base_key(self) -> tuple:
        return ("vae", file_identity(self.source), self.dtype)


@dataclass(frozen=True)
class TextEncoderHandle:
    source: str
    precision: str = "bf16"
    tokenizer_path: str | None = None

    @property
    def base_key(self) -> tuple:
        return ("text_encoder", file_identity(self.source), self.precision, self.tokenizer_path)
