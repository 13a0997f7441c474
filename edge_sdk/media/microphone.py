"""Background capture of 16 kHz mono audio from a microphone, a GStreamer pipeline or a file.

Sources:
- ``alsa:DEVICE`` (e.g. ``alsa:default``, ``alsa:plughw:1,0``): `arecord` (alsa-utils) reading
  S16_LE mono at 16 kHz; ALSA resamples when the device cannot;
- ``gst:PIPELINE``: a GStreamer source pipeline (``pulsesrc``, ``alsasrc device=...``,
  ``audiotestsrc is-live=true``); `gst-launch-1.0` converts it to the same raw format;
- a path to an audio file (anything `media.audio.load_audio` reads), played in real time.

A reader thread turns the stream into float32 chunks of ``chunk_ms`` in a bounded queue: a
consumer that falls behind loses the oldest chunks (counted in ``dropped``), never the newest.
A source that ends or fails is reopened with backoff (files: only with ``loop``). ``pace``
sleeps to real time between chunks (default for files; live devices pace themselves, and an
unpaced test source, such as ALSA's file plugin, delivers seconds in milliseconds).
"""

from __future__ import annotations

import collections
import logging
import shlex
import subprocess
import threading
import time
from pathlib import Path

import numpy as np

from .audio import SAMPLE_RATE, from_pcm16, load_audio

log = logging.getLogger(__name__)


def _stop_process(proc: subprocess.Popen, grace: float = 1.0) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds (arecord can hang draining a device)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
    proc.wait()


class MicrophoneClosed(RuntimeError):
    """The capture ended (closed, or a source that cannot be reopened) and every chunk was read."""


def capture_command(source: str) -> list[str] | None:
    """The subprocess that delivers raw S16_LE 16 kHz mono on stdout, or None for a file."""
    kind, _, target = source.partition(":")
    if kind == "alsa":
        return ["arecord", "-q", "-D", target or "default", "-r", str(SAMPLE_RATE), "-c", "1", "-f", "S16_LE",
                "-t", "raw"]
    if kind == "gst":
        caps = f"audio/x-raw,format=S16LE,rate={SAMPLE_RATE},channels=1"
        return ["gst-launch-1.0", "-q", *shlex.split(target), "!", "audioconvert", "!", "audioresample", "!",
                caps, "!", "fdsink", "fd=1"]
    return None


class Microphone:
    """``Microphone("alsa:default")``; ``read()`` the next chunk, or iterate; ``close()``."""

    def __init__(self, source: str | Path, *, chunk_ms: int = 80, pace: bool | None = None, loop: bool = False,
                 reconnect: bool = True, backoff: float = 0.5, backoff_max: float = 10.0, queue_chunks: int = 250,
                 name: str | None = None, start: bool = True):
        self.source = str(source)
        self.command = capture_command(self.source)
        self.name = name or self.source
        self.chunk = SAMPLE_RATE * chunk_ms // 1000
        self.pace = self.command is None if pace is None else pace
        self.loop, self.reconnect = loop, reconnect
        self.backoff, self.backoff_max = max(backoff, 0.001), max(backoff_max, backoff)
        self._queue: collections.deque[np.ndarray] = collections.deque(maxlen=queue_chunks)
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._ended = False
        self._proc: subprocess.Popen | None = None
        self._thread: threading.Thread | None = None
        self.opens = self.reconnects = self.dropped = 0
        self.last_error: str | None = None
        if start:
            self.start()

    def start(self) -> Microphone:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"mic-{self.name}", daemon=True)
            self._thread.start()
        return self

    def read(self, timeout: float | None = 1.0) -> np.ndarray | None:
        """The next chunk (float32, ``chunk_ms`` long), None on timeout; MicrophoneClosed at the end."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._queue or self._ended, timeout):
                return None
            if self._queue:
                return self._queue.popleft()
        raise MicrophoneClosed(f"microphone {self.name}: capture ended ({self.last_error or 'closed'})")

    def __iter__(self):
        while True:
            try:
                chunk = self.read(timeout=None)
            except MicrophoneClosed:
                return
            if chunk is not None:
                yield chunk

    def close(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._proc is not None:
            _stop_process(self._proc)
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self) -> Microphone:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the reader thread -----------------------------------------------------------------------
    def _publish(self, chunk: np.ndarray) -> None:
        with self._cond:
            if len(self._queue) == self._queue.maxlen:
                self.dropped += 1
            self._queue.append(chunk)
            self._cond.notify_all()

    def _chunks(self):
        """Chunks from one opening of the source, until it ends."""
        if self.command is None:
            samples = load_audio(self.source, max_seconds=float("inf"))
            for i in range(0, len(samples) - self.chunk + 1, self.chunk):
                yield samples[i:i + self.chunk]
            return
        self._proc = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        size = 2 * self.chunk
        try:
            while not self._stop.is_set():
                data = self._proc.stdout.read(size)
                if len(data) < size:
                    err = self._proc.stderr.read().decode(errors="replace").strip() if self._proc.poll() is not None else ""
                    self.last_error = f"{self.command[0]} stopped" + (f": {err.splitlines()[-1]}" if err else "")
                    return
                yield from_pcm16(data)
        finally:
            _stop_process(self._proc)

    def _run(self) -> None:
        delay = self.backoff
        period = self.chunk / SAMPLE_RATE
        while not self._stop.is_set():
            got = False
            due = time.monotonic()
            try:
                self.opens += 1
                for chunk in self._chunks():
                    got = True
                    self._publish(chunk)
                    if self.pace:
                        due += period
                        if self._stop.wait(max(0.0, due - time.monotonic())):
                            break
                if self.command is None:
                    self.last_error = "end of file"
            except Exception as exc:  # a source that cannot be opened or decoded: say why, maybe retry
                self.last_error = f"{type(exc).__name__}: {exc}"
            if self._stop.is_set() or (self.command is None and not self.loop) or not self.reconnect:
                break
            if got:  # it worked for a while: reopen at once, and start the backoff over
                delay = self.backoff
            else:
                log.warning("microphone %s: %s; reopening in %.1f s", self.name, self.last_error, delay)
                if self._stop.wait(delay):
                    break
                delay = min(delay * 2, self.backoff_max)
            self.reconnects += 1
        with self._cond:
            self._ended = True
            self._cond.notify_all()
