"""The generation loop: one prefill over the prompt, then one decode step per new token.

The KV cache from each step feeds the next, so the prompt is computed once. Text is streamed in
whole UTF-8 characters, and text that could still turn into a stop string is held back until it
is clear it does not.
"""

from __future__ import annotations

import threading
import time
from typing import Iterator

import numpy as np

from .sampling import Sampler
from .types import FinishReason, GenerationError, GenerationResult, SamplingParams, TextDelta


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters of `text` might be the start of a stop string."""
    hold = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:n]):
                hold = max(hold, n)
                break
    return hold


class GenerationStream:
    """Iterate for `TextDelta`s; afterwards `.result` holds the whole `GenerationResult`."""

    def __init__(self, backend, tokenizer, prompt_ids: list[int], prompt_embeds: np.ndarray,
                 params: SamplingParams, context_length: int, eos_id: int,
                 cancel: threading.Event | None = None, deadline: float | None = None,
                 started: float | None = None):
        """``started``: when the request was made (time.monotonic()), which the time to the first
        token counts from, so that what made ``prompt_embeds`` (the embedding lookup, the image and
        audio encoders) counts in it; default now."""
        if len(prompt_ids) == 0:
            raise GenerationError("the prompt is empty")
        self.backend = backend
        self.tokenizer = tokenizer
        self.prompt_ids = list(prompt_ids)
        self.prompt_embeds = prompt_embeds
        self.params = params
        self.context_length = context_length
        self.stop_ids = {eos_id, *params.stop_token_ids}
        self.cancel = cancel
        self.deadline = deadline
        self.started = time.monotonic() if started is None else started
        self.result: GenerationResult | None = None
        self._iter = self._run()

    def __iter__(self) -> Iterator[TextDelta]:
        return self._iter

    def __next__(self) -> TextDelta:
        return next(self._iter)

    def finish(self) -> GenerationResult:
        """Run to the end (discarding deltas) and return the result."""
        for _ in self._iter:
            pass
        return self.result

    def _interrupted(self) -> FinishReason | None:
        if self.cancel is not None and self.cancel.is_set():
            return "cancelled"
        if self.deadline is not None and time.monotonic() >= self.deadline:
            return "deadline"
        return None

    def _run(self) -> Iterator[TextDelta]:
        start = self.started
        sampler = Sampler(self.params)
        decoder = self.tokenizer.stream_decoder()
        stops = tuple(s for s in self.params.stop if s)
        tokens: list[int] = []
        text = ""  # everything decoded so far
        sent = 0  # characters of `text` already yielded
        pending_tokens: list[int] = []
        first_token_at = None
        stopped_by_string = False
        finish: FinishReason = "length"
        budget = min(self.params.max_tokens, self.context_length - len(self.prompt_ids))
        position = len(self.prompt_ids)

        finish = self._interrupted() or finish
        if finish == "length":  # not cancelled or past its deadline before it started
            logits, cache = self.backend.forward(self.prompt_embeds, np.arange(position), self.backend.new_cache())
            while True:
                token = sampler(logits)
                if first_token_at is None:
                    first_token_at = time.monotonic()
                if token in self.stop_ids:
                    finish = "stop"
                    break
                tokens.append(token)
                pending_tokens.append(token)
                text += decoder.push(token)
                cut = min((text.find(s) for s in stops if s in text), default=-1)
                if cut >= 0:
                    text, finish, stopped_by_string = text[:cut], "stop", True
                    break
                ready = len(text) - _held_back(text, stops)
                if ready > sent:
                    yield TextDelta(text[sent:ready], pending_tokens)
                    sent, pending_tokens = ready, []
                if len(tokens) >= budget:
                    finish = "length"
                    break
                interrupted = self._interrupted()
                if interrupted:
                    finish = interrupted
                    break
                logits, cache = self.backend.forward(self.backend.embed([token]), np.array([position]), cache)
                position += 1
        if not stopped_by_string:
            text += decoder.flush()
        if len(text) > sent or pending_tokens:
            yield TextDelta(text[sent:], pending_tokens)
        end = time.monotonic()
        self.result = GenerationResult(
            text=text, tokens=tokens, finish_reason=finish, prompt_tokens=len(self.prompt_ids),
            completion_tokens=len(tokens),
            time_to_first_token_s=None if first_token_at is None else first_token_at - start,
            total_time_s=end - start)
