"""Token embeddings on the host: the rows a prompt needs, read from embed.onnx's table.

The table has the LM head's form, W^T [hidden, vocab], float or INT4 / INT8 with block scales (for a
tied model it is the decoder's head itself, stored once). It is memory-mapped from the external
data, so a lookup touches only the bytes of the looked-up columns and nothing is dequantized but
them; both backends use it (ONNX Runtime would dequantize the whole table to run embed.onnx).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


class EmbeddingTable:
    def __init__(self, table: np.ndarray, scales: np.ndarray | None = None, block: int | None = None,
                 int4: bool = False, rows: bool = False):
        self.table = table      # float [H, V] (or [V, H] with `rows`), int8 [H, V], or uint8 [H, V/2] of INT4 codes
        self.scales = scales    # [H / block, V] for int8 / INT4 tables
        self.block = block
        self.int4 = int4
        self.rows = rows

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
        if dq is None:
            if gather.input[0] not in inits:
                raise ValueError(f"{onnx_path}: the Gather does not read a table")
            axis = next((a.i for a in gather.attribute if a.name == "axis"), 0)
            return cls(_mapped(onnx_path, inits[gather.input[0]]), rows=axis == 0)
        block = next(a.i for a in dq.attribute if a.name == "block_size")
        table = inits[dq.input[0]]
        return cls(_mapped(onnx_path, table), _mapped(onnx_path, inits[dq.input[1]]), block,
                   int4=table.data_type == onnx.TensorProto.INT4)

    def lookup(self, ids) -> np.ndarray:
        """float32 [T, hidden] for token ids [T]."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if self.scales is None:
            if self.rows:
                return np.asarray(self.table[ids], dtype=np.float32)
            return np.asarray(self.table[:, ids], dtype=np.float32).T.copy()
        if self.int4:
            packed = self.table[:, ids // 2]                              # [H, T]
            codes = np.where(ids % 2 == 1, packed >> 4, packed & 0xF).astype(np.int8)
            codes = np.where(codes > 7, codes - 16, codes).astype(np.float32)
        else:
            codes = np.asarray(self.table[:, ids], dtype=np.float32)
        scales = np.repeat(np.asarray(self.scales[:, ids], dtype=np.float32), self.block, axis=0)
        return (codes * scales).T.copy()


def _mapped(onnx_path: Path, tensor) -> np.ndarray:
    """A read-only view of an initializer: memory-mapped when external, else from the proto."""
    import onnx
    from onnx import numpy_helper

    shape = tuple(int(d) for d in tensor.dims)
    int4 = tensor.data_type == onnx.TensorProto.INT4
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        if int4:
            raise ValueError(f"{onnx_path}: inline INT4 table {tensor.name} (the exporter writes it externally)")
        return numpy_helper.to_array(tensor)
    info = {e.key: e.value for e in tensor.external_data}
    if int4:
        if shape[-1] % 2:
            raise ValueError(f"{onnx_path}: INT4 table {tensor.name} of shape {shape}: the vocabulary must be even")
        dtype, shape = np.dtype(np.uint8), shape[:-1] + (shape[-1] // 2,)
    else:
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).newbyteorder("<")
    return np.memmap(onnx_path.parent / info["location"], dtype=dtype, mode="r",
                     offset=int(info.get("offset", 0)), shape=shape)
