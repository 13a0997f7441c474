"""Checkpoint -> QuantizedModel: calibration, AWQ folding, INT4 / FP8 quantization, a report.

`quantize(ckpt, recipe, encode)` runs the NumPy reference forward over calibration text once,
collecting each linear's input layer by layer; as soon as a layer's last input has been seen, that
layer is scaled (AWQ), quantized and its activations dropped, so memory holds one layer's
activations at a time. The result implements the reference forward's `TextWeights` protocol with
DEQUANTIZED weights, so ``ministral3.forward(qm, qm.config.text, ids)`` is the oracle the exported
engines are compared with. The ONNX exporter reads `tensors` and `linears` directly.
"""

from __future__ import annotations

import logging
import math
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable

import numpy as np

from ..models import ministral3
from ..models.checkpoint import Checkpoint
from ..models.config import ModelConfig
from ..models.ministral3 import LINEARS, FloatWeights
from .awq import awq_layer
from .fp8 import Fp8Linear, activation_scale, from_checkpoint, has_activation_scale, quantize_fp8
from .int4 import Int4Linear, quantize_int4
from .recipe import QuantRecipe

log = logging.getLogger(__name__)

Linear = np.ndarray | Int4Linear | Fp8Linear


@dataclass(frozen=True)
class LayerReport:
    """One linear's quantization outcome. `sqnr_db` compares the (AWQ-scaled) float weight with
    its dequantized image; inf when nothing was lost (method none, or FP8 reused as stored)."""

    name: str
    method: str
    shape: tuple[int, int]
    sqnr_db: float
    awq_alpha: float | None = None       # int4 with AWQ: the chosen exponent (0 = plain RTN; None = not scaled)
    input_scale: float | None = None     # fp8: the static activation scale
    from_checkpoint: bool = False        # fp8: weight and scales reused from an FP8 checkpoint


class QuantizedModel:
    """Quantized decoder weights; `tensor`/`linear` make it a `ministral3.TextWeights`."""

    def __init__(self, config: ModelConfig, recipe: QuantRecipe, tensors: dict[str, np.ndarray],
                 linears: dict[str, Linear], report: list[LayerReport]):
        self.config = config
        self.recipe = recipe
        self.tensors = tensors
        self.linears = linears
        self.report = report

    def tensor(self, name: str) -> np.ndarray:
        return self.tensors[name]

    def dequantized(self, name: str) -> np.ndarray:
        """The float32 [out, in] weight the reference uses for linear `name`."""
        lin = self.linears[name]
        return lin if isinstance(lin, np.ndarray) else lin.dequantize()

    def linear(self, name: str, x: np.ndarray) -> np.ndarray:
        lin = self.linears[name]
        if isinstance(lin, Fp8Linear):
            return lin(x)
        return x @ self.dequantized(name).T


def sqnr_db(w: np.ndarray, wq: np.ndarray) -> float:
    """10 log10(|W|^2 / |W - Wq|^2); inf when equal."""
    w = np.asarray(w, dtype=np.float64)
    noise = float(np.sum(np.square(w - np.asarray(wq, dtype=np.float64))))
    signal = float(np.sum(np.square(w)))
    if noise == 0.0:
        return math.inf
    return 10.0 * math.log10(signal / noise) if signal > 0 else -math.inf


def summarize(report: list[LayerReport]) -> dict:
    """Mean / min SQNR over the linears that lost anything (finite values)."""
    finite = [r for r in report if math.isfinite(r.sqnr_db)]
    if not finite:
        return {"linears": len(report), "mean_sqnr_db": None, "min_sqnr_db": None, "worst": None}
    worst = min(finite, key=lambda r: r.sqnr_db)
    return {"linears": len(report), "mean_sqnr_db": float(np.mean([r.sqnr_db for r in finite])),
            "min_sqnr_db": worst.sqnr_db, "worst": worst.name}


