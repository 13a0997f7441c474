"""OpenCV preprocessing == mistral-common's own image encoder; bad inputs raise ImageError."""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
from PIL import Image

from edge_sdk.media.image import (ImageError, decode_image, encode_image, image_token_ids, image_token_layout,
                                  preprocess_image, target_size)

mc_image = pytest.importorskip("mistral_common.tokens.tokenizers.image")
from mistral_common.protocol.instruct.chunk import ImageChunk  # noqa: E402


def reference(data: bytes, max_image_size: int = 1540):
    """mistral-common's ImageEncoder on the same encoded bytes (decoded by PIL, as it does)."""
    enc = mc_image.ImageEncoder(mc_image.ImageConfig(image_patch_size=14, max_image_size=max_image_size,
                                                     spatial_merge_size=2),
                                mc_image.SpecialImageIDs(img=10, img_break=12, img_end=13))
    out = enc(ImageChunk(image=Image.open(io.BytesIO(data))))
    return out.tokens, out.image


def png_bytes(arr: np.ndarray, mode: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, "PNG")
    return buf.getvalue()


def random_image(h: int, w: int, c: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # smooth + noise, so bicubic overshoot and alpha blending both matter
    y, x = np.mgrid[0:h, 0:w]
    base = (127 + 100 * np.sin(x / 7.0 + y / 11.0))[..., None]
    img = base + rng.normal(0, 30, (h, w, c))
    return np.clip(img, 0, 255).astype(np.uint8)


# PNG decoding is lossless in both libraries, so these are bit-exact (tolerance 0).
@pytest.mark.parametrize("w,h,mode,max_size", [
    (100, 60, "RGB", 1540),      # upscale to 112x84
    (2000, 900, "RGB", 1540),    # downscale: ratio 1.2987 -> 1540x693 -> 1540x700
    (640, 480, "RGB", 448),      # configurable max_image_size (Jetson cap) -> 448x336
    (300, 200, "RGBA", 1540),    # alpha composited over white
    (57, 33, "L", 1540),         # grey
    (50, 70, "LA", 1540),        # grey + alpha
    (10, 3000, "RGB", 1540),     # extreme aspect ratio: the short side keeps 1 pixel -> 28
])
def test_png_matches_mistral_common_exactly(w, h, mode, max_size):
    c = {"RGB": 3, "RGBA": 4, "L": 1, "LA": 2}[mode]
    arr = random_image(h, w, c, seed=w + h)
    if mode == "RGBA":
        arr[..., 3] = np.linspace(0, 255, w, dtype=np.uint8)[None, :]  # every alpha level
    data = png_bytes(arr[..., 0] if c == 1 else arr, mode)
    ref_tokens, ref = reference(data, max_size)
    tokens, ours = encode_image(data, max_image_size=max_size)
    assert ours.dtype == np.float32 and ours.flags.c_contiguous
    assert ours.shape == ref.shape
    assert tokens == ref_tokens
    np.testing.assert_array_equal(ours, ref)


def test_file_path_and_numpy_frames(tmp_path):
    rgb = random_image(90, 130, 3, seed=3)
    data = png_bytes(rgb, "RGB")
    _, ref = reference(data)
    path = tmp_path / "x.png"
    path.write_bytes(data)
    np.testing.assert_array_equal(preprocess_image(path), ref)
    np.testing.assert_array_equal(preprocess_image(str(path)), ref)
    np.testing.assert_array_equal(preprocess_image(rgb[:, :, ::-1].copy()), ref)  # BGR frame (OpenCV default)
    np.testing.assert_array_equal(preprocess_image(rgb, rgb=True), ref)


def test_four_channel_frames():
    rgba = random_image(64, 64, 4, seed=5)
    _, ref = reference(png_bytes(rgba, "RGBA"))
    bgra = rgba[:, :, [2, 1, 0, 3]].copy()
    np.testing.assert_array_equal(preprocess_image(bgra), ref)
    np.testing.assert_array_equal(preprocess_image(rgba, rgb=True), ref)


def test_jpeg_close_to_mistral_common():
    """JPEG decoders (PIL's libjpeg-turbo vs OpenCV's) may differ by a grey level; after
    normalisation one level is 1/255/0.26 = 0.015."""
    rgb = random_image(150, 200, 3, seed=7)
    ok, enc = cv2.imencode(".jpg", rgb[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    ref_tokens, ref = reference(enc.tobytes())
    tokens, ours = encode_image(enc.tobytes())
    assert tokens == ref_tokens
    assert np.abs(ours - ref).max() <= 0.05
    assert np.abs(ours - ref).mean() <= 0.005


def test_matches_tokenizer_image_path(tiny_tekken_path):
    """The full tokenizer route (MistralTokenizer, v13 image block) gives the same tokens and pixels."""
    from mistral_common.protocol.instruct.chunk import TextChunk
    from mistral_common.protocol.instruct.messages import UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    tok = MistralTokenizer.from_file(str(tiny_tekken_path))
    rgb = random_image(200, 340, 3, seed=11)
    data = png_bytes(rgb, "RGB")
    req = ChatCompletionRequest(messages=[UserMessage(content=[
        ImageChunk(image=Image.open(io.BytesIO(data))), TextChunk(text="what is this?")])])
    out = tok.encode_chat_completion(req)
    tokens, ours = encode_image(data)
    np.testing.assert_array_equal(ours, out.images[0])
    ids = list(out.tokens)
    start = ids.index(10)
    assert ids[start:start + len(tokens)] == tokens


def test_token_layout():
    assert image_token_layout(56, 84) == (2, 3)
    assert image_token_layout(112, 56) == (4, 2)
    assert image_token_ids(2, 3) == [10, 10, 10, 12, 10, 10, 10, 13]
    assert image_token_ids(1, 1, img=1, img_break=2, img_end=3) == [1, 3]
    assert target_size(2000, 900) == (1540, 700)
    assert target_size(28, 28) == (28, 28)
    assert target_size(1, 1) == (28, 28)


def test_bad_images(tmp_path):
    rgb = random_image(120, 160, 3)
    ok, jpg = cv2.imencode(".jpg", rgb)
    jpg = jpg.tobytes()
    png = png_bytes(rgb, "RGB")
    cases = {
        "truncated jpeg": jpg[: len(jpg) // 2],
        "jpeg without end marker": jpg[:-2],
        "truncated png": png[: len(png) - 20],
        "not an image": b"this is certainly not an image" * 10,
        "empty": b"",
    }
    for what, data in cases.items():
        with pytest.raises(ImageError):
            preprocess_image(data)
        assert issubclass(ImageError, ValueError), what
    with pytest.raises(ImageError, match="over the limit"):
        preprocess_image(png, max_bytes=100)
    with pytest.raises(ImageError, match="over the limit"):
        decode_image(png, max_pixels=1000)
    with pytest.raises(ImageError):
        preprocess_image(np.zeros((0, 10, 3), np.uint8))
    with pytest.raises(ImageError):
        preprocess_image(np.zeros((10, 10, 5), np.uint8))
    with pytest.raises(ImageError):
        preprocess_image(np.zeros((2, 10, 10, 3), np.uint8))
    with pytest.raises(ImageError):
        preprocess_image(tmp_path / "missing.png")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(jpg[:100])
    with pytest.raises(ImageError, match="bad.jpg"):
        preprocess_image(bad)
    with pytest.raises(ImageError):
        preprocess_image(12345)  # type: ignore[arg-type]


def test_frame_dtypes():
    rgb = random_image(40, 60, 3, seed=2)
    ref = preprocess_image(rgb, rgb=True)
    np.testing.assert_array_equal(preprocess_image(rgb.astype(np.uint16) * 257, rgb=True), ref)  # 16-bit
    np.testing.assert_array_equal(preprocess_image(rgb[:, :, :1]), preprocess_image(rgb[:, :, 0]))  # [H,W,1]
    with pytest.raises(ImageError, match="dtype"):
        preprocess_image(rgb.astype(np.float32))
