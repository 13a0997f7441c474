"""``Client``: the synchronous SDK for one device.

    from edge_sdk import Client
    with Client(host="localhost", port=1883, device_id="jetson") as c:
        print(c.chat("Hello!", max_tokens=32, seed=0).text)
        for delta in c.chat([{"role": "user", "content": "Count to 5"}], stream=True):
            print(delta.text, end="", flush=True)

A call builds its payload (payloads.py), submits it on the connection (connection.py) and reads
the events from its queue (streams.py, jobs.py, audio_stream.py).
"""

from __future__ import annotations

import queue
from typing import Any, Iterable

from edge_sdk.client.audio_stream import AudioStream
from edge_sdk.client.connection import Connection
from edge_sdk.client.payloads import (build_chat_payload, build_listen_payload, build_snapshot_payload,
                                      build_transcribe_payload, build_watch_payload, prepare_media, snapshot_bytes)
from edge_sdk.client.settings import ConnectionSettings
from edge_sdk.client.streams import ChatResult, ChatStream
from edge_sdk.client.jobs import LISTEN, WATCH, JobHandle, register_job
from edge_sdk.protocol.models import Capabilities


class Client:
    """A synchronous client for one device. Thread-safe: several threads may chat at once."""

    def __init__(self, host: str = "localhost", port: int = 1883, device_id: str | None = None, **options: Any):
        """Connect to the broker (``BrokerConnectionError`` if it cannot). ``device_id`` None:
        discover the one device under ``prefix``. ``options``: the other ``ConnectionSettings``
        fields (``username``, ``password``, ``prefix``, TLS files, ``timeout``: the default
        per-request timeout in s, ...)."""
        self._st = ConnectionSettings(host=host, port=port, device_id=device_id, **options)
        self._core = Connection(self._st)
        self._core.connect()

    @property
    def device_id(self) -> str:
        return self._core.topics.device_id

    @property
    def client_id(self) -> str:
        return self._core.client_id

    @property
    def status(self) -> str | None:
        """The device's last known status: 'online', 'stopping', 'offline' or None (unknown)."""
        return self._core.status

    def wait_status(self, timeout: float = 2.0) -> str | None:
        """The device's status, waiting up to ``timeout`` s while it is still unknown."""
        return self._core.wait_status(timeout)

    def capabilities(self, timeout: float = 5.0) -> Capabilities:
        """The device's retained capabilities (model, modalities, limits, schema version)."""
        return self._core.capabilities(timeout)

    def chat(self, messages: str | Iterable[Any] | None = None, *, prompt: str | list[int] | None = None,
             max_tokens: int | None = None, temperature: float | None = None, top_p: float | None = None,
             top_k: int | None = None, seed: int | None = None, stop: list[str] | None = None,
             stream: bool = False, timeout: float | None = None, deadline: float | None = None,
             priority: int | None = None, request_id: str | None = None,
             model: str | None = None) -> ChatResult | ChatStream:
        """Run a chat request. ``messages``: a string (one user turn) or [{"role", "content"}].
        ``model``: which of the device's models (capabilities().models); default: routed by media.
        ``stream=False`` returns the ``ChatResult``; ``stream=True`` a ``ChatStream`` of deltas.
        ``timeout`` (s) bounds the wait here; ``deadline`` (s) makes the device stop generating
        (finish_reason 'deadline'). Raises BusyError, BadRequestError, DeviceOfflineError,
        RequestTimeoutError, ServerError."""
        timeout = self._st.timeout if timeout is None else timeout
        payload = build_chat_payload(messages, prompt=prompt, request_id=request_id, max_tokens=max_tokens,
                                     temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, stop=stop,
                                     stream=stream, deadline=deadline, priority=priority, model=model)
        payload, attachment = prepare_media(payload)
        q: queue.Queue = queue.Queue()
        p = self._core.submit(payload, q.put, timeout, attachment=attachment)
        s = ChatStream(self._core, p, q, timeout)
        return s if stream else s.wait()

    def transcribe(self, audio: Any, *, language: str | None = None, mime: str | None = None,
                   max_tokens: int | None = None, stream: bool = False, timeout: float | None = None,
                   deadline: float | None = None, priority: int | None = None,
                   request_id: str | None = None, model: str | None = None) -> ChatResult | ChatStream:
        """Speech to text on a device with an audio model. ``audio``: a WAV/FLAC/OGG path or its
        bytes, raw PCM16 bytes with ``mime`` (``audio/pcm;rate=16000``), or 16 kHz float32
        samples; sent as the MQTT 5 binary payload. Returns the ``ChatResult`` (its ``text`` is
        the transcript), or with ``stream=True`` a ``ChatStream``. Raises InvalidAudioError for
        audio the device cannot decode, UnsupportedMediaError on a device without audio."""
        timeout = self._st.timeout if timeout is None else timeout
        payload, attachment = build_transcribe_payload(audio, mime=mime, language=language, request_id=request_id,
                                                       max_tokens=max_tokens, stream=stream, deadline=deadline,
                                                       priority=priority, model=model)
        q: queue.Queue = queue.Queue()
        p = self._core.submit(payload, q.put, timeout, op="transcribe", attachment=attachment)
        s = ChatStream(self._core, p, q, timeout)
        return s if stream else s.wait()

    def audio_stream(self, *, language: str | None = None, end_silence_ms: int | None = None,
                     max_utterance_s: float | None = None, max_tokens: int | None = None,
                     model: str | None = None, timeout: float = 10.0) -> AudioStream:
        """Open a live audio stream (a device with audio and VAD): ``send`` audio, read ``events()``."""
        return AudioStream(self._core, language=language, end_silence_ms=end_silence_ms,
                           max_utterance_s=max_utterance_s, max_tokens=max_tokens, model=model, timeout=timeout)

    def listen(self, microphone: str, *, language: str | None = None, end_silence_ms: int | None = None,
               max_utterance_s: float | None = None, max_tokens: int | None = None, priority: int | None = None,
               expires: float | None = None, model: str | None = None, job_id: str | None = None,
               timeout: float | None = None, event_timeout: float | None = None) -> JobHandle:
        """Transcribe what the device's microphone ``microphone`` hears, utterance by utterance,
        until cancelled or ``expires`` seconds passed. Returns a ``JobHandle`` yielding
        ``ListenVoice`` (voice_started / voice_stopped), ``ListenTranscript`` and ``ListenError``."""
        payload = build_listen_payload(microphone, language=language, end_silence_ms=end_silence_ms,
                                       max_utterance_s=max_utterance_s, max_tokens=max_tokens, priority=priority,
                                       expires=expires, job_id=job_id, model=model)
        return self._register(JobHandle(self._core, LISTEN, payload, event_timeout), payload, timeout)

    def cancel_listen(self, job_id: str) -> None:
        """End a listen job of this client name."""
        self._core.publish_request("listen_cancel", {"v": 1, "job_id": job_id})

    def cancel(self, request_id: str) -> None:
        """Ask the device to stop a request (harmless if it is unknown or finished)."""
        self._core.cancel(request_id)

    def snapshot(self, camera: str, *, max_side: int | None = None, timeout: float | None = None) -> bytes:
        """The newest frame of the device's camera ``camera`` as JPEG bytes (scaled to fit
        ``max_side``, default the device's snapshot_max_side). Raises UnsupportedMediaError for an
        unknown camera, CameraUnavailableError when it has no fresh frame."""
        payload = build_snapshot_payload(camera, max_side)
        return snapshot_bytes(self._core.request("snapshot", payload, self._st.timeout if timeout is None else timeout))

    def watch(self, camera: str, prompt: str, *, every: float, on_change: bool = False,
              change_threshold: float | None = None, max_tokens: int | None = None, temperature: float | None = None,
              seed: int | None = None, expires: float | None = None, persistent: bool = False,
              system: str | None = None, job_id: str | None = None, model: str | None = None,
              timeout: float | None = None, event_timeout: float | None = None) -> JobHandle:
        """Ask ``prompt`` about camera ``camera`` every ``every`` seconds (``on_change``: only when
        the scene changed, at most that often) until cancelled or ``expires`` seconds passed.
        ``persistent``: the job survives a daemon restart. Returns a ``JobHandle`` to iterate
        (``event_timeout``: how long iteration waits for each event; None: forever)."""
        payload = build_watch_payload(camera, prompt, every=every, on_change=on_change,
                                      change_threshold=change_threshold, max_tokens=max_tokens,
                                      temperature=temperature, seed=seed, expires=expires, persistent=persistent,
                                      system=system, job_id=job_id, model=model)
        return self._register(JobHandle(self._core, WATCH, payload, event_timeout), payload, timeout)

    def _register(self, handle: JobHandle, payload: dict, timeout: float | None) -> JobHandle:
        register_job(self._core, handle, payload, self._st.timeout if timeout is None else min(timeout, self._st.timeout))
        return handle

    def cancel_watch(self, job_id: str) -> None:
        """End a watch job of this client name (e.g. a persistent one from an earlier run)."""
        self._core.publish_request("watch_cancel", {"v": 1, "job_id": job_id})

    def close(self) -> None:
        self._core.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

