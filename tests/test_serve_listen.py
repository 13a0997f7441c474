"""Listen jobs over a real mosquitto, with the tiny Voxtral engine and the real Silero VAD: a
daemon-owned microphone (an espeak-ng recording played in real time) is transcribed per
utterance onto each job's events topic; jobs that agree share one transcription; errors,
limits, a lost microphone and a client that dies leave the daemon serving."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile

from edge_sdk.client import Client, ListenError, ListenTranscript, ListenVoice, UnsupportedMediaError
from edge_sdk.client.errors import BusyError
from edge_sdk.media.audio import load_audio
from edge_sdk.serve.broker import mosquitto_binary
from mqtt_broker import *  # noqa: F401,F403
from test_serve_audio import voxtral_model  # noqa: F401  (the module fixture)

pytestmark = [pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto not installed"),
              pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng makes the speech")]
BLOCK = 1024  # the daemon reads its microphones in 64 ms chunks: the file is whole chunks, so each
#               replay meets the VAD frames at the same offsets


@pytest.fixture(scope="module")
def microphone_file(tmp_path_factory):
    """1.5 s of silence, a spoken command, 1.5 s of silence, as a 16 kHz PCM16 WAV."""
    d = tmp_path_factory.mktemp("mic")
    subprocess.run(["espeak-ng", "-w", str(d / "speech.wav"), "bring the red box to dock two"], check=True)
    gap = np.zeros(24000, np.float32)
    audio = np.concatenate([gap, load_audio(d / "speech.wav"), gap])
    audio = np.concatenate([audio, np.zeros(-len(audio) % BLOCK, np.float32)])
    audio = (np.clip(audio, -1, 1) * 32767).astype("<i2").astype(np.float32) / 32768.0  # what the WAV holds
    path = d / "desk.wav"
    soundfile.write(path, audio, 16000, subtype="PCM_16")
    return path, audio


def _until_transcript(handle, timeout: float = 30.0) -> list:
    events, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        ev = handle.get(timeout=max(0.1, deadline - time.monotonic()))
        events.append(ev)
        if isinstance(ev, (ListenTranscript, ListenError)):
            return events
    raise AssertionError(f"no transcript within {timeout} s: {events}")


def test_a_listen_job_transcribes_each_utterance_and_jobs_that_agree_share_one_run(
        voxtral_model, start_daemon, mosquitto, microphone_file):  # noqa: F811
    from edge_sdk.media.vad import find_speech

    path, audio = microphone_file
    (segment,) = find_speech(audio)
    want = voxtral_model.transcribe(segment.samples, max_tokens=6)
    d = start_daemon(voxtral_model, microphones={"desk": str(path)}, microphone_loop=True)
    with Client(mosquitto.host, mosquitto.port, d.s.device_id, timeout=30) as alice, \
            Client(mosquitto.host, mosquitto.port, d.s.device_id, timeout=30) as bob:
        caps = alice.capabilities()
        assert caps.microphones == ["desk"] and "listen" in caps.ops
        assert caps.topics["listen_events"].endswith("/events/{microphone}/listen/{client}/{job_id}")
        with alice.listen("desk", max_tokens=6, event_timeout=30) as a, bob.listen("desk", max_tokens=6) as b:
            assert a.registration.microphone == "desk" and a.registration.events_topic == a.events_topic
            completed = d.stats["completed"]
            got_a, got_b = _until_transcript(a), _until_transcript(b)
        deadline = time.monotonic() + 5
        while len(d.listen) and time.monotonic() < deadline:  # leaving the with blocks cancelled both
            time.sleep(0.05)
        assert len(d.listen) == 0
    for got in (got_a, got_b):
        voice = [e for e in got if isinstance(e, ListenVoice)]
        transcript = got[-1]
        assert [v.type for v in voice][-2:] == ["voice_started", "voice_stopped"]
        assert isinstance(transcript, ListenTranscript) and transcript.utterance == voice[-1].utterance
        assert (transcript.text, transcript.tokens) == (want.text, want.tokens)
        # where in the microphone's audio: the same span find_speech gives, on the replay it heard
        period = len(audio) / 16000
        assert transcript.start_s % period == pytest.approx(segment.start_s, abs=0.05)
        assert transcript.end_s - transcript.start_s == pytest.approx(segment.end_s - segment.start_s, abs=0.05)
        assert [e.seq for e in got] == list(range(got[0].seq, got[0].seq + len(got)))
    assert got_a[-1].start_s == got_b[-1].start_s
    assert d.stats["completed"] - completed == 1  # one transcription served both jobs


def test_listen_refusals_and_limits(voxtral_model, start_daemon, mosquitto, microphone_file, serve_model):  # noqa: F811
    path, _ = microphone_file
    d = start_daemon(voxtral_model, microphones={"desk": str(path)}, max_listen_jobs=1)
    with Client(mosquitto.host, mosquitto.port, d.s.device_id, timeout=30) as c:
        with pytest.raises(UnsupportedMediaError, match="no microphone 'hall'.*desk"):
            c.listen("hall")
        first = c.listen("desk")
        with pytest.raises(BusyError, match="max_listen_jobs"):
            c.listen("desk")
        again = c.listen("desk", job_id=first.job_id)  # the same id again: the same job
        assert again.registration.job_id == first.job_id
        again.detach()
        first.cancel()
        c.listen("desk").cancel()  # the slot is free again
    text = start_daemon(serve_model(), microphones={"desk": str(path)})
    with Client(mosquitto.host, mosquitto.port, text.s.device_id, timeout=30) as c:
        with pytest.raises(UnsupportedMediaError, match="takes no audio"):
            c.listen("desk")
        assert c.chat("still serving", max_tokens=2).usage.completion_tokens == 2


def test_a_lost_microphone_is_reported_once_and_the_job_goes_on(voxtral_model, start_daemon, mosquitto,  # noqa: F811
                                                                  tmp_path):
    d = start_daemon(voxtral_model, microphones={"desk": str(tmp_path / "unplugged.wav")}, microphone_loop=True,
                     microphone_timeout_s=0.3)
    with Client(mosquitto.host, mosquitto.port, d.s.device_id, timeout=30) as c:
        with c.listen("desk", event_timeout=10) as h:
            ev = h.get(timeout=10)
            assert isinstance(ev, ListenError) and ev.code == "microphone_unavailable" and "unplugged.wav" in ev.message
            with pytest.raises(Exception, match="no listen event"):
                h.get(timeout=1.0)  # once per outage, not once per tick
        assert d.health()["microphones"]["desk"]["connected"] is False
        assert c.chat([{"role": "user", "content": "hi"}], max_tokens=2).usage.completion_tokens == 2


DYING_CLIENT = """
import os, sys
from edge_sdk.client import Client
c = Client(sys.argv[1], int(sys.argv[2]), sys.argv[3], keepalive=1, timeout=10)
c.listen("desk")
print("listening", flush=True)
os._exit(1)  # no cancel, no disconnect: as a crashed app would
"""


def test_a_client_that_dies_leaves_no_listen_job(voxtral_model, start_daemon, mosquitto, microphone_file):  # noqa: F811
    path, _ = microphone_file
    d = start_daemon(voxtral_model, microphones={"desk": str(path)})
    p = subprocess.run([sys.executable, "-c", DYING_CLIENT, mosquitto.host, str(mosquitto.port), d.s.device_id],
                       capture_output=True, timeout=30)
    assert b"listening" in p.stdout, p.stderr.decode()  # printed once the device registered the job
    deadline = time.monotonic() + 10
    while len(d.listen) and time.monotonic() < deadline:  # the broker sends its Last Will after ~1.5 s
        time.sleep(0.1)
    assert len(d.listen) == 0


def test_async_listen(voxtral_model, start_daemon, mosquitto, microphone_file):  # noqa: F811
    import asyncio

    from edge_sdk.client import AsyncClient

    path, audio = microphone_file
    d = start_daemon(voxtral_model, microphones={"desk": str(path)}, microphone_loop=True)

    async def main():
        async with AsyncClient(mosquitto.host, mosquitto.port, d.s.device_id, timeout=30) as c:
            async with await c.listen("desk", max_tokens=4, event_timeout=30) as h:
                async for ev in h:
                    if isinstance(ev, ListenTranscript):
                        return ev

    ev = asyncio.run(main())
    assert ev.microphone == "desk" and ev.usage.completion_tokens >= 1 and ev.end_s > ev.start_s


@pytest.mark.skipif(shutil.which("mosquitto_pub") is None or shutil.which("jq") is None,
                    reason="needs mosquitto-clients and jq")
def test_shell_listen_example(voxtral_model, start_daemon, mosquitto, microphone_file):  # noqa: F811
    from pathlib import Path

    from edge_sdk.media.vad import find_speech

    path, audio = microphone_file
    (segment,) = find_speech(audio)
    want = voxtral_model.transcribe(segment.samples, max_tokens=6)
    d = start_daemon(voxtral_model, microphones={"desk": str(path)}, microphone_loop=True)
    script = Path(__file__).resolve().parents[1] / "examples" / "shell" / "listen.sh"
    base = ["sh", str(script), "-h", mosquitto.host, "-p", str(mosquitto.port), "-d", d.s.device_id, "-T", "20"]
    p = subprocess.run(base + ["-n", "6", "-c", "1", "desk"], capture_output=True, timeout=40)
    assert p.returncode == 0, p.stderr.decode()
    assert p.stdout.decode() == want.text + "\n"
    assert b"[voice_stopped" in p.stderr
    deadline = time.monotonic() + 5
    while len(d.listen) and time.monotonic() < deadline:  # the script cancelled its job on exit
        time.sleep(0.05)
    assert len(d.listen) == 0
    p = subprocess.run(base + ["hall"], capture_output=True, timeout=30)
    assert p.returncode == 1 and b"error 415 unsupported_media" in p.stderr
