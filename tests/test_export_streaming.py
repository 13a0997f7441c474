"""The exporter streams weights: every large initializer is written to the graph's .data file as
it is added (page-aligned, so runtimes can map it) and the graph keeps only its offset."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto

from edge_sdk.export.onnx_builder import EXTERNAL_MIN_BYTES, GraphBuilder


def test_weights_go_to_disk_as_they_are_added(tmp_path):
    g = GraphBuilder("g", tmp_path / "m.onnx")
    x = g.input("x", "float32", [1, 64])
    big = np.random.default_rng(0).standard_normal((64, 300)).astype(np.float32)
    w = g.weight(big, "w")
    assert g.initializers[-1].data_location == TensorProto.EXTERNAL and not g.initializers[-1].raw_data
    assert (tmp_path / "m.onnx.data").stat().st_size >= big.nbytes  # already on disk
    small = g.const([1.0, 2.0], np.float32)
    assert g.initializers[-1].data_location != TensorProto.EXTERNAL and np.zeros(2).nbytes < EXTERNAL_MIN_BYTES
    g.output(g.op("Mul", g.op("MatMul", x, w), g.op("ReduceSum", small, keepdims=0)), "y", "float32", [1, 300])
    path = g.save()
    model = onnx.load(str(path), load_external_data=False)
    offsets = [int(e.value) for t in model.graph.initializer for e in t.external_data if e.key == "offset"]
    assert offsets and all(o % 4096 == 0 for o in offsets)
    xin = np.ones((1, 64), np.float32)
    y = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": xin})[0]
    np.testing.assert_allclose(y, xin @ big * 3.0, rtol=1e-5, atol=1e-4)  # summation order


def test_a_graph_without_large_weights_has_no_data_file(tmp_path):
    g = GraphBuilder("g", tmp_path / "s.onnx")
    x = g.input("x", "float32", [2])
    g.output(g.op("Add", x, g.const([1.0, 1.0], np.float32)), "y", "float32", [2])
    g.save()
    assert not (tmp_path / "s.onnx.data").exists()
