"""FP8 (E4M3, ``float8_e4m3fn``) weights and static activations.

Conventions (the same as Mistral's FP8 checkpoints and transformers' FP8Linear):

- ``weight_scale`` is a MULTIPLIER: ``W ~= weight.astype(float32) * weight_scale``. Shape ``()``
  for one scale per tensor, or ``(out,)`` for one per output row. (HF checkpoints call it
  ``weight_scale_inv`` although it multiplies.)
- ``input_scale`` is the static activation scale, shape ``()``:
  ``x_q = e4m3(clip(x / input_scale, -448, 448))``, and the matmul result is multiplied by
  ``input_scale * weight_scale``. From calibration: ``max|X| / 448`` over the calibration set.

ml_dtypes casts out-of-range values to NaN instead of saturating (500 -> NaN), so every cast
here clips to +-448 first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import ml_dtypes
import numpy as np

E4M3 = ml_dtypes.float8_e4m3fn
E4M3_MAX = 448.0


def to_e4m3(x: np.ndarray) -> np.ndarray:
    """Saturating cast to float8_e4m3fn (NaN stays NaN)."""
    return np.clip(np.asarray(x, dtype=np.float32), -E4M3_MAX, E4M3_MAX).astype(E4M3)


def _scale_from_amax(amax: np.ndarray) -> np.ndarray:
    amax = np.asarray(amax, dtype=np.float32)
    # An all-zero tensor quantizes exactly with any scale; 1.0 keeps the division finite.
    return np.where(amax > 0, amax / E4M3_MAX, 1.0).astype(np.float32)


@dataclass
class Fp8Linear:
    """``weight`` float8_e4m3fn [out, in]; ``weight_scale`` float32 () or (out,); ``input_scale`` float32 ()."""

    weight: np.ndarray
    weight_scale: np.ndarray
    input_scale: np.ndarray
    # True when weight and scales were taken from an FP8 checkpoint unchanged.
    from_checkpoint: bool = False

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)

    def dequantize(self) -> np.ndarray:
        """float32 [out, in]."""
        s = np.asarray(self.weight_scale, dtype=np.float32)
        s = s.reshape(-1, 1) if s.size > 1 else s.reshape(())
        return self.weight.astype(np.float32) * s

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """The reference product: fake-quantized activations times the dequantized weight."""
        return fp8_fake_quant(x, self.input_scale) @ self.dequantize().T


def fp8_fake_quant(x: np.ndarray, scale) -> np.ndarray:
    """x -> e4m3(clip(x / scale)) -> float32 * scale: what a static FP8 activation quantizer does."""
    s = np.asarray(scale, dtype=np.float32)
    return to_e4m3(np.asarray(x, dtype=np.float32) / s).astype(np.float32) * s


def activation_scale(amax: float) -> np.ndarray:
    """Static per-tensor input scale from the calibration max |x|: amax / 448, shape ()."""
    return _scale_from_amax(np.float32(amax)).reshape(())


def quantize_fp8(w: np.ndarray, granularity: Literal["tensor", "channel"] = "tensor",
                 input_scale: float | np.ndarray = 1.0) -> Fp8Linear:
    """Quantize a float weight [out, in]: scale = amax / 448 per tensor or per output row.

    `input_scale` is the activation scale (see `activation_scale`); `quantize` always passes the
    calibrated one, the default 1.0 only suits tests of the weight path.
    """
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"fp8 quantization needs a 2-D weight [out, in], got shape {w.shape}")
    if granularity == "tensor":
        scale = _scale_from_amax(np.abs(w).max()).reshape(())
        q = to_e4m3(w / scale)
    elif granularity == "channel":
        scale = _scale_from_amax(np.abs(w).max(axis=1))
        q = to_e4m3(w / scale[:, None])
    else:
        raise ValueError(f"fp8 granularity must be 'tensor' or 'channel', got {granularity!r}")
    return Fp8Linear(weight=q, weight_scale=scale, input_scale=np.asarray(input_scale, np.float32).reshape(()))


def from_checkpoint(ckpt, linear: str, input_scale: np.ndarray | float | None = None) -> Fp8Linear:
    """An FP8 linear exactly as the checkpoint stores it (weight, weight_scale, activation_scale).

    A checkpoint without `activation_scale` (dynamic activations) needs `input_scale` from
    calibration; one that has it keeps its own and `input_scale` is ignored.
    """
    weight = np.asarray(ckpt.raw(f"{linear}.weight"))
    if weight.dtype != E4M3:
        raise ValueError(f"{linear}.weight is stored as {weight.dtype}, not float8_e4m3fn")
    ws = np.asarray(ckpt.raw(f"{linear}.weight_scale"), dtype=np.float32)
    ws = ws.reshape(()) if ws.size == 1 else ws.reshape(-1)
    if ws.ndim == 1 and ws.shape[0] != weight.shape[0]:
        raise ValueError(f"{linear}.weight_scale has {ws.size} values; expected 1 or {weight.shape[0]} "
                         "(block-wise FP8 scales are not supported)")
    if has_activation_scale(ckpt, linear):
        input_scale = ckpt.scalar(f"{linear}.activation_scale")
    elif input_scale is None:
        raise ValueError(f"{linear}: the FP8 checkpoint has no activation_scale and no calibrated scale was given")
    return Fp8Linear(weight=np.array(weight), weight_scale=ws,
                     input_scale=np.asarray(input_scale, np.float32).reshape(()), from_checkpoint=True)


def has_activation_scale(ckpt, linear: str) -> bool:
    return f"{linear}.activation_scale" in ckpt
