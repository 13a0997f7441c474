"""The CPU attention kernel (edge_sdk/runtime/csrc/attention.c), built as a plain shared library
that edge_sdk/runtime/attention.py loads with ctypes. Everything else is in pyproject.toml.

Optional: where it cannot be compiled the install still succeeds, and the CPU backend runs the
package's whole CPU graph instead (and says so). x86-64 gets the AVX2/FMA/F16C baseline, not
-march=native, so a build runs on any such machine; the AVX-512 build of the kernel's inner
loop is picked at run time where the CPU has it."""

import importlib.util
import platform
from pathlib import Path

from setuptools import Extension, setup

_spec = importlib.util.spec_from_file_location("kernel_source",
                                               Path(__file__).parent / "edge_sdk" / "runtime" / "kernel_source.py")
kernel_source = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(kernel_source)

ARCH_FLAGS = {"x86_64": ["-mavx2", "-mfma", "-mf16c"], "aarch64": ["-march=armv8.2-a+fp16"]}

setup(ext_modules=[Extension(
    "edge_sdk.runtime._attention", ["edge_sdk/runtime/csrc/attention.c"],
    # -ffast-math only when compiling: it lets GCC vectorize the softmax's expf (glibc's libmvec);
    # linked with it, GCC would also flush denormals process-wide.
    extra_compile_args=["-O3", "-ffast-math", "-std=gnu11", *ARCH_FLAGS.get(platform.machine(), [])],
    define_macros=[("EDGE_ATTENTION_SOURCE", f'"{kernel_source.source_stamp()}"')],
    depends=["edge_sdk/runtime/csrc/attention_unit.h"], libraries=["m", "pthread"], optional=True)])
