"""Quantization: INT4 (block-wise, AWQ folding), FP8 (E4M3, static scales), the QuantizedModel oracle."""

from __future__ import annotations

import logging
import math

import ml_dtypes
import numpy as np
import pytest

from edge_sdk.models import ministral3
from edge_sdk.models.checkpoint import open_checkpoint
from edge_sdk.models.ministral3 import LINEARS, FloatWeights
from edge_sdk.quant import (Fp8Linear, Int4Linear, QuantRecipe, QuantizedModel, calibration_ids, calibration_text,
                            format_report, fp8_fake_quant, layer_groups, pack_int4, quantize, quantize_fp8,
                            quantize_int4, search_scale, sqnr_db, to_e4m3, unpack_int4)
from edge_sdk.quant.awq import awq_layer, fold
from edge_sdk.quant.int4 import int4_codes
from edge_sdk.tiny import make_text_checkpoint

from fp8_checkpoint import make_fp8_checkpoint

VOCAB = 256


def byte_encode(text: str) -> list[int]:
    """A stand-in tokenizer: UTF-8 bytes (all < 256 = VOCAB)."""
    return list(text.encode("utf-8"))


@pytest.fixture(scope="module")
def mha_dir(tmp_path_factory):
    """heads == kv_heads, so AWQ also scales o_proj (folded into v_proj); tied embeddings."""
    return make_text_checkpoint(tmp_path_factory.mktemp("mha"), seed=1, std=0.05, hidden=64, intermediate=128,
                                layers=2, heads=4, kv_heads=4, head_dim=16, vocab=VOCAB, tie=True)


@pytest.fixture(scope="module")
def gqa_dir(tmp_path_factory):
    """GQA (4 q heads, 2 kv heads), head_dim * heads != hidden, untied head."""
    return make_text_checkpoint(tmp_path_factory.mktemp("gqa"), seed=2, std=0.05, hidden=64, intermediate=128,
                                layers=2, heads=4, kv_heads=2, head_dim=32, vocab=VOCAB, tie=False)


@pytest.fixture(scope="module")
def fp8_dir(gqa_dir, tmp_path_factory):
    return make_fp8_checkpoint(gqa_dir, tmp_path_factory.mktemp("fp8"))


def prompts(n=4, length=32):
    return [np.random.default_rng(100 + i).integers(0, VOCAB, size=length) for i in range(n)]


class DictWeights:
    """Float TextWeights from plain dicts (for checking AWQ folds without quantization)."""

    def __init__(self, tensors, weights):
        self.tensors, self.weights = tensors, weights

    def tensor(self, name):
        return self.tensors[name]

    def linear(self, name, x):
        return x @ self.weights[name].T


def float_dicts(ckpt):
    cfg = ckpt.config.text
    tensors = {n: ckpt.get(n) for n in ("embed_tokens.weight", "norm.weight")}
    tensors["lm_head.weight"] = ckpt.lm_head()
    weights = {}
    for i in range(cfg.num_layers):
        for n in ("input_layernorm", "post_attention_layernorm"):
            tensors[f"layers.{i}.{n}.weight"] = ckpt.get(f"layers.{i}.{n}.weight")
        for n in LINEARS:
            weights[f"layers.{i}.{n}"] = ckpt.get(f"layers.{i}.{n}.weight")
    return tensors, weights


def capture_inputs(ckpt, ids):
    acts = {}
    ministral3.forward(FloatWeights(ckpt), ckpt.config.text, ids, capture=lambda n, x: acts.setdefault(n, x))
    return acts


# -- recipe ---------------------------------------------------------------------------------------

def test_recipe_defaults_and_validation():
    r = QuantRecipe()
    assert (r.method, r.block_size, r.awq, r.awq_grid, r.fp8_granularity, r.calibration_tokens) == (
        "int4", 128, True, 20, "tensor", 512)
    with pytest.raises(Exception):
        QuantRecipe(block_size=48)
    with pytest.raises(Exception):
        QuantRecipe(method="int8")
    with pytest.raises(Exception):
        r.method = "fp8"  # frozen
    assert QuantRecipe.model_validate_json(r.model_dump_json()) == r


