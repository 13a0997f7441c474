"""Offline Ministral-3-style tekken tokenizer for tests.

The real Ministral 3 tekken.json lives in the (gated, large) model repos; tests must run offline
and must not commit a 131k-entry vocabulary. The mistral-common wheel ships a v3 Tekken file with
the same BPE vocabulary, so we derive a v13 file from it: add the special-token table Ministral 3
uses, an image block, and optionally cut the vocabulary so tiny test models can use small embeddings.
"""

from __future__ import annotations

import json
from pathlib import Path

NUM_SPECIAL = 1000

# Ids 0..19 are fixed across Mistral tekken files (MINISTRAL3.md section 4).
FIXED_SPECIALS = (
    "<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
    "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]",
    "[IMG_END]", "[PREFIX]", "[MIDDLE]", "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]",
    "[TOOL_CONTENT]",
)
# Beyond 19, ids as in the released files. [ARGS]/[CALL_ID] are not optional: mistral-common's
# v11+ instruct tokenizer looks them up at construction and fails without them.
EXTRA_SPECIALS = {24: "[AUDIO]", 25: "[BEGIN_AUDIO]", 32: "[ARGS]", 33: "[CALL_ID]",
                  34: "[THINK]", 35: "[/THINK]"}

# Pixtral settings of Ministral 3. mistral-common's ImageConfig is a dataclass taking exactly these
# keys; the [IMG]/[IMG_BREAK]/[IMG_END] ids come from the special-token table, not from here.
IMAGE_BLOCK = {"image_patch_size": 14, "max_image_size": 1540, "spatial_merge_size": 2}
#: Voxtral-Mini-3B-2507's audio block; its tokenizer has [TRANSCRIBE] where Ministral 3's has [THINK].
AUDIO_BLOCK = {"sampling_rate": 16000, "frame_rate": 12.5, "chunk_length_s": 30.0,
               "audio_encoding_config": {"num_mel_bins": 128, "hop_length": 160, "window_size": 400}}
AUDIO_SPECIALS = {34: "[TRANSCRIBE]", 35: "<SPECIAL_35>"}


def source_tekken_path() -> Path:
    """The v3 tekken file bundled with mistral-common (resolved lazily: it is a test-time need)."""
    import mistral_common

    return Path(mistral_common.__file__).parent / "data" / "tekken_240911.json"


def special_tokens(audio: bool = False) -> list[dict]:
    """The 1000-entry special_tokens table: fixed ids, named extras, `<SPECIAL_n>` fillers."""
    names = {i: s for i, s in enumerate(FIXED_SPECIALS)} | EXTRA_SPECIALS | (AUDIO_SPECIALS if audio else {})
    return [{"rank": i, "token_str": names.get(i, f"<SPECIAL_{i}>"), "is_control": True}
            for i in range(NUM_SPECIAL)]


def make_tekken_file(path: str | Path, vocab_size: int = 131072, audio: bool = False) -> Path:
    """Write a v13 tekken file with `vocab_size` total ids (1000 specials + BPE ranks) to `path`.

    Tekkenizer keeps the first `default_vocab_size - default_num_special_tokens` BPE ranks, so a
    small `vocab_size` gives a consistent smaller tokenizer (ranks 0..255 are the raw bytes, so any
    text still encodes). The vocab list is cut too, which keeps small fixture files small.
    The name must contain "tekken" and end in .json, or MistralTokenizer.from_file rejects it.
    ``audio``: Voxtral's layout instead (v7, an audio block, [TRANSCRIBE] at 34, no image block).
    """
    path = Path(path)
    if not ("tekken" in path.name and path.suffix == ".json"):
        raise ValueError(f"tekken file name must contain 'tekken' and end in .json, got {path.name}")
    data = json.loads(source_tekken_path().read_text(encoding="utf-8"))
    n_bpe = vocab_size - NUM_SPECIAL
    if not 256 <= n_bpe <= len(data["vocab"]):
        raise ValueError(f"vocab_size must be in [{NUM_SPECIAL + 256}, "
                         f"{NUM_SPECIAL + len(data['vocab'])}], got {vocab_size}")
    data["vocab"] = data["vocab"][:n_bpe]
    data["config"].update(num_vocab_tokens=n_bpe, default_vocab_size=vocab_size,
                          default_num_special_tokens=NUM_SPECIAL, version="v7" if audio else "v13")
    data["special_tokens"] = special_tokens(audio)
    if audio:
        data["audio"] = json.loads(json.dumps(AUDIO_BLOCK))
    else:
        data["image"] = dict(IMAGE_BLOCK)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return path
