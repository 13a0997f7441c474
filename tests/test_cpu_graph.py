"""The CPU graph (grouped attention over preallocated KV buffers, nothing concatenated) against
the standard graph it is derived from: same logits and greedy tokens over a long generation that
crosses the query-scale steps, through chunked prefill (and, for the graph's own attention,
several regrowths of the buffers). Both ways the CPU graph runs are held to it: cut at its
attentions with the attention kernel between the pieces (runtime/segments.py), and whole, as
where no kernel is installed."""

from __future__ import annotations

import numpy as np
import pytest

import edge_sdk
from edge_sdk.runtime import kernels, linear, segments
from edge_sdk.runtime import onnxruntime as ort_backend
from edge_sdk.runtime.types import ContextOverflowError

N_NEW = 60  # positions 12 .. 72: past the 16/32/48/64 query-scale steps of the tiny config


def _without_kernel(monkeypatch):
    def unavailable():
        raise kernels.KernelUnavailable("none installed (test)")

    monkeypatch.setattr(kernels, "load", unavailable)


@pytest.mark.parametrize("attention_by", ["kernel", "graph"])
@pytest.mark.parametrize("quant,recipe", [("none", {}), ("int4", dict(block_size=32)), ("fp8", {}),
                                          ("int4", dict(block_size=32, head="int4"))])  # + the MatMulNBits head
def test_cpu_graph_matches_standard_graph(tiny_checkpoints, build_package, monkeypatch, quant, recipe, attention_by):
    monkeypatch.setattr(ort_backend, "CAPACITY_STEP", 16)  # 16 -> 32 -> ... -> 80 within the run
    monkeypatch.setattr(ort_backend, "PREFILL_CHUNK", 3)  # the 7- and 5-token prefills run as 3 + 3 + 1, 3 + 2
    pkg = build_package(tiny_checkpoints["mm_tied"], quant, **recipe)
    if attention_by == "graph":
        _without_kernel(monkeypatch)
    fused = edge_sdk.load(pkg, accuracy_level=0, kv_cache="float32")
    standard = edge_sdk.load(pkg, accuracy_level=0, graph="decoder")
    assert fused.backend.in_place and not standard.backend.in_place
    assert (fused.backend.segmented is not None) == (attention_by == "kernel")
    prompt = [1, 3, 1091, 1500, 2041, 1201, 3333, 1044, 4, 1600, 1200, 1300]
    runs = []
    for backend in (fused.backend, standard.backend):
        cache = backend.new_cache()
        logits, cache = backend.forward(backend.embed(np.array(prompt[:7])), np.arange(7), cache)
        logits, cache = backend.forward(backend.embed(np.array(prompt[7:])), np.arange(7, 12), cache)
        tokens, steps = [], [logits]
        for pos in range(12, 12 + N_NEW):
            tokens.append(int(steps[-1].argmax()))
            logits, cache = backend.forward(backend.embed(np.array([tokens[-1]])), np.array([pos]), cache)
            steps.append(logits)
        runs.append((tokens, np.stack(steps), cache))
    (got_tokens, got, cache), (want_tokens, want, _) = runs
    assert got_tokens == want_tokens
    np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max(), rtol=0)
    assert cache.length == 12 + N_NEW
    assert cache.capacity == (fused.context_length if attention_by == "kernel" else 80)
    if attention_by == "kernel":  # the one-token steps after the first ran on the pieces' bindings
        assert isinstance(cache.decode_io, segments.DecodeBindings)
    head = fused.manifest.extra.get("head_report", {}).get("format")  # int4 / int8: in the rows form
    _assert_fused(pkg, layers=fused.manifest.model.text.num_layers, rows_head=head in ("int4", "int8"))


def _teacher_forced(backend, ids: np.ndarray, prefill: int) -> np.ndarray:
    """Logits [len(ids) - prefill + 1, vocab]: after a prefill of ids[:prefill], then after each
    later id fed one step at a time."""
    cache = backend.new_cache()
    logits, cache = backend.forward(backend.embed(ids[:prefill]), np.arange(prefill), cache)
    steps = [logits]
    for pos in range(prefill, len(ids)):
        logits, cache = backend.forward(backend.embed(ids[pos:pos + 1]), np.array([pos]), cache)
        steps.append(logits)
    return np.stack(steps)


