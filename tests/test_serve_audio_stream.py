"""Live audio streams over a real mosquitto, with the tiny Voxtral engine and the real Silero VAD:
utterances found in streamed speech (espeak-ng), their transcripts, idle and vanished clients."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

import edge_sdk
from edge_sdk.client import BusyError, Client, UnsupportedMediaError
from edge_sdk.media.audio import load_audio
from edge_sdk.serve.broker import mosquitto_binary
from mqtt_broker import *  # noqa: F401,F403
from test_serve_audio import voxtral_model  # noqa: F401  (the module fixture)

pytestmark = [pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto not installed"),
              pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng makes the speech")]
CHUNK = 1280  # 80 ms


@pytest.fixture(scope="module")
def utterances(tmp_path_factory):
    d = tmp_path_factory.mktemp("speech")
    out = []
    for i, text in enumerate(["bring the red box to dock two", "stop"]):
        subprocess.run(["espeak-ng", "-w", str(d / f"{i}.wav"), text], check=True)
        out.append(load_audio(d / f"{i}.wav"))
    return out


def _quantized(x: np.ndarray) -> np.ndarray:
    """What the device hears: the samples as PCM16."""
    return (np.clip(x, -1, 1) * 32767).astype("<i2").astype(np.float32) / 32768.0


def test_a_stream_gives_voice_events_and_one_transcript_per_utterance(voxtral_model, start_daemon, mosquitto,  # noqa: F811
                                                                        utterances):
    from edge_sdk.media.vad import find_speech

    d = start_daemon(voxtral_model)
    gap = np.zeros(16000, np.float32)
    audio = _quantized(np.concatenate([gap, utterances[0], gap, utterances[1], gap]))
    want = [voxtral_model.transcribe(seg.samples, max_tokens=6) for seg in find_speech(audio)]
    assert len(want) == 2
    with Client(mosquitto.host, mosquitto.port, d.s.device_id, timeout=30) as c:
        stream = c.audio_stream(max_tokens=6)
        for i in range(0, len(audio), CHUNK):
            stream.send(audio[i:i + CHUNK])
        stream.close()
        events = list(stream.events(timeout=30))
    kinds = [e["type"] for e in events]
    assert kinds[0] == "voice_started" and kinds.count("voice_started") == kinds.count("voice_stopped") == 2
    assert [e["reason"] for e in events if e["type"] == "stream_closed"] == ["closed"]
    transcripts = sorted((e for e in events if e["type"] == "transcript"), key=lambda e: e["utterance"])
    assert [(t["text"], t["tokens"]) for t in transcripts] == [(w.text, w.tokens) for w in want]
    # each utterance's transcript follows its voice_stopped
    position = {(e["type"], e.get("utterance")): i for i, e in enumerate(events)}
    assert all(position[("transcript", n)] > position[("voice_stopped", n)] for n in (0, 1))


def test_an_idle_stream_is_closed(voxtral_model, start_daemon, mosquitto):  # noqa: F811
    d = start_daemon(voxtral_model, audio_stream_idle_s=1.0)
    with Client(mosquitto.host, mosquitto.port, d.s.device_id, timeout=30) as c:
        stream = c.audio_stream()
        stream.send(np.zeros(CHUNK, np.float32))
        events = list(stream.events(timeout=10))
    assert [e["type"] for e in events] == ["stream_closed"] and events[0]["reason"] == "idle"


def test_limits_and_devices_without_audio(voxtral_model, start_daemon, mosquitto, tiny_checkpoints,  # noqa: F811
                                          build_package):
    d = start_daemon(voxtral_model, max_audio_streams=1)
    with Client(mosquitto.host, mosquitto.port, d.s.device_id, timeout=30) as c:
        first = c.audio_stream()
        with pytest.raises(BusyError, match="max_audio_streams"):
            c.audio_stream()
        first.close()
        assert [e["type"] for e in first.events(timeout=10)][-1] == "stream_closed"
        c.audio_stream().close()  # the slot is free again
    text = start_daemon(edge_sdk.load(build_package(tiny_checkpoints["text"], "int4", block_size=32)))
    with Client(mosquitto.host, mosquitto.port, text.s.device_id, timeout=30) as c:
        with pytest.raises(UnsupportedMediaError, match="takes no audio"):
            c.audio_stream()


DYING_CLIENT = """
import os, sys, numpy as np
from edge_sdk.client import Client
c = Client(sys.argv[1], int(sys.argv[2]), sys.argv[3], keepalive=1, timeout=10)
s = c.audio_stream()
s.send(np.zeros(1280, np.float32))
print("streaming", flush=True)
os._exit(1)  # no disconnect, no close: as a crashed firmware would
"""


def test_a_client_that_dies_mid_stream_leaves_nothing_running(voxtral_model, start_daemon, mosquitto):  # noqa: F811
    d = start_daemon(voxtral_model)
    p = subprocess.run([sys.executable, "-c", DYING_CLIENT, mosquitto.host, str(mosquitto.port), d.s.device_id],
                       capture_output=True, timeout=30)
    assert b"streaming" in p.stdout, p.stderr.decode()
    deadline = time.monotonic() + 10
    while d.streams._open and time.monotonic() < deadline:  # the broker sends its Last Will after ~1.5 s
        time.sleep(0.1)
    assert not d.streams._open


def test_async_audio_stream(voxtral_model, start_daemon, mosquitto, utterances):  # noqa: F811
    import asyncio

    from edge_sdk.client import AsyncClient
    from edge_sdk.media.vad import find_speech

    d = start_daemon(voxtral_model)
    gap = np.zeros(16000, np.float32)
    audio = _quantized(np.concatenate([gap, utterances[1], gap]))
    want = [voxtral_model.transcribe(seg.samples, max_tokens=4) for seg in find_speech(audio)]

    async def main():
        async with AsyncClient(mosquitto.host, mosquitto.port, d.s.device_id, timeout=30) as c:
            async with await c.audio_stream(max_tokens=4) as stream:
                for i in range(0, len(audio), CHUNK):
                    await stream.send(audio[i:i + CHUNK])
            return [ev async for ev in stream.events(timeout=30)]

    events = asyncio.run(main())
    assert [e["type"] for e in events][-1] in ("stream_closed", "transcript")
    assert [(e["text"], e["tokens"]) for e in events if e["type"] == "transcript"] == [(w.text, w.tokens) for w in want]
