"""The CPU graph: decoder.onnx with each attention block replaced by one that reads the KV cache
from buffers the backend preallocates, never concatenating (copying) the cache per step.

Derived from the standard graph like the TensorRT plugin graph (same seams, same weights file);
the standard graph stays what TensorRT parses and what is checked against transformers, and this
one is checked against it. Linears are untouched (ONNX Runtime fuses INT4 DequantizeLinear ->
MatMul into MatMulNBits itself).

Per layer:
- RoPE: ``com.microsoft.RotaryEmbedding`` on q and k from cos/sin caches indexed by position (the
  exporter's tables, YaRN attention factor included, for positions 0 .. context - 1). The
  Llama-4 query scale depends on the position; rotation is linear, so q's caches carry it.
- Grouped attention as two matrix products per KV head, the G = heads / kv_heads query heads of
  a group stacked as rows: scores against the cache buffer (``past_key.{i}`` [B, KV, C, D], C the
  buffer's capacity; positions at or past ``past_lengths`` masked) and against the step's own new
  keys (causal), one softmax over both, then probabilities times the buffer's and the new
  values. Each buffer is read once per step, not once per query head (ONNX Runtime's fused
  GroupQueryAttention reads it G times: at 4,096 tokens of context that was a third of a step).
- The step's new keys and values are outputs (``new_key.{i}``/``new_value.{i}`` [B, KV, S, D]);
  the backend writes them into the buffers after the step (runtime/onnxruntime.py).

The graph also names, per layer, where its attention starts and ends (q, k, v before RoPE; the
attention output) and its RoPE tables: the CPU backend cuts the graph there and runs its own
attention kernel between the pieces (runtime/segments.py).

Residual adds with the RMSNorm after them become ``com.microsoft.SkipSimplifiedLayerNormalization``.
An INT4 / INT8 head in the rows form (export/decoder.py) becomes one ``com.microsoft.MatMulNBits``
over the same bytes: ONNX Runtime prepacks it as it is, without first rearranging a copy. Its
``accuracy_level`` is the backend's to set at load.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from ..models.config import TextConfig
from ..models.ministral3 import query_scale, rope_cos_sin
from ..plugins import ops
from ..runtime.segments import ATTENTION_CUTS_KEY
from .decoder import HEAD_NAMES, NEG_INF
from .graph_rewrite import Graph, beside, byte_view, load_decoder, save_rewritten, shared_rope

CPU_GRAPH = "decoder.cpu.onnx"
MS_DOMAIN = "com.microsoft"
NEW_KEY, NEW_VALUE = "new_key", "new_value"


def _rope_caches(graph: Graph, cfg: TextConfig, rows: int, dtype: int) -> tuple[str, str, str, str]:
    """cos/sin caches [rows, head_dim / 2] for q, then for k. q's are k's times each position's
    query scale (the Llama-4 temperature and 1/sqrt(head_dim)): rotation is linear, so RoPE with
    them is the scaled RoPE, without a Mul per layer."""
    positions = np.arange(rows)
    cos, sin = rope_cos_sin(cfg.rope, cfg.head_dim, positions)
    q_scale = (query_scale(cfg.rope, positions) * np.float32(1.0 / np.sqrt(cfg.head_dim)))[:, None]
    np_dtype = np.float16 if dtype == TensorProto.FLOAT16 else np.float32
    names = []
    for table, hint in ((cos * q_scale, "q_cos_cache"), (sin * q_scale, "q_sin_cache"), (cos, "cos_cache"),
                        (sin, "sin_cache")):
        name = graph.fresh(hint)
        graph.g.initializer.append(numpy_helper.from_array(table[:, : cfg.head_dim // 2].astype(np_dtype), name))
        names.append(name)
    return tuple(names)


def _op(graph: Graph, op_type: str, *inputs: str, domain: str = "", **attrs) -> str:
    out = graph.fresh(op_type.lower())
    graph.add(op_type, list(inputs), [out], domain=domain, **attrs)
    return out


def _scalar(graph: Graph, value, data_type=TensorProto.INT64) -> str:
    name = graph.fresh("scalar")
    graph.g.initializer.append(helper.make_tensor(name, data_type, [], [value]))
    return name


def _dim(graph: Graph, tensor: str, axis: int) -> str:
    """One dimension of ``tensor`` as an int64 scalar."""
    return _op(graph, "Gather", _op(graph, "Shape", tensor), _scalar(graph, axis), axis=0)


def _masks(graph: Graph, seam: dict[str, str], groups: int) -> tuple[str, str, str]:
    """(mask over the buffer [B, 1, 1, C]: 0 below past_lengths, NEG_INF from there; causal mask
    over the new keys [G*S, S], rows stacked group-major as the queries are; the split [C, S])."""
    zero, one, neg = _scalar(graph, 0), _scalar(graph, 1), _scalar(graph, NEG_INF, TensorProto.FLOAT)
    fzero = _scalar(graph, 0.0, TensorProto.FLOAT)
    capacity, seq = _dim(graph, seam["past_key"], 2), _dim(graph, "position_ids", 1)
    lengths = _op(graph, "Unsqueeze", _op(graph, "Cast", ops.PAST_LENGTHS, to=TensorProto.INT64), graph.const([1]))
    filled = _op(graph, "Less", _op(graph, "Range", zero, capacity, one), lengths)  # [B, C]
    past = _op(graph, "Unsqueeze", _op(graph, "Where", filled, fzero, neg), graph.const([1, 2]))
    rows = _op(graph, "Mod", _op(graph, "Range", zero, _op(graph, "Mul", seq, _scalar(graph, groups)), one), seq)
    cols = _op(graph, "Range", zero, seq, one)
    allowed = _op(graph, "LessOrEqual", _op(graph, "Unsqueeze", cols, graph.const([0])),
                  _op(graph, "Unsqueeze", rows, graph.const([1])))
    new = _op(graph, "Where", allowed, fzero, neg)
    split = _op(graph, "Concat", _op(graph, "Unsqueeze", capacity, graph.const([0])),
                _op(graph, "Unsqueeze", seq, graph.const([0])), axis=0)
    return past, new, split


def _attention(graph: Graph, seam: dict[str, str], meta: dict, rope: tuple[str, str, str, str],
               masks: tuple[str, str, str], layer: int, dtype: int) -> tuple[str, str]:
    """One layer's attention into ``seam["out"]``; returns its (new key, new value) [B, KV, S, D]."""
    heads, kv, dim = meta["num_heads"], meta["num_kv_heads"], meta["head_dim"]
    groups = heads // kv
    q_cos, q_sin, cos, sin = rope
    mask_past, mask_new, split = masks
    q = _op(graph, "RotaryEmbedding", seam["q"], "position_ids", q_cos, q_sin, domain=MS_DOMAIN, num_heads=heads,
            interleaved=0)  # [B, S, H*D], scaled
    q = _op(graph, "Transpose", _op(graph, "Reshape", q, graph.const([0, 0, kv, groups, dim])), perm=[0, 2, 3, 1, 4])
    q = _op(graph, "Reshape", q, graph.const([0, kv, -1, dim]))  # [B, KV, G*S, D], row g*S + s
    k = _op(graph, "RotaryEmbedding", seam["k"], "position_ids", cos, sin, domain=MS_DOMAIN, num_heads=kv,
            interleaved=0)
    new_k, new_v = f"{NEW_KEY}.{layer}", f"{NEW_VALUE}.{layer}"
    for src, dst in ((k, new_k), (seam["v"], new_v)):
        graph.add("Transpose", [_op(graph, "Reshape", src, graph.const([0, 0, kv, dim]))], [dst], perm=[0, 2, 1, 3])

    def scores(keys: str, mask: str) -> str:
        s = _op(graph, "FusedMatMul", q, keys, domain=MS_DOMAIN, transB=1)
        if dtype != TensorProto.FLOAT:
            s = _op(graph, "Cast", s, to=TensorProto.FLOAT)  # softmax in float32
        return _op(graph, "Add", s, mask)

    probs = _op(graph, "Softmax", _op(graph, "Concat", scores(seam["past_key"], mask_past), scores(new_k, mask_new),
                                      axis=-1), axis=-1)
    if dtype != TensorProto.FLOAT:
        probs = _op(graph, "Cast", probs, to=dtype)
    p_past, p_new = graph.fresh("p_past"), graph.fresh("p_new")
    graph.add("Split", [probs, split], [p_past, p_new], axis=-1)
    out = _op(graph, "Add", _op(graph, "MatMul", p_past, seam["past_value"]), _op(graph, "MatMul", p_new, new_v))
    out = _op(graph, "Reshape", out, graph.const([0, kv, groups, -1, dim]))  # [B, KV, G, S, D]
    out = _op(graph, "Transpose", out, perm=[0, 3, 1, 2, 4])  # [B, S, KV, G, D]
    graph.add("Reshape", [out, graph.const([0, 0, heads * dim])], [seam["out"]])
    return new_k, new_v


