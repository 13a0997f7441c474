"""TensorRT backend: run the decoder (and the vision encoder) from compiled plans, KV cache on the GPU.
Building the plans is edge_sdk/compile.py.

Written against the TensorRT 10.x Python API (10.3 on JetPack 6, 10.13+ on JetPack 7) and pycuda.
Importing this module imports neither: both are imported inside functions, after
`gpu_probe.probe_gpu()` has confirmed a driver (tensorrt-lean segfaults and pycuda fails to import
without one). Without a usable GPU every entry point raises `BackendUnavailable` with the probe's reason.

Two kinds of decoder plan, one interface:
- the plugin engine (decoder.plugins.onnx, preferred): one [1, 2, kv, capacity, head_dim] buffer
  per layer, bound as both `kv_cache.{i}` and `present_kv.{i}` (EdgeAttention writes the new
  tokens in place at `past_lengths`); the plugin library is loaded before the plan;
- the standard engine (decoder.onnx): two sets of max-context buffers per layer (K and V) used
  ping-pong: step n reads `past_*` from set A with shape [1, kv, past, head_dim] and TensorRT
  writes `present_*` ([1, kv, past + seq, head_dim]) into set B; step n+1 reads set B. That costs
  2x the KV memory (TensorRT I/O is linear: a past cannot be a view into a larger buffer).
Either way nothing leaves the GPU between steps. Plans carry two optimization profiles (decode,
prefill); each call selects the one for its length.

"""

from __future__ import annotations

import logging
import threading
import weakref
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edge_sdk.runtime.embedding import EmbeddingTable
from edge_sdk.runtime.gpu_probe import (GpuStatus, import_pycuda, import_tensorrt, load_plugin_library, require_gpu,
                                        trt_logger, version_tuple)
from edge_sdk.plugins import ops
from edge_sdk.runtime.types import BackendUnavailable, ContextOverflowError, GenerationError

if TYPE_CHECKING:
    from edge_sdk.package import Manifest

log = logging.getLogger(__name__)

class _Engine:
    """A deserialized plan, one execution context, and its I/O tensor facts."""

    def __init__(self, trt, plan_path: Path):
        if not plan_path.is_file():
            raise BackendUnavailable(f"{plan_path}: TensorRT plan not found")
        self.trt = trt
        self.path = plan_path
        self.runtime = trt.Runtime(trt_logger(trt))
        self.engine = self.runtime.deserialize_cuda_engine(plan_path.read_bytes())
        if self.engine is None:
            raise BackendUnavailable(f"{plan_path}: TensorRT cannot load this plan (built with another TensorRT "
                                     f"version than {trt.__version__}, or for another GPU); rebuild it here")
        self.context = self.engine.create_execution_context()
        self.profile = 0  # the context starts on profile 0
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]

    def dtype(self, name: str) -> np.dtype:
        return np.dtype(self.trt.nptype(self.engine.get_tensor_dtype(name)))

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.engine.get_tensor_shape(name))

    def max_shape(self, name: str) -> tuple[int, ...]:
        """The largest shape any optimization profile takes."""
        shapes = [tuple(self.engine.get_tensor_profile_shape(name, i)[2])
                  for i in range(self.engine.num_optimization_profiles)]
        return max(shapes, key=lambda s: int(np.prod(s)))

    def select_profile(self, seq: int, stream) -> None:
        """Profile 0 (decode) for one token, the last (prefill) for more: see compile.decoder_profiles."""
        wanted = 0 if seq == 1 else self.engine.num_optimization_profiles - 1
        if wanted != self.profile:
            self.context.set_optimization_profile_async(wanted, stream.handle)
            self.profile = wanted

    def set_shape(self, name: str, shape: tuple[int, ...]) -> None:
        if not self.context.set_input_shape(name, shape):
            raise GenerationError(f"{self.path.name}: shape {shape} for {name!r} is outside the engine's "
                                  f"profile (max {self.max_shape(name)})")

    def execute(self, stream) -> None:
        if not self.context.execute_async_v3(stream_handle=stream.handle):
            raise GenerationError(f"{self.path.name}: TensorRT execution failed (see the TensorRT log)")


