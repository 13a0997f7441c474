"""NumPy arrays bound once to an ONNX Runtime IO binding: a step that reuses them copies its
inputs into the arrays and reads its outputs from them, with no feeds, output allocations or
conversions per run (runtime/onnxruntime.py's whole CPU graph, runtime/segments.py's pieces)."""

from __future__ import annotations

import numpy as np


def bind_arrays(session, inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> tuple[object, list]:
    """(the binding, the OrtValues over the arrays: keep them alive as long as the binding)."""
    import onnxruntime as ort

    binding, values = session.io_binding(), []
    for arrays, bind in ((inputs, binding.bind_ortvalue_input), (outputs, binding.bind_ortvalue_output)):
        for name, array in arrays.items():
            values.append(ort.OrtValue.ortvalue_from_numpy(array))
            bind(name, values[-1])
    return binding, values
