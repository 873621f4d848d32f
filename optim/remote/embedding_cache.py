"""On-disk cache of prompt embeddings, so a repeated prompt costs no request to a remote text encoder.

One safetensors file per (prompt, encoder identity), named by the sha256 of both: the prompt text itself is never
written. Reading a file refreshes its mtime; when the folder grows past `max_bytes`, the least recently used files
go first.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
from pathlib import Path

import torch

log = logging.getLogger("flux2_accel")

DEFAULT_MAX_BYTES = 2 * 1024**3  # about 130 [dev] prompts in bf16 ([1, 512, 15360])
_SUFFIX = ".safetensors"


class EmbeddingCache:
    def __init__(self, root, max_bytes: int = DEFAULT_MAX_BYTES, enabled: bool = True):
        self.root = Path(root)
        self.max_bytes = int(max_bytes)
        self.enabled = enabled
        self.hits = 0
        self.misses = 0
        self._lock = threading.Lock()

    @staticmethod
    def key(prompt: str, identity: str) -> str:
        return hashlib.sha256(json.dumps([identity, prompt], ensure_ascii=False).encode("utf-8")).hexdigest()

    def _path(self, key: str) -> Path:
        return self.root / f"{key}{_SUFFIX}"

    def get(self, key: str) -> torch.Tensor | None:
        if not self.enabled:
            return None
        from safetensors.torch import load_file

        path = self._path(key)
        with self._lock:
            try:
                tensor = load_file(str(path))["prompt_embeds"]
                os.utime(path)
            except FileNotFoundError:
                self.misses += 1
                return None
            except Exception as e:  # a torn or foreign file: drop it and encode again
                log.warning("flux2-accel: dropping unreadable cached embedding %s (%s)", path.name, e)
                path.unlink(missing_ok=True)
                self.misses += 1
                return None
            self.hits += 1
            return tensor

    def put(self, key: str, tensor: torch.Tensor) -> None:
        if not self.enabled:
            return
        from safetensors.torch import save_file

        with self._lock:
            self.root.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.root, suffix=".tmp")
            os.close(fd)
            try:
                save_file({"prompt_embeds": tensor.detach().to("cpu").contiguous()}, tmp)
                os.replace(tmp, self._path(key))  # readers never see a half-written file
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            self._evict()

    def _evict(self) -> None:
        entries = []
        for path in self.root.glob(f"*{_SUFFIX}"):
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            entries.append((st.st_mtime_ns, st.st_size, path))
        total = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries):
            if total <= self.max_bytes:
                break
            path.unlink(missing_ok=True)
            total -= size

    def clear(self) -> None:
        with self._lock:
            for path in self.root.glob(f"*{_SUFFIX}"):
                path.unlink(missing_ok=True)

    def __len__(self) -> int:
        return sum(1 for _ in self.root.glob(f"*{_SUFFIX}")) if self.root.is_dir() else 0
