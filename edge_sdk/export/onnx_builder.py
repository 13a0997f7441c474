"""A thin helper for writing ONNX graphs node by node with `onnx.helper`.

The exporters build graphs from NumPy weights directly (no torch tracing), so what lands in the
file is exactly the op list we chose: basic ops that both ONNX Runtime and TensorRT 10.3's parser
accept. This class only removes the bookkeeping: unique names, initializers, typed I/O.
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


class GraphBuilder:
    """Collects nodes, initializers and I/O; `op()` returns the name of the op's output."""

    def __init__(self, name: str):
        self.name = name
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._count = 0
        self._consts: dict[tuple, str] = {}

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
        self.initializers.append(numpy_helper.from_array(np.array(array, order="C"), name))
        return name

    def tensor(self, proto: onnx.TensorProto) -> str:
        """An initializer already in ONNX form (e.g. packed int4)."""
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


def save(model: onnx.ModelProto, path: Path) -> Path:
    """Write `path` with all weights in one external file `path.name + '.data'` (none when the
    graph's large tensors already live in another graph's file), then check it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = path.with_name(path.name + ".data")
    if data.exists():
        data.unlink()
    inline = [t for t in model.graph.initializer if t.data_location != TensorProto.EXTERNAL]
    if any(t.ByteSize() > 1024 for t in inline):
        onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024)
    else:
        onnx.save_model(model, path)
    onnx.checker.check_model(str(path))
    return path
