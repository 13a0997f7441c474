"""The TensorRT plugin graph: the standard decoder.onnx with its INT4 linears and attention blocks
replaced by the plugin ops of plugins/ops.py.

One export, two graphs: ``decoder.onnx`` (basic ops; what ONNX Runtime runs and what is checked
against transformers) stays the fallback, and ``decoder.plugins.onnx`` is derived from it here:

- every ``MatMul(x, DequantizeLinear(int4 W^T, scales, axis=0, block_size))`` becomes one
  ``Int4GroupwiseGemm(x, qweight, scales)``. ``qweight`` is an int8 view of the same bytes in
  ``decoder.onnx.data`` (the exporter's W^T packing is the plugin's layout), so no weight is
  copied or rewritten, the head included when it is INT4;
- every attention block, cut along the seams the exporter recorded (q/k/v, RoPE tables, mask,
  past/present K/V, output), becomes one ``EdgeAttention`` over a preallocated cache
  ``kv_cache.{i}`` [B, 2, KV, cache_seq, D] that it updates in place; ``past_lengths`` [B] says
  where the new tokens go. The concat-per-step caches and the mask go away.

FP8 linears keep TensorRT's native Q/DQ (fast on Thor; there is no FP8 on Orin). INT8 linears
(the INT8 head) keep DequantizeLinear -> MatMul.
"""

from __future__ import annotations

from pathlib import Path

from onnx import TensorProto, helper

from ..plugins import ops
from .decoder import HEAD_NAMES
from .graph_rewrite import (Graph, RewriteError, beside, byte_view, expanded_q_scale, load_decoder,
                            save_rewritten, shared_rope)

PLUGIN_GRAPH = "decoder.plugins.onnx"


def _rewrite_int4_linears(graph: Graph) -> int:
    rows = HEAD_NAMES["rows"][0]
    if rows in graph.inits:
        raise RewriteError(f"{graph.path}: {rows} is in ONNX Runtime's rows form (the package was built for a CPU "
                           "profile); build it for a TensorRT profile")
    count = 0
    for mm in [n for n in graph.g.node if n.op_type == "MatMul"]:
        dq = graph.producer.get(mm.input[1])
        if dq is None or dq.op_type != "DequantizeLinear":
            continue
        w = graph.inits.get(dq.input[0])
        if w is None or w.data_type != TensorProto.INT4:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in dq.attribute}
        k, n = w.dims
        group = attrs.get("block_size", 0)
        if attrs.get("axis", 1) != 0 or group not in ops.GROUP_SIZES or len(dq.input) > 2 or n % 8:
            raise RewriteError(f"{graph.path}: INT4 weight {w.name} is not W^T with blocks along K in a group "
                               f"size the plugin takes ({ops.GROUP_SIZES}) and N % 8 == 0")
        if len(graph.consumers[dq.output[0]]) != 1:
            raise RewriteError(f"{graph.path}: dequantized {w.name} feeds more than one MatMul")
        view = byte_view(w, TensorProto.INT8, [k, n // 2])
        graph.g.initializer.append(view)
        graph.add(ops.INT4_GEMM, [mm.input[0], view.name, dq.input[1]], list(mm.output), domain=ops.DOMAIN,
                  gemm_n=n, gemm_k=k, group_size=group, plugin_version=ops.PLUGIN_VERSION,
                  plugin_namespace=ops.PLUGIN_NAMESPACE)
        graph.g.node.remove(mm)
        count += 1
    return count


def _qkv(graph: Graph, seam: dict[str, str]) -> str:
    """The fused q/k/v tensor: the input of the Split that made q, k and v, else their Concat."""
    split = graph.producer.get(seam["q"])
    if split is not None and split.op_type == "Split" and list(split.output) == [seam["q"], seam["k"], seam["v"]]:
        return split.input[0]
    out = graph.fresh("qkv")
    graph.add("Concat", [seam["q"], seam["k"], seam["v"]], [out], axis=-1)
    return out


def _rope_inputs(graph: Graph, seam: dict[str, str]) -> tuple[str, str, str]:
    """cos/sin [B, 1, S, D] -> [B, S, D]; the query scale -> [B, S]."""
    axis1 = graph.const([1])
    cos, sin, scale = graph.fresh("cos"), graph.fresh("sin"), graph.fresh("q_scale")
    graph.add("Squeeze", [seam["cos"], axis1], [cos])
    graph.add("Squeeze", [seam["sin"], axis1], [sin])
    graph.add("Squeeze", [expanded_q_scale(graph, seam), graph.const([1, 3])], [scale])
    return cos, sin, scale


def _rewrite_attention(graph: Graph, seams: list[dict[str, str]], heads: int, kv_heads: int, head_dim: int,
                       dtype: int) -> None:
    rope = _rope_inputs(graph, shared_rope(graph, seams))
    for i, seam in enumerate(seams):
        graph.g.node.remove(graph.producer[seam["out"]])  # the old block's last node; the rest is pruned
        graph.add(ops.ATTENTION, [_qkv(graph, seam), ops.cache_input(i), ops.PAST_LENGTHS, *rope],
                  [seam["out"], ops.cache_output(i)], domain=ops.DOMAIN, num_q_heads=heads,
                  num_kv_heads=kv_heads, head_size=head_dim, plugin_version=ops.PLUGIN_VERSION,
                  plugin_namespace=ops.PLUGIN_NAMESPACE)
    cache_shape = ["batch", 2, kv_heads, ops.CACHE_DIM, head_dim]
    n = range(len(seams))
    graph.replace_cache_io(
        seams,
        [helper.make_tensor_value_info(ops.PAST_LENGTHS, TensorProto.INT32, ["batch"])]
        + [helper.make_tensor_value_info(ops.cache_input(i), dtype, cache_shape) for i in n],
        [helper.make_tensor_value_info(ops.cache_output(i), dtype, cache_shape) for i in n])


def write_plugin_graph(decoder_path: str | Path, out_path: str | Path | None = None) -> Path:
    """Derive the plugin graph from ``decoder.onnx``; it is written beside it and shares its data
    file. Returns the new graph's path."""
    decoder_path = Path(decoder_path)
    out_path = beside(decoder_path, Path(out_path) if out_path else decoder_path.with_name(PLUGIN_GRAPH))
    model, props, meta = load_decoder(decoder_path)
    seams = meta["layers"]
    past = next(i for i in model.graph.input if i.name == seams[0]["past_key"])
    graph = Graph(model, decoder_path)
    n_int4 = _rewrite_int4_linears(graph)
    _rewrite_attention(graph, seams, meta["num_heads"], meta["num_kv_heads"], meta["head_dim"],
                       past.type.tensor_type.elem_type)
    return save_rewritten(graph, props, out_path, [helper.make_opsetid(ops.DOMAIN, 1)],
                          {"target": "tensorrt", "int4_gemms": n_int4, "attention": len(seams)})
