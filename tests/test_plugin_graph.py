"""The TensorRT plugin graph, run on the CPU with the plugins' NumPy references, against the
standard graph it is derived from (which the other tests hold to transformers)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import edge_sdk
from edge_sdk.export.plugin_graph import RewriteError, write_plugin_graph
from edge_sdk.plugins import ops
from edge_sdk.plugins.reference import attention, int4_gemm
from edge_sdk.plugins.reference_backend import PluginGraphReference
from edge_sdk.quant.int4 import pack_int4, unpack_int4

N_NEW = 24  # with 40-token prompts the positions cross the 16/32/48 query-scale steps


def _pair(pkg):
    standard = edge_sdk.load(pkg, accuracy_level=0, graph="decoder")  # the standard graph, exact INT4 kernel
    plugin = PluginGraphReference(pkg, standard.manifest, graph=write_plugin_graph(pkg / "decoder.onnx"),
                                  max_context=128)
    return standard.backend, plugin


def _run(backend, prompt: list[int], chunks: tuple[int, ...], n_new: int, forced: list[int] | None = None):
    """Greedy tokens and every step's logits: the prompt fed in ``chunks`` (prefill, then
    prefill-with-past), then one decode step per token (``forced`` ones instead of greedy)."""
    cache, logits, pos = backend.new_cache(), [], 0
    for size in chunks:
        ids = prompt[pos:pos + size]
        out, cache = backend.forward(backend.embed(np.array(ids)), np.arange(pos, pos + len(ids)), cache)
        pos += len(ids)
    logits.append(out)
    tokens = []
    for _ in range(n_new):
        tokens.append(int(logits[-1].argmax()) if forced is None else forced[len(tokens)])
        out, cache = backend.forward(backend.embed(np.array([tokens[-1]])), np.array([pos]), cache)
        pos += 1
        logits.append(out)
    return tokens, np.stack(logits)


CASES = {
    # name: (shape, quant, device, recipe, logit tolerance relative to the largest logit)
    "float-text": ("text", "none", "cpu", {}, 1e-5),
    "int4-mm-tied": ("mm_tied", "int4", "cpu", dict(block_size=32), 1e-5),
    "int4-head-text": ("text", "int4", "cpu", dict(block_size=32, head="int4"), 1e-5),
    "fp8-text": ("text", "fp8", "cpu", {}, 1e-5),
    # float16, as a GPU profile exports it: both graphs round to fp16, in different places
    "int4-orin-fp16": ("mm_tied", "int4", "orin-nano-8gb", dict(block_size=32), 5e-3),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("prompt_len,chunks", [(1, (1,)), (12, (12,)), (40, (25, 15))])
def test_plugin_graph_matches_standard_graph(tiny_checkpoints, build_package, case, prompt_len, chunks):
    shape, quant, device, recipe, tol = CASES[case]
    # head_rows=False: a quantized head in the W^T form the plugin reads, as GPU profiles store it
    # (CPU profiles store it in ONNX Runtime's rows form)
    standard, plugin = _pair(build_package(tiny_checkpoints[shape], quant, device=device, head_rows=False, **recipe))
    prompt = [1] + [(37 * i) % 3000 + 1000 for i in range(prompt_len - 1)]
    want_tokens, want = _run(standard, prompt, chunks, N_NEW)
    _, got = _run(plugin, prompt, chunks, N_NEW, forced=want_tokens)  # same inputs at every step
    atol = tol * np.abs(want).max()
    np.testing.assert_allclose(got, want, atol=atol, rtol=0)
    # greedy picks agree wherever the standard graph's choice is clear by more than the tolerance
    top2 = np.sort(want, axis=-1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 2 * atol
    assert (got.argmax(-1) == want.argmax(-1))[clear].all()
    if device == "cpu":  # float32: free-running greedy decoding is identical
        assert _run(plugin, prompt, chunks, N_NEW)[0] == want_tokens


def test_rewrite_replaces_every_int4_linear_and_attention(tiny_checkpoints, build_package):
    pkg = build_package(tiny_checkpoints["text"], "int4", block_size=32, head="int4", head_rows=False)
    model = onnx.load(str(write_plugin_graph(pkg / "decoder.onnx")), load_external_data=False)
    layers = 2
    kinds = [n.op_type for n in model.graph.node]
    assert kinds.count(ops.INT4_GEMM) == 4 * layers + 1  # q/k/v, o, gate/up, down per layer + the head
    assert kinds.count(ops.ATTENTION) == layers
    assert "DequantizeLinear" not in kinds and "Softmax" not in kinds
    assert kinds.count("Concat") == 1  # the RoPE table's [freqs, freqs]; no cache is concatenated
    inits = {t.name: t for t in model.graph.initializer}
    qweights = [inits[n.input[1]] for n in model.graph.node if n.op_type == ops.INT4_GEMM]
    # the weights are the standard graph's bytes: same external file, no copy
    assert {d.value for t in qweights for d in t.external_data if d.key == "location"} == {"decoder.onnx.data"}
    assert not (pkg / "decoder.plugins.onnx.data").exists()
    names = [i.name for i in model.graph.input]
    assert ops.PAST_LENGTHS in names and not any(n.startswith("past_key") for n in names)
    assert [o.name for o in model.graph.output] == ["logits"] + [ops.cache_output(i) for i in range(layers)]


def test_rewrite_refuses_the_onnx_runtime_head_form(tiny_checkpoints, build_package):
    pkg = build_package(tiny_checkpoints["text"], "int4", block_size=32, head="int4")  # a CPU profile's package
    with pytest.raises(RewriteError, match=r"decoder\.onnx: lm_head\.qweight is in ONNX Runtime's rows form .* "
                                           r"build it for a TensorRT profile"):
        write_plugin_graph(pkg / "decoder.onnx")


def test_rewrite_refuses_a_graph_without_seams(tmp_path, tiny_checkpoints, build_package):
    pkg = build_package(tiny_checkpoints["text"], "int4", block_size=32)
    model = onnx.load(str(pkg / "decoder.onnx"), load_external_data=False)
    del model.metadata_props[:]
    bare = tmp_path / "decoder.onnx"
    onnx.save_model(model, str(bare))
    with pytest.raises(RewriteError, match=r"decoder\.onnx: no edge_sdk\.attention_seams metadata"):
        write_plugin_graph(bare)


# -- the references themselves, against plain formulas -------------------------------------------
def test_int4_gemm_reference_is_the_dequantized_matmul():
    rng = np.random.default_rng(0)
    k, n, group = 256, 48, 64
    codes = rng.integers(-8, 8, size=(k, n)).astype(np.int8)
    scales = rng.uniform(0.01, 0.1, size=(k // group, n)).astype(np.float32)
    packed = pack_int4(codes).view(np.int8)
    assert (unpack_int4(packed.view(np.uint8)) == codes).all()
    x = rng.standard_normal((3, k)).astype(np.float32)
    want = x @ (codes * np.repeat(scales, group, axis=0))
    np.testing.assert_allclose(int4_gemm(x, packed, scales, group), want, rtol=1e-5, atol=1e-5)


def test_attention_reference_per_sequence_lengths():
    """Two sequences with different cached lengths in one batch: each one equals its own naive
    attention over [its cache, the new tokens], and the cache beyond the new tokens is untouched."""
    rng = np.random.default_rng(1)
    h, kv, d, s, cap = 4, 2, 8, 3, 16
    qkv = rng.standard_normal((2, s, (h + 2 * kv) * d)).astype(np.float32)
    cache = rng.standard_normal((2, 2, kv, cap, d)).astype(np.float32)
    lengths = np.array([5, 0], np.int32)
    cos, sin = np.ones((2, s, d), np.float32), np.zeros((2, s, d), np.float32)  # identity rotation
    q_scale = np.full((2, s), d ** -0.5, np.float32)
    out, new = attention(qkv, cache, lengths, cos, sin, q_scale, num_q_heads=h, num_kv_heads=kv, head_size=d)
    for b, start in enumerate(lengths):
        q = qkv[b, :, : h * d].reshape(s, h, d) * d ** -0.5
        k_new = qkv[b, :, h * d:(h + kv) * d].reshape(s, kv, d)
        v_new = qkv[b, :, (h + kv) * d:].reshape(s, kv, d)
        keys = np.concatenate([cache[b, 0, :, :start], k_new.transpose(1, 0, 2)], axis=1)
        values = np.concatenate([cache[b, 1, :, :start], v_new.transpose(1, 0, 2)], axis=1)
        for t in range(s):
            for head in range(h):
                g = head // (h // kv)
                sc = keys[g, : start + t + 1] @ q[t, head]
                p = np.exp(sc - sc.max())
                p /= p.sum()
                np.testing.assert_allclose(out[b, t, head * d:(head + 1) * d], p @ values[g, : start + t + 1],
                                           rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(new[b, :, :, :start], cache[b, :, :, :start])
        np.testing.assert_array_equal(new[b, :, :, start + s:], cache[b, :, :, start + s:])
