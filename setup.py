"""The CPU attention kernel (edge_sdk/runtime/csrc/attention.c), built as a plain shared library
that edge_sdk/runtime/attention.py loads with ctypes; its flags and the stamp of its sources come
from edge_sdk/runtime/kernel_build.py. Everything else is in pyproject.toml.

Optional: where it cannot be compiled the install still succeeds, and the CPU backend runs the
package's whole CPU graph instead (and says so)."""

import importlib.util
from pathlib import Path

from setuptools import Extension, setup

_spec = importlib.util.spec_from_file_location("kernel_build",
                                               Path(__file__).parent / "edge_sdk" / "runtime" / "kernel_build.py")
kernel_build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(kernel_build)

setup(ext_modules=[Extension(
    "edge_sdk.runtime._attention", ["edge_sdk/runtime/csrc/attention.c"],
    extra_compile_args=kernel_build.compile_flags(),
    define_macros=[("EDGE_ATTENTION_SOURCE", f'"{kernel_build.source_stamp()}"')],
    depends=["edge_sdk/runtime/csrc/attention_unit.h"], libraries=kernel_build.LIBRARIES, optional=True)])
