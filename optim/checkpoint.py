"""Opening safetensors checkpoints: validated up front, read lazily, memory-mapped.

`open_checkpoint` reads only the header, so a wrong or broken file is reported before any weight is touched,
with the file's name in the message. Tensors are then read one by one from the memory map.
"""

from __future__ import annotations

import functools
import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import ModelFileError

_HEADER_LIMIT = 100 * 1024 * 1024
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


@dataclass(frozen=True)
class TensorInfo:
    dtype: torch.dtype | str
    shape: tuple[int, ...]


@dataclass
class Checkpoint:
    """A safetensors file whose header has been checked. Indexing reads one tensor from the memory map."""

    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path.name

    def keys(self):
        return self.tensors.keys()

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def shape(self, key: str) -> tuple[int, ...]:
        return self.tensors[key].shape

    def has_fp8(self) -> bool:
        return any(info.dtype in FP8_DTYPES for info in self.tensors.values())

    def load(self, keys=None) -> dict[str, torch.Tensor]:
        """Tensors for `keys` (all by default), backed by the file's memory map where safetensors allows."""
        from safetensors import safe_open

        wanted = list(self.tensors) if keys is None else list(keys)
        try:
            with safe_open(str(self.path), framework="pt", device="cpu") as f:
                return {k: f.get_tensor(k) for k in wanted}
        except Exception as e:  # safetensors raises its own error types; name the file for the user
            raise ModelFileError(f"Could not read tensors from '{self.path}': {e}. "
                                 "The file may be truncated or corrupt; download it again.") from e


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Parse and validate a .safetensors header without reading the weights."""
    path = Path(path)
    if not path.exists():
        raise ModelFileError(f"Model file not found: '{path}'.")
    if path.is_dir():
        raise ModelFileError(f"'{path}' is a folder; expected a .safetensors file here.")
    if path.suffix.lower() not in (".safetensors", ".sft"):
        raise ModelFileError(f"'{path.name}' is not a .safetensors file. Only safetensors checkpoints are loaded "
                             "(pickled .ckpt/.pt/.bin files can run code and are refused).")
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ModelFileError(f"'{path.name}' is empty or truncated ({size} bytes): not a safetensors file.")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len <= 0 or header_len > _HEADER_LIMIT or 8 + header_len > size:
            raise ModelFileError(f"'{path.name}' has no valid safetensors header (header length {header_len}, "
                                 f"file size {size}); the file is corrupt or truncated.")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ModelFileError(f"'{path.name}' has a corrupt safetensors header: {e}.") from e
    if not isinstance(header, dict):
        raise ModelFileError(f"'{path.name}' has a corrupt safetensors header (not a JSON object).")
    metadata = header.pop("__metadata__", None) or {}
    tensors, data_end = {}, 0
    for key, entry in header.items():
        try:
            begin, end = entry["data_offsets"]
            info = TensorInfo(_DTYPES.get(entry["dtype"], entry["dtype"]), tuple(int(d) for d in entry["shape"]))
        except (KeyError, TypeError, ValueError) as e:
            raise ModelFileError(f"'{path.name}' has a corrupt header entry for tensor '{key}'.") from e
        tensors[key] = info
        data_end = max(data_end, end)
    if 8 + header_len + data_end > size:
        raise ModelFileError(f"'{path.name}' is truncated: its header describes {8 + header_len + data_end} bytes "
                             f"but the file has {size}. Download it again.")
    if not tensors:
        raise ModelFileError(f"'{path.name}' contains no tensors.")
    return Checkpoint(path, tensors, dict(metadata))



# ---------------------------------------------------------------- releasing mapped pages

_MADV_DONTNEED = 4
_CHECKPOINT_SUFFIXES = (".safetensors", ".sft")


class MappedCheckpoints:
    """The checkpoint files this process has memory-mapped, so weights read from them can give their pages back.

    A tensor read from a safetensors memory map pulls the file's pages into this process's resident set as it is
    read. When a load converts weights (bf16 to fp8 or nf4, fp32 to bf16, dequantizing), the converted copy is new
    memory and the original's pages would stay resident until the map closes: peak RSS would be the file plus the
    converted model. `release(tensor)` drops the pages that lie wholly inside the bytes of a tensor the caller has
    just converted and is discarding (madvise MADV_DONTNEED). Weights read from a checkpoint are never written in
    place, so these are clean file pages: were they read again, the kernel would fault them back in from the file.
    Only Linux does this; elsewhere it is a no-op. Take a snapshot after the checkpoint is opened, before converting.
    """

    def __init__(self, ranges: list[tuple[int, int]]):
        self.ranges = ranges
        self.released_bytes = 0

    @classmethod
    def snapshot(cls) -> "MappedCheckpoints":
        ranges = []
        try:
            with open("/proc/self/maps") as maps:
                for line in maps:
                    parts = line.split(maxsplit=5)
                    if len(parts) == 6 and parts[5].strip().removesuffix(" (deleted)").endswith(_CHECKPOINT_SUFFIXES):
                        start, end = (int(x, 16) for x in parts[0].split("-"))
                        ranges.append((start, end))
        except OSError:
            pass
        return cls(ranges)

    def release(self, tensor: torch.Tensor | None) -> int:
        """Give back the whole pages of `tensor`'s bytes if they lie in a mapped checkpoint; bytes released."""
        if tensor is None or not self.ranges or tensor.device.type != "cpu":
            return 0
        start = tensor.data_ptr()
        end = start + tensor.numel() * tensor.element_size()
        if not any(lo <= start and end <= hi for lo, hi in self.ranges):
            return 0
        page = _page_size()
        first, last = -(-start // page) * page, end // page * page
        if last <= first or not _madvise(first, last - first, _MADV_DONTNEED):
            return 0
        self.released_bytes += last - first
        return last - first


def return_free_heap() -> None:
    """Hand the C heap's free pages back to the OS (glibc's malloc_trim; elsewhere a no-op). A conversion's
    temporaries are freed between the converted tensors it keeps, and the allocator would hold on to that memory:
    without this, resident memory grows by about the converted model's size again."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def _page_size() -> int:
    return os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


@functools.lru_cache(maxsize=1)
def _libc():
    """The C library of this process (None where there is none to call)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        return libc
    except (OSError, AttributeError):
        return None


def _madvise(address: int, length: int, advice: int) -> bool:
    libc = _libc()
    return libc is not None and libc.madvise(address, length, advice) == 0
