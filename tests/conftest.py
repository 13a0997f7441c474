"""Shared pytest fixtures."""

import pytest


# -- tokenizer fixtures (generated from mistral-common's bundled tekken; never committed) --------
@pytest.fixture(scope="session")
def tekken_path(tmp_path_factory):
    """Full-vocab (131072) v13 tekken.json, Ministral 3 layout."""
    from edge_sdk.tiny_tokenizer import make_tekken_file

    return make_tekken_file(tmp_path_factory.mktemp("tok") / "tekken.json")


@pytest.fixture(scope="session")
def tiny_tekken_path(tmp_path_factory):
    """Same tokenizer cut to 4096 ids (1000 specials + 3096 BPE ranks) for tiny test models."""
    from edge_sdk.tiny_tokenizer import make_tekken_file

    return make_tekken_file(tmp_path_factory.mktemp("tok") / "tekken_tiny.json", vocab_size=4096)


# -- tiny checkpoints and engine packages (built once per session) -------------------------------
import shutil  # noqa: E402

# Two shapes so no code path depends on one: head_dim != hidden/heads with an untied head, and a
# tied multimodal (Mistral3ForConditionalGeneration) checkpoint with 3 q heads per kv head.
SHAPES = {
    "text": dict(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, head_dim=24, tie=False),
    "mm_tied": dict(hidden=96, intermediate=160, layers=3, heads=6, kv_heads=2, head_dim=16, tie=True,
                    multimodal=True, seed=1),
}


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory, tiny_tekken_path):
    """name -> checkpoint dir (HF layout, float32, tekken.json beside it)."""
    from edge_sdk.tiny import make_text_checkpoint

    root = tmp_path_factory.mktemp("ckpt")
    out = {}
    for name, kwargs in SHAPES.items():
        path = make_text_checkpoint(root / name, **kwargs)
        shutil.copy(tiny_tekken_path, path / "tekken.json")
        out[name] = path
    return out


@pytest.fixture(scope="session")
def build_package(tmp_path_factory):
    """build_package(checkpoint_dir, quant="none", device="cpu", head_rows=None, **recipe) -> package
    dir, cached per arguments."""
    from edge_sdk.build import build
    from edge_sdk.quant import QuantRecipe

    root = tmp_path_factory.mktemp("pkg")
    cache = {}

    def _build(checkpoint, quant="none", device="cpu", head_rows=None, **recipe):
        key = (str(checkpoint), quant, device, head_rows, tuple(sorted(recipe.items())))
        if key not in cache:
            out = root / f"p{len(cache)}"
            cache[key] = build(checkpoint, QuantRecipe(method=quant, **recipe), device=device, out=out,
                               progress=False, head_rows=head_rows)
        return cache[key]

    return _build
