"""`make serve`'s script: the shipped broker config (passwords + ACL) and the daemon, on this machine."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import edge_sdk
from edge_sdk.client import BrokerConnectionError, Client
from edge_sdk.serve.broker import free_port

SCRIPT = Path(__file__).resolve().parent.parent / "devices" / "serve_local.sh"


def read_env(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().split())


def test_serve_local_script_serves_authenticated_clients_only(tiny_checkpoints, build_package, tmp_path):
    pkg = build_package(tiny_checkpoints["text"])
    port = free_port()
    env = dict(os.environ, WORK=str(tmp_path / "broker"), EDGE_SDK=str(Path(sys.executable).parent / "edge-sdk"))
    proc = subprocess.Popen(["bash", str(SCRIPT), str(pkg), str(port)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        passwords = tmp_path / "broker" / "passwords.env"
        deadline = time.monotonic() + 20
        while not passwords.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        password = read_env(passwords)["DEMO_PASSWORD"]
        with Client(port=port, device_id="demo", username="demo", password=password, status_wait=20) as client:
            answer = client.chat([{"role": "user", "content": "hello"}], max_tokens=6, seed=1)
        assert answer.tokens == edge_sdk.load(pkg).generate("hello", max_tokens=6, seed=1).tokens
        with pytest.raises(BrokerConnectionError):
            Client(port=port, device_id="demo", connect_timeout=3)  # anonymous: refused by the shipped config
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)
