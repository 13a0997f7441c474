"""``AsyncClient``: the asyncio twin of ``Client``. paho runs in its own thread; events reach the
event loop with ``call_soon_threadsafe``; blocking waits run in the loop's executor."""

from __future__ import annotations

import asyncio
from typing import Any, Iterable

from edge_sdk.client.audio_stream import AsyncAudioStream
from edge_sdk.client.connection import Connection
from edge_sdk.client.jobs import LISTEN, WATCH, AsyncJobHandle, JobKind, register_job
from edge_sdk.client.payloads import (build_chat_payload, build_listen_payload, build_snapshot_payload,
                                      build_transcribe_payload, build_watch_payload, prepare_media, snapshot_bytes)
from edge_sdk.client.settings import ConnectionSettings
from edge_sdk.client.streams import AsyncChatStream, ChatResult, threadsafe_putter
from edge_sdk.protocol.models import Capabilities


class AsyncClient:
    """The asyncio twin of ``Client``: ``async with AsyncClient(...) as c: await c.chat(...)``.
    paho runs in its own thread; events reach the event loop with call_soon_threadsafe."""

    def __init__(self, host: str = "localhost", port: int = 1883, device_id: str | None = None, **options: Any):
        """As ``Client``; connects on ``connect()`` or ``async with``."""
        self._st = ConnectionSettings(host=host, port=port, device_id=device_id, **options)
        self._core: Connection | None = None

    async def connect(self) -> "AsyncClient":
        if self._core is None:
            def _mk():
                core = Connection(self._st)
                core.connect()
                return core
            self._core = await asyncio.get_running_loop().run_in_executor(None, _mk)
        return self

    async def _c(self) -> Connection:
        return self._core or (await self.connect())._core

    @property
    def device_id(self) -> str | None:
        return self._core.topics.device_id if self._core else self._st.device_id

    @property
    def status(self) -> str | None:
        return self._core.status if self._core else None

    async def capabilities(self, timeout: float = 5.0) -> Capabilities:
        core = await self._c()
        return await asyncio.get_running_loop().run_in_executor(None, core.capabilities, timeout)

    async def chat(self, messages: str | Iterable[Any] | None = None, *, prompt: str | list[int] | None = None,
                   max_tokens: int | None = None, temperature: float | None = None, top_p: float | None = None,
                   top_k: int | None = None, seed: int | None = None, stop: list[str] | None = None,
                   stream: bool = False, timeout: float | None = None, deadline: float | None = None,
                   priority: int | None = None, request_id: str | None = None,
                   model: str | None = None) -> ChatResult | AsyncChatStream:
        """As ``Client.chat``; with ``stream=True`` returns an ``AsyncChatStream``."""
        core = await self._c()
        timeout = self._st.timeout if timeout is None else timeout
        payload = build_chat_payload(messages, prompt=prompt, request_id=request_id, max_tokens=max_tokens,
                                     temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, stop=stop,
                                     stream=stream, deadline=deadline, priority=priority, model=model)
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        deliver = threadsafe_putter(loop, q)
        if core.status is None:  # waiting for the retained status blocks: do it off the loop
            await loop.run_in_executor(None, core.wait_status, min(self._st.status_wait, timeout))
        payload, attachment = prepare_media(payload)
        p = core.submit(payload, deliver, timeout, attachment=attachment)
        s = AsyncChatStream(core, p, q, timeout)
        return s if stream else await s.wait()

    async def transcribe(self, audio: Any, *, language: str | None = None, mime: str | None = None,
                         max_tokens: int | None = None, stream: bool = False, timeout: float | None = None,
                         deadline: float | None = None, priority: int | None = None,
                         request_id: str | None = None, model: str | None = None) -> ChatResult | AsyncChatStream:
        """As ``Client.transcribe``; with ``stream=True`` returns an ``AsyncChatStream``."""
        core = await self._c()
        timeout = self._st.timeout if timeout is None else timeout
        payload, attachment = build_transcribe_payload(audio, mime=mime, language=language, request_id=request_id,
                                                       max_tokens=max_tokens, stream=stream, deadline=deadline,
                                                       priority=priority, model=model)
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        deliver = threadsafe_putter(loop, q)
        if core.status is None:
            await loop.run_in_executor(None, core.wait_status, min(self._st.status_wait, timeout))
        p = core.submit(payload, deliver, timeout, op="transcribe", attachment=attachment)
        s = AsyncChatStream(core, p, q, timeout)
        return s if stream else await s.wait()

    async def audio_stream(self, *, language: str | None = None, end_silence_ms: int | None = None,
                           max_utterance_s: float | None = None, max_tokens: int | None = None,
                           model: str | None = None, timeout: float = 10.0) -> AsyncAudioStream:
        """As ``Client.audio_stream``: ``await s.send(...)``, ``async for ev in s.events()``."""
        return await AsyncAudioStream.open(await self._c(), language=language, end_silence_ms=end_silence_ms,
                                           max_utterance_s=max_utterance_s, max_tokens=max_tokens, model=model,
                                           timeout=timeout)

    async def cancel(self, request_id: str) -> None:
        (await self._c()).cancel(request_id)

    async def snapshot(self, camera: str, *, max_side: int | None = None, timeout: float | None = None) -> bytes:
        """As ``Client.snapshot``."""
        core = await self._c()
        payload = build_snapshot_payload(camera, max_side)
        t = self._st.timeout if timeout is None else timeout
        ev = await asyncio.get_running_loop().run_in_executor(None, core.request, "snapshot", payload, t)
        return snapshot_bytes(ev)

    async def watch(self, camera: str, prompt: str, *, every: float, on_change: bool = False,
                    change_threshold: float | None = None, max_tokens: int | None = None,
                    temperature: float | None = None, seed: int | None = None, expires: float | None = None,
                    persistent: bool = False, system: str | None = None, job_id: str | None = None,
                    model: str | None = None, timeout: float | None = None,
                    event_timeout: float | None = None) -> AsyncJobHandle:
        """As ``Client.watch``; returns an ``AsyncJobHandle`` (``async for ev in handle``)."""
        payload = build_watch_payload(camera, prompt, every=every, on_change=on_change,
                                      change_threshold=change_threshold, max_tokens=max_tokens,
                                      temperature=temperature, seed=seed, expires=expires, persistent=persistent,
                                      system=system, job_id=job_id, model=model)
        return await self._register(WATCH, payload, timeout, event_timeout)

    async def listen(self, microphone: str, *, language: str | None = None, end_silence_ms: int | None = None,
                     max_utterance_s: float | None = None, max_tokens: int | None = None,
                     priority: int | None = None, expires: float | None = None, model: str | None = None,
                     job_id: str | None = None, timeout: float | None = None,
                     event_timeout: float | None = None) -> AsyncJobHandle:
        """As ``Client.listen``; returns an ``AsyncJobHandle``."""
        payload = build_listen_payload(microphone, language=language, end_silence_ms=end_silence_ms,
                                       max_utterance_s=max_utterance_s, max_tokens=max_tokens, priority=priority,
                                       expires=expires, job_id=job_id, model=model)
        return await self._register(LISTEN, payload, timeout, event_timeout)

    async def _register(self, kind: JobKind, payload: dict, timeout: float | None,
                        event_timeout: float | None) -> AsyncJobHandle:
        core = await self._c()
        loop = asyncio.get_running_loop()
        h = AsyncJobHandle(core, kind, payload, loop, event_timeout)
        t = self._st.timeout if timeout is None else min(timeout, self._st.timeout)
        await loop.run_in_executor(None, register_job, core, h, payload, t)
        return h

    async def close(self) -> None:
        if self._core is not None:
            core, self._core = self._core, None
            await asyncio.get_running_loop().run_in_executor(None, core.close)

    async def __aenter__(self) -> "AsyncClient":
        return await self.connect()

    async def __aexit__(self, *exc) -> None:
        await self.close()