def format_report(report: list[LayerReport]) -> str:
    """A per-linear table (name, method, shape, SQNR dB, AWQ alpha / FP8 input scale) plus mean/min."""
    rows = []
    for r in report:
        sq = "exact" if r.sqnr_db == math.inf else f"{r.sqnr_db:.2f}"
        if r.awq_alpha is not None:
            extra = f"awq alpha {r.awq_alpha:.2f}"
        elif r.input_scale is not None:
            extra = f"x scale {r.input_scale:.3g}" + (" (checkpoint)" if r.from_checkpoint else "")
        else:
            extra = ""
        rows.append((r.name, r.method, f"{r.shape[0]}x{r.shape[1]}", sq, extra))
    head = ("linear", "method", "shape", "SQNR dB", "")
    widths = [max(len(str(x[i])) for x in rows + [head]) for i in range(5)]
    fmt = "  ".join(f"{{:{'<' if i in (0, 1, 4) else '>'}{w}}}" for i, w in enumerate(widths))
    lines = [fmt.format(*head).rstrip(), "  ".join("-" * w for w in widths[:4])]
    lines += [fmt.format(*row).rstrip() for row in rows]
    s = summarize(report)
    if s["mean_sqnr_db"] is None:
        lines.append(f"{len(report)} linears, all exact")
    else:
        lines.append(f"{len(report)} linears: mean SQNR {s['mean_sqnr_db']:.2f} dB, "
                     f"min {s['min_sqnr_db']:.2f} dB ({s['worst']})")
    return "\n".join(lines)


# -- calibration ------------------------------------------------------------------------------

def calibration_text(recipe: QuantRecipe) -> str:
    """The recipe's calibration file, or the one shipped with the SDK."""
    if recipe.calibration_file:
        return Path(recipe.calibration_file).read_text(encoding="utf-8")
    return resources.files("edge_sdk").joinpath("data/calibration.txt").read_text(encoding="utf-8")


def calibration_ids(recipe: QuantRecipe, vocab_size: int,
                    encode: Callable[[str], list[int]] | None = None) -> np.ndarray:
    """Up to `recipe.calibration_tokens` token ids (clipped into the vocabulary)."""
    n = recipe.calibration_tokens
    if encode is None:
        log.warning("quantize: no tokenizer given, calibrating on %d seeded random token ids "
                    "(activation statistics will not look like real text)", n)
        return np.random.default_rng(recipe.seed).integers(0, vocab_size, size=n)
    ids = np.asarray(list(encode(calibration_text(recipe))), dtype=np.int64)[:n]
    if ids.size == 0:
        raise ValueError("quantize: the calibration text encoded to no tokens")
    if ids.size < n:
        log.info("quantize: calibration text gives %d tokens (asked for up to %d)", ids.size, n)
    return np.clip(ids, 0, vocab_size - 1)


class _StreamingFloatWeights(FloatWeights):
    """FloatWeights without the cache: calibration reads each tensor once, and caching a 14B
    model in float32 would take ~54 GB."""

    def tensor(self, name: str) -> np.ndarray:
        return self.checkpoint.lm_head() if name == "lm_head.weight" else self.checkpoint.get(name)


class _CalibrationDone(Exception):
    """Raised from the capture hook after the last layer: the logits are not needed."""


# -- quantize ---------------------------------------------------------------------------------

