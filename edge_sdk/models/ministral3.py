"""The Ministral 3 text decoder as a plain NumPy forward pass.

This is the SDK's own reference: calibration runs it to collect activations, and the quantized
engines are checked against it with dequantized weights. It is itself checked against
transformers' Ministral3 forward in the tests. Batch 1, float32, readable over fast.
"""

from __future__ import annotations

from typing import Callable, Protocol

import numpy as np

from .config import RopeConfig, TextConfig

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


class TextWeights(Protocol):
    """Where the forward gets its parameters: float tensors, and linears that may be quantized."""

    def tensor(self, name: str) -> np.ndarray: ...

    def linear(self, name: str, x: np.ndarray) -> np.ndarray: ...


class FloatWeights:
    """Checkpoint weights as float32 (FP8 dequantized), converted once and kept."""

    def __init__(self, checkpoint):
        self.checkpoint = checkpoint
        self._cache: dict[str, np.ndarray] = {}

    def tensor(self, name: str) -> np.ndarray:
        if name not in self._cache:
            self._cache[name] = self.checkpoint.lm_head() if name == "lm_head.weight" else self.checkpoint.get(name)
        return self._cache[name]

    def linear(self, name: str, x: np.ndarray) -> np.ndarray:
        return x @ self.tensor(f"{name}.weight").T


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    x32 = x.astype(np.float32)
    return x32 / np.sqrt(np.mean(x32 * x32, axis=-1, keepdims=True) + eps) * weight


def rope_cos_sin(rope: RopeConfig, head_dim: int, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin tables [T, head_dim] in the rotate-half layout (emb = cat(freqs, freqs))."""
    inv_freq = np.asarray(rope.inv_freq(head_dim), dtype=np.float32)
    freqs = positions.astype(np.float32)[:, None] * inv_freq[None, :]
    emb = np.concatenate([freqs, freqs], axis=-1)
    scale = rope.attention_factor()
    return np.cos(emb) * scale, np.sin(emb) * scale


def rotate_half(x: np.ndarray) -> np.ndarray:
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def query_scale(rope: RopeConfig, positions: np.ndarray) -> np.ndarray:
    """Llama-4 style attention temperature for queries: 1 + beta * ln(1 + floor(pos / orig))."""
    if rope.llama_4_scaling_beta is None or not rope.original_max_position_embeddings:
        return np.ones(len(positions), dtype=np.float32)
    steps = np.floor(positions / rope.original_max_position_embeddings)
    return (1.0 + rope.llama_4_scaling_beta * np.log1p(steps)).astype(np.float32)


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    x = x - x.max(axis=axis, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=axis, keepdims=True)


KVCache = list  # per layer: (keys [kv_heads, S, head_dim], values [kv_heads, S, head_dim])


def forward(w: TextWeights, cfg: TextConfig, ids: np.ndarray | None = None, positions: np.ndarray | None = None,
            cache: KVCache | None = None, embeds: np.ndarray | None = None,
            capture: Callable[[str, np.ndarray], None] | None = None) -> tuple[np.ndarray, KVCache]:
    """Logits [T, vocab] for T new tokens after the cached ones, and the extended cache.

    Pass `ids` or precomputed `embeds` [T, hidden] (image features already merged in).
    `capture(linear_name, x)` sees the input of every linear, the head ("lm_head") last:
    calibration collects it.
    """
    h = w.tensor("embed_tokens.weight")[np.asarray(ids)] if embeds is None else np.asarray(embeds, np.float32)
    T = h.shape[0]
    past = 0 if not cache else cache[0][0].shape[1]
    positions = np.arange(past, past + T) if positions is None else np.asarray(positions)
    cos, sin = rope_cos_sin(cfg.rope, cfg.head_dim, positions)
    qscale = query_scale(cfg.rope, positions)[None, :, None]
    groups = cfg.num_heads // cfg.num_kv_heads
    # New token t attends to every cached token and to new tokens up to itself.
    mask = np.triu(np.full((T, past + T), -np.inf, dtype=np.float32), k=past + 1)
    new_cache: KVCache = []

    def lin(name: str, x: np.ndarray) -> np.ndarray:
        if capture:
            capture(name, x)
        return w.linear(name, x)

    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        x = rms_norm(h, w.tensor(p + "input_layernorm.weight"), cfg.rms_norm_eps)
        q = lin(p + "self_attn.q_proj", x).reshape(T, cfg.num_heads, cfg.head_dim).transpose(1, 0, 2)
        k = lin(p + "self_attn.k_proj", x).reshape(T, cfg.num_kv_heads, cfg.head_dim).transpose(1, 0, 2)
        v = lin(p + "self_attn.v_proj", x).reshape(T, cfg.num_kv_heads, cfg.head_dim).transpose(1, 0, 2)
        q = (q * cos + rotate_half(q) * sin) * qscale
        k = k * cos + rotate_half(k) * sin
        if cache:
            k = np.concatenate([cache[i][0], k], axis=1)
            v = np.concatenate([cache[i][1], v], axis=1)
        new_cache.append((k, v))
        kg = np.repeat(k, groups, axis=0)
        vg = np.repeat(v, groups, axis=0)
        scores = q @ kg.transpose(0, 2, 1) / np.sqrt(cfg.head_dim) + mask
        attn = (softmax(scores) @ vg).transpose(1, 0, 2).reshape(T, cfg.num_heads * cfg.head_dim)
        h = h + lin(p + "self_attn.o_proj", attn)
        x = rms_norm(h, w.tensor(p + "post_attention_layernorm.weight"), cfg.rms_norm_eps)
        gate = lin(p + "mlp.gate_proj", x)
        act = gate / (1.0 + np.exp(-gate)) * lin(p + "mlp.up_proj", x)
        h = h + lin(p + "mlp.down_proj", act)
    h = rms_norm(h, w.tensor("norm.weight"), cfg.rms_norm_eps)
    if capture:
        capture("lm_head", h)
    return h @ w.tensor("lm_head.weight").T, new_cache
