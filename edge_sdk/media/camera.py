"""Camera capture with OpenCV in a background thread that keeps only the newest frame.

    with Camera(0) as cam:                       # V4L2 device index (or "/dev/video0")
        frame, ts, seq = cam.latest(timeout=2.0) # BGR uint8 [H, W, 3], time.time(), 1, 2, 3...

Sources:
- an int (or a string of digits, or /dev/videoN): a V4L2 device; the driver queue is cut to one
  buffer where the driver allows it;
- a string containing '!': a GStreamer pipeline (cv2.CAP_GSTREAMER; it must end in appsink, e.g.
  `nvarguscamerasrc ! video/x-raw(memory:NVMM),width=1280,height=720 ! nvvidconv ! video/x-raw,format=BGRx
  ! videoconvert ! video/x-raw,format=BGR ! appsink drop=1 max-buffers=1`); needs an OpenCV built
  with GStreamer (JetPack's is; the pip wheel is not);
- rtsp:// rtsps:// rtmp:// http(s)://: a network stream through FFmpeg, with open/read timeouts
  so a dead stream cannot block the reader forever (set OPENCV_FFMPEG_CAPTURE_OPTIONS=
  "rtsp_transport;tcp" in the environment to force RTSP over TCP);
- anything else: a video file, played at its own frame rate (`pace`), rewound at the end when
  `loop=True`.

The reader thread reads continuously and overwrites a single slot, so a slow consumer never sees
a backlog: `latest()` is always the most recent frame. When the source fails to open, stops
delivering frames, or ends (a file without `loop`), the thread releases it and reopens it with
exponential backoff (`backoff` .. `backoff_max` seconds) until `close()`; with `reconnect=False`
it stops instead and `latest()` raises `CameraClosed` once no frame is left to return.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
import time
from dataclasses import dataclass
from typing import Union

import cv2
import numpy as np

log = logging.getLogger("edge_sdk.camera")

Source = Union[int, str, os.PathLike]

_DEVICE_API = cv2.CAP_V4L2 if sys.platform.startswith("linux") else cv2.CAP_ANY
_NETWORK = re.compile(r"^(rtsp|rtsps|rtmp|http|https|udp|tcp)://", re.IGNORECASE)


class CameraError(RuntimeError):
    """A camera problem the caller should know about."""


class CameraTimeout(CameraError, TimeoutError):
    """No (fresh enough) frame arrived within the timeout."""


class CameraClosed(CameraError):
    """The camera was closed, or its source ended with reconnect=False."""


@dataclass(frozen=True)
class SourceSpec:
    kind: str  # "device", "gstreamer", "network", "file"
    target: int | str
    api: int

    @property
    def live(self) -> bool:
        return self.kind != "file"


def parse_source(source: Source) -> SourceSpec:
    """Classify a camera source (see the module docstring)."""
    if isinstance(source, bool):
        raise CameraError(f"invalid camera source {source!r}")
    if isinstance(source, int):
        return SourceSpec("device", source, _DEVICE_API)
    s = os.fspath(source).strip()
    if not s:
        raise CameraError("empty camera source")
    if s.isdigit():
        return SourceSpec("device", int(s), _DEVICE_API)
    if "!" in s:
        return SourceSpec("gstreamer", s, cv2.CAP_GSTREAMER)
    if _NETWORK.match(s):
        return SourceSpec("network", s, cv2.CAP_FFMPEG)
    if re.match(r"^/dev/video\d+$", s):
        return SourceSpec("device", s, cv2.CAP_V4L2)
    return SourceSpec("file", s, cv2.CAP_ANY)


def _redact(text: str) -> str:
    """Hide credentials in URLs (rtsp://user:pass@host) before logging."""
    return re.sub(r"(://)[^/@\s]+@", r"\1***@", text)


class Camera:
    """Background capture from one source; thread-safe `latest()`.

    Args:
        source: device index, /dev/videoN, GStreamer pipeline, stream URL or file path.
        width, height, fps: requested capture format (devices only; the driver may refuse).
        loop: rewind a file at its end instead of treating the end as a dropped source.
        pace: sleep between file frames to play at the file's frame rate (default: files yes,
            live sources no, since they pace themselves).
        reconnect: reopen the source with backoff when it fails or ends; False: stop.
        backoff, backoff_max: first and largest wait between reopen attempts, in seconds.
        stall_timeout: a live source that delivers nothing for this long is reopened.
        open_timeout: FFmpeg open/read timeout for network streams, in seconds.
        fourcc: requested pixel format for devices, e.g. "MJPG" for USB cameras at high rates.
        start: start the reader thread now (otherwise call `start()`).
    """

    def __init__(self, source: Source, *, width: int | None = None, height: int | None = None,
                 fps: float | None = None, loop: bool = False, pace: bool | None = None, reconnect: bool = True,
                 backoff: float = 0.5, backoff_max: float = 10.0, stall_timeout: float = 2.0,
                 open_timeout: float = 10.0, fourcc: str | None = None, name: str | None = None,
                 start: bool = True):
        self.spec = parse_source(source)
        self.name = name or _redact(str(self.spec.target))
        self.width, self.height, self.fps = width, height, fps
        self.loop = loop
        self.pace = (not self.spec.live) if pace is None else pace
        self.reconnect = reconnect
        self.backoff = max(backoff, 0.001)
        self.backoff_max = max(backoff_max, self.backoff)
        self.stall_timeout = stall_timeout
        self.open_timeout = open_timeout
        self.fourcc = fourcc

        self._cond = threading.Condition()
        self._frame: np.ndarray | None = None
        self._ts = 0.0
        self._mono = 0.0
        self._seq = 0
        self._stop = threading.Event()
        self._ended = False
        self._connected = False
        self._thread: threading.Thread | None = None
        self.opens = 0           # successful opens (the first one included)
        self.reconnects = 0      # reopen attempts after a drop or failure
        self.last_error: str | None = None
        if start:
            self.start()

    # --- public API --------------------------------------------------------------------------
    def start(self) -> "Camera":
        if self._thread is not None:
            return self
        if self._stop.is_set():
            raise CameraClosed(f"camera {self.name}: already closed")
        self._thread = threading.Thread(target=self._run, name=f"camera[{self.name}]", daemon=True)
        self._thread.start()
        return self

    def latest(self, timeout: float | None = 1.0, *, newer_than: int | None = None,
               max_age: float | None = None) -> tuple[np.ndarray, float, int]:
        """The newest frame as (BGR uint8 array, capture time.time(), sequence number).

        Waits up to `timeout` seconds (None: forever) until a frame exists, is newer than
        sequence `newer_than` (when given) and at most `max_age` seconds old (when given).
        The array belongs to the caller; the reader never writes into it again.
        Raises CameraTimeout, or CameraClosed when no frame can come any more.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                if self._frame is not None and (newer_than is None or self._seq > newer_than) and (
                        max_age is None or time.monotonic() - self._mono <= max_age):
                    return self._frame, self._ts, self._seq
                if self._stop.is_set() or self._ended:
                    why = "closed" if self._stop.is_set() else f"source ended ({self.last_error or 'end of stream'})"
                    raise CameraClosed(f"camera {self.name}: {why}")
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    state = "connected" if self._connected else f"not connected ({self.last_error or 'opening'})"
                    raise CameraTimeout(f"camera {self.name}: no frame within {timeout} s, {state}")
                self._cond.wait(remaining if remaining is None else min(remaining, 0.5))

    @property
    def seq(self) -> int:
        return self._seq

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def close(self, timeout: float = 5.0) -> None:
        """Stop the reader and release the source; safe to call twice."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout)
            if t.is_alive():
                log.warning("camera %s: reader still blocked in the driver after %.1f s; left as a daemon thread",
                            self.name, timeout)

    def __enter__(self) -> "Camera":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # --- reader thread -----------------------------------------------------------------------
    def _open(self) -> cv2.VideoCapture | None:
        spec = self.spec
        params: list[int] = []
        if spec.kind == "network":
            ms = int(self.open_timeout * 1000)
            params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, ms, cv2.CAP_PROP_READ_TIMEOUT_MSEC, ms]
        if spec.kind == "file" and not os.path.exists(str(spec.target)):
            self.last_error = "file not found"
            return None
        try:
            cap = cv2.VideoCapture(spec.target, spec.api, params) if params else cv2.VideoCapture(spec.target, spec.api)
        except cv2.error as exc:
            self.last_error = f"open failed: {exc}"
            return None
        if not cap.isOpened():
            cap.release()
            self.last_error = "cannot open source"
            return None
        if spec.kind == "device":
            if self.fourcc:
                cap.set(cv2.CAP_PROP_FOURCC, cv2.VideoWriter_fourcc(*self.fourcc))
            if self.width:
                cap.set(cv2.CAP_PROP_FRAME_WIDTH, self.width)
            if self.height:
                cap.set(cv2.CAP_PROP_FRAME_HEIGHT, self.height)
            if self.fps:
                cap.set(cv2.CAP_PROP_FPS, self.fps)
            cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)
        return cap

    def _publish(self, frame: np.ndarray) -> None:
        with self._cond:
            self._frame = frame
            self._ts = time.time()
            self._mono = time.monotonic()
            self._seq += 1
            self._cond.notify_all()

    def _set_connected(self, value: bool) -> None:
        with self._cond:
            self._connected = value
            self._cond.notify_all()

    def _run(self) -> None:
        delay = self.backoff
        retry = False
        while not self._stop.is_set():
            if retry:
                self.reconnects += 1
                log.info("camera %s: reconnecting in %.2f s (%s)", self.name, delay, self.last_error)
                if self._stop.wait(delay):
                    break
                delay = min(delay * 2, self.backoff_max)
            cap = self._open()
            if cap is None:
                log.warning("camera %s: %s", self.name, self.last_error)
                if not self.reconnect:
                    break
                retry = True
                continue
            self.opens += 1
            self._set_connected(True)
            log.info("camera %s: opened (%s)", self.name, self.spec.kind)
            try:
                got_frames, at_end = self._read_loop(cap)
            finally:
                cap.release()
                self._set_connected(False)
            if got_frames:
                delay = self.backoff  # it worked for a while: start the backoff over
            if self._stop.is_set():
                break
            if at_end and self.loop and got_frames:
                # A file ended: reopen it at once (reopening, rather than seeking, also picks up a
                # file that was replaced on disk).
                retry = False
                continue
            if not self.reconnect:
                break
            retry = True
        with self._cond:
            self._ended = True
            self._connected = False
            self._cond.notify_all()
        log.info("camera %s: reader stopped", self.name)

    def _read_loop(self, cap: cv2.VideoCapture) -> tuple[bool, bool]:
        """Read until stop, failure or end; returns (at least one frame arrived, ended cleanly)."""
        got = False
        file_fps = cap.get(cv2.CAP_PROP_FPS) if self.pace else 0.0
        period = 1.0 / file_fps if file_fps and 0 < file_fps < 1000 else 0.0
        next_due = time.monotonic()
        last_frame = time.monotonic()
        while not self._stop.is_set():
            ok, frame = cap.read()
            now = time.monotonic()
            if not ok or frame is None or frame.size == 0:
                if self.spec.live and now - last_frame < self.stall_timeout:
                    # a transient failure on a live source: retry shortly before reopening
                    if self._stop.wait(0.01):
                        break
                    continue
                self.last_error = "source stopped delivering frames" if self.spec.live else "end of file"
                log.log(logging.INFO if not self.spec.live and self.loop else logging.WARNING,
                        "camera %s: %s", self.name, self.last_error)
                return got, not self.spec.live
            got = True
            last_frame = now
            self._publish(frame)
            if period:
                next_due = max(next_due + period, now - period)
                wait = next_due - time.monotonic()
                if wait > 0 and self._stop.wait(wait):
                    break
        return got, False
