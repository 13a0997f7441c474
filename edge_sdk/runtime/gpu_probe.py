"""Is there a usable NVIDIA GPU path here? Answer without crashing.

Order matters: `tensorrt` (the lean runtime segfaults in deserialize without a driver) and `pycuda`
(cannot import without a driver) are only touched after the driver itself answered:
1. NVIDIA device nodes exist (`/dev/nvidia*` on x86 and Thor, `/dev/nvhost-*` / `/dev/nvgpu` on Orin),
2. `libcuda.so.1` loads through ctypes and `cuInit(0)` returns CUDA_SUCCESS with >= 1 device,
3. the `tensorrt` module imports (its version is reported) and `pycuda` is installed.

`probe_gpu()` never raises; `GpuStatus.reason` says what is missing. The result is cached per
process (`refresh=True` probes again). Set `EDGE_SDK_DISABLE_GPU=1` to force the CPU path.
Note: a successful probe has called cuInit in this process; fork before probing if workers need CUDA.
"""

from __future__ import annotations

import ctypes
import glob
import importlib.util
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_sdk.runtime.types import BackendUnavailable

_DEVICE_NODE_PATTERNS = ("/dev/nvidia[0-9]*", "/dev/nvidiactl", "/dev/nvhost-*", "/dev/nvgpu*", "/dev/nvmap")
_LIBCUDA_NAMES = ("libcuda.so.1", "libcuda.so")
_CC_MAJOR = 75  # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR
_CC_MINOR = 76  # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR


@dataclass(frozen=True)
class GpuStatus:
    """What the probe found. `available` means: driver, device, tensorrt and pycuda are all there."""

    available: bool
    reason: str
    tensorrt_version: str | None = None
    device_name: str | None = None
    sm: int | None = None
    driver_version: str | None = None
    total_memory_gb: float | None = None


def _device_nodes() -> list[str]:
    found: list[str] = []
    for pattern in _DEVICE_NODE_PATTERNS:
        found += glob.glob(pattern)
    return sorted(found)


def _load_libcuda() -> tuple[ctypes.CDLL | None, str]:
    errors = []
    for name in _LIBCUDA_NAMES:
        try:
            return ctypes.CDLL(name), ""
        except OSError as exc:
            errors.append(str(exc))
    return None, errors[0] if errors else "not found"


def _cu_error(cuda: ctypes.CDLL, code: int) -> str:
    try:
        name = ctypes.c_char_p()
        if cuda.cuGetErrorName(ctypes.c_int(code), ctypes.byref(name)) == 0 and name.value:
            return f"{name.value.decode()} ({code})"
    except Exception:  # noqa: BLE001 - symbol missing on an odd driver: fall back to the number
        pass
    return f"CUresult {code}"


def _driver_info(cuda: ctypes.CDLL) -> tuple[dict, str]:
    """cuInit and device 0's name, SM and memory. Returns (info, error); error == "" on success."""
    rc = cuda.cuInit(ctypes.c_uint(0))
    if rc != 0:
        return {}, f"cuInit failed with {_cu_error(cuda, rc)}"
    info: dict = {}
    version = ctypes.c_int()
    if cuda.cuDriverGetVersion(ctypes.byref(version)) == 0:
        info["driver_version"] = f"{version.value // 1000}.{version.value % 1000 // 10}"
    count = ctypes.c_int()
    rc = cuda.cuDeviceGetCount(ctypes.byref(count))
    if rc != 0 or count.value < 1:
        return info, "the CUDA driver reports no GPU" + (f" ({_cu_error(cuda, rc)})" if rc else "")
    dev = ctypes.c_int()
    rc = cuda.cuDeviceGet(ctypes.byref(dev), ctypes.c_int(0))
    if rc != 0:
        return info, f"cuDeviceGet(0) failed with {_cu_error(cuda, rc)}"
    name = ctypes.create_string_buffer(256)
    if cuda.cuDeviceGetName(name, ctypes.c_int(len(name)), dev) == 0:
        info["device_name"] = name.value.decode(errors="replace")
    major, minor = ctypes.c_int(), ctypes.c_int()
    rc_major = cuda.cuDeviceGetAttribute(ctypes.byref(major), ctypes.c_int(_CC_MAJOR), dev)
    rc_minor = cuda.cuDeviceGetAttribute(ctypes.byref(minor), ctypes.c_int(_CC_MINOR), dev)
    if rc_major == 0 and rc_minor == 0:
        info["sm"] = major.value * 10 + minor.value  # Orin 8.7 -> 87, Thor 11.0 -> 110 (CUDA 13 naming)
    total = ctypes.c_size_t()
    fn = getattr(cuda, "cuDeviceTotalMem_v2", None)
    if fn is not None and fn(ctypes.byref(total), dev) == 0:
        info["total_memory_gb"] = round(total.value / 1e9, 2)
    return info, ""