def _assert_fused(pkg, layers: int, rows_head: bool):
    """What the rewrite fuses: every residual Add with the RMSNorm after it (all but the first
    layer's input norm and the final norm, which read no residual Add), the query scale into q's
    RoPE caches, and a rows-form head into one MatMulNBits."""
    import json

    import onnx

    graph = onnx.load(str(pkg / "decoder.cpu.onnx"), load_external_data=False)
    summary = json.loads({p.key: p.value for p in graph.metadata_props}["edge_sdk.rewrite"])
    assert summary["skip_norms"] == 2 * layers - 1
    assert summary["matmul_nbits_head"] == rows_head
    kinds = [n.op_type for n in graph.graph.node]
    assert kinds.count("SkipSimplifiedLayerNormalization") == 2 * layers - 1
    rotated_q = {n.output[0] for n in graph.graph.node if n.op_type == "RotaryEmbedding"}
    assert not [n for n in graph.graph.node if n.op_type == "Mul" and set(n.input) & rotated_q]


def test_cpu_graph_cache_stops_at_the_context(tiny_checkpoints, build_package):
    backend = edge_sdk.load(build_package(tiny_checkpoints["mm_tied"], "none")).backend
    cache = backend.new_cache()
    ctx = backend.context_length
    _, cache = backend.forward(backend.embed(np.arange(ctx - 1)), np.arange(ctx - 1), cache)
    assert cache.capacity == ctx
    with pytest.raises(ContextOverflowError, match=f"{ctx - 1} cached \\+ 2 new tokens exceed the context"):
        backend.forward(backend.embed(np.arange(2)), np.arange(ctx - 1, ctx + 1), cache)


def test_a_package_with_an_older_cpu_graph_runs_its_standard_graph(tiny_checkpoints, build_package, tmp_path, caplog):
    """An older release's decoder.cpu.onnx (fused attention writing present_* in place) is not
    driven by this runtime: the backend says so and runs decoder.onnx, with the same tokens."""
    import shutil

    import onnx

    pkg = tmp_path / "pkg"
    shutil.copytree(build_package(tiny_checkpoints["mm_tied"], "none"), pkg)
    graph = onnx.load(str(pkg / "decoder.cpu.onnx"), load_external_data=False)
    renames = {o.name: o.name.replace("new_", "present_") for o in graph.graph.output}
    for node in graph.graph.node:
        node.output[:] = [renames.get(o, o) for o in node.output]
        node.input[:] = [renames.get(i, i) for i in node.input]
    for o in graph.graph.output:
        o.name = renames[o.name]
    onnx.save(graph, str(pkg / "decoder.cpu.onnx"))
    old = edge_sdk.load(pkg, verify=False)
    assert not old.backend.in_place and "from an older edge_sdk" in caplog.text
    want = edge_sdk.load(pkg, verify=False, graph="decoder").generate([1, 3, 1091, 1500], max_tokens=6).tokens
    assert old.generate([1, 3, 1091, 1500], max_tokens=6).tokens == want


@pytest.mark.parametrize("quant,recipe", [("none", {}), ("int4", dict(block_size=32, head="int4"))])
@pytest.mark.parametrize("kv_cache,bound,agree", [("float16", 5e-3, 1.0), ("int8", 3e-2, 0.95)])
def test_smaller_kv_caches_stay_close_to_float32(tiny_checkpoints, build_package, quant, recipe, kv_cache, bound,
                                                 agree):
    """The default float16 cache and the int8 one against the float32 one, teacher-forced over 60
    steps. float16 keeps 11 bits of each key and value (relative rounding 2^-11): these packages
    move their logits by ~6e-4 of the largest for it (measured), bounded at 5e-3, with the same
    top-1 token at every step. int8 keeps each row to 2^-8 of its largest magnitude, and the
    queries are scored as int8 codes too: 1.1-1.4e-2 (measured), bounded at 3e-2, with the same top-1 token at 95 % of the steps or more (measured:
    all 61, and 60 of 61 where the float32 cache's two best logits were 8e-4 of the largest
    apart). (The kernel's arithmetic on each is held to 1e-5 against the definition over the
    rows as stored, in test_attention_kernel.py.)"""
    pkg = build_package(tiny_checkpoints["mm_tied"], quant, **recipe)
    ids = np.random.default_rng(0).integers(5, 4000, 12 + N_NEW)
    runs = []
    for dtype in ("float32", kv_cache):
        backend = edge_sdk.load(pkg, accuracy_level=0, kv_cache=dtype).backend
        assert backend.segmented is not None and backend.cache_dtype == np.dtype(dtype)
        runs.append(_teacher_forced(backend, ids, prefill=12))
    full, small = runs
    assert (np.abs(small - full).max(axis=-1) / np.abs(full).max(axis=-1)).max() < bound
    assert (small.argmax(-1) == full.argmax(-1)).mean() >= agree


