"""How a checkpoint is quantized: one small, frozen, serialisable recipe.

The recipe goes into the engine manifest, so a package says exactly how its weights were made.

- ``method``: ``"int4"`` (weight-only, block-wise symmetric INT4, fp16 scales, optional AWQ-style
  activation-aware channel scaling), ``"fp8"`` (E4M3 weights and static per-tensor E4M3
  activations, for devices with FP8 tensor cores), or ``"none"`` (float weights).
- ``block_size``: INT4 block length along the input dimension. 128 is the default and what the
  real models use; 64 is allowed. TensorRT's INT4 weight-only path accepts 64 and 128 only, so
  32 is meant for tiny test models (whose hidden sizes may not divide by 64/128) and for
  ONNX Runtime.
- ``awq``: search per-input-channel scales on calibration activations (int4 only; ignored for
  fp8/none). ``awq_grid``: number of exponents alpha tried, evenly spaced over [0, 1]
  (alpha = 0 is plain round-to-nearest, so AWQ never does worse than RTN on the calibration set).
  ``awq_tokens``: calibration tokens the search evaluates each alpha on (evenly spaced; the
  search's time is linear in it).
- ``head``: the LM head (and with it the token embeddings) for ``int4``. With a 131k vocabulary the
  head is most of the bytes a decode step reads. ``"int4"`` (block-wise, round to nearest, like the
  linears), ``"int8"`` (block-wise, twice the bytes, near-float quality), ``"float"``, or
  ``"auto"`` (default): INT4 when its top-1 agreement with the float head on the calibration text
  is at least ``AUTO_HEAD_MIN_TOP1`` (quantize.py), else INT8. The build reports top-1 agreement
  and logit error of what it chose. ``none`` and ``fp8`` keep a float head.
- ``fp8_granularity``: ``"tensor"`` (one weight scale, what Mistral ships) or ``"channel"``
  (one per output row). Ignored for linears the checkpoint already stores in FP8: their scales
  are reused as they are.
- ``calibration_file``: a UTF-8 text file; None means the shipped ``edge_sdk/data/calibration.txt``.
  ``calibration_tokens``: at most this many tokens of it are run through the model.
- ``seed``: for the random calibration ids used when no tokenizer is given.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class QuantRecipe(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    method: Literal["none", "int4", "fp8"] = "int4"
    block_size: Literal[32, 64, 128] = 128
    awq: bool = True
    awq_grid: int = Field(default=20, ge=1)
    awq_tokens: int = Field(default=128, ge=1)
    head: Literal["auto", "int4", "int8", "float"] = "auto"
    fp8_granularity: Literal["tensor", "channel"] = "tensor"
    calibration_file: str | None = None
    calibration_tokens: int = Field(default=512, ge=1)
    seed: int = 0
