"""Opening safetensors checkpoints: validated up front, read lazily, memory-mapped.

`open_checkpoint` reads only the header, so a wrong or broken file is reported before any weight is touched,
with the file's name in the message. Tensors are then read one by one from the memory map.
"""

from __future__ import annotations

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

