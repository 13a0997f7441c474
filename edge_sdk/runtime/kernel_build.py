"""How the CPU kernels (csrc/: attention, the quantized linears' products, their thread pool and
int8 rule) are built into one library: the stamp of their sources, the compiler flags, and a
build with this host's C compiler.

setup.py compiles it at install with these flags and stamp; runtime/kernels.py checks the stamp at
load, so a library left from older sources (a failed rebuild keeps the old file) is refused
rather than run. A device that `make flash` installs gets no pip install of edge_sdk (the release
is its source tree), so the flash builds the library there with `python -m
edge_sdk.runtime.kernel_build`. Standard library only: setup.py loads this file before any
dependency is installed.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.machinery
import os
import platform
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

CSRC = Path(__file__).with_name("csrc")
SOURCES = sorted(CSRC.glob("*.c"))
HEADERS = sorted(CSRC.glob("*.h"))
# x86-64 gets the AVX2/FMA/F16C baseline, not -march=native, so a build runs on any such machine;
# the AVX-512 build of the kernel's inner loop is picked at run time where the CPU has it.
ARCH_FLAGS = {"x86_64": ["-mavx2", "-mfma", "-mf16c"], "aarch64": ["-march=armv8.2-a+fp16"]}
# -ffast-math only when compiling: it lets GCC vectorize the softmax's expf (glibc's libmvec);
# linked with it, GCC would also flush subnormals process-wide.
COMPILE_FLAGS = ["-O3", "-ffast-math", "-std=gnu11"]
LIBRARIES = ["m", "pthread"]


def source_stamp(csrc: Path = CSRC) -> str:
    digest = hashlib.sha256()
    for path in sorted(csrc.glob("*.[ch]")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def compile_flags(machine: str | None = None) -> list[str]:
    return [*COMPILE_FLAGS, *ARCH_FLAGS.get(machine or platform.machine(), [])]


def library_path() -> Path:
    """Where runtime/kernels.py looks for the library: beside it, named as an extension module."""
    return Path(__file__).with_name(f"_kernels{importlib.machinery.EXTENSION_SUFFIXES[0]}")


def build(out: Path | None = None, compiler: str | None = None) -> Path:
    """Compiles the library into ``out`` (default: library_path()), replacing any library there only
    once the new one is complete. Raises RuntimeError naming the compiler and its first error."""
    out = out or library_path()
    compiler = compiler or os.environ.get("CC", "cc")
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        made, objects = Path(tmp) / out.name, [Path(tmp) / f"{source.stem}.o" for source in SOURCES]
        # Compiled and linked apart, as setup.py does: linked with -ffast-math, the compiler adds a
        # start-up file that sets flush-to-zero for the whole process that loads the library.
        for source, obj in zip(SOURCES, objects):
            _run(compiler, [*compile_flags(), "-fPIC", f'-DEDGE_KERNELS_SOURCE="{source_stamp()}"', "-c",
                            str(source), "-o", str(obj)], source.name)
        _run(compiler, ["-shared", *map(str, objects), "-o", str(made), *(f"-l{lib}" for lib in LIBRARIES)],
             "the link")
        os.replace(made, out)
    return out


def _run(compiler: str, args: list[str], what: str) -> None:
    try:
        proc = subprocess.run([*shlex.split(compiler), *args], capture_output=True, text=True)
    except OSError as exc:
        raise RuntimeError(f"no C compiler ({compiler}: {exc.strerror})") from None
    if proc.returncode:
        first = next((line for line in proc.stderr.splitlines() if "error" in line), proc.stderr.strip()[:300])
        raise RuntimeError(f"{compiler} failed on {what}: {first}")


def built_stamp(library: ctypes.CDLL) -> str:
    """The stamp a loaded library carries: the sources it was compiled from ("unstamped" for one
    built before stamps, as for a build without the define)."""
    try:
        stamp = library.edge_kernels_source
    except AttributeError:
        return "unstamped"
    stamp.restype = ctypes.c_char_p
    return stamp().decode()


def _current(path: Path) -> bool:
    """Whether ``path`` is a library built from these sources (one that does not load is not)."""
    try:
        return path.is_file() and built_stamp(ctypes.CDLL(str(path))) == source_stamp()
    except OSError:
        return False


def main() -> int:
    """One line for the flash's report; exit 0 either way, as a device without a compiler still
    serves (its CPU backend runs the CPU graph whole)."""
    path = library_path()
    if _current(path):
        print(f"kept {path} (built from these sources)")
        return 0
    try:
        print(f"built {build()}")
    except RuntimeError as exc:
        print(f"not built ({exc}): the CPU graph runs whole")
    return 0


if __name__ == "__main__":
    sys.exit(main())
