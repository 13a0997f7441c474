"""The stream of one chat request: ``ChatStream`` (iterate it) and ``AsyncChatStream`` (``async
for``). Both read the items the connection delivers to their queue; only the wait differs."""

from __future__ import annotations

import asyncio
import logging
import queue
import time
from typing import Any, AsyncIterator, Callable, Iterator

from edge_sdk.client.connection import Connection, Pending, item_error
from edge_sdk.client.errors import ProtocolError, RequestTimeoutError, read_event
from edge_sdk.protocol.models import Delta, Result

log = logging.getLogger("edge_sdk.client")

ChatResult = Result
ChatDelta = Delta


def threadsafe_putter(loop: asyncio.AbstractEventLoop, q: asyncio.Queue) -> Callable[[Any], None]:
    """A deliver callback for paho's thread that puts items on an asyncio queue of ``loop``."""

    def deliver(item, _loop=loop, _q=q):
        try:
            _loop.call_soon_threadsafe(_q.put_nowait, item)
        except RuntimeError:  # loop closed
            pass

    return deliver


class _StreamBase:
    """What ``ChatStream`` and ``AsyncChatStream`` share: the deadline, the handling of each queued
    event and cancel/close; only the wait for the next item (queue.get or asyncio.wait_for) differs."""

    def __init__(self, core: Connection, pending: Pending, q: Any, timeout: float):
        self._core = core
        self._p = pending
        self._q = q
        self._deadline = time.monotonic() + timeout
        self._timeout = timeout
        self.request_id = pending.request_id
        self.result: ChatResult | None = None
        self.queue_position: int | None = None
        self._finished = False
        self._seen_text = ""
        self._seen_tokens = 0

    def _left(self) -> float:
        """Seconds left before the request times out (never negative)."""
        return max(0.0, self._deadline - time.monotonic())

    def _timed_out(self) -> RequestTimeoutError:
        """End the stream after its deadline passed: forget and cancel the request."""
        self._finished = True
        self._core.forget(self.request_id)
        self._core.cancel(self.request_id)
        return RequestTimeoutError(f"no final answer for {self.request_id} within {self._timeout:.1f} s",
                                   request_id=self.request_id, code="timeout")

    def _take(self, item: Any) -> ChatDelta | None:
        """Handle one queued item: a delta to return, or None ('accepted', or the result: then
        ``_finished`` is set). Raises the error an item stands for."""
        err = item_error(item)
        if err is not None:
            self._finished = True
            raise err
        kind = item.get("type")
        if kind == "accepted":
            position = item.get("queue_position")
            self.queue_position = position if isinstance(position, int) else None
        elif kind == "delta":
            try:
                delta = read_event(Delta, item, self.request_id)
            except ProtocolError as e:  # the result carries the whole answer: skip this one
                log.warning("skipped a delta of %s: %s", self.request_id, e)
                return None
            self._seen_text += delta.text
            self._seen_tokens += len(delta.tokens)
            return delta
        elif kind == "result":
            self._finished = True
            self.result = read_event(Result, item, self.request_id)
            return self._rest_of_answer()
        return None

    def _rest_of_answer(self) -> ChatDelta | None:
        """Deltas travel at QoS 0 and may be lost or overtaken by the result: when what arrived
        is the start of the answer, the rest becomes one last delta, so iterating a stream always
        yields the whole text (a gap in the middle cannot be mended; the result still has it)."""
        r = self.result
        if not r.text.startswith(self._seen_text) or self._seen_tokens > len(r.tokens):
            log.debug("stream %s missed deltas in the middle; the result has the whole answer", self.request_id)
            return None
        text, tokens = r.text[len(self._seen_text):], r.tokens[self._seen_tokens:]
        if not text and not tokens:
            return None
        return Delta(request_id=r.request_id, seq=r.seq, text=text, tokens=tokens)

    def cancel(self) -> None:
        """Ask the device to stop; the stream then ends with finish_reason 'cancelled'."""
        if not self._finished:
            self._core.cancel(self.request_id)

    def _close(self) -> None:
        if not self._finished:
            self._finished = True
            self._core.forget(self.request_id)
            self._core.cancel(self.request_id)


class ChatStream(_StreamBase):
    """Iterator over a request's ``ChatDelta``s; ``.result`` holds the ``ChatResult`` afterwards.
    Closing it early (or leaving a ``with`` block) cancels the request on the device."""

    def __iter__(self) -> Iterator[ChatDelta]:
        return self

    def __next__(self) -> ChatDelta:
        while not self._finished:
            try:
                item = self._q.get(timeout=self._left())
            except queue.Empty:
                raise self._timed_out() from None
            delta = self._take(item)
            if delta is not None:
                return delta
        raise StopIteration

    def wait(self) -> ChatResult:
        """Consume the rest of the stream and return the final result."""
        for _ in self:
            pass
        assert self.result is not None
        return self.result

    @property
    def text(self) -> str | None:
        return self.result.text if self.result else None

    def close(self) -> None:
        self._close()

    def __enter__(self) -> "ChatStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass



class AsyncChatStream(_StreamBase):
    """``async for delta in stream``; ``.result`` afterwards. ``await stream.aclose()`` cancels."""

    def __aiter__(self) -> AsyncIterator[ChatDelta]:
        return self

    async def __anext__(self) -> ChatDelta:
        while not self._finished:
            try:
                item = await asyncio.wait_for(self._q.get(), timeout=self._left())
            except asyncio.TimeoutError:
                raise self._timed_out() from None
            delta = self._take(item)
            if delta is not None:
                return delta
        raise StopAsyncIteration

    async def wait(self) -> ChatResult:
        async for _ in self:
            pass
        assert self.result is not None
        return self.result

    async def aclose(self) -> None:
        self._close()

    async def __aenter__(self) -> "AsyncChatStream":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

