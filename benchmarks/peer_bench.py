"""edge_sdk's CPU decode against llama.cpp and ONNX Runtime GenAI on the same weights.

    make bench-peers LAYERS=6          # installs the peers into .venv-peers, then runs this

Stages, each skipped when its output exists in --work:
1. a random checkpoint with the real Ministral-3-3B layer shapes (hidden 3072, intermediate 9216,
   32/8 heads, head_dim 128, vocab 131072, tied head), cut to --layers layers, bf16, with a
   full-vocabulary tekken.json (edge_sdk.tiny);
2. edge-sdk build --quant int4 (block 128, AWQ, head auto), timed, with its peak RSS (and the
   same with the head forced, --edge-heads; the last of these also runs with each
   --edge-kv-caches KV cache, the rest with the default float16 one);
3. the same weights for llama.cpp (its convert_hf_to_gguf.py, then Q4_0 through
   llama_cpp.llama_model_quantize) and for ONNX Runtime GenAI (its model builder, INT4, block
   128; it knows no Ministral3ForCausalLM, so it builds from a copy whose config says
   MistralForCausalLM: the same bytes per token, without the llama-4 query scale).

Then every system runs in a fresh process of its own interpreter (peak RSS is per process),
interleaved for --rounds rounds: a --prompt-tokens prompt, --new-tokens greedy tokens, --threads
threads. One table: prefill and decode tok/s, time to first token, peak RSS, bytes of weights,
decode as a share of the memory-bandwidth roofline (read bandwidth measured in the same run), and the
ratios to edge_sdk; then decode speed at each --contexts length, with the best last / first
ratio each system's KV cache bytes allow at that bandwidth.
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

ROOT = Path(__file__).resolve().parents[1]
SHAPE = dict(hidden=3072, intermediate=9216, heads=32, kv_heads=8, head_dim=128, vocab=131072, tie=True,
             original_max=16384)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def prompt_ids(n: int, vocab: int = SHAPE["vocab"]) -> list[int]:
    """A fixed prompt of ordinary-token ids (the same for every system)."""
    return [1] + [1000 + (i * 7919) % (vocab - 1000) for i in range(n - 1)]


# --- preparing the three models ---------------------------------------------------------------------

def make_checkpoint(work: Path, layers: int, python: str) -> Path:
    ckpt = work / f"ckpt-{layers}"
    if not (ckpt / "config.json").exists():
        log(f"writing the {layers}-layer 3B-shaped checkpoint")
        code = ("import sys; from edge_sdk.tiny import make_text_checkpoint; from edge_sdk.tiny_tokenizer import "
                "make_tekken_file; p=sys.argv[1]; make_text_checkpoint(p, layers=int(sys.argv[2]), dtype='bfloat16', "
                f"std=0.02, **{SHAPE!r}); make_tekken_file(p + '/tekken.json', vocab_size={SHAPE['vocab']})")
        subprocess.run([python, "-c", code, str(ckpt), str(layers)], check=True)
    return ckpt


def build_edge_sdk(work: Path, ckpt: Path, edge_sdk: str, context: int, head: str = "auto") -> tuple[Path, dict]:
    pkg = work / (f"{ckpt.name}-edge-int4" + ("" if head == "auto" else f"-head-{head}"))
    stats_file = work / f"{pkg.name}.build.json"
    if not (pkg / "manifest.json").exists():
        log(f"edge-sdk build --quant int4 --head {head}")
        t0 = time.monotonic()
        out = subprocess.run(["/usr/bin/time", "-f", "%M", edge_sdk, "build", str(ckpt), "--quant", "int4", "--device",
                              "cpu", "-o", str(pkg), "--context", str(context), "--head", head, "-q"],
                             check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        peak_kb = int(out.stderr.strip().splitlines()[-1])
        stats_file.write_text(json.dumps({"build_s": time.monotonic() - t0, "build_peak_rss_gb": peak_kb / 1e6}))
    build = json.loads(stats_file.read_text())
    build["head"] = json.loads((pkg / "manifest.json").read_text())["extra"].get("head_report", {}).get("format")
    return pkg, build


def build_gguf(work: Path, ckpt: Path, peers: str) -> Path | None:
    out = work / f"{ckpt.name}-q4_0.gguf"
    if out.exists():
        return out
    convert = _llama_cpp_converter(work, peers)
    if convert is None:
        return None
    hf = work / f"{ckpt.name}-hf-tokenizer"
    if not hf.exists():
        shutil.copytree(ckpt, hf)
        code = ("import sys; from transformers.integrations.mistral import convert_tekken_tokenizer; "
                "convert_tekken_tokenizer(sys.argv[1] + '/tekken.json').save_pretrained(sys.argv[1])")
        subprocess.run([peers, "-c", code, str(hf)], check=True)
        (hf / "tekken.json").unlink()  # else transformers loads mistral-common's tokenizer, which the converter cannot read
    f16 = work / f"{ckpt.name}-f16.gguf"
    log("llama.cpp: convert_hf_to_gguf.py")
    subprocess.run([peers, str(convert), str(hf), "--outtype", "f16", "--outfile", str(f16)], check=True,
                   stdout=subprocess.DEVNULL)
    log("llama.cpp: quantize to Q4_0")
    code = ("import sys, llama_cpp; p = llama_cpp.llama_model_quantize_default_params(); "
            "p.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0; p.nthread = 2; "
            "sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), p))")
    subprocess.run([peers, "-c", code, str(f16), str(out)], check=True)
    f16.unlink()
    return out


def _llama_cpp_converter(work: Path, peers: str) -> Path | None:
    """convert_hf_to_gguf.py from the llama-cpp-python sdist (the wheel does not ship it)."""
    found = list(work.glob("llama_cpp_python-*/vendor/llama.cpp/convert_hf_to_gguf.py"))
    if found:
        return found[0]
    version = subprocess.run([peers, "-c", "import llama_cpp; print(llama_cpp.__version__)"],
                             capture_output=True, text=True)
    if version.returncode:
        log("llama-cpp-python is not installed in the peers' environment: skipping llama.cpp")
        return None
    subprocess.run([peers, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", "-d", str(work),
                    f"llama-cpp-python=={version.stdout.strip()}"], check=True)
    sdist = next(work.glob("llama_cpp_python-*.tar.gz"))
    subprocess.run(["tar", "-xzf", str(sdist), "-C", str(work)], check=True)
    return next(work.glob("llama_cpp_python-*/vendor/llama.cpp/convert_hf_to_gguf.py"))


def build_ort_genai(work: Path, ckpt: Path, peers: str, threads: int) -> Path | None:
    out = work / f"{ckpt.name}-ortgenai-int4"
    if (out / "genai_config.json").exists():
        return out
    if subprocess.run([peers, "-c", "import onnxruntime_genai"], capture_output=True).returncode:
        log("onnxruntime-genai is not installed in the peers' environment: skipping it")
        return None
    src = work / f"{ckpt.name}-as-mistral"
    if not src.exists():
        shutil.copytree(ckpt, src)
        cfg = json.loads((src / "config.json").read_text())
        cfg["architectures"] = ["MistralForCausalLM"]
        cfg["model_type"] = "mistral"
        (src / "config.json").write_text(json.dumps(cfg))
    log("ONNX Runtime GenAI: model builder, int4 block 128")
    subprocess.run([peers, "-m", "onnxruntime_genai.models.builder", "-i", str(src), "-o", str(out), "-p", "int4",
                    "-e", "cpu", "-c", str(work / "ortgenai-cache"), "--extra_options", "block_size=128"],
                   check=True, stdout=subprocess.DEVNULL)
    cfg_path = out / "genai_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["model"]["decoder"].setdefault("session_options", {})["intra_op_num_threads"] = threads
    cfg_path.write_text(json.dumps(cfg, indent=1))
    return out


# --- one measured run (in a fresh process) -------------------------------------------------------------

def edge_kv_cache(system: str) -> str:
    """The KV cache dtype an edge_sdk row runs: "edge_sdk[, <head> head][, <dtype> KV cache]"."""
    return system.removesuffix(" KV cache").rsplit(", ", 1)[-1] if system.endswith(" KV cache") else "float16"


def worker(system: str, model: str, prompt_len: int, new_tokens: int, threads: int) -> dict:
    ids = prompt_ids(prompt_len)
    if system.startswith("edge_sdk"):
        t_first, t_end = _run_edge_sdk(model, ids, new_tokens, threads, edge_kv_cache(system))
    else:
        run = {"llama.cpp Q4_0": _run_llama_cpp, "ORT GenAI INT4": _run_ort_genai}[system]
        t_first, t_end = run(model, ids, new_tokens, threads)
    return {"ttft_ms": t_first * 1000, "prefill_tok_s": prompt_len / t_first,
            "decode_tok_s": (new_tokens - 1) / (t_end - t_first),
            "peak_rss_gb": _peak_rss_kb() / 1e6}


def _peak_rss_kb() -> int:
    """This process image's peak RSS (VmHWM: unlike getrusage's ru_maxrss, it starts afresh at
    exec, so the parent's memory at fork time does not count)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def _run_edge_sdk(model: str, ids: list[int], n: int, threads: int, kv_cache: str) -> tuple[float, float]:
    import edge_sdk

    m = edge_sdk.load(model, threads=threads, kv_cache=kv_cache)
    m.generate(ids[:8], max_tokens=2)  # warm-up
    t0 = time.perf_counter()
    r = m.generate(ids, max_tokens=n, stop_token_ids=())
    assert r.completion_tokens == n, r
    return r.time_to_first_token_s, time.perf_counter() - t0


