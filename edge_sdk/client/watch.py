"""Watch jobs from the client side: ``WatchHandle`` / ``AsyncWatchHandle`` iterate one job's
events (subscribed before the job is registered, so none is missed)."""

from __future__ import annotations

import asyncio
import queue
from typing import Any, AsyncIterator, Callable, Iterator

from edge_sdk.client.connection import Connection
from edge_sdk.client.errors import DeviceOfflineError, RequestTimeoutError, read_event
from edge_sdk.client.streams import threadsafe_putter
from edge_sdk.protocol.models import WatchEnd, WatchError, WatchEvent, WatchRegistered


_WATCH_EVENTS = {"watch": WatchEvent, "watch_error": WatchError, "watch_end": WatchEnd}


def _watch_item(ev: dict, job_id: str) -> Any:
    """The typed watch event of ``ev`` (None for an unknown type; ProtocolError if malformed)."""
    model = _WATCH_EVENTS.get(ev.get("type")) if isinstance(ev.get("type"), str) else None
    return read_event(model, ev, job_id) if model is not None else None


class _WatchBase:
    """What the sync and async watch handles share: subscription, registration, cancel and the
    handling of each queued item; only the wait for the next item differs."""

    _q: Any  # the subclass's queue (queue.Queue or asyncio.Queue), made before this __init__ runs

    def __init__(self, core: Connection, payload: dict, deliver: Callable[[Any], None], event_timeout: float | None):
        self._core = core
        self.event_timeout = event_timeout
        self.end: WatchEnd | None = None
        self.job_id: str = payload["request_id"]
        self.camera: str = payload["camera"]
        self.persistent: bool = payload["persistent"]
        self.events_topic = core.topics.watch_events(self.camera, core.name, self.job_id)
        self.registration: WatchRegistered | None = None
        self._deliver = deliver
        self._finished = False
        self._listening = False

    def _on_offline(self) -> None:
        if not self.persistent and not self._finished:
            self._deliver(DeviceOfflineError(f"device {self._core.topics.device_id!r} went offline; "
                                             f"watch job {self.job_id} is gone", code="offline", status=503))

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
        self._core.publish_request("watch_cancel", {"v": 1, "job_id": self.job_id})

    def _detach(self) -> None:
        self._stop_listening()
        if not self._finished:
            self._q.put_nowait(None)  # wakes a waiting get(), which then ends the iteration

    def _no_event(self, timeout: float | None) -> RequestTimeoutError:
        return RequestTimeoutError(f"no watch event for job {self.job_id} within {timeout} s",
                                   request_id=self.job_id, code="timeout")

    def _take(self, item: Any) -> WatchEvent | WatchError | None:
        """Handle one queued item: the event to return, or None (skipped, or the end: then
        ``_finished`` is set). Raises a delivered exception (offline, client closed)."""
        if item is None:  # detach() or the client closed
            self._finished = True
            return None
        if isinstance(item, BaseException):
            self._finished = True
            self._stop_listening()
            raise item
        ev = _watch_item(item, self.job_id)
        if isinstance(ev, WatchEnd):
            self.end = ev
            self._finished = True
            self._stop_listening()
            return None
        return ev


class WatchHandle(_WatchBase):
    """Events of one watch job: ``for ev in handle`` yields ``WatchEvent`` (an answer) and
    ``WatchError`` (a tick that failed, e.g. the camera was lost; the job goes on) until the job
    ends (expired, cancelled elsewhere) or ``cancel()``. ``get(timeout)`` waits for one event.
    Leaving a ``with`` block cancels the job; ``detach()`` stops listening and leaves it running."""

    def __init__(self, core: Connection, payload: dict, event_timeout: float | None):
        self._q: queue.Queue = queue.Queue()
        super().__init__(core, payload, self._q.put, event_timeout)

    def get(self, timeout: float | None = None) -> WatchEvent | WatchError:
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

    def __iter__(self) -> Iterator[WatchEvent | WatchError]:
        return self

    def __next__(self) -> WatchEvent | WatchError:
        return self.get(self.event_timeout)

    def cancel(self) -> None:
        """End the job on the device (idempotent); iteration stops at once."""
        self._send_cancel()
        self.detach()

    def detach(self) -> None:
        """Stop listening; the job keeps running on the device (e.g. a persistent one)."""
        self._detach()

    def __enter__(self) -> "WatchHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.cancel()


class AsyncWatchHandle(_WatchBase):
    """``async for ev in handle``; ``await handle.get(timeout)``; ``await handle.cancel()``."""

    def __init__(self, core: Connection, payload: dict, loop: asyncio.AbstractEventLoop, event_timeout: float | None):
        self._q: asyncio.Queue = asyncio.Queue()
        super().__init__(core, payload, threadsafe_putter(loop, self._q), event_timeout)

    async def get(self, timeout: float | None = None) -> WatchEvent | WatchError:
        while not self._finished:
            try:
                item = await asyncio.wait_for(self._q.get(), timeout=timeout)
            except asyncio.TimeoutError:
                raise self._no_event(timeout) from None
            ev = self._take(item)
            if ev is not None:
                return ev
        raise StopAsyncIteration

    def __aiter__(self) -> AsyncIterator[WatchEvent | WatchError]:
        return self

    async def __anext__(self) -> WatchEvent | WatchError:
        return await self.get(self.event_timeout)

    async def cancel(self) -> None:
        self._send_cancel()
        await self.detach()

    async def detach(self) -> None:
        self._detach()

    async def __aenter__(self) -> "AsyncWatchHandle":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.cancel()


def register_watch(core: Connection, handle: _WatchBase, payload: dict, timeout: float) -> None:
    """Subscribe the events topic, then register the job (so no event can be missed)."""
    handle._listen(timeout)
    try:
        ev = core.request("watch", payload, timeout)
    except BaseException:
        handle._stop_listening()
        raise
    handle.registration = read_event(WatchRegistered, ev, handle.job_id)