def test_an_int8_cache_without_the_kernel_says_so_and_runs(tiny_checkpoints, build_package, monkeypatch, caplog):
    """int8 rows are the kernel's form: where it is not installed the graph's attention keeps its
    own float cache, and the log says which."""
    _without_kernel(monkeypatch)
    with caplog.at_level("WARNING"):
        model = edge_sdk.load(build_package(tiny_checkpoints["mm_tied"]), kv_cache="int8")
    assert "an int8 KV cache needs the attention kernel; the graph's attention keeps a float32 cache" in caplog.text
    assert model.backend.cache_dtype == np.float32
    assert len(model.generate([1, 3, 1091, 1500], max_tokens=4, stop_token_ids=()).tokens) == 4


def test_cut_graph_runs_each_weight_once_and_no_graph_attention(tiny_checkpoints, build_package):
    """The cut (runtime/segments.py) at the attentions: layers + 1 pieces; no attention node of the
    graph's own left in them (the kernel does it); every weight in exactly one piece, with the
    weight-only nodes that read it (an INT4 weight's DequantizeLinear goes with its MatMul, so ONNX
    Runtime still fuses the pair: a dequantized float copy never crosses from one session to
    another). Cut at the quantized linears too, as where the linear kernel runs them: their
    MatMuls, DequantizeLinears and weights leave every piece, and a piece with nothing to do
    (between an attention and its o_proj) has no nodes."""
    import onnx

    pkg = build_package(tiny_checkpoints["mm_tied"], "int4", block_size=32, head="int4")
    graph = onnx.load(str(pkg / "decoder.cpu.onnx"), load_external_data=False)
    cuts = segments.attention_cuts(graph)
    layers = len(cuts["layers"])
    pieces = segments.cut(graph, segments.attention_steps(cuts, None))
    assert len(pieces) == layers + 1
    kinds = {n.op_type for piece in pieces for n in piece.graph.node}
    assert not kinds & {"Softmax", "FusedMatMul", "RotaryEmbedding"}
    assert {"DequantizeLinear", "MatMulNBits", "SkipSimplifiedLayerNormalization"} <= kinds
    weights = [t.name for piece in pieces for t in piece.graph.initializer
               if t.data_location == onnx.TensorProto.EXTERNAL]
    assert len(weights) == len(set(weights))
    for piece in pieces:
        made = {o for n in piece.graph.node for o in n.output}
        for node in piece.graph.node:
            if node.op_type == "DequantizeLinear":
                assert all(c.output[0] in made for c in piece.graph.node if node.output[0] in c.input)
        crossing = [i.name for i in piece.graph.input]
        assert not [name for name in crossing if name.startswith("dequantizelinear")]

    pairs, head = linear.layer_linears(graph), linear.head_node(graph)
    assert len(pairs) == 4 * layers and head is not None  # q_k_v, o_proj, gate_up, down_proj; the head
    linears = [segments.LinearStep(matmul.input[0], matmul.output[0], None) for _, matmul in pairs]
    steps = segments.in_graph_order(graph, [*segments.attention_steps(cuts, None), *linears,
                                            segments.LinearStep(head.input[0], "logits", None)])
    pieces = segments.cut(graph, steps)
    assert len(pieces) == len(steps) + 1 == 5 * layers + 2
    kinds = {n.op_type for piece in pieces for n in piece.graph.node}
    assert not kinds & {"MatMul", "MatMulNBits", "DequantizeLinear", "Softmax", "RotaryEmbedding"}
    assert not [t.name for piece in pieces for t in piece.graph.initializer if "qweight" in t.name]
    assert sum(not piece.graph.node for piece in pieces) >= layers + 1  # after each attention; after the head
    with pytest.raises(ValueError, match="made after it; cannot cut here"):
        segments.cut(graph, steps[::-1])