def _run_llama_cpp(model: str, ids: list[int], n: int, threads: int) -> tuple[float, float]:
    import llama_cpp
    import numpy as np

    llm = llama_cpp.Llama(model_path=model, n_ctx=len(ids) + n + 8, n_threads=threads, n_threads_batch=threads,
                          n_batch=512, verbose=False)
    vocab = llm.n_vocab()

    def next_token() -> int:
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits(llm.ctx), shape=(vocab,))
        return int(logits.argmax())

    llm.eval(ids[:8])
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(ids)
    tok = next_token()
    t_first = time.perf_counter() - t0
    for _ in range(n - 1):
        llm.eval([tok])
        tok = next_token()
    return t_first, time.perf_counter() - t0


def _run_ort_genai(model: str, ids: list[int], n: int, threads: int) -> tuple[float, float]:
    import onnxruntime_genai as og

    m = og.Model(model)
    params = og.GeneratorParams(m)
    params.set_search_options(max_length=len(ids) + n, do_sample=False)
    gen = og.Generator(m, params)
    t0 = time.perf_counter()
    gen.append_tokens(ids)
    gen.generate_next_token()
    t_first = time.perf_counter() - t0
    for _ in range(n - 1):
        gen.generate_next_token()
    return t_first, time.perf_counter() - t0


