"""Token embeddings on the host: the rows a prompt needs, read from embed.onnx's table.

The table has the LM head's form (for a tied model it is the decoder's head itself, stored once):
W^T [hidden, vocab], float or INT4 / INT8 with block scales, or W [vocab, hidden] in the rows form
of ONNX Runtime packages (unsigned codes: INT4 + 8, INT8 + 128). Nothing of it is loaded: rows-form
tables are read a row per token with pread (`FileRows`), W^T tables memory-mapped (a column is a
byte in every row), and nothing is dequantized but the looked-up tokens. Both backends use it
(ONNX Runtime would dequantize the whole table to run embed.onnx).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

_INT4_TYPES = ("INT4", "UINT4")


class EmbeddingTable:
    def __init__(self, table: np.ndarray, scales: np.ndarray | None = None, block: int | None = None,
                 int4: bool = False, rows: bool = False, zero_point: int = 0):
        self.table = table      # float/int8 [H, V] (or [V, H] with `rows`), or uint8 of two INT4 codes per byte
        self.scales = scales    # [H / block, V] (or [V, H / block] with `rows`) for int8 / INT4 tables
        self.block = block
        self.int4 = int4
        self.rows = rows
        self.zero_point = zero_point  # 8 / 128 for the unsigned INT4 / INT8 codes of the rows form

    @classmethod
    def open(cls, onnx_path: str | Path) -> "EmbeddingTable":
        """The table (and scales) of an embed.onnx written by export.decoder.export_embedding."""
        import onnx

        onnx_path = Path(onnx_path)
        model = onnx.load(str(onnx_path), load_external_data=False)
        inits = {t.name: t for t in model.graph.initializer}
        dq = next((n for n in model.graph.node if n.op_type == "DequantizeLinear"), None)
        gather = next((n for n in model.graph.node if n.op_type == "Gather"), None)
        if gather is None:
            raise ValueError(f"{onnx_path}: no Gather (not an embedding graph)")
        rows = next((a.i for a in gather.attribute if a.name == "axis"), 0) == 0
        if dq is None:
            if gather.input[0] not in inits:
                raise ValueError(f"{onnx_path}: the Gather does not read a table")
            return cls(_mapped(onnx_path, inits[gather.input[0]], rows), rows=rows)
        block = next(a.i for a in dq.attribute if a.name == "block_size")
        table = inits[dq.input[0]]
        int4 = onnx.TensorProto.DataType.Name(table.data_type) in _INT4_TYPES
        zero_point = 0
        if len(dq.input) > 2:  # the rows form's one zero point, stated for every block
            zero_point = 8 if int4 else 128
            if not np.all(np.asarray(_mapped(onnx_path, inits[dq.input[2]])) == (0x88 if int4 else 128)):
                raise ValueError(f"{onnx_path}: zero points other than {zero_point} in {dq.input[2]}")
        if int4 and table.dims[-1] % 2:
            raise ValueError(f"{onnx_path}: INT4 table {table.name} of shape {list(table.dims)}: its last axis must "
                             "be even")
        return cls(_mapped(onnx_path, table, rows), _mapped(onnx_path, inits[dq.input[1]], rows), block, int4=int4,
                   rows=rows, zero_point=zero_point)

    def lookup(self, ids) -> np.ndarray:
        """float32 [T, hidden] for token ids [T]."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if self.scales is None:
            if self.rows:
                return np.asarray(self.table[ids], dtype=np.float32)
            return np.asarray(self.table[:, ids], dtype=np.float32).T.copy()
        if self.rows:
            codes = self._codes(self.table[ids])                                        # [T, H]
            return codes * np.repeat(np.asarray(self.scales[ids], dtype=np.float32), self.block, axis=1)
        if self.int4:
            packed = self.table[:, ids // 2]                              # [H, T]
            codes = self._signed(np.where(ids % 2 == 1, packed >> 4, packed & 0xF))
        else:
            codes = np.asarray(self.table[:, ids], dtype=np.float32)
        scales = np.repeat(np.asarray(self.scales[:, ids], dtype=np.float32), self.block, axis=0)
        return (codes * scales).T.copy()

    def _codes(self, packed_rows: np.ndarray) -> np.ndarray:
        """float32 code values of whole rows (INT4: two per byte, the first in the low nibble)."""
        if not self.int4:
            return np.asarray(packed_rows, dtype=np.float32) - self.zero_point
        nibbles = np.stack([packed_rows & 0xF, packed_rows >> 4], axis=-1).reshape(len(packed_rows), -1)
        return self._signed(nibbles)

    def _signed(self, nibbles: np.ndarray) -> np.ndarray:
        values = nibbles.astype(np.int8)
        if self.zero_point:
            return (values - np.int8(self.zero_point)).astype(np.float32)
        return np.where(values > 7, values - 16, values).astype(np.float32)


class FileRows:
    """Rows of an external initializer, read with pread as they are indexed (``rows[ids]``). A
    memory map would be counted in the process's memory for far more than the rows read: on Linux
    6.x a fault maps the whole large page-cache folio around it (~1 MB a token measured here), and
    one generation's lookups mapped nearly all of a 3B model's 0.2 GB head."""

    def __init__(self, path: Path, offset: int, shape: tuple[int, ...], dtype: np.dtype):
        self.file = open(path, "rb", buffering=0)
        self.offset, self.shape, self.dtype = offset, shape, np.dtype(dtype)
        self.row_bytes = int(np.prod(shape[1:])) * self.dtype.itemsize

    def __getitem__(self, ids) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.shape[0]):
            raise IndexError(f"row ids must lie in [0, {self.shape[0]}), got {ids.min()} .. {ids.max()}")
        out = np.empty((len(ids),) + self.shape[1:], self.dtype)
        buf = memoryview(out.reshape(-1).view(np.uint8))
        for i, row in enumerate(ids.tolist()):
            dst = buf[i * self.row_bytes:(i + 1) * self.row_bytes]
            if os.preadv(self.file.fileno(), [dst], self.offset + row * self.row_bytes) != self.row_bytes:
                raise OSError(f"{self.file.name}: short read of row {row}")
        return out


def _mapped(onnx_path: Path, tensor, rows: bool = False) -> np.ndarray | FileRows:
    """A read-only view of an initializer: from the proto when inline; when external, memory-
    mapped, or a `FileRows` reader with ``rows`` (only indexed by row). INT4 tensors come as uint8,
    two codes per byte along the last axis (flat when that axis is odd: ONNX packs the flattened
    tensor)."""
    import onnx
    from onnx import numpy_helper

    shape = tuple(int(d) for d in tensor.dims)
    int4 = onnx.TensorProto.DataType.Name(tensor.data_type) in _INT4_TYPES
    if int4:
        shape = shape[:-1] + (shape[-1] // 2,) if shape[-1] % 2 == 0 else (-(-int(np.prod(shape)) // 2),)
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return np.frombuffer(tensor.raw_data, dtype=np.uint8).reshape(shape) if int4 else numpy_helper.to_array(tensor)
    info = {e.key: e.value for e in tensor.external_data}
    if int4:
        dtype = np.dtype(np.uint8)
    else:
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).newbyteorder("<")
    path, offset = onnx_path.parent / info["location"], int(info.get("offset", 0))
    if rows:
        return FileRows(path, offset, shape, dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)
