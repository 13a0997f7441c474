"""``edge-sdk compile``: the package's ONNX graphs -> TensorRT plans, on the device.

Build-side code: the runtime (runtime/tensorrt.py) only loads and runs the plans this writes.
Written against the TensorRT 10.x Python API (10.3 on JetPack 6, 10.13+ on JetPack 7); TensorRT is
imported only after `runtime.gpu_probe` has seen a driver, and without one every entry point
raises `BackendUnavailable` with the probe's reason.

Dynamic dimensions are keyed by the ONNX dim_param names the exporter writes: `batch`, `seq` and
`past_seq` for the decoder (see docs/ARCHITECTURE.md); `decoder_dims()` builds the usual ranges,
other graphs (embed, vision) pass their own.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from edge_sdk.runtime.gpu_probe import import_tensorrt, load_plugin_library, probe_gpu, trt_logger, version_tuple
from edge_sdk.runtime.types import BackendUnavailable

if TYPE_CHECKING:
    from edge_sdk.devices import DeviceProfile

log = logging.getLogger(__name__)

DimRange = tuple[int, int, int]  # (min, opt, max)
#: Graphs compiled by default, the plugin graph first (the backend prefers its engine).
ENGINE_ROLES = ("decoder_plugins", "decoder", "vision", "audio")
AUDIO_MAX_CHUNKS = 4  # 30 s chunks per audio engine call: two minutes


class BuildError(RuntimeError):
    """TensorRT could not parse or build a graph; the message carries the parser/builder errors."""


def decoder_dims(max_context: int, max_prefill: int = 512, opt_seq: int = 1,
                 opt_past: int | None = None) -> dict[str, DimRange]:
    """Optimization-profile ranges for decoder.onnx: batch 1, seq 1..max_prefill, past 0..max_context.

    `opt_seq` = 1 tunes kernels for decode steps, which dominate generation time; prompts longer than
    `max_prefill` are fed in chunks by `TensorRTDecoder.forward`. The plugin graph's caches have a
    fixed capacity (`cache_seq` = max_context) instead of a growing `past_seq`.
    """
    max_prefill = min(max_prefill, max_context)
    opt_past = max_context // 2 if opt_past is None else opt_past
    return {"batch": (1, 1, 1), "seq": (1, min(opt_seq, max_prefill), max_prefill),
            "past_seq": (0, min(opt_past, max_context), max_context),
            "cache_seq": (max_context, max_context, max_context)}


def decoder_profiles(max_context: int, max_prefill: int = 512) -> list[dict[str, DimRange]]:
    """Two optimization profiles: 0 for decode steps (seq 1, the hot path, tuned alone) and 1 for
    prefill (seq up to max_prefill, tuned at 128 tokens). `TensorRTDecoder` picks one per call."""
    max_prefill = min(max_prefill, max_context)
    decode = dict(decoder_dims(max_context, max_prefill), seq=(1, 1, 1))
    prefill = decoder_dims(max_context, max_prefill, opt_seq=min(128, max_prefill))
    return [decode, prefill]


def profile_shapes(onnx_path: str | Path, dims: dict[str, DimRange]) -> dict[str, tuple[tuple, tuple, tuple]]:
    """min/opt/max shapes for every input of `onnx_path` with a dynamic dimension.

    Reads the graph without its weights; a dynamic dimension whose name is not in `dims` is an error.
    """
    from edge_sdk.package import graph_io  # noqa: PLC0415

    inputs, _ = graph_io(onnx_path)
    shapes = {}
    for spec in inputs:
        if all(isinstance(d, int) for d in spec.shape):
            continue
        lo, opt, hi = [], [], []
        for axis, d in enumerate(spec.shape):
            if isinstance(d, int):
                r = (d, d, d)
            elif d in dims:
                r = dims[d]
            else:
                raise BuildError(f"{onnx_path}: input {spec.name!r} axis {axis} is dynamic ({d!r}) but no range "
                                 f"was given for it (ranges given: {', '.join(dims) or 'none'})")
            lo.append(r[0])
            opt.append(r[1])
            hi.append(r[2])
        shapes[spec.name] = (tuple(lo), tuple(opt), tuple(hi))
    return shapes


def _progress_monitor(trt, cancel: threading.Event | None):
    """A trt.IProgressMonitor that logs top-level phases (TensorRT >= 10.0), or None."""
    if not hasattr(trt, "IProgressMonitor"):
        return None

    class _Monitor(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self._lock = threading.Lock()
            self._start: dict[str, float] = {}
            self._steps: dict[str, int] = {}

        def phase_start(self, phase_name, parent_phase, num_steps):
            with self._lock:
                self._start[phase_name] = time.monotonic()
                self._steps[phase_name] = num_steps
            if parent_phase is None:
                log.info("TensorRT: %s (%d steps)", phase_name, num_steps)

        def step_complete(self, phase_name, step):
            if log.isEnabledFor(logging.DEBUG):
                log.debug("TensorRT: %s %d/%d", phase_name, step + 1, self._steps.get(phase_name, 0))
            return not (cancel is not None and cancel.is_set())  # False cancels the build

        def phase_finish(self, phase_name):
            with self._lock:
                t0 = self._start.pop(phase_name, None)
            if t0 is not None:
                log.debug("TensorRT: %s done in %.1f s", phase_name, time.monotonic() - t0)

    return _Monitor()


def build_engine(onnx_path: str | Path, plan_path: str | Path, profile: DeviceProfile | str | None = None, *,
                 dims: dict[str, DimRange] | list[dict[str, DimRange]] | None = None,
                 max_context: int | None = None, max_prefill: int = 512,
                 fp16: bool = True, bf16: bool = False, int4: bool = False, fp8: bool = False,
                 strongly_typed: bool = False, workspace_gb: float | None = None,
                 timing_cache: str | Path | None = None, cancel: threading.Event | None = None,
                 plugin_library: str | Path | None = None, verbose: bool = False) -> Path:
    """Compile `onnx_path` into a TensorRT plan at `plan_path`; returns the plan path.

    - `dims`: dim_param -> (min, opt, max) for the graph's dynamic dims, or a list of such (one
      optimization profile each); default `decoder_profiles()` with `max_context` (else the device
      profile's max_context) and `max_prefill`.
    - `fp16`/`bf16`/`fp8`/`int4` set the matching BuilderFlag (weakly typed networks); FP8 and INT4
      only take effect where the graph carries Q/DQ nodes. With `strongly_typed` the graph's own types
      decide and no precision flag is set.
    - `timing_cache`: file read before and written after the build (speeds up rebuilds).
    - `cancel`: set it from another thread to stop the build (via the progress monitor).
    - `plugin_library`: the edge_sdk plugin library, loaded before parsing so the graph's `trt`
      nodes (Int4GroupwiseGemm, EdgeAttention) map to its creators.
    """
    from edge_sdk.devices import DeviceError, load_profile  # noqa: PLC0415

    onnx_path, plan_path = Path(onnx_path), Path(plan_path)
    dev = load_profile(profile) if isinstance(profile, (str, Path)) else profile
    if dev is not None:
        if dev.backend != "tensorrt":
            raise DeviceError(f"{dev.name} runs {dev.backend}, not TensorRT: no engine to build")
        for flag, precision in ((fp8, "fp8"), (int4, "int4"), (bf16, "bf16")):
            if flag and not dev.supports(precision):
                raise DeviceError(f"{dev.target} has no {precision.upper()} support in TensorRT; "
                                  f"supported: {', '.join(dev.precisions)}")
    if not onnx_path.is_file():
        raise BuildError(f"{onnx_path}: ONNX graph not found")
    if dims is None:
        ctx = max_context or (dev.max_context if dev is not None else None)
        if ctx is None:
            raise BuildError("build_engine needs dims=, max_context= or a device profile")
        dims = decoder_profiles(ctx, max_prefill)
    profiles = [profile_shapes(onnx_path, d) for d in (dims if isinstance(dims, list) else [dims])]

    trt = import_tensorrt()
    _check_trt_version(trt, dev)
    logger = trt_logger(trt, verbose)
    if plugin_library is not None:
        load_plugin_library(trt, plugin_library)
    builder = trt.Builder(logger)
    flags = (1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)) if strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # from a file, so external .data resolves
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BuildError(f"{onnx_path}: TensorRT ONNX parser failed: {errors or 'no details'}")

    config = builder.create_builder_config()
    if workspace_gb is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if not strongly_typed:
        for wanted, name in ((fp16, "FP16"), (bf16, "BF16"), (fp8, "FP8"), (int4, "INT4")):
            if not wanted:
                continue
            flag = getattr(trt.BuilderFlag, name, None)
            if flag is None:
                raise BuildError(f"TensorRT {trt.__version__} has no BuilderFlag.{name}")
            config.set_flag(flag)

    for shapes in profiles:
        opt_profile = builder.create_optimization_profile()
        for i in range(network.num_inputs):
            tensor = network.get_input(i)
            if tensor.name in shapes:
                lo, opt, hi = shapes[tensor.name]
                opt_profile.set_shape(tensor.name, lo, opt, hi)
            elif any(d < 0 for d in tensor.shape):
                raise BuildError(f"{onnx_path}: input {tensor.name!r} has dynamic shape {tuple(tensor.shape)} "
                                 "that the ONNX graph does not name")
        config.add_optimization_profile(opt_profile)

    cache_path = Path(timing_cache) if timing_cache else None
    blob = cache_path.read_bytes() if cache_path and cache_path.is_file() else b""
    cache = config.create_timing_cache(blob)
    config.set_timing_cache(cache, ignore_mismatch=False)

    monitor = _progress_monitor(trt, cancel)
    if monitor is not None:
        config.progress_monitor = monitor  # keep `monitor` referenced until the build returns

    t0 = time.monotonic()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        why = "cancelled" if cancel is not None and cancel.is_set() else "see the TensorRT log above"
        raise BuildError(f"{onnx_path}: TensorRT engine build failed ({why})")
    log.info("built %s in %.0f s (%.1f MB)", plan_path.name, time.monotonic() - t0, serialized.nbytes / 1e6)

    plan_path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(plan_path, serialized)
    if cache_path is not None:
        _atomic_write(cache_path, config.get_timing_cache().serialize())
    return plan_path


def _atomic_write(path: Path, data) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)  # IHostMemory supports the buffer protocol
    os.replace(tmp, path)


def _check_trt_version(trt, dev: DeviceProfile | None) -> None:
    if dev is not None and dev.tensorrt_version and \
            version_tuple(trt.__version__) < version_tuple(dev.tensorrt_version):
        log.warning("TensorRT %s is older than %s expected for %s (JetPack %s)", trt.__version__,
                    dev.tensorrt_version, dev.name, dev.jetpack)


def engine_key(pkg_dir: Path, graph_file: str, status, dims, plugin_hash: str | None) -> str:
    """What a plan depends on: TensorRT's version, the GPU, the graph and its weights, the
    optimization profiles and (for the plugin graph) the plugin sources. Same key: same plan."""
    from edge_sdk.package import sha256_file  # noqa: PLC0415

    import onnx  # noqa: PLC0415

    parts = [status.tensorrt_version, status.device_name, str(status.sm), json.dumps(dims, sort_keys=True),
             plugin_hash or ""]
    graph = pkg_dir / graph_file
    # the weights files the graph reads (the plugin graph reads decoder.onnx.data)
    model = onnx.load(str(graph), load_external_data=False)
    data = sorted({e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"})
    for path in [graph] + [graph.parent / name for name in data]:
        parts.append(sha256_file(path))
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def compile_package(pkg_dir: str | Path, profile: DeviceProfile | str | None = None, *, strict: bool = False,
                    max_prefill: int = 512, workspace_gb: float | None = None,
                    timing_cache: str | Path | None = None, roles: tuple[str, ...] = ENGINE_ROLES,
                    plugins: bool = True) -> dict[str, str]:
    """``edge-sdk compile``: compile a built package's graphs and record the plans in its manifest
    (see ``compile_engines``); returns role -> plan path."""
    from edge_sdk.package import load_manifest, write_manifest  # noqa: PLC0415

    pkg_dir = Path(pkg_dir)
    manifest = load_manifest(pkg_dir, verify=False)
    compiled = compile_engines(pkg_dir, manifest, profile, strict=strict, max_prefill=max_prefill,
                               workspace_gb=workspace_gb, timing_cache=timing_cache, roles=roles, plugins=plugins)
    if compiled is not None:
        manifest = write_manifest(pkg_dir, manifest.model_copy(update=compiled))
    return dict(manifest.engines) if compiled is not None else {}


def compile_engines(pkg_dir: Path, manifest, profile: DeviceProfile | str | None = None, *, strict: bool = False,
                    max_prefill: int = 512, workspace_gb: float | None = None,
                    timing_cache: str | Path | None = None, roles: tuple[str, ...] = ENGINE_ROLES,
                    plugins: bool = True) -> dict | None:
    """Compile ``manifest``'s ONNX graphs into ``trt/<role>.plan``; returns the manifest fields
    to update (``engines``, ``extra``), or None when nothing was built.

    - Without a usable GPU: ``strict`` raises BackendUnavailable, otherwise logs why and returns
      None (the package still runs on ONNX Runtime).
    - The plugin graph (decoder_plugins) is built when the package has it and ``plugins``: the
      plugin library is built from the shipped sources with this device's nvcc and TensorRT
      headers (or reused when its cache key matches); if that fails, the standard graph serves.
    - A plan whose key (`engine_key`) matches the manifest's is not rebuilt.
    - Every decoder plan must pass the golden check (golden.py) before it is recorded; one that
      diverges is deleted and not activated, and if no decoder plan passes, BuildError.
    - The embed graph is not compiled: the TensorRT backend gathers embeddings on the host from
      embed.onnx's memory-mapped table. Graphs are built strongly typed: the exported graphs carry
      their compute dtype, fp32 islands and Q/DQ types (TensorRT 11 has no precision flags).
    """
    from edge_sdk.devices import load_profile  # noqa: PLC0415

    profile = manifest.device if profile is None else profile
    dev = load_profile(profile) if isinstance(profile, (str, Path)) else profile
    status = probe_gpu()
    if not status.available:
        if strict:
            raise BackendUnavailable(f"cannot compile TensorRT engines: {status.reason}")
        log.warning("TensorRT engines not built (%s); the package runs on ONNX Runtime until "
                    "`edge-sdk compile` is run on the %s", status.reason, dev.name)
        return None
    if dev.sm is not None and status.sm is not None and dev.sm != status.sm:
        msg = f"this GPU ({status.device_name}) is sm_{status.sm} but the package targets {dev.target}"
        if strict:
            raise BackendUnavailable(msg)
        log.warning("TensorRT engines not built: %s", msg)
        return None
    roles = tuple(r for r in roles if r in manifest.graphs)
    plugin_lib = None
    if "decoder_plugins" in roles and plugins:
        plugin_lib = _plugin_library(pkg_dir, status, strict)
    if plugin_lib is None:
        roles = tuple(r for r in roles if r != "decoder_plugins")
    unit = 28
    if "vision" in manifest.graphs and manifest.model.vision is not None:
        v = manifest.model.vision
        unit = v.patch_size * v.spatial_merge_size
    side = -(-dev.max_image_size // unit) * unit
    ctx = manifest.context_length
    decoder = decoder_profiles(ctx, max_prefill)
    dims = {"decoder": decoder, "decoder_plugins": decoder,
            "vision": {"height": (unit, side, side), "width": (unit, side, side)},
            "audio": {"chunks": (1, 1, AUDIO_MAX_CHUNKS)}}
    engines = dict(manifest.engines)
    keys = dict(manifest.extra.get("engine_keys", {}))
    checks = {}
    from edge_sdk.plugins.library import source_hash  # noqa: PLC0415

    for role in roles:
        plan = f"trt/{role}.plan"
        key = engine_key(pkg_dir, manifest.graphs[role].file, status, dims[role],
                         source_hash() if role == "decoder_plugins" else None)
        if keys.get(role) == key and (pkg_dir / plan).is_file():
            log.info("%s: up to date (key %s), not rebuilt", plan, key)
            engines[role] = plan
            continue
        build_engine(pkg_dir / manifest.graphs[role].file, pkg_dir / plan, dev, dims=dims[role],
                     strongly_typed=True, workspace_gb=workspace_gb, timing_cache=timing_cache,
                     plugin_library=plugin_lib if role == "decoder_plugins" else None)
        if role.startswith("decoder") and "golden" in manifest.extra:
            report = _golden_check(pkg_dir, manifest, plan, plugin_lib)
            checks[role] = report.summary()
            if not report.ok:
                log.error("%s: %s; the engine is not activated", plan, report.summary())
                (pkg_dir / plan).unlink(missing_ok=True)
                engines.pop(role, None)
                keys.pop(role, None)
                continue
            log.info("%s: %s", plan, report.summary())
        engines[role] = plan
        keys[role] = key
    if not {"decoder", "decoder_plugins"} & set(engines):
        raise BuildError(f"{pkg_dir}: no TensorRT decoder engine passed the golden check ({'; '.join(checks.values())})")
    extra = dict(manifest.extra, tensorrt_version=status.tensorrt_version, sm=status.sm, gpu=status.device_name,
                 engine_keys=keys, golden_checks=checks,
                 plugin_library=str(plugin_lib.relative_to(pkg_dir)) if plugin_lib is not None else None)
    return {"engines": engines, "extra": extra}


def _plugin_library(pkg_dir: Path, status, strict: bool) -> Path | None:
    """The plugin library for this GPU, built under the package (or found there by its key)."""
    from edge_sdk.plugins.library import PluginBuildError, build_library  # noqa: PLC0415

    try:
        return build_library(pkg_dir / "trt" / "plugins", (status.sm,))
    except PluginBuildError as exc:
        if strict:
            raise BackendUnavailable(f"cannot build the TensorRT plugins: {exc}") from None
        log.warning("TensorRT plugins unavailable (%s); compiling the standard graph only", exc)
        return None


def _golden_check(pkg_dir: Path, manifest, plan: str, plugin_lib: Path | None):
    """Run the freshly built plan on the golden prompts (golden.py)."""
    from edge_sdk.golden import check_golden  # noqa: PLC0415
    from edge_sdk.runtime.embedding import EmbeddingTable  # noqa: PLC0415
    from edge_sdk.runtime.tensorrt import TensorRTDecoder  # noqa: PLC0415

    decoder = TensorRTDecoder.from_plans(pkg_dir / plan, embed_table=EmbeddingTable.open(
        pkg_dir / manifest.graphs["embed"].file), max_context=manifest.context_length, plugin_library=plugin_lib)
    try:
        return check_golden(decoder, manifest.extra["golden"])
    finally:
        decoder.close()