# -- int4 -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("block", [32, 64, 128])
def test_int4_round_trip_error_bounded(block):
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((48, 256)) * 0.05).astype(np.float32)
    w[3, 7] = 0.9  # an outlier in one block
    lin = quantize_int4(w, block)
    assert lin.q.dtype == np.int8 and lin.q.shape == w.shape
    assert lin.q.min() >= -8 and lin.q.max() <= 7
    assert lin.scales.dtype == np.float16 and lin.scales.shape == (48, 256 // block)
    dq = lin.dequantize()
    assert dq.dtype == np.float32
    # Per element: at most half a step inside the code range; the block max may clip by at most
    # (max|w| - 7 * scale), bounded by max|w| * (1 - 7/9) for the largest divisor tried (plus the
    # fp16 rounding of the scale).
    s = np.repeat(lin.scales.astype(np.float32), block, axis=1)
    inside = (w >= -8 * s) & (w <= 7 * s)
    assert np.all(np.abs(dq - w)[inside] <= 0.5 * s[inside] * (1 + 1e-3))
    amax = np.repeat(np.abs(w.reshape(48, -1, block)).max(-1), block, axis=1)
    assert np.all(np.abs(dq - w) <= amax * (2 / 9 + 1e-3))
    assert sqnr_db(w, dq) > 15


def test_int4_scale_search_beats_absmax_over_7():
    w = np.random.default_rng(1).standard_t(3, size=(64, 512)).astype(np.float32)
    lin = quantize_int4(w, 128)
    wb = w.reshape(64, -1, 128)
    s = (np.abs(wb).max(-1, keepdims=True) / 7).astype(np.float16).astype(np.float32)
    naive = (np.clip(np.rint(wb / s), -8, 7) * s).reshape(w.shape)
    assert sqnr_db(w, lin.dequantize()) > sqnr_db(w, naive) + 0.5


def test_int4_zero_block_and_bad_shape():
    w = np.zeros((4, 64), np.float32)
    w[0, 40] = 1.0
    lin = quantize_int4(w, 32)
    assert np.isfinite(lin.dequantize()).all() and lin.dequantize()[1].max() == 0
    with pytest.raises(ValueError, match=r"\(4, 48\).*32"):
        quantize_int4(np.ones((4, 48), np.float32), 32)


def test_int4_pack_layout():
    q = np.array([[-8, 7, -1, 0, 3, -3]], dtype=np.int8)
    packed = Int4Linear.from_codes(q, np.ones((1, 1), np.float16), 6).packed
    assert packed.dtype == np.uint8 and packed.shape == (1, 3)
    # first element in the low nibble, two's complement: (-8, 7) -> 0x78, (-1, 0) -> 0x0F, (3, -3) -> 0xD3
    assert packed.tolist() == [[0x78, 0x0F, 0xD3]]
    w = np.random.default_rng(2).standard_normal((16, 64)).astype(np.float32)
    lin, (codes, scales) = quantize_int4(w, 32), int4_codes(w, 32)
    p = lin.packed
    assert p.shape == (16, 32) and lin.shape == (16, 64)
    np.testing.assert_array_equal(scales, lin.scales)
    np.testing.assert_array_equal(p & 0xF, codes[:, 0::2].astype(np.uint8) & 0xF)
    np.testing.assert_array_equal(p >> 4, codes[:, 1::2].astype(np.uint8) & 0xF)
    np.testing.assert_array_equal(lin.q, codes)  # unpacked: every code in [-8, 7] sign-extended back
    every = np.arange(-8, 8).reshape(2, 8)
    np.testing.assert_array_equal(unpack_int4(pack_int4(every)), every)
    np.testing.assert_array_equal(lin.rows(3, 9).dequantize(), lin.dequantize()[3:9])
    for rows in (3, 4, 6, 16):  # W^T packed a slice of output channels at a time, any slice size
        np.testing.assert_array_equal(lin.packed_t(rows), pack_int4(codes.T))
    with pytest.raises(ValueError):
        pack_int4(np.array([[9, 0]]))


def test_int4_pack_matches_onnx_int4_tensor():
    onnx = pytest.importorskip("onnx")
    from onnx import numpy_helper

    lin = quantize_int4(np.random.default_rng(3).standard_normal((8, 64)).astype(np.float32), 32)
    t = numpy_helper.from_array(lin.q.astype(ml_dtypes.int4))
    assert t.data_type == onnx.TensorProto.INT4
    assert t.raw_data == lin.packed.tobytes()


# -- AWQ ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["mha", "gqa"])
def test_awq_fold_preserves_float_model(which, mha_dir, gqa_dir):
    ckpt = open_checkpoint(mha_dir if which == "mha" else gqa_dir)
    cfg = ckpt.config.text
    ids = prompts(1)[0]
    ref, _ = ministral3.forward(FloatWeights(ckpt), cfg, ids)
    acts = capture_inputs(ckpt, ids)
    tensors, weights = float_dicts(ckpt)
    names = {g.linears for i in range(cfg.num_layers) for g in layer_groups(cfg, i)}
    has_o = any("o_proj" in n[0] for n in names)
    assert has_o == (which == "mha")  # o_proj is only scaled without GQA
    max_dev = 0.0
    for i in range(cfg.num_layers):
        for g in layer_groups(cfg, i):  # a fixed, clearly non-trivial scale per group
            s = np.abs(acts[g.linears[0]]).mean(0) ** 0.7
            s = (s / np.sqrt(s.max() * s.min())).astype(np.float32)
            max_dev = max(max_dev, float(np.abs(s - 1).max()))
            fold(tensors, weights, g, s)
    assert max_dev > 0.2
    out, _ = ministral3.forward(DictWeights(tensors, weights), cfg, ids)
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)
    # The searched scales fold just as exactly.
    tensors, weights = float_dicts(ckpt)
    for i in range(cfg.num_layers):
        awq_layer(tensors, weights, cfg, i, acts, block=32, grid=10)
    out, _ = ministral3.forward(DictWeights(tensors, weights), cfg, ids)
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)


