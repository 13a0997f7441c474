"""`edge-sdk bench`: decode speed as a fraction of this host's memory-bandwidth roofline.

Decoding one token reads every decoder weight once, so tokens/s can never beat
bandwidth / weight bytes. Both numbers are measured in the same run (machines here are shared
and noisy), and the report gives the ratio, not a bare tokens/s. On the CPU backend the INT4
kernel's two accuracy levels are each other's peer.
"""

from __future__ import annotations

import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np


def measure_bandwidth(nbytes: int = 512 << 20, repeats: int = 5, threads: int | None = None) -> float:
    """Host memory read bandwidth in GB/s: a large array summed in slices over as many threads as
    the backend uses (NumPy releases the GIL while reducing), best of `repeats`. A read, as a
    decode step's weight stream is (a copy also writes: on a 2-core Xeon, 48 GB/s counted as read
    plus write against ~30 read)."""
    threads = threads or os.cpu_count() or 1
    data = np.ones(nbytes // 8, dtype=np.float64)
    slices = [s for s in np.array_split(data, threads) if s.size]
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(repeats):
            start = time.perf_counter()
            list(pool.map(np.sum, slices))
            best = min(best, time.perf_counter() - start)
    return nbytes / best / 1e9


def weight_bytes(package_dir: Path) -> int:
    """Bytes a decode step reads: the decoder graph's weights (external data file)."""
    return (Path(package_dir) / "decoder.onnx.data").stat().st_size


def bench_generation(model, prompt_tokens: int = 64, new_tokens: int = 32, runs: int = 3) -> dict:
    """Median prefill and decode speed over `runs` greedy generations of a fixed prompt."""
    vocab = model.config.text.vocab_size
    prompt = [model.tokenizer.bos_id] + [1000 + (i * 7919) % (vocab - 1000) for i in range(prompt_tokens - 1)]
    model.generate(prompt, max_tokens=4)  # warm-up: session init, allocations
    ttft, decode = [], []
    for _ in range(runs):
        r = model.generate(prompt, max_tokens=new_tokens, stop_token_ids=())
        ttft.append(r.time_to_first_token_s)
        decode.append(r.tokens_per_second)
    return {"prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
            "prefill_tok_s": prompt_tokens / statistics.median(ttft),
            "time_to_first_token_ms": 1000 * statistics.median(ttft),
            "decode_tok_s": statistics.median(decode)}


def bench_package(package_dir: Path, backend: str = "auto", threads: int | None = None,
                  levels: tuple[int, ...] = (4, 0), **kwargs) -> dict:
    """Decode speed per INT4 accuracy level (CPU) or for the GPU backend, against the roofline."""
    from .runtime.model import load

    bandwidth = measure_bandwidth(threads=threads)
    wbytes = weight_bytes(package_dir)
    roofline = bandwidth * 1e9 / wbytes
    rows = []
    for level in levels:
        model = load(package_dir, backend=backend, threads=threads, accuracy_level=level)
        on_cpu = model.backend.name == "onnxruntime"
        row = bench_generation(model, **kwargs)
        row.update(backend=model.backend.name, accuracy_level=level if on_cpu else None,
                   roofline_fraction=row["decode_tok_s"] / roofline)
        rows.append(row)
        if not on_cpu:  # the accuracy level is an ONNX Runtime setting: one GPU run says it all
            break
    return {"package": str(package_dir), "quant": model.manifest.quant.get("method"), "device": model.manifest.device,
            "bandwidth_gb_s": bandwidth, "weight_mb": wbytes / 1e6, "roofline_tok_s": roofline, "runs": rows}


def format_report(report: dict) -> str:
    lines = [f"{report['package']} ({report['quant']}, profile {report['device']})",
             f"host read bandwidth {report['bandwidth_gb_s']:.1f} GB/s, decoder weights {report['weight_mb']:.1f} MB "
             f"-> roofline {report['roofline_tok_s']:.0f} tok/s",
             f"{'backend':12} {'level':>5} {'prefill tok/s':>14} {'TTFT ms':>8} {'decode tok/s':>13} {'of roofline':>11}"]
    for r in report["runs"]:
        level = "-" if r["accuracy_level"] is None else str(r["accuracy_level"])
        lines.append(f"{r['backend']:12} {level:>5} {r['prefill_tok_s']:>14.0f} {r['time_to_first_token_ms']:>8.1f} "
                     f"{r['decode_tok_s']:>13.0f} {r['roofline_fraction']:>10.1%}")
    return "\n".join(lines)
