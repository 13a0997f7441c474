"""Tekken tokenizer for Ministral 3, a thin wrapper around mistral-common.

mistral-common is the reference for Mistral's prompt formats (v13: system prompt, tools, images
before text), so chat encoding is delegated to it rather than re-implemented; this module only
turns plain dicts into its request objects, maps its errors to ValueError, and adds the streaming
detokenizer the runtime needs. The runtime and daemon import it: no torch/transformers here.
"""

from __future__ import annotations

import codecs
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from mistral_common.exceptions import MistralCommonException
from mistral_common.protocol.instruct.chunk import ImageChunk, ImageURLChunk, TextChunk
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

__all__ = ["Tokenizer", "EncodedPrompt", "StreamDecoder"]

_ROLES = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}


@dataclass(frozen=True)
class EncodedPrompt:
    """A chat prompt: token ids, plus one normalised float32 [3, H, W] array per image, in the
    order their [IMG] blocks appear in `ids` (what vision.onnx takes, after adding a batch dim),
    and one 16 kHz float32 array per audio clip, padded to whole 30 s chunks, in the order of
    their [AUDIO] blocks (what media.audio.log_mel takes)."""

    ids: list[int]
    images: list[np.ndarray] = field(default_factory=list)
    audios: list[np.ndarray] = field(default_factory=list)