def outlier_acts(rng, n, d, channels):
    x = rng.standard_normal((n, d)).astype(np.float32)
    x[:, channels] *= 25.0
    return x


def test_awq_beats_rtn_on_outlier_activations():
    rng = np.random.default_rng(4)
    channels = [3, 50, 77, 120]
    x_cal, x_test = outlier_acts(rng, 256, 128, channels), outlier_acts(rng, 256, 128, channels)
    w = [(rng.standard_normal((96, 128)) * 0.05).astype(np.float32),
         (rng.standard_normal((32, 128)) * 0.05).astype(np.float32)]
    s, alpha, err_rtn, err_awq = search_scale(x_cal, w, block=32, grid=20)
    assert alpha > 0 and err_awq < 0.8 * err_rtn
    wc = np.concatenate(w)
    ref = x_test @ wc.T
    rtn = x_test @ quantize_int4(wc, 32).dequantize().T
    awq = (x_test / s) @ quantize_int4(wc * s, 32).dequantize().T
    e_rtn, e_awq = np.mean((rtn - ref) ** 2), np.mean((awq - ref) ** 2)
    print(f"AWQ alpha {alpha:.2f}: held-out output MSE {e_awq:.3g} vs RTN {e_rtn:.3g}")
    assert e_awq < 0.8 * e_rtn


def test_awq_never_worse_than_rtn_on_calibration():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((64, 64)).astype(np.float32)
    w = [rng.standard_normal((32, 64)).astype(np.float32)]
    _, _, err_rtn, err_awq = search_scale(x, w, block=32, grid=5)
    assert err_awq <= err_rtn


# -- FP8 ------------------------------------------------------------------------------------------

