"""Voxtral packages against transformers' own VoxtralForConditionalGeneration on the same tiny
random checkpoint (saved with save_pretrained): the audio encoder + projector, the llama-config
text decoder, and whole transcription and chat-with-audio requests laid out by mistral-common."""

from __future__ import annotations

import numpy as np
import pytest

import edge_sdk
from edge_sdk.media.audio import SAMPLE_RATE, log_mel

AUDIO_TOLERANCE = 1e-5  # of the largest feature, float32 encoder vs transformers
LOGIT_TOLERANCE = 2e-4  # absolute, as for the Ministral 3 float engine


@pytest.fixture(scope="module")
def voxtral(tmp_path_factory):
    """(checkpoint dir, float package dir, transformers model)."""
    from transformers import VoxtralForConditionalGeneration

    from edge_sdk.build import build
    from edge_sdk.quant import QuantRecipe
    from edge_sdk.tiny import make_voxtral_checkpoint
    from edge_sdk.tiny_tokenizer import make_tekken_file

    root = tmp_path_factory.mktemp("voxtral")
    ckpt = make_voxtral_checkpoint(root / "ckpt")
    make_tekken_file(ckpt / "tekken.json", vocab_size=4096, audio=True)
    pkg = build(ckpt, QuantRecipe(method="none"), out=root / "pkg", progress=False)
    return ckpt, pkg, VoxtralForConditionalGeneration.from_pretrained(ckpt).eval()


