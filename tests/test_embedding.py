"""The host-side embedding lookup (runtime/embedding.py) against the table the exporter wrote:
float and INT4, separate and shared with a tied head, float32 and float16 graphs; and ONNX
Runtime running embed.onnx itself agrees (the graph states what the lookup computes)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from edge_sdk.export.decoder import export_embedding
from edge_sdk.quant.int4 import quantize_int4
from edge_sdk.runtime.embedding import EmbeddingTable

IDS = np.array([0, 1, 2, 7, 299, 150, 1, 298])


def _ort_rows(path, ids):
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return s.run(None, {"input_ids": ids.reshape(1, -1)})[0][0].astype(np.float32)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_float_table(tmp_path, dtype):
    embed = np.random.default_rng(1).standard_normal((300, 16)).astype(np.float32)
    path = export_embedding(embed, tmp_path, dtype)
    table = EmbeddingTable.open(path)
    assert isinstance(table.table, np.memmap)
    want = embed.astype(dtype).astype(np.float32)[IDS]
    np.testing.assert_array_equal(table.lookup(IDS), want)
    np.testing.assert_array_equal(_ort_rows(path, IDS), want)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_int4_table_dequantizes_only_the_rows(tmp_path, dtype):
    lin = quantize_int4(np.random.default_rng(2).standard_normal((300, 64)).astype(np.float32), 32)
    path = export_embedding(lin, tmp_path, dtype)
    table = EmbeddingTable.open(path)
    assert table.int4 and isinstance(table.table, np.memmap) and table.table.nbytes == 300 * 64 // 2
    scales = lin.scales.astype(dtype).astype(np.float32)
    want = (lin.q.reshape(300, 2, 32) * scales[:, :, None]).reshape(300, 64)[IDS]
    np.testing.assert_array_equal(table.lookup(IDS), want)
    # the graph's DequantizeLinear rounds q * s to its dtype once, as the cast of the rows does
    np.testing.assert_array_equal(_ort_rows(path, IDS), want.astype(dtype).astype(np.float32))


@pytest.mark.parametrize("head", ["auto", "int4"])  # auto picks INT8 here
def test_tied_table_is_the_decoder_head(tiny_checkpoints, build_package, head):
    """A tied checkpoint's package stores the quantized head once: embed.onnx has no data of its
    own and its table is the decoder's head, whose rows the lookup returns, as ONNX Runtime
    running embed.onnx does."""
    import onnx

    pkg = build_package(tiny_checkpoints["mm_tied"], "int4", block_size=32, head=head)
    assert not (pkg / "embed.onnx.data").exists()
    embed = onnx.load(str(pkg / "embed.onnx"), load_external_data=False)
    assert {e.value for t in embed.graph.initializer for e in t.external_data if e.key == "location"} == \
        {"decoder.onnx.data"}
    from edge_sdk.models.checkpoint import open_checkpoint
    from edge_sdk.quant import QuantRecipe, quantize

    qm = quantize(open_checkpoint(tiny_checkpoints["mm_tied"]), QuantRecipe(method="int4", block_size=32, head=head),
                  progress=False)
    assert qm.embedding is qm.head
    ids = np.arange(0, qm.config.text.vocab_size, 97)
    table = EmbeddingTable.open(pkg / "embed.onnx")
    assert table.rows  # a CPU profile's quantized head is in the rows form
    np.testing.assert_array_equal(table.lookup(ids), qm.tensors["embed_tokens.weight"][ids])
    np.testing.assert_array_equal(_ort_rows(pkg / "embed.onnx", ids), qm.tensors["embed_tokens.weight"][ids])


def test_rows_table_lookups_map_nothing_of_the_file(tiny_checkpoints, build_package):
    """A rows-form table is read with pread: however many tokens are looked up, no page of the
    weights file is mapped into the process (mapped lookups made a 3B head's 0.2 GB resident)."""
    pkg = build_package(tiny_checkpoints["mm_tied"], "int4", block_size=32, head="int4")
    table = EmbeddingTable.open(pkg / "embed.onnx")
    vocab = table.table.shape[0]
    got = np.concatenate([table.lookup(ids) for ids in np.array_split(np.arange(vocab), 7)])
    with open("/proc/self/maps") as maps:  # a NumPy memmap of the file would show as r--s (ONNX Runtime's are private)
        assert not [line for line in maps if str(pkg / "decoder.onnx.data") in line and " r--s " in line]
    assert got.shape[0] == vocab
    np.testing.assert_array_equal(got[IDS], table.lookup(IDS))
    with pytest.raises(IndexError, match=f"row ids must lie in \\[0, {vocab}\\)"):
        table.lookup([vocab])