def test_fp8_saturates_instead_of_nan():
    x = np.array([500.0, -1000.0, 448.0, 1e-3, 0.0], np.float32)
    assert np.isnan(x.astype(ml_dtypes.float8_e4m3fn).astype(np.float32)[0])  # why we clip
    y = to_e4m3(x).astype(np.float32)
    assert not np.isnan(y).any()
    assert y[:3].tolist() == [448.0, -448.0, 448.0]
    fq = fp8_fake_quant(np.array([10.0, -3.0, 0.5], np.float32), np.float32(0.01))
    assert np.isfinite(fq).all() and fq[0] == pytest.approx(4.48) and fq[1] == pytest.approx(-3.0, rel=0.07)


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_fp8_weight_quantization(granularity):
    rng = np.random.default_rng(6)
    w = (rng.standard_normal((32, 64)) * rng.uniform(0.01, 1.0, size=(32, 1))).astype(np.float32)
    lin = quantize_fp8(w, granularity, input_scale=0.02)
    assert lin.weight.dtype == ml_dtypes.float8_e4m3fn
    assert lin.weight_scale.dtype == np.float32
    assert lin.weight_scale.shape == (() if granularity == "tensor" else (32,))
    assert lin.input_scale.shape == () and lin.input_scale == np.float32(0.02)
    assert np.abs(lin.weight.astype(np.float32)).max() == 448.0
    assert sqnr_db(w, lin.dequantize()) > 25
    x = rng.standard_normal((5, 64)).astype(np.float32)
    np.testing.assert_allclose(lin(x), fp8_fake_quant(x, 0.02) @ lin.dequantize().T, rtol=1e-6)


def test_fp8_checkpoint_is_read_as_fp8(fp8_dir):
    ckpt = open_checkpoint(fp8_dir)
    assert ckpt.config.checkpoint_dtype == "fp8"
    for i in range(2):
        for n in LINEARS:
            assert ckpt.is_fp8(f"layers.{i}.{n}")
            assert ckpt.raw(f"layers.{i}.{n}.weight").dtype == ml_dtypes.float8_e4m3fn
    assert not ckpt.is_fp8("lm_head")


def test_fp8_reuses_checkpoint_scales(fp8_dir):
    ckpt = open_checkpoint(fp8_dir)

    def no_calibration(text):
        raise AssertionError("scales come from the checkpoint; no calibration run is needed")

    for granularity in ("tensor", "channel"):  # the checkpoint's own per-tensor scales win
        qm = quantize(ckpt, QuantRecipe(method="fp8", fp8_granularity=granularity), encode=no_calibration,
                      progress=False)
        for i in range(2):
            for n in LINEARS:
                name = f"layers.{i}.{n}"
                lin = qm.linears[name]
                assert isinstance(lin, Fp8Linear) and lin.from_checkpoint
                raw = np.asarray(ckpt.raw(name + ".weight"))
                assert lin.weight.dtype == raw.dtype and lin.weight.tobytes() == raw.tobytes()
                assert lin.weight_scale.shape == () and lin.weight_scale == np.float32(ckpt.scalar(name + ".weight_scale"))
                assert lin.input_scale.shape == ()
                assert lin.input_scale == np.float32(ckpt.scalar(name + ".activation_scale"))
        assert all(r.from_checkpoint and r.sqnr_db == math.inf for r in qm.report)
    # The reference with fake-quantized activations stays close to the dequantized FP8 model.
    ids = prompts(1)[0]
    ref, _ = ministral3.forward(FloatWeights(ckpt), ckpt.config.text, ids)
    out, _ = ministral3.forward(qm, ckpt.config.text, ids)
    assert (out.argmax(-1) == ref.argmax(-1)).mean() >= 0.8
    # INT4 from an FP8 checkpoint quantizes the dequantized weights.
    q4 = quantize(ckpt, QuantRecipe(method="int4", block_size=32), encode=byte_encode, progress=False)
    assert isinstance(q4.linears["layers.0.mlp.down_proj"], Int4Linear)


