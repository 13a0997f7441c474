"""Device profiles: what a build target can do, and the build-time checks that follow from it.

A profile is a small JSON file (canonical copies in the repository's `devices/profiles/`). It says
which backend runs there, the GPU's SM version, memory and bandwidth, which precisions its tensor
cores have, and runtime defaults (context length, vision image size). `check_build` turns those
facts into clear, early errors: FP8 on an Orin (sm_87, no FP8 tensor cores) or a model that does
not fit in memory is refused before any quantization or engine build starts.

Profiles are found, in order, in `$EDGE_SDK_PROFILES` (a directory), in package data
(`edge_sdk/data/device_profiles/`, for installs that ship them inside the wheel) and in the
repository checkout (`<repo>/devices/profiles/`). `load_profile` also accepts a path to a JSON file.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from edge_sdk.models.config import AudioConfig, ModelConfig, TextConfig, VisionConfig

Precision = Literal["fp32", "fp16", "bf16", "int4", "fp8", "fp4"]
Quant = Literal["none", "int4", "fp8"]
QUANTS: tuple[str, ...] = ("none", "int4", "fp8")

GB = 1e9  # memory figures are decimal GB throughout (profiles and messages)


class DeviceError(ValueError):
    """A build the target device cannot run; the one-line message says why and what to do instead."""


class DeviceProfile(BaseModel):
    """What one build target offers. Loaded from `devices/profiles/<name>.json`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    description: str = ""
    backend: Literal["onnxruntime", "tensorrt"]
    # CUDA SM version, e.g. 87 for Orin, 110 for Thor (CUDA 13 naming); None for CPU profiles.
    sm: int | None = None
    memory_gb: float = Field(gt=0)
    # Share of memory_gb the model (weights + KV cache) may take; the rest is OS, runtime, activations.
    usable_memory_fraction: float = Field(gt=0, le=1)
    memory_bandwidth_gbs: float = Field(gt=0)
    precisions: tuple[Precision, ...]
    compute_dtype: Literal["float32", "float16"]
    # Longest image side fed to the vision encoder (mistral-common's max_image_size).
    max_image_size: int = Field(gt=0)
    # Default context length for builds and the runtime's KV cache.
    max_context: int = Field(gt=0)
    # Lowest TensorRT version the engines are built for (10.3 on JetPack 6, 10.13 on JetPack 7).
    tensorrt_version: str | None = None
    jetpack: str | None = None
    notes: str = ""

    @field_validator("precisions")
    @classmethod
    def _no_duplicates(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(v)) != len(v):
            raise ValueError(f"duplicate precisions in {list(v)}")
        return v

    @property
    def usable_memory_gb(self) -> float:
        return self.memory_gb * self.usable_memory_fraction

    @property
    def target(self) -> str:
        """`orin-nano-8gb (sm_87)`, or just the name for CPU profiles: used in messages."""
        return f"{self.name} (sm_{self.sm})" if self.sm is not None else self.name

    @property
    def compute_bytes(self) -> int:
        return 4 if self.compute_dtype == "float32" else 2

    def supports(self, precision: str) -> bool:
        return precision in self.precisions


# -- finding and loading profiles ---------------------------------------------------------------

def profile_dirs() -> list[Path]:
    """Directories searched for `<name>.json`, in order (existing ones only)."""
    here = Path(__file__).resolve().parent
    candidates = []
    if os.environ.get("EDGE_SDK_PROFILES"):
        candidates.append(Path(os.environ["EDGE_SDK_PROFILES"]))
    candidates += [here / "data" / "device_profiles", here.parent / "devices" / "profiles"]
    return [d for d in candidates if d.is_dir()]


def list_profiles() -> list[str]:
    """Names of all known profiles (first directory wins on duplicates), sorted."""
    names: set[str] = set()
    for d in profile_dirs():
        names.update(p.stem for p in d.glob("*.json"))
    return sorted(names)


