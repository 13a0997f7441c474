"""The CPU attention kernel (runtime/attention.py over csrc/attention.c) against a NumPy reference
written from the definition, in float64: RoPE (rotate-half) at each token's position, the step's
keys and values stored at cache positions length .. length + S - 1, then causal grouped-query
attention, token s seeing cache positions 0 .. length + s.

With a float16 or int8 cache the reference reads the cache as the kernel left it (the stored keys
and values rounded to float16, or int8 rows times their scales), and over an int8 cache it scores
each rotated query row as the kernel does, as int8 codes by the cached rows' rule (the rotation
in float32, as the kernel rounds it, so that both get the same codes). So every cache is held to
the same tolerance: what differs is only the order of float32 sums. How well the stored rows keep
what they were given is checked apart, against each form's rounding."""

from __future__ import annotations

import multiprocessing

import numpy as np
import pytest

from edge_sdk.runtime import attention, kernels

ROPE_ROWS = 2048


def _tables(head_dim: int, rng) -> attention.RopeTables:
    angles = rng.uniform(0, 2 * np.pi, (4, ROPE_ROWS, head_dim // 2))
    q_scale = rng.uniform(0.05, 0.2, (ROPE_ROWS, 1))  # the query scale rides on q's tables
    return attention.RopeTables(*(np.ascontiguousarray(t, dtype=np.float32) for t in
                                  (np.cos(angles[0]) * q_scale, np.sin(angles[0]) * q_scale,
                                   np.cos(angles[1]), np.sin(angles[1]))))


def _rotate(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _reference(q, k, v, positions, tables, key_cache, length):
    """(rotated queries [S, H, D] as scored, rotated keys [KV, S, D]) in float64. Over an int8
    cache the queries are their int8 codes times their scales."""
    seq, kv_heads, dim = len(positions), key_cache.shape[0], key_cache.shape[2]
    heads = q.shape[1] // dim
    t = {name: getattr(tables, name)[positions].astype(np.float64)[:, None] for name in
         ("q_cos", "q_sin", "k_cos", "k_sin")}
    if key_cache.dtype == np.int8:
        qr = _int8_queries(q.reshape(seq, heads, dim), tables.q_cos[positions][:, None],
                           tables.q_sin[positions][:, None])
    else:
        qr = _rotate(q.reshape(seq, heads, dim).astype(np.float64), t["q_cos"], t["q_sin"])
    kr = _rotate(k.reshape(seq, kv_heads, dim).astype(np.float64), t["k_cos"], t["k_sin"])
    return qr, kr.transpose(1, 0, 2)


def _int8_queries(q, cos, sin):
    """The rotated query rows as the kernel scores them against int8 keys: rotated in float32 (each
    product and sum rounded, as the kernel computes them), then each row's codes with its largest
    magnitude at 127 (ties to even), times the row's scale."""
    rotated = _rotate(q, cos, sin)
    assert rotated.dtype == np.float32
    top = np.abs(rotated).max(axis=-1, keepdims=True)
    codes = np.rint(rotated * (np.float32(127) / top))
    assert np.abs(codes).max() == 127
    return codes.astype(np.float64) * (top / np.float32(127)).astype(np.float64)


def _stored(cache: attention.LayerCache) -> tuple[np.ndarray, np.ndarray]:
    """The keys and values a cache holds, in float64: int8 rows times their scales."""
    if cache.keys.dtype != np.int8:
        return cache.keys.astype(np.float64), cache.values.astype(np.float64)
    return tuple(x.astype(np.float64) * scale[..., None].astype(np.float64)
                 for x, scale in ((cache.keys, cache.key_scales), (cache.values, cache.value_scales)))


def _cache(kv_heads, capacity, dim, dtype, rng, length, fill=7) -> attention.LayerCache:
    """A layer cache with `length` random rows, the rest ``fill`` (rows the step must not touch)."""
    keys, values = (np.full((kv_heads, capacity, dim), fill, dtype=dtype) for _ in range(2))
    scales = [np.full((kv_heads, capacity), fill, np.float32) for _ in range(2)] if dtype == np.int8 else [None] * 2
    for array, scale in zip((keys, values), scales):
        if scale is None:
            array[:, :length] = rng.standard_normal((kv_heads, length, dim))
        else:
            array[:, :length] = rng.integers(-127, 128, (kv_heads, length, dim))
            scale[:, :length] = rng.uniform(0.005, 0.03, (kv_heads, length))
    return attention.LayerCache(keys, values, *scales)


def _attend(qr, cache: attention.LayerCache, length):
    seq, heads, dim = qr.shape
    kv_heads = cache.keys.shape[0]
    keys, values = _stored(cache)
    out = np.zeros((seq, heads, dim))
    for s in range(seq):
        for h in range(heads):
            g = h // (heads // kv_heads)
            scores = keys[g, :length + s + 1] @ qr[s, h]
            p = np.exp(scores - scores.max())
            out[s, h] = (p / p.sum()) @ values[g, :length + s + 1]
    return out.reshape(seq, heads * dim)


def _step(heads, kv_heads, dim, length, seq, dtype, threads, seed=0):
    rng = np.random.default_rng(seed)
    tables = _tables(dim, rng)
    kernel = attention.AttentionKernel(kernels.load(), heads, kv_heads, dim, tables, threads)
    cache = _cache(kv_heads, length + seq + 3, dim, dtype, rng, length)
    q = rng.standard_normal((seq, heads * dim)).astype(np.float32)
    k = rng.standard_normal((seq, kv_heads * dim)).astype(np.float32)
    v = rng.standard_normal((seq, kv_heads * dim)).astype(np.float32)
    positions = np.arange(length, length + seq) * 3 % ROPE_ROWS  # RoPE reads the positions it is given
    before = attention.LayerCache(*(None if a is None else a.copy() for a in
                                    (cache.keys, cache.values, cache.key_scales, cache.value_scales)))
    out = np.empty_like(q)
    kernel(q, k, v, positions, cache, length, out)
    qr, kr = _reference(q, k, v, positions, tables, cache.keys, length)
    return dict(out=out, want=_attend(qr, cache, length), kr=kr, v=v, before=before, cache=cache, length=length,
                seq=seq)


# tiny; Ministral 3; 3 per group; one per group; 4 per group in the 8-float (AVX2) unit (D % 32 != 0)
SHAPES = [(4, 2, 16), (32, 8, 128), (6, 2, 32), (8, 8, 32), (8, 2, 48)]
DTYPES = [np.float32, np.float16, np.int8]


@pytest.mark.parametrize("heads,kv_heads,dim", SHAPES)
@pytest.mark.parametrize("length,seq", [(0, 1), (0, 6), (37, 1), (37, 5)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_matches_the_definition(heads, kv_heads, dim, length, seq, dtype):
    r = _step(heads, kv_heads, dim, length, seq, dtype, threads=2)
    np.testing.assert_allclose(r["out"], r["want"], atol=1e-5, rtol=0)
    cache, before, kv = r["cache"], r["before"], r["cache"].keys.shape[0]
    new = slice(r["length"], r["length"] + r["seq"])
    keys, values = (x[:, new] for x in _stored(cache))
    given = r["v"].reshape(r["seq"], kv, -1).transpose(1, 0, 2)
    if dtype == np.int8:  # each row: its largest magnitude at 127, the rest within half a step of it
        for stored, x, ints, scale in ((keys, r["kr"], cache.keys, cache.key_scales),
                                       (values, given, cache.values, cache.value_scales)):
            np.testing.assert_allclose(scale[:, new], np.abs(x).max(axis=-1) / 127, rtol=1e-6)
            assert (np.abs(ints[:, new]).max(axis=-1) == 127).all()
            assert (np.abs(stored - x) <= scale[:, new, None] * (0.5 + 1e-4)).all()
    else:
        rounding = 2.0 ** -11 if dtype == np.float16 else 1e-6  # the stored key: the rotation, rounded once
        np.testing.assert_allclose(keys, r["kr"], rtol=rounding, atol=1e-6)
        np.testing.assert_array_equal(cache.values[:, new], given.astype(dtype))
    untouched = np.ones(cache.capacity, bool)
    untouched[new] = False
    for name in ("keys", "values", "key_scales", "value_scales"):
        if getattr(cache, name) is not None:
            np.testing.assert_array_equal(getattr(cache, name)[:, untouched], getattr(before, name)[:, untouched])


def _quantized(cache: attention.LayerCache) -> attention.LayerCache:
    """A float cache as int8 rows: each row's largest magnitude at 127 (the kernel's rule)."""
    rows = []
    for x in (cache.keys, cache.values):
        scale = (np.abs(x).max(axis=-1) / 127).astype(np.float32)
        rows.append((np.rint(x / np.where(scale > 0, scale, 1)[..., None]).astype(np.int8), scale))
    return attention.LayerCache(rows[0][0], rows[1][0], rows[0][1], rows[1][1])


def test_an_int8_cache_stays_close_to_the_float_definition():
    """What int8 rows cost against the exact keys and values (the test above holds the kernel to
    the rows as stored): a row keeps ~2^-8 of its largest magnitude, and a step's output moves
    by ~1 % of its largest for it (measured over six seeds: 0.6-1.2e-2), bounded at 2e-2; at
    least 1e-4, or the rows were not quantized at all."""
    rng = np.random.default_rng(5)
    heads, kv_heads, dim, length = 32, 8, 128, 300
    tables = _tables(dim, rng)
    kernel = attention.AttentionKernel(kernels.load(), heads, kv_heads, dim, tables, 2)
    exact = _cache(kv_heads, length + 1, dim, np.float32, rng, length, fill=0)
    q, k, v = (rng.standard_normal((1, n * dim)).astype(np.float32) for n in (heads, kv_heads, kv_heads))
    positions = np.array([length])
    out = np.empty_like(q)
    kernel(q, k, v, positions, _quantized(exact), length, out)
    kernel(q, k, v, positions, exact, length, np.empty_like(q))  # the exact cache gets this step's row too
    qr, _ = _reference(q, k, v, positions, tables, exact.keys, length)
    want = _attend(qr, exact, length)
    err = np.abs(out - want).max() / np.abs(want).max()
    assert 1e-4 < err < 2e-2, err


def test_a_bound_call_keeps_its_arrays():
    """A bound call holds pointers into its arrays: it keeps them alive, so a call made after the
    caller dropped its own references (and that memory could be handed out again) still reads
    and writes them."""
    import gc

    rng = np.random.default_rng(7)
    heads, kv_heads, dim, length = 32, 8, 128, 37
    tables = _tables(dim, rng)
    kernel = attention.AttentionKernel(kernels.load(), heads, kv_heads, dim, tables, 1)
    cache = _cache(kv_heads, length + 1, dim, np.float32, rng, length)
    q, k, v = (rng.standard_normal((1, n * dim)).astype(np.float32) for n in (heads, kv_heads, kv_heads))
    run = kernel.bind(q.copy(), k.copy(), v.copy(), np.array([length]), cache, np.empty_like(q))
    gc.collect()
    litter = [np.full(q.shape, 1e30, np.float32) for _ in range(8)]  # would reuse freed memory
    run(length)
    out = run.arrays[3]
    qr, _ = _reference(q, k, v, np.array([length]), tables, cache.keys, length)
    np.testing.assert_allclose(out, _attend(qr, cache, length), atol=1e-5, rtol=0)
    assert all((x == 1e30).all() for x in litter)


@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_on_threads_matches_one_thread(dtype):
    """Long enough (1,100 cached rows x 8 KV heads) that the work is split across threads."""
    one, two = (_step(32, 8, 128, 1100, 1, dtype, threads=t) for t in (1, 2))
    np.testing.assert_allclose(two["out"], two["want"], atol=1e-5, rtol=0)
    np.testing.assert_array_equal(one["out"], two["out"])  # each unit is computed whole by one thread


def _peaked_step(dtype, threads, length=1100, heads=8, dim=32):
    """One query head per KV head; every third cached key is zero (score 0), the others point
    against the head's rotated query, scoring -100: their softmax weights, e^-100, are below
    float32's normal range (flushed to zero by the kernel). Well conditioned all the same: the
    weights that count are exactly 1."""
    rng = np.random.default_rng(3)
    tables = _tables(dim, rng)
    kernel = attention.AttentionKernel(kernels.load(), heads, heads, dim, tables, threads)
    q = rng.standard_normal((1, heads * dim)).astype(np.float32)
    k, v = (rng.standard_normal((1, heads * dim)).astype(np.float32) for _ in range(2))
    positions = np.array([length])
    qr, _ = _reference(q, k, v, positions, tables, np.zeros((heads, 1, dim)), length)
    against = -100 * qr[0] / (qr[0] ** 2).sum(axis=1, keepdims=True)  # [heads, dim]: scores -100
    keys = np.zeros((heads, length + 1, dim))
    keys[:, :length] = against[:, None]
    keys[:, :length:3] = 0
    cache = attention.LayerCache(keys, rng.standard_normal((heads, length + 1, dim)))
    cache = _quantized(cache) if dtype == np.int8 else attention.LayerCache(*(np.ascontiguousarray(
        x, dtype=dtype) for x in (cache.keys, cache.values)))
    out = np.empty_like(q)
    kernel(q, k, v, positions, cache, length, out)
    qr, _ = _reference(q, k, v, positions, tables, cache.keys, length)
    scores = np.einsum("hd,hnd->hn", qr[0], _stored(cache)[0][:, :length])
    return out, _attend(qr, cache, length), scores


@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_with_sharply_peaked_scores(dtype):
    """Two thirds of the weights below float32's normal range, on one thread and on two: the
    result is still the definition's."""
    for threads in (1, 2):
        out, want, scores = _peaked_step(dtype, threads)
        assert (np.exp(scores.astype(np.float32)) < np.finfo(np.float32).tiny).mean() > 0.6
        np.testing.assert_allclose(out, want, atol=1e-5, rtol=0)


def test_kernel_leaves_the_callers_floating_point_mode():
    """The flush to zero holds inside the kernel only: the calling thread's arithmetic on
    subnormal floats is as before the call."""
    tiny = np.float32(2.0 ** -140)
    _peaked_step(np.float32, threads=2)
    assert tiny * np.float32(1.0) == tiny != 0
    assert np.float32(2.0 ** -70) * np.float32(2.0 ** -70) == tiny


def test_kernel_called_from_two_threads_at_once():
    """ctypes lets go of the GIL: two Python threads may be in the kernel together. The one that
    finds the thread pool taken does its work on its own thread; both get their own answers."""
    import threading

    results = [None] * 4

    def run(i):
        results[i] = _step(32, 8, 128, 1100, 1, np.float16, threads=2, seed=i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for r in results:
        np.testing.assert_allclose(r["out"], r["want"], atol=1e-5, rtol=0)


def _threaded_step_in_child(queue):
    r = _step(32, 8, 128, 1100, 1, np.float16, threads=2)
    queue.put(float(np.abs(r["out"] - r["want"]).max()))


def test_kernel_threads_work_in_a_forked_child():
    """A process forked after the kernel started its threads (a daemon forking a helper) has none
    of them; its calls still finish, and right."""
    _step(32, 8, 128, 1100, 1, np.float16, threads=2)
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_threaded_step_in_child, args=(queue,))
    child.start()
    child.join(timeout=60)
    assert child.exitcode == 0
    assert queue.get(timeout=5) < 1e-5


def test_kernel_refuses_what_it_does_not_take():
    rng = np.random.default_rng(0)
    kernel = attention.AttentionKernel(kernels.load(), 4, 2, 16, _tables(16, rng), 1)
    cache = attention.LayerCache(np.zeros((2, 8, 16), np.float32), np.zeros((2, 8, 16), np.float32))
    q, kv = np.zeros((1, 64), np.float32), np.zeros((1, 32), np.float32)
    with pytest.raises(RuntimeError, match="refused a step"):
        kernel(q, kv, kv, np.array([ROPE_ROWS]), cache, 0, q.copy())  # past the RoPE tables
    with pytest.raises(RuntimeError, match="refused a step"):
        kernel(q, kv, kv, np.array([3]), cache, 8, q.copy())  # the cache is full
    int8 = np.zeros((2, 8, 16), np.int8)
    with pytest.raises(ValueError, match="row scales"):  # int8 rows mean nothing without their scales
        kernel(q, kv, kv, np.array([3]), attention.LayerCache(int8, int8.copy()), 0, q.copy())
    with pytest.raises(ValueError, match="row scales"):
        kernel(q, kv, kv, np.array([3]), attention.LayerCache(int8, int8.copy(), np.zeros((2, 7), np.float32),
                                                              np.zeros((2, 8), np.float32)), 0, q.copy())
    with pytest.raises(ValueError, match="must both be"):
        kernel(q, kv, kv, np.array([3]), attention.LayerCache(cache.keys, int8), 0, q.copy())
    wide = attention.AttentionKernel(kernels.load(), 1, 1, 528, _tables(528, rng), 1)
    codes, scales = np.zeros((1, 4, 528), np.int8), np.zeros((1, 4), np.float32)
    with pytest.raises(ValueError, match="int8 KV caches take head_dim up to 512"):
        wide.bind(*(np.zeros((1, 528), np.float32) for _ in range(3)), np.array([3]),
                  attention.LayerCache(codes, codes.copy(), scales, scales.copy()), np.zeros((1, 528), np.float32))
    assert attention.supports(32, 8, 128) and attention.supports(4, 2, 16)
    assert not attention.supports(32, 8, 24) and not attention.supports(30, 8, 128)


def test_a_library_built_from_other_sources_is_refused(monkeypatch):
    """A failed rebuild leaves the old library in place; its stamp no longer matches the sources
    beside it, and the backend gets a reason, not stale code."""
    assert kernels.built_stamp(kernels.load()) == kernels.source_stamp()
    monkeypatch.setattr(kernels, "source_stamp", lambda: "0123456789abcdef")
    with pytest.raises(kernels.KernelUnavailable, match="stale build"):
        kernels.load()


def test_the_kernel_builds_with_this_hosts_compiler(tmp_path, monkeypatch, capsys):
    """What a flashed device runs (it gets no pip install): the library built, stamped with its
    sources, and it computes what the installed one does; loading it leaves the process's
    subnormal arithmetic alone (linked with -ffast-math, it would flush it to zero process-wide);
    without a compiler, one line says so."""
    import subprocess
    import sys

    from edge_sdk.runtime import kernel_build

    built = tmp_path / kernel_build.library_path().name
    monkeypatch.setattr(kernel_build, "library_path", lambda: built)
    assert kernel_build.main() == 0 and capsys.readouterr().out == f"built {built}\n"
    probe = ("import ctypes, sys, numpy as np; from edge_sdk.runtime import kernel_build; "
             "library = ctypes.CDLL(sys.argv[1]); tiny = np.float32(2.0 ** -140); "
             "print(kernel_build.built_stamp(library), tiny * np.float32(1.0) == tiny != 0)")
    stamp, subnormals_kept = subprocess.run([sys.executable, "-c", probe, str(built)], capture_output=True,
                                            text=True, check=True).stdout.split()
    assert stamp == kernel_build.source_stamp() and subnormals_kept == "True"
    assert kernel_build.main() == 0 and capsys.readouterr().out.startswith(f"kept {built}")
    monkeypatch.setattr(kernels, "library_path", lambda: built)
    r = _step(32, 8, 128, 37, 5, np.float16, threads=2)
    np.testing.assert_allclose(r["out"], r["want"], atol=1e-5, rtol=0)

    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setattr(kernel_build, "library_path", lambda: tmp_path / "unbuilt.so")
    assert kernel_build.main() == 0
    assert capsys.readouterr().out.startswith("not built (no C compiler (")
    assert not (tmp_path / "unbuilt.so").exists()
    monkeypatch.setenv("CC", "cc -include no-such-header.h")  # a compile error: named, with its first error line
    with pytest.raises(RuntimeError, match="cc -include no-such-header.h failed on attention.c: .*no-such-header.h"):
        kernel_build.build(tmp_path / "broken.so")
