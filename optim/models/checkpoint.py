"""Opening safetensors checkpoints: validated up front, read lazily, memory-mapped.

`open_checkpoint` reads only the header, so a wrong or broken file is reported before any weight is touched,
with the file's name in the message. Tensors are then read one by one from the memory map.
"""

from __future__ import annotations

import functools
import json
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import ModelFileError

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
        except RecursionError:  # a header nested thousands deep: no safetensors writer makes one
            raise ModelFileError(f"'{path.name}' has a corrupt safetensors header: its JSON nests too deeply "
                                 "to be a tensor index.") from None
    if not isinstance(header, dict):
        raise ModelFileError(f"'{path.name}' has a corrupt safetensors header (not a JSON object).")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ModelFileError(f"'{path.name}' has a corrupt safetensors header: '__metadata__' must map names to "
                             f"strings, got {_excerpt(metadata)}. The file is damaged or was not written by a "
                             "safetensors library.")
    tensors, data_end = {}, 0
    for key, entry in header.items():
        info, (_, end) = _header_entry(path.name, key, entry)
        tensors[key] = info
        data_end = max(data_end, end)
    if 8 + header_len + data_end > size:
        raise ModelFileError(f"'{path.name}' is truncated: its header describes {8 + header_len + data_end} bytes "
                             f"but the file has {size}. Download it again.")
    if not tensors:
        raise ModelFileError(f"'{path.name}' contains no tensors.")
    return Checkpoint(path, tensors, dict(metadata))



def weight_files(folder: str | os.PathLike) -> list[Path]:
    """The .safetensors files of a diffusers/transformers model folder (one, or the shards of a sharded save)."""
    return sorted(p for p in Path(folder).iterdir() if p.suffix == ".safetensors")

def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _excerpt(value, limit: int = 60) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _header_entry(file_name: str, key: str, entry) -> tuple[TensorInfo, tuple[int, int]]:
    """One tensor's header entry, checked as the safetensors format defines it: a dtype name, a shape of
    non-negative integers, and [begin, end] byte offsets whose span holds exactly the tensor's bytes."""
    def corrupt(why: str) -> ModelFileError:
        return ModelFileError(f"'{file_name}' has a corrupt header entry for tensor '{key}': {why}. The file is "
                              "damaged or was not written by a safetensors library; download it again.")

    if not isinstance(entry, dict):
        raise corrupt(f"expected an object, got {_excerpt(entry)}")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str):
        raise corrupt(f"'dtype' is {_excerpt(dtype)}, not a type name")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise corrupt(f"'shape' is {_excerpt(shape)}, not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)
            and offsets[0] <= offsets[1]):
        raise corrupt(f"'data_offsets' is {_excerpt(offsets)}, not [begin, end] byte offsets")
    torch_dtype = _DTYPES.get(dtype, dtype)
    if isinstance(torch_dtype, torch.dtype):
        expected = math.prod(shape) * torch_dtype.itemsize
        if offsets[1] - offsets[0] != expected:
            raise corrupt(f"shape {shape} of {dtype} needs {expected} bytes but 'data_offsets' {offsets} span "
                          f"{offsets[1] - offsets[0]}")
    return TensorInfo(torch_dtype, tuple(shape)), (offsets[0], offsets[1])


def read_json_object(path: str | os.PathLike) -> dict:
    """A JSON file that must hold one object (config.json, model_index.json...), or ModelFileError naming it."""
    path = Path(path)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelFileError(f"'{path}' is missing; the model folder is incomplete.") from None
    except RecursionError:
        raise ModelFileError(f"'{path}' nests its JSON too deeply to be a model config; the model folder is "
                             "damaged. Download the folder again.") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFileError(f"'{path}' is not valid JSON ({e}); the model folder is damaged. "
                             "Download the folder again.") from None
    if not isinstance(value, dict):
        raise ModelFileError(f"'{path}' holds a JSON {type(value).__name__}, not the object of settings a model "
                             "config is; the model folder is damaged. Download the folder again.")
    return value


def first_non_finite(tensors: dict[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor holding a NaN or an infinity, or None when all are finite."""
    for key, value in tensors.items():
        if not value.is_floating_point() or not value.numel():
            continue
        if value.dtype in FP8_DTYPES:  # isfinite has no fp8 kernels; the upcast is exact
            value = value.to(torch.float16 if value.dtype == torch.float8_e4m3fn else torch.float32)
        if not bool(torch.isfinite(value).all()):
            return key
    return None


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