def _profile_path(name: str) -> Path:
    if name.endswith(".json") or os.sep in name:
        path = Path(name)
        if not path.is_file():
            raise DeviceError(f"{path}: device profile file not found")
        return path
    for d in profile_dirs():
        path = d / f"{name}.json"
        if path.is_file():
            return path
    known = ", ".join(list_profiles()) or "none: no profile directory found, set EDGE_SDK_PROFILES"
    raise DeviceError(f"unknown device profile {name!r} (known: {known})")


def load_profile(name: str | Path) -> DeviceProfile:
    """Load a profile by name (`orin-nano-8gb`) or from a JSON file path."""
    path = _profile_path(str(name))
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DeviceError(f"{path}: cannot read device profile ({exc})") from None
    try:
        return DeviceProfile.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(x) for x in first["loc"]) or "(root)"
        raise DeviceError(f"{path}: invalid device profile ({loc}: {first['msg']})") from None


# -- memory estimate and build checks -----------------------------------------------------------

def vision_parameter_count(vision: VisionConfig, text_hidden: int) -> int:
    """Pixtral encoder + Mistral3 projector parameters (all kept 16-bit by every quant recipe)."""
    h = vision.hidden_size
    patch = vision.num_channels * vision.patch_size ** 2 * h
    attn = 4 * h * vision.num_heads * vision.head_dim
    mlp = 3 * h * vision.intermediate_size
    per_layer = attn + mlp + 2 * h
    merge = vision.spatial_merge_size ** 2 * h * h
    projector = h + merge + h * text_hidden + text_hidden * text_hidden
    return patch + h + vision.num_layers * per_layer + projector


def audio_parameter_count(audio: AudioConfig, text_hidden: int) -> int:
    """Voxtral's audio encoder + projector parameters (kept 16-bit, like the vision tower)."""
    h = audio.hidden_size
    convs = audio.num_mel_bins * h * 3 + h * h * 3 + 2 * h
    per_layer = 4 * h * h + 3 * h + 2 * h * audio.intermediate_size + audio.intermediate_size + h + 4 * h
    projector = audio.intermediate_size * text_hidden + text_hidden * text_hidden
    return convs + audio.max_source_positions * h + audio.num_layers * per_layer + 2 * h + projector


def kv_cache_bytes(text: TextConfig, context_len: int, bytes_per_value: int) -> int:
    """K and V for every layer: 2 x layers x kv_heads x head_dim x bytes x context."""
    return 2 * text.num_layers * text.num_kv_heads * text.head_dim * bytes_per_value * context_len


@dataclass(frozen=True)
class MemoryEstimate:
    """Weights + KV cache for one build; figures in bytes."""

    quant: str
    context_len: int
    parameters: int
    weight_bytes: int
    kv_bytes: int
    usable_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.kv_bytes

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.usable_bytes

    def describe(self) -> str:
        return (f"~{self.total_bytes / GB:.1f} GB (weights {self.weight_bytes / GB:.1f} GB + KV cache "
                f"{self.kv_bytes / GB:.2f} GB for {self.context_len} tokens)")


def estimate_memory(profile: DeviceProfile, quant: str, model_config: ModelConfig, context_len: int, *,
                    int4_block_size: int = 128, include_vision: bool = True) -> MemoryEstimate:
    """Estimate weights + KV cache on `profile` for `quant`.

    Quantized linears: int4 = 0.5 byte/weight + one 16-bit scale per block; fp8 = 1 byte/weight.
    Embeddings, lm_head, norms and the vision tower stay in the compute dtype (16-bit on GPUs,
    float32 on the CPU profile, which also makes `none` fp16 on GPUs and fp32 on CPUs).
    The KV cache is stored in the compute dtype. Activations, workspace and the runtime are
    covered by the profile's usable memory fraction, not by this estimate.
    """
    if quant not in QUANTS:
        raise DeviceError(f"unknown --quant {quant!r} (choose from {', '.join(QUANTS)})")
    text = model_config.text
    cb = profile.compute_bytes
    total = text.parameter_count()
    embed = text.vocab_size * text.hidden_size
    head = 0 if text.tie_word_embeddings else embed
    norms = text.num_layers * 2 * text.hidden_size + text.hidden_size
    linear = total - embed - head - norms
    per_weight = {"none": cb, "int4": 0.5 + 2 / int4_block_size, "fp8": 1.0}[quant]
    weight = linear * per_weight + (embed + head + norms) * cb
    params = total
    if include_vision and model_config.vision is not None:
        vis = vision_parameter_count(model_config.vision, text.hidden_size)
        weight += vis * cb
        params += vis
    if include_vision and model_config.audio is not None:
        aud = audio_parameter_count(model_config.audio, text.hidden_size)
        weight += aud * cb
        params += aud
    return MemoryEstimate(
        quant=quant,
        context_len=context_len,
        parameters=params,
        weight_bytes=int(math.ceil(weight)),
        kv_bytes=kv_cache_bytes(text, context_len, cb),
        usable_bytes=int(profile.usable_memory_gb * GB),
    )


