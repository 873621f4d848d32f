"""On-disk cache of prompt embeddings, so a repeated prompt costs no request to a remote text encoder.

One safetensors file per (prompt, encoder identity), named by the sha256 of both: the prompt text itself is never
written. Reading a file refreshes its mtime; when the folder grows past `max_bytes`, the least recently used files
go first.

The cache is an optimisation, never a reason to fail: a folder that cannot be written (read-only, full disk, a path
through a file) gives one warning per folder and the encoding goes on without the cache; the warning comes again only
after a write there has succeeded in between. A file that cannot be read is a miss.
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
# Folders whose last write failed: warned about once, until a write there succeeds again (shared by every instance,
# since the node builds a cache per call).
_UNWRITABLE: set[str] = set()
_UNWRITABLE_LOCK = threading.Lock()


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
            except FileNotFoundError:
                self.misses += 1
                return None
            except Exception as e:  # a torn or foreign file: drop it and encode again
                log.warning("flux2-accel: dropping unreadable cached embedding %s (%s)", path.name, e)
                try:
                    path.unlink(missing_ok=True)
                except OSError:  # a read-only folder: it stays a miss
                    pass
                self.misses += 1
                return None
            try:
                os.utime(path)  # least recently used goes first; a read-only folder just keeps the old order
            except OSError:
                pass
            self.hits += 1
            return tensor

    def put(self, key: str, tensor: torch.Tensor) -> bool:
        """Stores `tensor` under `key`; False (after one warning per folder) when the folder cannot be written."""
        if not self.enabled:
            return False
        from safetensors.torch import save

        data = save({"prompt_embeds": tensor.detach().to("cpu").contiguous()})  # serialized in memory: disk errors
        with self._lock:                                                        # below are all OSError
            try:
                self._write(self._path(key), data)
                self._evict()
            except OSError as e:
                self._unwritable(e)
                return False
        with _UNWRITABLE_LOCK:
            _UNWRITABLE.discard(str(self.root))
        return True

    def _write(self, path: Path, data: bytes) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.root, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)  # readers never see a half-written file
        finally:
            try:
                os.unlink(tmp)
            except OSError:  # already replaced, or the folder refuses even that
                pass

    def _unwritable(self, error: OSError) -> None:
        with _UNWRITABLE_LOCK:
            if str(self.root) in _UNWRITABLE:
                return
            _UNWRITABLE.add(str(self.root))
        log.warning("flux2-accel: the embedding cache folder %s cannot be written (%s: %s); going on without caching "
                    "there. Free space, fix its permissions, point FLUX2_ACCEL_EMBEDDING_CACHE_DIR elsewhere, or turn "
                    "the node's use_cache off.", self.root, type(error).__name__, error.strerror or error)

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
