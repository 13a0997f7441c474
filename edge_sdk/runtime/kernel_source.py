"""The stamp of the attention kernel's C sources (csrc/): setup.py compiles it into the library,
runtime/attention.py checks it at load, so a library left from older sources (a failed rebuild
keeps the old file) is refused rather than run. Standard library only: setup.py loads this file
before any dependency is installed."""

from __future__ import annotations

import hashlib
from pathlib import Path

CSRC = Path(__file__).with_name("csrc")


def source_stamp(csrc: Path = CSRC) -> str:
    digest = hashlib.sha256()
    for path in sorted(csrc.glob("*.[ch]")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]
