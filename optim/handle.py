"""Model handles: immutable descriptions of a model, materialized lazily and shared.

A handle says *what* model to run: base weights, precision, LoRA stack, cache and compile settings. Nodes pass
handles along and derive new ones with `replace`; they never touch a live module. `ModelStore` turns a handle into a
live module when sampling starts, reusing what it already holds: the base weights are loaded once per
(file, precision); features (LoRA, compile, step cache) are brought to the state the handle asks for on the shared
module, then step caches are removed again when the run ends.

Features register in `FEATURES` (explicit registry, applied in order). Each one gets the live transformer and the
handle and returns a context manager that holds the feature on for one run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

PRECISIONS = ("bf16", "fp8_e4m3fn", "fp8_e4m3fn_fast", "nf4")


@dataclass(frozen=True)
class ModelHandle:
    """What transformer to run. Hashable and immutable; derive variants with `replace`."""

    source: str  # absolute path of a .safetensors file or diffusers folder
    precision: str = "bf16"
    offload: str = "none"
    loras: tuple = ()  # LoRA specs, applied in order
    cache: Any = None  # step-cache settings, or None
    compile: Any = None  # compile settings, or None
    family: str = ""  # "dev" or "klein", filled in when known

    def replace(self, **changes) -> "ModelHandle":
        return dataclasses.replace(self, **changes)

    @property
    def base_key(self) -> tuple:
        """What identifies the loaded base weights: features layered on top do not change it."""
        return ("transformer", _file_identity(self.source), self.precision)


@dataclass(frozen=True)
class VaeHandle:
    source: str
    dtype: str = "bf16"

    @property
    def base_key(self) -> tuple:
        return ("vae", _file_identity(self.source), self.dtype)


@dataclass(frozen=True)
class TextEncoderHandle:
    source: str
    precision: str = "bf16"
    tokenizer_path: str | None = None

    @property
    def base_key(self) -> tuple:
        return ("text_encoder", _file_identity(self.source), self.precision, self.tokenizer_path)


def _file_identity(path: str) -> tuple:
    """Path plus size and mtime, so a file replaced on disk is loaded again."""
    p = Path(path)
    try:
        st = p.stat()
        return (str(p.resolve()), st.st_size, st.st_mtime_ns)
    except OSError:
        return (str(p), None, None)


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# ---------------------------------------------------------------- features

@dataclass(frozen=True)
class Feature:
    """One kind of change to a live transformer, driven by a handle field.

    `activate(store, transformer, handle, report)` returns a context manager kept open for the run. It must leave
    the module reusable when the run fails or is interrupted, and may write statistics into `report.stats`.
    """

    name: str
    activate: Callable[..., contextlib.AbstractContextManager]


FEATURES: list[Feature] = []


def register_feature(feature: Feature) -> None:
    FEATURES[:] = [f for f in FEATURES if f.name != feature.name] + [feature]


# ---------------------------------------------------------------- the store

@dataclass
class RunReport:
    """One run: its sampling parameters (set by the caller before `prepared`), and what features report back
    (cache statistics, compile info...) under `stats[feature_name]`."""

    params: Any = None  # optim.sampling.SamplingParams
    stats: dict = field(default_factory=dict)


class ModelStore:
    """Holds loaded modules keyed by their base identity. One per process (`STORE`), thread-safe."""

    def __init__(self, max_entries: int = 6):
        self._entries: OrderedDict[tuple, Any] = OrderedDict()
        self._lock = threading.RLock()
        self.max_entries = max_entries
        self.load_count = 0
        self.state: dict[tuple, dict] = {}  # per-base feature state (e.g. loaded LoRA adapters)

    def get(self, key: tuple, loader: Callable[[], Any]):
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key]
            value = loader()
            self.load_count += 1
            self._entries[key] = value
            while len(self._entries) > self.max_entries:
                old, _ = self._entries.popitem(last=False)
                self.state.pop(old, None)
            return value

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.state.clear()

    def __len__(self) -> int:
        return len(self._entries)

    # -- materializers
    def transformer(self, handle: ModelHandle):
        from .loading import load_transformer
        from .precision import apply_precision

        def load():
            model = load_transformer(handle.source, dtype=torch.bfloat16)
            return apply_precision(model, handle.precision)

        return self.get(handle.base_key, load)

    def vae(self, handle: VaeHandle):
        from .loading import load_vae

        return self.get(handle.base_key, lambda: load_vae(handle.source, dtype=DTYPES[handle.dtype]))

    def text_encoder(self, handle: TextEncoderHandle):
        from .loading import load_text_encoder
        from .precision import apply_text_encoder_precision

        def load():
            te = load_text_encoder(handle.source, dtype=torch.bfloat16, tokenizer_path=handle.tokenizer_path)
            te.model = apply_text_encoder_precision(te.model, handle.precision)
            return te

        return self.get(handle.base_key, load)

    @contextlib.contextmanager
    def prepared(self, handle: ModelHandle, report: RunReport | None = None):
        """The live transformer with every feature of `handle` switched on, for the duration of one run."""
        from . import features  # noqa: F401  (fills FEATURES on first use)

        transformer = self.transformer(handle)
        report = report if report is not None else RunReport()
        with self._lock, contextlib.ExitStack() as stack:
            for feature in FEATURES:
                stack.enter_context(feature.activate(self, transformer, handle, report))
            yield transformer


STORE = ModelStore()