_QUANT_PRECISION = {"int4": "int4", "fp8": "fp8"}


def check_build(profile: DeviceProfile, quant: str, model_config: ModelConfig, context_len: int | None = None, *,
                int4_block_size: int = 128, include_vision: bool = True) -> MemoryEstimate:
    """Refuse a build the device cannot run, with a one-line `DeviceError`; return the estimate.

    `quant` is "none", "int4" or "fp8"; `context_len` defaults to the profile's max_context.
    """
    if quant not in QUANTS:
        raise DeviceError(f"unknown --quant {quant!r} (choose from {', '.join(QUANTS)})")
    ctx = profile.max_context if context_len is None else context_len
    if ctx < 1:
        raise DeviceError(f"context length must be >= 1, got {ctx}")
    max_pos = model_config.text.max_position_embeddings
    if ctx > max_pos:
        raise DeviceError(f"context length {ctx} exceeds the model's max_position_embeddings {max_pos}")

    precision = _QUANT_PRECISION.get(quant)
    if precision is not None and not profile.supports(precision):
        alternatives = [q for q in ("int4", "fp8") if q != quant and profile.supports(_QUANT_PRECISION[q])]
        hint = f"; use --quant {alternatives[0]}" if alternatives else "; use --quant none"
        if precision == "fp8" and profile.sm is not None:
            raise DeviceError(f"{profile.target} has no FP8 tensor cores{hint}")
        raise DeviceError(f"{profile.target} does not support {precision} "
                          f"(supported: {', '.join(profile.precisions)}){hint}")

    est = estimate_memory(profile, quant, model_config, ctx, int4_block_size=int4_block_size,
                          include_vision=include_vision)
    if not est.fits:
        hint = _memory_hint(profile, quant, model_config, ctx, int4_block_size, include_vision)
        raise DeviceError(
            f"{est.parameters / 1e9:.2f}B-parameter model with --quant {quant} needs {est.describe()}, "
            f"but {profile.name} allows {profile.usable_memory_gb:.1f} GB of its {profile.memory_gb:g} GB"
            f"{hint}")
    return est


def _memory_hint(profile: DeviceProfile, quant: str, model_config: ModelConfig, ctx: int,
                 block: int, include_vision: bool) -> str:
    for q in ("int4", "fp8"):
        if q == quant or not profile.supports(q) or (quant == "int4" and q == "fp8"):
            continue
        alt = estimate_memory(profile, q, model_config, ctx, int4_block_size=block, include_vision=include_vision)
        if alt.fits:
            return f"; --quant {q} would fit ({alt.describe()})"
    weights_only = estimate_memory(profile, quant, model_config, 1, int4_block_size=block,
                                   include_vision=include_vision)
    room = weights_only.usable_bytes - weights_only.weight_bytes
    per_token = kv_cache_bytes(model_config.text, 1, profile.compute_bytes)
    if room > per_token * 256:
        return f"; a context of {int(room // per_token)} tokens would fit"
    return "; use a smaller model or a larger device"
