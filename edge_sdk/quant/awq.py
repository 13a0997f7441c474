"""AWQ-style activation-aware channel scaling for INT4 weights, folded into the graph.

For linears that share one input X [N, in], a per-input-channel scale s > 0 changes nothing in
float arithmetic: ``X W^T == (X / s) (W * s)^T``. After quantization it does: channels with large
activations get their weights scaled up before rounding, so their relative rounding error shrinks
(Lin et al., "AWQ", 2023). We search ``s = mean|X|^alpha`` (normalised so that
``sqrt(max(s) * min(s)) == 1``) for alpha on an even grid over [0, 1] and keep the one minimising
``|| X W^T - (X / s) Q(W * s)^T ||^2`` summed over the linears of the group. alpha = 0 is s = 1,
plain round-to-nearest, so on the calibration activations AWQ is never worse than RTN.

The 1/s is folded into the op that produces X, so the exported graph needs no extra op:

| linears            | their input X                    | 1/s goes into                     |
|--------------------|----------------------------------|-----------------------------------|
| q, k, v            | input_layernorm(h)               | input_layernorm.weight            |
| gate, up           | post_attention_layernorm(h)      | post_attention_layernorm.weight   |
| down               | silu(gate x) * (up x)            | up_proj's output rows             |
| o                  | attention output                 | v_proj's output rows (MHA only)   |

o_proj is only scaled when num_heads == num_kv_heads: with grouped-query attention one v row feeds
several heads' o_proj inputs, so per-channel scales cannot be folded exactly; like AWQ we skip
o_proj then (all Ministral 3 sizes use GQA, 32 q heads / 8 kv heads, so o_proj is plain RTN).

Activations are those of the float model (as in AWQ: every fold leaves the float model's function
unchanged, so they are also the scaled model's activations). AWQ's additional weight-clipping
search is not done here; `quantize_int4` picks its per-block scale by minimum squared error,
which covers part of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import numpy as np

from ..models.config import TextConfig
from .int4 import dequantize_blocks, int4_codes


@dataclass(frozen=True)
class AwqGroup:
    """Linears sharing one input, and where the inverse scale is folded."""

    linears: tuple[str, ...]      # full linear names, e.g. "layers.0.self_attn.q_proj"
    fold_into: str                # a norm weight ("...input_layernorm.weight") or a linear name
    fold_kind: Literal["norm", "rows"]


@dataclass(frozen=True)
class AwqResult:
    group: AwqGroup
    scale: np.ndarray             # float32 [in]; the weights were multiplied by it
    alpha: float
    err_rtn: float                # mean squared output error with s = 1 (plain RTN)
    err_awq: float                # with the chosen s


def layer_groups(cfg: TextConfig, layer: int) -> list[AwqGroup]:
    """The AWQ groups of one decoder layer, in the order they are searched and folded."""
    p = f"layers.{layer}."
    groups = [AwqGroup(tuple(p + f"self_attn.{x}_proj" for x in "qkv"), p + "input_layernorm.weight", "norm")]
    if cfg.num_heads == cfg.num_kv_heads:
        groups.append(AwqGroup((p + "self_attn.o_proj",), p + "self_attn.v_proj", "rows"))
    groups.append(AwqGroup((p + "mlp.gate_proj", p + "mlp.up_proj"), p + "post_attention_layernorm.weight", "norm"))
    groups.append(AwqGroup((p + "mlp.down_proj",), p + "mlp.up_proj", "rows"))
    return groups


def _quant_dequant(block: int) -> Callable[[np.ndarray], np.ndarray]:
    return lambda w: dequantize_blocks(*int4_codes(w, block), block)


#: Output rows the alpha ranking looks at (of the group's concatenated weights).
RANK_ROWS = 1024


def _fast_quant_dequant(block: int) -> Callable[[np.ndarray], np.ndarray]:
    """Round to nearest with scale max|w| / 7: a cheap stand-in for `quantize_int4` (whose scale
    search tries six candidates) to rank the alphas; the winner is re-checked with the real one."""
    def qdq(w: np.ndarray) -> np.ndarray:
        out, n = w.shape
        wb = w.reshape(out, n // block, block)
        scale = (np.abs(wb).max(axis=-1, keepdims=True) / 7.0).astype(np.float16).astype(np.float32)
        inv = np.divide(1.0, scale, out=np.zeros_like(scale), where=scale > 0)
        q = np.clip(np.rint(wb * inv), -8, 7)
        q *= scale
        return q.reshape(out, n)
    return qdq


def search_scale(x: np.ndarray, weights: list[np.ndarray], block: int, grid: int = 20,
                 quant: Callable[[np.ndarray], np.ndarray] | None = None,
                 max_tokens: int | None = None) -> tuple[np.ndarray, float, float, float]:
    """Best per-input-channel scale for linears sharing input x [N, in].

    Returns (scale [in] float32, alpha, err_rtn, err_best); errors are mean squared output errors
    under `quant` (default: the real int4 quantizer with `block`). The grid is ranked with a cheap
    round-to-nearest stand-in (unless `quant` is given), then the best alpha is checked against
    alpha = 0 with `quant`, so the result is never worse than plain RTN on these activations.
    `max_tokens`: use at most this many rows of x, evenly spaced (the search's cost is linear in it).
    """
    exact = quant or _quant_dequant(block)
    rank = quant or _fast_quant_dequant(block)
    x = np.asarray(x, dtype=np.float32).reshape(-1, weights[0].shape[1])
    if max_tokens is not None and len(x) > max_tokens:
        x = x[np.linspace(0, len(x) - 1, max_tokens).astype(np.int64)]
    w = np.concatenate([np.asarray(wi, dtype=np.float32) for wi in weights], axis=0)
    ref = x @ w.T
    x_mean = np.abs(x).mean(axis=0)

    def scale(alpha: float) -> np.ndarray:
        s = np.maximum(x_mean, 1e-4) ** alpha
        return (s / np.sqrt(s.max() * s.min())).astype(np.float32)

    def error(alpha: float, q: Callable[[np.ndarray], np.ndarray], rows: np.ndarray | slice) -> float:
        s = scale(alpha)
        return float(np.mean(np.square(x @ (q(w[rows] * s[None, :]) / s[None, :]).T - ref[:, rows])))

    # Ranking uses evenly spaced output rows (the error is a mean over them); the check uses all.
    sample = np.linspace(0, len(w) - 1, min(len(w), RANK_ROWS)).astype(np.int64) if quant is None else slice(None)
    alphas = np.linspace(0.0, 1.0, grid) if grid > 1 else np.zeros(1)
    best = min((float(a) for a in alphas), key=lambda a: error(a, rank, sample))
    err_rtn = error(0.0, exact, slice(None))
    err_best = err_rtn if best == 0.0 else error(best, exact, slice(None))
    if err_best > err_rtn:
        best, err_best = 0.0, err_rtn
    return scale(best), best, err_rtn, err_best


def fold(tensors: dict[str, np.ndarray], weights: dict[str, np.ndarray], group: AwqGroup, s: np.ndarray) -> None:
    """Multiply the group's weight columns by s and fold 1/s into the producer of their input (in place)."""
    s = np.asarray(s, dtype=np.float32)
    for name in group.linears:
        weights[name] = weights[name] * s[None, :]
    if group.fold_kind == "norm":
        tensors[group.fold_into] = tensors[group.fold_into] / s
    else:
        weights[group.fold_into] = weights[group.fold_into] / s[:, None]


def awq_layer(tensors: dict[str, np.ndarray], weights: dict[str, np.ndarray], cfg: TextConfig, layer: int,
              acts: dict[str, np.ndarray], block: int, grid: int = 20,
              quant: Callable[[np.ndarray], np.ndarray] | None = None, max_tokens: int | None = None
              ) -> list[AwqResult]:
    """Search and fold every group of one layer, in place.

    `tensors` holds the norm weights, `weights` the float [out, in] weights keyed by linear name
    (without ".weight"), `acts` each linear's calibration input [N, in] (the first linear of a
    group is enough).
    """
    results = []
    for group in layer_groups(cfg, layer):
        x = acts[group.linears[0]]
        s, alpha, err_rtn, err_awq = search_scale(x, [weights[n] for n in group.linears], block, grid, quant,
                                                  max_tokens)
        fold(tensors, weights, group, s)
        results.append(AwqResult(group, s, alpha, err_rtn, err_awq))
    return results