class _Scratch:
    """Growable device + pinned host buffers by name, for graphs run outside the decoder hot path."""

    def __init__(self, cuda):
        self.cuda = cuda
        self.dev: dict[str, tuple[Any, int]] = {}  # name -> (DeviceAllocation, capacity in bytes)
        self.host: dict[str, np.ndarray] = {}

    def device(self, name: str, nbytes: int):
        buf, cap = self.dev.get(name, (None, 0))
        if buf is None or cap < nbytes:
            cap = max(nbytes, 256)
            buf = self.cuda.mem_alloc(cap)
            self.dev[name] = (buf, cap)
        return buf

    def pinned(self, name: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        n = int(np.prod(shape)) * np.dtype(dtype).itemsize
        buf = self.host.get(name)
        if buf is None or buf.nbytes < n:
            self.host[name] = buf = self.cuda.pagelocked_empty(max(n, 256), np.uint8)
        return buf[:n].view(dtype).reshape(shape)


def _run_graph(eng: _Engine, scratch: _Scratch, stream, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run a small engine (embed, vision) end to end: host inputs in, host outputs out."""
    cuda = scratch.cuda
    for name in eng.inputs:
        arr = np.asarray(feeds[name])
        host = scratch.pinned(name, arr.shape, eng.dtype(name))
        host[...] = arr
        dev = scratch.device(name, host.nbytes)
        eng.set_shape(name, arr.shape)
        cuda.memcpy_htod_async(dev, host, stream)
        eng.context.set_tensor_address(name, int(dev))
    results = {}
    for name in eng.outputs:
        shape = tuple(eng.context.get_tensor_shape(name))
        if any(d < 0 for d in shape):
            raise GenerationError(f"{eng.path.name}: output {name!r} has a data-dependent shape {shape}")
        host = scratch.pinned("out:" + name, shape, eng.dtype(name))
        dev = scratch.device("out:" + name, host.nbytes)
        eng.context.set_tensor_address(name, int(dev))
        results[name] = (host, dev)
    eng.execute(stream)
    for host, dev in results.values():
        cuda.memcpy_dtoh_async(host, dev, stream)
    stream.synchronize()
    return {name: np.array(host, dtype=np.float32 if host.dtype.kind == "f" else host.dtype)
            for name, (host, _) in results.items()}


class TensorRTCache:
    """Decoder KV cache on the GPU. `length` = tokens cached. Release early with `close()`."""

    def __init__(self, bufs: list, release):
        self._bufs = bufs      # standard: [set0, set1] of [(k, v) per layer]; plugin: [[(kv,) per layer]]
        self._cur = 0          # which set holds the current past
        self.length = 0
        self._finalizer = weakref.finalize(self, release, bufs)
        self._finalizer.atexit = False

    def close(self) -> None:
        self._finalizer()


class _KVPool:
    """Reuses the device buffers of finished caches (keeps at most `keep` spare sets)."""

    def __init__(self, alloc, keep: int = 1):
        self._alloc = alloc
        self._free: list = []
        self._keep = keep
        self._lock = threading.Lock()

    def acquire(self):
        with self._lock:
            if self._free:
                return self._free.pop()
        return self._alloc()

    def release(self, bufs) -> None:
        with self._lock:
            if len(self._free) < self._keep:
                self._free.append(bufs)
                return
        _free_all(bufs)

    def clear(self) -> None:
        with self._lock:
            free, self._free = self._free, []
        for bufs in free:
            _free_all(bufs)


def _free_all(bufs) -> None:
    for buf_set in bufs:
        for layer in buf_set:
            for alloc in layer:
                alloc.free()


class TensorRTDecoder:
    """The runtime backend on TensorRT (`runtime.backend.DecoderBackend`):
    `embed(ids)`, `forward(embeds, position_ids, cache) -> (logits[V] float32, cache)`, `new_cache()`,
    `encode_image(pixels)` when the package has a vision engine.

    `TensorRTDecoder(package_dir, manifest)` opens the plans listed in `manifest.engines`
    (decoder required; vision optional; embed optional: without it the embedding table is
    memory-mapped from embed.onnx's external data and gathered on the host, which keeps a second
    copy of a 131k x hidden table off the GPU). `from_plans` opens plan files directly.
    Calls are serialized by a lock (one execution context); any thread may call (the primary CUDA
    context is pushed per call).
    """

    name = "tensorrt"

    def __init__(self, package_dir: str | Path, manifest: Manifest | None = None, *,
                 max_context: int | None = None, engine: str | None = None, **options):
        from edge_sdk.package import load_manifest  # noqa: PLC0415

        status = require_gpu()  # raises BackendUnavailable with the probe's reason
        pkg = Path(package_dir)
        manifest = manifest or load_manifest(pkg, verify=False)
        if options:
            log.debug("tensorrt backend ignores options %s", sorted(options))
        eng = manifest.engines
        role = engine or ("decoder_plugins" if "decoder_plugins" in eng else "decoder")
        if role not in eng:
            raise BackendUnavailable(f"{pkg}: no TensorRT {role} engine in the package (built for "
                                     f"{manifest.device}); use the onnxruntime backend or run `edge-sdk compile`")
        plugin_library = manifest.extra.get("plugin_library") if role == "decoder_plugins" else None
        _check_package_target(pkg, manifest, status)
        table = None
        if "embed" not in eng:
            if "embed" not in manifest.graphs:
                raise BackendUnavailable(f"{pkg}: package has neither an embed engine nor embed.onnx")
            table = EmbeddingTable.open(pkg / manifest.graphs["embed"].file)
        ctx = min(max_context or manifest.context_length, manifest.context_length)
        self._open(pkg / eng[role], pkg / eng["embed"] if "embed" in eng else None,
                   pkg / eng["vision"] if "vision" in eng else None, table, ctx,
                   pkg / plugin_library if plugin_library else None,
                   pkg / eng["audio"] if "audio" in eng else None)

    @classmethod
    def from_plans(cls, decoder_plan: str | Path, *, embed_plan: str | Path | None = None,
                   vision_plan: str | Path | None = None, embed_table: EmbeddingTable | None = None,
                   max_context: int | None = None, plugin_library: str | Path | None = None) -> TensorRTDecoder:
        self = cls.__new__(cls)
        self._open(Path(decoder_plan), Path(embed_plan) if embed_plan else None,
                   Path(vision_plan) if vision_plan else None, embed_table, max_context,
                   Path(plugin_library) if plugin_library else None)
        return self

    def _open(self, decoder_plan: Path, embed_plan: Path | None, vision_plan: Path | None,
              embed_table: EmbeddingTable | None, max_context: int | None, plugin_library: Path | None,
              audio_plan: Path | None = None) -> None:
        self.status = require_gpu()
        trt = import_tensorrt()
        if plugin_library is not None:
            load_plugin_library(trt, plugin_library)
        self._cuda, self._cu_ctx = import_pycuda()
        self._lock = threading.RLock()
        with self._active():
            self._stream = self._cuda.Stream()
            self._dec = _Engine(trt, decoder_plan)
            self._embed = _Engine(trt, embed_plan) if embed_plan else None
            self._vision = _Engine(trt, vision_plan) if vision_plan else None
            self._audio = _Engine(trt, audio_plan) if audio_plan else None
            self._scratch = _Scratch(self._cuda)
            self._embed_table = embed_table
            self._describe_decoder(max_context)
            self._alloc_io()
        self._pool = _KVPool(self._alloc_kv)
        log.info("tensorrt backend: %s, %s engine, %d layers, context %d (KV %.2f GB per cache), prefill chunk %d",
                 self.status.device_name, "plugin" if self.plugin else "standard", self.num_layers, self.max_context,
                 self.kv_cache_bytes() / 1e9, self.max_seq)

    # -- setup --

    @contextmanager
    def _active(self):
        self._cu_ctx.push()
        try:
            yield
        finally:
            self._cuda.Context.pop()

    def _describe_decoder(self, max_context: int | None) -> None:
        dec = self._dec
        self.plugin = ops.PAST_LENGTHS in dec.inputs
        first = ops.cache_input(0) if self.plugin else "past_key.0"
        self.num_layers = sum(1 for n in dec.inputs if n.startswith("kv_cache." if self.plugin else "past_key."))
        if self.num_layers == 0 or "inputs_embeds" not in dec.inputs or "logits" not in dec.outputs:
            raise BackendUnavailable(f"{dec.path}: not a decoder engine (inputs {dec.inputs[:4]}...)")
        shape = dec.shape(first)
        self.kv_heads, self.head_dim = shape[-3], shape[-1]
        self.hidden_size = dec.shape("inputs_embeds")[-1]
        self.vocab_size = dec.shape("logits")[-1]
        engine_ctx = dec.max_shape(first)[-2]
        if self.plugin:  # the cache capacity is fixed at build time: a smaller cache is not an option
            self.capacity = engine_ctx
        self.max_context = min(max_context, engine_ctx) if max_context else engine_ctx
        self.max_seq = dec.max_shape("inputs_embeds")[1]
        self._kv_dtype = dec.dtype(first)
        if min(self.kv_heads, self.head_dim, self.hidden_size, self.vocab_size) <= 0:
            raise BackendUnavailable(f"{dec.path}: decoder engine has unexpected dynamic hidden/kv/vocab dims")

    def _alloc_io(self) -> None:
        cuda, dec = self._cuda, self._dec
        self._emb_dtype, self._pos_dtype = dec.dtype("inputs_embeds"), dec.dtype("position_ids")
        self._logits_dtype = dec.dtype("logits")
        # Flat pinned staging buffers: a [:n * H] prefix reshaped is always contiguous and pinned.
        self._h_emb = cuda.pagelocked_empty((self.max_seq * self.hidden_size,), self._emb_dtype)
        self._h_pos = cuda.pagelocked_empty((self.max_seq,), self._pos_dtype)
        self._h_logits = cuda.pagelocked_empty((self.vocab_size,), self._logits_dtype)
        self._d_emb = cuda.mem_alloc(self._h_emb.nbytes)
        self._d_pos = cuda.mem_alloc(self._h_pos.nbytes)
        self._d_logits = cuda.mem_alloc(self._h_logits.nbytes)
        if self.plugin:
            self._h_len = cuda.pagelocked_empty((1,), np.int32)
            self._d_len = cuda.mem_alloc(self._h_len.nbytes)

    def _alloc_kv(self):
        with self._active():
            if self.plugin:  # one in-place K+V buffer per layer
                nbytes = 2 * self.kv_heads * self.capacity * self.head_dim * self._kv_dtype.itemsize
                return [[(self._cuda.mem_alloc(nbytes),) for _ in range(self.num_layers)]]
            nbytes = self.kv_heads * self.max_context * self.head_dim * self._kv_dtype.itemsize
            return [[(self._cuda.mem_alloc(nbytes), self._cuda.mem_alloc(nbytes)) for _ in range(self.num_layers)]
                    for _ in range(2)]

    def kv_cache_bytes(self) -> int:
        """Device memory one cache holds (plugin: one K+V buffer per layer; standard: both ping-pong sets)."""
        per_token = 2 * self.num_layers * self.kv_heads * self.head_dim * self._kv_dtype.itemsize
        return per_token * self.capacity if self.plugin else 2 * per_token * self.max_context

    # -- backend interface --

    def new_cache(self) -> TensorRTCache:
        return TensorRTCache(self._pool.acquire(), self._pool.release)

    def embed(self, ids) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if self._embed is None:
            if self._embed_table is None:
                raise BackendUnavailable("no embed engine and no embedding table given to TensorRTDecoder")
            return self._embed_table.lookup(ids)
        with self._lock, self._active():
            step = self._embed.max_shape("input_ids")[-1]
            parts = [_run_graph(self._embed, self._scratch, self._stream,
                                {"input_ids": ids[None, i:i + step]})["inputs_embeds"][0]
                     for i in range(0, len(ids), step)]
        return np.concatenate(parts, axis=0) if parts else np.zeros((0, self.hidden_size), np.float32)

    def encode_image(self, pixels: np.ndarray) -> np.ndarray:
        if self._vision is None:
            raise GenerationError("this package has no vision engine")
        pixels = np.asarray(pixels)
        if pixels.ndim == 3:
            pixels = pixels[None]
        with self._lock, self._active():
            out = _run_graph(self._vision, self._scratch, self._stream, {"pixel_values": pixels})
        return out["image_features"]

    def encode_audio(self, features: np.ndarray) -> np.ndarray:
        if self._audio is None:
            raise GenerationError("this package has no audio engine")
        with self._lock, self._active():
            out = _run_graph(self._audio, self._scratch, self._stream, {"input_features": np.asarray(features)})
        return out["audio_embeds"]

    def forward(self, embeds: np.ndarray, position_ids: np.ndarray, cache: TensorRTCache):
        embeds = np.asarray(embeds)
        if embeds.ndim == 2:
            embeds = embeds[None]
        position_ids = np.asarray(position_ids).reshape(1, -1)
        t = embeds.shape[1]
        if embeds.shape[0] != 1 or embeds.shape[2] != self.hidden_size or position_ids.shape[1] != t or t == 0:
            raise GenerationError(f"forward expects embeds [1, T, {self.hidden_size}] and position_ids [1, T] "
                                  f"with T >= 1, got {embeds.shape} and {position_ids.shape}")
        if cache.length + t > self.max_context:
            raise ContextOverflowError(f"{cache.length} cached + {t} new tokens exceed the engine's context "
                                       f"of {self.max_context} tokens")
        with self._lock, self._active():
            for start in range(0, t, self.max_seq):  # prompts longer than the profile's seq max: chunks
                stop = min(start + self.max_seq, t)
                self._step(embeds[:, start:stop], position_ids[:, start:stop], cache, want_logits=stop == t)
            logits = self._h_logits.astype(np.float32)
        return logits, cache

    def _step(self, embeds: np.ndarray, position_ids: np.ndarray, cache: TensorRTCache, want_logits: bool) -> None:
        cuda, dec, stream = self._cuda, self._dec, self._stream
        n, past = embeds.shape[1], cache.length
        h_emb = self._h_emb[: n * self.hidden_size].reshape(1, n, self.hidden_size)
        h_pos = self._h_pos[:n].reshape(1, n)
        h_emb[...] = embeds  # casts to the engine's input dtype (float16 on GPU profiles)
        h_pos[...] = position_ids
        cuda.memcpy_htod_async(self._d_emb, h_emb, stream)
        cuda.memcpy_htod_async(self._d_pos, h_pos, stream)
        dec.select_profile(n, stream)
        dec.set_shape("inputs_embeds", (1, n, self.hidden_size))
        dec.set_shape("position_ids", (1, n))
        ctx = dec.context
        ctx.set_tensor_address("inputs_embeds", int(self._d_emb))
        ctx.set_tensor_address("position_ids", int(self._d_pos))
        ctx.set_tensor_address("logits", int(self._d_logits))
        if self.plugin:
            self._bind_plugin_cache(cache, past)
        else:
            self._bind_ping_pong(cache, past)
        dec.execute(stream)
        if want_logits:
            cuda.memcpy_dtoh_async(self._h_logits, self._d_logits, stream)
        stream.synchronize()
        cache.length = past + n
        if not self.plugin:
            cache._cur = 1 - cache._cur

    def _bind_plugin_cache(self, cache: TensorRTCache, past: int) -> None:
        """Each layer's one buffer is both the cache input and its (aliased) output."""
        self._h_len[0] = past
        self._cuda.memcpy_htod_async(self._d_len, self._h_len, self._stream)
        self._dec.set_shape(ops.PAST_LENGTHS, (1,))
        self._dec.context.set_tensor_address(ops.PAST_LENGTHS, int(self._d_len))
        shape = (1, 2, self.kv_heads, self.capacity, self.head_dim)
        for i, (buf,) in enumerate(cache._bufs[0]):
            self._dec.set_shape(ops.cache_input(i), shape)
            self._dec.context.set_tensor_address(ops.cache_input(i), int(buf))
            self._dec.context.set_tensor_address(ops.cache_output(i), int(buf))

    def _bind_ping_pong(self, cache: TensorRTCache, past: int) -> None:
        ctx = self._dec.context
        src, dst = cache._bufs[cache._cur], cache._bufs[1 - cache._cur]
        past_shape = (1, self.kv_heads, past, self.head_dim)
        for i in range(self.num_layers):
            for j, kind in enumerate(("key", "value")):
                self._dec.set_shape(f"past_{kind}.{i}", past_shape)
                ctx.set_tensor_address(f"past_{kind}.{i}", int(src[i][j]))
                ctx.set_tensor_address(f"present_{kind}.{i}", int(dst[i][j]))

    def close(self) -> None:
        """Free the spare KV buffers now (live caches free theirs when closed or collected)."""
        self._pool.clear()


def _check_package_target(pkg_dir: Path, manifest: Manifest, status: GpuStatus) -> None:
    """Plans only run on the GPU generation and TensorRT version they were built with: say so early."""
    from edge_sdk.devices import DeviceError, load_profile  # noqa: PLC0415

    try:
        dev = load_profile(manifest.device)
    except DeviceError:
        dev = None
    if dev is not None and dev.sm is not None and status.sm is not None and dev.sm != status.sm:
        raise BackendUnavailable(f"{pkg_dir}: engines were built for {dev.target} but this GPU "
                                 f"({status.device_name}) is sm_{status.sm}; rebuild the package for this device")
    built_with = manifest.extra.get("tensorrt_version")
    if built_with and status.tensorrt_version and \
            version_tuple(built_with)[:2] != version_tuple(status.tensorrt_version)[:2]:
        raise BackendUnavailable(f"{pkg_dir}: engines were built with TensorRT {built_with} but this host has "
                                 f"{status.tensorrt_version}; rebuild the engines here")
