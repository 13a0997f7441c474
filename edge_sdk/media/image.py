"""Image preprocessing for the Pixtral vision encoder, with OpenCV only (no PIL at run time).

Reproduces mistral-common's `ImageEncoder` (mistral_common/tokens/tokenizers/image.py) step by
step, so that what the runtime feeds the encoder is what Mistral's own tokenizer would produce:

1. decode; grey -> RGB; transparent pixels are composited over white with PIL's integer blend
   (`out = (255 - a) + round(c * a / 255)`), bit for bit;
2. size: ratio = max(w, h) / max_image_size; if ratio > 1 both sides are scaled by 1/ratio with
   Python's `round` (at least 1 pixel); then each side is rounded *up* to a multiple of
   patch * merge (28);
3. `cv2.resize` of the float32 RGB image with INTER_CUBIC (always, even to the same size);
4. `x / 255`, `- mean`, `/ std` in float32 (CLIP statistics), channels first.

Output: float32 [3, H, W], C-contiguous. Encoded files are decoded with `IMREAD_UNCHANGED`, which
(like PIL) ignores EXIF orientation. Decoders differ a little between libjpeg builds, so JPEGs can
differ from PIL's decode by a grey level or two; PNGs and raw frames are bit-exact.

`image_token_layout` / `image_token_ids` give the matching `[IMG]` / `[IMG_BREAK]` / `[IMG_END]`
token sequence.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

import cv2
import numpy as np

DATASET_MEAN = (0.48145466, 0.4578275, 0.40821073)  # RGB, CLIP
DATASET_STD = (0.26862954, 0.26130258, 0.27577711)

DEFAULT_MAX_IMAGE_SIZE = 1540
DEFAULT_MAX_BYTES = 32 * 1024 * 1024
DEFAULT_MAX_PIXELS = 64 * 1024 * 1024

IMG, IMG_BREAK, IMG_END = 10, 12, 13

ImageInput = Union[str, os.PathLike, bytes, bytearray, memoryview, np.ndarray]


class ImageError(ValueError):
    """An input that is not a usable image; the message says why."""


# ---------------------------------------------------------------------------------------------
# decoding


def _check_jpeg_complete(data: bytes) -> None:
    # Some libjpeg builds (OpenCV 4.x on JetPack) decode a cut-off JPEG with a grey tail and only
    # a warning. The last scan (SOS, FFDA) must be followed by an end-of-image marker (FFD9).
    sos = data.rfind(b"\xff\xda")
    if sos < 0 or data.find(b"\xff\xd9", sos) < 0:
        raise ImageError("truncated JPEG: no end-of-image marker after the last scan")


def decode_image(data: bytes | bytearray | memoryview, *, max_bytes: int = DEFAULT_MAX_BYTES,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode an encoded image (JPEG, PNG, BMP, WebP, ...) to a uint8 array as OpenCV stores it:
    [H, W] grey, [H, W, 3] BGR or [H, W, 4] BGRA. Raises ImageError for anything unusable."""
    data = bytes(data)
    if not data:
        raise ImageError("empty image data (0 bytes)")
    if len(data) > max_bytes:
        raise ImageError(f"image data is {len(data)} bytes, over the limit of {max_bytes}")
    if data[:3] == b"\xff\xd8\xff":
        _check_jpeg_complete(data)
    try:
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error as exc:
        raise ImageError(f"cannot decode image ({len(data)} bytes): {exc}") from None
    if img is None:
        head = data[:8]
        raise ImageError(f"cannot decode image ({len(data)} bytes, starts with {head!r}): "
                         "not an image, an unsupported format, or truncated")
    if img.size == 0:
        raise ImageError("decoded image has zero size")
    if img.shape[0] * img.shape[1] > max_pixels:
        raise ImageError(f"image is {img.shape[1]}x{img.shape[0]} pixels, over the limit of {max_pixels}")
    return img


