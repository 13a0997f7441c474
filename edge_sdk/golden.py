"""Golden outputs: what a package's decoder must answer, recorded at build time, checked anywhere.

The build records, for a few fixed prompts, the greedy tokens and the top logits of every step,
computed on the CPU by the standard graph with ONNX Runtime's exact INT4 kernel (accuracy level
0: the suite holds it to the dequantized NumPy reference within 2e-4). `check_golden` replays
them on any backend, teacher-forced (the recorded tokens are fed whatever the backend picks), so
one bad step does not cascade, and reports the worst logit error and the first greedy mismatch.
`edge-sdk compile` refuses to activate an engine that fails it (TensorRT miscompiles happen on
Jetson), and `edge-sdk verify --run` runs it on any backend.

Tolerance: a step passes when every recorded top-k logit is within TOLERANCE[dtype] x the
largest of them, and the backend's argmax is the recorded token wherever the recorded top-2
margin exceeds twice that (a near-tie may flip under float16 rounding without anything wrong).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

GOLDEN_TEXTS = ("The robot moves to the charging dock.", "Count: one, two, three,", "Rouge, vert, bleu")
STEPS = 8  # greedy tokens per prompt
TOP_K = 5
TOLERANCE = {"float32": 2e-3, "float16": 3e-2}


def golden_prompts(encode: Callable[[str], list[int]]) -> list[list[int]]:
    return [encode(text) for text in GOLDEN_TEXTS]


def record_package_golden(package_dir: str, manifest_json: str, tokenizer_path: str) -> dict:
    """`record_golden` for a package being built: its standard graph, the exact INT4 kernel."""
    from .package import Manifest
    from .runtime.onnxruntime import OnnxRuntimeBackend
    from .tokenizer import Tokenizer

    manifest = Manifest.model_validate_json(manifest_json)
    tok = Tokenizer.from_file(tokenizer_path)
    backend = OnnxRuntimeBackend(package_dir, manifest, accuracy_level=0, graph="decoder")
    return record_golden(backend, golden_prompts(lambda text: tok.encode(text, bos=True)),
                         manifest.graphs["decoder"].inputs[0].dtype)


def record_golden(backend, prompts: list[list[int]], dtype: str, steps: int = STEPS, top_k: int = TOP_K) -> dict:
    """Run ``backend`` greedily on ``prompts``; the manifest's ``extra["golden"]``."""
    records = []
    for prompt in prompts:
        tokens, tops = [], []
        for logits in _teacher_forced(backend, prompt, tokens, steps):
            ids = np.argsort(logits)[::-1][:top_k]
            tops.append([[int(i), float(logits[i])] for i in ids])
            tokens.append(int(ids[0]))
        records.append({"prompt": prompt, "tokens": tokens, "top": tops})
    return {"dtype": dtype, "tolerance": TOLERANCE[dtype], "steps": steps, "top_k": top_k, "records": records}


def _teacher_forced(backend, prompt: list[int], tokens: list[int], steps: int):
    """Yield each step's logits; the next input is ``tokens[i]``, which a greedy caller appends
    after seeing the step's logits."""
    logits, cache = backend.forward(backend.embed(np.array(prompt)), np.arange(len(prompt)), backend.new_cache())
    yield logits
    for i in range(steps - 1):
        pos = len(prompt) + i
        logits, cache = backend.forward(backend.embed(np.array([tokens[i]])), np.array([pos]), cache)
        yield logits


@dataclass
class GoldenReport:
    ok: bool
    worst_error: float  # largest |logit - recorded| over the allowed error, all steps: <= 1 passes
    mismatches: list[dict[str, Any]]

    def summary(self) -> str:
        if self.ok:
            return f"golden check passed (worst logit error {self.worst_error:.2f} of the tolerance)"
        m = self.mismatches[0]
        return (f"golden check FAILED: prompt {m['prompt']} step {m['step']}: {m['why']} "
                f"({len(self.mismatches)} failing steps; worst logit error {self.worst_error:.1f}x the tolerance)")


def check_golden(backend, golden: dict) -> GoldenReport:
    """Replay ``golden`` (from `record_golden`) on ``backend``."""
    worst, mismatches = 0.0, []
    for p, rec in enumerate(golden["records"]):
        steps = len(rec["tokens"])
        for step, logits in enumerate(_teacher_forced(backend, rec["prompt"], rec["tokens"], steps)):
            top = rec["top"][step]
            ids = np.array([i for i, _ in top])
            want = np.array([v for _, v in top])
            allowed = golden["tolerance"] * max(np.abs(want).max(), 1e-6)
            err = float(np.abs(np.asarray(logits)[ids] - want).max() / allowed)
            worst = max(worst, err)
            clear = len(want) < 2 or want[0] - want[1] > 2 * allowed
            got = int(np.argmax(logits))
            if err > 1:
                mismatches.append({"prompt": p, "step": step, "why": f"top logits off by {err:.1f}x the tolerance"})
            elif clear and got != rec["tokens"][step]:
                mismatches.append({"prompt": p, "step": step,
                                   "why": f"greedy token {got}, recorded {rec['tokens'][step]}"})
    return GoldenReport(ok=not mismatches, worst_error=worst, mismatches=mismatches)