def quantize(ckpt: Checkpoint, recipe: QuantRecipe, encode: Callable[[str], list[int]] | None = None,
             progress: bool = True) -> QuantizedModel:
    """Quantize the text decoder of `ckpt` as `recipe` says (vision weights are not touched)."""
    cfg = ckpt.config.text
    tensors: dict[str, np.ndarray] = {"embed_tokens.weight": ckpt.get("embed_tokens.weight")}
    tensors["lm_head.weight"] = (tensors["embed_tokens.weight"] if cfg.tie_word_embeddings
                                 or "lm_head.weight" not in ckpt else ckpt.get("lm_head.weight"))
    tensors["norm.weight"] = ckpt.get("norm.weight")
    for i in range(cfg.num_layers):
        for n in ("input_layernorm", "post_attention_layernorm"):
            tensors[f"layers.{i}.{n}.weight"] = np.array(ckpt.get(f"layers.{i}.{n}.weight"), dtype=np.float32)
    linears: dict[str, Linear] = {}
    report: list[LayerReport] = []

    all_linears = [f"layers.{i}.{n}" for i in range(cfg.num_layers) for n in LINEARS]
    if recipe.method == "int4":
        for name in all_linears:  # fail before a long calibration run
            shape = ckpt.raw(name + ".weight").shape
            if shape[1] % recipe.block_size:
                raise ValueError(f"{name}.weight has shape {tuple(shape)}: input dimension {shape[1]} is not a "
                                 f"multiple of the int4 block size {recipe.block_size}")
    keep_x = recipe.method == "int4" and recipe.awq
    need_amax = recipe.method == "fp8" and any(
        not (ckpt.is_fp8(n) and has_activation_scale(ckpt, n)) for n in all_linears)

    def process(layer: int, acts: dict[str, np.ndarray], amax: dict[str, float]) -> None:
        names = [f"layers.{layer}.{n}" for n in LINEARS]
        if recipe.method == "fp8":
            for name in names:
                scale = activation_scale(amax[name]) if name in amax else None
                if ckpt.is_fp8(name):
                    lin = from_checkpoint(ckpt, name, scale)
                    sq = math.inf
                else:
                    w = ckpt.get(name + ".weight")
                    lin = quantize_fp8(w, recipe.fp8_granularity, scale)
                    sq = sqnr_db(w, lin.dequantize())
                linears[name] = lin
                report.append(LayerReport(name, "fp8", lin.shape, sq, input_scale=float(lin.input_scale),
                                          from_checkpoint=lin.from_checkpoint))
            return
        weights = {name: ckpt.get(name + ".weight") for name in names}
        if recipe.method == "none":
            for name in names:
                linears[name] = weights[name]
                report.append(LayerReport(name, "none", weights[name].shape, math.inf))
            return
        alphas: dict[str, float] = {}
        if recipe.awq:
            for res in awq_layer(tensors, weights, cfg, layer, acts, recipe.block_size, recipe.awq_grid):
                alphas.update({n: res.alpha for n in res.group.linears})
        for name in names:
            lin = quantize_int4(weights[name], recipe.block_size)
            linears[name] = lin
            report.append(LayerReport(name, "int4", lin.shape, sqnr_db(weights[name], lin.dequantize()),
                                      awq_alpha=alphas.get(name)))

    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.num_layers, desc=f"quantize {recipe.method}", unit="layer",
               disable=not progress or not sys.stderr.isatty())
    try:
        if keep_x or need_amax:
            ids = calibration_ids(recipe, cfg.vocab_size, encode)
            acts: dict[str, np.ndarray] = {}
            amax: dict[str, float] = {}
            last = LINEARS[-1]

            def capture(name: str, x: np.ndarray) -> None:
                if keep_x:
                    acts[name] = x
                if need_amax:
                    amax[name] = float(np.max(np.abs(x)))
                if name.endswith(last):
                    layer = int(name.split(".")[1])
                    process(layer, acts, amax)
                    acts.clear()
                    amax.clear()
                    bar.update(1)
                    if layer == cfg.num_layers - 1:
                        raise _CalibrationDone

            try:
                ministral3.forward(_StreamingFloatWeights(ckpt), cfg, ids, capture=capture)
            except _CalibrationDone:
                pass
        else:
            for layer in range(cfg.num_layers):
                process(layer, {}, {})
                bar.update(1)
    finally:
        bar.close()
    return QuantizedModel(ckpt.config, recipe, tensors, linears, report)
