"""The written contract: JSON Schemas in sync with the models, request validation rules, topic
helpers, settings precedence (file < env < flags), the CLI flags, sd_notify."""

from __future__ import annotations

import argparse
import json
import socket

import pytest
from pydantic import ValidationError

from edge_sdk.protocol.topics import Topics, check_device_id, sanitize_device_id
from edge_sdk.serve.cli import add_serve_arguments, run_schema, settings_from_args
from edge_sdk.serve.config import ServeSettings
from edge_sdk.protocol.json_schema import SCHEMA_DIR, json_schemas
from edge_sdk.protocol.models import CancelRequest, ChatRequest
from edge_sdk.serve.sdnotify import Notifier


def test_committed_schemas_match_the_models():
    """Changing a payload model changes the contract: regenerate with
    ``python -m edge_sdk.serve schema --out edge_sdk/protocol/schemas`` and bump SCHEMA_VERSION."""
    for name, schema in json_schemas().items():
        path = SCHEMA_DIR / f"{name}.schema.json"
        assert path.exists(), f"missing {path}"
        assert json.loads(path.read_text()) == json.loads(json.dumps(schema)), f"{path} is stale"


def test_schema_cli(capsys, tmp_path):
    assert run_schema(argparse.Namespace(out=None, name="chat_request")) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["additionalProperties"] is False and "messages" in s["properties"]
    assert run_schema(argparse.Namespace(out=str(tmp_path), name=None)) == 0
    assert (tmp_path / "result.schema.json").exists()


