"""Build the plugin library (``libedge_sdk_plugins.so``) from the sources shipped in csrc/.

The device builds it with its own nvcc and TensorRT headers (JetPack 6: CUDA 12.6 for sm_87;
JetPack 7: CUDA 13 for sm_110): a library built elsewhere may carry a cubin ABI or a cudart the
device lacks. The result is cached under a key of everything that goes into it (sources, GPU
architectures, nvcc's version, the TensorRT headers' version), so a second build with nothing
changed is a lookup.

Build-side code: the runtime only loads the finished library (runtime/tensorrt.py).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

SOURCES = Path(__file__).parent / "csrc"
KERNELS = ("int4_gemm.cu", "attention.cu")
GLUE = "plugins.cpp"
HARNESS = "harness.cpp"
LIBRARY_NAME = "libedge_sdk_plugins.so"

#: Where JetPack puts TensorRT's headers; elsewhere set TENSORRT_INCLUDE_DIR.
JETPACK_TRT_INCLUDE = Path("/usr/include/aarch64-linux-gnu")


class PluginBuildError(RuntimeError):
    """A tool is missing or a compile failed; the message names the tool or the file."""


def find_cuda() -> Path:
    """The CUDA toolkit's folder: CUDA_HOME, /usr/local/cuda, or where nvcc on PATH lives."""
    on_path = shutil.which("nvcc")
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda",
             str(Path(on_path).resolve().parent.parent) if on_path else None]
    for home in homes:
        if home and (Path(home) / "bin" / "nvcc").is_file() and (Path(home) / "include" / "cuda_runtime_api.h").is_file():
            return Path(home)
    raise PluginBuildError("CUDA toolkit not found (nvcc and cuda_runtime_api.h): install it or set CUDA_HOME")


@dataclass(frozen=True)
class Toolchain:
    nvcc: Path
    cuda_include: Path
    trt_include: Path
    cxx: str = "g++"

    @classmethod
    def find(cls, trt_include: str | Path | None = None) -> Toolchain:
        """The CUDA toolkit (`find_cuda`) and TensorRT's headers from the argument,
        TENSORRT_INCLUDE_DIR or JetPack's place."""
        home = find_cuda()
        trt = Path(trt_include or os.environ.get("TENSORRT_INCLUDE_DIR") or JETPACK_TRT_INCLUDE)
        if not (trt / "NvInferRuntime.h").is_file():
            raise PluginBuildError(f"{trt}: no TensorRT headers (NvInferRuntime.h); set TENSORRT_INCLUDE_DIR")
        return cls(home / "bin" / "nvcc", home / "include", trt)

    def nvcc_version(self) -> str:
        out = subprocess.run([str(self.nvcc), "--version"], capture_output=True, text=True, check=True).stdout
        m = re.search(r"release ([\d.]+)", out)
        return m.group(1) if m else out.strip().splitlines()[-1]

    def trt_version(self) -> str:
        text = (self.trt_include / "NvInferVersion.h").read_text()
        parts = [re.search(rf"#define (?:TRT|NV_TENSORRT)_{k}(?:_ENTERPRISE)?\s+(\d+)", text) for k in ("MAJOR", "MINOR", "PATCH")]
        return ".".join(p.group(1) for p in parts if p)


def source_hash() -> str:
    """sha256 over the shipped sources: part of the library's and of the engines' cache keys."""
    h = hashlib.sha256()
    for path in sorted(SOURCES.iterdir()):
        if path.suffix in (".cu", ".cuh", ".cpp", ".h"):
            h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def cache_key(tools: Toolchain, archs: tuple[int, ...]) -> str:
    parts = [source_hash(), ",".join(map(str, archs)), tools.nvcc_version(), tools.trt_version()]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def _run(cmd: list[str], what: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise PluginBuildError(f"{what}: compile failed:\n{proc.stderr.strip() or proc.stdout.strip()}")


def build_library(out_dir: str | Path, archs: tuple[int, ...], tools: Toolchain | None = None) -> Path:
    """Compile the kernels for ``archs`` (e.g. (87,) for Orin, (110,) for Thor) and the glue, link
    ``out_dir/<key>/libedge_sdk_plugins.so``; reuse it when the key matches. Returns its path."""
    tools = tools or Toolchain.find()
    out = Path(out_dir) / cache_key(tools, archs)
    lib = out / LIBRARY_NAME
    if lib.is_file():
        log.info("plugin library up to date: %s", lib)
        return lib
    out.mkdir(parents=True, exist_ok=True)
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        objects = []
        for name in KERNELS:
            obj = Path(tmp) / (name + ".o")
            log.info("nvcc %s for sm_%s", name, ",".join(map(str, archs)))
            _run([str(tools.nvcc), "-std=c++17", "-O3", "-Xcompiler", "-fPIC", *gencode, "-c",
                  str(SOURCES / name), "-o", str(obj)], str(SOURCES / name))
            objects.append(str(obj))
        glue = Path(tmp) / "plugins.o"
        _run([tools.cxx, "-std=c++17", "-O2", "-fPIC", "-Wall", "-Wextra", "-Werror", f"-I{tools.cuda_include}",
              "-isystem", str(tools.trt_include), "-c", str(SOURCES / GLUE), "-o", str(glue)], str(SOURCES / GLUE))
        partial = Path(tmp) / LIBRARY_NAME
        _run([str(tools.nvcc), "-shared", *gencode, "-o", str(partial), *objects, str(glue)], f"linking {LIBRARY_NAME}")
        os.replace(partial, lib)
    log.info("built %s (TensorRT %s headers, nvcc %s)", lib, tools.trt_version(), tools.nvcc_version())
    return lib


def build_harness(out_path: str | Path, tools: Toolchain | None = None) -> Path:
    """The no-GPU contract harness (csrc/harness.cpp), compiled against the same headers."""
    tools = tools or Toolchain.find()
    out_path = Path(out_path)
    _run([tools.cxx, "-std=c++17", "-O1", "-Wall", "-Wextra", "-Werror", f"-I{tools.cuda_include}", "-isystem",
          str(tools.trt_include), str(SOURCES / HARNESS), "-o", str(out_path), "-ldl"], str(SOURCES / HARNESS))
    return out_path
