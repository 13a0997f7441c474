"""The CPU backend: the package's ONNX graphs on ONNX Runtime.

These are the graphs TensorRT compiles on a Jetson, so running them here in CI checks the
artifact that ships. `accuracy_level` picks ONNX Runtime's MatMulNBits kernel for INT4 weights:
4 quantizes activations to int8 (fast), 0 keeps them in float (exact, for golden tests).

Three ways to run the decoder, one interface:
- `decoder.cpu.onnx` cut at its attentions (runtime/segments.py), where the attention kernel is
  installed: a session per stretch between attentions, the kernel between them writing into KV
  buffers this backend makes for the whole context (`KernelCache`: float16 by default, int8 or
  float32 on request) and reading only the filled rows; at accuracy level 4, where the CPU has
  AVX-512 VNNI, the linear kernel (runtime/linear.py) runs the INT4 linears and the quantized
  head as steps between the pieces too;
- `decoder.cpu.onnx` whole (CPU-profile packages; export/cpu_graph.py), where it is not:
  attention that reads the KV buffers (bound without a copy) and returns the step's new keys and
  values, which this backend writes into the buffers. They grow in 256-token steps (one copy
  per step size, not per token); one-token steps run on inputs and outputs bound once per set of
  buffers (`DecodeIO`). Both CPU-graph forms prefill prompts in 256-token chunks;
- `decoder.onnx` (the standard graph, any package): past/present concatenated by the graph each
  step; presents are bound as the next step's pasts without a copy out to NumPy.
`graph="decoder"` forces the standard one.
"""

from __future__ import annotations

import logging
import mmap
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .attention import LayerCache
from .embedding import EmbeddingTable
from .io_binding import bind_arrays
from .segments import DecodeBindings, LinearStep, SegmentedDecoder
from .types import KV_CACHE_DTYPES, ContextOverflowError

log = logging.getLogger(__name__)

ACCURACY_LEVELS = (0, 1, 2, 3, 4)


@dataclass
class OrtCache:
    """Standard graph: per-layer past keys/values [1, kv_heads, length, head_dim], as ONNX
    Runtime's own values: one step's presents are bound as the next step's pasts."""

    values: dict[str, object]


@dataclass
class DecodeIO:
    """A one-token step's inputs and outputs as NumPy arrays bound once (with a cache's buffers)
    to one IO binding: a decode step then copies its embedding in and its keys, values and logits
    out, with no binding or allocation per token (0.2-0.3 ms of a 30 ms step on 2 cores)."""

    binding: object
    inputs: dict[str, np.ndarray]   # inputs_embeds [1, 1, H], position_ids [1, 1], past_lengths [1]
    outputs: dict[str, np.ndarray]  # logits [1, V], new_key.{i} / new_value.{i} [1, KV, 1, D]
    values: list                    # the OrtValues over those arrays, kept alive with them


@dataclass
class InPlaceCache:
    """The whole CPU graph: per-layer key and value buffers [1, kv_heads, capacity, head_dim]
    (NumPy arrays and the OrtValues over their memory), of which the first `length` positions are
    filled; and this sequence's one-token bindings (its own, so that generations on other threads
    never share them)."""

    arrays: dict[str, np.ndarray]
    values: dict[str, object]
    length: int = 0
    decode_io: DecodeIO | None = None  # made by the first one-token step over these buffers

    @property
    def capacity(self) -> int:
        return next(iter(self.arrays.values())).shape[2]


@dataclass
class KernelCache:
    """Attention kernel: each layer's cache (attention.LayerCache), made for the whole context at
    once (the kernel reads only the filled rows; untouched pages take no memory), of which the
    first `length` positions are filled; and this sequence's one-token bindings."""

    layers: list[LayerCache]
    length: int = 0
    decode_io: DecodeBindings | None = None

    @property
    def capacity(self) -> int:
        return self.layers[0].capacity


#: The whole CPU graph's buffers grow in steps of this many tokens (up to the package's context):
#: its attention reads the whole buffer every step, so unused room costs bandwidth, while a
#: regrowth's copy, once per step size, costs little. (The attention kernel's buffers are made
#: for the whole context at once: it reads only what is filled.)
CAPACITY_STEP = 256
#: The CPU graph runs a longer prompt in chunks of this many tokens: the whole graph's attention
#: scores take heads x chunk x (cache + chunk) floats, ~150 MB per layer at 256 tokens after
#: 4,096; cut, it keeps each piece's activations (chunk x 9,216 floats for the MLP) bounded.
PREFILL_CHUNK = 256