class Tokenizer:
    """Ministral 3 tekken tokenizer: plain-text encode/decode, chat encoding, special ids."""

    def __init__(self, mistral: MistralTokenizer):
        self._mt = mistral
        self._tk = mistral.instruct_tokenizer.tokenizer  # Tekkenizer
        image_encoder = getattr(mistral.instruct_tokenizer, "image_encoder", None)
        self.image_config = image_encoder.image_config if image_encoder is not None else None

    @classmethod
    def from_file(cls, path: str | Path) -> "Tokenizer":
        """Load a tekken.json (name must contain 'tekken', as mistral-common requires)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        return cls(MistralTokenizer.from_file(str(path)))

    # -- special ids ------------------------------------------------------------------------
    def special_id(self, token: str) -> int | None:
        """Id of a special token by its string, or None if this tokenizer lacks it.

        Only ids 0..19 are fixed across Mistral tokenizers; anything else ([AUDIO], [THINK],
        [ARGS]...) must be looked up by string, so everything goes through this one path."""
        return self._tk.get_special_token(token) if self._tk.is_special(token) else None

    @property
    def version(self) -> str:
        return self._tk.version.value

    @property
    def vocab_size(self) -> int:
        """Total ids (specials + BPE); every id produced is < vocab_size."""
        return self._tk.n_words

    @property
    def num_special_tokens(self) -> int:
        return self._tk.num_special_tokens

    bos_id = property(lambda self: self._tk.bos_id, doc="<s>")
    eos_id = property(lambda self: self._tk.eos_id, doc="</s>")
    pad_id = property(lambda self: self._tk.pad_id, doc="<pad>")
    unk_id = property(lambda self: self._tk.unk_id, doc="<unk>")
    image_token_id = property(lambda self: self.special_id("[IMG]"), doc="[IMG], one per merged patch")
    audio_token_id = property(lambda self: self.special_id("[AUDIO]"), doc="[AUDIO], one per 80 ms of audio")

    @property
    def has_audio(self) -> bool:
        """The tokenizer knows audio (Voxtral's has an audio block)."""
        return getattr(self._tk, "audio", None) is not None
    image_break_id = property(lambda self: self.special_id("[IMG_BREAK]"), doc="end of an image row")
    image_end_id = property(lambda self: self.special_id("[IMG_END]"), doc="end of an image")
    audio_token_id = property(lambda self: self.special_id("[AUDIO]"), doc="Voxtral audio slot")
    begin_audio_id = property(lambda self: self.special_id("[BEGIN_AUDIO]"))

    def is_special(self, token_id: int) -> bool:
        """True for ids in the special range; these decode to '' (they are all control tokens)."""
        return 0 <= int(token_id) < self.num_special_tokens

    # -- text -------------------------------------------------------------------------------
    def encode(self, text: str, bos: bool = False) -> list[int]:
        """Plain text -> ids; special-token strings in `text` are encoded as text, never as specials."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        return self._tk.encode(text, bos=bos, eos=False)

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> text. Special tokens render as ''; invalid UTF-8 becomes U+FFFD."""
        ids = self._check_ids(ids)
        return self._tk.decode(ids, special_token_policy=SpecialTokenPolicy.IGNORE)

    def token_bytes(self, token_id: int) -> bytes:
        """Raw bytes of one token (b'' for specials): a BPE token can be part of a UTF-8 char."""
        (token_id,) = self._check_ids([token_id])
        return self._tk.id_to_byte_piece(token_id, special_token_policy=SpecialTokenPolicy.IGNORE)

    def stream_decoder(self) -> "StreamDecoder":
        return StreamDecoder(self)

    def _check_ids(self, ids: Iterable[int]) -> list[int]:
        # tiktoken raises an opaque KeyError/panic on out-of-range ids; say what went wrong instead.
        out = [int(i) for i in ids]
        bad = [i for i in out if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token ids out of range [0, {self.vocab_size}): {bad[:5]}")
        return out

    # -- chat -------------------------------------------------------------------------------
    def encode_chat(self, messages: Sequence[Mapping[str, Any]]) -> EncodedPrompt:
        """Chat messages -> v13 prompt ids (+ preprocessed images), via mistral-common.

        messages: [{"role": "system"|"user"|"assistant", "content": str | list[part]}], where a
        part is {"type": "text", "text": str}, {"type": "image", "image": path | bytes |
        HxWx3 uint8 RGB ndarray | PIL image} or {"type": "image_url", "image_url": data:/file: URL}.
        The last message must be a user message, or an assistant message with "prefix": True
        (continue that answer). Returns ids starting with <s>, ready for generation.
        """
        request = ChatCompletionRequest(messages=self._to_messages(messages))
        try:
            tokenized = self._mt.encode_chat_completion(request)
        except (MistralCommonException, AssertionError) as e:  # mistral-common also uses asserts
            raise ValueError(f"invalid chat request: {e}") from e
        return EncodedPrompt(ids=list(tokenized.tokens),
                             images=[np.asarray(im, dtype=np.float32) for im in tokenized.images],
                             audios=[np.asarray(a.audio_array, dtype=np.float32) for a in tokenized.audios])

    def encode_transcription(self, audio: Any, language: str | None = None) -> EncodedPrompt:
        """A transcription request, as mistral-common lays it out:
        `<s>[INST][BEGIN_AUDIO][AUDIO]... [/INST]lang:xx[TRANSCRIBE]` (no language: no `lang:`)."""
        from mistral_common.protocol.transcription.request import TranscriptionRequest

        if not self.has_audio:
            raise ValueError("this tokenizer has no audio support (not a Voxtral tokenizer)")
        clip = _load_audio("audio", audio)
        request = TranscriptionRequest(audio=clip.to_base64(clip.format, False), language=language, model="edge_sdk")
        try:
            tokenized = self._mt.encode_transcription(request)
        except (MistralCommonException, AssertionError) as e:
            raise ValueError(f"invalid transcription request: {e}") from e
        return EncodedPrompt(ids=list(tokenized.tokens),
                             audios=[np.asarray(a.audio_array, dtype=np.float32) for a in tokenized.audios])

    def _to_messages(self, messages: Sequence[Mapping[str, Any]]) -> list:
        if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
            raise ValueError("messages must be a list of {'role': ..., 'content': ...} dicts")
        if not messages:
            raise ValueError("messages must not be empty")
        out = []
        for i, m in enumerate(messages):
            if not isinstance(m, Mapping):
                raise ValueError(f"message {i} must be a dict, got {type(m).__name__}")
            role = m.get("role")
            if role not in _ROLES:
                raise ValueError(f"message {i}: unknown role {role!r}; expected one of {sorted(_ROLES)}")
            content = m.get("content")
            if isinstance(content, (list, tuple)):
                if not content:
                    raise ValueError(f"message {i}: content list is empty")
                content = [self._to_chunk(i, j, p, media_ok=(role == "user"))
                           for j, p in enumerate(content)]
            elif not isinstance(content, str):
                raise ValueError(f"message {i} ({role}): content must be a str or a list of parts, "
                                 f"got {type(content).__name__}")
            kwargs = {"prefix": True} if role == "assistant" and m.get("prefix") else {}
            try:
                out.append(_ROLES[role](content=content, **kwargs))
            except Exception as e:  # pydantic ValidationError: chunk not allowed for this role, ...
                raise ValueError(f"message {i} ({role}): {e}") from e
        return out

    @staticmethod
    def _to_chunk(i: int, j: int, part: Any, media_ok: bool):
        where = f"message {i} part {j}"
        if not isinstance(part, Mapping):
            raise ValueError(f"{where}: must be a dict with a 'type', got {type(part).__name__}")
        kind = part.get("type")
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise ValueError(f"{where}: text part needs a str 'text'")
            return TextChunk(text=part["text"])
        if kind in ("image", "image_url", "audio") and not media_ok:
            raise ValueError(f"{where}: images and audio are only allowed in user messages")
        if kind == "audio":
            from mistral_common.protocol.instruct.chunk import AudioChunk

            return AudioChunk.from_audio(_load_audio(where, part.get("audio")))
        if kind in ("image", "image_url"):
            if kind == "image_url":
                url = part.get("image_url")
                url = url.get("url") if isinstance(url, Mapping) else url
                if not isinstance(url, str):
                    raise ValueError(f"{where}: image_url part needs a URL string")
                return ImageURLChunk(image_url=url)
            return ImageChunk(image=_load_image(where, part.get("image")))
        raise ValueError(f"{where}: unknown part type {kind!r}; expected 'text', 'image', 'image_url' or 'audio'")


def _load_audio(where: str, audio: Any):
    """path | bytes | 16 kHz float32 array -> mistral-common's Audio (what it pads and counts)."""
    from mistral_common.tokens.tokenizers.audio import Audio

    from .media.audio import SAMPLE_RATE, AudioError, load_audio

    try:
        samples = load_audio(audio)
    except AudioError as e:
        raise ValueError(f"{where}: {e}") from e
    except TypeError:
        raise ValueError(f"{where}: audio must be a path, bytes or a float32 array, got {type(audio).__name__}") from None
    return Audio(audio_array=samples, sampling_rate=SAMPLE_RATE, format="wav")


def _load_image(where: str, image: Any):
    """path | bytes | HxWx3 uint8 array | PIL image -> PIL image (what mistral-common resizes).

    PIL comes with mistral-common anyway; callers need not know about it."""
    from PIL import Image

    try:
        if isinstance(image, Image.Image):
            return image
        if isinstance(image, (str, Path)):
            with Image.open(image) as im:
                im.load()
                return im.copy()
        if isinstance(image, (bytes, bytearray, memoryview)):
            with Image.open(io.BytesIO(bytes(image))) as im:
                im.load()
                return im.copy()
        if isinstance(image, np.ndarray):
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise ValueError(f"array must be HxWx3 uint8 RGB, got {image.shape} {image.dtype}")
            return Image.fromarray(np.ascontiguousarray(image), mode="RGB")
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from e
    except OSError as e:  # missing file, undecodable bytes
        raise ValueError(f"{where}: cannot read image: {e}") from e
    raise ValueError(f"{where}: image must be a path, bytes, an HxWx3 uint8 array or a PIL image, "
                     f"got {type(image).__name__}")


class StreamDecoder:
    """Incremental detokenizer: emits only complete UTF-8 characters.

    Tekken is byte-level BPE, so one token may carry half of an emoji or CJK character; decoding
    token by token would print U+FFFD mid-stream. Bytes are fed to an incremental UTF-8 decoder that
    holds back an incomplete tail. A special token ends the current byte run (flushing any dangling
    partial character as U+FFFD), because Tekkenizer.decode decodes each run between specials on
    its own: this keeps ''.join(pushes) + flush() == Tokenizer.decode(ids) exactly.
    """

    def __init__(self, tokenizer: Tokenizer):
        self._tok = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """Add one token; return the newly completed text ('' if a character is still partial)."""
        if self._tok.is_special(token_id):
            self._tok._check_ids([token_id])
            return self.flush()
        return self._utf8.decode(self._tok.token_bytes(token_id))

    def flush(self) -> str:
        """End of stream: return held-back bytes (an incomplete character becomes U+FFFD)."""
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text
