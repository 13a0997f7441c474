"""The plugin kernels on a real GPU: each against its NumPy reference on Ministral-3-3B shapes,
and its achieved memory bandwidth as a fraction of the GPU's measured peak.

Run on a machine with an NVIDIA GPU, CuPy and nvcc (no TensorRT needed: the kernels are called
through their C entry points, the same code the IPluginV3 glue calls):

    python benchmarks/gpu_kernels.py [--arch 90] [--quick]

Peak bandwidth is measured in the same run (a device-to-device copy of 1 GiB: read + write).
Prints one line per case and exits 1 if any kernel disagrees with its reference.
"""

from __future__ import annotations

import argparse
import ctypes
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edge_sdk.plugins.library import KERNELS, SOURCES  # noqa: E402
from edge_sdk.plugins.reference import attention, int4_gemm  # noqa: E402
from edge_sdk.quant.int4 import pack_int4  # noqa: E402

HIDDEN, INTER, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 3072, 9216, 32, 8, 128, 131072
LINEARS = {"qkv": (HEADS * HEAD_DIM + 2 * KV_HEADS * HEAD_DIM, HIDDEN), "o": (HIDDEN, HEADS * HEAD_DIM),
           "gate_up": (2 * INTER, HIDDEN), "down": (HIDDEN, INTER), "head": (VOCAB, HIDDEN)}


def build_kernels(arch: int, out: Path) -> Path:
    lib = out / "libedge_sdk_kernels.so"
    cmd = ["nvcc", "-std=c++17", "-O3", "-shared", "-Xcompiler", "-fPIC", f"-gencode=arch=compute_{arch},code=sm_{arch}",
           *(str(SOURCES / k) for k in KERNELS), "-o", str(lib)]
    subprocess.run(cmd, check=True)
    return lib


def timed(cp, fn, repeats: int) -> float:
    """Median seconds of ``fn`` over ``repeats`` runs, by CUDA events."""
    fn()
    cp.cuda.Device().synchronize()
    times = []
    for _ in range(repeats):
        start, stop = cp.cuda.Event(), cp.cuda.Event()
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, stop) / 1e3)
    return float(np.median(times))


def peak_bandwidth(cp) -> float:
    src = cp.empty(1 << 30, dtype=cp.uint8)
    dst = cp.empty_like(src)
    seconds = timed(cp, lambda: dst.__setitem__(slice(None), src), 10)
    return 2 * src.nbytes / seconds  # read + write


def ptr(a) -> ctypes.c_void_p:
    return ctypes.c_void_p(int(a.data.ptr))


