"""NumPy reference forward of the Pixtral vision encoder and the Mistral3 projector.

The oracle that the ONNX vision graph is checked against (after transformers). Pure NumPy, float32
(float64 only inside the erf); never imports torch or transformers.

Per image of H x W pixels (multiples of patch * merge = 28), h = H/14, w = W/14 patches:

    x = patches(pixels) @ patch_conv.reshape(D, 3*14*14).T      # [h*w, D], row-major patches
    x = rmsnorm(x) * ln_pre                                    # eps 1e-5
    cos, sin = 2-D RoPE(row, col)                              # theta 10000, rotate-half
    for each layer:                                            # pre-norm, eps 1e-5
        y = rmsnorm(x) * attention_norm
        q, k, v = y Wq.T, y Wk.T, y Wv.T  (heads x head_dim), RoPE on q, k
        x += softmax(q k.T / sqrt(head_dim)) v Wo.T            # non-causal, within one image
        y = rmsnorm(x) * ffn_norm
        x += (silu(y Wg.T) * (y Wu.T)) Wd.T
    x = rmsnorm(x) * projector.norm                            # eps = text rms_norm_eps
    x = merge 2x2 patches -> [h/2 * w/2, 4D] -> merging_layer  # order (d, dy, dx) like unfold
    out = linear_2(gelu_erf(linear_1(x)))                      # [(H/28)*(W/28), text_hidden]

Several images form one sequence with a block-diagonal mask in transformers; the blocks never
interact, so attention is computed image by image here (the same numbers, less memory).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

from .config import VisionConfig

# transformers' PixtralRMSNorm instances in the encoder are built with eps=1e-5 regardless of config.
VISION_NORM_EPS = 1e-5


# ---------------------------------------------------------------------------------------------
# weights


def vision_weight_names(cfg: VisionConfig, *, with_optional: bool = False) -> list[str]:
    """Canonical names the encoder and projector read (optional projector biases on request)."""
    names = ["vision_tower.patch_conv.weight", "vision_tower.ln_pre.weight"]
    for i in range(cfg.num_layers):
        p = f"vision_tower.transformer.layers.{i}."
        names += [p + "attention_norm.weight", p + "ffn_norm.weight"]
        names += [p + f"attention.{x}_proj.weight" for x in "qkvo"]
        names += [p + f"feed_forward.{x}_proj.weight" for x in ("gate", "up", "down")]
    names += ["multi_modal_projector.norm.weight", "multi_modal_projector.patch_merger.merging_layer.weight",
              "multi_modal_projector.linear_1.weight", "multi_modal_projector.linear_2.weight"]
    if with_optional:
        names += ["multi_modal_projector.linear_1.bias", "multi_modal_projector.linear_2.bias"]
    return names


def load_vision_weights(checkpoint: Any) -> dict[str, np.ndarray]:
    """All `vision_tower.*` / `multi_modal_projector.*` tensors of a `models.checkpoint.Checkpoint`
    as float32 arrays (a plain dict: what `encode_images` and `export_vision` take)."""
    names = [n for n in checkpoint.names() if n.startswith(("vision_tower.", "multi_modal_projector."))]
    return {n: np.ascontiguousarray(checkpoint.get(n), dtype=np.float32) for n in names}


def _get(weights: Mapping[str, np.ndarray], name: str) -> np.ndarray:
    try:
        t = weights[name]
    except KeyError:
        raise KeyError(f"vision weight {name} is missing") from None
    return np.asarray(t, dtype=np.float32)


def _opt(weights: Mapping[str, np.ndarray], name: str) -> np.ndarray | None:
    try:
        return np.asarray(weights[name], dtype=np.float32) if name in weights else None
    except TypeError:
        return None




def check_weights(weights: Mapping[str, np.ndarray], cfg: VisionConfig) -> int:
    """Check shapes against `cfg`; return the projector's output width (the text hidden size)."""
    d, p, c = cfg.hidden_size, cfg.patch_size, cfg.num_channels
    hd = cfg.num_heads * cfg.head_dim
    expect = {"vision_tower.patch_conv.weight": (d, c, p, p), "vision_tower.ln_pre.weight": (d,),
              "multi_modal_projector.norm.weight": (d,),
              "multi_modal_projector.patch_merger.merging_layer.weight": (d, d * cfg.spatial_merge_size ** 2)}
    for i in range(cfg.num_layers):
        pre = f"vision_tower.transformer.layers.{i}."
        for x in "qkv":
            expect[pre + f"attention.{x}_proj.weight"] = (hd, d)
        expect[pre + "attention.o_proj.weight"] = (d, hd)
        expect[pre + "feed_forward.gate_proj.weight"] = (cfg.intermediate_size, d)
        expect[pre + "feed_forward.up_proj.weight"] = (cfg.intermediate_size, d)
        expect[pre + "feed_forward.down_proj.weight"] = (d, cfg.intermediate_size)
    for name, shape in expect.items():
        got = tuple(np.shape(_get(weights, name)))
        if got != shape:
            raise ValueError(f"vision weight {name} has shape {got}, config says {shape}")
    l1 = _get(weights, "multi_modal_projector.linear_1.weight")
    l2 = _get(weights, "multi_modal_projector.linear_2.weight")
    if l1.shape[1] != d or l2.shape != (l1.shape[0], l1.shape[0]):
        raise ValueError(f"projector linear_1 {l1.shape} / linear_2 {l2.shape} do not chain from {d}")
    if cfg.projector_hidden_act not in ("gelu",):
        raise ValueError(f"projector_hidden_act {cfg.projector_hidden_act!r} is not supported (gelu)")
    if cfg.hidden_act not in ("silu", "gelu"):
        raise ValueError(f"vision hidden_act {cfg.hidden_act!r} is not supported (silu, gelu)")
    return int(l2.shape[0])


