"""Export Voxtral's audio encoder + projector as one ONNX graph (`audio.onnx`).

Contract (one request's audio per call):
- input  `input_features` float32 [chunks, 128, 3000]: the log-mel of media.audio.log_mel, one
  row per 30 s chunk;
- output `audio_embeds` [chunks * 375, text_hidden] in the compute dtype: the rows that replace
  the `[AUDIO]` tokens, in order.

Built from basic ops, like vision.onnx: the two convolutions (kernel 3, padding 1, strides 1 and 2)
are three shifted slices side by side and one MatMul (im2col), time-major; LayerNorm with bias
and the erf GELU from encoder_graph; bidirectional multi-head attention with q/v/out biases and
no k bias, the 1/sqrt(head_dim) scale on q; the projector concatenates every 4 encoder frames
(a reshape to intermediate_size) before linear_1 -> GELU -> linear_2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..models.config import AudioConfig
from .encoder_graph import EncoderGraph, np_dtype

AUDIO_FILE = "audio.onnx"
MEL_FRAMES = 3000


def whisper_positions(length: int, channels: int, max_timescale: float = 10_000.0) -> np.ndarray:
    """Whisper's sinusoidal position table [length, channels]: sines then cosines. The angles are
    computed in float64; float32 implementations (Whisper's own) differ from it, and from one
    another, by up to ~1e-4 at position 1500, where an angle's float32 rounding is that large."""
    increment = np.log(max_timescale) / (channels // 2 - 1)
    inv = np.exp(-increment * np.arange(channels // 2))
    scaled = np.arange(length)[:, None] * inv[None, :]
    return np.concatenate([np.sin(scaled), np.cos(scaled)], axis=1).astype(np.float32)


def load_audio_weights(checkpoint: Any) -> dict[str, np.ndarray]:
    """All `audio_tower.*` / `multi_modal_projector.*` tensors of a checkpoint, as float32; the
    position table computed where the checkpoint has none (Mistral's native layout)."""
    names = [n for n in checkpoint.names() if n.startswith(("audio_tower.", "multi_modal_projector."))]
    weights = {n: np.ascontiguousarray(checkpoint.get(n), dtype=np.float32) for n in names}
    cfg = checkpoint.config.audio
    if "audio_tower.embed_positions.weight" not in weights and cfg is not None:
        weights["audio_tower.embed_positions.weight"] = whisper_positions(cfg.max_source_positions, cfg.hidden_size)
    return weights


class AudioGraph(EncoderGraph):
    def __init__(self, weights: Mapping[str, np.ndarray], cfg: AudioConfig, text_hidden: int, path: Path,
                 dtype: str = "float32"):
        super().__init__(weights, "voxtral_audio", path, dtype)
        self.cfg = cfg
        self.text_hidden = text_hidden

    def _conv(self, x: str, name: str, frames: int, stride: int) -> str:
        """x [n, frames, in] (time-major) -> [n, frames // stride, out]: kernel 3, padding 1."""
        g = self.g
        w = self._get(name + ".weight")  # [out, in, 3]
        padded = g.op("Pad", x, g.const([0, 1, 0, 0, 1, 0]))
        out_frames = frames // stride
        taps = [g.op("Slice", padded, g.const([j]), g.const([j + stride * (out_frames - 1) + 1]), g.const([1]),
                     g.const([stride])) for j in range(3)]
        cols = g.op("Concat", *taps, axis=-1)  # [n, out_frames, 3 * in]: tap-major, as W is rearranged
        y = g.op("MatMul", cols, self._param(w.transpose(2, 1, 0).reshape(-1, w.shape[0]), name + ".weight_cols"))
        return g.op("Add", y, self._param(self._get(name + ".bias"), name + ".bias"))

    def _attention(self, x: str, pre: str) -> str:
        g, cfg = self.g, self.cfg
        head_dim = cfg.hidden_size // cfg.num_heads
        q = g.op("Mul", self._linear(x, pre + "q_proj"), self._scalar(head_dim ** -0.5))
        k = self._linear(x, pre + "k_proj")
        v = self._linear(x, pre + "v_proj")
        split = g.const([0, -1, cfg.num_heads, head_dim])
        q, k, v = (g.op("Transpose", g.op("Reshape", t, split), perm=[0, 2, 1, 3]) for t in (q, k, v))
        scores = self._to_f32(g.op("MatMul", q, g.op("Transpose", k, perm=[0, 1, 3, 2])))
        probs = self._to_compute(g.op("Softmax", scores, axis=-1))
        out = g.op("Transpose", g.op("MatMul", probs, v), perm=[0, 2, 1, 3])
        return self._linear(g.op("Reshape", out, g.const([0, -1, cfg.hidden_size])), pre + "out_proj")

    def build(self) -> Path:
        g, cfg = self.g, self.cfg
        feats = g.input("input_features", "float32", ["chunks", cfg.num_mel_bins, MEL_FRAMES])
        x = self._to_compute(g.op("Transpose", feats, perm=[0, 2, 1]))  # [n, 3000, mels]
        x = self._gelu(self._conv(x, "audio_tower.conv1", MEL_FRAMES, 1))
        x = self._gelu(self._conv(x, "audio_tower.conv2", MEL_FRAMES, 2))  # [n, 1500, hidden]
        x = g.op("Add", x, self._param(self._get("audio_tower.embed_positions.weight"), "audio_tower.embed_positions"))
        for i in range(cfg.num_layers):
            pre = f"audio_tower.layers.{i}."
            x = g.op("Add", x, self._attention(self._layer_norm(x, pre + "self_attn_layer_norm", cfg.layer_norm_eps),
                                               pre + "self_attn."))
            y = self._layer_norm(x, pre + "final_layer_norm", cfg.layer_norm_eps)
            x = g.op("Add", x, self._linear(self._gelu(self._linear(y, pre + "fc1")), pre + "fc2"))
        x = self._layer_norm(x, "audio_tower.layer_norm", cfg.layer_norm_eps)
        x = g.op("Reshape", x, g.const([-1, cfg.intermediate_size]))  # 4 frames side by side
        x = self._linear(self._gelu(self._linear(x, "multi_modal_projector.linear_1")), "multi_modal_projector.linear_2")
        g.output(x, "audio_embeds", self.dtype, ["audio_tokens", self.text_hidden])
        return g.save({"edge_sdk.graph": "audio", "tokens_per_chunk": cfg.tokens_per_chunk,
                       "text_hidden": self.text_hidden, "compute_dtype": self.dtype})


def export_audio(weights: Mapping[str, np.ndarray], cfg: AudioConfig, text_hidden: int, out_dir: Path,
                 dtype: str = "float32") -> Path:
    """Write `out_dir/audio.onnx` (+ `.data`) and return its path."""
    np_dtype(dtype)
    missing = [n for n in ("audio_tower.conv1.weight", "audio_tower.embed_positions.weight",
                           "multi_modal_projector.linear_1.weight") if n not in weights]
    if missing:
        raise ValueError(f"cannot export the audio encoder: weight {missing[0]} is missing")
    return AudioGraph(weights, cfg, text_hidden, Path(out_dir) / AUDIO_FILE, dtype).build()