def test_chat_request_rules():
    ok = ChatRequest.model_validate({"messages": [{"role": "user", "content": "hi"}]})
    assert ok.stream is True and ok.priority == 5 and ok.temperature == 0.0
    ChatRequest.model_validate({"prompt": [1, 2, 3], "max_tokens": 4, "temperature": 1})  # int for float is fine
    bad = [
        {},  # no prompt
        {"prompt": "a", "messages": [{"role": "user", "content": "b"}]},  # both
        {"prompt": "a", "max_tokens": "4"},  # string for int: no coercion
        {"prompt": "a", "stream": "yes"},
        {"prompt": "a", "stream": 1},
        {"prompt": "a", "unknown": 1},
        {"prompt": "a", "v": 2},
        {"prompt": "a", "request_id": "has space"},
        {"prompt": "a", "top_p": 0},
        {"prompt": "a", "priority": 10},
        {"messages": []},
        {"messages": [{"role": "user", "content": [{"type": "video", "url": "x"}]}]},
        {"messages": [{"role": "user", "content": [{"type": "image"}]}]},
        {"messages": [{"role": "user", "content": [{"type": "image", "camera": "a", "data": "aGk="}]}]},
        {"messages": [{"role": "user", "content": [{"type": "image", "data": "not base64!"}]}]},
    ]
    for b in bad:
        with pytest.raises(ValidationError):
            ChatRequest.model_validate(b)
    img = ChatRequest.model_validate({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this?"}, {"type": "image", "camera": "front"}]}]})
    assert img.messages[0].content[1].camera == "front"
    CancelRequest.model_validate({"request_id": "r1"})
    CancelRequest.model_validate({"all": True})
    with pytest.raises(ValidationError):
        CancelRequest.model_validate({})
    with pytest.raises(ValidationError):
        CancelRequest.model_validate({"request_id": "r1", "all": True})


def test_topics():
    t = Topics("edge", "jetson")
    assert t.status == "edge/v1/jetson/status"
    assert t.request("alice", "chat") == "edge/v1/jetson/req/alice/chat"
    assert t.inbox("alice") == "edge/v1/clients/alice/res/jetson"
    assert t.parse_request("edge/v1/jetson/req/alice/chat") == ("alice", "chat", [])
    assert t.parse_request("edge/v1/jetson/req/alice/chat/x") == ("alice", "chat", ["x"])
    assert t.parse_request("edge/v1/jetson/req/chat") is None
    assert t.parse_request("edge/v1/other/req/a/chat") is None
    with pytest.raises(ValueError):
        check_device_id("Has_Caps")
    with pytest.raises(ValueError):
        check_device_id("clients")
    assert sanitize_device_id("Jetson_Orin.local") == "jetson-orin-local"


def test_settings_precedence(tmp_path, monkeypatch):
    cfg = tmp_path / "serve.toml"
    cfg.write_text('[serve]\nhost = "broker.lan"\nport = 1884\ndevice_id = "from-file"\nqueue_length = 3\n')
    s = ServeSettings.load(cfg)
    assert (s.host, s.port, s.device_id, s.queue_length) == ("broker.lan", 1884, "from-file", 3)
    monkeypatch.setenv("EDGE_SDK_PORT", "1885")
    monkeypatch.setenv("EDGE_SDK_PASSWORD", "pw")
    s = ServeSettings.load(cfg)
    assert s.port == 1885 and s.host == "broker.lan" and s.password.get_secret_value() == "pw"
    assert "pw" not in repr(s)
    s = ServeSettings.load(cfg, port=1886, device_id=None)
    assert s.port == 1886 and s.device_id == "from-file"
    js = tmp_path / "serve.json"
    js.write_text(json.dumps({"device-id": "json-dev"}))
    assert ServeSettings.load(js).device_id == "json-dev"
    with pytest.raises(ValidationError):
        ServeSettings.load(cfg, device_id="Bad Id")
    bad = tmp_path / "bad.toml"
    bad.write_text("no_such_setting = 1\n")
    with pytest.raises(ValidationError):
        ServeSettings.load(bad)


def test_cli_flags(tmp_path, monkeypatch):
    monkeypatch.delenv("EDGE_SDK_PORT", raising=False)
    p = argparse.ArgumentParser()
    add_serve_arguments(p)
    a = p.parse_args(["engines/tiny", "--host", "10.0.0.2", "--port", "1999", "--device-id", "orin-7",
                      "--queue-length", "5", "--tls-insecure"])
    s = settings_from_args(a)
    assert a.engine == ["engines/tiny"]
    assert (s.host, s.port, s.device_id, s.queue_length, s.tls_insecure) == ("10.0.0.2", 1999, "orin-7", 5, True)


def test_the_kv_cache_setting_reaches_each_package_load(tmp_path, monkeypatch):
    """--kv-cache (or EDGE_SDK_KV_CACHE, or the file's key) is passed to edge_sdk.load for every
    package the daemon serves; a value the backend has no cache for is refused before loading."""
    import edge_sdk
    from edge_sdk.serve import cli

    p = argparse.ArgumentParser()
    add_serve_arguments(p)
    assert settings_from_args(p.parse_args(["pkg"])).kv_cache == "float16"
    assert settings_from_args(p.parse_args(["pkg", "--kv-cache", "int8"])).kv_cache == "int8"
    monkeypatch.setenv("EDGE_SDK_KV_CACHE", "float32")
    assert settings_from_args(p.parse_args(["pkg"])).kv_cache == "float32"
    with pytest.raises(ValidationError):
        ServeSettings.load(None, kv_cache="int4")
    loads = []
    monkeypatch.setattr(edge_sdk, "load", lambda path, **options: loads.append((path, options)) or object())
    monkeypatch.setattr("edge_sdk.serve.models.check_memory", lambda packages: None)
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    models = cli.load_engines([str(tmp_path / "a"), f"second={tmp_path / 'b'}"], kv_cache="int8")
    assert [name for name, _ in models] == [None, "second"]
    assert loads == [(str(tmp_path / "a"), {"kv_cache": "int8"}), (str(tmp_path / "b"), {"kv_cache": "int8"})]


def test_sd_notify(tmp_path):
    path = str(tmp_path / "n.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    srv.bind(path)
    srv.settimeout(2)
    n = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "3000000"})
    assert n.enabled and n.watchdog_s == 3.0
    assert n.notify("READY=1")
    assert srv.recv(100) == b"READY=1"
    n.close()
    srv.close()
    assert not Notifier({}).notify("READY=1")
    assert Notifier({"WATCHDOG_USEC": "5", "WATCHDOG_PID": "1"}).watchdog_s is None


def test_serve_cli_process_end_to_end(tmp_path):
    """`python -m edge_sdk.serve serve ENGINE --host H --port P --device-id ID` in its own process:
    serves, and on SIGTERM stops cleanly with status 'offline'."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from edge_sdk.client import Client
    from edge_sdk.serve.broker import Mosquitto, mosquitto_binary

    if mosquitto_binary() is None:
        pytest.skip("mosquitto not installed")
    tests_dir = Path(__file__).parent
    with Mosquitto() as b:
        env = {**os.environ, "PYTHONPATH": f"{tests_dir}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        p = subprocess.Popen([sys.executable, "-m", "edge_sdk.serve", "serve", "mqtt_broker:FakeModel",
                              "--host", b.host, "--port", str(b.port), "--device-id", "cli-dev"],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            with Client(b.host, b.port, "cli-dev", status_wait=10, timeout=10) as c:
                assert c.chat("hi", max_tokens=4).usage.completion_tokens == 4
                p.send_signal(signal.SIGTERM)
                assert p.wait(10) == 0
                end = time.monotonic() + 3
                while c.status != "offline" and time.monotonic() < end:
                    time.sleep(0.02)
                assert c.status == "offline"
        finally:
            if p.poll() is None:
                p.kill()
                p.wait(5)
        log = p.stdout.read().decode()
        assert "connected to broker" in log and "stopped" in log


def test_shipped_device_files():
    import configparser
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "devices"
    s = ServeSettings.load(root / "systemd" / "serve.toml")
    assert s.device_id == "jetson" and s.username == "edge-daemon"
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str
    unit.read(root / "systemd" / "edge-sdk.service")
    svc = unit["Service"]
    assert svc["Type"] == "notify" and svc["Restart"] == "on-failure" and int(svc["WatchdogSec"]) > 0
    assert "edge-sdk serve" in svc["ExecStart"]
    conf = (root / "mosquitto" / "edge-sdk.conf").read_text()
    for line in ("listener 1883 127.0.0.1", "set_tcp_nodelay true", "allow_anonymous false"):
        assert line in conf.splitlines()
