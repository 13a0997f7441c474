"""Live audio streams: firmware pushes PCM chunks, the daemon finds the utterances with voice
activity detection and transcribes each one (PROTOCOL.md, "Audio streams").

The network thread only checks and queues (``handle``); one audio thread owns every stream's
state: it runs the VAD segmenter on each chunk, publishes voice_started / voice_stopped, hands
each finished utterance to the scheduler as a transcription job (request ``<stream>-u<n>``),
and closes streams that went quiet (``audio_stream_idle_s``), whose client vanished (its Last
Will's cancel-all) or when the daemon stops.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from pydantic import BaseModel

from edge_sdk.media.audio import from_pcm16, to_pcm16
from edge_sdk.protocol.models import STREAM_AUDIO_MIME, AudioSource, AudioStreamRequest, StreamEvent, TranscribeRequest
from edge_sdk.serve.config import ServeSettings
from edge_sdk.serve.scheduler import Job
from edge_sdk.serve.transport import Envelope, Refusal, Reply

log = logging.getLogger("edge_sdk.serve")


def utterance_job(client: str, request_id: str, samples: np.ndarray, language: str | None, max_tokens: int | None,
                  model: str | None, send: Callable[[BaseModel], None], *, reply: Reply | None = None,
                  priority: int = 5) -> Job:
    """The transcription job of one utterance (16 kHz float32), as a ``transcribe`` request with the
    audio as its binary payload: streamed to a client's reply topic when ``reply`` is given,
    else one terminal event (a listen job's run)."""
    req = TranscribeRequest(request_id=request_id, model=model, audio=AudioSource(payload=True, mime=STREAM_AUDIO_MIME),
                            language=language, max_tokens=max_tokens, stream=reply is not None, priority=priority)
    return Job(client, request_id, req, send, time.monotonic(), None, priority, reply=reply, attachment=to_pcm16(samples),
               model=model)


@dataclass
class _Stream:
    client: str
    stream_id: str
    reply: Reply
    req: AudioStreamRequest
    segmenter: object = None
    last_chunk: float = field(default_factory=time.monotonic)
    last_seq: int = -1
    seq: int = 0  # of its own events
    utterances: int = 0
    gaps: int = 0

    def event(self, type_: str, **fields) -> StreamEvent:
        ev = StreamEvent(type=type_, request_id=self.stream_id, seq=self.seq, **fields)
        self.seq += 1
        return ev


class AudioStreams:
    def __init__(self, settings: ServeSettings, publish: Callable[[Reply, BaseModel], None],
                 submit: Callable[[Job], None], vad_factory: Callable[[], object]):
        self.s = settings
        self.publish = publish
        self.submit = submit
        self.vad_factory = vad_factory
        self._open: set[tuple[str, str]] = set()  # what the network thread may check, under _lock
        self._lock = threading.Lock()
        self._streams: dict[tuple[str, str], _Stream] = {}  # the audio thread's own
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="audio-streams", daemon=True)
        self._thread.start()

    # --- the network thread ---------------------------------------------------------------------
    def handle(self, env: Envelope, req: AudioStreamRequest) -> None:
        key = (env.client, env.reply.request_id)
        with self._lock:
            if req.action == "open":
                if key in self._open:
                    raise Refusal("invalid_request", f"audio stream {key[1]!r} is already open")
                if len(self._open) >= self.s.max_audio_streams:
                    raise Refusal("busy", f"{len(self._open)} audio streams are open, the limit is "
                                          f"max_audio_streams ({self.s.max_audio_streams})")
                self._open.add(key)
            elif key not in self._open:
                raise Refusal("invalid_request", f"audio stream {key[1]!r} is not open")
        if req.action == "chunk":
            if env.attachment is None:
                raise Refusal("invalid_request", f"an audio chunk is the MQTT 5 binary payload ({STREAM_AUDIO_MIME})")
            if len(env.attachment) % 2:
                raise Refusal("invalid_audio", f"a chunk of {len(env.attachment)} bytes is not whole 16-bit samples")
        self._queue.put((req.action, key, env.reply, req, env.attachment))

    def close_client(self, client: str, reason: str = "client_gone") -> None:
        """Every stream of ``client`` (its Last Will said it is gone)."""
        self._queue.put(("client", (client, ""), None, None, reason))

    def stop(self) -> None:
        self._queue.put(("stop", ("", ""), None, None, "stopping"))
        self._thread.join(5.0)

    # --- the audio thread -----------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            try:
                action, key, reply, req, data = self._queue.get(timeout=1.0)
            except queue.Empty:
                self._expire()
                continue
            try:
                if action == "stop":
                    for k in list(self._streams):
                        self._close(k, "stopping")
                    return
                if action == "client":
                    for k in [k for k in self._streams if k[0] == key[0]]:
                        self._close(k, data)
                elif action == "open":
                    self._start(key, reply, req)
                elif action == "chunk":
                    self._chunk(key, req, data)
                elif action == "close":
                    self._close(key, "closed")
            except Exception:
                log.exception("audio stream %s/%s failed", *key)
                self._close(key, "internal error")
            self._expire()

    def _start(self, key, reply: Reply, req: AudioStreamRequest) -> None:
        from edge_sdk.media.vad import Segmenter

        st = _Stream(key[0], key[1], reply, req)
        st.segmenter = Segmenter(self.vad_factory(), end_silence_s=req.end_silence_ms / 1000,
                                 max_s=req.max_utterance_s)
        self._streams[key] = st
        log.info("audio stream %s/%s opened", *key)
        self.publish(reply, st.event("stream_opened"))

    def _chunk(self, key, req: AudioStreamRequest, data: bytes) -> None:
        st = self._streams.get(key)
        if st is None:
            return
        st.last_chunk = time.monotonic()
        seq = req.seq if req.seq is not None else st.last_seq + 1
        if seq <= st.last_seq:
            return  # a QoS 1 re-delivery
        st.gaps += seq - st.last_seq - 1
        st.last_seq = seq
        samples = from_pcm16(data)
        self._events(st, st.segmenter.feed(samples))

    def _events(self, st: _Stream, events) -> None:
        for kind, value in events:
            if kind == "voice_started":
                self.publish(st.reply, st.event("voice_started", t_s=round(value, 3)))
            else:
                n = st.utterances
                st.utterances += 1
                self.publish(st.reply, st.event("voice_stopped", t_s=round(value.end_s, 3), utterance=n))
                self._transcribe(st, n, value.samples)

    def _transcribe(self, st: _Stream, n: int, samples: np.ndarray) -> None:
        rid = f"{st.stream_id}-u{n}"
        reply = Reply(topic=st.reply.topic, correlation=rid.encode(), request_id=rid)
        self.submit(utterance_job(st.client, rid, samples, st.req.language, st.req.max_tokens, st.req.model,
                                  lambda ev: self.publish(reply, ev), reply=reply))

    def _close(self, key, reason: str) -> None:
        st = self._streams.pop(key, None)
        with self._lock:
            self._open.discard(key)
        if st is None:
            return
        if reason in ("closed", "idle"):  # speech in progress still counts; a vanished client's does not
            self._events(st, st.segmenter.finish())
        log.info("audio stream %s/%s closed (%s): %d utterances, %d chunks missing", *key, reason, st.utterances,
                 st.gaps)
        self.publish(st.reply, st.event("stream_closed", reason=reason))

    def _expire(self) -> None:
        cutoff = time.monotonic() - self.s.audio_stream_idle_s
        for key in [k for k, st in self._streams.items() if st.last_chunk < cutoff]:
            self._close(key, "idle")


