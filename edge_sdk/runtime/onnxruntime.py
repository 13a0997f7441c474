"""The CPU backend: the package's ONNX graphs on ONNX Runtime.

These are the same graphs TensorRT compiles on a Jetson, so running them here in CI checks the
artifact that ships. `accuracy_level` picks ONNX Runtime's MatMulNBits kernel for INT4 weights:
4 quantizes activations to int8 (fast), 0 keeps them in float (exact, for golden tests).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .embedding import EmbeddingTable

log = logging.getLogger(__name__)

ACCURACY_LEVELS = (0, 1, 2, 3, 4)
#: The graphs run here; embed.onnx's table is gathered on the host, and the TensorRT plugin
#: graph needs the plugins (plugins/reference_backend.py runs it with their NumPy references).
ORT_ROLES = ("decoder", "vision")


@dataclass
class OrtCache:
    """Per-layer past keys/values [1, kv_heads, length, head_dim], as ONNX Runtime's own values:
    one step's presents are bound as the next step's pasts, never copied out to NumPy."""

    values: dict[str, object]


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(self, package_dir: Path, manifest, threads: int | None = None, accuracy_level: int = 4):
        import onnxruntime as ort

        if accuracy_level not in ACCURACY_LEVELS:
            raise ValueError(f"accuracy_level must be one of {ACCURACY_LEVELS}, got {accuracy_level}")
        self.accuracy_level = accuracy_level
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or os.cpu_count() or 1
        options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(accuracy_level))
        options.log_severity_level = 3  # keep ONNX Runtime's shape-merge chatter out of user logs
        self.package_dir = Path(package_dir)
        self.sessions = {
            role: ort.InferenceSession(str(self.package_dir / entry.file), options, providers=["CPUExecutionProvider"])
            for role, entry in manifest.graphs.items() if role in ORT_ROLES
        }
        self.embeddings = EmbeddingTable.open(self.package_dir / manifest.graphs["embed"].file)
        decoder = self.sessions["decoder"]
        self.cache_names = [i.name for i in decoder.get_inputs() if i.name.startswith("past_")]
        self.output_names = [o.name for o in decoder.get_outputs()]
        past = decoder.get_inputs()[2]
        self.kv_heads, self.head_dim = past.shape[1], past.shape[3]
        self.dtype = np.float16 if "float16" in past.type else np.float32
        log.info("onnxruntime backend: %d threads, INT4 accuracy level %d, %s graphs",
                 options.intra_op_num_threads, accuracy_level, np.dtype(self.dtype).name)

    def embed(self, ids: np.ndarray) -> np.ndarray:
        return self.embeddings.lookup(ids)

    def new_cache(self) -> OrtCache:
        import onnxruntime as ort

        empty = np.zeros((1, self.kv_heads, 0, self.head_dim), dtype=self.dtype)
        return OrtCache({name: ort.OrtValue.ortvalue_from_numpy(empty) for name in self.cache_names})

    def forward(self, embeds: np.ndarray, position_ids: np.ndarray, cache: OrtCache) -> tuple[np.ndarray, OrtCache]:
        session = self.sessions["decoder"]
        binding = session.io_binding()
        binding.bind_cpu_input("inputs_embeds", np.asarray(embeds, dtype=self.dtype).reshape(1, -1, embeds.shape[-1]))
        binding.bind_cpu_input("position_ids", np.asarray(position_ids, dtype=np.int64).reshape(1, -1))
        for name, value in cache.values.items():
            binding.bind_ortvalue_input(name, value)
        for name in self.output_names:
            binding.bind_output(name, "cpu")
        session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        presents = {name.replace("present_", "past_"): value
                    for name, value in zip(self.output_names[1:], outputs[1:])}
        return outputs[0].numpy()[0], OrtCache(presents)

    def encode_image(self, pixels: np.ndarray) -> np.ndarray:
        if "vision" not in self.sessions:
            raise ValueError("this engine package has no vision encoder")
        session = self.sessions["vision"]
        dtype = np.float16 if "float16" in session.get_inputs()[0].type else np.float32
        return session.run(None, {"pixel_values": np.asarray(pixels, dtype=dtype)[None]})[0].astype(np.float32)
