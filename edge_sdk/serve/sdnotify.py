"""systemd's sd_notify protocol over $NOTIFY_SOCKET with the standard library only.

``Type=notify`` units wait for ``READY=1``; with ``WatchdogSec=`` systemd kills and restarts a
daemon that stops sending ``WATCHDOG=1`` within the interval ($WATCHDOG_USEC).
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


class Notifier:
    def __init__(self, env: dict | None = None):
        env = os.environ if env is None else env
        self.address = env.get("NOTIFY_SOCKET") or None
        usec = env.get("WATCHDOG_USEC")
        pid = env.get("WATCHDOG_PID")
        self.watchdog_s: float | None = None
        if usec and (not pid or pid == str(os.getpid())):
            try:
                self.watchdog_s = int(usec) / 1e6
            except ValueError:
                pass
        self._sock: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, state: str) -> bool:
        """Send e.g. 'READY=1', 'WATCHDOG=1', 'STOPPING=1', 'STATUS=...'. False if no socket or it failed."""
        if not self.address:
            return False
        addr = self.address
        if addr.startswith("@"):  # abstract namespace
            addr = "\0" + addr[1:]
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(state.encode(), addr)
            return True
        except OSError as e:
            log.warning("sd_notify(%s) failed: %s", state.split("\n")[0], e)
            return False

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