def _probe() -> GpuStatus:
    if os.environ.get("EDGE_SDK_DISABLE_GPU", "").strip() not in ("", "0"):
        return GpuStatus(False, "GPU disabled by EDGE_SDK_DISABLE_GPU")
    if not _device_nodes():
        return GpuStatus(False, "no NVIDIA GPU driver: no device nodes (/dev/nvidia*, /dev/nvhost-*, /dev/nvgpu)")
    cuda, err = _load_libcuda()
    if cuda is None:
        return GpuStatus(False, f"no NVIDIA GPU driver: libcuda.so.1 cannot be loaded ({err})")
    info, err = _driver_info(cuda)
    if err:
        return GpuStatus(False, f"NVIDIA driver present but unusable: {err}", **info)
    where = f"{info.get('device_name', 'GPU')}" + (f", sm_{info['sm']}" if "sm" in info else "")
    # Driver answered: importing tensorrt is safe now.
    try:
        import tensorrt  # noqa: PLC0415

        trt_version = str(getattr(tensorrt, "__version__", "unknown"))
    except Exception as exc:  # noqa: BLE001 - ImportError, or a broken install raising anything
        hint = "on a Jetson it comes with JetPack (python3-libnvinfer)"
        return GpuStatus(False, f"GPU found ({where}) but the tensorrt Python package cannot be imported "
                                f"({type(exc).__name__}: {exc}); {hint}", **info)
    if importlib.util.find_spec("pycuda") is None:
        return GpuStatus(False, f"GPU found ({where}), TensorRT {trt_version}, but pycuda is not installed "
                                f"(pip install 'edge-sdk[gpu]')", tensorrt_version=trt_version, **info)
    return GpuStatus(True, f"{where}, driver {info.get('driver_version', '?')}, TensorRT {trt_version}",
                     tensorrt_version=trt_version, **info)


_lock = threading.Lock()
_cached: GpuStatus | None = None


def probe_gpu(refresh: bool = False) -> GpuStatus:
    """Probe once per process (thread-safe); never raises."""
    global _cached
    with _lock:
        if _cached is None or refresh:
            try:
                _cached = _probe()
            except Exception as exc:  # noqa: BLE001 - the probe must never take the caller down
                _cached = GpuStatus(False, f"GPU probe failed: {type(exc).__name__}: {exc}")
        return _cached


# -- importing TensorRT and pycuda, only once the probe has seen a driver ---------------------------

def require_gpu() -> GpuStatus:
    status = probe_gpu()
    if not status.available:
        raise BackendUnavailable(f"TensorRT backend unavailable: {status.reason}")
    return status


def import_tensorrt():
    require_gpu()
    import tensorrt as trt  # noqa: PLC0415 - only after the probe saw a driver

    return trt


def import_pycuda():
    """pycuda with the device's *primary* context (the one TensorRT's CUDA runtime uses)."""
    require_gpu()
    import pycuda.autoprimaryctx as primary  # noqa: PLC0415 - retains + pushes the primary context
    import pycuda.driver as cuda  # noqa: PLC0415

    return cuda, primary.context


_LOGGERS: dict[int, Any] = {}


def trt_logger(trt, verbose: bool = False):
    severity = trt.Logger.VERBOSE if verbose else trt.Logger.WARNING
    key = int(severity)
    if key not in _LOGGERS:  # TensorRT wants one logger per process; keep them alive
        _LOGGERS[key] = trt.Logger(severity)
    return _LOGGERS[key]


def version_tuple(v: str) -> tuple[int, ...]:
    """'10.3.0.30' -> (10, 3, 0): TensorRT versions compared by their numbers."""
    out = []
    for part in v.split(".")[:3]:
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)


def load_plugin_library(trt, path: str | Path) -> None:
    """Register the plugin creators of ``path`` with TensorRT (once per process and path)."""
    path = str(Path(path).resolve())
    if path in _LOADED_PLUGINS:
        return
    if trt.get_plugin_registry().load_library(path) is None:
        raise BackendUnavailable(f"{path}: TensorRT could not load the plugin library (built for another "
                                 "TensorRT or CUDA?); run `edge-sdk compile` here")
    _LOADED_PLUGINS.add(path)


_LOADED_PLUGINS: set[str] = set()