def _clip(seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    return (0.2 * np.sin(2 * np.pi * 300 * t) + 0.05 * rng.standard_normal(len(t))).astype(np.float32)


def test_manifest_and_capabilities_say_text_and_audio(voxtral):
    _, pkg, _ = voxtral
    model = edge_sdk.load(pkg)
    assert model.manifest.modalities == ["text", "audio"] == model.capabilities()["modalities"]
    assert model.manifest.model.text.rope.type == "default" and model.manifest.model.text.rope.theta == 1e8
    assert not model.manifest.model.text.tie_word_embeddings


@pytest.mark.parametrize("seconds", [3.0, 40.0])  # one chunk, two chunks
def test_audio_encoder_matches_transformers(voxtral, seconds):
    import torch

    _, pkg, hf = voxtral
    model = edge_sdk.load(pkg)
    feats = log_mel(_clip(seconds))
    with torch.no_grad():
        want = hf.get_audio_features(torch.from_numpy(feats)).pooler_output.numpy()
    got = model.backend.encode_audio(feats)
    assert got.shape == want.shape == (375 * len(feats), hf.config.text_config.hidden_size)
    assert np.abs(got - want).max() < AUDIO_TOLERANCE * np.abs(want).max()


def _mistral_common_ids(tekken, audio: np.ndarray, language: str | None):
    from mistral_common.protocol.transcription.request import TranscriptionRequest
    from mistral_common.tokens.tokenizers.audio import Audio
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    mt = MistralTokenizer.from_file(str(tekken))
    audio = Audio(audio_array=audio, sampling_rate=SAMPLE_RATE, format="wav")
    return mt.encode_transcription(TranscriptionRequest(audio=audio.to_base64("wav", False), language=language,
                                                        model="x")).tokens


@pytest.mark.parametrize("seconds,language", [(3.0, "en"), (40.0, None)])
def test_transcription_layout_logits_and_tokens_match_transformers(voxtral, seconds, language):
    import torch

    ckpt, pkg, hf = voxtral
    model = edge_sdk.load(pkg, kv_cache="float32")  # the graph's exact arithmetic, as transformers'
    audio = _clip(seconds)
    prompt = model.tokenizer.encode_transcription(audio, language)
    assert prompt.ids == _mistral_common_ids(ckpt / "tekken.json", audio, language)
    chunks = len(log_mel(prompt.audios[0]))
    assert prompt.ids[:3] == [1, 3, 25] and prompt.ids.count(24) == 375 * chunks
    assert prompt.ids[-1] == model.tokenizer.special_id("[TRANSCRIBE]")

    feats = torch.from_numpy(np.concatenate([log_mel(a) for a in prompt.audios]))
    ids = torch.tensor([prompt.ids])
    with torch.no_grad():
        want_logits = hf(input_ids=ids, input_features=feats).logits[0, -1].numpy()
        want_tokens = hf.generate(input_ids=ids, input_features=feats, max_new_tokens=8, do_sample=False,
                                  eos_token_id=None)[0, len(prompt.ids):].tolist()
    b = model.backend
    got_logits, _ = b.forward(model._prompt_embeds(prompt), np.arange(len(prompt.ids)), b.new_cache())
    np.testing.assert_allclose(got_logits, want_logits, atol=LOGIT_TOLERANCE, rtol=0)
    result = model.transcribe(audio, language, max_tokens=8, stop_token_ids=())
    assert result.tokens == [t for t in want_tokens][:len(result.tokens)] and len(result.tokens) >= 1


def test_chat_with_audio_matches_transformers(voxtral):
    import torch

    _, pkg, hf = voxtral
    model = edge_sdk.load(pkg)
    messages = [{"role": "user", "content": [{"type": "audio", "audio": _clip(2.0, seed=3)},
                                             {"type": "text", "text": "What did you hear?"}]}]
    prompt = model.encode_prompt(messages)
    assert prompt.ids.count(24) == 375 and len(prompt.audios) == 1
    with torch.no_grad():
        want = hf.generate(input_ids=torch.tensor([prompt.ids]), input_features=torch.from_numpy(log_mel(prompt.audios[0])),
                           max_new_tokens=8, do_sample=False, eos_token_id=None)[0, len(prompt.ids):].tolist()
    got = model.generate(messages, max_tokens=8)
    assert got.tokens == want[:len(got.tokens)] and len(got.tokens) >= 1


def test_int4_voxtral_package_passes_its_golden_check(voxtral, tmp_path):
    from edge_sdk.build import build
    from edge_sdk.golden import check_golden
    from edge_sdk.quant import QuantRecipe

    ckpt, _, _ = voxtral
    pkg = build(ckpt, QuantRecipe(method="int4", block_size=32), out=tmp_path / "int4", progress=False)
    model = edge_sdk.load(pkg, accuracy_level=0)
    assert check_golden(model.backend, model.manifest.extra["golden"]).ok
    assert model.transcribe(_clip(1.0), max_tokens=4).completion_tokens >= 1


def test_bad_audio_and_audio_on_a_text_package_are_one_clear_error(voxtral, tiny_checkpoints, build_package):
    from edge_sdk.runtime.types import GenerationError

    _, pkg, _ = voxtral
    model = edge_sdk.load(pkg)
    with pytest.raises(GenerationError, match="audio: not a readable WAV/FLAC/OGG file"):
        model.transcribe(b"definitely not audio")
    text = edge_sdk.load(build_package(tiny_checkpoints["text"], "int4", block_size=32))
    with pytest.raises(GenerationError, match="no audio encoder: transcription needs a Voxtral package"):
        text.transcribe(_clip(1.0))


def test_transcribe_command(voxtral, tmp_path, capsys):
    import json
    import wave

    from edge_sdk.cli import main

    _, pkg, _ = voxtral
    clip = tmp_path / "command.wav"
    with wave.open(str(clip), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(44100)
        w.writeframes((_clip(1.0) * 20000).astype("<i2").tobytes())
    assert main(["transcribe", str(pkg), str(clip), "--max-tokens", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["tokens"]) >= 1
    (tmp_path / "notes.txt").write_text("not audio")
    assert main(["transcribe", str(pkg), str(tmp_path / "notes.txt")]) == 2
    err = capsys.readouterr().err.strip()
    assert "notes.txt: not a readable WAV/FLAC/OGG file" in err and "\n" not in err


def test_mistral_native_voxtral_matches_transformers(tmp_path):
    """Mistral's own layout of Voxtral (params.json + consolidated.safetensors, no position table:
    the encoder's sinusoids are computed) builds into the same engine as the HF layout."""
    import torch
    from transformers import VoxtralForConditionalGeneration
    from transformers.models.whisper.modeling_whisper import sinusoids

    from edge_sdk.build import build
    from edge_sdk.export.audio import whisper_positions
    from edge_sdk.quant import QuantRecipe
    from edge_sdk.tiny import make_voxtral_checkpoint
    from edge_sdk.tiny_tokenizer import make_tekken_file
    from layouts import to_native_voxtral

    random = make_voxtral_checkpoint(tmp_path / "random", seed=5)
    hf = VoxtralForConditionalGeneration.from_pretrained(random).eval()
    positions = hf.model.audio_tower.embed_positions.weight
    table = whisper_positions(*positions.shape)
    # Whisper's sinusoids, up to the float32 rounding of angles as large as 1500 rad (~1e-4)
    np.testing.assert_allclose(table, sinusoids(*positions.shape).numpy(), atol=2e-4, rtol=0)
    with torch.no_grad():
        positions.copy_(torch.from_numpy(table))  # the oracle holds exactly the table the native build computes
    hf.save_pretrained(tmp_path / "hf")
    make_tekken_file(tmp_path / "hf" / "tekken.json", vocab_size=4096, audio=True)
    native = to_native_voxtral(tmp_path / "hf", tmp_path / "native")
    assert not (native / "config.json").exists()
    model = edge_sdk.load(build(native, QuantRecipe(method="none"), out=tmp_path / "pkg", progress=False))
    assert model.manifest.model.architecture == "VoxtralForConditionalGeneration"
    assert model.manifest.modalities == ["text", "audio"]

    audio = _clip(3.0, seed=4)
    prompt = model.tokenizer.encode_transcription(audio, "en")
    feats = torch.from_numpy(log_mel(prompt.audios[0]))
    with torch.no_grad():
        want_audio = hf.get_audio_features(feats).pooler_output.numpy()
        want_logits = hf(input_ids=torch.tensor([prompt.ids]), input_features=feats).logits[0, -1].numpy()
    got_audio = model.backend.encode_audio(feats.numpy())
    assert np.abs(got_audio - want_audio).max() < AUDIO_TOLERANCE * np.abs(want_audio).max()
    b = model.backend
    got_logits, _ = b.forward(model._prompt_embeds(prompt), np.arange(len(prompt.ids)), b.new_cache())
    np.testing.assert_allclose(got_logits, want_logits, atol=LOGIT_TOLERANCE, rtol=0)
