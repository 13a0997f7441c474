"""The plugin library compiles for Orin, Hopper and Thor, and its TensorRT glue honours the
IPluginV3 contract, checked without a GPU against TensorRT's public headers of each version.

Needs nvcc and TensorRT headers: EDGE_SDK_TRT_HEADERS lists include folders (os.pathsep-separated;
`make test` fills it from ../shared/third_party/tensorrt), else TENSORRT_INCLUDE_DIR. Skips,
saying which is missing, where they are absent."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from edge_sdk.plugins import library
from edge_sdk.plugins.library import PluginBuildError, Toolchain, build_harness, build_library

ARCHS = (87, 90, 110)  # Orin, H100/H200, Thor


def _header_dirs() -> list[Path]:
    listed = os.environ.get("EDGE_SDK_TRT_HEADERS") or os.environ.get("TENSORRT_INCLUDE_DIR") or ""
    return [Path(p) for p in listed.split(os.pathsep) if p]


def _toolchain(headers: Path) -> Toolchain:
    try:
        return Toolchain.find(headers)
    except PluginBuildError as exc:
        pytest.skip(str(exc))


HEADERS = _header_dirs()
needs_headers = pytest.mark.skipif(not HEADERS, reason="no TensorRT headers (set EDGE_SDK_TRT_HEADERS or "
                                                       "TENSORRT_INCLUDE_DIR)")


@needs_headers
@pytest.mark.parametrize("headers", HEADERS, ids=lambda p: p.parent.name)
def test_library_builds_and_meets_the_plugin_contract(tmp_path, headers):
    tools = _toolchain(headers)
    lib = build_library(tmp_path / "lib", ARCHS, tools)
    harness = build_harness(tmp_path / "harness", tools)
    proc = subprocess.run([str(harness), str(lib)], capture_output=True, text=True)
    lines = proc.stdout.splitlines()
    print(f"TensorRT {tools.trt_version()} headers, nvcc {tools.nvcc_version()}: "
          f"{sum(line.startswith('ok') for line in lines)} checks passed")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not [line for line in lines if not line.startswith("ok ")]
    assert "ok EdgeAttention: output 1 aliases its input (in place)" in lines
    assert len(lines) == 48  # every check ran (a crash part-way would leave fewer)


@needs_headers
def test_library_is_rebuilt_only_when_its_inputs_change(tmp_path, monkeypatch):
    tools = _toolchain(HEADERS[0])
    first = build_library(tmp_path, (90,), tools)
    stamp = first.stat().st_mtime_ns
    assert build_library(tmp_path, (90,), tools) == first and first.stat().st_mtime_ns == stamp
    edited = tmp_path / "csrc"
    shutil.copytree(library.SOURCES, edited)
    (edited / "attention.cu").write_text((edited / "attention.cu").read_text() + "\n// edited\n")
    monkeypatch.setattr(library, "SOURCES", edited)
    assert build_library(tmp_path, (90,), tools) != first


@needs_headers
def test_a_compile_error_names_the_file(tmp_path, monkeypatch):
    tools = _toolchain(HEADERS[0])
    broken = tmp_path / "csrc"
    shutil.copytree(library.SOURCES, broken)
    (broken / "int4_gemm.cu").write_text("this is not CUDA\n")
    monkeypatch.setattr(library, "SOURCES", broken)
    with pytest.raises(PluginBuildError, match=r"int4_gemm\.cu: compile failed"):
        build_library(tmp_path / "out", (90,), tools)


@pytest.mark.parametrize("arch", ARCHS)
def test_kernels_compile_to_a_cubin_per_architecture(tmp_path, arch):
    try:
        nvcc = library.find_cuda() / "bin" / "nvcc"
    except PluginBuildError as exc:
        pytest.skip(str(exc))
    for name in library.KERNELS:
        cubin = tmp_path / f"{name}.sm_{arch}.cubin"
        subprocess.run([str(nvcc), "-std=c++17", "-O3", "-cubin", f"-arch=sm_{arch}", str(library.SOURCES / name),
                        "-o", str(cubin)], check=True, capture_output=True)
        assert cubin.read_bytes()[:4] == b"\x7fELF"
