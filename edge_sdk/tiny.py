"""Tiny random Ministral 3 checkpoints in the real on-disk format, for the demo and the tests.

Built with transformers' own classes and `save_pretrained`, so the files are exactly what the hub
would hold, only small. Needs the `build` extra (torch, transformers); the runtime never imports
this module.
"""

from __future__ import annotations

from pathlib import Path


def text_config_kwargs(*, hidden=64, intermediate=96, layers=2, heads=4, kv_heads=2, head_dim=16,
                       vocab=4096, tie=False, original_max=16, rope_theta=1_000_000.0,
                       beta=0.1, factor=16.0, mscale_all_dim=1.0) -> dict:
    """Ministral3Config arguments; the YaRN block is real but its original context is tiny, so
    short prompts cross the query-scale steps and exercise the ramp."""
    return dict(
        hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
        vocab_size=vocab, tie_word_embeddings=tie, max_position_embeddings=int(original_max * factor),
        rope_parameters={
            "rope_type": "yarn", "type": "yarn", "rope_theta": rope_theta, "factor": factor,
            "original_max_position_embeddings": original_max, "beta_fast": 32.0, "beta_slow": 1.0,
            "mscale": 1.0, "mscale_all_dim": mscale_all_dim, "llama_4_scaling_beta": beta,
        },
        bos_token_id=1, eos_token_id=2, pad_token_id=11,
    )


def _randomize(model, seed: int, std: float) -> None:
    """Weights large enough that logits differ clearly between tokens (HF's init is tiny)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(std * torch.randn(p.shape, generator=gen))


def make_text_checkpoint(out: str | Path, *, seed: int = 0, std: float = 0.08, multimodal: bool = False,
                         dtype: str = "float32", vision: dict | None = None, **text_kwargs) -> Path:
    """Save a tiny Ministral3ForCausalLM (or Mistral3ForConditionalGeneration) and return its dir."""
    import torch
    from transformers import (Ministral3Config, Ministral3ForCausalLM, Mistral3Config,
                              Mistral3ForConditionalGeneration, PixtralVisionConfig)

    out = Path(out)
    tkw = text_config_kwargs(**text_kwargs)
    torch.manual_seed(seed)
    if multimodal:
        vkw = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                   head_dim=16, patch_size=14, image_size=1540, hidden_act="silu")
        vkw.update(vision or {})
        cfg = Mistral3Config(text_config=Ministral3Config(**tkw), vision_config=PixtralVisionConfig(**vkw),
                             tie_word_embeddings=tkw["tie_word_embeddings"], spatial_merge_size=2,
                             image_token_index=10, projector_hidden_act="gelu",
                             multimodal_projector_bias=False, vision_feature_layer=-1)
        model = Mistral3ForConditionalGeneration(cfg)
    else:
        model = Ministral3ForCausalLM(Ministral3Config(**tkw))
    _randomize(model, seed, std)
    if tkw["tie_word_embeddings"]:
        model.tie_weights()
    model = model.to(getattr(torch, dtype)).eval()
    model.save_pretrained(out)
    return out


def make_demo_checkpoint(out: str | Path, seed: int = 0) -> Path:
    """The demo's model: a tiny Ministral3ForCausalLM plus an offline Tekken tokenizer beside it."""
    from .tiny_tokenizer import make_tekken_file

    out = make_text_checkpoint(out, seed=seed, hidden=128, intermediate=256, layers=4, heads=4, kv_heads=2,
                               head_dim=32, vocab=4096, original_max=64)
    make_tekken_file(out / "tekken.json", vocab_size=4096)
    return out


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Write a tiny random Ministral 3 checkpoint (HF layout) "
                                                 "with a Tekken tokenizer, for demos and tests.")
    parser.add_argument("out", help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    print(make_demo_checkpoint(parser.parse_args().out, seed=parser.parse_args().seed))


def make_voxtral_checkpoint(out: str | Path, *, seed: int = 0, std: float = 0.08, hidden: int = 32,
                            intermediate: int = 64, layers: int = 2, heads: int = 2, kv_heads: int = 1,
                            head_dim: int = 16, vocab: int = 4096, audio_hidden: int = 16, audio_layers: int = 1,
                            audio_heads: int = 2, dtype: str = "float32") -> Path:
    """Save a tiny VoxtralForConditionalGeneration (Voxtral-Mini-3B-2507's layout): a Llama text
    decoder (no YaRN, rope_theta 1e8, its own lm_head) and a Whisper-like encoder whose
    intermediate size is 4 x hidden, as the projector's frame stacking requires."""
    import torch
    from transformers import VoxtralConfig, VoxtralForConditionalGeneration

    out = Path(out)
    torch.manual_seed(seed)
    cfg = VoxtralConfig(
        audio_config=dict(hidden_size=audio_hidden, intermediate_size=4 * audio_hidden, num_hidden_layers=audio_layers,
                          num_attention_heads=audio_heads, num_mel_bins=128, max_source_positions=1500),
        text_config=dict(model_type="llama", hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim, vocab_size=vocab,
                         rope_theta=1e8, tie_word_embeddings=False, max_position_embeddings=8192,
                         bos_token_id=1, eos_token_id=2, pad_token_id=11),
        audio_token_id=24, projector_hidden_act="gelu")
    model = VoxtralForConditionalGeneration(cfg).eval()
    _randomize(model, seed, std)
    model.to(getattr(torch, dtype)).save_pretrained(out)
    return out
