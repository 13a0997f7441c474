"""checkpoint -> quantize -> export ONNX -> (compile TensorRT) -> engine package with manifest.

Every step reads the same `ModelConfig` and the same quantized tensors, so the reference, the
ONNX graphs and the TensorRT engines cannot disagree about the model.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict
from pathlib import Path

from .devices import check_build, load_profile
from .export.decoder import export_decoder, export_embedding
from .export.cpu_graph import write_cpu_graph
from .export.plugin_graph import write_plugin_graph
from .models.checkpoint import CheckpointError, open_checkpoint
from .package import Manifest, graph_entry, write_manifest
from .quant import QuantRecipe, format_report, quantize
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)

DEFAULT_ENGINES_DIR = Path("engines")


def find_tokenizer(checkpoint_dir: Path) -> Path:
    """The Tekken file that ships next to Mistral checkpoints."""
    for name in ("tekken.json", "tokenizer/tekken.json"):
        if (checkpoint_dir / name).exists():
            return checkpoint_dir / name
    raise CheckpointError(f"{checkpoint_dir}: no tekken.json found; pass --tokenizer FILE")


def _write_tokenizer(src: Path, dst: Path, max_image_size: int) -> None:
    """Copy tekken.json, capping its image size at the device's budget (image tokens grow with
    the square of the side: 1540 px is 3,025 tokens, too many for an Orin Nano per frame)."""
    data = json.loads(src.read_text())
    image = data.get("image")
    if image and image.get("max_image_size", max_image_size) > max_image_size:
        image["max_image_size"] = max_image_size
        log.info("tokenizer: image size capped at %d px for this device", max_image_size)
    dst.write_text(json.dumps(data, ensure_ascii=False))


def _golden(out_dir: Path, manifest: Manifest, tok_path: Path) -> dict:
    """Reference outputs for the golden check (golden.py), from the standard graph on the CPU, in
    a child process: the build's peak memory is then the larger of quantizing and running, not
    their sum (an ONNX Runtime session holds its own copy of the weights)."""
    import multiprocessing

    from .golden import record_package_golden

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        golden = pool.apply(record_package_golden, (str(out_dir), manifest.model_dump_json(), str(tok_path)))
    log.info("golden outputs recorded: %d prompts x %d greedy tokens", len(golden["records"]), golden["steps"])
    return golden


def default_output(checkpoint_dir: Path, recipe: QuantRecipe, device: str) -> Path:
    return DEFAULT_ENGINES_DIR / f"{checkpoint_dir.resolve().name}-{recipe.method}-{device}"


def build(checkpoint: str | Path, recipe: QuantRecipe, device: str = "cpu", out: str | Path | None = None,
          tokenizer: str | Path | None = None, context_length: int | None = None, progress: bool = True,
          plugins: bool = True, head_rows: bool | None = None) -> Path:
    """Build an engine package and return its directory. For TensorRT profiles the package also
    gets the plugin graph (decoder.plugins.onnx) unless ``plugins`` is False. ``head_rows``: store
    an INT4 head in ONNX Runtime's rows form (export/decoder.py); by default on ONNX Runtime
    profiles, as the W^T form the TensorRT plugin reads elsewhere."""
    ckpt_dir = Path(checkpoint)
    ckpt = open_checkpoint(ckpt_dir)
    profile = load_profile(device)
    context_length = min(context_length or profile.max_context, ckpt.config.text.max_position_embeddings)
    check_build(profile, recipe.method, ckpt.config, context_length)
    tok_path = Path(tokenizer) if tokenizer else find_tokenizer(ckpt_dir)
    tok = Tokenizer.from_file(tok_path)
    if tok.vocab_size > ckpt.config.text.vocab_size:
        raise CheckpointError(f"{tok_path}: tokenizer has {tok.vocab_size} ids but the model only "
                              f"{ckpt.config.text.vocab_size}")

    out_dir = Path(out) if out else default_output(ckpt_dir, recipe, profile.name)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    log.info("building %s -> %s (quant %s, device %s, %s graphs)", ckpt_dir, out_dir, recipe.method,
             profile.name, profile.compute_dtype)

    quantized = quantize(ckpt, recipe, encode=tok.encode, progress=progress)
    if quantized.report:
        log.info("weight quantization error per layer:\n%s", format_report(quantized.report))

    cfg = ckpt.config
    dtype = profile.compute_dtype
    decoder = export_decoder(cfg.text, quantized.tensors, quantized.linears, out_dir, dtype, head=quantized.head,
                             head_rows=profile.backend == "onnxruntime" if head_rows is None else head_rows)
    table = quantized.embedding if quantized.embedding is not None else quantized.tensors["embed_tokens.weight"]
    export_embedding(table, out_dir, dtype, tied_to=decoder if quantized.tied else None)
    graphs = {"embed": graph_entry(out_dir, "embed.onnx"), "decoder": graph_entry(out_dir, "decoder.onnx")}
    if plugins and profile.backend == "tensorrt":
        graphs["decoder_plugins"] = graph_entry(out_dir, write_plugin_graph(decoder).name)
    if profile.backend == "onnxruntime":
        graphs["decoder_cpu"] = graph_entry(out_dir, write_cpu_graph(decoder, cfg.text, context_length).name)
    if cfg.vision is not None:
        from .export.vision import export_vision
        from .models.pixtral import load_vision_weights

        export_vision(load_vision_weights(ckpt), cfg.vision, cfg.text.hidden_size, out_dir, dtype=dtype)
        graphs["vision"] = graph_entry(out_dir, "vision.onnx")
    if cfg.audio is not None:
        from .export.audio import export_audio, load_audio_weights

        export_audio(load_audio_weights(ckpt), cfg.audio, cfg.text.hidden_size, out_dir, dtype=dtype)
        graphs["audio"] = graph_entry(out_dir, "audio.onnx")
    _write_tokenizer(tok_path, out_dir / "tekken.json", profile.max_image_size)

    manifest = Manifest(
        model_name=ckpt_dir.resolve().name, model=cfg, quant=recipe.model_dump(), device=profile.name,
        context_length=context_length, graphs=graphs, tokenizer="tekken.json",
        modalities=["text"] + [m for m, role in (("image", "vision"), ("audio", "audio")) if role in graphs],
        extra={"quant_report": [asdict(r) for r in quantized.report],
               **({"head_report": quantized.head_report.summary()} if quantized.head_report else {})})
    golden = _golden(out_dir, manifest, out_dir / "tekken.json")
    manifest = manifest.model_copy(update={"extra": {**manifest.extra, "golden": golden}})
    if profile.backend == "tensorrt":
        from .compile import compile_engines

        compiled = compile_engines(out_dir, manifest, profile, strict=False)
        if compiled is not None:
            manifest = manifest.model_copy(update=compiled)
    write_manifest(out_dir, manifest)  # last: a package without a manifest is an unfinished one
    return out_dir
