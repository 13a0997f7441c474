"""The daemon's image inputs: named cameras from the settings, and checks of image bytes.

- ``CameraHub``: ``settings.cameras`` (name -> source) as background readers
  (``edge_sdk.media.camera.Camera``: newest frame only, reconnect with backoff), the newest frame as
  RGB for the model, small JPEG snapshots, and a status dict for the health topic.
- ``check_image_bytes``: the cheap checks the network thread makes on an inline image before a
  request is accepted (empty, over ``max_image_bytes``, not an image, truncated JPEG), each with
  its error code; ``decode_rgb`` is the full decode, in the worker.

OpenCV and numpy are imported on first use: a daemon without images or cameras never loads them.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from edge_sdk.media.mime import sniff_mime
from edge_sdk.serve.transport import Refusal

log = logging.getLogger("edge_sdk.serve.cameras")


class ImageRejected(Refusal):
    """An image input the daemon refuses; ``code`` is a protocol error code."""


class CameraUnavailable(ImageRejected):
    """A configured camera has no fresh frame (source lost, reconnecting, not opened yet)."""

    def __init__(self, message: str):
        super().__init__("camera_unavailable", message)


def check_image_bytes(data: bytes, max_bytes: int) -> str:
    """Cheap admission checks (no decode); returns the sniffed MIME type or raises ImageRejected:
    ``invalid_image`` (empty, truncated JPEG), ``payload_too_large``, ``unsupported_media``."""
    if not data:
        raise ImageRejected("invalid_image", "empty image (0 bytes)")
    if len(data) > max_bytes:
        raise ImageRejected("payload_too_large",
                            f"image of {len(data)} bytes exceeds this device's max_image_bytes ({max_bytes})")
    mime = sniff_mime(data)
    if mime is None:
        raise ImageRejected("unsupported_media", f"not an image this device decodes (JPEG, PNG, WebP, BMP): "
                                                 f"{len(data)} bytes starting with {bytes(data[:8])!r}")
    if mime == "image/jpeg":
        sos = data.rfind(b"\xff\xda")
        if sos < 0 or data.find(b"\xff\xd9", sos) < 0:
            raise ImageRejected("invalid_image", f"truncated JPEG ({len(data)} bytes): "
                                                 "no end-of-image marker after the last scan")
    return mime


def decode_rgb(data: bytes, max_bytes: int) -> Any:
    """Encoded image -> uint8 RGB [H, W, 3] (alpha over white), or ImageRejected('invalid_image')."""
    from edge_sdk.media.image import ImageError, decode_image, to_rgb

    try:
        return to_rgb(decode_image(data, max_bytes=max_bytes))
    except ImageError as e:
        raise ImageRejected("invalid_image", str(e)) from None


@dataclass(frozen=True)
class Frame:
    bgr: Any  # uint8 [H, W, 3], OpenCV order, owned by the caller (the reader never writes it again)
    ts: float  # capture time, Unix seconds
    seq: int  # per camera, increasing

    def rgb(self) -> Any:
        from edge_sdk.media.image import to_rgb

        return to_rgb(self.bgr)  # BGR -> RGB copy: the model takes RGB


class CameraHub:
    """Named camera readers. ``start()`` opens them all in background threads (a source that is
    missing keeps being retried); ``close()`` stops them."""

    def __init__(self, sources: dict[str, str], *, loop: bool = False, reconnect_max_s: float = 5.0,
                 stale_s: float = 2.0):
        self.sources = dict(sources)
        self.loop = loop
        self.reconnect_max_s = reconnect_max_s
        self.stale_s = stale_s
        self._cams: dict[str, Any] = {}
        self._errors: dict[str, str] = {}
        self._lock = threading.Lock()

    @property
    def names(self) -> list[str]:
        return sorted(self.sources)

    def __contains__(self, name: object) -> bool:
        return name in self.sources

    def start(self) -> "CameraHub":
        if not self.sources:
            return self
        from edge_sdk.media.camera import Camera, CameraError

        for name, source in self.sources.items():
            src: Any = int(source) if source.strip().isdigit() else source
            try:
                cam = Camera(src, name=name, loop=self.loop, backoff=min(0.2, self.reconnect_max_s),
                             backoff_max=self.reconnect_max_s, stall_timeout=self.stale_s)
            except CameraError as e:
                log.error("camera %s: %s", name, e)
                self._errors[name] = str(e)
                continue
            self._cams[name] = cam
            log.info("camera %s: %s source", name, cam.spec.kind)
        return self

    def close(self) -> None:
        for cam in self._cams.values():
            cam.close(timeout=2.0)

    def latest(self, name: str, *, timeout: float = 0.0, newer_than: int | None = None) -> Frame:
        """The newest frame at most ``stale_s`` old, waiting up to ``timeout`` s for one."""
        from edge_sdk.media.camera import CameraError

        cam = self._cams.get(name)
        if cam is None:
            if name not in self.sources:
                raise ImageRejected("unsupported_media", f"no camera {name!r} on this device "
                                                         f"(cameras: {', '.join(self.names) or 'none'})")
            raise CameraUnavailable(f"camera {name!r} failed to start: {self._errors.get(name)}")
        try:
            frame, ts, seq = cam.latest(timeout=max(0.0, timeout), newer_than=newer_than, max_age=self.stale_s)
        except CameraError as e:
            raise CameraUnavailable(f"camera {name!r} has no fresh frame: {e}") from None
        return Frame(frame, ts, seq)

    def snapshot(self, name: str, *, max_side: int, quality: int, timeout: float) -> tuple[bytes, dict]:
        """The newest frame as a JPEG scaled to fit ``max_side``; (bytes, metadata)."""
        import cv2

        f = self.latest(name, timeout=timeout)
        img = f.bgr
        h, w = img.shape[:2]
        scale = max_side / max(h, w)
        if scale < 1:
            img = cv2.resize(img, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
        ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
        if not ok:  # pragma: no cover - OpenCV always encodes uint8 BGR
            raise ImageRejected("internal", "JPEG encoding failed")
        return buf.tobytes(), {"camera": name, "mime": "image/jpeg", "width": int(img.shape[1]),
                               "height": int(img.shape[0]), "frame_seq": f.seq, "frame_ts": round(f.ts, 3)}

    def status(self) -> dict[str, dict]:
        out = {}
        now = time.time()
        for name in self.names:
            cam = self._cams.get(name)
            if cam is None:
                out[name] = {"connected": False, "frames": 0, "reconnects": 0, "last_error": self._errors.get(name)}
                continue
            out[name] = {"connected": cam.connected, "frames": cam.seq, "reconnects": cam.reconnects,
                         "last_error": cam.last_error,
                         "age_s": round(now - cam._ts, 3) if cam.seq else None}
        return out


def grey_thumb(bgr: Any, size: tuple[int, int] = (32, 24)) -> Any:
    """A tiny float32 grey image in [0, 1] for cheap scene-change detection."""
    import cv2
    import numpy as np

    grey = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY) if bgr.ndim == 3 else bgr
    return cv2.resize(grey, size, interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0


def scene_change(a: Any, b: Any) -> float:
    """Mean absolute difference of two ``grey_thumb``s, 0 (same) .. 1."""
    import numpy as np

    return float(np.mean(np.abs(a - b)))
