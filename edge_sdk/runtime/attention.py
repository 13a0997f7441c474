"""The CPU attention kernel (csrc/attention.c, in the library runtime/kernels.py loads) as one
call per layer and step: RoPE, the step's keys and values into the KV cache in place, and grouped
attention over the cache, reading each cached row once per step.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import numpy as np

_POINTER = ctypes.c_void_p
_INT = ctypes.c_int


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


@dataclass(frozen=True)
class LayerCache:
    """One layer's KV cache as the kernel reads and writes it: keys and values [kv_heads,
    capacity, D] float32, float16 or int8; int8 ones with each row's scale [kv_heads, capacity]
    float32 (a row holds its largest magnitude at 127)."""

    keys: np.ndarray
    values: np.ndarray
    key_scales: np.ndarray | None = None
    value_scales: np.ndarray | None = None

    @property
    def capacity(self) -> int:
        return self.keys.shape[1]

    def check(self) -> None:
        scales = (self.key_scales, self.value_scales)
        for array in (self.keys, self.values, *(s for s in scales if s is not None)):
            if not array.flags.c_contiguous:
                raise ValueError("the attention kernel reads and writes C-contiguous arrays only")
        if self.keys.dtype != self.values.dtype or self.keys.dtype not in CACHE_DTYPES:
            raise ValueError(f"KV caches must both be float32, float16 or int8, not {self.keys.dtype}/"
                             f"{self.values.dtype}")
        if (self.keys.dtype == np.int8) != all(s is not None for s in scales) or any(
                s is not None and (s.dtype != np.float32 or s.shape != self.keys.shape[:2]) for s in scales):
            raise ValueError("int8 KV caches take float32 row scales [kv_heads, capacity], and only they do")

    def pointers(self) -> list:
        return [a if a is None else a.ctypes.data for a in (self.keys, self.values, self.key_scales, self.value_scales)]


CACHE_DTYPES = (np.float32, np.float16, np.int8)
MAX_INT8_HEAD_DIM = 512  # csrc/attention.c: integer scores below 2^24


class AttentionKernel:
    def __init__(self, library: ctypes.CDLL, heads: int, kv_heads: int, head_dim: int, rope: RopeTables,
                 threads: int):
        self._call = library.edge_attention
        self._call.argtypes = [_INT] * 7 + [_POINTER, _INT] + [_POINTER] * 12 + [_INT]
        self._call.restype = _INT
        self.heads, self.kv_heads, self.head_dim, self.threads = heads, kv_heads, head_dim, threads
        self.rope = rope
        self._tables = [t.ctypes.data for t in (rope.q_cos, rope.q_sin, rope.k_cos, rope.k_sin)]

    def __call__(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, positions: np.ndarray, cache: LayerCache,
                 length: int, out: np.ndarray) -> None:
        """q [S, heads*D], k/v [S, kv_heads*D] float32 (C-contiguous, before RoPE); positions
        int64 [S]; ``cache`` with `length` rows filled: this step's keys and values land at
        length .. length + S - 1, the result in ``out`` [S, heads*D]."""
        self.bind(q, k, v, np.ascontiguousarray(positions, dtype=np.int64), cache, out)(length)

    def bind(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, positions: np.ndarray, cache: LayerCache,
             out: np.ndarray):
        """The call over these arrays as a function of the cached length, checked once: a decode
        step's arrays are the same every step (a check and the pointers per call were ~60 us of
        Python, six times a step)."""
        for array in (q, k, v, out, positions):
            if not array.flags.c_contiguous:
                raise ValueError("the attention kernel reads and writes C-contiguous arrays only")
        if positions.dtype != np.int64:
            raise ValueError(f"positions must be int64, not {positions.dtype}")
        cache.check()
        if cache.keys.dtype == np.int8 and self.head_dim > MAX_INT8_HEAD_DIM:
            raise ValueError(f"int8 KV caches take head_dim up to {MAX_INT8_HEAD_DIM} (scores stay exact in "
                             f"float32), not {self.head_dim}")
        seq, call = q.shape[0], self._call
        head = (seq, self.heads, self.kv_heads, self.head_dim, cache.capacity)
        tail = (cache.keys.dtype.itemsize * 8, positions.ctypes.data, self.rope.rows, *self._tables, q.ctypes.data,
                k.ctypes.data, v.ctypes.data, *cache.pointers(), out.ctypes.data, self.threads)

        def run(length: int) -> None:
            if call(*head, length, *tail):
                raise RuntimeError(f"attention kernel refused a step ({seq} tokens at {length} cached of "
                                   f"{cache.capacity}, positions {positions.min()}..{positions.max()} of "
                                   f"{self.rope.rows})")
        run.arrays = (q, k, v, out, positions, cache)  # what its pointers point into, alive as long as it is
        return run


def supports(heads: int, kv_heads: int, head_dim: int) -> bool:
    """The shapes the kernel takes: whole groups of at most 16 query heads, head_dim a multiple of 16."""
    return kv_heads > 0 and heads % kv_heads == 0 and heads // kv_heads <= 16 and head_dim % 16 == 0
