"""Quantized linears on the CPU (csrc/linear.c, in the library runtime/kernels.py loads): y = x W^T,
W in INT4 / INT8 blocks, repacked once at load so that each vector lane sums one row; x quantized
to int8 per block, as ONNX Runtime's MatMulNBits does at accuracy level 4; the products by
AVX-512 VNNI.

Why: a decode step is the reading of these weights, and MatMulNBits reads them well below the
memory bandwidth (measured in csrc/linear.c's header). Where this kernel runs them, the CPU graph
is cut at each one (runtime/segments.py) and their weights are read from the package here, a few
thousand rows at a time, so that they are resident once: the INT4 linears of the layers
(DequantizeLinear -> MatMul, weights [inputs, outputs]) and the INT4 / INT8 head (MatMulNBits,
weights [outputs, inputs]).
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
    """A block-quantized weight [rows, cols], in one of two forms. Rows (as MatMulNBits stores
    it): ``read_rows(r0, r1)`` -> (codes [r1 - r0, cols * bits / 8], INT4 input 2i in the low
    nibble of byte i, zero points 8 and 128; scales [r1 - r0, cols / block]). Columns (as a
    DequantizeLinear along the inputs stores INT4): ``columns`` = (signed codes [cols, rows], two to
    a byte along the rows; scales [cols / block, rows]). Scales float16 or float32."""

    bits: int
    block: int
    rows: int
    cols: int
    read_rows: Callable[[int, int], tuple[np.ndarray, np.ndarray]] | None = None
    columns: tuple[np.ndarray, np.ndarray] | None = None


def supports(bits: int, block: int, cols: int) -> bool:
    """The weights the kernel takes: INT4 or INT8 in blocks of a multiple of 32 inputs."""
    return bits in (4, 8) and block > 0 and block % 32 == 0 and cols % block == 0


class LinearKernel:
    """One quantized weight, packed for the kernel, and its products with tokens' vectors."""

    def __init__(self, library: ctypes.CDLL, weight: QuantizedWeight, threads: int):
        if not supports(weight.bits, weight.block, weight.cols):
            raise ValueError(f"the linear kernel takes INT4 / INT8 blocks of a multiple of 32 inputs, not "
                             f"{weight.bits}-bit blocks of {weight.block} over {weight.cols}")
        self._call = library.edge_linear
        self._call.argtypes = [_INT] * 5 + [_POINTER] * 4 + [_INT]
        self._call.restype = _INT
        self.bits, self.block, self.rows, self.cols, self.threads = (weight.bits, weight.block, weight.rows,
                                                                     weight.cols, threads)
        padded = -(-weight.rows // GROUP_ROWS) * GROUP_ROWS
        self.packed = np.zeros(padded * weight.cols * weight.bits // 8, np.uint8)
        self.scales = np.zeros(padded * (weight.cols // weight.block), np.float32)
        self._pack = library.edge_linear_pack
        self._pack.argtypes = [_INT] * 7 + [_POINTER, _INT] + [_POINTER] * 3
        self._pack.restype = _INT
        if weight.columns is not None:
            self._pack_rows(weight, 0, weight.rows, *weight.columns)
        else:
            for first in range(0, weight.rows, PACK_ROWS):
                count = min(PACK_ROWS, weight.rows - first)
                self._pack_rows(weight, first, count, *weight.read_rows(first, first + count))

    def _pack_rows(self, weight: QuantizedWeight, first: int, count: int, codes: np.ndarray,
                   scales: np.ndarray) -> None:
        columns = weight.columns is not None
        codes, scales = np.ascontiguousarray(codes, dtype=np.uint8), np.ascontiguousarray(scales)
        whole = weight.rows if columns else count
        if codes.size != whole * weight.cols * weight.bits // 8 or scales.size != whole * (weight.cols // weight.block):
            raise ValueError(f"rows {first}..{first + count - 1}: {codes.size} code bytes and {scales.size} "
                             f"scales do not fit a {weight.bits}-bit [{weight.rows}, {weight.cols}] weight in "
                             f"blocks of {weight.block}")
        if scales.dtype not in (np.float16, np.float32):
            raise ValueError(f"scales must be float16 or float32, not {scales.dtype}")
        if self._pack(weight.bits, weight.block, weight.rows, weight.cols, first, count, columns, codes.ctypes.data,
                      scales.dtype.itemsize * 8, scales.ctypes.data, self.packed.ctypes.data, self.scales.ctypes.data):
            raise ValueError(f"the linear kernel refused rows {first}..{first + count - 1} of its weight"
                             f"{' (the columns form: INT4, an even number of rows)' if columns else ''}")

    def __call__(self, x: np.ndarray, out: np.ndarray) -> None:
        """out [tokens, rows] = x [tokens, cols] W^T (any shapes of those sizes), float32 and
        C-contiguous."""
        self.bind(x, out)()

    def bind(self, x: np.ndarray, out: np.ndarray) -> Callable[[], None]:
        """The product over these arrays, checked once (a decode step's arrays are the same every step)."""
        tokens = max(x.size // self.cols, 1)
        for name, array, size in (("x", x, tokens * self.cols), ("out", out, tokens * self.rows)):
            if array.dtype != np.float32 or not array.flags.c_contiguous or array.size != size:
                raise ValueError(f"{name} must be {size} C-contiguous float32 values, not {array.size} "
                                 f"{array.dtype}{'' if array.flags.c_contiguous else ' (strided)'}")
        call, args = self._call, (self.bits, self.block, self.rows, self.cols, tokens, self.packed.ctypes.data,
                                  self.scales.ctypes.data, x.ctypes.data, out.ctypes.data, self.threads)

        def run() -> None:
            if call(*args):
                raise RuntimeError(f"linear kernel refused a product ({self.bits}-bit [{self.rows}, {self.cols}])")
        run.arrays = (x, out, self.packed, self.scales)  # what its pointers point into, alive as long as it is
        return run


def available(library: ctypes.CDLL) -> bool:
    """Whether this CPU runs the kernel (AVX-512 with VNNI)."""
    return bool(library.edge_linear_supported())


def layer_linears(graph) -> list[tuple[object, object]]:
    """(DequantizeLinear, MatMul) pairs the kernel runs: a symmetric INT4 weight [inputs, outputs]
    in blocks along the inputs (a multiple of 32), read by one MatMul alone."""
    from onnx import TensorProto

    inits = {t.name: t for t in graph.graph.initializer}
    readers: dict[str, list] = {}
    for node in graph.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    pairs = []
    for dq in graph.graph.node:
        if dq.op_type != "DequantizeLinear" or len(dq.input) > 2 or dq.input[0] not in inits:
            continue
        attrs = {a.name: a.i for a in dq.attribute}
        weight, users = inits[dq.input[0]], readers.get(dq.output[0], [])
        if (weight.data_type != TensorProto.INT4 or len(weight.dims) != 2 or weight.dims[1] % 2
                or attrs.get("axis") != 0 or not supports(4, attrs.get("block_size", 0), weight.dims[0])
                or len(users) != 1 or users[0].op_type != "MatMul" or users[0].input[1] != dq.output[0]):
            continue
        pairs.append((dq, users[0]))
    return pairs


def dequantize_linear_weight(graph, dq, base_dir: Path) -> QuantizedWeight:
    """The weight of a layer linear's DequantizeLinear, in the columns form."""
    from onnx import numpy_helper

    inits = {t.name: t for t in graph.graph.initializer}
    codes = inits[dq.input[0]]
    cols, rows = codes.dims
    block = next(a.i for a in dq.attribute if a.name == "block_size")
    scales = numpy_helper.to_array(inits[dq.input[1]], base_dir=str(base_dir))
    return QuantizedWeight(4, block, rows, cols, columns=(_stored_bytes(codes, base_dir, 0, cols * rows // 2), scales))


def _stored_bytes(tensor, base_dir: Path, start: int, count: int) -> np.ndarray:
    """Bytes start .. start + count - 1 of a tensor as stored (uint8), from the package's weights
    file or the graph."""
    from onnx import TensorProto

    if tensor.data_location != TensorProto.EXTERNAL:
        out = np.frombuffer(tensor.raw_data, np.uint8)[start:start + count]
    else:
        where = {e.key: e.value for e in tensor.external_data}
        path = Path(base_dir) / where["location"]
        out = np.empty(count, np.uint8)
        with open(path, "rb") as f:
            f.seek(int(where.get("offset", 0)) + start)
            if f.readinto(out) != count:
                raise ValueError(f"{path}: ends inside {tensor.name} (bytes {start}..{start + count - 1})")
    if out.size != count:
        raise ValueError(f"{tensor.name}: {out.size} stored bytes where {count} were read (not raw data?)")
    return out


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
    from onnx import numpy_helper

    attrs = {a.name: a.i for a in node.attribute}
    if len(node.input) > 3 and node.input[3]:
        raise ValueError(f"MatMulNBits {node.name}: has zero points; the kernel takes symmetric weights only")
    inits = {t.name: t for t in graph.graph.initializer}
    codes, scales = inits[node.input[1]], inits[node.input[2]]
    rows, cols, bits, block = attrs["N"], attrs["K"], attrs["bits"], attrs["block_size"]
    row_bytes = cols * bits // 8
    all_scales = numpy_helper.to_array(scales, base_dir=str(base_dir)).reshape(rows, -1)

    def read_rows(r0: int, r1: int) -> tuple[np.ndarray, np.ndarray]:
        return _stored_bytes(codes, base_dir, r0 * row_bytes, (r1 - r0) * row_bytes), all_scales[r0:r1]
    return QuantizedWeight(bits, block, rows, cols, read_rows)
