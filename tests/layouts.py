"""Rewrite a saved tiny checkpoint into the other on-disk layouts Mistral ships.

Every layout holds the same weights, so the engines built from them must give identical tokens.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file


def _copy_side_files(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if not f.name.endswith(".safetensors") and f.name != "model.safetensors.index.json":
            shutil.copy(f, dst / f.name)


def to_new_prefix(src: Path, dst: Path) -> Path:
    """`language_model.model.*` -> `model.language_model.*` (the spelling newer hub repos use)."""
    _copy_side_files(src, dst)
    tensors = load_file(src / "model.safetensors")
    renamed = {}
    for k, v in tensors.items():
        k = re.sub(r"^language_model\.model\.", "model.language_model.", k)
        k = re.sub(r"^language_model\.lm_head\.", "lm_head.", k)
        k = re.sub(r"^(vision_tower|multi_modal_projector)\.", r"model.\1.", k)
        renamed[k] = v
    save_file(renamed, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def to_shards(src: Path, dst: Path, n: int = 3) -> Path:
    """Split model.safetensors into n shards plus model.safetensors.index.json."""
    _copy_side_files(src, dst)
    tensors = load_file(src / "model.safetensors")
    names = sorted(tensors)
    weight_map = {}
    for i in range(n):
        fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        part = {k: tensors[k] for k in names[i::n]}
        save_file(part, dst / fname, metadata={"format": "pt"})
        weight_map.update({k: fname for k in part})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dst


def _half_to_interleaved(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    d_out, d_in = t.shape
    return t.view(n_heads, 2, d_out // n_heads // 2, d_in).transpose(1, 2).reshape(d_out, d_in)


def to_native(src: Path, dst: Path) -> Path:
    """A text-only HF checkpoint -> Mistral's params.json + consolidated.safetensors."""
    dst.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((src / "config.json").read_text())
    text = cfg.get("text_config", cfg)
    rope = text["rope_parameters"]
    heads, kv = text["num_attention_heads"], text["num_key_value_heads"]
    params = {
        "dim": text["hidden_size"], "n_layers": text["num_hidden_layers"], "head_dim": text["head_dim"],
        "hidden_dim": text["intermediate_size"], "n_heads": heads, "n_kv_heads": kv,
        "rope_theta": rope["rope_theta"], "norm_eps": text["rms_norm_eps"], "vocab_size": text["vocab_size"],
        "tied_embeddings": cfg.get("tie_word_embeddings", False),
        "max_position_embeddings": text["max_position_embeddings"],
        "llama_4_scaling": {"original_max_position_embeddings": rope["original_max_position_embeddings"],
                            "beta": rope["llama_4_scaling_beta"]},
        "yarn": {"original_max_position_embeddings": rope["original_max_position_embeddings"],
                 "factor": rope["factor"], "apply_scale": True, "beta": rope["beta_fast"],
                 "alpha": rope["beta_slow"]},
    }
    (dst / "params.json").write_text(json.dumps(params, indent=2))
    native = _native_decoder(load_file(src / "model.safetensors"), heads, kv)
    if params["tied_embeddings"]:
        native.pop("output.weight", None)
    return _save_native(src, dst, native)


def _native_decoder(tensors: dict, heads: int, kv: int) -> dict:
    """The decoder's HF tensors under their native names (q/k rows interleaved); others dropped."""
    native = {}
    for k, v in tensors.items():
        k = re.sub(r"^(language_model\.)?model\.", "", re.sub(r"^language_model\.lm_head", "lm_head", k))
        m = re.match(r"layers\.(\d+)\.(.*)", k)
        if k == "embed_tokens.weight":
            k = "tok_embeddings.weight"
        elif k == "lm_head.weight":
            k = "output.weight"
        elif m:
            i, rest = m.groups()
            proj = re.match(r"self_attn\.([qkvo])_proj\.weight", rest)
            if proj:
                letter = proj.group(1)
                if letter in "qk":
                    v = _half_to_interleaved(v, heads if letter == "q" else kv)
                rest = f"attention.w{letter}.weight"
            rest = {"input_layernorm.weight": "attention_norm.weight",
                    "post_attention_layernorm.weight": "ffn_norm.weight",
                    "mlp.gate_proj.weight": "feed_forward.w1.weight",
                    "mlp.down_proj.weight": "feed_forward.w2.weight",
                    "mlp.up_proj.weight": "feed_forward.w3.weight"}.get(rest, rest)
            k = f"layers.{i}.{rest}"
        elif k not in ("norm.weight",):
            continue
        native[k] = v.contiguous()
    return native


