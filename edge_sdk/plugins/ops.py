"""The two TensorRT plugin ops: their names, inputs, outputs and attributes, in one place.

The rewrite pass (export/plugin_graph.py) writes nodes to this contract, the NumPy references
(plugins/reference.py) and the CUDA plugins (csrc/) implement it. Nodes live in the ONNX domain
``trt``; TensorRT's ONNX parser maps a node it does not know to the plugin creator of the same
name, version ``plugin_version``, in ``plugin_namespace``.

Int4GroupwiseGemm: ``y[M, N] = x[M, K] @ dequant(qweight, scales)``
  - ``x`` [..., K] in T (float16 on GPU profiles, float32 on the CPU profile);
  - ``qweight`` int8 [K, N/2]: W^T with two int4 codes per byte, column 2j in the low nibble of
    byte j of row k (exactly ONNX's INT4 packing of W^T [K, N], so the plugin graph reads the
    standard graph's weight bytes unchanged). A decode GEMV thread loads 4 consecutive bytes =
    8 output columns of one row k; a warp then reads 128 contiguous bytes: coalesced;
  - ``scales`` T [K / group_size, N];
  - attributes ``gemm_n``, ``gemm_k``, ``group_size`` (64 or 128; 32 is accepted too).

EdgeAttention: RoPE + in-place KV append + causal grouped-query attention, one layer.
  - ``qkv`` T [B, S, (H + 2 KV) * D]: q, k, v side by side (the fused q/k/v linear's output);
  - ``kv_cache`` T [B, 2, KV, C, D]: keys (index 0) and values (1) for C = the context capacity;
    output 1 is the same buffer (TensorRT: ``getAliasedInput(1) == 1``), with the new tokens'
    keys/values written at positions ``past_lengths[b] + t``. Nothing else in the cache moves;
  - ``past_lengths`` int32 [B]: tokens already cached per sequence;
  - ``cos``, ``sin`` T [B, S, D]: the RoPE tables of the new tokens' positions (YaRN already in);
  - ``q_scale`` T [B, S]: the query scale (1/sqrt(D), times the Llama-4 position factor);
  - output 0 ``out`` T [B, S, H * D]; token t sees cache positions 0 .. past_lengths[b] + t;
  - attributes ``num_q_heads``, ``num_kv_heads``, ``head_size``.
  Scores and softmax are float32 whatever T is, as in the standard graph.
"""

from __future__ import annotations

DOMAIN = "trt"
PLUGIN_VERSION = "1"
PLUGIN_NAMESPACE = ""

INT4_GEMM = "Int4GroupwiseGemm"
ATTENTION = "EdgeAttention"
OP_TYPES = (INT4_GEMM, ATTENTION)

GROUP_SIZES = (32, 64, 128)

#: Graph I/O names of a plugin decoder (the standard one has past_*/present_* instead).
PAST_LENGTHS = "past_lengths"
CACHE_DIM = "cache_seq"  # the capacity axis of every kv_cache.{i}


def cache_input(layer: int) -> str:
    return f"kv_cache.{layer}"


def cache_output(layer: int) -> str:
    return f"present_kv.{layer}"
