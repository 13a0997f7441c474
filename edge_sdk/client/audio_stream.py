"""A live audio stream to a device: push microphone audio, read voice events and transcripts.

``Client.audio_stream()`` opens an ``AudioStream``; ``send`` pushes 16 kHz mono audio (float32
samples or PCM16 little-endian bytes) as chunks, ``events()`` yields what the device says:
``voice_started``, ``voice_stopped``, then a ``transcript`` per utterance (``text``, ``tokens``,
``utterance``), and finally ``stream_closed``. ``AsyncClient.audio_stream()`` opens an
``AsyncAudioStream``: the same, with ``async for ev in stream.events()``. A client that vanishes
is cleaned up by the device (its Last Will).
"""

from __future__ import annotations

import asyncio
import queue
import uuid
from typing import Any, AsyncIterator, Callable, Iterator

from edge_sdk.client.connection import Connection, item_error
from edge_sdk.client.errors import RequestTimeoutError
from edge_sdk.client.streams import threadsafe_putter
from edge_sdk.protocol.models import STREAM_AUDIO_MIME


def _open_payload(stream_id: str, **options: Any) -> dict:
    payload: dict[str, Any] = {"v": 1, "request_id": stream_id, "action": "open"}
    payload.update({k: v for k, v in options.items() if v is not None})
    return payload


def _pcm16(audio: Any) -> bytes:
    """float32 samples -> PCM16 little-endian bytes; bytes pass as they are."""
    if isinstance(audio, (bytes, bytearray, memoryview)):
        return bytes(audio)
    from edge_sdk.media.audio import to_pcm16

    return to_pcm16(audio)


class _AudioStreamBase:
    """What the sync and async streams share: opening, the utterances' transcripts, sending and
    the bookkeeping of which transcripts are still due; only the wait for an event differs."""

    def __init__(self, core: Connection, deliver: Callable[[Any], None], stream_id: str | None):
        self._core = core
        self._put = deliver
        self.stream_id = stream_id or f"as-{uuid.uuid4().hex[:16]}"
        self._seq = 0
        self.closed = False
        self._announced: set[int] = set()
        self._finished: set[int] = set()

    def _open(self, timeout: float, options: dict) -> None:
        self._core.submit(_open_payload(self.stream_id, **options), self._deliver, timeout, op="audio_stream")

    def _opened(self, first: Any) -> None:
        """Check the first event; raises what the device refused."""
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
        self._put(ev)

    def _utterance(self, n: int, item: Any) -> None:
        if isinstance(item, dict) and item.get("type") == "result":
            self._put({"type": "transcript", "utterance": n, "text": item.get("text", ""),
                       "tokens": item.get("tokens", [])})
        elif isinstance(item, BaseException) or (isinstance(item, dict) and item.get("type") == "error"):
            self._put({"type": "transcript_error", "utterance": n, "error": item_error(item)})

    def _no_event(self, timeout: float | None) -> RequestTimeoutError:
        return RequestTimeoutError(f"audio stream {self.stream_id}: nothing from the device within {timeout} s")

    @property
    def _done(self) -> bool:
        """Closed, and every announced utterance has its transcript."""
        return self.closed and self._announced <= self._finished

    def _take(self, ev: Any) -> dict:
        """Book one event; raises a delivered exception."""
        if isinstance(ev, BaseException):
            raise ev
        kind = ev.get("type")
        if kind == "voice_stopped":
            self._announced.add(ev.get("utterance"))
        elif kind in ("transcript", "transcript_error"):
            self._finished.add(ev.get("utterance"))
        elif kind == "stream_closed":
            self.closed = True
        return ev

    def _send(self, audio: Any) -> None:
        if self.closed:
            raise ValueError(f"audio stream {self.stream_id} is closed")
        self._core.publish_binary("audio_stream", {"v": 1, "request_id": self.stream_id, "action": "chunk",
                                                   "seq": self._seq}, _pcm16(audio), STREAM_AUDIO_MIME)
        self._seq += 1

    def _close(self) -> None:
        if not self.closed:
            self._core.publish_request("audio_stream", {"v": 1, "request_id": self.stream_id, "action": "close"})


class AudioStream(_AudioStreamBase):
    def __init__(self, core: Connection, *, timeout: float = 10.0, stream_id: str | None = None, **options: Any):
        """Open the stream; ``options``: language, end_silence_ms, max_utterance_s, max_tokens, model."""
        self._queue: queue.Queue = queue.Queue()
        super().__init__(core, self._queue.put, stream_id)
        self._open(timeout, options)
        self._opened(self._next(timeout))

    def _next(self, timeout: float | None) -> Any:
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            raise self._no_event(timeout) from None

    def send(self, audio: Any) -> None:
        """Push audio: float32 samples at 16 kHz, or PCM16 little-endian bytes (one chunk)."""
        self._send(audio)

    def events(self, timeout: float | None = 30.0) -> Iterator[dict]:
        """Events until ``stream_closed`` and the transcript of every utterance it announced
        (then the iterator ends); RequestTimeoutError if the device says nothing for ``timeout``
        seconds."""
        while not self._done:
            yield self._take(self._next(timeout))

    def close(self) -> None:
        """Ask the device to end the stream (speech in progress is still transcribed); read the
        remaining events with ``events()``."""
        self._close()

    def __enter__(self) -> AudioStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncAudioStream(_AudioStreamBase):
    """``stream = await AsyncAudioStream.open(core, ...)``; ``await stream.send(samples)``;
    ``async for ev in stream.events()``; ``await stream.close()``."""

    def __init__(self, core: Connection, loop: asyncio.AbstractEventLoop, stream_id: str | None = None):
        self._queue: asyncio.Queue = asyncio.Queue()
        super().__init__(core, threadsafe_putter(loop, self._queue), stream_id)

    @classmethod
    async def open(cls, core: Connection, *, timeout: float = 10.0, stream_id: str | None = None,
                   **options: Any) -> AsyncAudioStream:
        loop = asyncio.get_running_loop()
        stream = cls(core, loop, stream_id)
        await loop.run_in_executor(None, stream._open, timeout, options)
        stream._opened(await stream._next(timeout))
        return stream

    async def _next(self, timeout: float | None) -> Any:
        try:
            return await asyncio.wait_for(self._queue.get(), timeout=timeout)
        except asyncio.TimeoutError:
            raise self._no_event(timeout) from None

    async def send(self, audio: Any) -> None:
        self._send(audio)  # paho queues it: nothing here blocks

    async def events(self, timeout: float | None = 30.0) -> AsyncIterator[dict]:
        while not self._done:
            yield self._take(await self._next(timeout))

    async def close(self) -> None:
        self._close()

    async def __aenter__(self) -> AsyncAudioStream:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
