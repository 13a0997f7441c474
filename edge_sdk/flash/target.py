"""Where `make flash` installs: this machine, or a device over SSH (key authentication only).

Every device-side step is a subcommand of device.sh, sent over the connection on stdin, so the
device needs nothing of ours before the first flash. Files go by rsync, which sends only what
changed; its statistics are how a flash proves that a second run transferred nothing.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

DEVICE_SCRIPT = Path(__file__).with_name("device.sh")


class TargetError(RuntimeError):
    """A device-side step failed; the message names the step and what it printed."""


@dataclass(frozen=True)
class Transfer:
    files: int  # regular files sent
    bytes: int  # of their contents


@dataclass
class Target:
    """``host`` None: this machine. Else ``[user@]host`` reached with ``ssh`` (BatchMode: a
    missing key fails at once instead of asking for a password)."""

    host: str | None = None
    port: int = 22
    identity: str | None = None
    ssh_options: tuple[str, ...] = ()
    sudo: bool = False  # set once the facts say the login is not root

    @classmethod
    def parse(cls, spec: str | None, **kwargs) -> Target:
        """'' or 'local' -> this machine; 'user@host[:port]' -> SSH."""
        if not spec or spec == "local":
            return cls(None, **kwargs)
        host, _, port = spec.partition(":")
        return cls(host, int(port) if port else 22, **kwargs)

    @property
    def name(self) -> str:
        return self.host or "this machine"

    def _ssh(self) -> list[str]:
        cmd = ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10", "-p", str(self.port)]
        if self.identity:
            cmd += ["-i", self.identity]
        return cmd + [o for opt in self.ssh_options for o in ("-o", opt)]

    def step(self, subcommand: str, *args: str, timeout: float = 1800) -> dict[str, str]:
        """Run ``device.sh SUBCOMMAND ARGS`` as root there; its ``key=value`` lines as a dict."""
        script = DEVICE_SCRIPT.read_bytes()
        remote = "bash -s -- " + " ".join(shlex.quote(a) for a in (subcommand, *args))
        if self.host is None:
            cmd = ["bash", "-c", remote]
        else:
            cmd = self._ssh() + [self.host, ("sudo -n " if self.sudo else "") + remote]
        try:
            proc = subprocess.run(cmd, input=script, capture_output=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise TargetError(f"{self.name}: `{subcommand}` did not finish in {timeout:.0f} s") from None
        out, err = proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace")
        if proc.returncode != 0:
            if self.host is not None and proc.returncode == 255:
                raise TargetError(f"{self.name}: ssh failed: {err.strip().splitlines()[-1] if err.strip() else 'no reason given'}"
                                  " (key authentication only: ssh-copy-id first)")
            detail = (err.strip() or out.strip()).splitlines()[-5:]
            raise TargetError(f"{self.name}: `{subcommand}` failed (exit {proc.returncode}): " + " | ".join(detail))
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line and not line.startswith(" "))

    def push(self, src: Path, dest: str, *, files_from: list[str] | None = None, link_dest: str | None = None,
             delete: bool = True) -> Transfer:
        """rsync ``src`` (a folder) to ``dest`` there; only changed files travel."""
        cmd = ["rsync", "-a", "--stats"] + (["--delete"] if delete else [])
        if link_dest:
            cmd.append(f"--link-dest={link_dest}")
        if files_from is not None:
            cmd += ["--files-from=-"]
        if self.host is not None:
            cmd += ["-e", shlex.join(self._ssh())] + (["--rsync-path", "sudo -n rsync"] if self.sudo else [])
            target = f"{self.host}:{dest}/"
        else:
            target = f"{dest}/"
        cmd += [f"{src}/", target]
        proc = subprocess.run(cmd, input="\n".join(files_from or []), capture_output=True, text=True)
        if proc.returncode != 0:
            raise TargetError(f"{self.name}: copying {src} to {dest} failed: {proc.stderr.strip()[-400:]}")
        files = re.search(r"Number of regular files transferred: ([\d,]+)", proc.stdout)
        size = re.search(r"Total transferred file size: ([\d,]+)", proc.stdout)
        return Transfer(int(files.group(1).replace(",", "")) if files else 0,
                        int(size.group(1).replace(",", "")) if size else 0)
