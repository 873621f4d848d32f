"""The model store: live modules loaded from handles, kept and shared, and the features switched on per run.

`ModelStore` turns a handle into a live module, reusing what it already holds: base weights are loaded once per
(file, precision) and kept in a small LRU. `prepared(handle, report)` brings the shared transformer to the state the
handle asks for, by entering every registered feature (`optim.features.registry.FEATURES`, in order) for one run;
features keep their per-base state in `store.states` (see `optim.features.api.FeatureStates`).
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from typing import Any, Callable

import torch

from ..features.api import FeatureStates, RunReport
from ..features.registry import FEATURES
from ..models.loading import load_text_encoder, load_transformer, load_vae
from ..models.precision import apply_precision, apply_text_encoder_precision

VAE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class ModelStore:
    """Holds loaded modules keyed by their base identity. One per process (`STORE`), thread-safe.

    features: the features `prepared` applies, in order; None = the registry, `optim.features.registry.FEATURES`."""

    def __init__(self, max_entries: int = 6, features: tuple | None = None):
        self._entries: OrderedDict[tuple, Any] = OrderedDict()
        self._lock = threading.RLock()
        self._features = features
        self.max_entries = max_entries
        self.load_count = 0
        self.states = FeatureStates()

    @property
    def features(self) -> tuple:
        if self._features is None:
            return tuple(FEATURES)
        return tuple(self._features)

    def get(self, key: tuple, loader: Callable[[], Any]):
        """The module under `key`, loaded by `loader()` the first time (an existing module may be handed in as
        `lambda: module`: the bench and the demo hold modules built in memory)."""
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key]
            value = loader()
            self.load_count += 1
            self._entries[key] = value
            while len(self._entries) > self.max_entries:
                old, _ = self._entries.popitem(last=False)
                self.states.drop(old)
            return value

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.states.clear()

    def __len__(self) -> int:
        return len(self._entries)

    # -- materializers
    def transformer(self, handle):
        def load():
            model = load_transformer(handle.source, dtype=torch.bfloat16)
            return apply_precision(model, handle.precision)

        return self.get(handle.base_key, load)

    def vae(self, handle):
        return self.get(handle.base_key, lambda: load_vae(handle.source, dtype=VAE_DTYPES[handle.dtype]))

    def text_encoder(self, handle):
        def load():
            te = load_text_encoder(handle.source, dtype=torch.bfloat16, tokenizer_path=handle.tokenizer_path)
            te.model = apply_text_encoder_precision(te.model, handle.precision)
            return te

        return self.get(handle.base_key, load)

    @contextlib.contextmanager
    def prepared(self, handle, report: RunReport | None = None):
        """The live transformer with every feature of `handle` switched on, for the duration of one run."""
        transformer = self.transformer(handle)
        report = report if report is not None else RunReport()
        with self._lock, contextlib.ExitStack() as stack:
            for feature in self.features:
                stack.enter_context(feature.activate(self, transformer, handle, report))
            yield transformer


STORE = ModelStore()