# --- the benchmark ----------------------------------------------------------------------------------------

def measure(python: str, system: str, model: Path, prompt_len: int, new_tokens: int, threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    out = subprocess.run([python, __file__, "--worker", system, str(model), str(prompt_len), str(new_tokens),
                          str(threads)], capture_output=True, text=True, env=env)
    if out.returncode:
        raise RuntimeError(f"{system} failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def weight_bytes(system: str, model: Path) -> int:
    if model.is_file():
        return model.stat().st_size
    return sum(p.stat().st_size for p in model.rglob("*") if p.is_file() and (p.suffix in (".data", ".onnx")))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--contexts", type=int, nargs="*", default=[128, 1024, 4096])
    p.add_argument("--context-rounds", type=int, default=3, help="interleaved rounds of the context table")
    p.add_argument("--work", type=Path, default=ROOT / "engines" / "peer-bench")
    p.add_argument("--python", default=str(ROOT / ".venv" / "bin" / "python"), help="edge_sdk's interpreter")
    p.add_argument("--peers-python", default=str(ROOT / ".venv-peers" / "bin" / "python"),
                   help="the interpreter with llama-cpp-python and onnxruntime-genai")
    p.add_argument("--edge-heads", nargs="*", default=["int4"], choices=["int4", "int8", "float"],
                   help="also run edge_sdk builds with the LM head forced to these (the main row is --head auto)")
    p.add_argument("--edge-kv-caches", nargs="*", default=["int8"], choices=["int8", "float32"],
                   help="also run the last edge_sdk build with its KV cache in these (the others: float16)")
    p.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        system, model, plen, n, threads = a.worker
        print(json.dumps(worker(system, model, int(plen), int(n), int(threads))))
        return 0

    a.work.mkdir(parents=True, exist_ok=True)
    edge = str(Path(a.python).with_name("edge-sdk"))
    ckpt = make_checkpoint(a.work, a.layers, a.python)
    max_ctx = max([a.prompt_tokens, *a.contexts]) + a.new_tokens + 64
    pkg, build = build_edge_sdk(a.work, ckpt, edge, max_ctx)
    models = {"edge_sdk": (a.python, pkg)}
    for head in a.edge_heads:  # variants: the same build with the head forced
        models[f"edge_sdk, {head} head"] = (a.python, build_edge_sdk(a.work, ckpt, edge, max_ctx, head)[0])
    last = list(models)[-1]
    for kv in a.edge_kv_caches:
        models[f"{last}, {kv} KV cache"] = models[last]
    gguf = build_gguf(a.work, ckpt, a.peers_python)
    if gguf is not None:
        models["llama.cpp Q4_0"] = (a.peers_python, gguf)
    genai = build_ort_genai(a.work, ckpt, a.peers_python, a.threads)
    if genai is not None:
        models["ORT GenAI INT4"] = (a.peers_python, genai)

    sys.path.insert(0, str(ROOT))
    from edge_sdk.bench import measure_bandwidth

    bandwidth = measure_bandwidth(threads=a.threads)
    rows: dict[str, list[dict]] = {s: [] for s in models}
    for r in range(a.rounds):
        for system, (python, model) in models.items():
            log(f"round {r + 1}/{a.rounds}: {system}")
            rows[system].append(measure(python, system, model, a.prompt_tokens, a.new_tokens, a.threads))
    bandwidth = (bandwidth + measure_bandwidth(threads=a.threads)) / 2

    def med(system: str, key: str) -> float:
        return statistics.median(x[key] for x in rows[system])

    ref = "edge_sdk"
    print(f"\n{a.layers} layers of Ministral-3-3B shapes, {a.prompt_tokens} prompt tokens, {a.new_tokens} greedy new "
          f"tokens, {a.threads} threads, medians of {a.rounds} interleaved rounds; "
          f"memory read bandwidth {bandwidth:.1f} GB/s")
    print(f"edge-sdk build: {build['build_s']:.0f} s, peak RSS {build['build_peak_rss_gb']:.2f} GB "
          f"(head chosen by --head auto: {build['head']})")
    print("\n| system | weights | decode tok/s | prefill tok/s | TTFT ms | peak RSS | decode of roofline | "
          "decode vs edge_sdk | prefill vs edge_sdk |")
    print("|---|---|---|---|---|---|---|---|---|")
    for system, (_, model) in models.items():
        wb = weight_bytes(system, model)
        dec, pre = med(system, "decode_tok_s"), med(system, "prefill_tok_s")
        roof = bandwidth * 1e9 / wb
        print(f"| {system} | {wb / 1e9:.2f} GB | {dec:.1f} | {pre:.0f} | {med(system, 'ttft_ms'):.0f} | "
              f"{med(system, 'peak_rss_gb'):.2f} GB | {dec / roof:.0%} | {dec / med(ref, 'decode_tok_s'):.2f}x | "
              f"{pre / med(ref, 'prefill_tok_s'):.2f}x |")
    if a.contexts:
        print_context_table(models, a, bandwidth)
    return 0


def kv_bytes_per_token(system: str, model: Path, layers: int) -> int:
    """Bytes of KV cache one token adds, all layers: edge_sdk's in the KV dtype its row names
    (int8 rows carry a float32 scale each), llama.cpp's float16 (its default), ONNX Runtime
    GenAI's in the element type of its graph's past inputs."""
    import numpy as np

    dtype = np.dtype(np.float16)
    if system.startswith("edge_sdk"):
        dtype = np.dtype(edge_kv_cache(system))
    elif system == "ORT GenAI INT4":
        import onnx

        graph = onnx.load(str(model / "model.onnx"), load_external_data=False).graph
        past = next(i for i in graph.input if i.name.startswith("past_key_values"))
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(past.type.tensor_type.elem_type))
    row = SHAPE["head_dim"] * dtype.itemsize + (4 if dtype == np.int8 else 0)
    return layers * 2 * SHAPE["kv_heads"] * row


def print_context_table(models: dict, a, bandwidth: float) -> None:
    """Decode speed after prompts of each length, medians of interleaved rounds (a long prompt's
    run is as exposed to the machine's noise as the short one it is divided by), and the bound on
    the last / first ratio: each step at the last length reading its longer cache at the
    bandwidth measured in this run, on top of a step at the first length."""
    speeds: dict[tuple[str, int], list[float]] = {}
    for r in range(a.context_rounds):
        for system, (python, model) in models.items():
            log(f"context round {r + 1}/{a.context_rounds}: {system}")
            for c in a.contexts:
                run = measure(python, system, model, c, a.new_tokens, a.threads)
                speeds.setdefault((system, c), []).append(run["decode_tok_s"])
    first, last = a.contexts[0], a.contexts[-1]
    print(f"\ndecode tok/s after a prompt of N tokens ({a.new_tokens} new tokens, medians of {a.context_rounds} "
          "interleaved rounds)")
    print("| system | " + " | ".join(str(c) for c in a.contexts) + f" | {last} / {first} | bandwidth bound | KV bytes/token |")
    print("|---|" + "---|" * (len(a.contexts) + 3))
    for system, (_, model) in models.items():
        med = [statistics.median(speeds[system, c]) for c in a.contexts]
        per_token = kv_bytes_per_token(system, model, a.layers)
        step = 1 / med[0]
        bound = step / (step + (last - first) * per_token / (bandwidth * 1e9))
        print(f"| {system} | " + " | ".join(f"{s:.1f}" for s in med) + f" | {med[-1] / med[0]:.2f} | {bound:.2f} | "
              f"{per_token / 1e3:.1f} KB |")


if __name__ == "__main__":
    sys.exit(main())
