"""Audio in: decoding, resampling to 16 kHz mono, and Voxtral's (Whisper's) log-mel features, in
NumPy (no torch, no librosa at run time).

Sources: a path or the bytes of a WAV / FLAC / OGG file (libsndfile via soundfile), raw PCM16
described by a MIME type (``audio/L16;rate=16000;channels=1``: big-endian as RFC 2586 says,
or ``audio/pcm;rate=...``: little-endian, what firmware usually sends), or a float32 array
already at 16 kHz. Anything else, a truncated file, a rate outside 8-192 kHz or a clip longer
than the limit is an `AudioError` whose one line names the source and the reason.

`log_mel` reproduces transformers' `WhisperFeatureExtractor` (numpy path) with 128 bins: n_fft
400, hop 160, periodic Hann, reflect padding, power spectrum, Slaney mel filters, log10 floored
at 1e-10, the last frame dropped, clamped at (max - 8) over the whole padded clip, (x + 4) / 4;
audio zero-padded to a multiple of 30 s, one [128, 3000] row per chunk.
"""

from __future__ import annotations

import io
import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Union

import numpy as np

SAMPLE_RATE = 16_000
CHUNK_SECONDS = 30
N_FFT, HOP, N_MELS = 400, 160, 128
FRAMES_PER_CHUNK = CHUNK_SECONDS * SAMPLE_RATE // HOP  # 3000
DEFAULT_MAX_SECONDS = 300.0
RATE_RANGE = (8_000, 192_000)

AudioInput = Union[str, os.PathLike, bytes, bytearray, memoryview, np.ndarray]


class AudioError(ValueError):
    """Audio that cannot be used; the message names the source and why."""


def _pcm_format(mime: str) -> tuple[int, int, str] | None:
    """(rate, channels, byte order) of an ``audio/L16`` or ``audio/pcm`` MIME type, else None."""
    m = re.fullmatch(r"\s*audio/(l16|pcm)\s*((?:;\s*[\w-]+\s*=\s*[\w.-]+\s*)*)", mime.lower())
    if not m:
        return None
    params = dict(re.findall(r"([\w-]+)\s*=\s*([\w.-]+)", m.group(2)))
    if "rate" not in params:
        raise AudioError(f"{mime}: raw PCM needs its sample rate (e.g. audio/L16;rate=16000)")
    order = ">" if m.group(1) == "l16" else "<"
    return int(params["rate"]), int(params.get("channels", 1)), order


def to_pcm16(samples: np.ndarray) -> bytes:
    """Float samples in [-1, 1] -> PCM16 little-endian bytes (clipped): what audio streams and
    ``audio/pcm`` payloads carry."""
    return (np.clip(np.asarray(samples, dtype=np.float32), -1, 1) * 32767).astype("<i2").tobytes()


def from_pcm16(data: bytes, byteorder: str = "<") -> np.ndarray:
    """PCM16 bytes (``<`` little-endian, ``>`` big-endian) -> float32 samples in [-1, 1)."""
    return np.frombuffer(data, dtype=f"{byteorder}i2").astype(np.float32) / 32768.0


def load_audio(source: AudioInput, mime: str | None = None, *, max_seconds: float = DEFAULT_MAX_SECONDS,
               name: str | None = None) -> np.ndarray:
    """16 kHz mono float32 in [-1, 1] from ``source`` (see the module docstring)."""
    label = name or (str(source) if isinstance(source, (str, os.PathLike)) else mime or "audio")
    if isinstance(source, np.ndarray):
        samples = np.asarray(source, dtype=np.float32)
        if samples.ndim != 1:
            raise AudioError(f"{label}: an audio array must be 1-D float32 samples at {SAMPLE_RATE} Hz")
        rate = SAMPLE_RATE
    elif mime is not None and (pcm := _pcm_format(mime)) is not None:
        rate, channels, order = pcm
        data = bytes(source) if not isinstance(source, (str, os.PathLike)) else Path(source).read_bytes()
        if len(data) % (2 * channels):
            raise AudioError(f"{label}: {len(data)} bytes is not a whole number of 16-bit frames of "
                             f"{channels} channel(s): truncated?")
        samples = from_pcm16(data, order).reshape(-1, channels)
        samples = samples.mean(axis=1)
    else:
        samples, rate = _decode_file(source, label)
    if not RATE_RANGE[0] <= rate <= RATE_RANGE[1]:
        raise AudioError(f"{label}: sample rate {rate} Hz is outside {RATE_RANGE[0]}-{RATE_RANGE[1]} Hz")
    if len(samples) / rate > max_seconds:
        raise AudioError(f"{label}: {len(samples) / rate:.1f} s of audio is longer than the {max_seconds:.0f} s limit")
    if len(samples) == 0:
        raise AudioError(f"{label}: no audio samples")
    return resample(samples, rate)


