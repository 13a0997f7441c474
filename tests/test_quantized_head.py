"""The quantized LM head and token table: the engine matches its own dequantized reference at
the INT4 engines' tolerance, the head is in the rows form that the CPU graph runs as one
MatMulNBits over the same bytes (GPU profiles keep the W^T DequantizeLinear -> MatMul that the
TensorRT plugin reads, tests/test_plugin_graph.py), a tied model stores the matrix once, and
the build reports the head's agreement with the float head."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import edge_sdk
from edge_sdk.models.checkpoint import open_checkpoint
from edge_sdk.quant import QuantRecipe, quantize
from test_foundation import PROMPT, engine_logits
from test_quantized_engines import N_NEW, reference_greedy

TOL = 2e-4  # as for the INT4 engines (tests/test_quantized_engines.py)


@pytest.mark.parametrize("head", ["int4", "int8", "float"])
@pytest.mark.parametrize("shape", ["text", "mm_tied"])
def test_head_engine_matches_dequantized_reference(tiny_checkpoints, build_package, head, shape):
    ckpt_dir = tiny_checkpoints[shape]
    ckpt = open_checkpoint(ckpt_dir)
    pkg = build_package(ckpt_dir, "int4", block_size=32, head=head)
    model = edge_sdk.load(pkg, accuracy_level=0, kv_cache="float32")
    qm = quantize(ckpt, QuantRecipe(method="int4", block_size=32, head=head), encode=model.tokenizer.encode,
                  progress=False)
    tokens, ref_logits = reference_greedy(qm, ckpt.config.text, PROMPT, N_NEW)
    np.testing.assert_allclose(engine_logits(model, PROMPT + tokens), ref_logits, atol=TOL, rtol=0)
    assert model.generate(PROMPT, max_tokens=N_NEW).tokens == tokens

    graph = onnx.load(str(pkg / "decoder.onnx"), load_external_data=False).graph
    inits = {t.name: t for t in graph.initializer}
    if head == "float":
        assert qm.head is None and "head_report" not in model.manifest.extra
        assert inits["lm_head.weight_t"].data_type == onnx.TensorProto.FLOAT
        return
    _assert_rows_head(pkg, inits, bits=4 if head == "int4" else 8)
    rep = model.manifest.extra["head_report"]
    assert rep["format"] == head and 0 <= rep["top1_agreement"] <= 1 and rep["tokens"] > 0
    print(f"{shape} {head} head: top-1 agreement {rep['top1_agreement']:.3f}, "
          f"logit error {rep['rel_logit_error']:.3f} std, SQNR {rep['sqnr_db']:.1f} dB")
    tied = shape == "mm_tied"
    assert (qm.embedding is qm.head) == tied
    assert (pkg / "embed.onnx.data").exists() != tied  # tied: the table is the decoder's head


def _assert_rows_head(pkg, inits, bits):
    """decoder.onnx: W [vocab, hidden] uint4/uint8 -> DequantizeLinear(axis 1) -> Transpose ->
    MatMul; decoder.cpu.onnx: one MatMulNBits whose weight is those very bytes of decoder.onnx.data."""
    weight = inits["lm_head.qweight"]
    assert weight.data_type == (onnx.TensorProto.UINT4 if bits == 4 else onnx.TensorProto.UINT8)
    assert weight.data_location == onnx.TensorProto.EXTERNAL
    cpu = onnx.load(str(pkg / "decoder.cpu.onnx"), load_external_data=False).graph
    cpu_inits = {t.name: t for t in cpu.initializer}
    nbits = [n for n in cpu.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 1
    assert not any(n.op_type == "DequantizeLinear" and n.input[0] == "lm_head.qweight" for n in cpu.node)
    view = cpu_inits[nbits[0].input[1]]
    assert {e.key: e.value for e in view.external_data} == {e.key: e.value for e in weight.external_data}
    n, k = weight.dims
    block = next(a.i for a in nbits[0].attribute if a.name == "block_size")
    assert list(view.dims) == [n, k // block, block * bits // 8]
    assert next(a.i for a in nbits[0].attribute if a.name == "bits") == bits


def test_int8_head_agrees_more_and_auto_picks_by_agreement(tiny_checkpoints, build_package):
    ckpt_dir = tiny_checkpoints["text"]
    reports = {h: edge_sdk.load(build_package(ckpt_dir, "int4", block_size=32, head=h)).manifest.extra["head_report"]
               for h in ("int4", "int8", "auto")}
    assert reports["int8"]["sqnr_db"] > reports["int4"]["sqnr_db"] + 15
    assert reports["int8"]["top1_agreement"] >= reports["int4"]["top1_agreement"]
    assert reports["int8"]["rel_logit_error"] < reports["int4"]["rel_logit_error"]
    from edge_sdk.quant.quantize import AUTO_HEAD_MIN_TOP1

    expect = "int4" if reports["int4"]["top1_agreement"] >= AUTO_HEAD_MIN_TOP1 else "int8"
    assert reports["auto"]["format"] == expect
    assert (reports["auto"]["why"] != "") == (expect == "int8")
