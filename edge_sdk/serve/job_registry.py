"""What watch jobs (watch.py) and listen jobs (listen.py) share: clients' named jobs by
(client, job id) under one lock, a limit on how many run, idempotent registration, cancel by id,
by client, or by a client's Last Will, and the one thread that ticks them."""

from __future__ import annotations

import abc
import threading
from typing import Any

from edge_sdk.serve.transport import Refusal

TICK_S = 0.02  # the job thread's resolution


class JobRegistry(abc.ABC):
    """Subclasses hold jobs with a ``spec`` (``client``, ``reply_topic``) and define ``_end`` and
    ``_tick_jobs`` (one pass of the job thread)."""

    def __init__(self, kind: str, limit_setting: str, limit: int):
        self.kind, self.limit_setting, self.limit = kind, limit_setting, limit
        self._lock = threading.Lock()
        self._jobs: dict[tuple[str, str], Any] = {}
        self._stop = threading.Event()
        self.thread: threading.Thread | None = None

    def _start_thread(self) -> None:
        self.thread = threading.Thread(target=self._run, name=f"edge-sdk-{self.kind}", daemon=True)
        self.thread.start()

    def _stop_thread(self) -> None:
        self._stop.set()
        if self.thread is not None:
            self.thread.join(timeout=3.0)

    def _run(self) -> None:
        while not self._stop.wait(TICK_S):
            with self._lock:
                jobs = list(self._jobs.values())
            self._tick_jobs(jobs)

    def __len__(self) -> int:
        return len(self._jobs)

    def _add(self, key: tuple[str, str], job: Any) -> tuple[Any, bool]:
        """(the job under ``key``, created): an existing one is returned as it is (a re-sent
        registration); Refusal ``busy`` at the limit."""
        with self._lock:
            old = self._jobs.get(key)
            if old is not None:
                return old, False
            if len(self._jobs) >= self.limit:
                raise Refusal("busy", f"{len(self._jobs)} {self.kind} jobs already run ({self.limit_setting} "
                                      f"{self.limit})")
            self._jobs[key] = job
        return job, True

    def cancel(self, client: str, job_id: str) -> bool:
        with self._lock:
            job = self._jobs.get((client, job_id))
        if job is None:
            return False
        self._end(job, "cancelled")
        return True

    def cancel_client(self, client: str, reply_to: str | None = None) -> int:
        """All of ``client``'s jobs; with ``reply_to`` (its Last Will) only those ``_ends_with_client``."""
        with self._lock:
            jobs = [j for j in self._jobs.values() if j.spec.client == client and (
                reply_to is None or self._ends_with_client(j, reply_to))]
        for job in jobs:
            self._end(job, "cancelled")
        return len(jobs)

    @staticmethod
    def _ends_with_client(job: Any, reply_to: str) -> bool:
        """Whether a vanished client's Last Will (naming its reply topic) ends ``job``."""
        return job.spec.reply_topic == reply_to

    @abc.abstractmethod
    def _end(self, job: Any, reason: str) -> None:
        """Remove ``job`` and send its last event (idempotent)."""

    @abc.abstractmethod
    def _tick_jobs(self, jobs: list[Any]) -> None:
        """One pass of the job thread, every ``TICK_S``, over the jobs registered at its start."""
