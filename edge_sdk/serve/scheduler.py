"""Stage 3: the one queue every inference waits in.

Priorities (higher first, FIFO within one), per-client limits, de-duplication of request ids
(in progress: ignored; recently finished: the final event is sent again), and one way for a
queued job to end early — ``_end_queued`` — shared by cancel, deadline expiry and shutdown.

Methods that end jobs return what to send instead of sending it: the caller publishes after the
lock is released (see events.py).
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

from pydantic import BaseModel

from edge_sdk.protocol.models import ChatRequest
from edge_sdk.serve.events import empty_result, error_event
from edge_sdk.serve.transport import Refusal, Reply, shutting_down

#: Watch runs wait below every client request (priorities 0..9).
WATCH_PRIORITY = -1


@dataclass(eq=False)
class Job:
    """One inference: a client's chat request, or one run of a watch job (``reply`` None, not
    de-duplicated nor counted against the queue length). ``send`` takes each of its events."""

    client: str
    request_id: str
    req: ChatRequest
    send: Callable[[BaseModel], None]
    received: float
    deadline: float | None
    priority: int
    reply: Reply | None = None
    attachment: bytes | None = None  # the MQTT 5 binary image payload (image parts with payload: true)
    prompt: Any = None  # a ready prompt (watch runs) instead of req.messages
    model: str | None = None  # which of the daemon's models runs it (admission routed it); None: the only one
    cancel: threading.Event = field(default_factory=threading.Event)
    seq: int = 0
    state: str = "queued"  # queued | running | done
    order: int = 0

    @property
    def key(self) -> tuple[str, str]:
        return (self.client, self.request_id)

    @property
    def is_client_request(self) -> bool:
        return self.reply is not None

    def __lt__(self, other: "Job") -> bool:
        return (-self.priority, self.order) < (-other.priority, other.order)

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq


@dataclass
class Admitted:
    """What ``submit`` decided: ``position`` in the queue, or an earlier final event to resend
    (``finished``), or nothing to do (``duplicate``)."""

    position: int = 0
    finished: BaseModel | None = None
    duplicate: bool = False


Ending = list[tuple[Job, BaseModel]]


class Scheduler:
    def __init__(self, queue_length: int, max_pending_per_client: int, recent_requests: int, stats: dict):
        self.queue_length = queue_length
        self.max_pending_per_client = max_pending_per_client
        self.recent_requests = recent_requests
        self.stats = stats
        self._cv = threading.Condition()
        self._queue: list[Job] = []
        self._active: dict[tuple[str, str], Job] = {}
        self._recent: OrderedDict[tuple[str, str], BaseModel] = OrderedDict()
        self._order = itertools.count()
        self.running: Job | None = None
        self.stopping = False
        self.avg_request_s = 1.0

    # --- in -----------------------------------------------------------------------------------

    def submit(self, job: Job) -> Admitted:
        """Queue a client request, or raise Refusal (``busy``, ``stopping``)."""
        with self._cv:
            if job.key in self._active:
                return Admitted(duplicate=True)
            done = self._recent.get(job.key)
            if done is not None:
                return Admitted(finished=done)
            if self.stopping:
                raise shutting_down()
            mine = sum(1 for j in self._active.values() if j.client == job.client)
            if mine >= self.max_pending_per_client:
                self.stats["rejected_busy"] += 1
                raise Refusal("busy", f"client {job.client!r} already has {mine} requests pending "
                                      f"(limit {self.max_pending_per_client})", retry_after_ms=self._retry_after_ms())
            if sum(1 for j in self._queue if j.is_client_request) >= self.queue_length:  # watch runs never count
                self.stats["rejected_busy"] += 1
                raise Refusal("busy", f"queue full ({self.queue_length} waiting)", retry_after_ms=self._retry_after_ms())
            position = sum(1 for j in self._queue if j.priority >= job.priority)
            self._active[job.key] = job  # reserved: duplicates are ignored from here on
        return Admitted(position=position)

    def enqueue(self, job: Job) -> bool:
        """Put an admitted request (after its 'accepted' went out) or a watch run on the queue.
        False when stopping (a client request then ends with ``503 stopping``, as queued ones do)
        or, for a watch run, when the queue is full."""
        with self._cv:
            if self.stopping:
                ending = self._end_stopping([job]) if job.is_client_request else []
            elif not job.is_client_request and len(self._queue) >= self.queue_length:
                return False
            else:
                job.order = next(self._order)
                heapq.heappush(self._queue, job)
                self._cv.notify()
                return True
        self._send_all(ending)
        return False

    # --- out ----------------------------------------------------------------------------------

    def next_job(self, stopped: threading.Event) -> Job | None:
        """The worker's next job (blocks); None once ``stopped`` is set and the queue is empty."""
        with self._cv:
            while not self._queue and not stopped.is_set():
                self._cv.wait(0.5)
            if not self._queue:
                return None
            job = heapq.heappop(self._queue)
            job.state = "running"
            self.running = job
            return job

    def job_done(self, seconds: float) -> None:
        """The worker finished its job (it already sent the terminal event)."""
        self.avg_request_s = 0.8 * self.avg_request_s + 0.2 * seconds
        self.running = None

    def finish(self, job: Job, event: BaseModel) -> None:
        """Send the one terminal event of ``job`` and free its slot (never twice)."""
        with self._cv:
            ok = self._close(job, event)
        if ok:
            job.send(event)

    def wake(self) -> None:
        with self._cv:
            self._cv.notify_all()

    # --- ending queued jobs early: cancel, deadline, shutdown -----------------------------------

    def cancel(self, client: str, request_id: str | None, reply_to: str | None = None) -> list[Job]:
        """Cancel one of ``client``'s requests (or all, when ``request_id`` is None, optionally
        only those replying to ``reply_to``). Queued ones end now; the running one stops at its
        next token. Returns the jobs touched."""
        with self._cv:
            if request_id is None:
                jobs = [j for j in self._active.values() if j.client == client
                        and (reply_to is None or j.reply.topic == reply_to)]
            else:
                j = self._active.get((client, request_id))
                jobs = [j] if j is not None else []
            for job in jobs:
                job.cancel.set()
            ending = self._end_queued([j for j in jobs if j.state == "queued"], "cancelled")
        self._send_all(ending)
        return jobs

    def expire(self, now: float) -> None:
        """End the queued jobs whose deadline has passed (finish_reason 'deadline')."""
        with self._cv:
            ending = self._end_queued([j for j in self._queue if j.deadline is not None and now >= j.deadline],
                                      "deadline")
        self._send_all(ending)

    def stop(self) -> None:
        """Refuse new work and end every queued job with ``503 stopping``."""
        with self._cv:
            self.stopping = True
            queued, self._queue = self._queue, []
            ending = self._end_stopping(queued)
        self._send_all(ending)

    def _end_stopping(self, jobs: list[Job]) -> Ending:
        """Under the lock: close each of ``jobs`` with the ``stopping`` error."""
        refusal = shutting_down()
        ending = []
        for job in jobs:
            ev = error_event(job.request_id, job.next_seq(), refusal.code, refusal.message)
            if self._close(job, ev):
                ending.append((job, ev))
        return ending

    def _end_queued(self, jobs: list[Job], reason: str) -> Ending:
        """Under the lock: take ``jobs`` off the queue and close each with an empty result."""
        if not jobs:
            return []
        gone = set(map(id, jobs))
        self._queue = [j for j in self._queue if id(j) not in gone]
        heapq.heapify(self._queue)
        ending = []
        for job in jobs:
            self.stats["cancelled"] += 1
            ev = empty_result(job.request_id, job.next_seq(), job.received, reason)
            if self._close(job, ev):
                ending.append((job, ev))
        return ending

    def _close(self, job: Job, event: BaseModel) -> bool:
        """Under the lock: mark ``job`` done and remember its final event; False if it already was."""
        if job.state == "done":
            return False
        job.state = "done"
        if job.is_client_request:
            self._active.pop(job.key, None)
            if self.recent_requests:
                self._recent[job.key] = event
                while len(self._recent) > self.recent_requests:
                    self._recent.popitem(last=False)
        return True

    @staticmethod
    def _send_all(ending: Ending) -> None:
        for job, ev in ending:
            job.send(ev)

    # --- state ----------------------------------------------------------------------------------

    def depth(self) -> int:
        with self._cv:
            return len(self._queue)

    def _retry_after_ms(self) -> int:
        return int(max(100, min(60_000, (len(self._queue) + 1) * self.avg_request_s * 1000)))

    def wait_idle(self, timeout: float) -> bool:
        """Wait (polling) until no job runs; False on timeout."""
        end = time.monotonic() + timeout
        while self.running is not None and time.monotonic() < end:
            time.sleep(0.01)
        return self.running is None
