"""Values that cross the runtime's public boundary: sampling settings, stream deltas, results.

The daemon, the SDK and the CLI all speak in these types, so they live apart from the engine code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

FinishReason = Literal["stop", "length", "cancelled", "deadline"]
#: What the CPU backend's KV cache holds (``edge_sdk.load(kv_cache=...)``, the CLI's and the
#: daemon's ``--kv-cache``): float16 halves the bytes a long-context step reads; int8 (each row with
#: its scale) halves them again; float32 keeps it exactly the graph's arithmetic (the exact tests).
KVCacheDtype = Literal["float16", "int8", "float32"]
KV_CACHE_DTYPES: tuple[str, ...] = get_args(KVCacheDtype)


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run on this host; the message says what is missing."""


class GenerationError(RuntimeError):
    """A request the model cannot run (context overflow, bad prompt); the message says why."""


class ContextOverflowError(GenerationError):
    pass


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token. temperature 0 is greedy; top_k 0 and top_p 1 disable them."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if self.max_tokens < 1:
            raise GenerationError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise GenerationError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise GenerationError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise GenerationError(f"top_k must be >= 0, got {self.top_k}")


@dataclass(frozen=True)
class TextDelta:
    """One streamed piece: the new text (always whole UTF-8 characters) and the token ids behind it."""

    text: str
    tokens: list[int]


@dataclass
class GenerationResult:
    """A finished generation, with the usage and timing figures the daemon reports."""

    text: str
    tokens: list[int]
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    time_to_first_token_s: float | None = None
    total_time_s: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        """Decode speed: tokens after the first, over the time after the first."""
        if self.time_to_first_token_s is None or self.completion_tokens < 2:
            return 0.0
        decode_s = self.total_time_s - self.time_to_first_token_s
        return (self.completion_tokens - 1) / decode_s if decode_s > 0 else 0.0
