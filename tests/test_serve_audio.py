"""Audio over MQTT against a real mosquitto and the real tiny Voxtral engine: one-shot
transcription (MQTT 5 binary WAV, base64 PCM, float32 samples), chat with an audio part, bad
audio with its own error code while the daemon keeps serving, and devices without audio."""

from __future__ import annotations

import io
import wave

import numpy as np
import pytest

import edge_sdk
from edge_sdk.client import BadRequestError, Client, InvalidAudioError, UnsupportedMediaError
from edge_sdk.client.payloads import build_transcribe_payload
from edge_sdk.serve.broker import mosquitto_binary
from mqtt_broker import *  # noqa: F401,F403

pytestmark = pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto not installed")


@pytest.fixture(scope="module")
def voxtral_model(tmp_path_factory):
    from edge_sdk.build import build
    from edge_sdk.quant import QuantRecipe
    from edge_sdk.tiny import make_voxtral_checkpoint
    from edge_sdk.tiny_tokenizer import make_tekken_file

    root = tmp_path_factory.mktemp("voxtral-serve")
    ckpt = make_voxtral_checkpoint(root / "ckpt", seed=2)
    make_tekken_file(ckpt / "tekken.json", vocab_size=4096, audio=True)
    return edge_sdk.load(build(ckpt, QuantRecipe(method="none"), out=root / "pkg", progress=False))


def _speech(seconds: float = 1.5) -> np.ndarray:
    t = np.arange(int(seconds * 16000)) / 16000
    return (0.3 * np.sin(2 * np.pi * 220 * t) * np.sin(2 * np.pi * 3 * t)).astype(np.float32)


def _wav(samples: np.ndarray, rate: int = 16000) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((samples * 32767).astype("<i2").tobytes())
    return buf.getvalue()


def test_transcribe_binary_wav_base64_pcm_and_samples_match_in_process(voxtral_model, start_daemon, mosquitto):
    d = start_daemon(voxtral_model)
    audio = _speech()
    pcm = (audio * 32767).astype("<i2")
    want = voxtral_model.transcribe(pcm.astype(np.float32) / 32768.0, max_tokens=8).tokens
    with Client(mosquitto.host, mosquitto.port, d.s.device_id, timeout=30) as c:
        caps = c.capabilities()
        assert "transcribe" in caps.ops and "audio" in caps.model.modalities
        assert c.transcribe(_wav(audio), max_tokens=8).tokens == want  # MQTT 5 binary payload, audio/wav
        assert c.transcribe(pcm.tobytes(), mime="audio/pcm;rate=16000", max_tokens=8).tokens == want
        assert c.transcribe(pcm.astype(np.float32) / 32768.0, max_tokens=8).tokens == want
        streamed = c.transcribe(_wav(audio), max_tokens=8, stream=True)
        assert "".join(d.text for d in streamed) == streamed.result.text
        # base64 inline, for clients without MQTT 5 binary payloads
        payload, _ = build_transcribe_payload(_wav(audio), max_tokens=8, binary=False)
        assert payload["audio"]["mime"] == "audio/wav" and "data" in payload["audio"]


def test_chat_with_an_audio_part_matches_in_process(voxtral_model, start_daemon, mosquitto):
    d = start_daemon(voxtral_model)
    audio = _speech(1.0)
    messages = [{"role": "user", "content": [{"type": "audio", "audio": _wav(audio)},
                                             {"type": "text", "text": "What was said?"}]}]
    pcm = (audio * 32767).astype("<i2").astype(np.float32) / 32768.0
    want = voxtral_model.generate([{"role": "user", "content": [{"type": "audio", "audio": pcm},
                                                                {"type": "text", "text": "What was said?"}]}],
                                  max_tokens=6).tokens
    with Client(mosquitto.host, mosquitto.port, d.s.device_id, timeout=30) as c:
        assert c.chat(messages, max_tokens=6).tokens == want


