"""The linear kernel (runtime/linear.py over csrc/linear.c), the quantized head's product, against
two oracles on the same bytes: ONNX Runtime's own MatMulNBits at accuracy level 4 (what the
graph's head computes, int8 products as here), and the definition in float64 over the
dequantized weight, from which the two differ by the int8 rounding of x per block.

Shapes cover what the packed layout must get right: rows that are not whole 32-row pairs (the
padding dropped), one and several blocks per row, INT4's two nibbles, float16 and float32
scales, one thread and two, one token (decode) and several (prefill: each quantized on its
own)."""

from __future__ import annotations

import numpy as np
import pytest

from edge_sdk.runtime import kernels, linear

library = kernels.load()
pytestmark = pytest.mark.skipif(not linear.available(library), reason="this CPU has no AVX-512 VNNI")


def _weight(bits, rows, cols, block, scale_dtype, rng):
    codes = rng.integers(0, 256, size=(rows, cols * bits // 8), dtype=np.uint8)
    scales = rng.uniform(1e-3, 2e-2, (rows, cols // block)).astype(scale_dtype)
    return codes, scales


def _dequantized(bits, codes, scales, block):
    rows = codes.shape[0]
    if bits == 4:  # input 2i in the low nibble of byte i, zero point 8
        q = np.stack([codes & 15, codes >> 4], axis=-1).reshape(rows, -1).astype(np.float64) - 8
    else:
        q = codes.astype(np.float64) - 128
    blocks = q.reshape(rows, -1, block) * scales.astype(np.float64)[:, :, None]
    return blocks.reshape(rows, -1)


def _matmul_nbits(bits, codes, scales, block, x):
    """ONNX Runtime's MatMulNBits over the same bytes, accuracy level 4: x [tokens, cols]."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rows, cols = codes.shape[0], x.shape[-1]
    node = helper.make_node("MatMulNBits", ["x", "w", "s"], ["y"], domain="com.microsoft", K=cols, N=rows,
                            bits=bits, block_size=block, accuracy_level=4)
    graph = helper.make_graph([node], "head", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["tokens", cols])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["tokens", rows])],
                              [numpy_helper.from_array(codes.reshape(rows, cols // block, -1), "w"),
                               numpy_helper.from_array(scales.reshape(-1).astype(np.float32), "s")])  # its scales: x's type
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x.reshape(-1, cols)})[0].reshape(*x.shape[:-1], rows)


@pytest.mark.parametrize("threads,tokens", [(1, 1), (2, 1), (2, 5)])
@pytest.mark.parametrize("bits,rows,cols,block,scale_dtype", [
    (4, 1000, 256, 32, np.float16),    # 31 whole pairs and 8 rows of a padded one; 8 blocks
    (4, 4128, 384, 128, np.float32),   # 129 pairs: past one unit of 16 pairs, over threads; 3 blocks
    (8, 77, 128, 64, np.float16),      # INT8: 2 blocks, a padded last pair
    (8, 2048, 3072, 128, np.float32),  # INT8 at Ministral 3's hidden size: 24 blocks, threads share it
])
def test_the_product_matches_matmul_nbits_and_the_definition(bits, rows, cols, block, scale_dtype, threads, tokens):
    rng = np.random.default_rng(rows + bits)
    codes, scales = _weight(bits, rows, cols, block, scale_dtype, rng)
    kernel = linear.LinearKernel(library, linear.QuantizedWeight(bits, block, rows, cols,
                                                                 lambda r0, r1: (codes[r0:r1], scales[r0:r1])), threads)
    x = rng.standard_normal((tokens, cols)).astype(np.float32)
    x[:, :block] *= 20  # one block with a larger scale than the others: each block is quantized on its own
    x[-1] *= 50  # and one token larger than the others: each token too
    out = np.full((tokens, rows), np.nan, np.float32)
    kernel(x, out)
    ort_out = _matmul_nbits(bits, codes, scales, block, x)
    exact = x.astype(np.float64) @ _dequantized(bits, codes, scales, block).T
    top = np.abs(exact).max()
    # the same int8 products as MatMulNBits: apart only by float32 summation order (measured 1e-7)
    for token in range(tokens):  # each against its own largest value
        top = np.abs(exact[token]).max()
        np.testing.assert_allclose(out[token], ort_out[token], atol=1e-5 * top, rtol=0)
        # x's int8 rounding per block, against the definition (measured 4.2e-3 to 8.0e-3); a kernel
        # that skipped a block's zero point or scale would miss by ~1
        assert np.abs(out[token] - exact[token]).max() < 2e-2 * top


def test_the_weights_are_read_in_pieces_and_bad_input_is_refused(monkeypatch):
    """Packing reads the weight a range of rows at a time (the head is never resident twice), and
    every range counts; shapes and dtypes the kernel cannot take are refused with the reason."""
    rng = np.random.default_rng(7)
    rows, cols, block = 100, 64, 32
    codes, scales = _weight(4, rows, cols, block, np.float32, rng)
    ranges = []

    def read_rows(r0, r1):
        ranges.append((r0, r1))
        return codes[r0:r1], scales[r0:r1]

    monkeypatch.setattr(linear, "PACK_ROWS", 48)
    kernel = linear.LinearKernel(library, linear.QuantizedWeight(4, block, rows, cols, read_rows), 1)
    assert ranges == [(0, 48), (48, 96), (96, 100)]
    x = rng.standard_normal(cols).astype(np.float32)
    out = np.empty(rows, np.float32)
    kernel(x, out)
    np.testing.assert_allclose(out, _matmul_nbits(4, codes, scales, block, x[None])[0],
                               atol=1e-5 * np.abs(out).max(), rtol=0)

    with pytest.raises(ValueError, match="x must be 64 C-contiguous float32 values, not 64 float64"):
        kernel(x.astype(np.float64), out)
    with pytest.raises(ValueError, match="x must be .* \\(strided\\)"):
        kernel(np.repeat(x, 2)[::2], out)
    with pytest.raises(ValueError, match="out must be 100"):
        kernel(x, np.empty(99, np.float32))
    with pytest.raises(ValueError, match="not 4-bit blocks of 16"):
        linear.LinearKernel(library, linear.QuantizedWeight(4, 16, rows, cols, read_rows), 1)
    with pytest.raises(ValueError, match="do not fit a 4-bit"):
        linear.LinearKernel(library, linear.QuantizedWeight(4, block, rows, cols,
                                                            lambda r0, r1: (codes[r0:r1, :-1], scales[r0:r1])), 1)
    with pytest.raises(ValueError, match="float16 or float32, not float64"):
        linear.LinearKernel(library, linear.QuantizedWeight(4, block, rows, cols,
                                                            lambda r0, r1: (codes[r0:r1], scales[r0:r1].astype(float))), 1)
