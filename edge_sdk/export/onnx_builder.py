"""A thin helper for writing ONNX graphs node by node with `onnx.helper`.

The exporters build graphs from NumPy weights directly (no torch tracing), so what lands in the
file is exactly the op list we chose: basic ops that both ONNX Runtime and TensorRT 10.3's parser
accept. This class only removes the bookkeeping: unique names, initializers, typed I/O.

Weights stream to disk: a builder made with the graph's path writes every initializer over
`EXTERNAL_MIN_BYTES` to `<graph>.data` as soon as it is added (page-aligned, so runtimes can map
it) and keeps only its offset, so exporting a model never holds a second copy of its weights.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 21

ONNX_TYPES = {
    "float32": TensorProto.FLOAT,
    "float16": TensorProto.FLOAT16,
    "int64": TensorProto.INT64,
    "int32": TensorProto.INT32,
    "int8": TensorProto.INT8,
    "int4": TensorProto.INT4,
    "float8e4m3fn": TensorProto.FLOAT8E4M3FN,
    "bool": TensorProto.BOOL,
}


#: Initializers at least this big go to the external data file; smaller ones stay in the graph.
EXTERNAL_MIN_BYTES = 1024
_ALIGN = 4096


class GraphBuilder:
    """Collects nodes, initializers and I/O; `op()` returns the name of the op's output. With
    `path`, weights are written to `path.name + '.data'` as they come and `save()` finishes it."""

    def __init__(self, name: str, path: Path | None = None):
        self.name = name
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._count = 0
        self._consts: dict[tuple, str] = {}
        self.path = Path(path) if path is not None else None
        self._data = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._data = open(self.path.with_name(self.path.name + ".data"), "wb")

    def _fresh(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def input(self, name: str, dtype: str, shape: list) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, ONNX_TYPES[dtype], shape))
        return name

    def output(self, value: str, name: str, dtype: str, shape: list) -> None:
        """Expose `value` as graph output `name` (through an Identity when the names differ)."""
        if value != name:
            self.nodes.append(helper.make_node("Identity", [value], [name]))
        self.outputs.append(helper.make_tensor_value_info(name, ONNX_TYPES[dtype], shape))

    def weight(self, array: np.ndarray, name: str) -> str:
        """A named initializer (a model weight)."""
        array = np.asarray(array, order="C")  # (ascontiguousarray would make a 0-d array 1-d)
        if self._data is not None and array.nbytes >= EXTERNAL_MIN_BYTES:
            return self.raw(name, helper.np_dtype_to_tensor_dtype(array.dtype), array.shape, array.data)
        self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def raw(self, name: str, data_type: int, dims, data) -> str:
        """An initializer from its raw little-endian bytes (e.g. packed int4), streamed to the data file."""
        if self._data is None or len(memoryview(data).cast("B")) < EXTERNAL_MIN_BYTES:
            self.initializers.append(helper.make_tensor(name, data_type, dims, bytes(data), raw=True))
            return name
        f = self._data
        offset = -(-f.tell() // _ALIGN) * _ALIGN
        f.seek(offset)
        f.write(data)
        t = onnx.TensorProto(name=name, data_type=data_type, dims=list(dims), data_location=onnx.TensorProto.EXTERNAL)
        for key, value in (("location", Path(f.name).name), ("offset", str(offset)), ("length", str(f.tell() - offset))):
            t.external_data.add(key=key, value=value)
        self.initializers.append(t)
        return name

    def tensor(self, proto: onnx.TensorProto) -> str:
        """An initializer already in ONNX form (e.g. one that points into another graph's data)."""
        self.initializers.append(proto)
        return proto.name

    def const(self, value, dtype=np.int64) -> str:
        """A small constant, deduplicated by value."""
        array = np.asarray(value, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._consts:
            self._consts[key] = self.weight(array, self._fresh("const"))
        return self._consts[key]

    def op(self, op_type: str, *inputs: str, name: str | None = None, **attrs) -> str:
        out = name or self._fresh(op_type.lower())
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], **attrs))
        return out

    def ops(self, op_type: str, *inputs: str, n_outputs: int, **attrs) -> list[str]:
        outs = [self._fresh(op_type.lower()) for _ in range(n_outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, **attrs))
        return outs

    def model(self) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                  producer_name="edge_sdk")
        model.ir_version = 10  # opset 21 needs IR 10; ONNX Runtime and TensorRT 10.x read it
        return model

    def save(self, metadata: dict | None = None) -> Path:
        """Close the data file (removed if nothing went to it), write the graph, check it."""
        if self.path is None:
            raise ValueError("this GraphBuilder was made without a path")
        model = self.model()
        if metadata:
            helper.set_model_props(model, {k: str(v) for k, v in metadata.items()})
        self._data.close()
        data = Path(self._data.name)
        if data.stat().st_size == 0:
            data.unlink()
        onnx.save_model(model, self.path)
        onnx.checker.check_model(str(self.path))
        return self.path
