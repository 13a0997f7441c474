"""NumPy references of the plugin ops, and ONNX Runtime sessions that run a plugin graph with them.

What the CUDA kernels must compute, written plainly: the GPU check compares each kernel with
these, and ONNX Runtime runs the rewritten TensorRT graph itself through them (as Python custom
ops from onnxruntime-extensions), so the graph TensorRT compiles is checked end to end on a CPU.
They are references, not a fast path: a CPU serves the standard graph.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..models.ministral3 import rotate_half, softmax
from ..quant.int4 import unpack_int4
from . import ops


def int4_gemm(x: np.ndarray, qweight: np.ndarray, scales: np.ndarray, group_size: int) -> np.ndarray:
    """x [..., K] @ (codes * scales of their group) [K, N], in x's dtype (accumulated in float32)."""
    codes = unpack_int4(np.asarray(qweight).view(np.uint8))  # the exporter's packing, read back
    w = codes.astype(np.float32) * np.repeat(scales.astype(np.float32), group_size, axis=0)
    return (x.astype(np.float32) @ w).astype(x.dtype)


def _rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """x [B, S, n, D] * cos + rotate_half(x) * sin, cos/sin [B, S, D]."""
    return x * cos[:, :, None] + rotate_half(x) * sin[:, :, None]


def attention(qkv: np.ndarray, kv_cache: np.ndarray, past_lengths: np.ndarray, cos: np.ndarray,
              sin: np.ndarray, q_scale: np.ndarray, *, num_q_heads: int, num_kv_heads: int,
              head_size: int) -> tuple[np.ndarray, np.ndarray]:
    """EdgeAttention (plugins/ops.py): (out [B, S, H*D], the cache with the new keys/values in)."""
    dtype = qkv.dtype
    b_size, s_len, _ = qkv.shape
    h, kv, d = num_q_heads, num_kv_heads, head_size
    q = qkv[..., : h * d].reshape(b_size, s_len, h, d)
    k = qkv[..., h * d: (h + kv) * d].reshape(b_size, s_len, kv, d)
    v = qkv[..., (h + kv) * d:].reshape(b_size, s_len, kv, d)
    q = (_rope(q, cos, sin) * q_scale[:, :, None, None]).astype(dtype)  # rounded as the graph rounds
    k = _rope(k, cos, sin).astype(dtype)
    cache = np.array(kv_cache, copy=True)
    out = np.empty((b_size, s_len, h, d), dtype)
    groups = h // kv
    for b in range(b_size):
        start = int(past_lengths[b])
        if start + s_len > cache.shape[3]:
            raise ValueError(f"EdgeAttention: {start} cached + {s_len} new tokens exceed the cache's {cache.shape[3]}")
        cache[b, 0, :, start:start + s_len] = k[b].transpose(1, 0, 2)
        cache[b, 1, :, start:start + s_len] = v[b].transpose(1, 0, 2)
        total = start + s_len
        keys = cache[b, 0, :, :total].astype(np.float32)  # [KV, T, D]
        values = cache[b, 1, :, :total].astype(np.float32)
        qg = q[b].astype(np.float32).transpose(1, 0, 2).reshape(kv, groups, s_len, d)
        scores = qg @ keys[:, None].transpose(0, 1, 3, 2)  # [KV, G, S, T]
        visible = np.arange(total)[None, :] <= (start + np.arange(s_len))[:, None]
        scores = np.where(visible, scores, -np.inf)
        probs = softmax(scores)
        o = probs.astype(dtype).astype(np.float32) @ values[:, None]  # [KV, G, S, D]
        out[b] = o.reshape(h, s_len, d).transpose(1, 0, 2)
    return out.reshape(b_size, s_len, h * d), cache


# -- ONNX Runtime --------------------------------------------------------------------------------
_REFERENCE_DOMAIN = "ai.onnx.contrib"  # the domain onnxruntime-extensions serves Python ops from
_registered = False


def _register() -> None:
    """Declare the Python ops once per process (float32: the Python op API has no float16)."""
    global _registered
    if _registered:
        return
    from onnxruntime_extensions import PyCustomOpDef as T, onnx_op

    f32 = T.dt_float
    onnx_op(op_type=ops.INT4_GEMM, inputs=[f32, T.dt_int8, f32], outputs=[f32],
            attrs={"gemm_n": T.dt_int64, "gemm_k": T.dt_int64, "group_size": T.dt_int64})(
        lambda x, qweight, scales, **a: int4_gemm(x, qweight, scales, int(a["group_size"])))
    onnx_op(op_type=ops.ATTENTION, inputs=[f32, f32, T.dt_int32, f32, f32, f32], outputs=[f32, f32],
            attrs={"num_q_heads": T.dt_int64, "num_kv_heads": T.dt_int64, "head_size": T.dt_int64})(
        lambda qkv, cache, lengths, cos, sin, qs, **a: attention(
            qkv, cache, lengths, cos, sin, qs, num_q_heads=int(a["num_q_heads"]),
            num_kv_heads=int(a["num_kv_heads"]), head_size=int(a["head_size"])))
    _registered = True


def _through_float32(node, tag: str) -> tuple[list, list]:
    """Casts before and after a plugin node of a float16 graph: the references see float32 in,
    and their outputs are rounded to float16 where the graph keeps them."""
    from onnx import TensorProto, helper

    floats = (0, 1, 3, 4, 5) if node.op_type == ops.ATTENTION else (0, 2)
    before, after = [], []
    for j in floats:
        name = node.input[j]
        before.append(helper.make_node("Cast", [name], [f"{name}.f32.{tag}"], to=TensorProto.FLOAT))
        node.input[j] = f"{name}.f32.{tag}"
    for j, name in enumerate(node.output):
        after.append(helper.make_node("Cast", [f"{name}.f32.{tag}"], [name], to=TensorProto.FLOAT16))
        node.output[j] = f"{name}.f32.{tag}"
    return before, after


def reference_session(graph_path: str | Path, threads: int | None = None):
    """An ONNX Runtime session over a plugin graph, its plugin nodes run by the NumPy references."""
    import onnx
    import onnxruntime as ort
    from onnxruntime_extensions import get_library_path

    _register()
    graph_path = Path(graph_path)
    model = onnx.load(str(graph_path), load_external_data=False)
    float16 = any(i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16 for i in model.graph.input)
    nodes = []
    for node in model.graph.node:
        if node.domain != ops.DOMAIN:
            nodes.append(node)
            continue
        node.domain = _REFERENCE_DOMAIN
        keep = [a for a in node.attribute if a.name not in ("plugin_version", "plugin_namespace")]
        del node.attribute[:]
        node.attribute.extend(keep)
        before, after = _through_float32(node, str(len(nodes))) if float16 else ([], [])
        nodes += [*before, node, *after]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    for opset in model.opset_import:
        if opset.domain == ops.DOMAIN:
            opset.domain = _REFERENCE_DOMAIN
    options = ort.SessionOptions()
    options.register_custom_ops_library(get_library_path())
    options.intra_op_num_threads = threads or 1
    options.log_severity_level = 3
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")  # an INT8 head: exact
    # external data resolves against the graph's folder: save the edited graph there, read it, drop it
    tmp = graph_path.with_name(f".{graph_path.stem}.reference.onnx")
    onnx.save_model(model, str(tmp))
    try:
        return ort.InferenceSession(str(tmp), options, providers=["CPUExecutionProvider"])
    finally:
        tmp.unlink(missing_ok=True)
