"""Open a Ministral 3 or Voxtral checkpoint in any layout Mistral ships and expose one canonical view.

Accepted: Hugging Face layout (config.json + model.safetensors or sharded files with an index),
with either tensor-prefix spelling, and Mistral's native layout (params.json +
consolidated.safetensors). Weights stay memory-mapped until asked for.

Canonical names are the text-only Hugging Face ones (`embed_tokens.weight`,
`layers.{i}.self_attn.q_proj.weight`, `norm.weight`, `lm_head.weight`) and, for vision, the
Mistral3 ones (`vision_tower.*`, `multi_modal_projector.*`), for audio the Voxtral ones
(`audio_tower.*`, `multi_modal_projector.*`; native Voxtral stores no position table, its
Whisper sinusoids are computed). Native q/k rows are permuted from the
interleaved RoPE layout to the rotate-half layout on read, so every consumer sees one convention.
FP8 linears expose `weight` (float8_e4m3fn), `weight_scale` (a multiplier) and `activation_scale`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from .config import CheckpointError, ModelConfig, from_hf_config, from_native_params
from .safetensors_file import SafetensorsFile

# HF prefix spellings -> canonical. Order matters: the longest specific prefixes first.
_HF_PREFIXES = [
    ("model.language_model.", ""),
    ("language_model.model.", ""),
    ("language_model.lm_head.", "lm_head."),
    ("model.vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("model.audio_tower.", "audio_tower."),
    ("audio_tower.", "audio_tower."),
    ("vision_tower.", "vision_tower."),
    ("multi_modal_projector.", "multi_modal_projector."),
    ("model.", ""),
    ("lm_head.", "lm_head."),
]

_WHISPER = r"^mm_whisper_embeddings\.whisper_encoder\."
_NATIVE_TEXT = [
    (r"^(mm_whisper_embeddings\.)?tok_embeddings\.", "embed_tokens."),
    (_WHISPER + r"conv_layers\.0\.", "audio_tower.conv1."),
    (_WHISPER + r"conv_layers\.1\.", "audio_tower.conv2."),
    (_WHISPER + r"transformer\.layers\.(\d+)\.attention\.w([qkv])\.", r"audio_tower.layers.\1.self_attn.\2_proj."),
    (_WHISPER + r"transformer\.layers\.(\d+)\.attention\.wo\.", r"audio_tower.layers.\1.self_attn.out_proj."),
    (_WHISPER + r"transformer\.layers\.(\d+)\.attention_norm\.", r"audio_tower.layers.\1.self_attn_layer_norm."),
    (_WHISPER + r"transformer\.layers\.(\d+)\.ffn_norm\.", r"audio_tower.layers.\1.final_layer_norm."),
    (_WHISPER + r"transformer\.layers\.(\d+)\.feed_forward\.w1\.", r"audio_tower.layers.\1.fc1."),
    (_WHISPER + r"transformer\.layers\.(\d+)\.feed_forward\.w2\.", r"audio_tower.layers.\1.fc2."),
    (_WHISPER + r"transformer\.norm\.", "audio_tower.layer_norm."),
    (r"^mm_whisper_embeddings\.audio_language_projection\.0\.", "multi_modal_projector.linear_1."),
    (r"^mm_whisper_embeddings\.audio_language_projection\.2\.", "multi_modal_projector.linear_2."),
    (r"^norm\.", "norm."),
    (r"^output\.", "lm_head."),
    (r"^layers\.(\d+)\.attention_norm\.", r"layers.\1.input_layernorm."),
    (r"^layers\.(\d+)\.ffn_norm\.", r"layers.\1.post_attention_layernorm."),
    (r"^layers\.(\d+)\.attention\.w([qkvo])\.", r"layers.\1.self_attn.\2_proj."),
    (r"^layers\.(\d+)\.feed_forward\.w1\.", r"layers.\1.mlp.gate_proj."),
    (r"^layers\.(\d+)\.feed_forward\.w2\.", r"layers.\1.mlp.down_proj."),
    (r"^layers\.(\d+)\.feed_forward\.w3\.", r"layers.\1.mlp.up_proj."),
    (r"^vision_encoder\.transformer\.layers\.(\d+)\.attention\.w([qkvo])\.",
     r"vision_tower.transformer.layers.\1.attention.\2_proj."),
    (r"^vision_encoder\.transformer\.layers\.(\d+)\.feed_forward\.w1\.",
     r"vision_tower.transformer.layers.\1.feed_forward.gate_proj."),
    (r"^vision_encoder\.transformer\.layers\.(\d+)\.feed_forward\.w2\.",
     r"vision_tower.transformer.layers.\1.feed_forward.down_proj."),
    (r"^vision_encoder\.transformer\.layers\.(\d+)\.feed_forward\.w3\.",
     r"vision_tower.transformer.layers.\1.feed_forward.up_proj."),
    (r"^vision_encoder\.", "vision_tower."),
    (r"^pre_mm_projector_norm\.", "multi_modal_projector.norm."),
    (r"^patch_merger\.", "multi_modal_projector.patch_merger."),
    (r"^vision_language_adapter\.w_in\.", "multi_modal_projector.linear_1."),
    (r"^vision_language_adapter\.w_out\.", "multi_modal_projector.linear_2."),
]
# Native FP8 scale names -> the HF ones (both multiply).
_NATIVE_SUFFIX = {"qscale_weight": "weight_scale", "qscale_act": "activation_scale"}


def _hf_canonical(name: str) -> str:
    for prefix, repl in _HF_PREFIXES:
        if name.startswith(prefix):
            name = repl + name[len(prefix):]
            break
    # HF FP8 names the weight multiplier `weight_scale_inv`; it multiplies, so call it what it does.
    return re.sub(r"\.weight_scale_inv$", ".weight_scale", name)


def _native_canonical(name: str) -> str:
    for pattern, repl in _NATIVE_TEXT:
        new, n = re.subn(pattern, repl, name)
        if n:
            name = new
            break
    head, _, last = name.rpartition(".")
    return f"{head}.{_NATIVE_SUFFIX[last]}" if last in _NATIVE_SUFFIX else name


def interleaved_to_half(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Row permutation from Mistral's interleaved RoPE pairs to HF's rotate-half layout."""
    d_out = w.shape[0]
    rest = w.shape[1:]
    return w.reshape(n_heads, d_out // n_heads // 2, 2, *rest).swapaxes(1, 2).reshape(d_out, *rest)


class Checkpoint:
    """A read-only, lazily loaded view of a checkpoint under canonical tensor names."""

    def __init__(self, path: Path, config: ModelConfig, tensors: dict[str, tuple[SafetensorsFile, str]],
                 native: bool):
        self.path = path
        self.config = config
        self.native = native
        self._tensors = tensors

    def names(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def raw(self, name: str) -> np.ndarray:
        """The stored tensor (memory-mapped, stored dtype), in the rotate-half row order."""
        try:
            file, key = self._tensors[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: tensor {name} is missing from the checkpoint") from None
        t = file.tensor(key)
        if self.native and t.ndim >= 1:
            heads = self._native_rope_heads(name)
            if heads:
                t = interleaved_to_half(np.asarray(t), heads)
        return t

    def _native_rope_heads(self, name: str) -> int | None:
        if not name.endswith(".weight"):
            return None
        if re.match(r"layers\.\d+\.self_attn\.q_proj\.", name):
            return self.config.text.num_heads
        if re.match(r"layers\.\d+\.self_attn\.k_proj\.", name):
            return self.config.text.num_kv_heads
        if self.config.vision and re.match(r"vision_tower\.transformer\.layers\.\d+\.attention\.[qk]_proj\.", name):
            return self.config.vision.num_heads
        return None

    def is_fp8(self, linear: str) -> bool:
        """Whether `linear` (a name without `.weight`) is stored as FP8 with its scales."""
        return f"{linear}.weight_scale" in self._tensors

    def scalar(self, name: str) -> float:
        return float(np.asarray(self.raw(name), dtype=np.float32).reshape(-1)[0])

    def get(self, name: str) -> np.ndarray:
        """The tensor as float32, with FP8 linears dequantized (W = W_fp8 * weight_scale)."""
        stored = self.raw(name)
        t = np.asarray(stored, dtype=np.float32)
        if t is not stored and not np.shares_memory(t, stored):  # converted into a copy: drop the file pages
            self.release(name)
        if name.endswith(".weight") and self.is_fp8(name[: -len(".weight")]):
            scale = np.asarray(self.raw(name[: -len(".weight")] + ".weight_scale"), dtype=np.float32)
            t = t * (scale.reshape(-1, 1) if scale.size > 1 else scale.reshape(()))
        return t

    def release(self, name: str) -> None:
        """The caller is done with the stored pages of ``name`` (``raw``'s memory map): drop them
        from this process's resident memory (they are read again from the file if needed)."""
        file, key = self._tensors[name]
        file.release(key)

    def lm_head(self) -> np.ndarray:
        """The output projection; the embedding table when the checkpoint ties them."""
        if self.config.text.tie_word_embeddings or "lm_head.weight" not in self:
            return self.get("embed_tokens.weight")
        return self.get("lm_head.weight")


def _hf_files(root: Path) -> list[Path]:
    index = root / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise CheckpointError(f"{index}: not a valid shard index ({exc})") from None
        files = [root / name for name in dict.fromkeys(weight_map.values())]
        for f in files:
            if not f.exists():
                raise CheckpointError(f"{f}: shard listed in {index.name} is missing")
        return files
    single = root / "model.safetensors"
    if single.exists():
        return [single]
    found = sorted(root.glob("*.safetensors"))
    if not found:
        raise CheckpointError(f"{root}: no .safetensors weights next to config.json")
    return found


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Open a checkpoint directory; raise CheckpointError naming the file at fault."""
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(f"{root}: not a checkpoint directory")
    if (root / "config.json").exists():
        config = from_hf_config(root / "config.json")
        files, canonical, native = _hf_files(root), _hf_canonical, False
    elif (root / "params.json").exists():
        config = from_native_params(root / "params.json")
        weights = root / "consolidated.safetensors"
        if not weights.exists():
            raise CheckpointError(f"{weights}: file is missing")
        files, canonical, native = [weights], _native_canonical, True
    else:
        raise CheckpointError(f"{root}: neither config.json (Hugging Face) nor params.json (Mistral) found")
    tensors: dict[str, tuple[SafetensorsFile, str]] = {}
    for f in files:
        st = SafetensorsFile(f)
        for key in st.keys():
            tensors[canonical(key)] = (st, key)
    ckpt = Checkpoint(root, config, tensors, native)
    _check_complete(ckpt, files[0] if len(files) == 1 else root)
    return ckpt


def _check_complete(ckpt: Checkpoint, where: Path) -> None:
    t = ckpt.config.text
    needed = ["embed_tokens.weight", "norm.weight"]
    for i in range(t.num_layers):
        p = f"layers.{i}."
        needed += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
        needed += [p + f"self_attn.{x}_proj.weight" for x in "qkvo"]
        needed += [p + f"mlp.{x}_proj.weight" for x in ("gate", "up", "down")]
    if not t.tie_word_embeddings:
        needed.append("lm_head.weight")
    missing = [n for n in needed if n not in ckpt]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{where}: tensor {missing[0]} is missing{more}")
    q = ckpt.raw("layers.0.self_attn.q_proj.weight")
    if q.shape != (t.num_heads * t.head_dim, t.hidden_size):
        raise CheckpointError(f"{where}: layers.0 q_proj has shape {tuple(q.shape)}, config says "
                              f"{(t.num_heads * t.head_dim, t.hidden_size)}")
