"""What kind of image a byte string holds, from its first bytes: shared by the SDK (which labels
what it sends) and the daemon (which checks what it gets). Standard library only."""

from __future__ import annotations

_MAGIC = ((b"\xff\xd8\xff", "image/jpeg"), (b"\x89PNG\r\n\x1a\n", "image/png"), (b"BM", "image/bmp"))


def sniff_mime(data: bytes) -> str | None:
    """image/jpeg, image/png, image/webp, image/bmp from the first bytes; None for anything else."""
    for magic, mime in _MAGIC:
        if data.startswith(magic):
            return mime
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None
