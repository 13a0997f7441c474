"""Model hyper-parameters, read from a checkpoint and never hard-coded.

One `ModelConfig` is the single source of truth for the reference forward, the ONNX export and
the engine manifest. It is filled from a Hugging Face `config.json` (Ministral3ForCausalLM or
Mistral3ForConditionalGeneration) or from Mistral's native `params.json`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict


class CheckpointError(ValueError):
    """A checkpoint we cannot read; the message names the file and the reason."""


class RopeConfig(BaseModel):
    """RoPE with optional YaRN scaling and Llama-4 style query scaling (Ministral 3)."""

    model_config = ConfigDict(frozen=True)

    theta: float = 1_000_000.0
    type: Literal["default", "yarn"] = "default"
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    # Queries are multiplied by 1 + beta * ln(1 + floor(pos / original_max)); None: no scaling.
    llama_4_scaling_beta: float | None = None

    def inv_freq(self, head_dim: int) -> list[float]:
        """Per-pair rotation frequencies, with the YaRN ramp between extrapolation and interpolation."""
        half = head_dim // 2
        extra = [1.0 / self.theta ** (2 * i / head_dim) for i in range(half)]
        if self.type != "yarn":
            return extra
        orig = self.original_max_position_embeddings

        def correction_dim(rotations: float) -> float:
            return head_dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(self.theta))

        low = max(math.floor(correction_dim(self.beta_fast)), 0)
        high = min(math.ceil(correction_dim(self.beta_slow)), head_dim - 1)
        if low == high:
            high += 0.001  # transformers' guard against a zero-width ramp
        out = []
        for i in range(half):
            ramp = min(max((i - low) / (high - low), 0.0), 1.0)
            out.append(extra[i] / self.factor * ramp + extra[i] * (1 - ramp))
        return out

    def attention_factor(self) -> float:
        """YaRN's cos/sin multiplier (1.0 for Ministral 3, whose mscale == mscale_all_dim)."""
        if self.type != "yarn":
            return 1.0

        def get_mscale(scale: float, m: float = 1.0) -> float:
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        if self.mscale and self.mscale_all_dim:
            return get_mscale(self.factor, self.mscale) / get_mscale(self.factor, self.mscale_all_dim)
        return get_mscale(self.factor)


class TextConfig(BaseModel):
    """The Ministral 3 decoder (also the Llama-type decoder inside Voxtral)."""

    model_config = ConfigDict(frozen=True)

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 262_144
    rope: RopeConfig = RopeConfig()
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 11

    def parameter_count(self) -> int:
        attn = self.hidden_size * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
        mlp = 3 * self.hidden_size * self.intermediate_size
        norms = 2 * self.hidden_size
        embed = self.vocab_size * self.hidden_size
        head = 0 if self.tie_word_embeddings else embed
        return self.num_layers * (attn + mlp + norms) + embed + head + self.hidden_size


class VisionConfig(BaseModel):
    """The Pixtral vision encoder plus the Mistral3 projector that feeds the decoder."""

    model_config = ConfigDict(frozen=True)

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_layers: int = 24
    num_heads: int = 16
    head_dim: int = 64
    patch_size: int = 14
    image_size: int = 1540
    num_channels: int = 3
    rope_theta: float = 10_000.0
    rms_norm_eps: float = 1e-5
    hidden_act: str = "silu"  # the encoder checks it supports this
    spatial_merge_size: int = 2
    image_token_id: int = 10
    image_break_token_id: int = 12
    image_end_token_id: int = 13
    projector_hidden_act: str = "gelu"


class AudioConfig(BaseModel):
    """Voxtral's Whisper-like audio encoder plus the projector that feeds the decoder: 128 mel
    bins, 3000 frames per 30 s chunk -> 1500 encoder frames -> (4 frames concatenated, since the
    projector's input is `intermediate_size` = 4 x hidden) 375 decoder tokens."""

    model_config = ConfigDict(frozen=True)

    hidden_size: int = 1280
    intermediate_size: int = 5120
    num_layers: int = 32
    num_heads: int = 20
    num_mel_bins: int = 128
    max_source_positions: int = 1500
    layer_norm_eps: float = 1e-5
    projector_hidden_act: str = "gelu"
    audio_token_id: int = 24

    @property
    def tokens_per_chunk(self) -> int:
        return self.max_source_positions * self.hidden_size // self.intermediate_size


class ModelConfig(BaseModel):
    """What a checkpoint holds: always a text decoder, optionally a vision or an audio encoder."""

    model_config = ConfigDict(frozen=True)

    architecture: str
    text: TextConfig
    vision: VisionConfig | None = None
    audio: AudioConfig | None = None
    # Weight format found on disk: "fp8" for Mistral's static per-tensor FP8 checkpoints.
    checkpoint_dtype: str = "bfloat16"


TEXT_ARCHITECTURES = {"Ministral3ForCausalLM", "MistralForCausalLM"}
MULTIMODAL_ARCHITECTURES = {"Mistral3ForConditionalGeneration"}
AUDIO_ARCHITECTURES = {"VoxtralForConditionalGeneration"}