#: The CPU graph's nodes worth threads: matrix products (ONNX Runtime fuses an INT4
#: DequantizeLinear -> MatMul into MatMulNBits).
HEAVY_OPS = {"MatMul", "MatMulNBits", "FusedMatMul", "Gemm"}


def _drives(cpu_graph) -> bool:
    """Whether ``cpu_graph`` (its ModelProto) is the CPU graph this backend drives: it returns each
    step's keys and values as ``new_key.{i}``."""
    return any(o.name.startswith("new_key") for o in cpu_graph.graph.output)


def _session(path: Path, options, accuracy_level: int, model=None):
    """A CPU session for the graph at ``path``, or for ``model`` (a graph loaded or made without
    its weights, which are read from beside ``path``: ``options`` name that folder). MatMulNBits
    nodes the graph states itself (the CPU graph's INT4 / INT8 head) get ``accuracy_level``, as
    the DequantizeLinear -> MatMul pairs ONNX Runtime fuses do from the session option."""
    import onnx
    import onnxruntime as ort

    given = model is not None
    model = model if given else onnx.load(str(path), load_external_data=False)
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    if not (given or nbits):
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    for node in nbits:
        next(a for a in node.attribute if a.name == "accuracy_level").i = accuracy_level
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _untouched_zeros(shape: tuple[int, ...], dtype) -> np.ndarray:
    """Zeros in pages the OS maps on first write: a KV cache made for the whole context costs
    memory and time only as it fills. (np.zeros of a size glibc serves from its heap writes every
    page: measured 13 ms a layer per generation, and the whole cache resident from the start.)"""
    count = int(np.prod(shape))
    return np.frombuffer(mmap.mmap(-1, max(count * np.dtype(dtype).itemsize, 1)), dtype, count).reshape(shape)


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(self, package_dir: Path, manifest, threads: int | None = None, accuracy_level: int = 4,
                 graph: str | None = None, kv_cache: str = "float16"):
        import onnx

        if accuracy_level not in ACCURACY_LEVELS:
            raise ValueError(f"accuracy_level must be one of {ACCURACY_LEVELS}, got {accuracy_level}")
        if kv_cache not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache must be one of {', '.join(KV_CACHE_DTYPES)}, got {kv_cache!r}")
        self.accuracy_level = accuracy_level
        self.threads = threads or os.cpu_count() or 1
        self.package_dir = Path(package_dir)
        options = self._options(arena=True)
        role = graph or ("decoder_cpu" if "decoder_cpu" in manifest.graphs else "decoder")
        if role not in ("decoder", "decoder_cpu") or role not in manifest.graphs:
            raise ValueError(f"{package_dir}: no {role!r} graph to run (graphs: {', '.join(manifest.graphs)})")
        decoder_path = self.package_dir / manifest.graphs[role].file
        decoder_graph = onnx.load(str(decoder_path), load_external_data=False)
        if role == "decoder_cpu" and not _drives(decoder_graph):
            log.warning("%s: its %s is from an older edge_sdk (a fused-attention graph this runtime no longer "
                        "drives); running decoder.onnx instead. Rebuild the package for the faster CPU graph.",
                        package_dir, manifest.graphs[role].file)
            role = "decoder"
            decoder_path = self.package_dir / manifest.graphs["decoder"].file
            decoder_graph = onnx.load(str(decoder_path), load_external_data=False)
        self.in_place = role == "decoder_cpu"
        self.context_length = manifest.context_length
        self.cache_names = [i.name for i in decoder_graph.graph.input if i.name.startswith(("past_key", "past_value"))]
        past = next(i for i in decoder_graph.graph.input if i.name == self.cache_names[0])
        self.kv_heads, self.head_dim = (past.type.tensor_type.shape.dim[a].dim_value for a in (1, 3))
        self.dtype = np.float16 if past.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16 else np.float32
        self.sessions = {}
        self.segmented = (self._segmented(decoder_path, decoder_graph, manifest.model.text.num_heads)
                          if self.in_place else None)
        if self.segmented is None:
            self.sessions["decoder"] = _session(decoder_path, options, accuracy_level, decoder_graph)
            self.output_names = [o.name for o in self.sessions["decoder"].get_outputs()]
        if kv_cache == "int8" and not self.segmented:
            log.warning("an int8 KV cache needs the attention kernel; the graph's attention keeps a %s cache",
                        np.dtype(self.dtype).name)
        self.cache_dtype = np.dtype(kv_cache) if self.segmented else np.dtype(self.dtype)
        self.sessions.update({r: _session(self.package_dir / manifest.graphs[r].file, options, accuracy_level)
                              for r in ("vision", "audio") if r in manifest.graphs})
        self.embeddings = EmbeddingTable.open(self.package_dir / manifest.graphs["embed"].file)
        log.info("onnxruntime backend: %d threads, INT4 accuracy level %d, %s graphs, %s, %s KV cache",
                 self.threads, accuracy_level, np.dtype(self.dtype).name,
                 "attention kernel" if self.segmented else "graph attention",
                 f"in-place {self.cache_dtype.name}" if self.in_place else "concatenated")

    def _options(self, arena: bool, threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or self.threads
        # Each session's threads spin between the nodes of a run, then stop: a cut CPU graph runs a
        # session per layer, and threads left spinning after theirs would take the cores from the
        # next session and the attention kernel.
        options.add_session_config_entry("session.force_spinning_stop", "1")
        options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(self.accuracy_level))
        options.log_severity_level = 3  # keep ONNX Runtime's shape-merge chatter out of user logs
        # Where the weights of graphs passed as bytes (_session) are: every graph's sit in the package.
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(self.package_dir))
        options.enable_cpu_mem_arena = arena
        return options

    def _segmented(self, path: Path, graph, heads: int) -> SegmentedDecoder | None:
        """The CPU graph cut at its attentions, with the attention kernel between the pieces (and
        at its quantized linears, run by the linear kernel, where it can be); None (and the reason,
        logged) where this host or package cannot: the whole graph runs then."""
        from . import attention, kernels, segments

        cuts = segments.attention_cuts(graph)
        if cuts is None:
            log.warning("%s: from before the attention kernel (no %s); running its graph attention. Rebuild the "
                        "package for faster decoding.", path, segments.ATTENTION_CUTS_KEY)
            return None
        if self.dtype != np.float32 or not attention.supports(heads, self.kv_heads, self.head_dim):
            log.warning("%s: %s graph with %d/%d heads of %d: not a shape the attention kernel takes; running its "
                        "graph attention", path, np.dtype(self.dtype).name, heads, self.kv_heads, self.head_dim)
            return None
        try:
            library = kernels.load()
        except kernels.KernelUnavailable as exc:
            log.warning("attention kernel unavailable (%s); running the CPU graph's own attention, slower at long "
                        "contexts", exc)
            return None
        kernel = attention.AttentionKernel(library, heads, self.kv_heads, self.head_dim,
                                           segments.rope_tables(graph, cuts, path), self.threads)
        linears = self._linears(library, path, graph)
        # The kernels' threads spin between calls only where the kernels run all of a step's matrix
        # products: elsewhere ONNX Runtime's threads run them, and would lose a core to a spinner.
        library.edge_pool_set_spin(bool(linears))
        # No arena per piece: each would keep its own high-water mark of activations (measured: +0.12 GB
        # after a 128-token prefill over 7 pieces); the allocator's free lists serve them all instead.
        options = self._options(arena=False)
        # A piece without matrix products (norms, splits, the MLP's activation: what is left between
        # the linear kernel's steps) runs on the calling thread: a thread of its own to wake would
        # cost more than its work, and would contend with the kernels' threads for the cores.
        light = self._options(arena=False, threads=1)

        def make_session(piece):
            heavy = any(node.op_type in HEAVY_OPS for node in piece.graph.node)
            return _session(path, options if heavy else light, self.accuracy_level, piece)
        return SegmentedDecoder.open(graph, cuts, kernel, make_session, linears)

    def _linears(self, library, path: Path, graph) -> list[LinearStep]:
        """The linear kernel over the graph's quantized linears (the layers' INT4 ones and the
        MatMulNBits head), where it computes what MatMulNBits would (accuracy level 4: int8
        products) and this CPU runs it; else none, and the pieces keep them."""
        from tqdm.auto import tqdm

        from . import linear

        if self.accuracy_level != 4:
            return []
        if not linear.available(library):
            log.info("quantized linears: ONNX Runtime's MatMulNBits (the linear kernel needs AVX-512 VNNI)")
            return []
        pairs = linear.layer_linears(graph)
        steps = [LinearStep(matmul.input[0], matmul.output[0],
                            linear.LinearKernel(library, linear.dequantize_linear_weight(graph, dq, path.parent),
                                                self.threads))
                 for dq, matmul in tqdm(pairs, desc="packing INT4 linears", unit="linear", leave=False,
                                        disable=None)]  # shown on a terminal only
        node, head = linear.head_node(graph), None
        attrs = {a.name: a.i for a in node.attribute} if node is not None else {}
        if node is not None and linear.supports(attrs["bits"], attrs["block_size"], attrs["K"]):
            head = linear.LinearKernel(library, linear.matmul_nbits_weight(graph, node, path.parent), self.threads)
            steps.append(LinearStep(node.input[0], "logits", head))
        log.info("the linear kernel runs %d INT4 linears%s", len(pairs), f" and the INT{head.bits} head" if head else "")
        return steps

    def embed(self, ids: np.ndarray) -> np.ndarray:
        return self.embeddings.lookup(ids)

    def new_cache(self) -> OrtCache | InPlaceCache | KernelCache:
        if self.segmented:
            return KernelCache([self._layer_cache() for _ in range(self.segmented.attention_layers)])
        if self.in_place:
            return self._buffers(min(CAPACITY_STEP, self.context_length))
        import onnxruntime as ort

        empty = np.zeros((1, self.kv_heads, 0, self.head_dim), dtype=self.dtype)
        return OrtCache({name: ort.OrtValue.ortvalue_from_numpy(empty) for name in self.cache_names})

    def _layer_cache(self) -> LayerCache:
        shape = (self.kv_heads, self.context_length, self.head_dim)
        scales = ([_untouched_zeros(shape[:2], np.float32) for _ in range(2)] if self.cache_dtype == np.int8
                  else [None, None])
        return LayerCache(_untouched_zeros(shape, self.cache_dtype), _untouched_zeros(shape, self.cache_dtype), *scales)

    def _buffers(self, capacity: int, old: InPlaceCache | None = None) -> InPlaceCache:
        """Buffers of ``capacity`` tokens, holding ``old``'s cached tokens if given."""
        import onnxruntime as ort

        arrays = {name: np.zeros((1, self.kv_heads, capacity, self.head_dim), dtype=self.cache_dtype)
                  for name in self.cache_names}
        if old is not None:
            for name, array in arrays.items():
                array[:, :, :old.length] = old.arrays[name][:, :, :old.length]
        values = {name: ort.OrtValue.ortvalue_from_numpy(a) for name, a in arrays.items()}
        return InPlaceCache(arrays, values, old.length if old is not None else 0)

    def forward(self, embeds: np.ndarray, position_ids: np.ndarray, cache: OrtCache | InPlaceCache | KernelCache):
        if self.in_place and len(embeds) > PREFILL_CHUNK:  # the CPU graph's scores grow as chunk x context
            for start in range(0, len(embeds) - PREFILL_CHUNK, PREFILL_CHUNK):
                _, cache = self.forward(embeds[start:start + PREFILL_CHUNK],
                                        position_ids[start:start + PREFILL_CHUNK], cache)
            rest = (len(embeds) - 1) // PREFILL_CHUNK * PREFILL_CHUNK
            return self.forward(embeds[rest:], position_ids[rest:], cache)
        if self.in_place:
            return self._forward_in_place(embeds, position_ids, cache)
        session = self.sessions["decoder"]
        binding = self._binding(session, embeds, position_ids, cache.values)
        session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        presents = {name.replace("present_", "past_"): value
                    for name, value in zip(self.output_names[1:], outputs[1:])}
        return outputs[0].numpy()[0], OrtCache(presents)

    def _binding(self, session, embeds: np.ndarray, position_ids: np.ndarray, caches: dict[str, object], *extra):
        """A step's IO binding: its inputs (``extra``: more (name, array) pairs), the caches' OrtValues
        (read in place, no copy), and every output to a fresh CPU tensor."""
        binding = session.io_binding()
        binding.bind_cpu_input("inputs_embeds", np.asarray(embeds, dtype=self.dtype).reshape(1, -1, embeds.shape[-1]))
        binding.bind_cpu_input("position_ids", np.asarray(position_ids, dtype=np.int64).reshape(1, -1))
        for name, value in extra:
            binding.bind_cpu_input(name, value)
        for name, value in caches.items():
            binding.bind_ortvalue_input(name, value)
        for name in self.output_names:
            binding.bind_output(name, "cpu")
        return binding

    def _forward_in_place(self, embeds: np.ndarray, position_ids: np.ndarray,
                          cache: InPlaceCache | KernelCache) -> tuple[np.ndarray, InPlaceCache | KernelCache]:
        n = len(embeds)
        need = cache.length + n
        if need > self.context_length:
            raise ContextOverflowError(f"{cache.length} cached + {n} new tokens exceed the context of "
                                       f"{self.context_length} tokens")
        if self.segmented:
            logits, cache.decode_io = self.segmented.step(np.asarray(embeds, dtype=self.dtype), position_ids,
                                                          cache.layers, cache.length, cache.decode_io)
            cache.length = need
            return logits, cache
        if need > cache.capacity:
            capacity = -(-need // CAPACITY_STEP) * CAPACITY_STEP
            cache = self._buffers(min(capacity, self.context_length), cache)
        session = self.sessions["decoder"]
        if n == 1:
            io = cache.decode_io = cache.decode_io or self._decode_io(cache)
            io.inputs["inputs_embeds"][...] = embeds.reshape(io.inputs["inputs_embeds"].shape)
            io.inputs["position_ids"][...] = position_ids
            io.inputs["past_lengths"][0] = cache.length
            session.run_with_iobinding(io.binding)
            logits, news = io.outputs["logits"][0].copy(), io.outputs
        else:
            binding = self._binding(session, embeds, position_ids, cache.values,
                                    ("past_lengths", np.array([cache.length], dtype=np.int32)))
            session.run_with_iobinding(binding)
            values = [v.numpy() for v in binding.get_outputs()]
            logits, news = values[0][0], dict(zip(self.output_names, values))
        for name in self.output_names[1:]:  # this step's keys and values, into the buffers
            cache.arrays[name.replace("new_", "past_")][:, :, cache.length:need] = news[name]
        cache.length = need
        return logits, cache

    def _decode_io(self, cache: InPlaceCache) -> DecodeIO:
        session = self.sessions["decoder"]
        hidden = next(i for i in session.get_inputs() if i.name == "inputs_embeds").shape[-1]
        inputs = {"inputs_embeds": np.zeros((1, 1, hidden), self.dtype), "position_ids": np.zeros((1, 1), np.int64),
                  "past_lengths": np.zeros(1, np.int32)}
        outputs = {name: np.zeros((1, self.kv_heads, 1, self.head_dim), self.dtype) for name in self.output_names[1:]}
        vocab = next(o for o in session.get_outputs() if o.name == "logits").shape[-1]
        outputs["logits"] = np.zeros((1, vocab), np.float32)
        binding, values = bind_arrays(session, inputs, outputs)
        for name, value in cache.values.items():
            binding.bind_ortvalue_input(name, value)
        return DecodeIO(binding, inputs, outputs, values)

    def encode_audio(self, features: np.ndarray) -> np.ndarray:
        if "audio" not in self.sessions:
            raise ValueError("this engine package has no audio encoder")
        session = self.sessions["audio"]
        return session.run(None, {"input_features": np.asarray(features, dtype=np.float32)})[0].astype(np.float32)

    def encode_image(self, pixels: np.ndarray) -> np.ndarray:
        if "vision" not in self.sessions:
            raise ValueError("this engine package has no vision encoder")
        session = self.sessions["vision"]
        dtype = np.float16 if "float16" in session.get_inputs()[0].type else np.float32
        return session.run(None, {"pixel_values": np.asarray(pixels, dtype=dtype)[None]})[0].astype(np.float32)