def _decode_file(source: AudioInput, label: str) -> tuple[np.ndarray, int]:
    import soundfile

    try:
        if isinstance(source, (str, os.PathLike)):
            if not Path(source).is_file():
                raise AudioError(f"{label}: no such file")
            data, rate = soundfile.read(str(source), dtype="float32", always_2d=True)
        else:
            data, rate = soundfile.read(io.BytesIO(bytes(source)), dtype="float32", always_2d=True)
    except AudioError:
        raise
    except Exception as exc:  # libsndfile's reasons: not audio, truncated header, unknown format
        reason = str(exc).split(":")[-1].strip() or type(exc).__name__
        raise AudioError(f"{label}: not a readable WAV/FLAC/OGG file ({reason})") from None
    return data.mean(axis=1), int(rate)


def resample(samples: np.ndarray, rate: int) -> np.ndarray:
    """To 16 kHz with soxr's high-quality filter (the resampler mistral-common uses)."""
    if rate == SAMPLE_RATE:
        return np.ascontiguousarray(samples, dtype=np.float32)
    import soxr

    return soxr.resample(samples.astype(np.float32), rate, SAMPLE_RATE, quality="HQ").astype(np.float32)


# -- log-mel ---------------------------------------------------------------------------------------
def _hz_to_mel(f: np.ndarray) -> np.ndarray:
    """Slaney's mel scale: linear below 1 kHz, logarithmic above."""
    f = np.asarray(f, dtype=np.float64)
    mel = 3.0 * f / 200.0
    log_region = f >= 1000.0
    return np.where(log_region, 15.0 + np.log(np.maximum(f, 1e-10) / 1000.0) / (np.log(6.4) / 27.0), mel)


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    return np.where(m >= 15.0, 1000.0 * np.exp((np.log(6.4) / 27.0) * (m - 15.0)), 200.0 * m / 3.0)


@lru_cache(maxsize=None)
def mel_filters(n_mels: int = N_MELS) -> np.ndarray:
    """[n_fft/2 + 1, n_mels] Slaney-normalised triangular filters from 0 to 8 kHz."""
    freqs = np.linspace(0, SAMPLE_RATE / 2, N_FFT // 2 + 1)
    edges = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(SAMPLE_RATE / 2), n_mels + 2))
    lower = (freqs[:, None] - edges[None, :-2]) / (edges[1:-1] - edges[:-2])
    upper = (edges[None, 2:] - freqs[:, None]) / (edges[2:] - edges[1:-1])
    filters = np.maximum(0.0, np.minimum(lower, upper))
    return filters * (2.0 / (edges[2:] - edges[:-2]))[None, :]


def chunk_count(n_samples: int) -> int:
    return max(1, -(-n_samples // (CHUNK_SECONDS * SAMPLE_RATE)))


def log_mel(samples: np.ndarray) -> np.ndarray:
    """16 kHz float32 samples -> float32 features [chunks, 128, 3000]."""
    total = chunk_count(len(samples)) * CHUNK_SECONDS * SAMPLE_RATE
    audio = np.zeros(total, dtype=np.float32)
    audio[: len(samples)] = samples[:total]
    padded = np.pad(audio.astype(np.float64), N_FFT // 2, mode="reflect")
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(N_FFT) / N_FFT)  # periodic Hann
    frames = np.lib.stride_tricks.sliding_window_view(padded, N_FFT)[::HOP]
    power = np.abs(np.fft.rfft(frames * window, axis=-1)) ** 2  # [frames, 201]
    mel = np.maximum(power @ mel_filters(), 1e-10)
    logs = np.log10(mel).T[:, :-1]  # [128, frames - 1]
    logs = np.maximum(logs, logs.max() - 8.0)
    features = ((logs + 4.0) / 4.0).astype(np.float32)
    return np.ascontiguousarray(features.reshape(N_MELS, -1, FRAMES_PER_CHUNK).transpose(1, 0, 2))
