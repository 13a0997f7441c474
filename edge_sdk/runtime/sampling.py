"""Next-token selection: greedy, or temperature with top-k and top-p (nucleus), seeded."""

from __future__ import annotations

import numpy as np

from .types import SamplingParams


class Sampler:
    """Picks token ids from logits; one instance per request so a seed reproduces a request."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray) -> int:
        p = self.params
        if p.temperature == 0.0:  # float32 and its float64 image have the same first maximum
            return int(np.argmax(logits))
        logits = np.asarray(logits, dtype=np.float64).reshape(-1) / p.temperature
        if 0 < p.top_k < logits.size:
            kth = np.partition(logits, -p.top_k)[-p.top_k]
            logits = np.where(logits < kth, -np.inf, logits)
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        if p.top_p < 1.0:
            order = np.argsort(-probs, kind="stable")
            cumulative = np.cumsum(probs[order])
            # Keep the smallest prefix whose mass reaches top_p (always at least one token).
            keep = order[: int(np.searchsorted(cumulative, p.top_p) + 1)]
            nucleus = np.zeros_like(probs)
            nucleus[keep] = probs[keep]
            probs = nucleus / nucleus.sum()
        return int(self.rng.choice(probs.size, p=probs))
