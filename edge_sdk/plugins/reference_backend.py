"""A `DecoderBackend` that runs the TensorRT plugin graph on ONNX Runtime with the NumPy plugin
references: the graph a Jetson compiles, checked on a CPU before it ever meets TensorRT.

It drives the plugin graph exactly as the TensorRT plugin engine is driven (runtime/tensorrt.py):
one preallocated cache per layer, ``past_lengths`` saying where new tokens go, the cache output
taken as the next step's cache input. Slow (the ops are NumPy): for checks, not for serving.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..runtime.embedding import EmbeddingTable
from ..runtime.types import ContextOverflowError, GenerationError
from . import ops
from .reference import reference_session


@dataclass
class PluginCache:
    """Per-layer [1, 2, kv_heads, capacity, head_dim] caches and how many tokens they hold."""

    layers: list[np.ndarray]
    length: int = 0


class PluginGraphReference:
    name = "plugin-reference"

    def __init__(self, package_dir: str | Path, manifest, graph: str | Path | None = None,
                 max_context: int | None = None, threads: int | None = None):
        package_dir = Path(package_dir)
        graph = Path(graph) if graph else package_dir / manifest.graphs["decoder_plugins"].file
        self.session = reference_session(graph, threads)
        self.embeddings = EmbeddingTable.open(package_dir / manifest.graphs["embed"].file)
        inputs = {i.name: i for i in self.session.get_inputs()}
        cache = inputs[ops.cache_input(0)]
        self.num_layers = sum(1 for name in inputs if name.startswith("kv_cache."))
        self.kv_heads, self.head_dim = cache.shape[2], cache.shape[4]
        self.dtype = np.float16 if "float16" in cache.type else np.float32
        self.capacity = max_context or manifest.context_length
        self.output_names = [o.name for o in self.session.get_outputs()]

    def embed(self, ids: np.ndarray) -> np.ndarray:
        return self.embeddings.lookup(ids)

    def new_cache(self) -> PluginCache:
        shape = (1, 2, self.kv_heads, self.capacity, self.head_dim)
        return PluginCache([np.zeros(shape, self.dtype) for _ in range(self.num_layers)])

    def forward(self, embeds: np.ndarray, position_ids: np.ndarray, cache: PluginCache):
        t = len(embeds)
        if cache.length + t > self.capacity:
            raise ContextOverflowError(f"{cache.length} cached + {t} new tokens exceed the cache of {self.capacity}")
        feeds = {"inputs_embeds": np.asarray(embeds, self.dtype)[None],
                 "position_ids": np.asarray(position_ids, np.int64).reshape(1, -1),
                 ops.PAST_LENGTHS: np.array([cache.length], np.int32)}
        feeds.update({ops.cache_input(i): layer for i, layer in enumerate(cache.layers)})
        out = dict(zip(self.output_names, self.session.run(None, feeds)))
        cache.layers = [out[ops.cache_output(i)] for i in range(self.num_layers)]
        cache.length += t
        return out["logits"][0], cache

    def encode_image(self, pixels: np.ndarray) -> np.ndarray:
        raise GenerationError("the plugin reference runs the decoder graph only; images go through vision.onnx")
