"""The CPU attention kernel (csrc/attention.c, compiled at install by setup.py) as one call per
layer and step: RoPE, the step's keys and values into the KV cache in place, and grouped
attention over the cache, reading each cached row once per step.

Loaded with ctypes: the kernel is plain C over raw buffers, with no Python or ONNX Runtime API in
it. `load()` raises KernelUnavailable, naming the reason, where no compiled kernel is installed;
the backend then runs the whole CPU graph instead.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import numpy as np

from .kernel_build import CSRC, built_stamp, library_path, source_stamp

_POINTER = ctypes.c_void_p
_INT = ctypes.c_int


class KernelUnavailable(RuntimeError):
    """No compiled kernel can be loaded here; the message says why."""


@dataclass(frozen=True)
class RopeTables:
    """cos/sin [rows, head_dim / 2] for q (carrying the query scale) and for k, float32."""

    q_cos: np.ndarray
    q_sin: np.ndarray
    k_cos: np.ndarray
    k_sin: np.ndarray

    @property
    def rows(self) -> int:
        return self.k_cos.shape[0]


class AttentionKernel:
    def __init__(self, library: ctypes.CDLL, heads: int, kv_heads: int, head_dim: int, rope: RopeTables,
                 threads: int):
        self._call = library.edge_attention
        self._call.argtypes = [_INT] * 7 + [_POINTER, _INT] + [_POINTER] * 10 + [_INT]
        self._call.restype = _INT
        self.heads, self.kv_heads, self.head_dim, self.threads = heads, kv_heads, head_dim, threads
        self.rope = rope
        self._tables = [t.ctypes.data for t in (rope.q_cos, rope.q_sin, rope.k_cos, rope.k_sin)]

    def __call__(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, positions: np.ndarray,
                 key_cache: np.ndarray, value_cache: np.ndarray, length: int, out: np.ndarray) -> None:
        """q [S, heads*D], k/v [S, kv_heads*D] float32 (C-contiguous, before RoPE); positions
        int64 [S]; caches [kv_heads, capacity, D] float32 or float16 with `length` filled: keys
        and values land at length .. length + S - 1, the result in ``out`` [S, heads*D]."""
        for array in (q, k, v, out, key_cache, value_cache):
            if not array.flags.c_contiguous:
                raise ValueError("the attention kernel reads and writes C-contiguous arrays only")
        if key_cache.dtype != value_cache.dtype or key_cache.dtype not in (np.float16, np.float32):
            raise ValueError(f"KV caches must both be float16 or float32, not {key_cache.dtype}/{value_cache.dtype}")
        positions = np.ascontiguousarray(positions, dtype=np.int64)
        seq = q.shape[0]
        status = self._call(seq, self.heads, self.kv_heads, self.head_dim, key_cache.shape[1], length,
                            key_cache.dtype.itemsize * 8, positions.ctypes.data, self.rope.rows, *self._tables,
                            q.ctypes.data, k.ctypes.data, v.ctypes.data, key_cache.ctypes.data,
                            value_cache.ctypes.data, out.ctypes.data, self.threads)
        if status:
            raise RuntimeError(f"attention kernel refused a step ({seq} tokens at {length} cached, positions "
                               f"{positions.min()}..{positions.max()} of {self.rope.rows}): status {status}")


def supports(heads: int, kv_heads: int, head_dim: int) -> bool:
    """The shapes the kernel takes: whole groups of at most 16 query heads, head_dim a multiple of 16."""
    return kv_heads > 0 and heads % kv_heads == 0 and heads // kv_heads <= 16 and head_dim % 16 == 0


def load() -> ctypes.CDLL:
    """The compiled kernel beside this module."""
    path = library_path()
    if not path.is_file():
        raise KernelUnavailable(f"no compiled attention kernel at {path} (build it where a C compiler is "
                                "present: python -m edge_sdk.runtime.kernel_build)")
    try:
        library = ctypes.CDLL(str(path))
    except OSError as exc:
        raise KernelUnavailable(f"{path}: {exc}") from None
    built, now = built_stamp(library), source_stamp() if CSRC.is_dir() else None
    if now is not None and built != now:
        raise KernelUnavailable(f"{path}: built from other sources than {CSRC} (a stale build: stamp {built}, "
                                f"sources {now}); rebuild it: python -m edge_sdk.runtime.kernel_build")
    return library
