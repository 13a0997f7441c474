"""Microphone capture: through a real ALSA path (arecord from ALSA's `file` plugin, which reads a
raw file as a capture device), from files paced in real time, with reconnects and drops."""

from __future__ import annotations

import shutil
import time
import wave

import numpy as np
import pytest

from edge_sdk.media.audio import SAMPLE_RATE
from edge_sdk.media.microphone import Microphone, MicrophoneClosed

CHUNK = SAMPLE_RATE * 80 // 1000


def _ramp(seconds: float) -> np.ndarray:
    return ((np.arange(int(seconds * SAMPLE_RATE)) % 2000) - 1000).astype("<i2")


@pytest.fixture
def alsa_file_device(tmp_path, monkeypatch):
    """An ALSA capture device `edgetest` whose samples are a known raw file."""
    if shutil.which("arecord") is None:
        pytest.skip("arecord (alsa-utils) not installed; `make test` installs it")
    raw = tmp_path / "capture.raw"
    raw.write_bytes(_ramp(3.0).tobytes())
    conf = tmp_path / "asound.conf"
    conf.write_text(f'</usr/share/alsa/alsa.conf>\npcm.edgetest {{\n type file\n slave.pcm "null"\n'
                    f' file "/dev/null"\n infile "{raw}"\n format "raw"\n}}\n')
    monkeypatch.setenv("ALSA_CONFIG_PATH", str(conf))
    return raw


def _wav(path, samples: np.ndarray) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes(samples.astype("<i2").tobytes())


def test_alsa_capture_is_bit_exact_and_paced(alsa_file_device):
    t0 = time.monotonic()
    with Microphone("alsa:edgetest", pace=True) as mic:
        chunks = [mic.read(timeout=5) for _ in range(25)]  # 2 s
    elapsed = time.monotonic() - t0
    got = np.concatenate(chunks)
    want = _ramp(3.0)[: len(got)].astype(np.float32) / 32768.0
    np.testing.assert_array_equal(got, want)
    assert all(len(c) == CHUNK for c in chunks)
    assert 1.8 < elapsed < 4.0, elapsed  # real time, not the file plugin's unpaced rate


def test_a_file_plays_in_real_time_then_ends(tmp_path):
    _wav(tmp_path / "one.wav", _ramp(1.0))
    t0 = time.monotonic()
    mic = Microphone(tmp_path / "one.wav")
    chunks = list(mic)
    assert sum(len(c) for c in chunks) == 12 * CHUNK  # whole 80 ms chunks of 1 s
    assert 0.8 < time.monotonic() - t0 < 2.5
    with pytest.raises(MicrophoneClosed, match="end of file"):
        mic.read()


def test_a_looped_file_goes_on_and_a_slow_reader_loses_the_oldest_chunks(tmp_path):
    _wav(tmp_path / "one.wav", _ramp(1.0))
    with Microphone(tmp_path / "one.wav", loop=True, pace=False, queue_chunks=4) as mic:
        deadline = time.monotonic() + 5
        while mic.reconnects < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert mic.reconnects >= 3 and mic.dropped > 0
        assert len(mic._queue) == 4


def test_a_device_that_fails_is_retried_with_the_reason(monkeypatch):
    if shutil.which("arecord") is None:
        pytest.skip("arecord (alsa-utils) not installed")
    monkeypatch.setenv("ALSA_CONFIG_PATH", "/usr/share/alsa/alsa.conf")
    mic = Microphone("alsa:no_such_device", backoff=0.05, backoff_max=0.1)
    deadline = time.monotonic() + 5
    while mic.reconnects < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    mic.close()
    assert mic.reconnects >= 2 and "arecord stopped" in (mic.last_error or "")
    with pytest.raises(MicrophoneClosed):
        mic.read(timeout=1)
