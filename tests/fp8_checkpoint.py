"""Test helper: turn a tiny float checkpoint into an FP8 one laid out like Mistral's FP8 Instruct.

HF layout, static per-tensor scheme: every decoder linear (`layers.N.self_attn.*_proj`,
`layers.N.mlp.*_proj`) becomes
- `weight`            F8_E4M3, = saturate(W / weight_scale_inv)
- `weight_scale_inv`  F32, shape (), a MULTIPLIER despite its name: W ~= weight * weight_scale_inv
- `activation_scale`  F32, shape (), static input scale = max|x| / 448 from a short calibration run
Everything else (embeddings, norms, lm_head, vision tower, projector) keeps its dtype, and
config.json gains
`quantization_config: {quant_method: fp8, activation_scheme: static, weight_block_size: null,
modules_to_not_convert: [...]}`.

transformers 5.23 loads the result with `from_pretrained` on a CPU-only machine once `accelerate`
is installed: its FineGrainedFP8 quantizer then switches to `dequantize=True` (keeps nn.Linear,
W = weight * weight_scale_inv, drops activation_scale), i.e. weight-only FP8.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np

DECODER_LINEAR = re.compile(r"(?:^|\.)(layers\.\d+\.(?:self_attn|mlp)\.[a-z]+_proj)\.weight$")
E4M3_MAX = 448.0


def _weight_files(src: Path) -> list[str]:
    index = src / "model.safetensors.index.json"
    if index.exists():
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    return [p.name for p in sorted(src.glob("*.safetensors"))]


def _activation_amax(src: Path, n_tokens: int, seed: int) -> dict[str, float]:
    """max |x| of each decoder linear's input on seeded random ids, via the NumPy reference."""
    from edge_sdk.models import ministral3
    from edge_sdk.models.checkpoint import open_checkpoint

    ckpt = open_checkpoint(src)
    cfg = ckpt.config.text
    ids = np.random.default_rng(seed).integers(0, cfg.vocab_size, size=n_tokens)
    amax: dict[str, float] = {}

    def capture(name, x):
        amax[name] = max(amax.get(name, 0.0), float(np.abs(x).max()))

    ministral3.forward(ministral3.FloatWeights(ckpt), cfg, ids, capture=capture)
    return amax


def make_fp8_checkpoint(src_dir: str | Path, dst_dir: str | Path, *, calibration_tokens: int = 64,
                        seed: int = 0) -> Path:
    """Write an FP8 (static, per-tensor) copy of the HF checkpoint in `src_dir` to `dst_dir`."""
    import torch
    from safetensors.torch import load_file, save_file

    src, dst = Path(src_dir), Path(dst_dir)
    dst.mkdir(parents=True, exist_ok=True)
    amax = _activation_amax(src, calibration_tokens, seed)
    converted = 0
    for fname in _weight_files(src):
        tensors = load_file(str(src / fname))
        out: dict[str, torch.Tensor] = {}
        for key, t in tensors.items():
            m = DECODER_LINEAR.search(key)
            if m is None or "vision" in key:
                out[key] = t.contiguous()
                continue
            w = t.to(torch.float32)
            w_amax = float(w.abs().max())
            scale = w_amax / E4M3_MAX if w_amax > 0 else 1.0
            base = key[: -len(".weight")]
            out[key] = (w / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).contiguous()
            out[base + ".weight_scale_inv"] = torch.tensor(scale, dtype=torch.float32)
            x_amax = amax[m.group(1)]
            out[base + ".activation_scale"] = torch.tensor(x_amax / E4M3_MAX if x_amax > 0 else 1.0,
                                                           dtype=torch.float32)
            converted += 1
        save_file(out, str(dst / fname), metadata={"format": "pt"})
    if not converted:
        raise ValueError(f"{src}: no decoder linears found to convert")
    index = src / "model.safetensors.index.json"
    if index.exists():
        idx = json.loads(index.read_text())
        for key, fname in list(idx["weight_map"].items()):
            if DECODER_LINEAR.search(key) and "vision" not in key:
                base = key[: -len(".weight")]
                idx["weight_map"][base + ".weight_scale_inv"] = fname
                idx["weight_map"][base + ".activation_scale"] = fname
        (dst / index.name).write_text(json.dumps(idx, indent=2))
    cfg = json.loads((src / "config.json").read_text())
    multimodal = "vision_config" in cfg
    cfg["quantization_config"] = {
        "quant_method": "fp8",
        "activation_scheme": "static",
        "weight_block_size": None,
        "modules_to_not_convert": (["model.vision_tower", "model.multi_modal_projector", "lm_head"]
                                   if multimodal else ["lm_head"]),
    }
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    for extra in src.iterdir():  # generation_config.json, tokenizer files, ...
        if extra.is_file() and not extra.name.endswith(".safetensors") and extra.name not in (
                "config.json", "model.safetensors.index.json"):
            shutil.copy2(extra, dst / extra.name)
    return dst
