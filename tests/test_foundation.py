"""Checkpoint -> engine package -> CPU runtime, checked against transformers' own Ministral3 forward."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

import edge_sdk
from edge_sdk.models.checkpoint import open_checkpoint
from edge_sdk.models.ministral3 import FloatWeights, forward
from layouts import hf_greedy, hf_logits, to_native, to_new_prefix, to_shards

PROMPT = [1, 3, 1091, 1500, 2041, 1201, 3333, 1044, 4, 1600, 1200, 1300]  # crosses 16-token query-scale steps below
N_NEW = 24
LOGIT_TOL = 2e-4  # float32 graph vs float32 transformers: only summation order differs


def engine_logits(model, ids: list[int]) -> np.ndarray:
    """Last-token logits after a prefill of ids[:len(PROMPT)] and one decode step per later id."""
    b = model.backend
    n = len(PROMPT)
    logits, cache = b.forward(b.embed(np.array(ids[:n])), np.arange(n), b.new_cache())
    out = [logits]
    for pos in range(n, len(ids)):
        logits, cache = b.forward(b.embed(np.array([ids[pos]])), np.array([pos]), cache)
        out.append(logits)
    return np.stack(out)


@pytest.mark.parametrize("shape", ["text", "mm_tied"])
def test_reference_forward_matches_transformers(tiny_checkpoints, shape):
    ckpt = open_checkpoint(tiny_checkpoints[shape])
    ids = list(range(5, 5 + 40))  # 40 positions: crosses the YaRN-era query-scale steps at 16 and 32
    ref, _ = forward(FloatWeights(ckpt), ckpt.config.text, np.array(ids))
    np.testing.assert_allclose(ref, hf_logits(tiny_checkpoints[shape], ids), atol=LOGIT_TOL, rtol=0)


@pytest.mark.parametrize("shape", ["text", "mm_tied"])
def test_unquantized_engine_matches_transformers(tiny_checkpoints, build_package, shape):
    ckpt = tiny_checkpoints[shape]
    model = edge_sdk.load(build_package(ckpt), kv_cache="float32")  # the graph's exact arithmetic
    expected = hf_greedy(ckpt, PROMPT, N_NEW) if shape == "text" else None
    result = model.generate(PROMPT, max_tokens=N_NEW)
    assert result.finish_reason == "length" and len(result.tokens) == N_NEW
    if expected is not None:
        assert result.tokens == expected
    # Logits at every step of the generated sequence, against one transformers forward over it.
    ids = PROMPT + result.tokens
    oracle = hf_logits(ckpt, ids)[len(PROMPT) - 1:]
    np.testing.assert_allclose(engine_logits(model, ids), oracle, atol=LOGIT_TOL, rtol=0)
    assert result.tokens == [int(t) for t in oracle[:-1].argmax(-1)]


def test_cli_generate_json_gives_transformers_tokens(tiny_checkpoints, build_package):
    pkg = build_package(tiny_checkpoints["text"])
    out = subprocess.run([sys.executable, "-m", "edge_sdk.cli", "generate", str(pkg), "--prompt-ids",
                          ",".join(map(str, PROMPT)), "--max-tokens", str(N_NEW), "--json"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["tokens"] == hf_greedy(tiny_checkpoints["text"], PROMPT, N_NEW)


def test_every_layout_gives_identical_tokens(tiny_checkpoints, build_package, tmp_path):
    src = tiny_checkpoints["text"]
    reference = edge_sdk.load(build_package(src)).generate(PROMPT, max_tokens=N_NEW).tokens
    for make in (to_new_prefix, to_shards, to_native):
        layout = make(src, tmp_path / make.__name__)
        assert edge_sdk.load(build_package(layout)).generate(PROMPT, max_tokens=N_NEW).tokens == reference, make.__name__


def test_new_prefix_multimodal_layout_loads_same_weights(tiny_checkpoints, tmp_path):
    src = tiny_checkpoints["mm_tied"]
    a, b = open_checkpoint(src), open_checkpoint(to_new_prefix(src, tmp_path / "new"))
    assert sorted(a.names()) == sorted(b.names())
    for name in ("layers.2.self_attn.q_proj.weight", "vision_tower.patch_conv.weight", "norm.weight"):
        np.testing.assert_array_equal(a.get(name), b.get(name))


def test_chat_prompt_uses_instruct_format(tiny_checkpoints, build_package):
    model = edge_sdk.load(build_package(tiny_checkpoints["text"]))
    messages = [{"role": "system", "content": "You are a robot."}, {"role": "user", "content": "Hi"}]
    prompt = model.encode_prompt(messages)
    ids, images = prompt.ids, prompt.images
    assert ids == model.tokenizer.encode_chat(messages).ids and not images
    assert ids[0] == model.tokenizer.bos_id
    assert model.encode_prompt("Hi").ids == model.tokenizer.encode_chat([{"role": "user", "content": "Hi"}]).ids


def test_fp8_checkpoint_matches_transformers(tiny_checkpoints, build_package, tmp_path):
    """Mistral's FP8 layout: weights are W_fp8 * weight_scale_inv (a multiplier) as transformers reads them.

    On a CPU transformers dequantizes FP8 weights and ignores activation scales, so the oracle is
    our `--quant none` build of the FP8 checkpoint; `--quant fp8` must keep the stored FP8 bytes.
    """
    from fp8_checkpoint import make_fp8_checkpoint

    fp8 = make_fp8_checkpoint(tiny_checkpoints["text"], tmp_path / "fp8")
    shutil.copy(tiny_checkpoints["text"] / "tekken.json", fp8 / "tekken.json")
    assert open_checkpoint(fp8).is_fp8("layers.0.self_attn.q_proj")
    model = edge_sdk.load(build_package(fp8, "none"))
    assert model.generate(PROMPT, max_tokens=N_NEW).tokens == hf_greedy(fp8, PROMPT, N_NEW)
    ids = PROMPT + model.generate(PROMPT, max_tokens=8).tokens
    np.testing.assert_allclose(engine_logits(model, ids), hf_logits(fp8, ids)[len(PROMPT) - 1:], atol=LOGIT_TOL, rtol=0)

    kept = edge_sdk.load(build_package(fp8, "fp8"))
    report = kept.manifest.extra["quant_report"]
    assert all(r["from_checkpoint"] for r in report)