def _skip_norms(graph: Graph) -> int:
    """Each residual Add that an RMSNorm reads -> one ``com.microsoft.SkipSimplifiedLayerNormalization``
    whose fourth output is the sum, still read by the next residual Add (ONNX Runtime's own fusion
    leaves an Add and a SimplifiedLayerNormalization). Matches the exporter's float32 norm
    (decoder.py: Pow, ReduceMean, Add eps, Sqrt, Div, Mul weight)."""
    def made_by(name: str, op_type: str):
        node = graph.producer.get(name)
        return node if node is not None and node.op_type == op_type else None

    count = 0
    for div in [n for n in graph.g.node if n.op_type == "Div"]:
        x = div.input[0]
        sqrt = made_by(div.input[1], "Sqrt")
        add_eps = sqrt and made_by(sqrt.input[0], "Add")
        mean = add_eps and made_by(add_eps.input[0], "ReduceMean")
        square = mean and made_by(mean.input[0], "Pow")
        residual = made_by(x, "Add")
        scale = graph.consumers[div.output[0]]
        if not (square and residual and square.input[0] == x and len(scale) == 1 and scale[0].op_type == "Mul"
                and add_eps.input[1] in graph.inits):
            continue
        eps = float(numpy_helper.to_array(graph.inits[add_eps.input[1]]))
        for node in (residual, square, mean, add_eps, sqrt, div, scale[0]):
            graph.g.node.remove(node)
        graph.add("SkipSimplifiedLayerNormalization", [*residual.input, scale[0].input[1]],
                  [scale[0].output[0], "", "", x], domain=MS_DOMAIN, epsilon=eps)
        count += 1
    return count