def _rope_from_hf(text: dict) -> RopeConfig:
    params = dict(text.get("rope_parameters") or text.get("rope_scaling") or {})
    theta = params.get("rope_theta", text.get("rope_theta", 1_000_000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ("default", "yarn"):
        raise CheckpointError(f"config.json: rope_type {rope_type!r} is not supported (default, yarn)")
    return RopeConfig(
        theta=theta,
        type=rope_type,
        factor=params.get("factor", 1.0),
        original_max_position_embeddings=params.get("original_max_position_embeddings"),
        beta_fast=params.get("beta_fast", 32.0),
        beta_slow=params.get("beta_slow", 1.0),
        mscale=params.get("mscale"),
        mscale_all_dim=params.get("mscale_all_dim"),
        llama_4_scaling_beta=params.get("llama_4_scaling_beta"),
    )


def _text_from_hf(text: dict, tie: bool) -> TextConfig:
    heads = text["num_attention_heads"]
    return TextConfig(
        hidden_size=text["hidden_size"],
        intermediate_size=text["intermediate_size"],
        num_layers=text["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=text.get("num_key_value_heads") or heads,
        head_dim=text.get("head_dim") or text["hidden_size"] // heads,
        vocab_size=text["vocab_size"],
        rms_norm_eps=text.get("rms_norm_eps", 1e-5),
        tie_word_embeddings=tie,
        max_position_embeddings=text.get("max_position_embeddings", 262_144),
        rope=_rope_from_hf(text),
        bos_token_id=text.get("bos_token_id") if text.get("bos_token_id") is not None else 1,
        eos_token_id=_first(text.get("eos_token_id"), 2),
        pad_token_id=text.get("pad_token_id") if text.get("pad_token_id") is not None else 11,
    )


def _first(value, default: int) -> int:
    if value is None:
        return default
    return value[0] if isinstance(value, list) else value


def _vision_from_hf(cfg: dict) -> VisionConfig:
    v = cfg["vision_config"]
    heads = v.get("num_attention_heads", 16)
    rope = v.get("rope_parameters") or {}
    text_eps = cfg.get("text_config", {}).get("rms_norm_eps", 1e-5)
    return VisionConfig(
        hidden_size=v.get("hidden_size", 1024),
        intermediate_size=v.get("intermediate_size", 4096),
        num_layers=v.get("num_hidden_layers", 24),
        num_heads=heads,
        head_dim=v.get("head_dim") or v.get("hidden_size", 1024) // heads,
        patch_size=v.get("patch_size", 14),
        image_size=v.get("image_size", 1540),
        num_channels=v.get("num_channels", 3),
        rope_theta=rope.get("rope_theta", v.get("rope_theta", 10_000.0)),
        rms_norm_eps=text_eps,
        hidden_act=v.get("hidden_act", "silu"),
        spatial_merge_size=cfg.get("spatial_merge_size", 2),
        image_token_id=cfg.get("image_token_id", cfg.get("image_token_index", 10)),
        projector_hidden_act=cfg.get("projector_hidden_act", "gelu"),
    )


def _checked_audio(audio: AudioConfig) -> AudioConfig:
    if audio.intermediate_size % audio.hidden_size or audio.max_source_positions % (audio.intermediate_size // audio.hidden_size):
        raise CheckpointError(f"audio_config: the projector concatenates intermediate_size / hidden_size = "
                              f"{audio.intermediate_size / audio.hidden_size:g} frames; it must be a whole divisor of "
                              f"max_source_positions ({audio.max_source_positions})")
    return audio


def _audio_from_hf(cfg: dict) -> AudioConfig:
    a = cfg["audio_config"]
    return _checked_audio(AudioConfig(
        hidden_size=a["hidden_size"], intermediate_size=a["intermediate_size"], num_layers=a["num_hidden_layers"],
        num_heads=a["num_attention_heads"], num_mel_bins=a.get("num_mel_bins", 128),
        max_source_positions=a.get("max_source_positions", 1500),
        projector_hidden_act=cfg.get("projector_hidden_act", "gelu"),
        audio_token_id=cfg.get("audio_token_id") if cfg.get("audio_token_id") is not None else 24))


def _audio_from_native(whisper: dict) -> AudioConfig:
    """``params.json``'s ``multimodal.whisper_model_args``: the encoder, and the projector's frame
    stacking (``downsample_factor`` frames side by side: the HF config's intermediate_size)."""
    e = whisper["encoder_args"]
    factor = (whisper.get("downsample_args") or {}).get("downsample_factor", 4)
    if e.get("hidden_dim", e["dim"] * factor) != e["dim"] * factor:
        raise CheckpointError(f"whisper encoder hidden_dim {e.get('hidden_dim')} is not dim x downsample_factor "
                              f"({e['dim']} x {factor}), which this exporter assumes")
    return _checked_audio(AudioConfig(
        hidden_size=e["dim"], intermediate_size=e["dim"] * factor, num_layers=e["n_layers"], num_heads=e["n_heads"],
        num_mel_bins=(e.get("audio_encoding_args") or {}).get("num_mel_bins", 128),
        max_source_positions=e.get("max_source_positions", 1500)))


def from_hf_config(path: Path) -> ModelConfig:
    """Parse a transformers `config.json`."""
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot read config ({exc})") from None
    archs = cfg.get("architectures") or []
    arch = archs[0] if archs else {"ministral3": "Ministral3ForCausalLM", "mistral3": "Mistral3ForConditionalGeneration",
                                   "voxtral": "VoxtralForConditionalGeneration"}.get(
        cfg.get("model_type"), "")
    quant = cfg.get("quantization_config") or {}
    dtype = "fp8" if quant.get("quant_method") == "fp8" else cfg.get("torch_dtype", cfg.get("dtype", "bfloat16"))
    try:
        if arch in MULTIMODAL_ARCHITECTURES:
            text = cfg["text_config"]
            tie = bool(cfg.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))
            return ModelConfig(architecture=arch, text=_text_from_hf(text, tie), vision=_vision_from_hf(cfg),
                               checkpoint_dtype=str(dtype))
        if arch in AUDIO_ARCHITECTURES:
            text = cfg["text_config"]
            tie = bool(text.get("tie_word_embeddings", cfg.get("tie_word_embeddings", False)))
            return ModelConfig(architecture=arch, text=_text_from_hf(text, tie), audio=_audio_from_hf(cfg),
                               checkpoint_dtype=str(dtype))
        if arch in TEXT_ARCHITECTURES:
            return ModelConfig(architecture=arch, text=_text_from_hf(cfg, bool(cfg.get("tie_word_embeddings", False))),
                               checkpoint_dtype=str(dtype))
    except KeyError as exc:
        raise CheckpointError(f"{path}: missing field {exc.args[0]!r}") from None
    known = ", ".join(sorted(TEXT_ARCHITECTURES | MULTIMODAL_ARCHITECTURES | AUDIO_ARCHITECTURES))
    raise CheckpointError(f"{path}: unknown architecture {arch or cfg.get('model_type')!r} (supported: {known})")


def from_native_params(path: Path) -> ModelConfig:
    """Parse Mistral's native `params.json`."""
    try:
        p = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot read params ({exc})") from None
    try:
        yarn = p.get("yarn") or {}
        l4 = p.get("llama_4_scaling") or {}
        rope = RopeConfig(
            theta=p.get("rope_theta", 1_000_000.0),
            type="yarn" if yarn else "default",
            factor=yarn.get("factor", 1.0),
            original_max_position_embeddings=yarn.get("original_max_position_embeddings",
                                                      l4.get("original_max_position_embeddings")),
            beta_fast=yarn.get("beta", 32.0),
            beta_slow=yarn.get("alpha", 1.0),
            # Native YaRN with apply_scale keeps cos/sin unscaled, as mscale == mscale_all_dim does.
            mscale=1.0 if yarn else None,
            mscale_all_dim=1.0 if yarn else None,
            llama_4_scaling_beta=l4.get("beta"),
        )
        text = TextConfig(
            hidden_size=p["dim"],
            intermediate_size=p["hidden_dim"],
            num_layers=p["n_layers"],
            num_heads=p["n_heads"],
            num_kv_heads=p.get("n_kv_heads", p["n_heads"]),
            head_dim=p.get("head_dim") or p["dim"] // p["n_heads"],
            vocab_size=p["vocab_size"],
            rms_norm_eps=p.get("norm_eps", 1e-5),
            tie_word_embeddings=bool(p.get("tied_embeddings", False)),
            max_position_embeddings=p.get("max_position_embeddings", p.get("max_seq_len", 262_144)),
            rope=rope,
        )
        vision = None
        if p.get("vision_encoder"):
            v = p["vision_encoder"]
            vision = VisionConfig(
                hidden_size=v["hidden_size"],
                intermediate_size=v["intermediate_size"],
                num_layers=v["num_hidden_layers"],
                num_heads=v["num_attention_heads"],
                head_dim=v.get("head_dim") or v["hidden_size"] // v["num_attention_heads"],
                patch_size=v.get("patch_size", 14),
                image_size=v.get("image_size", 1540),
                num_channels=v.get("num_channels", 3),
                rope_theta=v.get("rope_theta", 10_000.0),
                rms_norm_eps=p.get("norm_eps", 1e-5),
                spatial_merge_size=v.get("spatial_merge_size", 2),
                image_token_id=v.get("image_token_id", 10),
                image_break_token_id=v.get("image_break_token_id", 12),
                image_end_token_id=v.get("image_end_token_id", 13),
            )
        whisper = (p.get("multimodal") or {}).get("whisper_model_args")
        audio = _audio_from_native(whisper) if whisper else None
    except KeyError as exc:
        raise CheckpointError(f"{path}: missing field {exc.args[0]!r}") from None
    quant = p.get("quantization") or {}
    dtype = "fp8" if quant.get("qformat_weight") == "fp8_e4m3" else "bfloat16"
    arch = ("VoxtralForConditionalGeneration" if audio else "Mistral3ForConditionalGeneration" if vision
            else "Ministral3ForCausalLM")
    return ModelConfig(architecture=arch, text=text, vision=vision, audio=audio, checkpoint_dtype=dtype)
