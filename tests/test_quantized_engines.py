"""INT4 and FP8 engines against their own dequantized NumPy reference, and the error they report."""

from __future__ import annotations

import numpy as np
import pytest

import edge_sdk
from edge_sdk.models.checkpoint import open_checkpoint
from edge_sdk.models.ministral3 import FloatWeights, forward
from edge_sdk.quant import QuantRecipe, quantize
from test_foundation import PROMPT, engine_logits

N_NEW = 16


def reference_greedy(weights, cfg, prompt: list[int], n: int) -> tuple[list[int], np.ndarray]:
    """Greedy decoding with the NumPy forward: the new tokens and every step's last-token logits."""
    logits, cache = forward(weights, cfg, np.array(prompt))
    steps = [logits[-1]]
    tokens = []
    for _ in range(n):
        tokens.append(int(steps[-1].argmax()))
        logits, cache = forward(weights, cfg, np.array([tokens[-1]]), cache=cache)
        steps.append(logits[-1])
    return tokens, np.stack(steps)


CASES = {
    # (quant, recipe, logit tolerance vs the dequantized reference)
    "int4-awq": ("int4", dict(block_size=32), 2e-4),
    "int4-rtn": ("int4", dict(block_size=32, awq=False), 2e-4),
    "fp8-tensor": ("fp8", dict(), 5e-3),
    "fp8-channel": ("fp8", dict(fp8_granularity="channel"), 5e-3),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("shape", ["text", "mm_tied"])
def test_quantized_engine_matches_dequantized_reference(tiny_checkpoints, build_package, case, shape):
    quant, recipe, tol = CASES[case]
    ckpt_dir = tiny_checkpoints[shape]
    ckpt = open_checkpoint(ckpt_dir)
    model = edge_sdk.load(build_package(ckpt_dir, quant, **recipe), accuracy_level=0,  # exact INT4 kernel
                          kv_cache="float32")
    qm = quantize(ckpt, QuantRecipe(method=quant, **recipe), encode=model.tokenizer.encode, progress=False)
    tokens, ref_logits = reference_greedy(qm, ckpt.config.text, PROMPT, N_NEW)
    got = model.generate(PROMPT, max_tokens=N_NEW)
    np.testing.assert_allclose(engine_logits(model, PROMPT + tokens), ref_logits, atol=tol, rtol=0)
    assert got.tokens == tokens

    # The error quantization costs against the float model is measured and reported, not hidden.
    float_logits = forward(FloatWeights(ckpt), ckpt.config.text, np.array(PROMPT + tokens))[0][len(PROMPT) - 1:]
    agreement = float(np.mean(float_logits.argmax(-1) == ref_logits.argmax(-1)))
    err = float(np.abs(float_logits - ref_logits).max() / np.abs(float_logits).max())
    print(f"{shape} {case}: top-1 agreement with float {agreement:.2f}, max relative logit error {err:.3f}")
    assert agreement >= 0.25 and err < 0.5  # random tiny models have flat logits: loose, but a broken quantizer fails
    report = model.manifest.extra["quant_report"]
    assert len(report) == 7 * ckpt.config.text.num_layers
    assert all(r["sqnr_db"] > (15 if quant == "int4" else 25) for r in report)


def test_int4_fast_kernel_stays_close(tiny_checkpoints, build_package):
    """accuracy_level 4 (int8 activations, the deployment default) stays near the exact kernel."""
    pkg = build_package(tiny_checkpoints["text"], "int4", block_size=32)
    exact = engine_logits(edge_sdk.load(pkg, accuracy_level=0), PROMPT)
    fast = engine_logits(edge_sdk.load(pkg, accuracy_level=4), PROMPT)
    assert np.abs(exact - fast).max() < 0.05 * np.abs(exact).max()


# FP8 on a float16 graph: fp16 activations land on the other side of an e4m3 rounding step now
# and then (one step is 6%), and on a random tiny model those flips add up to several percent.
@pytest.mark.parametrize("device,quant,tol", [("orin-nano-8gb", "int4", 0.02), ("agx-thor", "fp8", 0.15)])
def test_gpu_profile_float16_graph_matches_reference(tiny_checkpoints, build_package, device, quant, tol):
    """The float16 graph a Jetson compiles, run here on ONNX Runtime, against the float32 reference."""
    ckpt_dir = tiny_checkpoints["text"]
    ckpt = open_checkpoint(ckpt_dir)
    recipe = dict(block_size=32) if quant == "int4" else {}
    model = edge_sdk.load(build_package(ckpt_dir, quant, device=device, **recipe), accuracy_level=0)
    assert model.backend.dtype == np.float16 and model.manifest.device == device
    qm = quantize(ckpt, QuantRecipe(method=quant, **recipe), encode=model.tokenizer.encode, progress=False)
    tokens, ref_logits = reference_greedy(qm, ckpt.config.text, PROMPT, 8)
    got = engine_logits(model, PROMPT + tokens)
    assert np.abs(got - ref_logits).max() < tol * np.abs(ref_logits).max()
