"""The CPU graph: decoder.onnx with each attention block replaced by ONNX Runtime's fused
``com.microsoft.GroupQueryAttention``, over KV buffers the backend preallocates and ONNX Runtime
writes in place (the same buffer bound as past and present: no per-step copy of the cache).

Derived from the standard graph like the TensorRT plugin graph (same seams, same weights file);
the standard graph stays what TensorRT parses and what is checked against transformers, and this
one is checked against it. Linears are untouched (ONNX Runtime fuses INT4 DequantizeLinear ->
MatMul into MatMulNBits itself).

- RoPE: GroupQueryAttention rotates q and k from cos/sin caches indexed by position; the caches
  are the exporter's tables (YaRN attention factor included) for positions 0 .. context - 1.
- The Llama-4 query scale depends on the position; rotation is linear, so q is scaled before
  the op and the op's own scale is 1.
- I/O: ``past_lengths`` int32 [batch]; ``past_key.{i}``/``past_value.{i}`` and
  ``present_key.{i}``/``present_value.{i}`` [batch, kv_heads, cache_seq, head_dim], bound to one
  buffer each (runtime/onnxruntime.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from ..models.config import TextConfig
from ..models.ministral3 import rope_cos_sin
from ..plugins import ops
from .graph_rewrite import Graph, beside, expanded_q_scale, load_decoder, save_rewritten, shared_rope

CPU_GRAPH = "decoder.cpu.onnx"
#: ONNX Runtime's CPU GroupQueryAttention takes head sizes that are multiples of 16 (Ministral 3's
#: is 128); a model with another head size is served by the standard graph.
GQA_HEAD_DIM_MULTIPLE = 16
MS_DOMAIN = "com.microsoft"


def _rope_caches(graph: Graph, cfg: TextConfig, rows: int, dtype: int) -> tuple[str, str]:
    cos, sin = rope_cos_sin(cfg.rope, cfg.head_dim, np.arange(rows))
    np_dtype = np.float16 if dtype == TensorProto.FLOAT16 else np.float32
    names = []
    for table, hint in ((cos, "cos_cache"), (sin, "sin_cache")):
        name = graph.fresh(hint)
        graph.g.initializer.append(numpy_helper.from_array(table[:, : cfg.head_dim // 2].astype(np_dtype), name))
        names.append(name)
    return names[0], names[1]


def _lengths(graph: Graph, seam: dict[str, str]) -> tuple[str, str]:
    """seqlens_k = past_lengths + S - 1 [B] and total_sequence_length = max(past_lengths) + S, int32."""
    seq = graph.fresh("seq")
    graph.add("Cast", [_seq_len(graph, seam)], [seq], to=TensorProto.INT32)
    total_b, seqlens, total = graph.fresh("total_b"), graph.fresh("seqlens_k"), graph.fresh("total_len")
    graph.add("Add", [ops.PAST_LENGTHS, seq], [total_b])
    graph.add("Sub", [total_b, graph.const([1], TensorProto.INT32)], [seqlens])
    graph.add("ReduceMax", [total_b], [total], keepdims=0)
    return seqlens, total


def _seq_len(graph: Graph, seam: dict[str, str]) -> str:
    shape, seq = graph.fresh("q_shape"), graph.fresh("q_len")
    graph.add("Shape", [seam["q"]], [shape])
    graph.add("Gather", [shape, graph.const([1])], [seq], axis=0)
    return seq


def write_cpu_graph(decoder_path: str | Path, cfg: TextConfig, context_length: int,
                    out_path: str | Path | None = None) -> Path:
    """Derive ``decoder.cpu.onnx`` beside ``decoder_path``; RoPE caches cover ``context_length``."""
    decoder_path = Path(decoder_path)
    out_path = beside(decoder_path, Path(out_path) if out_path else decoder_path.with_name(CPU_GRAPH))
    model, props, meta = load_decoder(decoder_path)
    seams = meta["layers"]
    past = next(i for i in model.graph.input if i.name == seams[0]["past_key"])
    dtype = past.type.tensor_type.elem_type
    graph = Graph(model, decoder_path)
    shared = shared_rope(graph, seams)
    cos_cache, sin_cache = _rope_caches(graph, cfg, context_length, dtype)
    q_scale = graph.fresh("q_scale")  # [B, S, 1], broadcast over the heads
    graph.add("Reshape", [expanded_q_scale(graph, {**seams[0], **shared}), graph.const([0, -1, 1])], [q_scale])
    seqlens, total = _lengths(graph, seams[0])
    for seam in seams:
        for old in ("out", "present_key", "present_value"):  # the old block's ends; the rest is pruned
            graph.g.node.remove(graph.producer[seam[old]])
        q = graph.fresh("q_scaled")
        graph.add("Mul", [seam["q"], q_scale], [q])
        graph.add("GroupQueryAttention", [q, seam["k"], seam["v"], seam["past_key"], seam["past_value"], seqlens,
                                          total, cos_cache, sin_cache],
                  [seam["out"], seam["present_key"], seam["present_value"]], domain=MS_DOMAIN,
                  num_heads=meta["num_heads"], kv_num_heads=meta["num_kv_heads"], do_rotary=1,
                  rotary_interleaved=0, scale=1.0)
    cache_shape = ["batch", meta["num_kv_heads"], ops.CACHE_DIM, meta["head_dim"]]
    names = [(seam["past_key"], seam["present_key"]) for seam in seams] + \
            [(seam["past_value"], seam["present_value"]) for seam in seams]
    graph.replace_cache_io(
        seams,
        [helper.make_tensor_value_info(ops.PAST_LENGTHS, TensorProto.INT32, ["batch"])]
        + [helper.make_tensor_value_info(past_name, dtype, cache_shape) for past_name, _ in names],
        [helper.make_tensor_value_info(present, dtype, cache_shape) for _, present in names])
    return save_rewritten(graph, props, out_path, [helper.make_opsetid(MS_DOMAIN, 1)],
                          {"target": "onnxruntime", "attention": len(seams)})