def test_bad_audio_gets_invalid_audio_and_the_daemon_keeps_serving(voxtral_model, start_daemon, mosquitto):
    d = start_daemon(voxtral_model, max_audio_s=2.0, max_audio_bytes=200_000)
    with Client(mosquitto.host, mosquitto.port, d.s.device_id, timeout=30) as c:
        with pytest.raises(InvalidAudioError, match="not a readable WAV/FLAC/OGG file"):
            c.transcribe(b"RIFF\x10\x00\x00\x00WAVEjunkjunkjunk", max_tokens=2)
        with pytest.raises(InvalidAudioError, match="not a whole number of 16-bit frames"):
            c.transcribe(b"\x00\x01\x02", mime="audio/pcm;rate=16000", max_tokens=2)
        with pytest.raises(InvalidAudioError, match="sample rate 4000 Hz is outside"):
            c.transcribe(bytes(4000), mime="audio/pcm;rate=4000", max_tokens=2)
        with pytest.raises(InvalidAudioError, match=r"3\.0 s of audio is longer than the 2 s limit"):
            c.transcribe(_wav(_speech(3.0)), max_tokens=2)
        with pytest.raises(BadRequestError, match="exceeds max_audio_bytes"):
            c.transcribe(bytes(300_000), mime="audio/pcm;rate=16000", max_tokens=2)
        with pytest.raises(ValueError, match="cannot tell the audio format"):
            c.transcribe(b"\x00" * 100, max_tokens=2)  # refused by the SDK before sending
        assert c.transcribe(_wav(_speech(1.0)), max_tokens=2).tokens  # still serving
    assert d.stats["connects"] == 1


def test_a_device_without_audio_refuses_it(tiny_checkpoints, build_package, start_daemon, mosquitto):
    d = start_daemon(edge_sdk.load(build_package(tiny_checkpoints["text"], "int4", block_size=32)))
    with Client(mosquitto.host, mosquitto.port, d.s.device_id, timeout=30) as c:
        with pytest.raises(UnsupportedMediaError, match="takes no audio"):
            c.transcribe(_wav(_speech(1.0)))
        with pytest.raises(UnsupportedMediaError, match="takes no audio"):
            c.chat([{"role": "user", "content": [{"type": "audio", "audio": _wav(_speech(1.0))},
                                                 {"type": "text", "text": "hi"}]}])
        assert c.chat("still here?", max_tokens=2).tokens


@pytest.mark.parametrize("example", ["shell", "c"])
def test_examples_transcribe_and_chat_about_audio(voxtral_model, start_daemon, mosquitto, tmp_path, example):
    import shutil
    import subprocess
    from pathlib import Path

    examples = Path(__file__).parent.parent / "examples"
    if example == "c":
        if shutil.which("cc") is None:
            pytest.skip("no C compiler")
        exe = tmp_path / "mqtt_chat"
        subprocess.run(["cc", "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(exe), str(examples / "c" / "mqtt_chat.c"),
                        "-lmosquitto"], check=True, capture_output=True, timeout=60)
        program = [str(exe)]
    else:
        program = ["sh", str(examples / "shell" / "chat.sh")]
    d = start_daemon(voxtral_model)
    clip = tmp_path / "command.wav"
    clip.write_bytes(_wav(_speech(1.0)))
    pcm = (_speech(1.0) * 32767).astype("<i2").astype(np.float32) / 32768.0
    base = program + ["-h", mosquitto.host, "-p", str(mosquitto.port), "-d", d.s.device_id, "-n", "6", "-T", "20",
                      "-a", str(clip)]
    p = subprocess.run(base, capture_output=True, timeout=30)  # transcribe
    assert p.returncode == 0, p.stderr.decode()
    assert p.stdout.decode() == voxtral_model.transcribe(pcm, max_tokens=6).text + "\n"
    p = subprocess.run(base + ["What was said?"], capture_output=True, timeout=30)  # chat about the audio
    assert p.returncode == 0, p.stderr.decode()
    want = voxtral_model.generate([{"role": "user", "content": [{"type": "audio", "audio": pcm},
                                                                {"type": "text", "text": "What was said?"}]}],
                                  max_tokens=6).text
    assert p.stdout.decode() == want + "\n"
    (tmp_path / "notes.txt").write_text("hello")
    p = subprocess.run(base[:-1] + [str(tmp_path / "notes.txt")], capture_output=True, timeout=30)
    assert p.returncode == 2 and b"not a WAV, FLAC or OGG file" in p.stderr
