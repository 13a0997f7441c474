"""Listen jobs: transcripts of what a daemon-owned microphone hears, per utterance, published on
an events topic like watch jobs' (PROTOCOL.md, "Listen jobs").

The daemon opens every configured microphone at start (``edge_sdk.media.microphone``: its own
reader thread, reconnect with backoff). One listen thread owns the rest: it reads each
microphone, runs voice activity detection only while a job listens to it, and turns each
utterance into one transcription on the scheduler. Jobs on one microphone with the same
endpointing settings share one segmenter (one VAD); jobs that also ask for the same model,
language, token budget and priority share one transcription.

Events go to ``R/events/{microphone}/listen/{C}/{job_id}`` (QoS 1): voice_started, voice_stopped,
transcript, listen_error (microphone_unavailable once per outage, or a failed transcription; the
job goes on), and a last listen_end (cancelled / expired / stopping). Listen jobs are not
persisted: a restarted daemon has none.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from pydantic import BaseModel

from edge_sdk.media.audio import SAMPLE_RATE
from edge_sdk.protocol.models import (ERROR_STATUS, ListenEnd, ListenError, ListenRequest, ListenTranscript,
                                      ListenVoice, Result)
from edge_sdk.protocol.topics import Topics
from edge_sdk.serve.audio_streams import utterance_job
from edge_sdk.serve.config import ServeSettings
from edge_sdk.serve.job_registry import JobRegistry
from edge_sdk.serve.scheduler import Job

log = logging.getLogger("edge_sdk.serve.listen")

CHUNK_MS = 64  # microphone chunks: two VAD frames


@dataclass
class ListenSpec:
    client: str
    job_id: str
    microphone: str
    model: str | None
    language: str | None
    end_silence_ms: int
    max_utterance_s: float
    max_tokens: int | None
    priority: int
    expires_at: float | None  # Unix time
    reply_topic: str

    @property
    def endpointing(self) -> tuple[int, float]:
        """What a shared segmenter must agree on."""
        return (self.end_silence_ms, self.max_utterance_s)

    @property
    def transcription(self) -> tuple:
        """What a shared transcription must agree on."""
        return (self.model, self.language, self.max_tokens, self.priority)


@dataclass(eq=False)
class ListenJob:
    spec: ListenSpec
    seqs: Iterator[int] = field(default_factory=itertools.count)  # its events' seq (next() is thread-safe)
    utterances: int = 0
    voice: int | None = None  # the number of the utterance in progress, if it saw it start
    ended: bool = False

    @property
    def key(self) -> tuple[str, str]:
        return (self.spec.client, self.spec.job_id)


@dataclass(eq=False)
class _Run:
    """One transcription on the scheduler, for the jobs that share it (utterance number each)."""

    listeners: list[tuple[ListenJob, int]]
    start_s: float
    end_s: float
    job: Job | None = None


@dataclass(eq=False)
class _Ear:
    """One microphone: its capture, how much it has heard, and a segmenter per endpointing."""

    name: str
    mic: Any
    heard: int = 0  # samples read since the daemon opened it
    last_audio: float = field(default_factory=time.monotonic)
    unavailable: bool = False
    segmenters: dict[tuple[int, float], tuple[Any, int]] = field(default_factory=dict)  # -> (Segmenter, origin)


class ListenManager(JobRegistry):
    """Every client's listen jobs. It is handed the scheduler's ``enqueue``, ``publish`` (topic,
    event, qos, expiry) and ``vad_factory`` (a fresh SileroVad per segmenter)."""

    def __init__(self, settings: ServeSettings, topics: Topics, enqueue: Callable[[Job], bool],
                 publish: Callable[..., Any], vad_factory: Callable[[], Any]):
        super().__init__("listen", "max_listen_jobs", settings.max_listen_jobs)
        self.s = settings
        self.topics = topics
        self.enqueue = enqueue
        self.publish = publish
        self.vad_factory = vad_factory
        self._runs: list[_Run] = []
        self._ears: dict[str, _Ear] = {}
        self._errors: dict[str, str] = {}

    @property
    def names(self) -> list[str]:
        return sorted(self.s.microphones)

    def __contains__(self, name: object) -> bool:
        return name in self.s.microphones

    # --- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        if not self.s.microphones:
            return
        from edge_sdk.media.microphone import Microphone

        for name, source in self.s.microphones.items():
            try:
                mic = Microphone(source, name=name, chunk_ms=CHUNK_MS, loop=self.s.microphone_loop,
                                 backoff=0.2, backoff_max=5.0)
            except Exception as e:  # a source that cannot even be described: say so, keep the others
                log.error("microphone %s: %s", name, e)
                self._errors[name] = str(e)
                continue
            self._ears[name] = _Ear(name, mic)
            log.info("microphone %s: %s", name, source)
        self._start_thread()

    def stop(self) -> None:
        self._stop_thread()
        for job in list(self._jobs.values()):
            self._end(job, "stopping")
        for ear in self._ears.values():
            ear.mic.close(timeout=2.0)

    # --- registration and cancel (network thread) ------------------------------------------------

    def register(self, client: str, job_id: str, req: ListenRequest, reply_topic: str) -> tuple[ListenSpec, bool]:
        """(spec, created) for a request admission.py has checked; the same job id again returns the
        existing job. Raises Refusal ``busy`` at ``max_listen_jobs``."""
        spec = ListenSpec(client=client, job_id=job_id, microphone=req.microphone, model=req.model,
                          language=req.language, end_silence_ms=req.end_silence_ms,
                          max_utterance_s=req.max_utterance_s, max_tokens=req.max_tokens, priority=req.priority,
                          expires_at=time.time() + req.expires_s if req.expires_s else None, reply_topic=reply_topic)
        job, created = self._add((client, job_id), ListenJob(spec))
        if not created:
            return job.spec, False
        log.info("listen job %s/%s on microphone %s", client, job_id, spec.microphone)
        if spec.microphone in self._errors:
            self._error(job, "microphone_unavailable",
                        f"microphone {spec.microphone!r} failed to start: {self._errors[spec.microphone]}")
        return spec, True

    def _end(self, job: ListenJob, reason: str) -> None:
        with self._lock:
            if job.ended:
                return
            job.ended = True
            self._jobs.pop(job.key, None)
            idle_runs = [r for r in self._runs if all(j.ended for j, _ in r.listeners)]
            seq = next(job.seqs)
        for run in idle_runs:  # nobody is left to read it
            if run.job is not None:
                run.job.cancel.set()
        log.info("listen job %s/%s %s after %d utterances", *job.key, reason, job.utterances)
        self._emit(job, ListenEnd(**self._envelope(job, seq), reason=reason))

    # --- the listen thread ---------------------------------------------------------------------

    def _tick_jobs(self, jobs: list[ListenJob]) -> None:
        wall = time.time()
        for job in jobs:
            if job.spec.expires_at is not None and wall >= job.spec.expires_at:
                self._end(job, "expired")
        for ear in self._ears.values():
            try:
                self._hear(ear, [j for j in jobs if j.spec.microphone == ear.name and not j.ended])
            except Exception:  # one broken microphone must not stop the others
                log.exception("microphone %s: listening failed", ear.name)

    def _hear(self, ear: _Ear, jobs: list[ListenJob]) -> None:
        """Everything ``ear`` delivered since the last tick, through the segmenters its jobs need."""
        now = time.monotonic()
        self._sync_segmenters(ear, jobs)
        while (chunk := self._read(ear)) is not None:
            ear.last_audio = now
            if ear.unavailable:  # back after an outage: what was half heard is gone
                log.info("microphone %s: audio again", ear.name)
                ear.unavailable = False
                ear.segmenters.clear()
                for j in jobs:
                    j.voice = None
                self._sync_segmenters(ear, jobs)
            for key, (segmenter, origin) in ear.segmenters.items():
                for kind, value in segmenter.feed(chunk):
                    self._voice([j for j in jobs if j.spec.endpointing == key], kind, value, origin)
            ear.heard += len(chunk)
        if not ear.unavailable and now - ear.last_audio > self.s.microphone_timeout_s:
            ear.unavailable = True
            why = ear.mic.last_error or f"no audio for {self.s.microphone_timeout_s:g} s"
            log.warning("microphone %s unavailable: %s", ear.name, why)
            for j in jobs:
                self._error(j, "microphone_unavailable", f"microphone {ear.name!r}: {why}")

    @staticmethod
    def _read(ear: _Ear) -> Any:
        """The next chunk ``ear`` has, or None (none yet, or a source that ended for good)."""
        from edge_sdk.media.microphone import MicrophoneClosed

        try:
            return ear.mic.read(timeout=0)
        except MicrophoneClosed:
            return None

    def _sync_segmenters(self, ear: _Ear, jobs: list[ListenJob]) -> None:
        """One segmenter per endpointing the jobs ask for; a new one starts at what is heard next."""
        from edge_sdk.media.vad import Segmenter

        wanted = {j.spec.endpointing for j in jobs}
        for key in set(ear.segmenters) - wanted:
            del ear.segmenters[key]
        for key in wanted - set(ear.segmenters):
            ear.segmenters[key] = (Segmenter(self.vad_factory(), end_silence_s=key[0] / 1000, max_s=key[1]), ear.heard)

    def _voice(self, jobs: list[ListenJob], kind: str, value: Any, origin: int) -> None:
        """One segmenter event for the jobs that share it."""
        base_s = origin / SAMPLE_RATE
        if kind == "voice_started":
            for j in jobs:
                j.voice = j.utterances
                j.utterances += 1
                self._emit(j, ListenVoice(**self._envelope(j, next(j.seqs)), type="voice_started",
                                          utterance=j.voice, t_s=round(base_s + value, 3)))
            return
        listeners = [(j, j.voice) for j in jobs if j.voice is not None]
        for j, n in listeners:
            j.voice = None
            self._emit(j, ListenVoice(**self._envelope(j, next(j.seqs)), type="voice_stopped", utterance=n,
                                      t_s=round(base_s + value.end_s, 3)))
        groups: dict[tuple, list[tuple[ListenJob, int]]] = {}
        for j, n in listeners:
            groups.setdefault(j.spec.transcription, []).append((j, n))
        for group in groups.values():
            self._transcribe(group, value, base_s)

    def _transcribe(self, listeners: list[tuple[ListenJob, int]], segment: Any, base_s: float) -> None:
        first, n = listeners[0]
        sp = first.spec
        run = _Run(listeners, round(base_s + segment.start_s, 3), round(base_s + segment.end_s, 3))
        run.job = utterance_job(sp.client, f"listen-{sp.job_id}-u{n}", segment.samples, sp.language, sp.max_tokens,
                                sp.model, lambda ev: self._finished(run, ev), priority=sp.priority)
        with self._lock:
            self._runs.append(run)
        if not self.enqueue(run.job):
            self._finished(run, None)

    # --- runs: ended by the worker ---------------------------------------------------------------------

    def _finished(self, run: _Run, event: BaseModel | None) -> None:
        """The terminal event of one transcription (None: the queue was full) -> each job's event."""
        with self._lock:
            if run in self._runs:
                self._runs.remove(run)
        for job, n in run.listeners:
            if job.ended:
                continue
            if isinstance(event, Result):
                self._emit(job, ListenTranscript(**self._envelope(job, next(job.seqs)), utterance=n,
                                                 start_s=run.start_s, end_s=run.end_s, text=event.text,
                                                 tokens=list(event.tokens), finish_reason=event.finish_reason,
                                                 usage=event.usage))
            elif event is None:
                self._error(job, "busy", f"utterance {n} dropped: the queue is full", utterance=n)
            else:
                self._error(job, event.code, event.message, utterance=n)

    def _error(self, job: ListenJob, code: str, message: str, utterance: int | None = None) -> None:
        self._emit(job, ListenError(**self._envelope(job, next(job.seqs)), utterance=utterance,
                                    status=ERROR_STATUS.get(code, 500), code=code, message=message))

    @staticmethod
    def _envelope(job: ListenJob, seq: int) -> dict:
        sp = job.spec
        return dict(job_id=sp.job_id, client=sp.client, microphone=sp.microphone, seq=seq, ts=round(time.time(), 3))

    def _emit(self, job: ListenJob, event: BaseModel) -> None:
        sp = job.spec
        self.publish(self.topics.listen_events(sp.microphone, sp.client, sp.job_id), event, qos=1, expiry_s=60)

    def status(self) -> dict[str, dict]:
        """Per microphone, for the health topic."""
        out = {}
        for name in self.names:
            ear = self._ears.get(name)
            if ear is None:
                out[name] = {"connected": False, "heard_s": 0.0, "last_error": self._errors.get(name)}
                continue
            out[name] = {"connected": not ear.unavailable, "heard_s": round(ear.heard / SAMPLE_RATE, 3),
                         "dropped_chunks": ear.mic.dropped, "reconnects": ear.mic.reconnects,
                         "last_error": ear.mic.last_error}
        return out
