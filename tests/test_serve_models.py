"""Several packages in one daemon: a Ministral 3 package for text beside a Voxtral package for
speech, routed by what a request holds or by the model it names; their memory is checked
together before either loads."""

from __future__ import annotations

import pytest

import edge_sdk
from edge_sdk.client import BadRequestError, Client, UnsupportedMediaError
from edge_sdk.serve.broker import mosquitto_binary
from edge_sdk.serve.models import ModelSet, check_memory, parse_packages
from edge_sdk.serve.transport import Refusal
from mqtt_broker import *  # noqa: F401,F403
from test_serve_audio import _speech, voxtral_model  # noqa: F401  (the module fixture)


class _Caps:
    def __init__(self, name, modalities):
        self._caps = {"model": name, "modalities": modalities, "context_length": 64}

    def capabilities(self):
        return self._caps


def test_routing_by_media_and_by_name():
    models = ModelSet([(None, _Caps("mistralai/Ministral-3-3B", ["text", "image"])),
                       ("speech", _Caps("Voxtral-Mini", ["text", "audio"]))])
    assert [s.name for s in models.served] == ["mistralai-Ministral-3-3B", "speech"]
    assert models.route(None, {"text"}, "text") == "mistralai-Ministral-3-3B"  # text: the first
    assert models.route(None, {"text", "image"}, "images") == "mistralai-Ministral-3-3B"
    assert models.route(None, {"audio"}, "audio") == "speech"
    assert models.route("speech", {"text"}, "text") == "speech"
    with pytest.raises(Refusal, match="no model on this device takes images and audio") as e:
        models.route(None, {"text", "image", "audio"}, "images and audio")
    assert e.value.code == "unsupported_media"
    with pytest.raises(Refusal, match="model speech takes no images") as e:
        models.route("speech", {"image"}, "images")
    with pytest.raises(Refusal, match="no model 'big' on this device.*speech") as e:
        models.route("big", {"text"}, "text")
    assert e.value.code == "invalid_request"
    with pytest.raises(ValueError, match="used twice"):
        ModelSet([("a", _Caps("x", ["text"])), ("a", _Caps("y", ["text"]))])
    assert parse_packages(["engines/a", "speech=engines/b"]) == [(None, "engines/a"), ("speech", "engines/b")]


@pytest.fixture(scope="module")
def text_package(tiny_checkpoints, build_package):
    return build_package(tiny_checkpoints["text"], "int4", block_size=32)


@pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto not installed")
def test_a_daemon_serves_text_and_speech_packages_side_by_side(text_package, voxtral_model, start_daemon,  # noqa: F811
                                                               mosquitto):
    text_model = edge_sdk.load(text_package)
    d = start_daemon([("text", text_model), ("speech", voxtral_model)])
    audio = _speech()
    want_text = text_model.generate("hello robot", max_tokens=6, seed=0)
    want_speech = voxtral_model.transcribe(audio, max_tokens=6)
    want_named = voxtral_model.generate("hello robot", max_tokens=6, seed=0)
    with Client(mosquitto.host, mosquitto.port, d.s.device_id, timeout=30) as c:
        caps = c.capabilities()
        assert [(m.name, m.modalities) for m in caps.models] == [("text", ["text"]), ("speech", ["text", "audio"])]
        assert caps.model.name == "text"
        assert c.chat("hello robot", max_tokens=6, seed=0).tokens == want_text.tokens  # text: the default
        assert c.transcribe(audio, max_tokens=6).tokens == want_speech.tokens  # audio: the one that hears
        assert c.chat("hello robot", max_tokens=6, seed=0, model="speech").tokens == want_named.tokens
        with pytest.raises(BadRequestError, match="no model 'vision'"):
            c.chat("hi", model="vision")
        with pytest.raises(UnsupportedMediaError, match="model text takes no audio"):
            c.transcribe(audio, model="text")


def test_memory_of_all_packages_is_checked_before_loading(text_package, voxtral_model, capsys, monkeypatch):  # noqa: F811
    from edge_sdk.serve import models
    from edge_sdk.serve.cli import serve

    packages = [text_package, voxtral_model.package_dir]
    need = check_memory(packages, available=10**12)
    assert need > check_memory(packages[:1], available=10**12) > 0
    with pytest.raises(ValueError, match=rf"need ~.*GB.*{text_package.name}.*{voxtral_model.package_dir.name}.*"
                                         r"this host has free"):
        check_memory(packages, available=need - 1)
    monkeypatch.setattr(models, "mem_available_bytes", lambda: need - 1)
    assert serve([str(p) for p in packages], device_id="mem-check") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("edge-sdk serve: the packages need")


@pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto not installed")
def test_the_serve_command_takes_several_named_packages(text_package, voxtral_model, mosquitto):  # noqa: F811
    import subprocess
    import sys
    import time

    cmd = [sys.executable, "-m", "edge_sdk.cli", "serve", str(text_package), f"speech={voxtral_model.package_dir}",
           "--host", mosquitto.host, "--port", str(mosquitto.port), "--device-id", "two-models"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        with Client(mosquitto.host, mosquitto.port, "two-models", timeout=30, status_wait=30) as c:
            deadline = time.monotonic() + 60
            while c.wait_status(1.0) != "online" and time.monotonic() < deadline:
                pass
            caps = c.capabilities()
            names = [m.name for m in caps.models]
            assert names[1] == "speech" and names[0] == edge_sdk.load(text_package).capabilities()["model"]
            assert c.transcribe(_speech(), max_tokens=4).usage.completion_tokens >= 1
    finally:
        proc.terminate()
        out = proc.communicate(timeout=20)[0].decode()
    assert proc.returncode == 0, out
    assert "serving " in out and "speech (text, audio)" in out
