"""Jobs that run on the device and publish on their own events topic — watch jobs (a camera) and
listen jobs (a microphone) — from the client side: ``JobHandle`` / ``AsyncJobHandle`` iterate one
job's events (subscribed before the job is registered, so none is missed). ``JobKind`` holds
what differs between the two kinds: ops, topic, event models."""

from __future__ import annotations

import asyncio
import queue
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Iterator

from edge_sdk.client.connection import Connection
from edge_sdk.client.errors import DeviceOfflineError, RequestTimeoutError, read_event
from edge_sdk.client.streams import threadsafe_putter
from edge_sdk.protocol.models import (ListenEnd, ListenError, ListenRegistered, ListenTranscript, ListenVoice, WatchEnd,
                                      WatchError, WatchEvent, WatchRegistered)
from edge_sdk.protocol.topics import Topics


@dataclass(frozen=True)
class JobKind:
    op: str  # the request that registers a job
    cancel_op: str
    source: str  # the payload field naming the camera or microphone
    events: dict[str, type]  # event type -> its model (the end event among them)
    end: type
    registered: type
    topic: Callable[[Topics, str, str, str], str]  # (topics, source, client, job_id) -> events topic


WATCH = JobKind("watch", "watch_cancel", "camera", {"watch": WatchEvent, "watch_error": WatchError, "watch_end": WatchEnd},
                WatchEnd, WatchRegistered, Topics.watch_events)
LISTEN = JobKind("listen", "listen_cancel", "microphone",
                 {"voice_started": ListenVoice, "voice_stopped": ListenVoice, "transcript": ListenTranscript,
                  "listen_error": ListenError, "listen_end": ListenEnd}, ListenEnd, ListenRegistered,
                 Topics.listen_events)


class _JobBase:
    """What the sync and async job handles share: subscription, registration, cancel and the
    handling of each queued item; only the wait for the next item differs."""

    _q: Any  # the subclass's queue (queue.Queue or asyncio.Queue), made before this __init__ runs

    def __init__(self, core: Connection, kind: JobKind, payload: dict, deliver: Callable[[Any], None],
                 event_timeout: float | None):
        self._core = core
        self.kind = kind
        self.event_timeout = event_timeout
        self.end: Any = None
        self.job_id: str = payload["request_id"]
        self.source: str = payload[kind.source]
        self.persistent: bool = payload.get("persistent", False)
        self.events_topic = kind.topic(core.topics, self.source, core.name, self.job_id)
        self.registration: Any = None
        self._deliver = deliver
        self._finished = False
        self._listening = False

    def _on_offline(self) -> None:
        if not self.persistent and not self._finished:
            self._deliver(DeviceOfflineError(f"device {self._core.topics.device_id!r} went offline; "
                                             f"{self.kind.op} job {self.job_id} is gone", code="offline", status=503))

    def _listen(self, timeout: float) -> None:
        self._core.add_subscription(self.events_topic, self._deliver, timeout)
        self._core.add_offline_listener(self._on_offline)
        self._core.add_close_hook(self._on_client_close)
        self._listening = True

    def _stop_listening(self) -> None:
        if self._listening:
            self._listening = False
            self._core.remove_subscription(self.events_topic)
            self._core.remove_offline_listener(self._on_offline)
            self._core.remove_close_hook(self._on_client_close)

    def _on_client_close(self) -> None:
        """Closing the client cancels a non-persistent job and ends the iteration."""
        if not self.persistent:
            self._send_cancel()
        self._deliver(None)

    def _send_cancel(self) -> None:
        self._core.publish_request(self.kind.cancel_op, {"v": 1, "job_id": self.job_id})

    def _detach(self) -> None:
        self._stop_listening()
        if not self._finished:
            self._q.put_nowait(None)  # wakes a waiting get(), which then ends the iteration

    def _no_event(self, timeout: float | None) -> RequestTimeoutError:
        return RequestTimeoutError(f"no {self.kind.op} event for job {self.job_id} within {timeout} s",
                                   request_id=self.job_id, code="timeout")

    def _take(self, item: Any) -> Any:
        """Handle one queued item: the event to return, or None (skipped, or the end: then
        ``_finished`` is set). Raises a delivered exception (offline, client closed)."""
        if item is None:  # detach() or the client closed
            self._finished = True
            return None
        if isinstance(item, BaseException):
            self._finished = True
            self._stop_listening()
            raise item
        model = self.kind.events.get(item.get("type")) if isinstance(item.get("type"), str) else None
        if model is None:  # a newer daemon's event type: skipped
            return None
        ev = read_event(model, item, self.job_id)
        if isinstance(ev, self.kind.end):
            self.end = ev
            self._finished = True
            self._stop_listening()
            return None
        return ev


