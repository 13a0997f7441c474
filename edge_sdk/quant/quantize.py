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
from dataclasses import asdict, dataclass, field, replace
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
from .int8 import Int8Linear, quantize_int8
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


@dataclass(frozen=True)
class HeadReport:
    """The quantized head against the float head, on the calibration text's final hidden states."""

    format: str                  # int4 | int8
    tokens: int
    sqnr_db: float
    top1_agreement: float        # fraction of positions whose argmax token is the same
    max_abs_logit_error: float
    rel_logit_error: float       # mean |logit error| / std of the float logits
    why: str = ""
    quantized: object = field(default=None, repr=False, compare=False)  # the head itself (not reported)

    def summary(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "quantized"}


class QuantizedModel:
    """Quantized decoder weights; `tensor`/`linear` make it a `ministral3.TextWeights`.

    ``head`` is the INT4/INT8 LM head [vocab, hidden] (None: float, ``tensors["lm_head.weight"]``);
    ``embedding`` the token table in the same form (the very same object when the head is
    tied to the embeddings: it is stored once). ``tensors`` always holds both as float32, the
    dequantized images when quantized, for the reference."""

    def __init__(self, config: ModelConfig, recipe: QuantRecipe, tensors: dict[str, np.ndarray],
                 linears: dict[str, Linear], report: list[LayerReport], head: Int4Linear | Int8Linear | None = None,
                 embedding: Int4Linear | Int8Linear | None = None, head_report: HeadReport | None = None,
                 tied: bool = False):
        self.config = config
        self.recipe = recipe
        self.tensors = tensors
        self.linears = linears
        self.report = report
        self.head = head
        self.embedding = embedding
        self.head_report = head_report
        self.tied = tied  # the head is the embedding table

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
    model in float32 would take ~54 GB. The embedding and head already loaded are reused."""

    def __init__(self, checkpoint, loaded: dict[str, np.ndarray]):
        super().__init__(checkpoint)
        self.loaded = {k: loaded[k] for k in ("embed_tokens.weight", "lm_head.weight")}

    def tensor(self, name: str) -> np.ndarray:
        if name in self.loaded:
            return self.loaded[name]
        return self.checkpoint.lm_head() if name == "lm_head.weight" else self.checkpoint.get(name)


class _CalibrationDone(Exception):
    """Raised from the capture hook after the last layer: the logits are not needed."""


# -- quantize ---------------------------------------------------------------------------------

def quantize(ckpt: Checkpoint, recipe: QuantRecipe, encode: Callable[[str], list[int]] | None = None,
             progress: bool = True) -> QuantizedModel:
    """Quantize the text decoder of `ckpt` as `recipe` says (vision weights are not touched)."""
    cfg = ckpt.config.text
    tied = cfg.tie_word_embeddings or "lm_head.weight" not in ckpt
    quantized_head = recipe.method == "int4" and recipe.head != "float"  # a quantized head (int4 or int8)
    # A table that will be quantized stays memory-mapped in the checkpoint's dtype (1.6 GB less for
    # a 3B than a float32 copy): calibration reads its rows, the quantizer converts slices.
    def table(name: str) -> np.ndarray:
        fp8 = ckpt.is_fp8(name[: -len(".weight")])
        return ckpt.raw(name) if quantized_head and not fp8 else ckpt.get(name)

    tensors: dict[str, np.ndarray] = {"embed_tokens.weight": table("embed_tokens.weight")}
    tensors["lm_head.weight"] = tensors["embed_tokens.weight"] if tied else table("lm_head.weight")
    if quantized_head:
        for name in ("embed_tokens.weight",) + (() if tied else ("lm_head.weight",)):
            if tensors[name].shape[1] % recipe.block_size:
                raise ValueError(f"{name} has shape {tensors[name].shape}: hidden size {tensors[name].shape[1]} is "
                                 f"not a multiple of the int4 block size {recipe.block_size}")
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
    head_report: list[HeadReport] = []

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
            for res in awq_layer(tensors, weights, cfg, layer, acts, recipe.block_size, recipe.awq_grid,
                                 max_tokens=recipe.awq_tokens):
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
        if keep_x or need_amax or quantized_head:
            ids = calibration_ids(recipe, cfg.vocab_size, encode)
            acts: dict[str, np.ndarray] = {}
            amax: dict[str, float] = {}
            last = LINEARS[-1]

            def capture(name: str, x: np.ndarray) -> None:
                if name == "lm_head":  # only reached with a quantized head: choose it, then stop
                    head_report.append(choose_head(tensors["lm_head.weight"], x, recipe))
                    raise _CalibrationDone
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
                    if layer == cfg.num_layers - 1 and not quantized_head:
                        raise _CalibrationDone

            try:
                ministral3.forward(_StreamingFloatWeights(ckpt, tensors), cfg, ids, capture=capture)
            except _CalibrationDone:
                pass
        else:
            for layer in range(cfg.num_layers):
                process(layer, {}, {})
                bar.update(1)
    finally:
        bar.close()
    head = embedding = None
    if quantized_head:
        r = head_report[0]
        head = r.quantized
        embedding = head if tied else quantize_head(tensors["embed_tokens.weight"], r.format, recipe.block_size)
        # The float tables go; their dequantized images are made only if the reference asks.
        tensors = _DequantizedOnUse(tensors, {"lm_head.weight": head, "embed_tokens.weight": embedding})
        for name in ("embed_tokens.weight",) + (() if tied else ("lm_head.weight",)):
            ckpt.release(name)
        log.info("%s head: weight SQNR %.2f dB; on %d calibration tokens top-1 agreement %.3f with the float "
                 "head, logit error mean %.3f std, max %.3g%s", r.format, r.sqnr_db, r.tokens, r.top1_agreement,
                 r.rel_logit_error, r.max_abs_logit_error, f" ({r.why})" if r.why else "")
    return QuantizedModel(ckpt.config, recipe, tensors, linears, report, head=head, embedding=embedding,
                          head_report=head_report[0] if head_report else None, tied=tied)


class _DequantizedOnUse(dict):
    """``tensors`` whose quantized entries are dequantized (once) when first read: the reference
    forward reads them, the build never does, and for a 3B model each is 1.6 GB of float32.
    Entries quantized as the same object (a tied head) give the same array."""

    def __init__(self, tensors: dict, quantized: dict):
        super().__init__({**tensors, **{k: None for k in quantized}})
        self._pending = dict(quantized)

    def __getitem__(self, name):
        if name in self._pending:
            q = self._pending.pop(name)
            same = next((k for k, v in self._pending.items() if v is q), None)
            value = q.dequantize()
            super().__setitem__(name, value)
            if same is not None:
                del self._pending[same]
                super().__setitem__(same, value)
        return super().__getitem__(name)

    def get(self, name, default=None):
        return self[name] if name in self else default

    def values(self):
        return [self[k] for k in self]

    def items(self):
        return [(k, self[k]) for k in self]


#: ``head="auto"`` keeps INT4 when at least this fraction of calibration positions get the same
#: top-1 token as with the float head; else INT8.
AUTO_HEAD_MIN_TOP1 = 0.9


def quantize_head(w: np.ndarray, fmt: str, block: int) -> Int4Linear | Int8Linear:
    return quantize_int4(w, block) if fmt == "int4" else quantize_int8(w, block)


def choose_head(w_float: np.ndarray, hidden: np.ndarray, recipe: QuantRecipe) -> HeadReport:
    """Quantize the head as the recipe says (``auto``: INT4 unless it agrees too little)."""
    fmt = "int4" if recipe.head in ("auto", "int4") else "int8"
    r = measure_head(w_float, quantize_head(w_float, fmt, recipe.block_size), hidden, fmt)
    if recipe.head == "auto" and r.top1_agreement < AUTO_HEAD_MIN_TOP1:
        int4_top1 = r.top1_agreement
        del r  # the INT4 candidate goes before the INT8 one is made
        r = measure_head(w_float, quantize_head(w_float, "int8", recipe.block_size), hidden, "int8")
        r = replace(r, why=f"auto: INT4 agreed on only {int4_top1:.3f} of calibration tokens "
                           f"(< {AUTO_HEAD_MIN_TOP1})")
    return r


def measure_head(w_float: np.ndarray, head: Int4Linear | Int8Linear, hidden: np.ndarray, fmt: str,
                 rows: int = 8192) -> HeadReport:
    """Float head vs quantized head on final hidden states [N, hidden], a slice of the vocabulary
    at a time (so no second float copy of the head is ever made)."""
    n = len(hidden)
    best_ref = np.full(n, -np.inf, np.float32)
    best_got = np.full(n, -np.inf, np.float32)
    arg_ref = np.zeros(n, np.int64)
    arg_got = np.zeros(n, np.int64)
    max_err = abs_err = sq_sum = total_sum = 0.0
    err_sq = sig_sq = 0.0
    for r0 in range(0, w_float.shape[0], rows):
        wf = np.asarray(w_float[r0:r0 + rows], dtype=np.float32)
        wq = head.rows(r0, r0 + rows).dequantize()
        err_sq += float(np.sum(np.square(wf - wq, dtype=np.float64)))
        sig_sq += float(np.sum(np.square(wf, dtype=np.float64)))
        ref, got = hidden @ wf.T, hidden @ wq.T
        for logits, best, arg in ((ref, best_ref, arg_ref), (got, best_got, arg_got)):
            i = logits.argmax(-1)
            v = logits[np.arange(n), i]
            better = v > best
            best[better], arg[better] = v[better], r0 + i[better]
        err = np.abs(got - ref)
        max_err = max(max_err, float(err.max()))
        abs_err += float(err.sum())
        sq_sum += float(np.square(ref, dtype=np.float64).sum())
        total_sum += float(ref.sum(dtype=np.float64))
    count = n * w_float.shape[0]
    std = math.sqrt(max(sq_sum / count - (total_sum / count) ** 2, 1e-30))
    sqnr = math.inf if err_sq == 0 else 10.0 * math.log10(sig_sq / err_sq)
    return HeadReport(format=fmt, tokens=n, sqnr_db=sqnr, top1_agreement=float(np.mean(arg_ref == arg_got)),
                      max_abs_logit_error=max_err, rel_logit_error=abs_err / count / std, quantized=head)
