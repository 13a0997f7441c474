"""Export the Pixtral vision encoder + Mistral3 projector as one ONNX graph (`vision.onnx`).

Contract (one image per call; the runtime calls once per image):
- input  `pixel_values`   float32 [1, 3, height, width], normalised (media.image.preprocess_image),
  height and width multiples of patch * merge (28), at most the profile's max_image_size;
- output `image_features` [image_tokens, text_hidden] in the compute dtype (float32 or float16, the
  same dtype as embed.onnx's `inputs_embeds`), image_tokens = (height/28) * (width/28), row-major:
  the rows that replace the `[IMG]` tokens in order.

Built node by node from basic ops that ONNX Runtime and TensorRT 10.3's parser both accept
(MatMul, Reshape, Transpose, Split, Slice, Concat, Expand, int64 Range, Cos/Sin, ReduceMean, Sqrt,
Reciprocal, Softmax, Sigmoid, Erf, Cast; no opset-23 Attention / RotaryEmbedding /
RMSNormalization). Deliberate choices:
- the patch conv is a reshape + MatMul (no Conv: no float16 Conv kernel needed on the CPU);
- 2-D RoPE angles are computed in-graph from the input's height and width (Range over the patch
  grid), in float32, then cast; rotate-half is Slice/Concat with the sign folded into sin;
- 1/sqrt(head_dim) is folded into the q weights (exact when head_dim is a power of 4, as 64 is);
- q, k, v are one MatMul with a fused [D, 3*heads*head_dim] weight, then Split;
- RMSNorm variance in float32 whatever the compute dtype (as transformers does); softmax in the
  compute dtype (TensorRT and ORT-CUDA accumulate it in float32 internally).
Weights go to one external-data file `vision.onnx.data` so a full-size encoder never meets
protobuf's 2 GB limit.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from onnx import TensorProto

from ..models.config import VisionConfig
from ..models.pixtral import VISION_NORM_EPS, check_weights, rope_inv_freq
from .encoder_graph import EncoderGraph, np_dtype

VISION_FILE = "vision.onnx"


class VisionGraph(EncoderGraph):
    def __init__(self, weights: Mapping[str, np.ndarray], cfg: VisionConfig, text_hidden: int,
                 path: Path, dtype: str = "float32"):
        super().__init__(weights, "pixtral_vision", path, dtype)
        self.cfg = cfg
        self.text_hidden = text_hidden

    def _act(self, x: str) -> str:
        g = self.g
        if self.cfg.hidden_act == "silu":
            return g.op("Mul", x, g.op("Sigmoid", x))
        return self._gelu(x)

    # --- pieces ------------------------------------------------------------------------------
    def _grid(self, pixels: str) -> tuple[str, str]:
        """(rows, cols) of patches as int64 [1] tensors, from the input's shape."""
        g, p = self.g, self.cfg.patch_size
        shape = g.op("Shape", pixels)
        rows = g.op("Div", g.op("Slice", shape, g.const([2]), g.const([3])), g.const([p]))
        cols = g.op("Div", g.op("Slice", shape, g.const([3]), g.const([4])), g.const([p]))
        return rows, cols

    def _patch_embed(self, pixels: str, rows: str, cols: str) -> str:
        g, cfg = self.g, self.cfg
        c, p, d = cfg.num_channels, cfg.patch_size, cfg.hidden_size
        x = self._to_compute(pixels)
        x = g.op("Reshape", x, g.op("Concat", g.const([c]), rows, g.const([p]), cols, g.const([p]), axis=0))
        x = g.op("Transpose", x, perm=[1, 3, 0, 2, 4])  # [rows, cols, c, dy, dx]
        x = g.op("Reshape", x, g.const([-1, c * p * p]))
        conv = self._get("vision_tower.patch_conv.weight").reshape(d, c * p * p)
        return g.op("MatMul", x, self._param(conv.T, "vision_tower.patch_conv.weight_t"))

    def _rope(self, rows: str, cols: str) -> tuple[str, str]:
        """cos, signed sin [N, 1, head_dim] in the compute dtype (N = rows*cols, row-major)."""
        g, hd = self.g, self.cfg.head_dim
        inv_r, inv_c = rope_inv_freq(hd, self.cfg.rope_theta)
        q = inv_r.shape[0]
        f32 = TensorProto.FLOAT
        # int64 Range over shape values (TensorRT wants float Range bounds to be initializers), then Cast.
        r = g.op("Cast", g.op("Range", g.const(0), g.op("Squeeze", rows, g.const([0])), g.const(1)), to=f32)
        c = g.op("Cast", g.op("Range", g.const(0), g.op("Squeeze", cols, g.const([0])), g.const(1)), to=f32)
        ang_r = g.op("Mul", g.op("Unsqueeze", r, g.const([1, 2])), g.const(inv_r.reshape(1, 1, q), np.float32))
        ang_c = g.op("Mul", g.op("Unsqueeze", c, g.const([0, 2])), g.const(inv_c.reshape(1, 1, q), np.float32))
        full = g.op("Concat", rows, cols, g.const([q]), axis=0)
        ang = g.op("Concat", g.op("Expand", ang_r, full), g.op("Expand", ang_c, full), axis=2)  # [h, w, hd/2]
        ang = g.op("Reshape", ang, g.const([-1, 1, hd // 2]))
        emb = g.op("Concat", ang, ang, axis=2)  # [N, 1, hd]
        sign = np.concatenate([-np.ones(hd // 2), np.ones(hd // 2)]).astype(np.float32).reshape(1, 1, hd)
        cos = self._to_compute(g.op("Cos", emb))
        sin = self._to_compute(g.op("Mul", g.op("Sin", emb), g.const(sign, np.float32)))
        return cos, sin

    def _apply_rope(self, x: str, cos: str, sin: str) -> str:
        """x [N, heads, hd]: x*cos + rotate_half(x)*sin, with rotate_half's sign inside `sin`."""
        g, hd = self.g, self.cfg.head_dim
        x1 = g.op("Slice", x, g.const([0]), g.const([hd // 2]), g.const([2]))
        x2 = g.op("Slice", x, g.const([hd // 2]), g.const([hd]), g.const([2]))
        return g.op("Add", g.op("Mul", x, cos), g.op("Mul", g.op("Concat", x2, x1, axis=2), sin))

    def _attention(self, x: str, pre: str, cos: str, sin: str) -> str:
        g, cfg = self.g, self.cfg
        heads, hd = cfg.num_heads, cfg.head_dim
        wq = self._get(pre + "q_proj.weight") * np.float32(hd ** -0.5)
        wqkv = np.concatenate([wq, self._get(pre + "k_proj.weight"), self._get(pre + "v_proj.weight")], axis=0)
        qkv = g.op("MatMul", x, self._param(wqkv.T, pre + "qkv_proj.weight_t"))
        q, k, v = g.ops("Split", qkv, g.const([heads * hd] * 3), n_outputs=3, axis=1)
        shape = g.const([-1, heads, hd])
        q = self._apply_rope(g.op("Reshape", q, shape), cos, sin)
        k = self._apply_rope(g.op("Reshape", k, shape), cos, sin)
        q = g.op("Transpose", q, perm=[1, 0, 2])  # [heads, N, hd]
        kt = g.op("Transpose", k, perm=[1, 2, 0])  # [heads, hd, N]
        v = g.op("Transpose", g.op("Reshape", v, shape), perm=[1, 0, 2])
        probs = g.op("Softmax", g.op("MatMul", q, kt), axis=-1)
        out = g.op("Transpose", g.op("MatMul", probs, v), perm=[1, 0, 2])  # [N, heads, hd]
        out = g.op("Reshape", out, g.const([-1, heads * hd]))
        return self._linear(out, pre + "o_proj")

    def _merge(self, x: str, rows: str, cols: str) -> str:
        g, m, d = self.g, self.cfg.spatial_merge_size, self.cfg.hidden_size
        mm = g.const([m])
        shape = g.op("Concat", g.op("Div", rows, mm), mm, g.op("Div", cols, mm), mm, g.const([d]), axis=0)
        x = g.op("Transpose", g.op("Reshape", x, shape), perm=[0, 2, 4, 1, 3])  # [h/m, w/m, d, dy, dx]
        return g.op("Reshape", x, g.const([-1, d * m * m]))

    # --- graph -------------------------------------------------------------------------------
    def build(self, metadata: Mapping[str, str] | None = None) -> Path:
        g, cfg = self.g, self.cfg
        pixels = g.input("pixel_values", "float32", [1, cfg.num_channels, "height", "width"])
        rows, cols = self._grid(pixels)
        x = self._patch_embed(pixels, rows, cols)
        x = self._rms_norm(x, "vision_tower.ln_pre.weight", VISION_NORM_EPS)
        cos, sin = self._rope(rows, cols)
        for i in range(cfg.num_layers):
            pre = f"vision_tower.transformer.layers.{i}."
            y = self._rms_norm(x, pre + "attention_norm.weight", VISION_NORM_EPS)
            x = g.op("Add", x, self._attention(y, pre + "attention.", cos, sin))
            y = self._rms_norm(x, pre + "ffn_norm.weight", VISION_NORM_EPS)
            ff = pre + "feed_forward."
            act = g.op("Mul", self._act(self._linear(y, ff + "gate_proj")), self._linear(y, ff + "up_proj"))
            x = g.op("Add", x, self._linear(act, ff + "down_proj"))
        x = self._rms_norm(x, "multi_modal_projector.norm.weight", cfg.rms_norm_eps)
        x = self._merge(x, rows, cols)
        x = self._linear(x, "multi_modal_projector.patch_merger.merging_layer")
        x = self._gelu(self._linear(x, "multi_modal_projector.linear_1"))
        x = self._linear(x, "multi_modal_projector.linear_2")
        g.output(x, "image_features", self.dtype, ["image_tokens", self.text_hidden])
        return g.save(metadata)


def export_vision(weights: Mapping[str, np.ndarray], cfg: VisionConfig, text_hidden: int, out_dir: Path,
                  dtype: str = "float32", *, max_image_size: int | None = None) -> Path:
    """Write `out_dir/vision.onnx` (+ `vision.onnx.data`) and return its path.

    `weights`: canonical names -> arrays (e.g. `models.pixtral.load_vision_weights(checkpoint)`).
    `dtype`: compute dtype, float32 (CPU profiles) or float16 (GPU profiles). `max_image_size`
    (optional) is recorded in the model metadata for the TensorRT profile's max shape.
    """
    np_dtype(dtype)
    out = check_weights(weights, cfg)
    if out != text_hidden:
        raise ValueError(f"projector outputs {out} features but text_hidden is {text_hidden}")
    meta = {"edge_sdk.graph": "vision", "patch_size": cfg.patch_size, "spatial_merge_size": cfg.spatial_merge_size,
            "text_hidden": text_hidden, "compute_dtype": dtype,
            "max_image_size": max_image_size if max_image_size is not None else cfg.image_size}
    return VisionGraph(weights, cfg, text_hidden, Path(out_dir) / VISION_FILE, dtype).build(meta)


# ---------------------------------------------------------------------------------------------
# timing (used by `edge-sdk bench`)


def vision_session(path: Path, *, threads: int | None = None, providers: Sequence[str] | None = None):
    """An ONNX Runtime session for vision.onnx (CPU unless `providers` says otherwise)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), sess_options=opts, providers=list(providers or ["CPUExecutionProvider"]))


def bench_vision(model_path: Path, sizes: Sequence[int] = (224, 448, 896), *, repeats: int = 3, warmup: int = 1,
                 threads: int | None = None, providers: Sequence[str] | None = None, session=None,
                 seed: int = 0) -> list[dict]:
    """Per-frame preprocessing and vision-encoder time for square BGR frames of each size.

    Each frame is a random uint8 S x S BGR image, preprocessed with max_image_size = S (so S x S
    pixels reach the encoder when S is a multiple of 28). Returns one dict per size:
    `{"size", "pixels": [H, W], "image_tokens", "preprocess_ms", "encode_ms", "total_ms"}` with the
    median of `repeats` timed runs after `warmup` untimed ones.
    """
    from ..media.image import preprocess_image

    sess = session or vision_session(Path(model_path), threads=threads, providers=providers)
    in_type = sess.get_inputs()[0].type
    feed_dtype = np.float16 if "float16" in in_type else np.float32
    rng = np.random.default_rng(seed)
    results = []
    for size in sizes:
        frame = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        pre, enc = [], []
        for i in range(warmup + repeats):
            t0 = time.perf_counter()
            px = preprocess_image(frame, max_image_size=size)
            t1 = time.perf_counter()
            feats = sess.run(None, {"pixel_values": px[None].astype(feed_dtype, copy=False)})[0]
            t2 = time.perf_counter()
            if i >= warmup:
                pre.append((t1 - t0) * 1e3)
                enc.append((t2 - t1) * 1e3)
        p, e = float(np.median(pre)), float(np.median(enc))
        results.append({"size": size, "pixels": [int(px.shape[1]), int(px.shape[2])],
                        "image_tokens": int(feats.shape[0]), "preprocess_ms": p, "encode_ms": e,
                        "total_ms": p + e})
    return results