def _save_native(src: Path, dst: Path, native: dict) -> Path:
    save_file(native, dst / "consolidated.safetensors")
    if (src / "tekken.json").exists():
        shutil.copy(src / "tekken.json", dst / "tekken.json")
    return dst


_WHISPER_NATIVE = {"self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk",
                   "self_attn.v_proj": "attention.wv", "self_attn.out_proj": "attention.wo",
                   "self_attn_layer_norm": "attention_norm", "final_layer_norm": "ffn_norm",
                   "fc1": "feed_forward.w1", "fc2": "feed_forward.w2"}


def to_native_voxtral(src: Path, dst: Path) -> Path:
    """An HF VoxtralForConditionalGeneration checkpoint -> Mistral's native layout, as
    Voxtral-Mini-3B-2507 ships it: the text embedding and the Whisper encoder under
    ``mm_whisper_embeddings``, the projector as ``audio_language_projection.{0,2}``, and no
    position table (native Voxtral computes Whisper's sinusoids; the source must hold them)."""
    dst.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((src / "config.json").read_text())
    text, audio = cfg["text_config"], cfg["audio_config"]
    heads, kv = text["num_attention_heads"], text["num_key_value_heads"]
    factor = audio["intermediate_size"] // audio["hidden_size"]
    params = {
        "dim": text["hidden_size"], "n_layers": text["num_hidden_layers"], "head_dim": text["head_dim"],
        "hidden_dim": text["intermediate_size"], "n_heads": heads, "n_kv_heads": kv,
        "rope_theta": text["rope_parameters"]["rope_theta"], "norm_eps": text["rms_norm_eps"],
        "vocab_size": text["vocab_size"], "max_position_embeddings": text["max_position_embeddings"],
        "multimodal": {"whisper_model_args": {
            "encoder_args": {"dim": audio["hidden_size"], "n_layers": audio["num_hidden_layers"],
                             "n_heads": audio["num_attention_heads"],
                             "head_dim": audio["hidden_size"] // audio["num_attention_heads"],
                             "hidden_dim": audio["intermediate_size"],
                             "max_source_positions": audio["max_source_positions"],
                             "audio_encoding_args": {"sampling_rate": 16000, "num_mel_bins": audio["num_mel_bins"],
                                                     "hop_length": 160, "window_size": 400}},
            "downsample_args": {"downsample_factor": factor}}},
    }
    (dst / "params.json").write_text(json.dumps(params, indent=2))
    tensors = load_file(src / "model.safetensors")
    native = _native_decoder(tensors, heads, kv)
    native["mm_whisper_embeddings.tok_embeddings.weight"] = native.pop("tok_embeddings.weight")
    enc = "mm_whisper_embeddings.whisper_encoder."
    for k, v in tensors.items():
        if k in ("audio_tower.conv1.weight", "audio_tower.conv1.bias", "audio_tower.conv2.weight",
                 "audio_tower.conv2.bias"):
            part, suffix = k.removeprefix("audio_tower.").split(".")
            native[f"{enc}conv_layers.{0 if part == 'conv1' else 1}.{suffix}"] = v
        elif k.startswith("audio_tower.layer_norm."):
            native[enc + "transformer.norm." + k.rsplit(".", 1)[1]] = v
        elif m := re.match(r"audio_tower\.layers\.(\d+)\.(.*)\.(weight|bias)$", k):
            i, module, suffix = m.groups()
            native[f"{enc}transformer.layers.{i}.{_WHISPER_NATIVE[module]}.{suffix}"] = v
        elif k.startswith("multi_modal_projector.linear_"):
            index = 0 if "linear_1" in k else 2
            native[f"mm_whisper_embeddings.audio_language_projection.{index}.weight"] = v
    return _save_native(src, dst, {k: v.contiguous() for k, v in native.items()})


def hf_logits(checkpoint: Path, ids: list[int]) -> np.ndarray:
    """transformers' own forward on the checkpoint: logits [T, vocab] (the oracle)."""
    from transformers import AutoConfig, AutoModelForCausalLM, Mistral3ForConditionalGeneration

    cls = (Mistral3ForConditionalGeneration if AutoConfig.from_pretrained(checkpoint).model_type == "mistral3"
           else AutoModelForCausalLM)
    model = cls.from_pretrained(checkpoint, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def hf_greedy(checkpoint: Path, ids: list[int], n: int) -> list[int]:
    """transformers' own greedy generation: the new token ids."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=2, pad_token_id=11)
    return out[0, len(ids):].tolist()
