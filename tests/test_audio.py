"""The audio front end against transformers' WhisperFeatureExtractor, decoding and its errors,
and voice activity on clips whose speech spans are known. Speech fixtures are made with espeak-ng
at test time (22.05 kHz, resampled like any other input)."""

from __future__ import annotations

import io
import shutil
import subprocess
import wave

import numpy as np
import pytest

from edge_sdk.media.audio import SAMPLE_RATE, AudioError, load_audio, log_mel

RNG = np.random.default_rng(0)
MEL_TOLERANCE = 1e-6  # on features in about [-1.5, 1.5]; both compute the spectrum in float64 (measured: 1.2e-7)


def _tone(seconds: float, hz: float = 440.0, rate: int = SAMPLE_RATE, amp: float = 0.3) -> np.ndarray:
    return (amp * np.sin(2 * np.pi * hz * np.arange(int(seconds * rate)) / rate)).astype(np.float32)


def _wav_bytes(samples: np.ndarray, rate: int, channels: int = 1) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
    return buf.getvalue()


@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    """espeak-ng utterances as 16 kHz arrays, and a 44.1 kHz WAV of the first one."""
    if shutil.which("espeak-ng") is None or shutil.which("sox") is None:
        pytest.skip("espeak-ng and sox are needed for speech fixtures (`make test` installs them)")
    d = tmp_path_factory.mktemp("speech")
    out = {}
    for i, text in enumerate(["bring the red box to dock two", "what do you see"]):
        path = d / f"u{i}.wav"
        subprocess.run(["espeak-ng", "-w", str(path), text], check=True)
        out[i] = load_audio(path)
    subprocess.run(["sox", str(d / "u0.wav"), "-r", "44100", str(d / "u0_44k.wav")], check=True)
    out["44k"] = d / "u0_44k.wav"
    return out


def _whisper(samples: np.ndarray) -> np.ndarray:
    """WhisperFeatureExtractor's own float64 NumPy path. Where torch is installed it would take
    its float32 torch.stft path instead, whose last bits vary from run to run (with the input's
    memory alignment): up to ~6e-5 here, at the edge of the stated tolerance."""
    from unittest import mock

    from transformers import WhisperFeatureExtractor
    from transformers.models.whisper import feature_extraction_whisper

    fe = WhisperFeatureExtractor(feature_size=128)
    with mock.patch.object(feature_extraction_whisper, "is_torch_available", lambda: False):
        f = fe(samples, sampling_rate=SAMPLE_RATE, return_tensors="np", padding=True, truncation=False,
               pad_to_multiple_of=480000)["input_features"]
    return f.reshape(128, -1, 3000).transpose(1, 0, 2)  # as VoxtralProcessor splits it