class JobHandle(_JobBase):
    """Events of one job: ``for ev in handle`` yields a watch job's ``WatchEvent`` (an answer) and
    ``WatchError`` (a tick that failed, e.g. the camera was lost; the job goes on), or a listen
    job's ``ListenVoice``, ``ListenTranscript`` and ``ListenError``, until the job ends (expired,
    cancelled elsewhere: ``end`` holds its last event) or ``cancel()``. ``get(timeout)`` waits for
    one event. Leaving a ``with`` block cancels the job; ``detach()`` stops listening and leaves it
    running."""

    def __init__(self, core: Connection, kind: JobKind, payload: dict, event_timeout: float | None):
        self._q: queue.Queue = queue.Queue()
        super().__init__(core, kind, payload, self._q.put, event_timeout)

    def get(self, timeout: float | None = None) -> Any:
        """The next event; RequestTimeoutError if none within ``timeout``; StopIteration at the end."""
        while not self._finished:
            try:
                item = self._q.get(timeout=timeout)
            except queue.Empty:
                raise self._no_event(timeout) from None
            ev = self._take(item)
            if ev is not None:
                return ev
        raise StopIteration

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        return self.get(self.event_timeout)

    def cancel(self) -> None:
        """End the job on the device (idempotent); iteration stops at once."""
        self._send_cancel()
        self.detach()

    def detach(self) -> None:
        """Stop listening; the job keeps running on the device (e.g. a persistent one)."""
        self._detach()

    def __enter__(self) -> "JobHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.cancel()


class AsyncJobHandle(_JobBase):
    """``async for ev in handle``; ``await handle.get(timeout)``; ``await handle.cancel()``."""

    def __init__(self, core: Connection, kind: JobKind, payload: dict, loop: asyncio.AbstractEventLoop,
                 event_timeout: float | None):
        self._q: asyncio.Queue = asyncio.Queue()
        super().__init__(core, kind, payload, threadsafe_putter(loop, self._q), event_timeout)

    async def get(self, timeout: float | None = None) -> Any:
        while not self._finished:
            try:
                item = await asyncio.wait_for(self._q.get(), timeout=timeout)
            except asyncio.TimeoutError:
                raise self._no_event(timeout) from None
            ev = self._take(item)
            if ev is not None:
                return ev
        raise StopAsyncIteration

    def __aiter__(self) -> AsyncIterator[Any]:
        return self

    async def __anext__(self) -> Any:
        return await self.get(self.event_timeout)

    async def cancel(self) -> None:
        self._send_cancel()
        await self.detach()

    async def detach(self) -> None:
        self._detach()

    async def __aenter__(self) -> "AsyncJobHandle":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.cancel()


def register_job(core: Connection, handle: _JobBase, payload: dict, timeout: float) -> None:
    """Subscribe the events topic, then register the job (so no event can be missed)."""
    handle._listen(timeout)
    try:
        ev = core.request(handle.kind.op, payload, timeout)
    except BaseException:
        handle._stop_listening()
        raise
    handle.registration = read_event(handle.kind.registered, ev, handle.job_id)