def _linear_alone(pkg, graph, step: segments.LinearStep):
    """An ONNX Runtime session of the graph's own nodes for one linear step, at accuracy level 4
    (its DequantizeLinear -> MatMul, which ONNX Runtime fuses as in the graph, or the MatMulNBits
    head): the oracle for what the kernel computed in that step, from the same input."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    producer = {o: n for n in graph.graph.node for o in n.output}
    inits = {t.name: t for t in graph.graph.initializer}
    nodes, pending = [], [producer[step.y]]
    while pending:  # back from y to x through the nodes that read only weights and x
        node = pending.pop()
        nodes.insert(0, node)
        pending += [producer[i] for i in node.input if i and i != step.x and i not in inits]
    weights = [numpy_helper.from_array(numpy_helper.to_array(inits[i], base_dir=str(pkg)), i)
               for n in nodes for i in n.input if i in inits]
    for node in nodes:
        for a in node.attribute:
            if a.name == "accuracy_level":
                a.i = 4
    model = helper.make_model(
        helper.make_graph(nodes, "linear", [helper.make_tensor_value_info(step.x, TensorProto.FLOAT, None)],
                          [helper.make_tensor_value_info(step.y, TensorProto.FLOAT, None)], weights),
        opset_imports=list(graph.opset_import))
    options = ort.SessionOptions()
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "4")
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("head", ["int4", "int8"])
def test_the_linear_kernel_runs_the_quantized_linears(tiny_checkpoints, build_package, monkeypatch, caplog, head):
    """At accuracy level 4 every INT4 linear of the layers and the MatMulNBits head leave the
    pieces and the linear kernel runs them, the head making the logits. Over a prefill and 20
    teacher-forced steps, every call is held to the graph's own nodes for that linear, run by ONNX
    Runtime on the same input (the same int8 products: apart by float32 summation order). End to
    end, against the same cut graph with MatMulNBits in its pieces, the paths are apart by more
    than summation order: each quantizes its activations to int8, and where the two float32 sums
    of a value differ in the last bit, its int8 rounding can flip (one step of its block's scale).
    Measured: the INT4 head's logits up to 1.3e-2 of the largest, from step 5 on, where a flip
    first happens, and the same top-1 token at 20 of 21 steps (the other: the graph's two best
    logits 5e-3 of the largest apart); the INT8 head's 4e-7, no flip. Bounded at 5e-2 and 95 % of
    the steps (a linear wired to a wrong tensor moves them by their whole size)."""
    import logging

    import onnx

    pkg = build_package(tiny_checkpoints["mm_tied"], "int4", block_size=32, head=head)
    with caplog.at_level(logging.INFO, logger="edge_sdk"):
        by_kernel = edge_sdk.load(pkg, kv_cache="float32")
    layers = by_kernel.manifest.model.text.num_layers
    assert f"the linear kernel runs {4 * layers} INT4 linears and the INT{head[-1]} head" in caplog.text
    decoder = by_kernel.backend.segmented
    linears = [step for step in decoder.steps if isinstance(step, segments.LinearStep)]
    assert len(linears) == 4 * layers + 1 and linears[-1].y == "logits"
    assert linears[-1].kernel.rows == by_kernel.manifest.model.text.vocab_size
    sessions = [segment.session for segment in decoder.segments if segment is not None]
    assert not [o for session in sessions for o in session.get_outputs() if o.name == "logits"]

    calls = []  # (step, x, y) of every kernel call, prefill and bound decode steps alike
    run, bind = segments.LinearStep.run, segments.LinearStep.bind

    def recorded_run(self, values, *args):
        run(self, values, *args)
        calls.append((self, values[self.x].copy(), values[self.y].copy()))

    def recorded_bind(self, arrays, caches):
        call = bind(self, arrays, caches)

        def recorded(length):
            call(length)
            calls.append((self, arrays[self.x].copy(), arrays[self.y].copy()))
        return recorded
    monkeypatch.setattr(segments.LinearStep, "run", recorded_run)
    monkeypatch.setattr(segments.LinearStep, "bind", recorded_bind)
    ids = np.array([1, 3, 1091, 1500, 2041, 1201, 3333] + [1000 + 37 * i for i in range(20)])
    got = _teacher_forced(by_kernel.backend, ids, prefill=7)
    assert len(calls) == len(linears) * 21
    graph = onnx.load(str(pkg / "decoder.cpu.onnx"), load_external_data=False)
    oracles = {step.y: _linear_alone(pkg, graph, step) for step in linears}
    for step, x, y in calls:
        want = oracles[step.y].run(None, {step.x: x})[0]
        np.testing.assert_allclose(y, want, atol=1e-5 * np.abs(want).max(), rtol=0, err_msg=step.y)

    monkeypatch.setattr(linear, "available", lambda library: False)
    by_graph = edge_sdk.load(pkg, kv_cache="float32")
    assert not [step for step in by_graph.backend.segmented.steps if isinstance(step, segments.LinearStep)]
    want = _teacher_forced(by_graph.backend, ids, prefill=7)
    assert (np.abs(got - want).max(axis=-1) / np.abs(want).max(axis=-1)).max() < 5e-2
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.95


def test_a_cpu_graph_without_attention_cuts_runs_whole(tiny_checkpoints, build_package, tmp_path, caplog):
    """A package from before the attention kernel (no cuts in its CPU graph) still runs its CPU
    graph, whole, and the log says to rebuild."""
    import shutil

    import onnx

    pkg = tmp_path / "pkg"
    shutil.copytree(build_package(tiny_checkpoints["mm_tied"], "none"), pkg)
    graph = onnx.load(str(pkg / "decoder.cpu.onnx"), load_external_data=False)
    kept = [p for p in graph.metadata_props if p.key != segments.ATTENTION_CUTS_KEY]
    del graph.metadata_props[:]
    graph.metadata_props.extend(kept)
    onnx.save_model(graph, str(pkg / "decoder.cpu.onnx"))
    with caplog.at_level("WARNING"):
        model = edge_sdk.load(pkg, verify=False)
    assert model.backend.in_place and model.backend.segmented is None
    assert "from before the attention kernel" in caplog.text
    assert len(model.generate([1, 3, 1091, 1500], max_tokens=4, stop_token_ids=()).tokens) == 4


def test_a_prefill_lets_go_of_each_tensor_after_its_last_reader(tiny_checkpoints, build_package, monkeypatch):
    """A step of several tokens holds only what a later piece or kernel step still reads: when each
    kernel step runs, every tensor still held is read by it or after it (held to the end, a
    prompt's activations grow with the depth and the prompt: ~0.2 GB at 6 layers of 3B, 128
    tokens). The logits are the same as ever (the tests above)."""
    model = edge_sdk.load(build_package(tiny_checkpoints["mm_tied"], "int4", block_size=32), kv_cache="float32")
    decoder = model.backend.segmented
    stages = [[*(segment.inputs if segment else ()), *(decoder.steps[i].inputs if i < len(decoder.steps) else ())]
              for i, segment in enumerate(decoder.segments)]  # piece i's reads, then step i's
    read_from = [{"position_ids", *decoder.steps[k].inputs, *(n for stage in stages[k + 1:] for n in stage)}
                 for k in range(len(decoder.steps))]  # position_ids: the step's argument, held by its caller
    held = []
    for kind in (segments.AttentionStep, segments.LinearStep):
        def run(self, values, *args, original=kind.run):
            held.append(set(values))
            original(self, values, *args)
        monkeypatch.setattr(kind, "run", run)
    backend = model.backend
    backend.forward(backend.embed(np.arange(1, 20)), np.arange(19), backend.new_cache())
    assert len(held) == len(decoder.steps) > 2
    for k, names in enumerate(held):
        assert names <= read_from[k], f"step {k} ({type(decoder.steps[k]).__name__}) ran holding {names - read_from[k]}"


def test_a_step_interrupted_by_another_sequence_keeps_its_own(tiny_checkpoints, build_package):
    """The daemon's worker and an in-process caller may generate on one model at once, and a step
    can be interrupted anywhere (ONNX Runtime and the kernel let go of the GIL). Made to happen at
    the worst place: inside sequence A's first attention, a whole step of sequence B runs. A's
    logits are still its own: each sequence's bindings live with its cache."""
    model = edge_sdk.load(build_package(tiny_checkpoints["mm_tied"], "int4", block_size=32), kv_cache="float32")
    backend = model.backend

    def primed(prompt):  # a cache after the prompt and one decode step (which makes the bindings)
        cache = backend.new_cache()
        _, cache = backend.forward(backend.embed(np.array(prompt)), np.arange(len(prompt)), cache)
        _, cache = backend.forward(backend.embed(np.array([7])), np.array([len(prompt)]), cache)
        return cache

    a_prompt, b_prompt = [1, 3, 1091, 1500, 2041], [1, 3, 1201, 3333, 1044, 4, 1600]
    want, _ = backend.forward(backend.embed(np.array([11])), np.array([6]), primed(a_prompt))
    a, b = primed(a_prompt), primed(b_prompt)
    first = next(i for i, step in enumerate(backend.segmented.steps) if isinstance(step, segments.AttentionStep))
    first_attention, interrupted = a.decode_io.calls[first], []

    def interrupting(length):
        if not interrupted:
            interrupted.append(True)
            backend.forward(backend.embed(np.array([13])), np.array([8]), b)
        first_attention(length)

    a.decode_io.calls[first] = interrupting
    got, _ = backend.forward(backend.embed(np.array([11])), np.array([6]), a)
    assert interrupted and b.length == 9
    np.testing.assert_array_equal(got, want)
