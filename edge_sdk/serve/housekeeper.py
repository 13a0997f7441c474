"""The daemon's periodic work on one thread: expire queued requests at their deadline, publish
health, refresh camera snapshots, pet the systemd watchdog while every other thread is alive.
It is handed one function per duty, not the daemon."""

from __future__ import annotations

import os
import threading
import time
from typing import Callable

from edge_sdk.serve.sdnotify import Notifier

TICK_S = 0.05


class Housekeeper:
    def __init__(self, stopped: threading.Event, notifier: Notifier, *, expire: Callable[[float], None],
                 publish_health: Callable[[], None], health_every_s: float,
                 refresh_snapshots: Callable[[], None], snapshot_every_s: float,
                 threads_alive: Callable[[], bool]):
        self.stopped = stopped
        self.notifier = notifier
        self.expire = expire
        self.publish_health = publish_health
        self.health_every_s = health_every_s
        self.refresh_snapshots = refresh_snapshots
        self.snapshot_every_s = snapshot_every_s
        self.threads_alive = threads_alive

    def loop(self) -> None:
        now = time.monotonic()
        next_health = now + min(1.0, self.health_every_s)
        next_snapshot = now + self.snapshot_every_s
        watchdog_s = self.notifier.watchdog_s
        next_watchdog = now
        while not self.stopped.wait(TICK_S):
            now = time.monotonic()
            self.expire(now)
            if now >= next_health:
                next_health = now + self.health_every_s
                self.publish_health()
            if self.snapshot_every_s and now >= next_snapshot:
                next_snapshot = now + self.snapshot_every_s
                self.refresh_snapshots()
            if watchdog_s and now >= next_watchdog:
                next_watchdog = now + watchdog_s / 2
                if self.threads_alive():
                    self.notifier.notify("WATCHDOG=1")


def rss_bytes() -> int | None:
    """This process's resident memory (Linux), for the health topic."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None
