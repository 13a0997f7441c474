"""Tokenizer wrapper: must agree with mistral-common (the format reference) and stream safely."""

import io
import random
import subprocess
import sys

import numpy as np
import pytest
from mistral_common.protocol.instruct.chunk import ImageChunk, TextChunk
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.instruct import InstructTokenizerV13
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from PIL import Image

from edge_sdk.tiny_tokenizer import FIXED_SPECIALS
from edge_sdk.tokenizer import EncodedPrompt, StreamDecoder, Tokenizer

TEXTS = [
    "Hello, world!",
    "Café crème brûlée, naïve façade — Ångström",
    "日本語のテキストと中文字符，한국어도",
    "emoji 🎉🚀👩‍👩‍👧 and flags 🇫🇷🇯🇵",
    "mixed: ∑ x² ≈ π · ∞ → 𝔘𝔫𝔦𝔠𝔬𝔡𝔢\n\ttabs  and   spaces",
    "[INST] not a control token [/INST] </s>",
]


@pytest.fixture(scope="module")
def tok(tekken_path):
    return Tokenizer.from_file(tekken_path)


@pytest.fixture(scope="module")
def tiny_tok(tiny_tekken_path):
    return Tokenizer.from_file(tiny_tekken_path)


@pytest.fixture(scope="module", params=["full", "tiny"])
def any_tok(request, tok, tiny_tok):
    return tok if request.param == "full" else tiny_tok


def _rgb(h=40, w=60, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_fixture_is_v13_with_ministral_specials(tekken_path):
    mt = MistralTokenizer.from_file(tekken_path)
    assert isinstance(mt.instruct_tokenizer, InstructTokenizerV13)
    tk = mt.instruct_tokenizer.tokenizer
    assert tk.n_words == 131072 and tk.num_special_tokens == 1000
    assert [tk.id_to_piece(i) for i in range(20)] == list(FIXED_SPECIALS)
    assert tk.get_special_token("[AUDIO]") == 24 and tk.get_special_token("[BEGIN_AUDIO]") == 25
    img = mt.instruct_tokenizer.image_encoder.image_config
    assert (img.image_patch_size, img.max_image_size, img.spatial_merge_size) == (14, 1540, 2)


def test_special_ids(tok):
    assert (tok.bos_id, tok.eos_id, tok.unk_id, tok.pad_id) == (1, 2, 0, 11)
    assert (tok.image_token_id, tok.image_break_id, tok.image_end_id) == (10, 12, 13)
    assert (tok.audio_token_id, tok.begin_audio_id) == (24, 25)
    assert tok.special_id("[NOT_A_TOKEN]") is None
    assert tok.vocab_size == 131072 and tok.version == "v13"


def test_chat_with_system_prompt_matches_mistral_common(tok, tekken_path):
    msgs = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": [{"type": "text", "text": "Say 日本 🎉"}]},
    ]
    got = tok.encode_chat(msgs)
    ref = MistralTokenizer.from_file(tekken_path).encode_chat_completion(ChatCompletionRequest(messages=[
        SystemMessage(content="You are terse."), UserMessage(content="Hi there"),
        AssistantMessage(content="Hello."), UserMessage(content=[TextChunk(text="Say 日本 🎉")])]))
    assert isinstance(got, EncodedPrompt) and got.ids == ref.tokens and got.images == []
    ids = got.ids
    # v13: <s>[SYSTEM_PROMPT]...[/SYSTEM_PROMPT][INST]...[/INST]answer</s>[INST]...[/INST]
    assert ids[:2] == [tok.bos_id, 17] and ids.count(tok.bos_id) == 1
    assert ids.index(18) < ids.index(3) < ids.index(4) < ids.index(tok.eos_id)
    assert ids[-1] == 4 and ids.count(3) == 2
    assert tok.decode(ids) == "You are terse.Hi thereHello.Say 日本 🎉"


@pytest.mark.parametrize("form", ["array", "png_bytes", "path", "pil"])
def test_image_chat_matches_mistral_common(tok, tekken_path, tmp_path, form):
    arr = _rgb()
    pil = Image.fromarray(arr)
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    (tmp_path / "im.png").write_bytes(buf.getvalue())
    image = {"array": arr, "png_bytes": buf.getvalue(), "path": str(tmp_path / "im.png"), "pil": pil}[form]
    got = tok.encode_chat([{"role": "user", "content": [
        {"type": "text", "text": "Describe"}, {"type": "image", "image": image}]}])
    ref = MistralTokenizer.from_file(tekken_path).encode_chat_completion(ChatCompletionRequest(
        messages=[UserMessage(content=[TextChunk(text="Describe"), ImageChunk(image=pil)])]))
    assert got.ids == ref.tokens
    assert len(got.images) == 1 and got.images[0].dtype == np.float32
    np.testing.assert_array_equal(got.images[0], ref.images[0])
    # 40x60 -> 2x3 grid of 28px merged patches: images come before the text
    c, h, w = got.images[0].shape
    assert (c, h, w) == (3, 56, 84)
    assert got.ids[:3] == [tok.bos_id, 3, 10]
    assert got.ids.count(10) == 6 and got.ids.count(12) == 1 and got.ids.count(13) == 1


