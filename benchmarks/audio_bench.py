"""Speech on the CPU backend: the front end, the encoder, and end of speech to transcript, each
against transformers on the same weights in the same run.

    make bench-audio                   # a full-size Voxtral-Mini-3B audio encoder (Whisper large: 32 layers)
    python benchmarks/audio_bench.py --audio-layers 4 --work /tmp/ab   # quicker

Stages (the checkpoint and package are kept in --work):
1. a random VoxtralForConditionalGeneration with Voxtral-Mini-3B-2507's audio encoder and
   projector (hidden 1280, 32 layers, 20 heads, 128 mel bins; projector to 3072) and its text
   decoder's layer shapes cut to --text-layers layers, with a small vocabulary: the decoder is not
   what this measures;
2. edge-sdk build --quant int4 (the encoder stays float32 on the CPU profile);
3. the figures, medians of --runs:
   - log-mel per second of audio: edge_sdk.media.audio.log_mel vs WhisperFeatureExtractor;
   - the encoder + projector on one 30 s chunk: audio.onnx on ONNX Runtime vs transformers'
     audio tower + projector (torch, the same threads);
   - end of speech to transcript: a spoken command (espeak-ng) streamed through the VAD segmenter
     in 80 ms chunks as the daemon does; the clock starts at voice_stopped (after the endpointing
     silence) and stops when the transcript of --new-tokens tokens is done.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ENCODER = dict(audio_hidden=1280, audio_heads=20)  # Whisper large-v3 / Voxtral-Mini-3B-2507
TEXT = dict(hidden=3072, intermediate=8192, heads=32, kv_heads=8, head_dim=128, vocab=4096)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def median_time(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def prepare(work: Path, audio_layers: int, text_layers: int) -> tuple[Path, Path]:
    from edge_sdk.build import build
    from edge_sdk.quant import QuantRecipe
    from edge_sdk.tiny import make_voxtral_checkpoint
    from edge_sdk.tiny_tokenizer import make_tekken_file

    ckpt, pkg = work / f"ckpt-a{audio_layers}-t{text_layers}", work / f"pkg-a{audio_layers}-t{text_layers}"
    if not (ckpt / "config.json").exists():
        log(f"writing the checkpoint: {audio_layers}-layer full-width encoder, {text_layers}-layer decoder")
        make_voxtral_checkpoint(ckpt, audio_layers=audio_layers, layers=text_layers, std=0.02, **ENCODER, **TEXT)
        make_tekken_file(ckpt / "tekken.json", vocab_size=TEXT["vocab"], audio=True)
    if not (pkg / "manifest.json").exists():
        log("edge-sdk build --quant int4")
        t = time.perf_counter()
        build(ckpt, QuantRecipe(method="int4", block_size=128), device="cpu", out=pkg, progress=True)
        log(f"built in {time.perf_counter() - t:.0f} s")
    return ckpt, pkg


def speech_clip(work: Path) -> np.ndarray:
    from edge_sdk.media.audio import load_audio

    wav = work / "command.wav"
    if not wav.exists():
        subprocess.run(["espeak-ng", "-w", str(wav), "bring the red box to dock two, then wait there"], check=True)
    return load_audio(wav)


def bench_front_end(runs: int) -> dict:
    from transformers import WhisperFeatureExtractor

    from edge_sdk.media.audio import log_mel

    rng = np.random.default_rng(0)
    audio = (0.1 * rng.standard_normal(30 * 16000)).astype(np.float32)
    fe = WhisperFeatureExtractor(feature_size=128)
    ours = median_time(lambda: log_mel(audio), runs) / 30
    theirs = median_time(lambda: fe(audio, sampling_rate=16000, return_tensors="np"), runs) / 30
    return {"log_mel_ms_per_s": ours * 1e3, "whisper_fe_ms_per_s": theirs * 1e3, "ratio": theirs / ours}


def bench_encoder(ckpt: Path, model, runs: int, threads: int) -> dict:
    import torch
    from transformers import VoxtralForConditionalGeneration

    from edge_sdk.media.audio import log_mel

    rng = np.random.default_rng(1)
    mel = log_mel((0.1 * rng.standard_normal(30 * 16000)).astype(np.float32))
    model.backend.encode_audio(mel)  # warm-up
    ours = median_time(lambda: model.backend.encode_audio(mel), runs)
    torch.set_num_threads(threads)
    ref = VoxtralForConditionalGeneration.from_pretrained(ckpt, torch_dtype=torch.float32).eval()
    features = torch.from_numpy(mel).reshape(-1, 128, mel.shape[-1])
    with torch.inference_mode():
        ref.get_audio_features(features)
        theirs = median_time(lambda: ref.get_audio_features(features), runs)
        want = ref.get_audio_features(features).pooler_output.numpy().reshape(-1, ref.config.text_config.hidden_size)
    got = model.backend.encode_audio(mel)
    err = float(np.max(np.abs(got - want)) / (np.max(np.abs(want)) + 1e-12))
    ref = None  # free its memory before the latency runs
    return {"encoder_s_per_30s_chunk": ours, "transformers_s": theirs, "ratio": theirs / ours,
            "max_rel_diff": err, "tokens": int(got.shape[0])}


def encoder_flops(audio_layers: int, hidden: int = 1280, ffn: int = 5120, mels: int = 128, text: int = TEXT["hidden"],
                  frames: int = 1500) -> float:
    """Multiply-adds x 2 of the encoder + projector on one 30 s chunk."""
    layer = 4 * frames * hidden * hidden + 2 * frames * hidden * ffn + 2 * frames * frames * hidden
    convs = 2 * frames * 3 * mels * hidden + frames * 3 * hidden * hidden
    projector = frames // 4 * (4 * hidden * text + text * text)
    return 2.0 * (audio_layers * layer + convs + projector)


def gemm_roofline(threads: int, n: int = 2048, runs: int = 5) -> float:
    """float32 GEMM FLOP/s of this machine now, ONNX Runtime's own MatMul on ``threads`` threads."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "gemm",
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, [n, n]) for x in "ab"],
                              [helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(onnx.helper.make_model(graph).SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    session.run(None, {"a": a, "b": a})
    return 2.0 * n ** 3 / median_time(lambda: session.run(None, {"a": a, "b": a}), runs)


def bench_end_to_transcript(model, speech: np.ndarray, new_tokens: int, runs: int) -> dict:
    from edge_sdk.media.vad import Segmenter, SileroVad

    gap = np.zeros(16000, np.float32)
    audio = np.concatenate([gap, speech, gap])
    latencies, vad_s, segments = [], [], 0
    for _ in range(runs):
        seg = Segmenter(SileroVad())
        for i in range(0, len(audio), 1280):
            t = time.perf_counter()
            events = seg.feed(audio[i:i + 1280])
            vad_s.append(time.perf_counter() - t)
            for kind, value in events:
                if kind != "voice_stopped":
                    continue
                segments += 1
                t0 = time.perf_counter()
                result = model.transcribe(value.samples, max_tokens=new_tokens)
                latencies.append(time.perf_counter() - t0)
                speech_s = len(value.samples) / 16000
    return {"end_of_speech_to_transcript_s": statistics.median(latencies), "utterance_s": speech_s,
            "transcript_tokens": len(result.tokens), "segments_per_run": segments / runs,
            "vad_ms_per_80ms_chunk": statistics.median(vad_s) * 1e3, "endpointing_silence_s": seg.end_silence_s}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/edge-sdk-audio-bench"))
    p.add_argument("--audio-layers", type=int, default=32, help="encoder layers (32: Voxtral-Mini-3B)")
    p.add_argument("--text-layers", type=int, default=2)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    if shutil.which("espeak-ng") is None:
        print("audio_bench: espeak-ng makes the speech clip (apt-get install espeak-ng)", file=sys.stderr)
        return 2
    a.work.mkdir(parents=True, exist_ok=True)
    ckpt, pkg = prepare(a.work, a.audio_layers, a.text_layers)

    import edge_sdk

    model = edge_sdk.load(pkg, threads=a.threads)
    log("front end")
    report = {"threads": a.threads, "audio_layers": a.audio_layers, "front_end": bench_front_end(a.runs)}
    log("encoder")
    report["encoder"] = bench_encoder(ckpt, model, a.runs, a.threads)
    report["encoder"]["gflops"] = encoder_flops(a.audio_layers) / report["encoder"]["encoder_s_per_30s_chunk"] / 1e9
    report["gemm_roofline_gflops"] = gemm_roofline(a.threads) / 1e9
    log("end of speech to transcript")
    report["latency"] = bench_end_to_transcript(model, speech_clip(a.work), a.new_tokens, a.runs)
    if a.json:
        print(json.dumps(report, indent=1))
        return 0
    fe, enc, lat = report["front_end"], report["encoder"], report["latency"]
    print(f"audio encoder: {a.audio_layers} layers x 1280 wide; {a.threads} threads; medians of {a.runs}\n")
    print("| figure | edge_sdk | transformers | ratio (transformers / edge_sdk) |\n|---|---|---|---|")
    print(f"| log-mel, per second of audio | {fe['log_mel_ms_per_s']:.2f} ms | {fe['whisper_fe_ms_per_s']:.2f} ms "
          f"| {fe['ratio']:.2f}x |")
    print(f"| encoder + projector, one 30 s chunk ({enc['tokens']} tokens) | {enc['encoder_s_per_30s_chunk']:.2f} s "
          f"| {enc['transformers_s']:.2f} s | {enc['ratio']:.2f}x |")
    print(f"\nencoder: {enc['gflops']:.0f} GFLOP/s, {100 * enc['gflops'] / report['gemm_roofline_gflops']:.0f} % of "
          f"this machine's float32 GEMM measured in the same run ({report['gemm_roofline_gflops']:.0f} GFLOP/s); "
          f"output vs transformers: max |diff| / max |ref| = {enc['max_rel_diff']:.1e}")
    print(f"end of speech to transcript ({lat['utterance_s']:.1f} s utterance, {lat['transcript_tokens']} tokens): "
          f"{lat['end_of_speech_to_transcript_s']:.2f} s after voice_stopped, which itself comes "
          f"{lat['endpointing_silence_s']:.1f} s of silence after the speech ends; "
          f"VAD {lat['vad_ms_per_80ms_chunk']:.2f} ms per 80 ms chunk")
    return 0


if __name__ == "__main__":
    sys.exit(main())
