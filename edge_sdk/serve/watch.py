"""Watch jobs: "every N seconds (or on scene change) ask PROMPT about camera C".

A client registers a job on ``R/req/C/watch``; one thread (``edge-sdk-watch``) ticks every job:

- interval jobs run on a fixed grid (registration + k * every_s);
- ``on_change`` jobs compare a 32x24 grey thumbnail of the newest frame with the one of the last
  frame they ran on (mean absolute difference, 0..1) and run when it exceeds the threshold, at
  most once per every_s; their first tick always runs.

A tick hands one inference to the scheduler's queue at the lowest priority (below every
client request, so watch jobs never delay interactive work) with the frame already grabbed. A
tick is skipped, and counted, when the queue is full or the job's previous run has not finished.
A camera without a fresh frame gives one ``watch_error`` (camera_unavailable) per outage; the job
retries every ``RETRY_S`` and its events resume when frames do.

Events go to ``R/events/{camera}/watch/{C}/{job_id}`` (QoS 1): ``watch`` (an answer),
``watch_error``, and a last ``watch_end`` (cancelled / expired). Persistent jobs are kept in a
JSON file (``watch_store``) and restored when the daemon starts.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel

from edge_sdk.protocol.models import ERROR_STATUS, ChatRequest, Result, WatchEnd, WatchError, WatchEvent, WatchRequest
from edge_sdk.protocol.topics import Topics
from edge_sdk.serve.cameras import CameraHub, ImageRejected, grey_thumb, scene_change
from edge_sdk.serve.config import ServeSettings
from edge_sdk.serve.job_registry import JobRegistry
from edge_sdk.serve.scheduler import WATCH_PRIORITY, Job

log = logging.getLogger("edge_sdk.serve.watch")

RETRY_S = 0.1  # retry period while a camera has no fresh frame / an on_change job sees no change
STORE_VERSION = 1


@dataclass
class WatchSpec:
    """What is persisted about a job."""

    client: str
    job_id: str
    camera: str
    prompt: str
    every_s: float
    model: str | None = None  # as admission routed it
    on_change: bool = False
    change_threshold: float = 0.08
    system: str | None = None
    max_tokens: int | None = None
    temperature: float = 0.0
    seed: int | None = None
    expires_at: float | None = None  # Unix time
    persistent: bool = False
    reply_topic: str | None = None
    created_at: float = field(default_factory=time.time)


@dataclass(eq=False)
class WatchJob:
    spec: WatchSpec
    next_due: float  # time.monotonic()
    seq: int = 0
    ended: bool = False
    busy: bool = False  # an inference of this job is queued or running
    running: Job | None = None  # the scheduler's job while busy
    ref_thumb: Any = None  # grey thumbnail of the last frame it ran on (on_change)
    unavailable: bool = False  # a camera_unavailable error was already reported for this outage
    runs: int = 0
    skipped: int = 0

    @property
    def key(self) -> tuple[str, str]:
        return (self.spec.client, self.spec.job_id)


class WatchManager(JobRegistry):
    """The watch jobs of every client. It is handed what it uses: the cameras, ``enqueue`` (the
    scheduler's: queue one run, False when full) and ``publish`` (topic, event, qos, expiry)."""

    def __init__(self, settings: ServeSettings, topics: Topics, hub: CameraHub, enqueue: Callable[[Job], bool],
                 publish: Callable[..., Any]):
        super().__init__("watch", "max_watch_jobs", settings.max_watch_jobs)
        self.s = settings
        self.topics = topics
        self.hub = hub
        self.enqueue = enqueue
        self.publish = publish
        self.stats = {"runs": 0, "skipped": 0}
        self.store: Path | None = Path(self.s.watch_store) if self.s.watch_store else None

    # --- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        self._restore()
        self._start_thread()

    def stop(self) -> None:
        self._stop_thread()

    def jobs(self) -> list[WatchSpec]:
        with self._lock:
            return [j.spec for j in self._jobs.values()]

    # --- registration and cancel (network thread) ------------------------------------------------

    def register(self, client: str, job_id: str, req: WatchRequest, reply_topic: str) -> tuple[WatchSpec, bool]:
        """(spec, created) for a request admission.py has checked. The same job id again returns
        the existing job (idempotent); raises Refusal ``busy`` at ``max_watch_jobs``."""
        s = self.s
        now = time.time()
        spec = WatchSpec(client=client, job_id=job_id, camera=req.camera, prompt=req.prompt, every_s=req.every_s,
                         model=req.model, on_change=req.on_change, change_threshold=req.change_threshold or s.watch_change_threshold,
                         system=req.system, max_tokens=req.max_tokens, temperature=req.temperature, seed=req.seed,
                         expires_at=now + req.expires_s if req.expires_s else None, persistent=req.persistent,
                         reply_topic=reply_topic, created_at=now)
        job, created = self._add((client, job_id), WatchJob(spec, next_due=time.monotonic()))
        if not created:
            return job.spec, False
        log.info("watch job %s/%s: every %.2f s%s on camera %s%s", client, job_id, spec.every_s,
                 " on change" if spec.on_change else "", spec.camera, " (persistent)" if spec.persistent else "")
        if spec.persistent:
            self._save()
        return spec, True

    @staticmethod
    def _ends_with_client(job: WatchJob, reply_to: str) -> bool:
        """A persistent job outlives its client; others end with the client registered with ``reply_to``."""
        return not job.spec.persistent and job.spec.reply_topic == reply_to

    def _end(self, job: WatchJob, reason: str) -> None:
        with self._lock:
            if job.ended:
                return
            job.ended = True
            self._jobs.pop(job.key, None)
            running = job.running
            seq = self._next_seq(job)
        if running is not None:
            running.cancel.set()
        sp = job.spec
        log.info("watch job %s/%s %s after %d runs", sp.client, sp.job_id, reason, job.runs)
        self._emit(job, WatchEnd(**self._envelope(job, seq), reason=reason))
        if sp.persistent:
            self._save()

    @staticmethod
    def _next_seq(job: WatchJob) -> int:
        seq = job.seq
        job.seq += 1
        return seq

    # --- the watch thread ----------------------------------------------------------------------

    def _tick_jobs(self, jobs: list[WatchJob]) -> None:
        now = time.monotonic()
        wall = time.time()
        for job in jobs:
            if job.ended:
                continue
            try:
                self._tick(job, now, wall)
            except Exception:  # one broken job must not stop the others
                log.exception("watch job %s/%s tick failed", *job.key)
                job.next_due = now + job.spec.every_s

    def _tick(self, job: WatchJob, now: float, wall: float) -> None:
        sp = job.spec
        if sp.expires_at is not None and wall >= sp.expires_at:
            return self._end(job, "expired")
        if now < job.next_due:
            return
        if job.busy:  # the previous run is still queued or running: skip this tick
            return self._skip(job, now, "previous run busy")
        try:
            frame = self.hub.latest(sp.camera, timeout=0.0)
        except ImageRejected as e:
            job.next_due = now + RETRY_S
            if not job.unavailable:
                job.unavailable = True
                self._skip(job, now, "no frame", advance=False)
                self._error(job, e.code, e.message)
            return
        job.unavailable = False
        trigger, change = "interval", None
        thumb = None
        if sp.on_change:
            thumb = grey_thumb(frame.bgr)
            if job.ref_thumb is not None:
                change = scene_change(thumb, job.ref_thumb)
                if change < sp.change_threshold:
                    job.next_due = now + RETRY_S
                    return
            trigger = "change"
        job.busy = True  # before the worker can see the run (it clears it when done)
        if not self._submit(job, frame, trigger, change):
            job.busy = False
            return self._skip(job, now, "queue full")
        job.runs += 1
        self.stats["runs"] += 1
        if thumb is not None:
            job.ref_thumb = thumb
        if sp.on_change:
            job.next_due = now + sp.every_s
        else:
            job.next_due += sp.every_s
            if job.next_due <= now:  # fell behind (slow model): keep the grid, drop missed ticks
                missed = int((now - job.next_due) // sp.every_s) + 1
                job.next_due += missed * sp.every_s

    def _skip(self, job: WatchJob, now: float, why: str, advance: bool = True) -> None:
        job.skipped += 1
        self.stats["skipped"] += 1
        log.debug("watch job %s/%s: tick skipped (%s)", *job.key, why)
        if advance:
            sp = job.spec
            job.next_due += sp.every_s
            if job.next_due <= now:
                job.next_due = now + sp.every_s

    # --- runs: queued on the scheduler, ended by the worker ------------------------------------------

    def _submit(self, job: WatchJob, frame: Any, trigger: str, change: float | None) -> bool:
        """Queue one run of ``job`` on ``frame``; False if the queue is full or stopping."""
        sp = job.spec
        s = self.s
        req = ChatRequest.model_construct(stream=False, max_tokens=min(sp.max_tokens or s.default_max_tokens, s.max_tokens),
                                          temperature=sp.temperature, seed=sp.seed, priority=0)
        run = Job(sp.client, f"watch-{sp.client}-{sp.job_id}-{job.seq}", req,
                  send=lambda ev: self._finished(job, frame, trigger, change, ev), received=time.monotonic(),
                  deadline=None, priority=WATCH_PRIORITY, prompt=self._prompt(sp, frame.rgb()), model=sp.model)
        job.running = run
        if self.enqueue(run):
            return True
        job.running = None
        return False

    @staticmethod
    def _prompt(sp: WatchSpec, rgb: Any) -> list[dict]:
        msgs: list[dict] = []
        if sp.system:
            msgs.append({"role": "system", "content": sp.system})
        msgs.append({"role": "user", "content": [{"type": "image", "image": rgb}, {"type": "text", "text": sp.prompt}]})
        return msgs

    def _finished(self, job: WatchJob, frame: Any, trigger: str, change: float | None, event: BaseModel) -> None:
        """The terminal event of one run -> a watch / watch_error event."""
        with self._lock:
            job.busy = False
            job.running = None
            if job.ended or self._stop.is_set():
                return
            seq = self._next_seq(job)
        base = self._envelope(job, seq)
        if isinstance(event, Result):
            if event.finish_reason == "cancelled":
                return
            self._emit(job, WatchEvent(**base, trigger=trigger, change=round(change, 4) if change is not None else None,
                                       frame_seq=frame.seq, frame_ts=round(frame.ts, 3), text=event.text,
                                       finish_reason=event.finish_reason, usage=event.usage))
        else:
            self._emit(job, WatchError(**base, status=event.status, code=event.code, message=event.message))

    def _error(self, job: WatchJob, code: str, message: str) -> None:
        with self._lock:
            seq = self._next_seq(job)
        self._emit(job, WatchError(**self._envelope(job, seq), status=ERROR_STATUS.get(code, 500), code=code,
                                   message=message))

    @staticmethod
    def _envelope(job: WatchJob, seq: int) -> dict:
        sp = job.spec
        return dict(job_id=sp.job_id, client=sp.client, camera=sp.camera, seq=seq, ts=round(time.time(), 3))

    def _emit(self, job: WatchJob, event: BaseModel) -> None:
        sp = job.spec
        self.publish(self.topics.watch_events(sp.camera, sp.client, sp.job_id), event, qos=1,
                     expiry_s=max(10, int(3 * sp.every_s)))

    # --- persistence --------------------------------------------------------------------------------

    def _save(self) -> None:
        if self.store is None:
            return
        with self._lock:
            recs = [asdict(j.spec) for j in self._jobs.values() if j.spec.persistent]
        tmp = self.store.with_name(self.store.name + ".tmp")
        try:
            self.store.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps({"v": STORE_VERSION, "jobs": recs}, indent=1))
            os.replace(tmp, self.store)
        except OSError as e:
            log.error("cannot save watch jobs to %s: %s", self.store, e)

    def _restore(self) -> None:
        if self.store is None or not self.store.exists():
            return
        try:
            data = json.loads(self.store.read_text())
            recs = data.get("jobs", []) if isinstance(data, dict) else []
        except (OSError, ValueError) as e:
            log.error("cannot read watch jobs from %s: %s (starting without them)", self.store, e)
            return
        now = time.time()
        kept = 0
        for rec in recs:
            try:
                spec = WatchSpec(**rec)
            except TypeError as e:
                log.warning("skipping a bad watch job record in %s: %s", self.store, e)
                continue
            if spec.expires_at is not None and spec.expires_at <= now:
                log.info("watch job %s/%s expired while the daemon was down", spec.client, spec.job_id)
                continue
            if spec.camera not in self.hub:
                log.warning("watch job %s/%s: camera %r is no longer configured; dropped", spec.client,
                            spec.job_id, spec.camera)
                continue
            self._jobs[(spec.client, spec.job_id)] = WatchJob(spec, next_due=time.monotonic())
            kept += 1
        log.info("restored %d persistent watch jobs from %s", kept, self.store)
        if kept != len(recs):
            self._save()
