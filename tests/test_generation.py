"""The generation loop: sampling settings, stop conditions, streaming, cancel, deadline, overflow."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

import edge_sdk
from edge_sdk.runtime.sampling import Sampler
from edge_sdk.runtime.types import GenerationError, SamplingParams
from test_foundation import PROMPT


@pytest.fixture(scope="module")
def model(tiny_checkpoints, build_package):
    return edge_sdk.load(build_package(tiny_checkpoints["text"]))


def test_seed_reproduces_and_differs(model):
    a = model.generate(PROMPT, max_tokens=16, temperature=1.0, seed=7)
    b = model.generate(PROMPT, max_tokens=16, temperature=1.0, seed=7)
    c = model.generate(PROMPT, max_tokens=16, temperature=1.0, seed=8)
    assert a.tokens == b.tokens
    assert a.tokens != c.tokens


def test_top_k_one_is_greedy(model):
    greedy = model.generate(PROMPT, max_tokens=12)
    assert model.generate(PROMPT, max_tokens=12, temperature=0.8, top_k=1, seed=3).tokens == greedy.tokens


def test_sampler_respects_top_k_and_top_p():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    top_k = Sampler(SamplingParams(temperature=1.0, top_k=2, seed=0))
    assert {top_k(logits) for _ in range(300)} == {0, 1}
    top_p = Sampler(SamplingParams(temperature=1.0, top_p=0.7, seed=0))  # 0.5 + 0.3 reaches 0.7
    assert {top_p(logits) for _ in range(300)} == {0, 1}
    with pytest.raises(GenerationError, match="top_p"):
        SamplingParams(top_p=0)


def test_stream_deltas_join_to_result(model):
    stream = model.stream("Tell me about the warehouse.", max_tokens=20)
    deltas = list(stream)
    assert "".join(d.text for d in deltas) == stream.result.text
    assert [t for d in deltas for t in d.tokens] == stream.result.tokens
    assert stream.result.completion_tokens == 20 and stream.result.time_to_first_token_s is not None


def test_time_to_first_token_counts_the_prompts_embedding(model, monkeypatch):
    """The clock starts at the request: the prompt's embedding (and, with media, its encoders)
    happens before the first step, and a 4,096-token prompt's takes tens of milliseconds."""
    lookup = model.backend.embed

    def slow_prompt(ids):
        if len(ids) > 1:
            time.sleep(0.3)
        return lookup(ids)

    monkeypatch.setattr(model.backend, "embed", slow_prompt)
    result = model.generate(PROMPT, max_tokens=3)
    assert result.time_to_first_token_s >= 0.3 and result.total_time_s >= result.time_to_first_token_s


def test_stop_string_cuts_text_and_is_never_streamed(model):
    full = model.generate(PROMPT, max_tokens=24)
    stop = full.text[len(full.text) // 2: len(full.text) // 2 + 3]
    assert stop.strip(), "need a visible stop string"
    stream = model.stream(PROMPT, max_tokens=24, stop=[stop])
    streamed = "".join(d.text for d in stream)
    assert stream.result.finish_reason == "stop"
    assert stream.result.text == full.text[: full.text.index(stop)] == streamed


def test_stop_token_ids(model):
    full = model.generate(PROMPT, max_tokens=10)
    cut = model.generate(PROMPT, max_tokens=10, stop_token_ids=[full.tokens[4]])
    assert cut.finish_reason == "stop" and cut.tokens == full.tokens[: full.tokens.index(full.tokens[4])]


def test_cancel_and_deadline_end_early(model):
    cancel = threading.Event()
    stream = model.stream(PROMPT, max_tokens=200, cancel=cancel)
    next(iter(stream))
    cancel.set()
    result = stream.finish()
    assert result.finish_reason == "cancelled" and result.completion_tokens < 200
    late = model.generate(PROMPT, max_tokens=200, deadline=time.monotonic() - 1)
    assert late.finish_reason == "deadline" and late.completion_tokens == 0


def test_context_overflow_is_a_clear_error(model):
    with pytest.raises(GenerationError, match=f"does not fit the context of {model.context_length}"):
        model.generate([5] * model.context_length)
    near = model.generate([5] * (model.context_length - 3), max_tokens=50)
    assert near.finish_reason == "length" and near.completion_tokens == 3


def test_bad_prompts_are_clear_errors(model):
    with pytest.raises(GenerationError, match="outside the vocabulary"):
        model.generate([1, 999999])
    with pytest.raises(GenerationError, match="prompt must be"):
        model.generate(3.5)
    with pytest.raises(GenerationError, match="role"):
        model.generate([{"role": "robot", "content": "hi"}])


def test_cli_messages_file(tiny_checkpoints, build_package, tmp_path):
    import json
    import subprocess
    import sys

    pkg = build_package(tiny_checkpoints["text"])
    messages = [{"role": "system", "content": "You are a robot."}, {"role": "user", "content": "Hi"}]
    (tmp_path / "chat.json").write_text(json.dumps(messages))
    run = lambda f: subprocess.run([sys.executable, "-m", "edge_sdk.cli", "generate", str(pkg), "--messages", str(f),
                                    "--max-tokens", "6", "--json"], capture_output=True, text=True, timeout=120)
    out = run(tmp_path / "chat.json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["tokens"] == edge_sdk.load(pkg).generate(messages, max_tokens=6).tokens
    missing = run(tmp_path / "nope.json")
    assert missing.returncode == 2 and "nope.json: cannot read chat messages" in missing.stderr


def test_runtime_and_daemon_never_import_torch_or_transformers(tiny_checkpoints, build_package):
    """Build/test-time tools only: a Jetson image need not carry them."""
    import subprocess
    import sys

    pkg = build_package(tiny_checkpoints["mm_tied"])
    code = ("import sys, edge_sdk, edge_sdk.serve.daemon, edge_sdk.client, edge_sdk.cli, edge_sdk.media.camera;"
            f"m = edge_sdk.load({str(pkg)!r}); m.generate('hi', max_tokens=2);"
            "bad = [n for n in ('torch', 'transformers') if n in sys.modules]; assert not bad, bad")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