# ---------------------------------------------------------------------------------------------
# math


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    var = np.mean(np.square(x, dtype=np.float32), axis=-1, keepdims=True)
    return (x / np.sqrt(var + np.float32(eps))) * weight


def erf(x: np.ndarray) -> np.ndarray:
    """Vectorised erf, |error| < 1.2e-7 (Numerical Recipes' Chebyshev erfc), computed in float64."""
    z = np.abs(x.astype(np.float64))
    t = 1.0 / (1.0 + 0.5 * z)
    poly = -z * z - 1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418 + t * (
        -0.18628806 + t * (0.27886807 + t * (-1.13520398 + t * (1.48851587 + t * (
            -0.82215223 + t * 0.17087277))))))))
    erfc = t * np.exp(poly)
    return np.where(x >= 0, 1.0 - erfc, erfc - 1.0)


def gelu(x: np.ndarray) -> np.ndarray:
    """Exact (erf) GELU, as torch.nn.GELU() / ACT2FN['gelu']."""
    return (0.5 * x.astype(np.float64) * (1.0 + erf(x / math.sqrt(2.0)))).astype(np.float32)


def silu(x: np.ndarray) -> np.ndarray:
    return x / (np.float32(1.0) + np.exp(-x))


def _act(x: np.ndarray, name: str) -> np.ndarray:
    return silu(x) if name == "silu" else gelu(x)


def rope_inv_freq(head_dim: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """(row frequencies, column frequencies), each head_dim/4 long."""
    inv = (1.0 / (np.float32(theta) ** (np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim))))
    inv = inv.astype(np.float32)
    return inv[0::2], inv[1::2]