def test_fp8_checkpoint_loads_in_transformers(fp8_dir):
    """transformers 5.23 on a CPU: FineGrainedFP8 falls back to dequantize=True (needs accelerate)."""
    pytest.importorskip("accelerate", reason="transformers' FP8 loader requires accelerate")
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(fp8_dir).eval()
    ckpt = open_checkpoint(fp8_dir)
    hf_q = model.model.layers[0].self_attn.q_proj.weight.detach().float().numpy()
    np.testing.assert_array_equal(hf_q, ckpt.get("layers.0.self_attn.q_proj.weight"))
    ids = prompts(1)[0]
    with torch.no_grad():
        hf = model(torch.tensor(ids)[None]).logits[0].float().numpy()
    ours, _ = ministral3.forward(FloatWeights(ckpt), ckpt.config.text, ids)
    np.testing.assert_allclose(ours, hf, atol=1e-4, rtol=0)


# -- quantize() end to end ------------------------------------------------------------------------

# (recipe, min mean top-1 agreement on the MHA model / on the GQA model, max relative RMS logit
# error, min weight SQNR dB). Tiny random models have near-tied logits, so top-1 flips easily: on
# the GQA model Gaussian noise added at the same 21 dB weight SQNR gives ~0.7 top-1 agreement, the
# same as INT4 does. A broken quantizer gives ~1/256 agreement and a relative error near 1.
CASES = {
    "int4-b32-awq": (QuantRecipe(method="int4", block_size=32), (0.8, 0.6), 0.3, 15),
    "int4-b32-rtn": (QuantRecipe(method="int4", block_size=32, awq=False), (0.8, 0.6), 0.3, 15),
    "int4-b64-awq": (QuantRecipe(method="int4", block_size=64), (0.75, 0.6), 0.3, 15),
    "fp8-tensor": (QuantRecipe(method="fp8"), (0.85, 0.75), 0.12, 25),
    "fp8-channel": (QuantRecipe(method="fp8", fp8_granularity="channel"), (0.85, 0.75), 0.12, 25),
}


@pytest.mark.parametrize("which", ["mha", "gqa"])
@pytest.mark.parametrize("case", list(CASES))
def test_quantized_logits_close_to_float(case, which, mha_dir, gqa_dir):
    recipe, min_top1, max_rel, min_sqnr = CASES[case]
    ckpt = open_checkpoint(mha_dir if which == "mha" else gqa_dir)
    cfg = ckpt.config.text
    qm = quantize(ckpt, recipe, encode=byte_encode, progress=False)
    agree, rel, maxerr = [], [], 0.0
    for ids in prompts():
        ref, _ = ministral3.forward(FloatWeights(ckpt), cfg, ids)
        out, _ = ministral3.forward(qm, cfg, ids)
        agree.append(np.mean(out.argmax(-1) == ref.argmax(-1)))
        rel.append(np.sqrt(np.mean((out - ref) ** 2) / np.mean(ref ** 2)))
        maxerr = max(maxerr, float(np.abs(out - ref).max()))
    sq = [r.sqnr_db for r in qm.report]
    print(f"\n{case}/{which}: top-1 {np.mean(agree):.3f} (min {np.min(agree):.3f}), rel. RMS logit error "
          f"{np.mean(rel):.3f}, max |dlogit| {maxerr:.3f} (logit std {np.std(ref):.2f}), "
          f"SQNR mean {np.mean(sq):.1f} min {np.min(sq):.1f} dB")
    assert np.mean(agree) >= min_top1[0 if which == "mha" else 1]
    assert np.mean(rel) <= max_rel
    assert min(sq) > min_sqnr


