"""Pixtral vision encoder + Mistral3 projector: NumPy reference and ONNX graph vs transformers.

Tolerances (measured on tiny random checkpoints, outputs of magnitude ~0.5):
- NumPy reference vs transformers (float32): max |diff| ~4e-7; asserted atol 2e-5 + rtol 1e-4.
- ONNX float32 (onnxruntime CPU) vs transformers: ~4e-7; same assertion.
- ONNX float16 vs transformers: ~5e-4; asserted max |diff| <= 1e-2 * max |ref|.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest

from edge_sdk.export.vision import bench_vision, export_vision, vision_session
from edge_sdk.media.image import image_token_ids, image_token_layout, preprocess_image
from edge_sdk.models.checkpoint import open_checkpoint
from edge_sdk.models.pixtral import encode_images, load_vision_weights

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SIZES = [(56, 84), (112, 56)]  # (H, W): 2x3 and 4x2 image tokens

CONFIGS = {
    # the default tiny model: vision 32 wide, 2 heads x 16, text hidden 64
    "base": dict(),
    # other shapes: 3 heads, 3 layers, wider text side, larger weights, different norms' eps
    "wide": dict(seed=1, std=0.12, hidden=48, intermediate=80, heads=4, kv_heads=2, head_dim=12,
                 vision=dict(hidden_size=48, intermediate_size=72, num_hidden_layers=3, num_attention_heads=3,
                             head_dim=16)),
}

ALLOWED_OPS = {"MatMul", "Add", "Mul", "Div", "Sqrt", "Reciprocal", "ReduceMean", "Pow", "Softmax", "Reshape",
               "Transpose", "Gather", "Concat", "Slice", "Cos", "Sin", "Erf", "Sigmoid", "Cast", "Shape",
               "Range", "Unsqueeze", "Squeeze", "Expand", "Split", "Identity", "Sub", "Neg", "Conv"}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def tiny(request, tmp_path_factory):
    from edge_sdk.tiny import make_text_checkpoint

    path = make_text_checkpoint(tmp_path_factory.mktemp(f"vlm_{request.param}"), multimodal=True,
                                **CONFIGS[request.param])
    ckpt = open_checkpoint(path)
    model = transformers.Mistral3ForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    return ckpt, model


def pixels_for(h: int, w: int, seed: int) -> np.ndarray:
    """Real preprocessing output (a random BGR frame resized to h x w)."""
    rng = np.random.default_rng(seed)
    frame = rng.integers(0, 256, (h - 5, w - 9, 3), dtype=np.uint8)  # rounds up to h x w
    px = preprocess_image(frame)
    assert px.shape == (3, h, w), px.shape
    return px


def hf_features(model, images: list[np.ndarray]) -> list[np.ndarray]:
    """transformers' get_image_features on a padded batch (block-diagonal attention inside)."""
    hmax = max(im.shape[1] for im in images)
    wmax = max(im.shape[2] for im in images)
    batch = torch.zeros(len(images), 3, hmax, wmax)
    for i, im in enumerate(images):
        batch[i, :, : im.shape[1], : im.shape[2]] = torch.from_numpy(im)
    sizes = torch.tensor([[im.shape[1], im.shape[2]] for im in images])
    with torch.no_grad():
        out = model.get_image_features(pixel_values=batch, image_sizes=sizes)
    return [t.numpy() for t in out.pooler_output]


def test_numpy_reference_matches_transformers(tiny):
    ckpt, model = tiny
    images = [pixels_for(h, w, seed=i) for i, (h, w) in enumerate(SIZES)]
    ref = hf_features(model, images)
    ours = encode_images(load_vision_weights(ckpt), ckpt.config.vision, images)
    assert len(ours) == len(ref)
    for im, a, b in zip(images, ours, ref):
        rows, cols = image_token_layout(im.shape[1], im.shape[2])
        assert a.shape == b.shape == (rows * cols, ckpt.config.text.hidden_size)
        assert a.dtype == np.float32
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4)
    # one image alone gives the same rows as inside a batch (block-diagonal attention)
    alone = encode_images(load_vision_weights(ckpt), ckpt.config.vision, images[1:])
    np.testing.assert_allclose(alone[0], ours[1], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_onnx_matches_transformers(tiny, tmp_path, dtype):
    ckpt, model = tiny
    cfg = ckpt.config
    path = export_vision(load_vision_weights(ckpt), cfg.vision, cfg.text.hidden_size, tmp_path, dtype=dtype)
    assert path.name == "vision.onnx" and (tmp_path / "vision.onnx.data").exists()
    onnx.checker.check_model(str(path), full_check=True)  # by path: external data + shape inference
    proto = onnx.load(str(path), load_external_data=False)
    assert {o.domain for o in proto.opset_import} == {""} and proto.opset_import[0].version == 21
    assert {n.op_type for n in proto.graph.node} <= ALLOWED_OPS
    assert [i.name for i in proto.graph.input] == ["pixel_values"]
    assert [o.name for o in proto.graph.output] == ["image_features"]

    sess = vision_session(path)
    images = [pixels_for(h, w, seed=10 + i) for i, (h, w) in enumerate(SIZES)]
    ref = hf_features(model, images)
    for im, b in zip(images, ref):
        out = sess.run(None, {"pixel_values": im[None]})[0]
        assert out.dtype == np.dtype(dtype) and out.shape == b.shape
        if dtype == "float32":
            np.testing.assert_allclose(out, b, atol=2e-5, rtol=1e-4)
        else:
            assert np.abs(out.astype(np.float32) - b).max() <= 1e-2 * np.abs(b).max()


def test_features_fill_image_tokens(tiny):
    """The row order of the features is the [IMG] order of the token layout (row-major)."""
    ckpt, _ = tiny
    im = pixels_for(56, 84, seed=3)
    feats = encode_images(load_vision_weights(ckpt), ckpt.config.vision, [im])[0]
    rows, cols = image_token_layout(56, 84)
    ids = image_token_ids(rows, cols)
    assert ids.count(10) == feats.shape[0] == rows * cols


def test_bad_inputs(tiny):
    ckpt, _ = tiny
    w = load_vision_weights(ckpt)
    with pytest.raises(ValueError, match="multiples of 28"):
        encode_images(w, ckpt.config.vision, [np.zeros((3, 56, 70), np.float32)])
    with pytest.raises(ValueError, match="text_hidden"):
        export_vision(w, ckpt.config.vision, ckpt.config.text.hidden_size + 1, "/nonexistent")
    w.pop("vision_tower.ln_pre.weight")
    with pytest.raises(KeyError, match="ln_pre"):
        encode_images(w, ckpt.config.vision, [np.zeros((3, 56, 56), np.float32)])


def test_bench_vision(tiny, tmp_path):
    ckpt, _ = tiny
    cfg = ckpt.config
    path = export_vision(load_vision_weights(ckpt), cfg.vision, cfg.text.hidden_size, tmp_path)
    rows = bench_vision(path, sizes=(224, 448), repeats=1, warmup=0, threads=1)
    assert [r["size"] for r in rows] == [224, 448]
    assert rows[0]["image_tokens"] == 64 and rows[1]["image_tokens"] == 256
    assert all(r["preprocess_ms"] > 0 and r["encode_ms"] > 0 for r in rows)


def test_reference_does_not_import_torch():
    code = ("import sys; import edge_sdk.models.pixtral, edge_sdk.export.vision, edge_sdk.media.image; "
            "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
