"""The quantized LM head's product on the CPU (csrc/linear.c, in the library runtime/kernels.py
loads): y = W x for one token, W in INT4 / INT8 blocks as the CPU graph's MatMulNBits head stores
them, repacked once at load so that each vector lane sums one row; x quantized to int8 per block,
as MatMulNBits does at accuracy level 4; the products by AVX-512 VNNI.

Why: the head is the largest read of a decode step (131,072 x 3,072 for Ministral 3 3B) and
MatMulNBits reads it well below the memory bandwidth (measured in csrc/linear.c's header). Where
this kernel runs it, the cut graph ends at the head's input (runtime/segments.py) and the head's
weights are read from the package here, a few MB at a time, so that they are resident once.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

_POINTER = ctypes.c_void_p
_INT = ctypes.c_int

GROUP_ROWS = 32  # the packed layout's rows come in pairs of 16-row groups; the last pair is padded
PACK_ROWS = 4096  # rows read and repacked at a time: 12 MB of INT8 codes at 3,072 inputs


@dataclass(frozen=True)
class QuantizedWeight:
    """A block-quantized weight [rows, cols] as MatMulNBits stores it: codes [rows, cols * bits / 8]
    (INT4: input 2i in the low nibble of byte i; zero points 8 and 128), scales [rows, cols /
    block] float16 or float32. ``read_rows(r0, r1)`` -> (codes, scales) of rows r0 .. r1 - 1."""

    bits: int
    block: int
    rows: int
    cols: int
    read_rows: Callable[[int, int], tuple[np.ndarray, np.ndarray]]


def supports(bits: int, block: int, cols: int) -> bool:
    """The weights the kernel takes: INT4 or INT8 in blocks of a multiple of 32 inputs."""
    return bits in (4, 8) and block > 0 and block % 32 == 0 and cols % block == 0


class LinearKernel:
    """One quantized weight, packed for the kernel, and its product with one vector."""

    def __init__(self, library: ctypes.CDLL, weight: QuantizedWeight, threads: int):
        if not supports(weight.bits, weight.block, weight.cols):
            raise ValueError(f"the linear kernel takes INT4 / INT8 blocks of a multiple of 32 inputs, not "
                             f"{weight.bits}-bit blocks of {weight.block} over {weight.cols}")
        self._call = library.edge_linear
        self._call.argtypes = [_INT] * 4 + [_POINTER] * 4 + [_INT]
        self._call.restype = _INT
        self.bits, self.block, self.rows, self.cols, self.threads = (weight.bits, weight.block, weight.rows,
                                                                     weight.cols, threads)
        padded = -(-weight.rows // GROUP_ROWS) * GROUP_ROWS
        self.packed = np.zeros(padded * weight.cols * weight.bits // 8, np.uint8)
        self.scales = np.zeros(padded * (weight.cols // weight.block), np.float32)
        pack = library.edge_linear_pack
        pack.argtypes = [_INT] * 6 + [_POINTER, _INT] + [_POINTER] * 3
        pack.restype = _INT
        for first in range(0, weight.rows, PACK_ROWS):
            count = min(PACK_ROWS, weight.rows - first)
            codes, scales = weight.read_rows(first, first + count)
            codes = np.ascontiguousarray(codes, dtype=np.uint8)
            scales = np.ascontiguousarray(scales)
            if codes.size != count * weight.cols * weight.bits // 8 or scales.size != count * (weight.cols // weight.block):
                raise ValueError(f"rows {first}..{first + count - 1}: {codes.size} code bytes and {scales.size} "
                                 f"scales do not fit a {weight.bits}-bit [{weight.rows}, {weight.cols}] weight in "
                                 f"blocks of {weight.block}")
            if scales.dtype not in (np.float16, np.float32):
                raise ValueError(f"scales must be float16 or float32, not {scales.dtype}")
            if pack(weight.bits, weight.block, weight.rows, weight.cols, first, count, codes.ctypes.data,
                    scales.dtype.itemsize * 8, scales.ctypes.data, self.packed.ctypes.data, self.scales.ctypes.data):
                raise ValueError(f"the linear kernel refused rows {first}..{first + count - 1} of its weight")

    def __call__(self, x: np.ndarray, out: np.ndarray) -> None:
        """out [rows] = W x, x [cols], both float32 and C-contiguous."""
        self.bind(x, out)()

    def bind(self, x: np.ndarray, out: np.ndarray) -> Callable[[], None]:
        """The product over these arrays, checked once (a decode step's arrays are the same every step)."""
        for name, array, size in (("x", x, self.cols), ("out", out, self.rows)):
            if array.dtype != np.float32 or not array.flags.c_contiguous or array.size != size:
                raise ValueError(f"{name} must be {size} C-contiguous float32 values, not {array.size} "
                                 f"{array.dtype}{'' if array.flags.c_contiguous else ' (strided)'}")
        call, args = self._call, (self.bits, self.block, self.rows, self.cols, self.packed.ctypes.data,
                                  self.scales.ctypes.data, x.ctypes.data, out.ctypes.data, self.threads)

        def run() -> None:
            if call(*args):
                raise RuntimeError(f"linear kernel refused a product ({self.bits}-bit [{self.rows}, {self.cols}])")
        run.arrays = (x, out, self.packed, self.scales)  # what its pointers point into, alive as long as it is
        return run


def available(library: ctypes.CDLL) -> bool:
    """Whether this CPU runs the kernel (AVX-512 with VNNI)."""
    return bool(library.edge_linear_supported())


def head_node(graph):
    """The MatMulNBits node whose product is the graph's ``logits`` (through Identity nodes), or None."""
    producer = {o: n for n in graph.graph.node for o in n.output}
    node = producer.get("logits")
    while node is not None and node.op_type == "Identity":
        node = producer.get(node.input[0])
    return node if node is not None and node.op_type == "MatMulNBits" else None


def matmul_nbits_weight(graph, node, base_dir: Path) -> QuantizedWeight:
    """The weight of a MatMulNBits ``node`` of ``graph`` (a symmetric one: no zero points), its codes
    read a range of rows at a time from the package's weights file (or from the graph, if inline)."""
    from onnx import TensorProto, numpy_helper

    attrs = {a.name: a.i for a in node.attribute}
    if len(node.input) > 3 and node.input[3]:
        raise ValueError(f"MatMulNBits {node.name}: has zero points; the kernel takes symmetric weights only")
    inits = {t.name: t for t in graph.graph.initializer}
    codes, scales = inits[node.input[1]], inits[node.input[2]]
    rows, cols, bits, block = attrs["N"], attrs["K"], attrs["bits"], attrs["block_size"]
    row_bytes = cols * bits // 8
    all_scales = numpy_helper.to_array(scales, base_dir=str(base_dir)).reshape(rows, -1)
    if codes.data_location == TensorProto.EXTERNAL:
        where = {e.key: e.value for e in codes.external_data}
        path, offset = Path(base_dir) / where["location"], int(where.get("offset", 0))

        def read_rows(r0: int, r1: int) -> tuple[np.ndarray, np.ndarray]:
            out = np.empty((r1 - r0) * row_bytes, np.uint8)
            with open(path, "rb") as f:
                f.seek(offset + r0 * row_bytes)
                if f.readinto(out) != out.size:
                    raise ValueError(f"{path}: ends inside {codes.name} (rows {r0}..{r1 - 1})")
            return out, all_scales[r0:r1]
    else:
        inline = numpy_helper.to_array(codes).reshape(rows, row_bytes)

        def read_rows(r0: int, r1: int) -> tuple[np.ndarray, np.ndarray]:
            return inline[r0:r1], all_scales[r0:r1]
    return QuantizedWeight(bits, block, rows, cols, read_rows)