def check_gemm(cp, lib, name: str, m: int, group: int, peak: float, repeats: int, rng) -> bool:
    n, k = LINEARS[name]
    codes = rng.integers(-8, 8, size=(k, n), dtype=np.int8)
    qweight = pack_int4(codes).view(np.int8)  # W^T [K, N/2]: the exporter's layout
    scales = rng.uniform(0.002, 0.02, size=(k // group, n)).astype(np.float16)
    x = rng.standard_normal((m, k)).astype(np.float16)
    d_x, d_q, d_s = cp.asarray(x), cp.asarray(qweight), cp.asarray(scales)
    d_y = cp.empty((m, n), dtype=cp.float16)
    ws = cp.empty(max(1, lib.edge_sdk_int4_gemm_workspace(m, n, k)), dtype=cp.uint8)

    def run():
        rc = lib.edge_sdk_int4_gemm(1, ptr(d_x), ptr(d_q), ptr(d_s), ptr(d_y), m, n, k, group, ptr(ws), None)
        if rc:
            raise RuntimeError(f"edge_sdk_int4_gemm returned CUDA error {rc}")

    seconds = timed(cp, run, repeats)
    want = int4_gemm(x.astype(np.float32), qweight, scales.astype(np.float32), group)
    got = cp.asnumpy(d_y).astype(np.float32)
    err = float(np.abs(got - want).max() / np.abs(want).max())
    moved = qweight.nbytes + scales.nbytes + x.nbytes + m * n * 2
    ok = err < 2e-3
    print(f"{'ok ' if ok else 'BAD'} int4 gemm {name:7} M={m:<4} N={n:<6} K={k:<5} g={group:<3} "
          f"{seconds * 1e6:9.1f} us  {moved / seconds / 1e9:7.1f} GB/s = {moved / seconds / peak:5.1%} of peak  "
          f"max rel err {err:.1e}")
    return ok


def check_attention(cp, lib, seq: int, past: int, capacity: int, peak: float, repeats: int, rng) -> bool:
    width = (HEADS + 2 * KV_HEADS) * HEAD_DIM
    qkv = rng.standard_normal((1, seq, width)).astype(np.float16)
    cache = (rng.standard_normal((1, 2, KV_HEADS, capacity, HEAD_DIM)) * 0.5).astype(np.float16)
    lengths = np.array([past], np.int32)
    pos = past + np.arange(seq)
    inv = 1e6 ** (-np.arange(0, HEAD_DIM, 2) / HEAD_DIM)
    ang = np.concatenate([pos[:, None] * inv, pos[:, None] * inv], axis=-1)[None]
    cos, sin = np.cos(ang).astype(np.float16), np.sin(ang).astype(np.float16)
    q_scale = np.full((1, seq), HEAD_DIM ** -0.5, np.float16)
    d = {k: cp.asarray(v) for k, v in dict(qkv=qkv, cos=cos, sin=sin, qs=q_scale, lengths=lengths).items()}
    d_cache = cp.asarray(cache)
    d_out = cp.empty((1, seq, HEADS * HEAD_DIM), dtype=cp.float16)
    ws = cp.empty(max(1, lib.edge_sdk_attention_workspace(1, seq, HEADS, HEAD_DIM)), dtype=cp.uint8)

    def run():
        rc = lib.edge_sdk_attention(1, 1, seq, HEADS, KV_HEADS, HEAD_DIM, capacity, ptr(d["qkv"]), ptr(d_cache),
                                    ptr(d["lengths"]), ptr(d["cos"]), ptr(d["sin"]), ptr(d["qs"]), ptr(d_out),
                                    ptr(ws), None)
        if rc:
            raise RuntimeError(f"edge_sdk_attention returned CUDA error {rc}")

    run()  # once for the check: the cache then holds exactly the reference's writes
    want_out, want_cache = attention(qkv.astype(np.float32), cache.astype(np.float32), lengths,
                                     cos.astype(np.float32), sin.astype(np.float32), q_scale.astype(np.float32),
                                     num_q_heads=HEADS, num_kv_heads=KV_HEADS, head_size=HEAD_DIM)
    got_out = cp.asnumpy(d_out).astype(np.float32)
    got_cache = cp.asnumpy(d_cache).astype(np.float32)
    err = float(np.abs(got_out - want_out).max() / np.abs(want_out).max())
    cache_err = float(np.abs(got_cache - want_cache).max())
    seconds = timed(cp, run, repeats)  # rewrites the same positions: same work each run
    moved = 2 * KV_HEADS * (past + seq) * HEAD_DIM * 2 + qkv.nbytes + got_out.size * 2
    ok = err < 1e-2 and cache_err < 1e-2
    print(f"{'ok ' if ok else 'BAD'} attention seq={seq:<4} past={past:<5} {seconds * 1e6:9.1f} us  "
          f"{moved / seconds / 1e9:7.1f} GB/s = {moved / seconds / peak:5.1%} of peak  "
          f"max rel err {err:.1e}, cache err {cache_err:.1e}")
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="GPU architecture to compile for (default 90)")
    parser.add_argument("--quick", action="store_true", help="fewer shapes and repeats")
    args = parser.parse_args()
    import cupy as cp

    with tempfile.TemporaryDirectory() as tmp:
        lib = ctypes.CDLL(str(build_kernels(args.arch, Path(tmp))))
    lib.edge_sdk_int4_gemm_workspace.restype = ctypes.c_size_t
    lib.edge_sdk_int4_gemm_workspace.argtypes = [ctypes.c_int64] * 3
    lib.edge_sdk_attention_workspace.restype = ctypes.c_size_t
    lib.edge_sdk_attention_workspace.argtypes = [ctypes.c_int32] * 4
    lib.edge_sdk_int4_gemm.argtypes = [ctypes.c_int32] + [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3 + \
        [ctypes.c_int32, ctypes.c_void_p, ctypes.c_void_p]
    lib.edge_sdk_attention.argtypes = [ctypes.c_int32] * 7 + [ctypes.c_void_p] * 9
    rng = np.random.default_rng(0)
    repeats = 5 if args.quick else 20
    peak = peak_bandwidth(cp)
    print(f"{cp.cuda.runtime.getDeviceProperties(0)['name'].decode()}: measured peak {peak / 1e9:.0f} GB/s")
    ok = True
    names = ("qkv", "down") if args.quick else tuple(LINEARS)
    for name in names:
        for m in (1, 4, 128):
            for group in (128, 64):
                ok &= check_gemm(cp, lib, name, m, group, peak, repeats, rng)
    for seq, past in ((1, 127), (1, 1023), (1, 4095), (128, 0), (512, 512)):
        ok &= check_attention(cp, lib, seq, past, 4096 if past + seq <= 4096 else past + seq, peak, repeats, rng)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
