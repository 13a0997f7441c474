"""The compiled CPU kernels (csrc/, compiled at install by setup.py): one library, loaded with
ctypes, that runtime/attention.py and runtime/linear.py call into. Plain C over raw buffers, with
no Python or ONNX Runtime API in it.

`load()` raises KernelUnavailable, naming the reason, where no current library is installed; the
backend then runs the whole CPU graph instead.
"""

from __future__ import annotations

import ctypes

from .kernel_build import CSRC, built_stamp, library_path, source_stamp


class KernelUnavailable(RuntimeError):
    """No compiled kernel can be loaded here; the message says why."""


def load() -> ctypes.CDLL:
    """The compiled library beside this module, refused if built from other sources than these."""
    path = library_path()
    if not path.is_file():
        raise KernelUnavailable(f"no compiled CPU kernels at {path} (build them where a C compiler is "
                                "present: python -m edge_sdk.runtime.kernel_build)")
    try:
        library = ctypes.CDLL(str(path))
    except OSError as exc:
        raise KernelUnavailable(f"{path}: {exc}") from None
    built, now = built_stamp(library), source_stamp() if CSRC.is_dir() else None
    if now is not None and built != now:
        raise KernelUnavailable(f"{path}: built from other sources than {CSRC} (a stale build: stamp {built}, "
                                f"sources {now}); rebuild it: python -m edge_sdk.runtime.kernel_build")
    return library
