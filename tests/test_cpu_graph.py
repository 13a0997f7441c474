"""The CPU graph (grouped attention over preallocated KV buffers, nothing concatenated) against
the standard graph it is derived from: same logits and greedy tokens over a long generation that
crosses the query-scale steps, through chunked prefill and several regrowths of the buffers."""

from __future__ import annotations

import numpy as np
import pytest

import edge_sdk
from edge_sdk.runtime import onnxruntime as ort_backend
from edge_sdk.runtime.types import ContextOverflowError

N_NEW = 60  # positions 12 .. 72: past the 16/32/48/64 query-scale steps of the tiny config


@pytest.mark.parametrize("quant,recipe", [("none", {}), ("int4", dict(block_size=32)), ("fp8", {}),
                                          ("int4", dict(block_size=32, head="int4"))])  # + the MatMulNBits head
def test_cpu_graph_matches_standard_graph(tiny_checkpoints, build_package, monkeypatch, quant, recipe):
    monkeypatch.setattr(ort_backend, "CAPACITY_STEP", 16)  # 16 -> 32 -> ... -> 80 within the run
    monkeypatch.setattr(ort_backend, "PREFILL_CHUNK", 3)  # the 7- and 5-token prefills run as 3 + 3 + 1, 3 + 2
    pkg = build_package(tiny_checkpoints["mm_tied"], quant, **recipe)
    fused = edge_sdk.load(pkg, accuracy_level=0)
    standard = edge_sdk.load(pkg, accuracy_level=0, graph="decoder")
    assert fused.backend.in_place and not standard.backend.in_place
    prompt = [1, 3, 1091, 1500, 2041, 1201, 3333, 1044, 4, 1600, 1200, 1300]
    runs = []
    for backend in (fused.backend, standard.backend):
        cache = backend.new_cache()
        logits, cache = backend.forward(backend.embed(np.array(prompt[:7])), np.arange(7), cache)
        logits, cache = backend.forward(backend.embed(np.array(prompt[7:])), np.arange(7, 12), cache)
        tokens, steps = [], [logits]
        for pos in range(12, 12 + N_NEW):
            tokens.append(int(steps[-1].argmax()))
            logits, cache = backend.forward(backend.embed(np.array([tokens[-1]])), np.array([pos]), cache)
            steps.append(logits)
        runs.append((tokens, np.stack(steps), cache))
    (got_tokens, got, cache), (want_tokens, want, _) = runs
    assert got_tokens == want_tokens
    np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max(), rtol=0)
    assert cache.length == 12 + N_NEW and cache.capacity == 80
    head = fused.manifest.extra.get("head_report", {}).get("format")  # int4 / int8: in the rows form
    _assert_fused(pkg, layers=fused.manifest.model.text.num_layers, rows_head=head in ("int4", "int8"))


def _assert_fused(pkg, layers: int, rows_head: bool):
    """What the rewrite fuses: every residual Add with the RMSNorm after it (all but the first
    layer's input norm and the final norm, which read no residual Add), the query scale into q's
    RoPE caches, and a rows-form head into one MatMulNBits."""
    import json

    import onnx

    graph = onnx.load(str(pkg / "decoder.cpu.onnx"), load_external_data=False)
    summary = json.loads({p.key: p.value for p in graph.metadata_props}["edge_sdk.rewrite"])
    assert summary["skip_norms"] == 2 * layers - 1
    assert summary["matmul_nbits_head"] == rows_head
    kinds = [n.op_type for n in graph.graph.node]
    assert kinds.count("SkipSimplifiedLayerNormalization") == 2 * layers - 1
    rotated_q = {n.output[0] for n in graph.graph.node if n.op_type == "RotaryEmbedding"}
    assert not [n for n in graph.graph.node if n.op_type == "Mul" and set(n.input) & rotated_q]


def test_cpu_graph_cache_stops_at_the_context(tiny_checkpoints, build_package):
    backend = edge_sdk.load(build_package(tiny_checkpoints["mm_tied"], "none")).backend
    cache = backend.new_cache()
    ctx = backend.context_length
    _, cache = backend.forward(backend.embed(np.arange(ctx - 1)), np.arange(ctx - 1), cache)
    assert cache.capacity == ctx
    with pytest.raises(ContextOverflowError, match=f"{ctx - 1} cached \\+ 2 new tokens exceed the context"):
        backend.forward(backend.embed(np.arange(2)), np.arange(ctx - 1, ctx + 1), cache)


def test_a_package_with_an_older_cpu_graph_runs_its_standard_graph(tiny_checkpoints, build_package, tmp_path, caplog):
    """An older release's decoder.cpu.onnx (fused attention writing present_* in place) is not
    driven by this runtime: the backend says so and runs decoder.onnx, with the same tokens."""
    import shutil

    import onnx

    pkg = tmp_path / "pkg"
    shutil.copytree(build_package(tiny_checkpoints["mm_tied"], "none"), pkg)
    graph = onnx.load(str(pkg / "decoder.cpu.onnx"), load_external_data=False)
    renames = {o.name: o.name.replace("new_", "present_") for o in graph.graph.output}
    for node in graph.graph.node:
        node.output[:] = [renames.get(o, o) for o in node.output]
        node.input[:] = [renames.get(i, i) for i in node.input]
    for o in graph.graph.output:
        o.name = renames[o.name]
    onnx.save(graph, str(pkg / "decoder.cpu.onnx"))
    old = edge_sdk.load(pkg, verify=False)
    assert not old.backend.in_place and "from an older edge_sdk" in caplog.text
    want = edge_sdk.load(pkg, verify=False, graph="decoder").generate([1, 3, 1091, 1500], max_tokens=6).tokens
    assert old.generate([1, 3, 1091, 1500], max_tokens=6).tokens == want