def test_quantized_model_contents(mha_dir):
    ckpt = open_checkpoint(mha_dir)
    cfg = ckpt.config.text
    qm = quantize(ckpt, QuantRecipe(method="int4", block_size=32), encode=byte_encode, progress=False)
    assert isinstance(qm, QuantizedModel) and qm.config == ckpt.config and qm.recipe.block_size == 32
    expected = {f"layers.{i}.{n}" for i in range(cfg.num_layers) for n in LINEARS}
    assert set(qm.linears) == expected
    assert all(isinstance(v, Int4Linear) and v.block == 32 for v in qm.linears.values())
    assert set(qm.tensors) == {"embed_tokens.weight", "lm_head.weight", "norm.weight"} | {
        f"layers.{i}.{n}.weight" for i in range(cfg.num_layers) for n in ("input_layernorm", "post_attention_layernorm")}
    assert qm.tensors["lm_head.weight"] is qm.tensors["embed_tokens.weight"]  # tied
    assert all(t.dtype == np.float32 for t in qm.tensors.values())
    # AWQ folded 1/s into the norms (at least one alpha > 0 here), the float norm is unchanged.
    assert not np.allclose(qm.tensors["layers.0.input_layernorm.weight"], ckpt.get("layers.0.input_layernorm.weight"))
    assert [r.name for r in qm.report] == [f"layers.{i}.{n}" for i in range(cfg.num_layers) for n in LINEARS]
    assert all(r.awq_alpha is not None for r in qm.report)  # MHA: o_proj is scaled too
    text = format_report(qm.report)
    assert all(name in text for name in expected) and "mean SQNR" in text and "min" in text
    # linear() is the dequantized product
    x = np.random.default_rng(7).standard_normal((3, 64)).astype(np.float32)
    lin = qm.linears["layers.1.self_attn.q_proj"]
    np.testing.assert_allclose(qm.linear("layers.1.self_attn.q_proj", x), x @ lin.dequantize().T, rtol=1e-6)


def test_gqa_skips_o_proj(gqa_dir):
    qm = quantize(open_checkpoint(gqa_dir), QuantRecipe(method="int4", block_size=32), encode=byte_encode,
                  progress=False)
    alphas = {r.name: r.awq_alpha for r in qm.report}
    assert alphas["layers.0.self_attn.o_proj"] is None and alphas["layers.0.self_attn.q_proj"] is not None


def test_method_none_is_exact(gqa_dir):
    ckpt = open_checkpoint(gqa_dir)

    def no_calibration(text):
        raise AssertionError("method none needs no calibration")

    qm = quantize(ckpt, QuantRecipe(method="none"), encode=no_calibration, progress=False)
    assert all(isinstance(v, np.ndarray) and v.dtype == np.float32 for v in qm.linears.values())
    ids = prompts(1)[0]
    ref, _ = ministral3.forward(FloatWeights(ckpt), ckpt.config.text, ids)
    out, _ = ministral3.forward(qm, ckpt.config.text, ids)
    np.testing.assert_array_equal(out, ref)
    assert "all exact" in format_report(qm.report)


def test_int4_block_must_divide_dims(gqa_dir):
    with pytest.raises(ValueError, match=r"not a multiple of the int4 block size 128"):
        quantize(open_checkpoint(gqa_dir), QuantRecipe(method="int4", block_size=128), encode=byte_encode,
                 progress=False)


def test_calibration_text_and_ids(tmp_path, caplog):
    text = calibration_text(QuantRecipe())
    assert len(text) > 2000
    custom = tmp_path / "cal.txt"
    custom.write_text("hello robot")
    r = QuantRecipe(calibration_file=str(custom), calibration_tokens=8)
    assert calibration_text(r) == "hello robot"
    ids = calibration_ids(r, 100, encode=lambda s: [5, 500, 99, 1000] * 10)
    assert ids.tolist() == [5, 99, 99, 99, 5, 99, 99, 99]
    with caplog.at_level(logging.WARNING):
        ids = calibration_ids(QuantRecipe(calibration_tokens=16, seed=3), 100)
    assert "random" in caplog.text and len(ids) == 16 and ids.max() < 100
    np.testing.assert_array_equal(ids, calibration_ids(QuantRecipe(calibration_tokens=16, seed=3), 100))