def load_image(path: str | os.PathLike, *, max_bytes: int = DEFAULT_MAX_BYTES,
               max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read and decode an image file (see `decode_image`)."""
    p = Path(path)
    try:
        size = p.stat().st_size
        if size > max_bytes:
            raise ImageError(f"{p}: {size} bytes, over the limit of {max_bytes}")
        data = p.read_bytes()
    except OSError as exc:
        raise ImageError(f"{p}: cannot read image file ({exc.strerror or exc})") from None
    try:
        return decode_image(data, max_bytes=max_bytes, max_pixels=max_pixels)
    except ImageError as exc:
        raise ImageError(f"{p}: {exc}") from None


def _to_uint8(img: np.ndarray) -> np.ndarray:
    if img.dtype == np.uint8:
        return img
    if img.dtype == np.uint16:  # 16-bit PNG/TIFF: keep the high byte, as an 8-bit viewer would
        return (img >> 8).astype(np.uint8)
    if img.dtype == np.bool_:
        return img.astype(np.uint8) * 255
    # Floats are ambiguous ([0, 1] or [0, 255]?): the caller converts them, knowing which.
    raise ImageError(f"unsupported image dtype {img.dtype} (expected uint8 or uint16 pixels)")


def _blend_white(color: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """PIL's `Image.paste(rgba, mask=rgba)` onto white, bit for bit:
    out = MULDIV255(255, 255 - a) + MULDIV255(c, a) = (255 - a) + MULDIV255(c, a)."""
    a = alpha.astype(np.uint32)[..., None]
    t = color.astype(np.uint32) * a + 128
    mixed = ((t >> 8) + t) >> 8
    return (255 - a + mixed).astype(np.uint8)


def to_rgb(img: np.ndarray, *, rgb: bool = False) -> np.ndarray:
    """A decoded image or camera frame -> uint8 RGB [H, W, 3]. `rgb=False` (the default) means the
    channels are in OpenCV's B, G, R(, A) order; `rgb=True` means R, G, B(, A). Alpha is
    composited over white as mistral-common does."""
    if not isinstance(img, np.ndarray):
        raise ImageError(f"expected a numpy array, got {type(img).__name__}")
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    if img.ndim not in (2, 3) or img.shape[0] == 0 or img.shape[1] == 0:
        raise ImageError(f"image array has shape {img.shape}; expected [H, W], [H, W, 3] or [H, W, 4] "
                         "with H, W > 0")
    img = _to_uint8(img)
    if img.ndim == 2:
        return np.repeat(img[:, :, None], 3, axis=2)
    c = img.shape[2]
    if c == 2:  # grey + alpha
        grey = np.repeat(img[:, :, :1], 3, axis=2)
        return _blend_white(grey, img[:, :, 1])
    if c == 3:
        return np.ascontiguousarray(img if rgb else img[:, :, ::-1])
    if c == 4:
        color = img[:, :, :3] if rgb else img[:, :, 2::-1]
        return _blend_white(color, img[:, :, 3])
    raise ImageError(f"image array has {c} channels; expected 1, 3 or 4")


# ---------------------------------------------------------------------------------------------
# geometry and tokens


def target_size(width: int, height: int, *, max_image_size: int = DEFAULT_MAX_IMAGE_SIZE,
                patch_size: int = 14, spatial_merge_size: int = 2) -> tuple[int, int]:
    """(new_width, new_height) that mistral-common resizes a width x height image to."""
    if width <= 0 or height <= 0:
        raise ImageError(f"image has zero size ({width}x{height})")
    w: float = width
    h: float = height
    ratio = max(w / max_image_size, h / max_image_size)
    if ratio > 1:
        w = max(round(w / ratio), 1)
        h = max(round(h / ratio), 1)
    unit = patch_size * spatial_merge_size
    return ((int(w) - 1) // unit + 1) * unit, ((int(h) - 1) // unit + 1) * unit


def image_token_layout(h: int, w: int, patch: int = 14, merge: int = 2) -> tuple[int, int]:
    """(rows, cols) of `[IMG]` tokens for a preprocessed image of h x w pixels."""
    unit = patch * merge
    if h <= 0 or w <= 0:
        raise ImageError(f"image has zero size ({w}x{h})")
    return (h - 1) // unit + 1, (w - 1) // unit + 1


def image_token_ids(rows: int, cols: int, *, img: int = IMG, img_break: int = IMG_BREAK,
                    img_end: int = IMG_END) -> list[int]:
    """`[IMG]*cols + [IMG_BREAK]` per row; the last `[IMG_BREAK]` becomes `[IMG_END]`."""
    ids = ([img] * cols + [img_break]) * rows
    ids[-1] = img_end
    return ids


# ---------------------------------------------------------------------------------------------
# the full pipeline


def normalize(rgb: np.ndarray) -> np.ndarray:
    """float32 [H, W, 3] RGB in [0, 255] -> float32 [3, H, W], with mistral-common's exact ops."""
    x = np.divide(rgb, np.float32(255.0), dtype=np.float32)
    x -= np.asarray(DATASET_MEAN, dtype=np.float32)
    x /= np.asarray(DATASET_STD, dtype=np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def preprocess_rgb(rgb: np.ndarray, *, max_image_size: int = DEFAULT_MAX_IMAGE_SIZE, patch_size: int = 14,
                   spatial_merge_size: int = 2) -> np.ndarray:
    """uint8 RGB [H, W, 3] -> normalised float32 [3, H', W'] (H', W' multiples of 28)."""
    h, w = rgb.shape[:2]
    size = target_size(w, h, max_image_size=max_image_size, patch_size=patch_size,
                       spatial_merge_size=spatial_merge_size)
    resized = cv2.resize(rgb.astype(np.float32), size, interpolation=cv2.INTER_CUBIC)
    return normalize(resized)


def preprocess_image(image: ImageInput, *, rgb: bool = False, max_image_size: int = DEFAULT_MAX_IMAGE_SIZE,
                     patch_size: int = 14, spatial_merge_size: int = 2, max_bytes: int = DEFAULT_MAX_BYTES,
                     max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Any image input -> float32 [3, H, W] ready for the vision encoder.

    `image`: a file path, encoded bytes (JPEG/PNG/...), or a numpy frame ([H, W] grey, [H, W, 3],
    [H, W, 4] with alpha). Frames are BGR(A) as OpenCV delivers them unless `rgb=True`.
    Raises ImageError for empty, truncated, oversize or undecodable inputs.
    """
    if max_image_size < 1:
        raise ValueError(f"max_image_size must be >= 1, got {max_image_size}")
    if isinstance(image, np.ndarray):
        if image.shape and image.ndim >= 2 and image.shape[0] * image.shape[1] > max_pixels:
            raise ImageError(f"frame is {image.shape[1]}x{image.shape[0]} pixels, over the limit of {max_pixels}")
        pixels = to_rgb(image, rgb=rgb)
    elif isinstance(image, (bytes, bytearray, memoryview)):
        pixels = to_rgb(decode_image(image, max_bytes=max_bytes, max_pixels=max_pixels))
    elif isinstance(image, (str, os.PathLike)):
        pixels = to_rgb(load_image(image, max_bytes=max_bytes, max_pixels=max_pixels))
    else:
        raise ImageError(f"unsupported image input type {type(image).__name__} "
                         "(expected a path, encoded bytes or a numpy array)")
    return preprocess_rgb(pixels, max_image_size=max_image_size, patch_size=patch_size,
                          spatial_merge_size=spatial_merge_size)


def encode_image(image: ImageInput, *, rgb: bool = False, max_image_size: int = DEFAULT_MAX_IMAGE_SIZE,
                 patch_size: int = 14, spatial_merge_size: int = 2, img: int = IMG, img_break: int = IMG_BREAK,
                 img_end: int = IMG_END, **limits) -> tuple[list[int], np.ndarray]:
    """(token ids, pixels [3, H, W]) like mistral-common's `ImageEncoder.__call__`."""
    pixels = preprocess_image(image, rgb=rgb, max_image_size=max_image_size, patch_size=patch_size,
                              spatial_merge_size=spatial_merge_size, **limits)
    rows, cols = image_token_layout(pixels.shape[1], pixels.shape[2], patch_size, spatial_merge_size)
    return image_token_ids(rows, cols, img=img, img_break=img_break, img_end=img_end), pixels