def _rows_head(graph: Graph) -> bool:
    """MatMul(x, Transpose(DequantizeLinear(uint4/uint8 W [N, K], scales, zero points, axis=1)))
    -> MatMulNBits (whose implicit zero point, 8 or 128, is the one the rows form stores)."""
    weight, scales, _ = HEAD_NAMES["rows"]
    if weight not in graph.inits:
        return False
    w = graph.inits[weight]
    bits = 4 if w.data_type == TensorProto.UINT4 else 8
    dq = graph.consumers[weight][0]
    matmul = graph.consumers[graph.consumers[dq.output[0]][0].output[0]][0]
    block = next(a.i for a in dq.attribute if a.name == "block_size")
    n, k = w.dims
    view = byte_view(w, TensorProto.UINT8, [n, k // block, block * bits // 8])
    graph.g.initializer.append(view)
    graph.g.node.remove(matmul)  # the DequantizeLinear and Transpose before it are pruned
    graph.add("MatMulNBits", [matmul.input[0], view.name, scales], list(matmul.output), domain=MS_DOMAIN,
              K=k, N=n, bits=bits, block_size=block, accuracy_level=4)
    return True


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
    shared_rope(graph, seams)  # one set of tables: what the caches replace
    rope = _rope_caches(graph, cfg, context_length, dtype)
    masks = _masks(graph, seams[0], meta["num_heads"] // meta["num_kv_heads"])
    news = []
    for layer, seam in enumerate(seams):
        for old in ("out", "present_key", "present_value"):  # the old block's ends; the rest is pruned
            graph.g.node.remove(graph.producer[seam[old]])
        news.append(_attention(graph, seam, meta, rope, masks, layer, dtype))
    cache_shape = ["batch", meta["num_kv_heads"], ops.CACHE_DIM, meta["head_dim"]]
    new_shape = ["batch", meta["num_kv_heads"], "seq", meta["head_dim"]]
    graph.replace_cache_io(
        seams,
        [helper.make_tensor_value_info(ops.PAST_LENGTHS, TensorProto.INT32, ["batch"])]
        + [helper.make_tensor_value_info(seam[k], dtype, cache_shape) for k in ("past_key", "past_value")
           for seam in seams],
        [helper.make_tensor_value_info(name, dtype, new_shape) for pair in news for name in pair])
    rows_head = _rows_head(graph)
    skip_norms = _skip_norms(graph) if dtype == TensorProto.FLOAT else 0
    cuts = {"layers": [{k: seam[k] for k in ("q", "k", "v", "out", "past_key", "past_value")} for seam in seams],
            "rope": list(rope)}
    props = {**props, ATTENTION_CUTS_KEY: json.dumps(cuts)}
    return save_rewritten(graph, props, out_path, [helper.make_opsetid(MS_DOMAIN, 1)],
                          {"target": "onnxruntime", "attention": len(seams), "matmul_nbits_head": rows_head,
                           "skip_norms": skip_norms})
