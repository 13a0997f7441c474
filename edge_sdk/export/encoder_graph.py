"""What the encoder exports (vision.onnx, audio.onnx) share: weights in the compute dtype, linears
stored transposed, GELU and the norms from basic ops, statistics in float32 whatever the dtype."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping

import numpy as np
from onnx import TensorProto

from .onnx_builder import GraphBuilder


def np_dtype(dtype: str):
    try:
        return {"float32": np.float32, "float16": np.float16}[dtype]
    except KeyError:
        raise ValueError(f"encoder export dtype must be float32 or float16, got {dtype!r}") from None


class EncoderGraph:
    """A GraphBuilder plus the weights by canonical name, and the layers encoders are made of."""

    def __init__(self, weights: Mapping[str, np.ndarray], name: str, path: Path, dtype: str = "float32"):
        self.w = weights
        self.dtype = dtype
        self.np_dtype = np_dtype(dtype)
        self.onnx_dtype = TensorProto.FLOAT if dtype == "float32" else TensorProto.FLOAT16
        self.g = GraphBuilder(name, path)

    def _get(self, name: str) -> np.ndarray:
        return np.asarray(self.w[name], dtype=np.float32)

    def _has(self, name: str) -> bool:
        try:
            return name in self.w
        except TypeError:
            return False

    def _to_compute(self, x: str) -> str:
        return x if self.dtype == "float32" else self.g.op("Cast", x, to=self.onnx_dtype)

    def _to_f32(self, x: str) -> str:
        return x if self.dtype == "float32" else self.g.op("Cast", x, to=TensorProto.FLOAT)

    def _scalar(self, value: float) -> str:
        return self.g.const(value, self.np_dtype)

    def _param(self, array: np.ndarray, name: str) -> str:
        return self.g.weight(np.ascontiguousarray(array, dtype=self.np_dtype), name)

    def _linear(self, x: str, name: str, weight: np.ndarray | None = None) -> str:
        """x @ W.T (+ bias), W [out, in] stored transposed as `name.weight_t`."""
        w = self._get(name + ".weight") if weight is None else weight
        y = self.g.op("MatMul", x, self._param(w.T, name + ".weight_t"))
        if self._has(name + ".bias"):
            y = self.g.op("Add", y, self._param(self._get(name + ".bias"), name + ".bias"))
        return y

    def _rms_norm(self, x: str, weight_name: str, eps: float) -> str:
        g = self.g
        x32 = self._to_f32(x)
        var = g.op("ReduceMean", g.op("Mul", x32, x32), g.const([-1]), keepdims=1)
        inv = g.op("Reciprocal", g.op("Sqrt", g.op("Add", var, g.const(eps, np.float32))))
        normed = self._to_compute(g.op("Mul", x32, inv))
        return g.op("Mul", normed, self._param(self._get(weight_name), weight_name))

    def _layer_norm(self, x: str, name: str, eps: float) -> str:
        """LayerNorm with weight and bias (`name.weight`, `name.bias`), statistics in float32."""
        g = self.g
        x32 = self._to_f32(x)
        centred = g.op("Sub", x32, g.op("ReduceMean", x32, g.const([-1]), keepdims=1))
        var = g.op("ReduceMean", g.op("Mul", centred, centred), g.const([-1]), keepdims=1)
        inv = g.op("Reciprocal", g.op("Sqrt", g.op("Add", var, g.const(eps, np.float32))))
        normed = self._to_compute(g.op("Mul", centred, inv))
        scaled = g.op("Mul", normed, self._param(self._get(name + ".weight"), name + ".weight"))
        return g.op("Add", scaled, self._param(self._get(name + ".bias"), name + ".bias"))

    def _gelu(self, x: str) -> str:
        """Exact (erf) GELU."""
        g = self.g
        e = g.op("Erf", g.op("Mul", x, self._scalar(1.0 / math.sqrt(2.0))))
        return g.op("Mul", g.op("Mul", x, self._scalar(0.5)), g.op("Add", e, self._scalar(1.0)))
