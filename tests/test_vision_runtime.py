"""Image prompts end to end: engine package with a vision graph vs transformers' Mistral3 forward."""

from __future__ import annotations

import json
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

import edge_sdk
from edge_sdk.runtime.types import GenerationError

LOGIT_TOL = 2e-4


def hf_image_logits(checkpoint, ids: list[int], images: list[np.ndarray]) -> np.ndarray:
    """transformers' Mistral3ForConditionalGeneration on the same ids and pixel values: logits [T, V]."""
    from transformers import Mistral3ForConditionalGeneration

    model = Mistral3ForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()
    h = max(im.shape[1] for im in images)
    w = max(im.shape[2] for im in images)
    batch = np.zeros((len(images), 3, h, w), np.float32)
    for i, im in enumerate(images):
        batch[i, :, : im.shape[1], : im.shape[2]] = im
    sizes = torch.tensor([[im.shape[1], im.shape[2]] for im in images])
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), pixel_values=torch.from_numpy(batch), image_sizes=sizes)
    return out.logits[0].numpy()


def picture(h: int, w: int, seed: int) -> np.ndarray:
    """A smooth RGB test picture (uint8 HxWx3), so resizing does not matter much."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


@pytest.fixture(scope="module")
def vlm(tiny_checkpoints, build_package):
    return tiny_checkpoints["mm_tied"], edge_sdk.load(build_package(tiny_checkpoints["mm_tied"]), kv_cache="float32")


@pytest.mark.parametrize("sizes", [[(60, 90)], [(60, 90), (100, 40)]], ids=["one", "two"])
def test_image_prompt_matches_transformers(vlm, sizes):
    ckpt, model = vlm
    content = [{"type": "image", "image": picture(h, w, i)} for i, (h, w) in enumerate(sizes)]
    messages = [{"role": "user", "content": content + [{"type": "text", "text": "What is in front of the robot?"}]}]
    prompt = model.encode_prompt(messages)
    ids, images = prompt.ids, prompt.images
    assert len(images) == len(sizes)
    # The token layout is mistral-common's: [IMG] per merged patch, [IMG_BREAK] per row, [IMG_END].
    assert ids.count(model.tokenizer.image_token_id) == sum(im.shape[1] // 28 * im.shape[2] // 28 for im in images)
    assert ids.count(model.tokenizer.image_end_id) == len(sizes)
    oracle = hf_image_logits(ckpt, ids, images)

    result = model.generate(messages, max_tokens=12)
    backend = model.backend
    logits, cache = backend.forward(model._prompt_embeds(prompt), np.arange(len(ids)), backend.new_cache())
    np.testing.assert_allclose(logits, oracle[-1], atol=LOGIT_TOL, rtol=0)
    full = hf_image_logits(ckpt, ids + result.tokens, images)
    assert result.tokens == [int(t) for t in full[len(ids) - 1:-1].argmax(-1)]


def test_cli_generate_with_image(vlm, tmp_path, build_package, tiny_checkpoints):
    ckpt, model = vlm
    path = tmp_path / "frame.png"
    cv2.imwrite(str(path), picture(56, 84, 3)[:, :, ::-1])
    out = subprocess.run([sys.executable, "-m", "edge_sdk.cli", "generate", str(build_package(ckpt)),
                          "--prompt", "Describe.", "--image", str(path), "--max-tokens", "6", "--json"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    messages = [{"role": "user", "content": [{"type": "image", "image": str(path)},
                                             {"type": "text", "text": "Describe."}]}]
    assert json.loads(out.stdout)["tokens"] == model.generate(messages, max_tokens=6).tokens


def test_text_only_package_refuses_images(tiny_checkpoints, build_package):
    model = edge_sdk.load(build_package(tiny_checkpoints["text"]))
    assert model.capabilities()["modalities"] == ["text"]
    with pytest.raises(GenerationError, match="no vision encoder"):
        model.generate([{"role": "user", "content": [{"type": "image", "image": picture(56, 56, 0)},
                                                     {"type": "text", "text": "hi"}]}])


def test_device_profile_caps_image_size(tiny_checkpoints, build_package):
    """An Orin Nano package tokenizes a big frame at its own max_image_size (448), not 1540."""
    model = edge_sdk.load(build_package(tiny_checkpoints["mm_tied"], "int4", device="orin-nano-8gb", block_size=32))
    [pixels] = model.encode_prompt([{"role": "user", "content": [{"type": "image", "image": picture(900, 1200, 1)},
                                                                     {"type": "text", "text": "hi"}]}]).images
    assert max(pixels.shape[1:]) <= 448
