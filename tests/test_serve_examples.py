"""The shipped examples get a streamed answer from a daemon on a real broker: the C program
(compiled here against libmosquitto), the mosquitto_pub/sub shell script, the Python SDK script."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mqtt_broker import *  # noqa: F401,F403

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
PROMPT = 'Where is the "red" box?\té'


def expected(model_factory, max_tokens=12, seed=7) -> str:
    s = model_factory().stream([{"role": "user", "content": PROMPT}], max_tokens=max_tokens, seed=seed)
    for _ in s:
        pass
    return s.result.text


def _have_libmosquitto() -> bool:
    return shutil.which("cc") is not None and any(
        Path(p, "mosquitto.h").exists() for p in ("/usr/include", "/usr/local/include"))


@pytest.mark.skipif(not _have_libmosquitto(), reason="needs a C compiler and libmosquitto-dev")
def test_c_example_streams_an_answer(serve_model, start_daemon, mosquitto, tmp_path):
    exe = tmp_path / "mqtt_chat"
    subprocess.run(["cc", "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(exe), str(EXAMPLES / "c" / "mqtt_chat.c"),
                    "-lmosquitto"], check=True, capture_output=True, timeout=60)
    d = start_daemon(serve_model(token_delay_s=0.002), coalesce_ms=0)
    p = subprocess.run([str(exe), "-h", mosquitto.host, "-p", str(mosquitto.port), "-d", d.s.device_id,
                        "-n", "12", "-s", "7", "-T", "10", PROMPT], capture_output=True, timeout=15)
    assert p.returncode == 0, p.stderr.decode()
    assert p.stdout.decode() == expected(serve_model) + "\n"
    assert b"finish_reason=length" in p.stderr and b'"completion_tokens":12' in p.stderr
    # an error reply is printed and gives exit status 1
    p = subprocess.run([str(exe), "-h", mosquitto.host, "-p", str(mosquitto.port), "-d", d.s.device_id,
                        "-n", "999999", PROMPT], capture_output=True, timeout=15)
    assert p.returncode == 1 and b"error 400" in p.stderr
    # an absent device: exit status 3, quickly
    p = subprocess.run([str(exe), "-h", mosquitto.host, "-p", str(mosquitto.port), "-d", "ghost", "-T", "1",
                        PROMPT], capture_output=True, timeout=15)
    assert p.returncode == 3


@pytest.mark.skipif(shutil.which("mosquitto_pub") is None or shutil.which("jq") is None,
                    reason="needs mosquitto-clients and jq")
def test_shell_example(serve_model, start_daemon, mosquitto):
    d = start_daemon(serve_model())
    script = EXAMPLES / "shell" / "chat.sh"
    p = subprocess.run(["sh", str(script), "-h", mosquitto.host, "-p", str(mosquitto.port), "-d", d.s.device_id,
                        "-n", "12", "-s", "7", "-T", "10", PROMPT], capture_output=True, timeout=15)
    assert p.returncode == 0, p.stderr.decode()
    assert p.stdout.decode() == expected(serve_model) + "\n"
    p = subprocess.run(["sh", str(script), "-h", mosquitto.host, "-p", str(mosquitto.port), "-d", "ghost",
                        "-T", "1", PROMPT], capture_output=True, timeout=15)
    assert p.returncode == 3


@pytest.mark.parametrize("use_async", [False, True])
def test_python_example(serve_model, start_daemon, mosquitto, use_async):
    d = start_daemon(serve_model())
    args = [sys.executable, str(EXAMPLES / "python" / "chat.py"), "--host", mosquitto.host, "--port",
            str(mosquitto.port), "--device-id", d.s.device_id, "--max-tokens", "12", "--seed", "7", PROMPT]
    p = subprocess.run(args + (["--async"] if use_async else []), capture_output=True, timeout=20, cwd=ROOT)
    assert p.returncode == 0, p.stderr.decode()
    assert p.stdout.decode() == expected(serve_model) + "\n"
