"""Block-wise symmetric INT8 weights (fp16 scales), for the LM head where INT4 costs too much
quality: the same layout as INT4 (``DequantizeLinear`` with blocks along the input dimension,
which ONNX Runtime runs as 8-bit MatMulNBits), twice the bytes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .int4 import BlockQuantized, float_rows, row_chunks


@dataclass
class Int8Linear(BlockQuantized):
    """``q`` int8 in [-127, 127]."""

    q: np.ndarray
    scales: np.ndarray
    block: int

    def rows(self, r0: int, r1: int) -> Int8Linear:
        return Int8Linear(self.q[r0:r1], self.scales[r0:r1], self.block)


def quantize_int8(w: np.ndarray, block: int) -> Int8Linear:
    """Scale = max|w| / 127 per block (fp16-rounded, as the engine multiplies), codes rounded."""
    out, n = w.shape
    if n % block:
        raise ValueError(f"weight of shape {w.shape}: input dimension {n} is not a multiple of the block size {block}")
    q = np.empty((out, n), np.int8)
    scales = np.empty((out, n // block), np.float16)
    for r0, r1 in row_chunks(out, n):  # bounded temporaries, as quantize_int4
        wb = float_rows(w, (r0, r1)).reshape(r1 - r0, n // block, block)
        scale = (np.abs(wb).max(axis=-1) / 127.0).astype(np.float16)
        s32 = scale.astype(np.float32)[:, :, None]
        codes = np.clip(np.rint(np.divide(wb, s32, out=np.zeros_like(wb), where=s32 > 0)), -127, 127)
        q[r0:r1] = codes.astype(np.int8).reshape(r1 - r0, n)
        scales[r0:r1] = scale
    return Int8Linear(q=q, scales=scales, block=block)