def test_two_images_keep_order(tok):
    a, b = _rgb(28, 28, 1), _rgb(60, 30, 2)
    got = tok.encode_chat([{"role": "user", "content": [
        {"type": "image", "image": a}, {"type": "image", "image": b}, {"type": "text", "text": "x"}]}])
    assert [im.shape for im in got.images] == [(3, 28, 28), (3, 84, 56)]


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(any_tok, text):
    ids = any_tok.encode(text)
    assert all(any_tok.num_special_tokens <= i < any_tok.vocab_size for i in ids)
    assert any_tok.decode(ids) == text
    with_bos = any_tok.encode(text, bos=True)
    assert with_bos == [any_tok.bos_id, *ids] and any_tok.decode(with_bos) == text


def _stream(tok, ids):
    dec = StreamDecoder(tok)
    pieces = [dec.push(i) for i in ids]
    return pieces, dec.flush()


@pytest.mark.parametrize("text", TEXTS)
def test_stream_decoder_matches_decode(any_tok, text):
    ids = [any_tok.bos_id, *any_tok.encode(text), any_tok.eos_id]
    pieces, tail = _stream(any_tok, ids)
    assert "".join(pieces) + tail == any_tok.decode(ids) == text
    assert all("\ufffd" not in p for p in pieces)
    assert pieces[0] == "" and pieces[-1] == ""  # control tokens render empty


def test_stream_decoder_holds_back_partial_characters(tiny_tok):
    # the tiny vocab has few merges for these characters: tokens split them mid-character
    ids = tiny_tok.encode("🎉世")
    assert len(ids) > 2
    pieces, tail = _stream(tiny_tok, ids)
    assert "".join(pieces) + tail == "🎉世" and tail == ""
    # after each push, exactly the complete characters of the bytes seen so far have been emitted
    for k in range(1, len(ids) + 1):
        seen = b"".join(tiny_tok.token_bytes(i) for i in ids[:k])
        assert "".join(pieces[:k]) == seen[: len(seen) - _partial_tail(seen)].decode()
    assert "" in pieces


def _partial_tail(b: bytes) -> int:
    """Length of an incomplete UTF-8 sequence at the end of b."""
    for n in range(1, min(4, len(b)) + 1):
        lead = b[-n]
        if lead >= 0xC0:
            need = 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4
            return n if n < need else 0
    return 0


def test_stream_decoder_random_text(any_tok):
    rng = random.Random(0)
    pool = "aé中🎉 \nñ€𝔘ß日ö👍"
    for _ in range(50):
        text = "".join(rng.choice(pool) for _ in range(rng.randint(1, 30)))
        ids = any_tok.encode(text)
        pieces, tail = _stream(any_tok, ids)
        assert "".join(pieces) + tail == text
        assert all("\ufffd" not in p for p in pieces)


def test_stream_decoder_truncated_character_matches_decode(tiny_tok):
    ids = tiny_tok.encode("ok🎉")[:-1]  # generation stopped mid-emoji
    pieces, tail = _stream(tiny_tok, ids)
    assert "".join(pieces) == "ok" and "".join(pieces) + tail == tiny_tok.decode(ids)
    # a special token between the bytes ends the run, exactly as decode() does
    ids = tiny_tok.encode("🎉")
    ids = ids[:2] + [tiny_tok.eos_id] + ids[2:]
    pieces, tail = _stream(tiny_tok, ids)
    assert "".join(pieces) + tail == tiny_tok.decode(ids)


def test_tiny_vocab_ids_in_range(tiny_tok):
    assert tiny_tok.vocab_size == 4096
    for text in TEXTS:
        assert max(tiny_tok.encode(text)) < 4096
    p = tiny_tok.encode_chat([{"role": "system", "content": TEXTS[1]},
                              {"role": "user", "content": [{"type": "text", "text": TEXTS[3]},
                                                           {"type": "image", "image": _rgb()}]}])
    assert 0 <= min(p.ids) and max(p.ids) < 4096
    with pytest.raises(ValueError, match="out of range"):
        tiny_tok.decode([4096])


@pytest.mark.parametrize("messages, match", [
    ([], "must not be empty"),
    ("hello", "list of"),
    ([{"role": "bot", "content": "hi"}], "unknown role 'bot'"),
    ([{"content": "hi"}], "unknown role None"),
    (["hi"], "must be a dict"),
    ([{"role": "user", "content": 42}], "content must be a str or a list"),
    ([{"role": "user", "content": []}], "content list is empty"),
    ([{"role": "user", "content": [{"type": "video", "video": "x"}]}], "unknown part type 'video'"),
    ([{"role": "user", "content": [{"type": "text"}]}], "needs a str 'text'"),
    ([{"role": "user", "content": [{"type": "image", "image": 3.5}]}], "image must be a path"),
    ([{"role": "user", "content": [{"type": "image", "image": np.zeros((4, 4), np.uint8)}]}],
     "HxWx3 uint8"),
    ([{"role": "user", "content": [{"type": "image", "image": b"not a png"}]}], "cannot read image"),
    ([{"role": "system", "content": [{"type": "image", "image": np.zeros((4, 4, 3), np.uint8)}]}],
     "only allowed in user"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], "invalid chat request"),
])
def test_bad_messages_raise_value_error(tok, messages, match):
    with pytest.raises(ValueError, match=match):
        tok.encode_chat(messages)


def test_assistant_prefix_continues_answer(tok):
    ids = tok.encode_chat([{"role": "user", "content": "hi"},
                           {"role": "assistant", "content": "Sure,", "prefix": True}]).ids
    assert ids[-1] != tok.eos_id and tok.decode(ids).endswith("Sure,")


def test_module_does_not_import_torch():
    code = ("import sys, edge_sdk.tokenizer; "
            "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
