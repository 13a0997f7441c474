"""The CPU kernels (edge_sdk/runtime/csrc/), built as one plain shared library that
edge_sdk/runtime/kernels.py loads with ctypes; its sources, flags and the stamp of its sources
come from edge_sdk/runtime/kernel_build.py. Everything else is in pyproject.toml.

Optional: where it cannot be compiled the install still succeeds, and the CPU backend runs the
package's whole CPU graph instead (and says so)."""

import importlib.util
from pathlib import Path

from setuptools import Extension, setup

_root = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("kernel_build", _root / "edge_sdk" / "runtime" / "kernel_build.py")
kernel_build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(kernel_build)

setup(ext_modules=[Extension(
    "edge_sdk.runtime._kernels", [str(p.relative_to(_root)) for p in kernel_build.SOURCES],
    extra_compile_args=kernel_build.compile_flags(),
    define_macros=[("EDGE_KERNELS_SOURCE", f'"{kernel_build.source_stamp()}"')],
    depends=[str(p.relative_to(_root)) for p in kernel_build.HEADERS], libraries=kernel_build.LIBRARIES,
    optional=True)])
