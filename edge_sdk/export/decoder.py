"""Export the Ministral 3 text decoder as ONNX: one graph for prefill and decode, KV cache in/out.

Written from basic ops only (MatMul, Softmax, Cos/Sin, ReduceMean, ...) because TensorRT 10.3 on
JetPack 6 lacks the opset-23 Attention / RotaryEmbedding / RMSNormalization ops. Each of the three
is one function here (`_rms_norm`, `_rope`, `_attention`): the seam where a TensorRT plugin can
replace it later.

Linears come out in one of these forms, chosen by what the quantizer produced (and, for the
head, the profile's runtime):
- float: `MatMul(x, W^T)`;
- INT4 (INT8 for an INT8 head): `DequantizeLinear(int4 W^T, scales, axis=0, block_size)` ->
  `MatMul` (ONNX Runtime fuses this into MatMulNBits; TensorRT into its weight-only GEMM);
- the INT4 / INT8 head of an ONNX Runtime package (``head_rows``): `DequantizeLinear(uint W,
  scales, zero points, axis=1, block_size)` -> `Transpose` -> `MatMul`. W [vocab, hidden] holds
  each code + 8 (uint4) or + 128 (uint8): the bytes ONNX Runtime's MatMulNBits reads as they are
  (the CPU graph runs it so, export/cpu_graph.py), and a token's embedding row is contiguous for
  the host lookup of a tied model. The W^T form would be rearranged at load into a second copy
  (0.2 GB of INT4 for 3B), and the lookups would touch every page of the file's copy;
- FP8: `QuantizeLinear/DequantizeLinear(x)` in float8e4m3fn with the static input scale, and
  `DequantizeLinear(fp8 W^T, weight_scale)` -> `MatMul`.
Linears that share an input (q/k/v, gate/up) are one MatMul over their weights side by side and a
Split, when they are float or INT4 (FP8 ones each keep their input scale).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import numpy as np
from onnx import TensorProto, helper

from ..models.config import TextConfig
from ..models.ministral3 import LINEARS
from ..quant.int4 import Int4Linear
from ..quant.int8 import Int8Linear
from .onnx_builder import GraphBuilder

NEG_INF = -1e9  # masked score; finite so no NaN appears in fp16 or on any backend


def _np_dtype(dtype: str):
    return {"float32": np.float32, "float16": np.float16}[dtype]


def _quantized_weight_t(g: GraphBuilder, name: str, lin) -> str:
    """W^T [in, out] of an Int4Linear (ONNX INT4: two per byte, first in the low nibble) or an
    Int8Linear (INT8) as an initializer."""
    if isinstance(lin, Int8Linear):
        return g.weight(lin.q.T, name)
    return g.raw(name, TensorProto.INT4, lin.shape[::-1], lin.packed_t().data)


class DecoderGraph:
    """Builds the decoder graph from a config and quantized weights (`tensors` + `linears`)."""

    def __init__(self, cfg: TextConfig, tensors: Mapping[str, np.ndarray], linears: Mapping[str, object],
                 path: Path, dtype: str = "float32", head: object | None = None, head_rows: bool = False):
        self.cfg = cfg
        self.tensors = tensors
        self.linears = linears
        self.head = head  # Int4Linear / Int8Linear [vocab, hidden]; None: the float tensors["lm_head.weight"]
        self.head_rows = head_rows and isinstance(head, (Int4Linear, Int8Linear))
        self.dtype = dtype
        self.onnx_dtype = TensorProto.FLOAT if dtype == "float32" else TensorProto.FLOAT16
        self.g = GraphBuilder("ministral3_decoder", path)
        self.attention_seams: list[dict[str, str]] = []  # per layer: the tensors around attention

    # --- building blocks -------------------------------------------------------------------
    def _to_compute(self, x: str) -> str:
        return x if self.dtype == "float32" else self.g.op("Cast", x, to=self.onnx_dtype)

    def _to_f32(self, x: str) -> str:
        return x if self.dtype == "float32" else self.g.op("Cast", x, to=TensorProto.FLOAT)

    def _scalar(self, value: float) -> str:
        return self.g.const(value, _np_dtype(self.dtype))

    def _rms_norm(self, x: str, weight_name: str) -> str:
        """RMSNorm with the variance in float32 whatever the compute dtype. Written as
        x / sqrt(mean(x^2) + eps), the form ONNX Runtime fuses into one SimplifiedLayerNormalization."""
        g = self.g
        x32 = self._to_f32(x)
        var = g.op("ReduceMean", g.op("Pow", x32, g.const(2.0, np.float32)), g.const([-1]), keepdims=1)
        rms = g.op("Sqrt", g.op("Add", var, g.const(self.cfg.rms_norm_eps, np.float32)))
        normed = self._to_compute(g.op("Div", x32, rms))
        w = g.weight(self.tensors[weight_name].astype(_np_dtype(self.dtype)), weight_name)
        return g.op("Mul", normed, w)

    def _linear(self, x: str, name: str, lin: object | None = None) -> str:
        g, dt = self.g, _np_dtype(self.dtype)
        lin = self.linears[name] if lin is None else lin
        if isinstance(lin, np.ndarray):
            return g.op("MatMul", x, g.weight(lin.T.astype(dt), f"{name}.weight_t"))
        if hasattr(lin, "block"):  # Int4Linear, Int8Linear
            w = _quantized_weight_t(g, f"{name}.qweight_t", lin)
            s = g.weight(lin.scales.T.astype(dt), f"{name}.scales_t")
            return g.op("MatMul", x, g.op("DequantizeLinear", w, s, axis=0, block_size=lin.block))
        # Fp8Linear: static per-tensor input scale, per-tensor or per-output-channel weight scale.
        zero = g.tensor(helper.make_tensor(f"{name}.fp8_zero", TensorProto.FLOAT8E4M3FN, [], [0.0]))
        in_scale = g.weight(np.asarray(lin.input_scale, dtype=dt).reshape(()), f"{name}.input_scale")
        xq = g.op("QuantizeLinear", x, in_scale, zero, saturate=1)
        xdq = g.op("DequantizeLinear", xq, in_scale, zero)
        wq = g.raw(f"{name}.fp8_weight_t", TensorProto.FLOAT8E4M3FN, lin.weight.T.shape,
                   np.ascontiguousarray(lin.weight.T).view(np.uint8).data)
        ws = np.asarray(lin.weight_scale, dtype=dt)
        w_scale = g.weight(ws.reshape(ws.shape if ws.size > 1 else ()), f"{name}.weight_scale")
        wdq = g.op("DequantizeLinear", wq, w_scale, axis=1) if ws.size > 1 else g.op("DequantizeLinear", wq, w_scale)
        return g.op("MatMul", xdq, wdq)

    def _rows_linear(self, x: str, name: str, lin: Int4Linear | Int8Linear) -> str:
        """An INT4 / INT8 linear with W [out, in] stored as unsigned codes (zero point 8 / 128)."""
        g = self.g
        if isinstance(lin, Int4Linear):
            # q + 8: each nibble's top bit of the two's complement packing flipped; two 8s per zero byte
            data_type, codes, zero = TensorProto.UINT4, lin.packed ^ np.uint8(0x88), np.uint8(0x88)
            zero_bytes = -(-lin.scales.size // 2)
        else:
            data_type, codes, zero = TensorProto.UINT8, lin.q.view(np.uint8) ^ np.uint8(0x80), np.uint8(128)
            zero_bytes = lin.scales.size
        w = g.raw(f"{name}.{ROWS_SUFFIXES[0]}", data_type, lin.shape, np.ascontiguousarray(codes).data)
        s = g.weight(lin.scales.astype(_np_dtype(self.dtype)), f"{name}.{ROWS_SUFFIXES[1]}")
        zp = g.raw(f"{name}.{ROWS_SUFFIXES[2]}", data_type, lin.scales.shape, np.full(zero_bytes, zero).data)
        w_t = g.op("Transpose", g.op("DequantizeLinear", w, s, zp, axis=1, block_size=lin.block), perm=[1, 0])
        return g.op("MatMul", x, w_t)

    def _linears(self, x: str, names: list[str]) -> list[str]:
        """Linears that share the input ``x``. INT4 (or float) ones with one block size become one
        MatMul over their weights side by side, then a Split: a decode step then streams one weight
        matrix instead of several (fewer, longer GEMVs). FP8 ones keep their own input scales."""
        lins = [self.linears[n] for n in names]
        same_kind = all(isinstance(lin, Int4Linear) for lin in lins) and len({lin.block for lin in lins}) == 1
        if not (same_kind or all(isinstance(lin, np.ndarray) for lin in lins)):
            return [self._linear(x, n) for n in names]
        if same_kind:
            fused = Int4Linear(np.concatenate([lin.packed for lin in lins]),
                               np.concatenate([lin.scales for lin in lins]), lins[0].block)
        else:
            fused = np.concatenate(lins)
        name = names[0].rsplit(".", 1)[0] + "." + "_".join(n.rsplit(".", 1)[1].replace("_proj", "") for n in names)
        out = self._linear(x, name, fused)
        sizes = self.g.const([lin.shape[0] for lin in lins])
        return self.g.ops("Split", out, sizes, n_outputs=len(names), axis=-1)

    def _rope_tables(self, position_ids: str) -> tuple[str, str, str]:
        """cos, sin [B, 1, S, D] and the query scale [B, 1, S, 1], computed from position ids in fp32."""
        g, rope, cfg = self.g, self.cfg.rope, self.cfg
        pos = g.op("Cast", position_ids, to=TensorProto.FLOAT)
        inv_freq = g.const(rope.inv_freq(cfg.head_dim), np.float32)
        freqs = g.op("Mul", g.op("Unsqueeze", pos, g.const([-1])), inv_freq)
        emb = g.op("Concat", freqs, freqs, axis=-1)
        factor = g.const(rope.attention_factor(), np.float32)
        cos = g.op("Unsqueeze", self._to_compute(g.op("Mul", g.op("Cos", emb), factor)), g.const([1]))
        sin = g.op("Unsqueeze", self._to_compute(g.op("Mul", g.op("Sin", emb), factor)), g.const([1]))
        # Llama-4 query scaling, with attention's 1/sqrt(head_dim) folded in.
        qs = g.const(1.0 / np.sqrt(cfg.head_dim), np.float32)
        if rope.llama_4_scaling_beta is not None and rope.original_max_position_embeddings:
            steps = g.op("Floor", g.op("Div", pos, g.const(float(rope.original_max_position_embeddings), np.float32)))
            scale = g.op("Add", g.const(1.0, np.float32),
                         g.op("Mul", g.const(rope.llama_4_scaling_beta, np.float32),
                              g.op("Log", g.op("Add", steps, g.const(1.0, np.float32)))))
            qs = g.op("Mul", scale, qs)
            qs = g.op("Unsqueeze", qs, g.const([1, 3]))
        return cos, sin, self._to_compute(qs)

    def _rope(self, x: str, cos: str, sin: str) -> str:
        """x * cos + rotate_half(x) * sin, x in [B, heads, S, D]."""
        g = self.g
        half = self.cfg.head_dim // 2
        x1, x2 = g.ops("Split", x, g.const([half, half]), n_outputs=2, axis=-1)
        rotated = g.op("Concat", g.op("Neg", x2), x1, axis=-1)
        return g.op("Add", g.op("Mul", x, cos), g.op("Mul", rotated, sin))

    def _heads(self, x: str, n: int) -> str:
        """[B, S, n*D] -> [B, n, S, D]"""
        g = self.g
        return g.op("Transpose", g.op("Reshape", x, g.const([0, 0, n, self.cfg.head_dim])), perm=[0, 2, 1, 3])

    def _causal_mask(self, seq_len: str, past_len: str) -> str:
        """[S, P+S] float32: 0 where new token t may see position s (s <= P + t), else NEG_INF."""
        g = self.g
        zero, one = g.const(0), g.const(1)
        rows = g.op("Add", g.op("Range", zero, seq_len, one), past_len)
        cols = g.op("Range", zero, g.op("Add", seq_len, past_len), one)
        allowed = g.op("LessOrEqual", g.op("Unsqueeze", cols, g.const([0])), g.op("Unsqueeze", rows, g.const([1])))
        return g.op("Where", allowed, g.const(0.0, np.float32), g.const(NEG_INF, np.float32))

    def _attention(self, q: str, k: str, v: str, mask: str) -> str:
        """Grouped-query attention: q [B, H, S, D] (pre-scaled), k/v [B, KV, T, D] -> [B, S, H*D]."""
        g, cfg = self.g, self.cfg
        groups = cfg.num_heads // cfg.num_kv_heads
        qg = g.op("Reshape", q, g.const([0, cfg.num_kv_heads, groups, -1, cfg.head_dim]))
        # Unsqueeze first: a Transpose of the last two axes straight into MatMul is folded into the
        # MatMul by ONNX Runtime (and TensorRT), instead of copying the whole key cache every step.
        kt = g.op("Transpose", g.op("Unsqueeze", k, g.const([2])), perm=[0, 1, 2, 4, 3])
        scores = g.op("Add", self._to_f32(g.op("MatMul", qg, kt)), mask)  # softmax in fp32
        probs = self._to_compute(g.op("Softmax", scores, axis=-1))
        out = g.op("MatMul", probs, g.op("Unsqueeze", v, g.const([2])))  # [B, KV, G, S, D]
        out = g.op("Reshape", out, g.const([0, cfg.num_heads, -1, cfg.head_dim]))
        return g.op("Reshape", g.op("Transpose", out, perm=[0, 2, 1, 3]), g.const([0, 0, cfg.num_heads * cfg.head_dim]))

    # --- the graph ---------------------------------------------------------------------------
    def build(self) -> GraphBuilder:
        """The whole graph; its weights are already on disk (`.save()` writes the rest)."""
        g, cfg, dt = self.g, self.cfg, self.dtype
        kv_shape = ["batch", cfg.num_kv_heads, "past_seq", cfg.head_dim]
        h = g.input("inputs_embeds", dt, ["batch", "seq", cfg.hidden_size])
        position_ids = g.input("position_ids", "int64", ["batch", "seq"])
        pasts = [(g.input(f"past_key.{i}", dt, kv_shape), g.input(f"past_value.{i}", dt, kv_shape))
                 for i in range(cfg.num_layers)]
        seq_len = g.op("Gather", g.op("Shape", h), g.const(1), axis=0)
        past_len = g.op("Gather", g.op("Shape", pasts[0][0]), g.const(2), axis=0)
        mask = self._causal_mask(seq_len, past_len)
        cos, sin, qscale = self._rope_tables(position_ids)
        present_shape = ["batch", cfg.num_kv_heads, "total_seq", cfg.head_dim]
        for i, (past_k, past_v) in enumerate(pasts):
            p = f"layers.{i}."
            x = self._rms_norm(h, p + "input_layernorm.weight")
            q2d, k2d, v2d = self._linears(x, [p + f"self_attn.{n}_proj" for n in "qkv"])
            q = g.op("Mul", self._rope(self._heads(q2d, cfg.num_heads), cos, sin), qscale)
            k = self._rope(self._heads(k2d, cfg.num_kv_heads), cos, sin)
            v = self._heads(v2d, cfg.num_kv_heads)
            k = g.op("Concat", past_k, k, axis=2, name=f"present_key.{i}")
            v = g.op("Concat", past_v, v, axis=2, name=f"present_value.{i}")
            attn = self._attention(q, k, v, mask)
            self.attention_seams.append(dict(q=q2d, k=k2d, v=v2d, cos=cos, sin=sin, q_scale=qscale, mask=mask,
                                             past_key=past_k, past_value=past_v, present_key=k,
                                             present_value=v, out=attn))
            h = g.op("Add", h, self._linear(attn, p + "self_attn.o_proj"))
            x = self._rms_norm(h, p + "post_attention_layernorm.weight")
            gate, up = self._linears(x, [p + "mlp.gate_proj", p + "mlp.up_proj"])
            act = g.op("Mul", g.op("Mul", gate, g.op("Sigmoid", gate)), up)
            h = g.op("Add", h, self._linear(act, p + "mlp.down_proj"))
        last = g.op("Gather", h, g.op("Sub", seq_len, g.const(1)), axis=1)  # [B, H]: only the last token
        last = self._rms_norm(last, "norm.weight")
        if self.head_rows:
            head = self._rows_linear(last, "lm_head", self.head)
        else:
            head = self._linear(last, "lm_head", self.tensors["lm_head.weight"] if self.head is None else self.head)
        g.output(self._to_f32(head), "logits", "float32", ["batch", cfg.vocab_size])
        for i in range(cfg.num_layers):
            g.outputs.append(helper.make_tensor_value_info(f"present_key.{i}", self.onnx_dtype, present_shape))
            g.outputs.append(helper.make_tensor_value_info(f"present_value.{i}", self.onnx_dtype, present_shape))
        return g


def export_decoder(cfg: TextConfig, tensors: Mapping[str, np.ndarray], linears: Mapping[str, object],
                   out_dir: Path, dtype: str = "float32", head: object | None = None, head_rows: bool = False) -> Path:
    """Write decoder.onnx (+ .data); ``head_rows`` stores an INT4 / INT8 head in the rows form above."""
    missing = [f"layers.{i}.{n}" for i in range(cfg.num_layers) for n in LINEARS if f"layers.{i}.{n}" not in linears]
    if missing:
        raise ValueError(f"cannot export decoder: linear {missing[0]} has no weights")
    graph = DecoderGraph(cfg, tensors, linears, Path(out_dir) / "decoder.onnx", dtype, head, head_rows)
    seams = dict(num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                 layers=graph.attention_seams)
    return graph.build().save({ATTENTION_SEAMS_KEY: json.dumps(seams)})


#: Model metadata key under which the decoder states its head counts and lists, per layer, the
#: tensor names around its attention block (inputs q/k/v, RoPE tables, mask, cache; outputs):
#: the seams the TensorRT plugin rewrite (export/plugin_graph.py) cuts along.
ATTENTION_SEAMS_KEY = "edge_sdk.attention_seams"


#: Initializer suffixes of a linear in the rows form (`DecoderGraph._rows_linear`).
ROWS_SUFFIXES = ("qweight", "scales", "zero_points")
#: Initializer names of the head in decoder.onnx (what `DecoderGraph._linear` / `_rows_linear`
#: write for "lm_head"), by form.
HEAD_NAMES = {"quantized_t": ("lm_head.qweight_t", "lm_head.scales_t"), "float_t": ("lm_head.weight_t",),
              "rows": tuple(f"lm_head.{s}" for s in ROWS_SUFFIXES)}


def export_embedding(table: np.ndarray | object, out_dir: Path, dtype: str = "float32", *,
                     tied_to: Path | None = None) -> Path:
    """`input_ids` [B, S] -> `inputs_embeds` [B, S, H] over the table in the head's form: W^T
    [H, V], float or INT4 / INT8 with block scales (dequantized by `DequantizeLinear`, as in the
    decoder), or the rows form. ``table`` is a float [V, H] array or an Int4Linear / Int8Linear [V, H].
    With ``tied_to`` (the decoder.onnx of a tied model) the graph's table is the decoder's head
    itself, in whichever form it has: its initializers point at the same bytes of
    decoder.onnx.data, so the matrix is stored once.

    Runtimes do not run this graph: they gather the rows they need on the host
    (runtime/embedding.py) from these initializers; the graph states what that lookup computes."""
    out_dir = Path(out_dir)
    g = GraphBuilder("ministral3_embed", out_dir / "embed.onnx")
    ids = g.input("input_ids", "int64", ["batch", "seq"])
    quantized = hasattr(table, "block")
    hidden = table.shape[1]
    if tied_to is not None:
        form, names = _shared_head_initializers(g, Path(tied_to))
    elif quantized:
        form = "quantized_t"
        names = (_quantized_weight_t(g, "embed.qweight_t", table),
                 g.weight(table.scales.T.astype(_np_dtype(dtype)), "embed.scales_t"))
    else:
        form, names = "float_t", (g.weight(np.asarray(table).T.astype(_np_dtype(dtype)), "embed.weight_t"),)
    if form == "rows":
        w = g.op("DequantizeLinear", *names, axis=1, block_size=table.block)
        g.output(g.op("Gather", w, ids, axis=0), "inputs_embeds", dtype, ["batch", "seq", hidden])
        return g.save()
    w_t = g.op("DequantizeLinear", *names, axis=0, block_size=table.block) if quantized else names[0]
    rows = g.op("Gather", w_t, ids, axis=1)  # [H, B, S]: only the looked-up columns
    g.output(g.op("Transpose", rows, perm=[1, 2, 0]), "inputs_embeds", dtype, ["batch", "seq", hidden])
    return g.save()


def _shared_head_initializers(g: GraphBuilder, decoder_path: Path) -> tuple[str, tuple[str, ...]]:
    """The decoder's head form and initializers, as external tensors of this graph (same file,
    same offsets)."""
    import onnx

    decoder = onnx.load(str(decoder_path), load_external_data=False)
    inits = {t.name: t for t in decoder.graph.initializer}
    form = next(f for f, names in HEAD_NAMES.items() if names[0] in inits)
    names = []
    for name in HEAD_NAMES[form]:
        src = inits[name]
        if src.data_location != TensorProto.EXTERNAL:
            raise ValueError(f"{decoder_path}: head initializer {name} is not in external data")
        t = TensorProto(name=name, data_type=src.data_type, dims=src.dims, data_location=TensorProto.EXTERNAL)
        t.external_data.extend(src.external_data)
        names.append(g.tensor(t))
    return form, tuple(names)
