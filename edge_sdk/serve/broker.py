"""Run a private mosquitto on a free loopback port (tests, ``edge-sdk bench --mqtt``).

The config is generated in a temporary directory; ``extra_conf`` lines are appended (e.g. a
password file and ACL). The process is killed on ``stop()``.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mosquitto_binary() -> str | None:
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.path.exists(p)), None)


class Mosquitto:
    def __init__(self, port: int | None = None, *, extra_conf: str = "", workdir: str | Path | None = None,
                 allow_anonymous: bool = True, max_queued_messages: int | None = None, tcp_nodelay: bool = True):
        self.binary = mosquitto_binary()
        if self.binary is None:
            raise FileNotFoundError("mosquitto not found (apt-get install mosquitto)")
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self._own_dir = workdir is None
        self.dir = Path(workdir or tempfile.mkdtemp(prefix="edge-mosquitto-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.allow_anonymous = allow_anonymous
        self.extra_conf = extra_conf
        self.max_queued_messages = max_queued_messages
        self.tcp_nodelay = tcp_nodelay  # False: a stock mosquitto config (Nagle on), for measurements
        self.proc: subprocess.Popen | None = None
        self.conf = self.dir / "mosquitto.conf"
        self.log_path = self.dir / "mosquitto.log"

    def write_conf(self) -> Path:
        lines = [
            "per_listener_settings false",
            f"listener {self.port} {self.host}",
            f"set_tcp_nodelay {'true' if self.tcp_nodelay else 'false'}",
            f"allow_anonymous {'true' if self.allow_anonymous else 'false'}",
            "persistence false",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_dest stderr",
        ]
        if os.geteuid() == 0:  # else mosquitto drops to user 'mosquitto', who cannot read our temp dir
            lines.append("user root")
        if self.max_queued_messages is not None:
            lines.append(f"max_queued_messages {self.max_queued_messages}")
        self.conf.write_text("\n".join(lines) + "\n" + self.extra_conf + "\n")
        return self.conf

    def start(self, timeout: float = 5.0) -> "Mosquitto":
        self.write_conf()
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([self.binary, "-c", str(self.conf)], stdout=self._log, stderr=subprocess.STDOUT)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited with {self.proc.returncode}: {self.read_log()[-2000:]}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise TimeoutError(f"mosquitto did not listen on {self.port} within {timeout} s: {self.read_log()[-2000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=3)
        self.proc = None
        if getattr(self, "_log", None):
            self._log.close()
            self._log = None

    def kill(self) -> None:
        """Abrupt end, as a crash or a power cut (SIGKILL)."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=3)
            self.proc = None

    def restart(self) -> "Mosquitto":
        self.stop()
        return self.start()

    def read_log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def cleanup(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "Mosquitto":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.cleanup()
