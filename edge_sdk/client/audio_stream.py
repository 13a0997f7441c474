"""A live audio stream to a device: push microphone audio, read voice events and transcripts.

``Client.audio_stream()`` opens one; ``send`` pushes 16 kHz mono audio (float32 samples or
PCM16 little-endian bytes) as chunks, ``events()`` yields what the device says: ``voice_started``,
``voice_stopped``, then a ``transcript`` per utterance (``text``, ``tokens``, ``utterance``), and
finally ``stream_closed``. A client that vanishes is cleaned up by the device (its Last Will).
"""

from __future__ import annotations

import queue
import uuid
from typing import Any, Iterator

from edge_sdk.client.connection import Connection, item_error
from edge_sdk.client.errors import RequestTimeoutError
from edge_sdk.protocol.models import STREAM_AUDIO_MIME


class AudioStream:
    def __init__(self, core: Connection, *, language: str | None = None, end_silence_ms: int | None = None,
                 max_utterance_s: float | None = None, max_tokens: int | None = None, timeout: float = 10.0,
                 stream_id: str | None = None):
        self._core = core
        self.stream_id = stream_id or f"as-{uuid.uuid4().hex[:16]}"
        self._queue: queue.Queue = queue.Queue()
        self._seq = 0
        self.closed = False
        payload: dict[str, Any] = {"v": 1, "request_id": self.stream_id, "action": "open"}
        for key, value in (("language", language), ("end_silence_ms", end_silence_ms),
                           ("max_utterance_s", max_utterance_s), ("max_tokens", max_tokens)):
            if value is not None:
                payload[key] = value
        core.submit(payload, self._deliver, timeout, op="audio_stream")
        first = self._next(timeout)
        err = item_error(first)
        if err is not None:
            self.closed = True
            raise err
        if first.get("type") != "stream_opened":
            raise RequestTimeoutError(f"audio stream {self.stream_id}: expected stream_opened, got {first.get('type')}")

    def _deliver(self, ev: Any) -> None:
        """On the connection's thread: each stream event, and the utterances it announces."""
        if isinstance(ev, dict) and ev.get("type") == "voice_stopped" and isinstance(ev.get("utterance"), int):
            n = ev["utterance"]
            self._core.expect(f"{self.stream_id}-u{n}", lambda item, n=n: self._utterance(n, item))
        self._queue.put(ev)

    def _utterance(self, n: int, item: Any) -> None:
        if isinstance(item, dict) and item.get("type") == "result":
            self._queue.put({"type": "transcript", "utterance": n, "text": item.get("text", ""),
                             "tokens": item.get("tokens", [])})
        elif isinstance(item, BaseException) or (isinstance(item, dict) and item.get("type") == "error"):
            self._queue.put({"type": "transcript_error", "utterance": n, "error": item_error(item)})

    def _next(self, timeout: float | None) -> Any:
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            raise RequestTimeoutError(f"audio stream {self.stream_id}: nothing from the device within "
                                      f"{timeout} s") from None

    def send(self, audio: Any) -> None:
        """Push audio: float32 samples at 16 kHz, or PCM16 little-endian bytes (one chunk)."""
        if self.closed:
            raise ValueError(f"audio stream {self.stream_id} is closed")
        if not isinstance(audio, (bytes, bytearray, memoryview)):
            import numpy as np

            audio = (np.clip(np.asarray(audio, dtype=np.float32), -1, 1) * 32767).astype("<i2").tobytes()
        self._core.publish_binary("audio_stream", {"v": 1, "request_id": self.stream_id, "action": "chunk",
                                                   "seq": self._seq}, bytes(audio), STREAM_AUDIO_MIME)
        self._seq += 1

    def events(self, timeout: float | None = 30.0) -> Iterator[dict]:
        """Events until ``stream_closed`` and the transcript of every utterance it announced
        (then the iterator ends); RequestTimeoutError if the device says nothing for ``timeout``
        seconds."""
        announced, finished = set(), set()
        while not (self.closed and announced <= finished):
            ev = self._next(timeout)
            if isinstance(ev, BaseException):
                raise ev
            kind = ev.get("type")
            if kind == "voice_stopped":
                announced.add(ev.get("utterance"))
            elif kind in ("transcript", "transcript_error"):
                finished.add(ev.get("utterance"))
            elif kind == "stream_closed":
                self.closed = True
            yield ev

    def close(self) -> None:
        """Ask the device to end the stream (speech in progress is still transcribed); read the
        remaining events with ``events()``."""
        if not self.closed:
            self._core.publish_request("audio_stream", {"v": 1, "request_id": self.stream_id, "action": "close"})

    def __enter__(self) -> AudioStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
