"""Memory-mapped reading of .safetensors files into NumPy, including BF16 and FP8.

The `safetensors` package's NumPy frontend cannot hand out bfloat16 or float8 tensors, which are
exactly what Ministral 3 checkpoints hold. The format is simple (an 8-byte header length, a JSON
header, raw little-endian data), so we map it ourselves: nothing is read until a tensor is used,
and a 14B checkpoint never needs twice its size in RAM.
"""

from __future__ import annotations

import json
import mmap
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

from .config import CheckpointError

DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


class SafetensorsFile:
    """One .safetensors file; `tensor(name)` returns a read-only memory-mapped array."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                (header_len,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(header_len))
        except FileNotFoundError:
            raise CheckpointError(f"{self.path}: file is missing") from None
        except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{self.path}: not a valid safetensors file ({exc})") from None
        header.pop("__metadata__", None)
        self._data_start = 8 + header_len
        self._entries = header
        self._map = None
        needed = self._data_start + max((e["data_offsets"][1] for e in header.values()), default=0)
        size = self.path.stat().st_size
        if size < needed:
            raise CheckpointError(f"{self.path}: file is truncated ({size} of {needed} bytes)")

    def keys(self) -> list[str]:
        return list(self._entries)

    def release(self, name: str) -> None:
        """Tell the kernel the pages of tensor ``name`` are not needed any more (after the caller
        converted it into its own array): they stop counting towards this process's RSS."""
        if self._map is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        begin, end = self._entries[name]["data_offsets"]
        start = (self._data_start + begin) // mmap.PAGESIZE * mmap.PAGESIZE
        stop = self._data_start + end
        try:
            self._map._mmap.madvise(mmap.MADV_DONTNEED, start, stop - start)
        except (AttributeError, OSError, ValueError):  # not an mmap-backed view: nothing to drop
            pass

    def tensor(self, name: str) -> np.ndarray:
        entry = self._entries[name]
        dtype = DTYPES.get(entry["dtype"])
        if dtype is None:
            raise CheckpointError(f"{self.path}: tensor {name} has unsupported dtype {entry['dtype']}")
        if self._map is None:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        begin, end = entry["data_offsets"]
        raw = self._map[self._data_start + begin : self._data_start + end]
        shape = tuple(entry["shape"])
        expected = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        if raw.size != expected:
            raise CheckpointError(f"{self.path}: tensor {name} is truncated ({raw.size} of {expected} bytes)")
        return raw.view(dtype).reshape(shape)
