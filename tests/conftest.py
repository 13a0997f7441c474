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