@pytest.mark.parametrize("clip", ["silence", "tone", "noise_40s", "speech", "speech_44k"])
def test_log_mel_matches_whisper_feature_extractor(clip, speech):
    samples = {"silence": lambda: np.zeros(3 * SAMPLE_RATE, np.float32),
               "tone": lambda: _tone(5),
               "noise_40s": lambda: (0.1 * RNG.standard_normal(40 * SAMPLE_RATE)).astype(np.float32),
               "speech": lambda: speech[0],
               "speech_44k": lambda: load_audio(speech["44k"])}[clip]()
    got, want = log_mel(samples), _whisper(samples)
    assert got.shape == want.shape == (len(samples) // (30 * SAMPLE_RATE) + 1, 128, 3000)
    assert np.abs(got - want).max() < MEL_TOLERANCE


def test_decoding_wav_flac_and_raw_pcm_agree():
    import soundfile

    x = _tone(1.0, rate=48000)
    flac = io.BytesIO()
    soundfile.write(flac, x, 48000, format="FLAC")
    from_wav = load_audio(_wav_bytes(x, 48000))
    from_flac = load_audio(flac.getvalue())
    pcm = (np.clip(x, -1, 1) * 32767).astype("<i2").tobytes()
    from_pcm = load_audio(pcm, "audio/pcm;rate=48000")
    from_l16 = load_audio((np.clip(x, -1, 1) * 32767).astype(">i2").tobytes(), "audio/L16; rate=48000; channels=1")
    assert len(from_wav) == 16000
    np.testing.assert_allclose(from_flac, from_wav, atol=1e-4)
    np.testing.assert_allclose(from_pcm, from_wav, atol=1e-6)
    np.testing.assert_allclose(from_l16, from_wav, atol=1e-6)
    # resampled 48k -> 16k: the same tone (the first and last 16 samples hold the filter's edge)
    np.testing.assert_allclose(from_wav[16:-16], _tone(1.0)[16:-16], atol=2e-3)
    stereo = load_audio(_wav_bytes(np.repeat(x, 2), 48000, channels=2))
    np.testing.assert_allclose(stereo, from_wav, atol=1e-6)


@pytest.mark.parametrize("source,mime,message", [
    (b"RIFF\x24\x08\x00\x00WAVEfmt ", None, "upload.wav: not a readable WAV/FLAC/OGG file"),
    (b"\x89PNG\r\n\x1a\n" + bytes(64), None, "upload.wav: not a readable WAV/FLAC/OGG file"),
    (b"\x00\x01\x02", "audio/pcm;rate=16000", "3 bytes is not a whole number of 16-bit frames"),
    (b"\x00\x00", "audio/L16", "raw PCM needs its sample rate"),
    (bytes(4000), "audio/pcm;rate=4000", "sample rate 4000 Hz is outside 8000-192000 Hz"),
    (bytes(2 * 16000 * 11), "audio/pcm;rate=16000", "11.0 s of audio is longer than the 10 s limit"),
    (b"", "audio/pcm;rate=16000", "no audio samples"),
])
def test_bad_audio_gets_one_line_naming_it(source, mime, message):
    with pytest.raises(AudioError) as err:
        load_audio(source, mime, max_seconds=10, name="upload.wav")
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(AudioError, match=r"nope\.wav: no such file"):
        load_audio(tmp_path / "nope.wav")


# -- voice activity --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vad():
    from edge_sdk.media.vad import SileroVad, VadUnavailable

    try:
        return SileroVad()
    except VadUnavailable as exc:
        pytest.skip(str(exc))


def _span(x: np.ndarray, offset: float) -> tuple[float, float]:
    voiced = np.flatnonzero(np.abs(x) > 0.01)
    return offset + voiced[0] / SAMPLE_RATE, offset + voiced[-1] / SAMPLE_RATE


BOUNDARY_TOLERANCE_S = 0.35  # start: 0.2 s pre-roll + a frame; end: 0.2 s kept + model lag


def test_vad_finds_the_spoken_spans(vad, speech):
    from edge_sdk.media.vad import find_speech

    a, b = speech[0], speech[1]
    gap = np.zeros(int(1.5 * SAMPLE_RATE), np.float32)
    lead = np.zeros(SAMPLE_RATE, np.float32)
    clip = np.concatenate([lead, a, gap, b, lead])
    want = [_span(a, 1.0), _span(b, 1.0 + (len(a) + len(gap)) / SAMPLE_RATE)]
    got = find_speech(clip, vad)
    assert len(got) == 2
    for seg, (start, end) in zip(got, want):
        assert abs(seg.start_s - start) < BOUNDARY_TOLERANCE_S and abs(seg.end_s - end) < BOUNDARY_TOLERANCE_S
        assert len(seg.samples) == round((seg.end_s - seg.start_s) * SAMPLE_RATE)


@pytest.mark.parametrize("kind", ["silence", "noise", "tone"])
def test_vad_finds_nothing_in_non_speech(vad, kind):
    from edge_sdk.media.vad import find_speech

    x = {"silence": np.zeros(5 * SAMPLE_RATE, np.float32),
         "noise": (0.05 * RNG.standard_normal(5 * SAMPLE_RATE)).astype(np.float32),
         "tone": _tone(5)}[kind]
    assert find_speech(x, vad) == []


def test_streamed_chunks_give_the_same_utterances_with_events(vad, speech):
    from edge_sdk.media.vad import Segmenter, find_speech

    clip = np.concatenate([np.zeros(SAMPLE_RATE, np.float32), speech[0], np.zeros(SAMPLE_RATE, np.float32)])
    whole = find_speech(clip, vad)
    vad.reset()
    seg = Segmenter(vad)
    events = []
    for i in range(0, len(clip), 1280):  # 80 ms chunks, as firmware sends them
        events += seg.feed(clip[i:i + 1280])
    events += seg.finish()
    assert [e[0] for e in events] == ["voice_started", "voice_stopped"]
    assert events[0][1] == pytest.approx(whole[0].start_s)
    np.testing.assert_array_equal(events[1][1].samples, whole[0].samples)


def test_an_utterance_is_cut_at_max_length(vad, speech):
    from edge_sdk.media.vad import find_speech

    long_talk = np.concatenate([speech[0]] * 4)  # ~6 s of speech without a pause
    segs = find_speech(long_talk, vad, max_s=2.0)
    assert len(segs) >= 2 and all(s.end_s - s.start_s <= 2.0 + 1e-6 for s in segs)
