"""The interface every execution backend implements, and how one is chosen.

A backend runs the package's graphs; the generation loop, sampling and tokenizer above it are
shared. The KV cache is an opaque object owned by the backend (host arrays for ONNX Runtime,
device buffers for TensorRT), so decode steps never recompute the prompt.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from .types import BackendUnavailable


class DecoderBackend(Protocol):
    name: str

    def embed(self, ids: np.ndarray) -> np.ndarray:
        """Token ids [T] -> embeddings [T, hidden] float32."""

    def new_cache(self) -> Any:
        """An empty KV cache."""

    def forward(self, embeds: np.ndarray, position_ids: np.ndarray, cache: Any) -> tuple[np.ndarray, Any]:
        """Embeddings [T, hidden] at positions [T] after `cache` -> (last-token logits [vocab], new cache)."""

    def encode_image(self, pixels: np.ndarray) -> np.ndarray:
        """Normalised pixels [3, H, W] -> image features [(H/28)*(W/28), hidden] (vision packages only)."""

    def encode_audio(self, features: np.ndarray) -> np.ndarray:
        """Log-mel [chunks, 128, 3000] -> audio features [chunks * 375, hidden] (audio packages only)."""


def create_backend(name: str, package_dir, manifest, **options) -> DecoderBackend:
    """`auto` takes TensorRT when the package has engines and a GPU answers, else ONNX Runtime."""
    if name in ("auto", "tensorrt"):
        from .gpu_probe import probe_gpu

        status = probe_gpu()
        if status.available and manifest.engines:
            from .tensorrt import TensorRTDecoder

            return TensorRTDecoder(package_dir, manifest, **options)
        if name == "tensorrt":
            reason = status.reason if not status.available else "the package has no TensorRT engines"
            raise BackendUnavailable(f"tensorrt backend unavailable: {reason}")
    if name in ("auto", "onnxruntime"):
        from .onnxruntime import OnnxRuntimeBackend

        return OnnxRuntimeBackend(package_dir, manifest, **options)
    raise BackendUnavailable(f"unknown backend {name!r} (auto, onnxruntime, tensorrt)")