def rope_2d(rows: int, cols: int, head_dim: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin [rows*cols, head_dim] for patches in row-major order:
    angle = cat(r * inv[0::2], c * inv[1::2]), emb = cat(angle, angle)."""
    inv_r, inv_c = rope_inv_freq(head_dim, theta)
    r = np.repeat(np.arange(rows, dtype=np.float32), cols)
    c = np.tile(np.arange(cols, dtype=np.float32), rows)
    ang = np.concatenate([r[:, None] * inv_r[None, :], c[:, None] * inv_c[None, :]], axis=1)
    emb = np.concatenate([ang, ang], axis=1)
    return np.cos(emb).astype(np.float32), np.sin(emb).astype(np.float32)


def _rotate_half(x: np.ndarray) -> np.ndarray:
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def _attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float) -> np.ndarray:
    """q, k, v [heads, N, hd] -> [N, heads*hd]; one head at a time to bound memory."""
    heads, n, hd = q.shape
    out = np.empty((n, heads, hd), dtype=np.float32)
    for h in range(heads):
        s = (q[h] @ k[h].T) * np.float32(scale)
        s -= s.max(axis=-1, keepdims=True)
        np.exp(s, out=s)
        s /= s.sum(axis=-1, keepdims=True)
        out[:, h, :] = s @ v[h]
    return out.reshape(n, heads * hd)


def _as_chw(pixels: np.ndarray, cfg: VisionConfig) -> np.ndarray:
    x = np.asarray(pixels, dtype=np.float32)
    if x.ndim == 4 and x.shape[0] == 1:
        x = x[0]
    if x.ndim != 3 or x.shape[0] != cfg.num_channels:
        raise ValueError(f"pixels must be [{cfg.num_channels}, H, W] (or [1, {cfg.num_channels}, H, W]), "
                         f"got {x.shape}")
    unit = cfg.patch_size * cfg.spatial_merge_size
    if x.shape[1] % unit or x.shape[2] % unit or x.shape[1] == 0 or x.shape[2] == 0:
        raise ValueError(f"pixel height and width must be positive multiples of {unit}, got {x.shape[1:]}")
    return x


def patchify(pixels: np.ndarray, patch: int) -> np.ndarray:
    """[C, H, W] -> [(H/p)*(W/p), C*p*p] in row-major patch order, (c, dy, dx) within a patch
    (the flattening of the Conv2d kernel)."""
    c, hh, ww = pixels.shape
    h, w = hh // patch, ww // patch
    x = pixels.reshape(c, h, patch, w, patch).transpose(1, 3, 0, 2, 4)
    return x.reshape(h * w, c * patch * patch)


def merge_patches(x: np.ndarray, rows: int, cols: int, merge: int) -> np.ndarray:
    """[rows*cols, D] -> [(rows/m)*(cols/m), D*m*m], feature order (d, dy, dx) like torch unfold."""
    d = x.shape[-1]
    g = x.reshape(rows // merge, merge, cols // merge, merge, d).transpose(0, 2, 4, 1, 3)
    return g.reshape((rows // merge) * (cols // merge), d * merge * merge)


# ---------------------------------------------------------------------------------------------
# forward


def vision_tower(weights: Mapping[str, np.ndarray], cfg: VisionConfig,
                 images: Sequence[np.ndarray]) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Encoder only: last hidden state [sum(h*w), D] for all images, and each image's (h, w)."""
    p, d = cfg.patch_size, cfg.hidden_size
    heads, hd = cfg.num_heads, cfg.head_dim
    act = cfg.hidden_act
    conv = _get(weights, "vision_tower.patch_conv.weight").reshape(d, -1).T  # [C*p*p, D]
    chunks, grids = [], []
    for img in images:
        x = _as_chw(img, cfg)
        grids.append((x.shape[1] // p, x.shape[2] // p))
        chunks.append(patchify(x, p) @ conv)
    x = rms_norm(np.concatenate(chunks, axis=0), _get(weights, "vision_tower.ln_pre.weight"), VISION_NORM_EPS)
    ropes = [rope_2d(r, c, hd, cfg.rope_theta) for r, c in grids]
    bounds = np.cumsum([0] + [r * c for r, c in grids])
    scale = hd ** -0.5
    for i in range(cfg.num_layers):
        pre = f"vision_tower.transformer.layers.{i}."
        y = rms_norm(x, _get(weights, pre + "attention_norm.weight"), VISION_NORM_EPS)
        q = y @ _get(weights, pre + "attention.q_proj.weight").T
        k = y @ _get(weights, pre + "attention.k_proj.weight").T
        v = y @ _get(weights, pre + "attention.v_proj.weight").T
        att = np.empty_like(q)
        for (cos, sin), a, b in zip(ropes, bounds[:-1], bounds[1:]):
            qi = q[a:b].reshape(b - a, heads, hd).transpose(1, 0, 2)
            ki = k[a:b].reshape(b - a, heads, hd).transpose(1, 0, 2)
            vi = v[a:b].reshape(b - a, heads, hd).transpose(1, 0, 2)
            qi = qi * cos + _rotate_half(qi) * sin
            ki = ki * cos + _rotate_half(ki) * sin
            att[a:b] = _attention(qi, ki, vi, scale)
        x = x + att @ _get(weights, pre + "attention.o_proj.weight").T
        y = rms_norm(x, _get(weights, pre + "ffn_norm.weight"), VISION_NORM_EPS)
        g = _act(y @ _get(weights, pre + "feed_forward.gate_proj.weight").T, act)
        u = y @ _get(weights, pre + "feed_forward.up_proj.weight").T
        x = x + (g * u) @ _get(weights, pre + "feed_forward.down_proj.weight").T
    return x.astype(np.float32), grids


def project(weights: Mapping[str, np.ndarray], cfg: VisionConfig, hidden: np.ndarray,
            grids: Sequence[tuple[int, int]]) -> list[np.ndarray]:
    """Mistral3 projector: norm -> 2x2 patch merge per image -> merging_layer -> linear_1 -> GELU -> linear_2."""
    m = cfg.spatial_merge_size
    x = rms_norm(hidden, _get(weights, "multi_modal_projector.norm.weight"), cfg.rms_norm_eps)
    merged, start = [], 0
    for r, c in grids:
        merged.append(merge_patches(x[start:start + r * c], r, c, m))
        start += r * c
    x = np.concatenate(merged, axis=0) @ _get(weights, "multi_modal_projector.patch_merger.merging_layer.weight").T
    x = x @ _get(weights, "multi_modal_projector.linear_1.weight").T
    b1 = _opt(weights, "multi_modal_projector.linear_1.bias")
    if b1 is not None:
        x = x + b1
    x = gelu(x)
    x = x @ _get(weights, "multi_modal_projector.linear_2.weight").T
    b2 = _opt(weights, "multi_modal_projector.linear_2.bias")
    if b2 is not None:
        x = x + b2
    sizes = np.cumsum([0] + [(r // m) * (c // m) for r, c in grids])
    return [np.ascontiguousarray(x[a:b], dtype=np.float32) for a, b in zip(sizes[:-1], sizes[1:])]


def encode_images(weights: Mapping[str, np.ndarray], cfg: VisionConfig,
                  images: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Preprocessed images ([3, H, W] float32 each, H and W multiples of 28) -> one
    [(H/28)*(W/28), text_hidden] float32 array per image, in `[IMG]` token order (row-major)."""
    images = list(images)
    if not images:
        return []
    check_weights(weights, cfg)
    hidden, grids = vision_tower(weights, cfg, images)
    return project(weights, cfg, hidden, grids)
