"""What kind of image or audio file a byte string holds, from its first bytes: shared by the SDK
(which labels what it sends) and the daemon (which checks what it gets). Standard library only."""

from __future__ import annotations

_MAGIC = ((b"\xff\xd8\xff", "image/jpeg"), (b"\x89PNG\r\n\x1a\n", "image/png"), (b"BM", "image/bmp"),
          (b"fLaC", "audio/flac"), (b"OggS", "audio/ogg"))
_RIFF = {b"WEBP": "image/webp", b"WAVE": "audio/wav"}


def sniff_mime(data: bytes) -> str | None:
    """image/jpeg, image/png, image/webp, image/bmp, audio/wav, audio/flac, audio/ogg from the
    first bytes; None for anything else (raw PCM has no magic: its sender names it)."""
    for magic, mime in _MAGIC:
        if data.startswith(magic):
            return mime
    if len(data) >= 12 and data[:4] == b"RIFF":
        return _RIFF.get(bytes(data[8:12]))
    return None
