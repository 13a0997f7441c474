"""`edge_sdk.load(path)`: an engine package ready to generate, on whichever backend the host has.

A prompt is a string (sent as one user turn in the instruct format), a list of token ids (used
as is: raw completion), or chat messages `[{"role": ..., "content": ...}]` whose user content may
mix text and image parts.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..media.audio import log_mel
from ..package import load_manifest
from ..tokenizer import EncodedPrompt, Tokenizer
from .backend import create_backend
from .generate import GenerationStream
from .types import ContextOverflowError, GenerationError, GenerationResult, SamplingParams

log = logging.getLogger(__name__)

Prompt = str | Sequence[int] | Sequence[dict[str, Any]]


class Model:
    """A loaded engine package: tokenizer, backend and the generation loop around them."""

    def __init__(self, package_dir: Path, manifest, backend, tokenizer: Tokenizer):
        self.package_dir = package_dir
        self.manifest = manifest
        self.backend = backend
        self.tokenizer = tokenizer
        self.config = manifest.model
        self.context_length = manifest.context_length

    @property
    def has_vision(self) -> bool:
        return "vision" in self.manifest.graphs

    @property
    def has_audio(self) -> bool:
        return "audio" in self.manifest.graphs

    def capabilities(self) -> dict[str, Any]:
        """What this model serves: for discovery by apps and the MQTT daemon."""
        return {
            "model": self.manifest.model_name,
            "architecture": self.config.architecture,
            "quant": self.manifest.quant.get("method"),
            "device_profile": self.manifest.device,
            "backend": self.backend.name,
            "context_length": self.context_length,
            "vocab_size": self.config.text.vocab_size,
            "modalities": list(self.manifest.modalities),
        }

    def encode_prompt(self, prompt: Prompt) -> EncodedPrompt:
        """Token ids and the preprocessed images and audio clips they refer to."""
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(t, (int, np.integer)) for t in prompt):
            ids = [int(t) for t in prompt]
            bad = [t for t in ids if not 0 <= t < self.config.text.vocab_size]
            if bad:
                raise GenerationError(f"token id {bad[0]} is outside the vocabulary (0..{self.config.text.vocab_size - 1})")
            return EncodedPrompt(ids)
        if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) for m in prompt):
            try:
                encoded = self.tokenizer.encode_chat(prompt)
            except ValueError as exc:
                raise GenerationError(str(exc)) from None
            if encoded.images and not self.has_vision:
                raise GenerationError("this engine package has no vision encoder; image parts cannot be used")
            if encoded.audios and not self.has_audio:
                raise GenerationError("this engine package has no audio encoder; audio parts cannot be used")
            return encoded
        raise GenerationError("prompt must be a string, a list of token ids, or a list of chat messages")

    def _prompt_embeds(self, prompt: EncodedPrompt) -> np.ndarray:
        """Token embeddings, with the image and audio features in their placeholders' rows."""
        ids = prompt.ids
        embeds = self.backend.embed(np.asarray(ids))
        media = (("images", self.tokenizer.image_token_id, [self.backend.encode_image(i) for i in prompt.images]),
                 ("audio", self.tokenizer.audio_token_id, [self.backend.encode_audio(log_mel(a)) for a in prompt.audios]))
        for what, token, parts in media:
            if not parts:
                continue
            slots = np.flatnonzero(np.asarray(ids) == token)
            features = np.concatenate(parts)
            if len(features) != len(slots):
                raise GenerationError(f"{what} give {len(features)} features for {len(slots)} placeholder tokens")
            embeds[slots] = features
        return embeds

    def stream(self, prompt: Prompt, max_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
               top_k: int = 0, seed: int | None = None, stop: Sequence[str] | str | None = None,
               stop_token_ids: Sequence[int] = (), cancel: threading.Event | None = None,
               deadline: float | None = None) -> GenerationStream:
        """Start generating; iterate the result for `TextDelta`s, then read `.result`."""
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                seed=seed, stop=(stop,) if isinstance(stop, str) else tuple(stop or ()),
                                stop_token_ids=tuple(stop_token_ids))
        return self._stream(self.encode_prompt(prompt), params, cancel, deadline)

    def _stream(self, prompt: EncodedPrompt, params: SamplingParams, cancel, deadline) -> GenerationStream:
        ids = prompt.ids
        if len(ids) >= self.context_length:
            raise ContextOverflowError(
                f"prompt of {len(ids)} tokens does not fit the context of {self.context_length} tokens")
        started = time.monotonic()
        return GenerationStream(self.backend, self.tokenizer, ids, self._prompt_embeds(prompt), params,
                                self.context_length, self.tokenizer.eos_id, cancel=cancel, deadline=deadline,
                                started=started)

    def stream_transcription(self, audio: Any, language: str | None = None, max_tokens: int = 512,
                             temperature: float = 0.0, stop_token_ids: Sequence[int] = (),
                             cancel: threading.Event | None = None, deadline: float | None = None) -> GenerationStream:
        """Speech to text (Voxtral packages), streamed like `stream`: ``audio`` a path, file bytes
        or a 16 kHz float32 array; longer than 30 s is cut into 30 s chunks, as mistral-common
        lays them out."""
        if not self.has_audio:
            raise GenerationError("this engine package has no audio encoder: transcription needs a Voxtral package")
        try:
            encoded = self.tokenizer.encode_transcription(audio, language)
        except ValueError as exc:
            raise GenerationError(str(exc)) from None
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, stop_token_ids=tuple(stop_token_ids))
        return self._stream(encoded, params, cancel, deadline)

    def transcribe(self, audio: Any, language: str | None = None, **kwargs) -> GenerationResult:
        """`stream_transcription` to the end."""
        return self.stream_transcription(audio, language, **kwargs).finish()

    def generate(self, prompt: Prompt, **kwargs) -> GenerationResult:
        """Generate to the end; same arguments as `stream`."""
        return self.stream(prompt, **kwargs).finish()


def load(path: str | Path, backend: str = "auto", verify: bool = True, **backend_options) -> Model:
    """Open an engine package (checking its hashes) and pick a backend for this host."""
    package_dir = Path(path)
    manifest = load_manifest(package_dir, verify=verify)
    tokenizer = Tokenizer.from_file(package_dir / manifest.tokenizer)
    engine = create_backend(backend, package_dir, manifest, **backend_options)
    log.info("loaded %s (%s, %s) on %s", manifest.model_name, manifest.quant.get("method"), manifest.device,
             engine.name)
    return Model(package_dir, manifest, engine, tokenizer)
