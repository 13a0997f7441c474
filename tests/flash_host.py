"""A test device for `make flash`: a real sshd in a network namespace of its own, reached over a
veth pair whose two addresses exist only between this machine and that namespace.

It runs in a private mount namespace too, so what it writes to /etc, /opt, /var and /run stays
in its own folders, and it shows the files a Jetson's preflight reads where a Jetson has them:
- /etc/nv_tegra_release (the L4T release line), /sys/firmware/devicetree/base/model;
- /usr/local/sbin/nvpmodel (answers `-q` with a power mode);
- TensorRT's NvInferVersion.h under /usr/include/aarch64-linux-gnu (laid over this machine's
  headers, which a Jetson's C compiler has too), /usr/local/cuda/version.json.
It does not stand in for the GPU, TensorRT's libraries or systemd: the daemon runs under the
pid-file supervisor there and on ONNX Runtime (a real Jetson runs it under systemd, on TensorRT).
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import time
from pathlib import Path

L4T_JP6 = "# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64, DATE: Wed Jan  8 01:49:37 UTC 2025"
MODEL = "NVIDIA Jetson Orin Nano Engineering Reference Developer Kit Super"
TRT_VERSION_H = "#define NV_TENSORRT_MAJOR 10\n#define NV_TENSORRT_MINOR 3\n#define NV_TENSORRT_PATCH 0\n"


def missing_tools() -> str | None:
    """Why this machine cannot host the test device, or None."""
    if os.geteuid() != 0:
        return "needs root (network and mount namespaces)"
    for tool in ("ip", "unshare", "rsync", "ssh", "ssh-keygen", "/usr/sbin/sshd", "mosquitto", "mosquitto_passwd"):
        if shutil.which(tool) is None:
            return f"{tool} not installed (make test-flash installs openssh-server, rsync, mosquitto)"
    probe = f"edgeprobe{secrets.token_hex(2)}"
    if subprocess.run(["ip", "netns", "add", probe], capture_output=True).returncode != 0:
        return "cannot create network namespaces here"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


class FlashHost:
    """``with FlashHost(tmp) as host:`` -> host.target() flashes it; host.run(cmd) runs a shell
    command inside it (as the device would)."""

    def __init__(self, work: Path, l4t: str = L4T_JP6, opt_size: str | None = None):
        self.work = Path(work)
        self.l4t, self.opt_size = l4t, opt_size
        tag = secrets.token_hex(2)
        self.ns, self.veth = f"edgeflash{tag}", f"ef{tag}"
        octet = 16 + int(tag, 16) % 200
        self.addr, self.peer = f"10.213.{octet}.2", f"10.213.{octet}.1"
        self.key = self.work / "id_ed25519"
        self.proc: subprocess.Popen | None = None

    # -- the image ------------------------------------------------------------------------------
    def _image(self) -> Path:
        img = self.work / "image"
        (img / "opt").mkdir(parents=True)
        subprocess.run(["cp", "-a", "/etc", str(img / "etc")], check=True)
        (img / "etc" / "nv_tegra_release").write_text(self.l4t + "\n")
        for sub in ("lib/edge-sdk", "lib/mosquitto", "log/mosquitto", "lib/dpkg", "tmp"):
            (img / "var" / sub).mkdir(parents=True, exist_ok=True)
        (img / "firmware" / "devicetree" / "base").mkdir(parents=True)
        (img / "firmware" / "devicetree" / "base" / "model").write_text(MODEL + "\0")
        (img / "sbin").mkdir()
        nvpmodel = img / "sbin" / "nvpmodel"
        nvpmodel.write_text("#!/bin/sh\n[ \"$1\" = -q ] && { echo 'NV Power Mode: MAXN_SUPER'; echo 2; }\n")
        nvpmodel.chmod(0o755)
        (img / "include" / "aarch64-linux-gnu").mkdir(parents=True)
        (img / "include" / "aarch64-linux-gnu" / "NvInferVersion.h").write_text(TRT_VERSION_H)
        (img / "cuda").mkdir()
        (img / "cuda" / "version.json").write_text('{"cuda": {"name": "CUDA SDK", "version": "12.6.68"}}\n')
        ssh = img / "etc" / "ssh"
        for old in ssh.glob("ssh_host_*"):
            old.unlink()
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(ssh / "ssh_host_ed25519_key")], check=True)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.key)], check=True)
        (ssh / "test_authorized_keys").write_text(Path(str(self.key) + ".pub").read_text())
        (ssh / "test_authorized_keys").chmod(0o600)
        (ssh / "sshd_test_config").write_text(
            f"ListenAddress {self.addr}\nPort 22\nHostKey /etc/ssh/ssh_host_ed25519_key\nPermitRootLogin prohibit-password\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
            "AuthorizedKeysFile /etc/ssh/test_authorized_keys\nStrictModes no\nPidFile /run/sshd.pid\n"
            "Subsystem sftp internal-sftp\n")
        return img

    def __enter__(self) -> FlashHost:
        img = self._image()
        sh = lambda *cmd: subprocess.run(list(cmd), check=True, capture_output=True)  # noqa: E731
        sh("ip", "netns", "add", self.ns)
        sh("ip", "link", "add", self.veth, "type", "veth", "peer", "name", self.veth + "d")
        sh("ip", "link", "set", self.veth + "d", "netns", self.ns)
        sh("ip", "addr", "add", f"{self.peer}/30", "dev", self.veth)
        sh("ip", "link", "set", self.veth, "up")
        sh("ip", "netns", "exec", self.ns, "ip", "addr", "add", f"{self.addr}/30", "dev", self.veth + "d")
        sh("ip", "netns", "exec", self.ns, "ip", "link", "set", self.veth + "d", "up")
        sh("ip", "netns", "exec", self.ns, "ip", "link", "set", "lo", "up")
        opt = f"mount -t tmpfs -o size={self.opt_size} none /opt" if self.opt_size else f"mount --bind {img}/opt /opt"
        boot = " && ".join([
            f"mount --bind {img}/etc /etc", opt, f"mount --bind {img}/var /var", "mount -t tmpfs none /run",
            "mkdir -p /run/sshd /run/mosquitto", "mount -t tmpfs none /sys/firmware",
            f"cp -a {img}/firmware/. /sys/firmware/", f"mount --bind {img}/sbin /usr/local/sbin",
            f"mount -t overlay overlay -o lowerdir={img}/include:/usr/include /usr/include", f"mount --bind {img}/cuda /usr/local/cuda",
            "exec /usr/sbin/sshd -D -e -f /etc/ssh/sshd_test_config"])
        self.proc = subprocess.Popen(["ip", "netns", "exec", self.ns, "unshare", "--mount", "--propagation", "private",
                                      "bash", "-c", boot], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                socket.create_connection((self.addr, 22), timeout=0.5).close()
                return self
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"test device did not start: {self.proc.stdout.read().decode()}") from None
                time.sleep(0.1)
        raise RuntimeError("test device's sshd did not listen within 15 s")

    def __exit__(self, *exc) -> None:
        pids = subprocess.run(["ip", "netns", "pids", self.ns], capture_output=True, text=True).stdout.split()
        for pid in pids:
            subprocess.run(["kill", "-KILL", pid], capture_output=True)
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
        subprocess.run(["ip", "link", "del", self.veth], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True)

    def target(self):
        from edge_sdk.flash.target import Target

        return Target(f"root@{self.addr}", identity=str(self.key),
                      ssh_options=("StrictHostKeyChecking=no", "UserKnownHostsFile=/dev/null", "LogLevel=ERROR"))

    def run(self, command: str) -> subprocess.CompletedProcess:
        """A shell command on the device, over its SSH (so in its namespaces)."""
        t = self.target()
        return subprocess.run(t._ssh() + [t.host, command], capture_output=True, text=True)
