"""The CPU graph cut at each kernel step: ONNX Runtime runs the graph between steps (norms, the
splits of packed projections, the MLP's activation) as one session per piece, and edge_sdk's
kernels run the steps: each layer's attention (runtime/attention.py, over KV buffers this backend
owns) and, where the linear kernel runs them (runtime/linear.py), the quantized linears: the
layers' INT4 projections and the head.

Why cut rather than run the whole graph: the graph's attention is ~20 small nodes per layer,
whose matrix products pack the cache before reading it, at a fraction of the memory bandwidth
at long contexts; the kernel reads each cached row once per step. ONNX Runtime's MatMulNBits
reads INT4 weights below the bandwidth too. The cut is made at load from `decoder.cpu.onnx` (its
`edge_sdk.attention_cuts` metadata names each layer's q, k, v before RoPE and its attention
output; a linear is cut at its input and output), so the package keeps one CPU graph, which
still runs whole where no kernel is installed, and which the tests hold this path to.

Steps run in graph order; piece j runs after step j - 1 (from the embeddings for j = 0) and makes
what step j reads (the logits, for the last piece, unless a step made them); the tensors it needs
from earlier pieces or steps (the residual stream, position_ids) are its inputs too. A piece with
nothing to do (an attention's output is its o_proj's input) has no session.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .attention import AttentionKernel, LayerCache, RopeTables
from .io_binding import bind_arrays
from .linear import LinearKernel

ATTENTION_CUTS_KEY = "edge_sdk.attention_cuts"


@dataclass
class Segment:
    session: object
    inputs: list[str]
    outputs: list[str]


@dataclass(frozen=True)
class AttentionStep:
    """Layer ``layer``'s attention: q, k, v [.., S, width] before RoPE -> ``out`` [1, S, heads * D]."""

    layer: int
    q: str
    k: str
    v: str
    out: str
    kernel: AttentionKernel

    @property
    def inputs(self) -> tuple[str, ...]:
        return self.q, self.k, self.v

    @property
    def outputs(self) -> tuple[str, ...]:
        return (self.out,)

    def run(self, values: dict, positions: np.ndarray, caches: list[LayerCache], length: int) -> None:
        q, k, v = (np.ascontiguousarray(values[n][0], dtype=np.float32) for n in self.inputs)
        out = np.empty_like(q)
        self.kernel(q, k, v, positions, caches[self.layer], length, out)
        values[self.out] = out[None]

    def bind(self, arrays: dict, caches: list[LayerCache]):
        return self.kernel.bind(*(arrays[n][0] for n in self.inputs), arrays["position_ids"][0],
                                caches[self.layer], arrays[self.out][0])


@dataclass(frozen=True)
class LinearStep:
    """A quantized linear: x [.., cols] -> y [.., rows] (the head's y: the logits)."""

    x: str
    y: str
    kernel: LinearKernel

    @property
    def inputs(self) -> tuple[str, ...]:
        return (self.x,)

    @property
    def outputs(self) -> tuple[str, ...]:
        return (self.y,)

    def run(self, values: dict, positions: np.ndarray, caches: list[LayerCache], length: int) -> None:
        x = np.ascontiguousarray(values[self.x], dtype=np.float32)
        y = np.empty((*x.shape[:-1], self.kernel.rows), np.float32)
        self.kernel(x, y)
        values[self.y] = y

    def bind(self, arrays: dict, caches: list[LayerCache]):
        run = self.kernel.bind(arrays[self.x], arrays[self.y])

        def call(length: int) -> None:
            run()
        call.arrays = run.arrays
        return call


def attention_cuts(model) -> dict | None:
    """The CPU graph's attention cuts: {"layers": [{q, k, v, out, past_key, past_value}],
    "rope": [q_cos, q_sin, cos, sin]}; None for a graph from before them."""
    props = {p.key: p.value for p in model.metadata_props}
    return json.loads(props[ATTENTION_CUTS_KEY]) if ATTENTION_CUTS_KEY in props else None


def rope_tables(model, cuts: dict, cpu_graph: Path) -> RopeTables:
    """The RoPE tables the CPU graph's RotaryEmbedding nodes read (stored inline in the graph)."""
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    arrays = [np.ascontiguousarray(numpy_helper.to_array(inits[name], base_dir=str(cpu_graph.parent)),
                                   dtype=np.float32) for name in cuts["rope"]]
    return RopeTables(*arrays)


def attention_steps(cuts: dict, kernel: AttentionKernel | None) -> list[AttentionStep]:
    return [AttentionStep(i, layer["q"], layer["k"], layer["v"], layer["out"], kernel)
            for i, layer in enumerate(cuts["layers"])]


def in_graph_order(model, steps: list) -> list:
    """``steps`` in the order the graph computes them: by where the graph makes their output."""
    made_at = {o: i for i, node in enumerate(model.graph.node) for o in node.output}
    return sorted(steps, key=lambda step: made_at[step.outputs[0]])


def cut(model, steps: list) -> list:
    """The pieces around ``steps`` (in graph order) as ModelProtos, weights still external:
    len(steps) + 1, piece j before step j, the last making the logits; a piece with nothing to do
    has no nodes. The steps' own nodes (a linear's MatMul and the DequantizeLinear of its weight,
    an attention's ~20) and their weights drop out."""
    g = model.graph
    made_by_step = {o: i + 1 for i, step in enumerate(steps) for o in step.outputs}  # -> the piece after
    news = {o.name for o in g.output if o.name.startswith(("new_key", "new_value"))}
    wanted = [name for step in steps for name in step.inputs]
    if "logits" not in made_by_step:
        wanted.append("logits")
    nodes = _live_nodes(g, wanted, set(made_by_step) | news)
    constant = _weight_only(g, nodes)
    node_segment = _segment_of_nodes(nodes, steps, made_by_step, constant)
    last_reader: dict[str, float] = {}  # tensor -> the last piece that reads it (step j: j + 0.5)
    for node in nodes:
        if id(node) in node_segment:
            for name in node.input:
                last_reader[name] = max(last_reader.get(name, 0), node_segment[id(node)])
    for i, step in enumerate(steps):
        for name in step.inputs:
            last_reader[name] = max(last_reader.get(name, 0), i + 0.5)
    made_in = {o: node_segment[id(n)] for n in nodes if id(n) in node_segment for o in n.output}
    types = _element_types(model)
    pieces = []
    for seg in range(len(steps) + 1):
        reads = steps[seg].inputs if seg < len(steps) else ["logits"]
        ends = [name for name in reads if made_in.get(name) == seg]
        pieces.append(_piece(model, nodes, seg, node_segment, constant, last_reader, ends, types))
    return pieces


def _element_types(model) -> dict[str, int]:
    """name -> element type of every tensor ONNX's shape inference types; the rest (what contrib
    ops make: the residual stream, q, k, v) are the graph's activations, float32, as is the
    attention output the kernel writes."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model).graph
    return {v.name: v.type.tensor_type.elem_type for v in [*inferred.value_info, *inferred.output]
            if v.type.tensor_type.elem_type}


def _live_nodes(g, wanted: list[str], stops: set[str]) -> list:
    """The nodes ``wanted`` needs, walking back from it and stopping at ``stops`` (the attention
    outputs, which the kernel makes): the graph's attention blocks drop out. In graph order,
    which is topological."""
    producer = {o: n for n in g.node for o in n.output}
    seen, live, stack = set(), set(), list(wanted)
    while stack:
        name = stack.pop()
        if name in seen or name in stops:
            continue
        seen.add(name)
        node = producer.get(name)
        if node is not None:
            live.add(id(node))
            stack.extend(node.input)
    return [n for n in g.node if id(n) in live]


def _weight_only(g, nodes: list) -> set[str]:
    """Initializers and the tensors computed from them alone (an INT4 weight's DequantizeLinear)."""
    constant = {t.name for t in g.initializer}
    for node in nodes:
        if all(name in constant for name in node.input if name):
            constant.update(node.output)
    return constant


def _segment_of_nodes(nodes: list, steps: list, made_by_step: dict[str, int],
                      constant: set[str]) -> dict[int, int]:
    """id(node) -> piece, for the nodes that read activations: the piece after the latest step
    they depend on. (Weight-only nodes go with whichever piece reads them.) Refuses steps that
    read what is made after them."""
    segment_of = dict(made_by_step)
    node_segment = {}
    for node in nodes:
        if node.output[0] in constant:
            continue
        seg = max((segment_of.get(n, 0) for n in node.input if n and n not in constant), default=0)
        node_segment[id(node)] = seg
        segment_of.update({o: seg for o in node.output if o})
    for i, step in enumerate(steps):
        late = [name for name in step.inputs if segment_of.get(name, 0) > i]
        if late:
            raise ValueError(f"step {i} ({', '.join(step.outputs)}) reads {', '.join(late)}, made after it; "
                             "cannot cut here")
    return node_segment


def _piece(model, nodes: list, seg: int, node_segment: dict[int, int], constant: set[str],
           last_reader: dict[str, int], ends: list[str], types: dict[str, int]):
    """Segment ``seg`` as a model: its nodes, the weight-only nodes they read, and as outputs
    ``ends`` and whatever later segments read of what it makes."""
    import onnx
    from onnx import helper

    g = model.graph
    producer = {o: n for n in nodes for o in n.output}
    members = {id(n) for n in nodes if node_segment.get(id(n)) == seg}
    stack = [name for n in nodes if id(n) in members for name in n.input if name in constant]
    while stack:
        node = producer.get(stack.pop())
        if node is not None and id(node) not in members:
            members.add(id(node))
            stack.extend(name for name in node.input if name in constant)
    own = [n for n in nodes if id(n) in members]
    made = list(dict.fromkeys(o for n in own for o in n.output if o))
    reads = list(dict.fromkeys(name for n in own for name in n.input if name and name not in made))
    inits = {t.name: t for t in g.initializer}
    graph_inputs = {i.name: i for i in g.input}
    outputs = [name for name in made if name not in constant and last_reader.get(name, -1) > seg]

    def declared(name: str):
        if name in graph_inputs:
            return graph_inputs[name]
        return helper.make_tensor_value_info(name, types.get(name, onnx.TensorProto.FLOAT), None)

    graph = helper.make_graph(own, f"segment_{seg}", [declared(n) for n in reads if n not in inits],
                              [declared(n) for n in dict.fromkeys(outputs + ends)],
                              [inits[n] for n in reads if n in inits])
    return helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)


@dataclass
class DecodeBindings:
    """A one-token step's tensors as NumPy arrays, bound once to an IO binding per piece, and each
    kernel step's call bound once over them (and, for attention, the sequence's cache): a decode
    step then copies its embedding and position in and its logits out, with no feeds, output
    allocations, conversions or argument checks per piece; the kernels read their inputs from
    and write their outputs into the same arrays."""

    bindings: list  # per piece: its IO binding, or None for a piece with nothing to do
    arrays: dict[str, np.ndarray]
    values: list  # the OrtValues over those arrays, kept alive with them (per piece)
    calls: list  # per step: the kernel bound to this step's arrays, f(cached length)


class SegmentedDecoder:
    """One step of the decoder: the pieces' sessions with the kernel steps between them."""

    def __init__(self, segments: list[Segment | None], steps: list):
        self.segments, self.steps = segments, steps
        # What a step of several tokens may let go after each stage (piece i: stage 2i, step i:
        # 2i + 1): the tensors no later stage reads. Kept to the end, a 128-token prefill's
        # activations were ~0.2 GB at 6 layers, and grow with depth and the prompt.
        last_read: dict[str, int] = {}
        for i, segment in enumerate(segments):
            for name in segment.inputs if segment is not None else ():
                last_read[name] = 2 * i
            for name in steps[i].inputs if i < len(steps) else ():
                last_read[name] = 2 * i + 1
        self.released = [[] for _ in range(2 * len(segments))]
        for name, stage in last_read.items():
            self.released[stage].append(name)

    @classmethod
    def open(cls, graph, cuts: dict, kernel: AttentionKernel, make_session,
             linears: list[LinearStep] = ()) -> SegmentedDecoder:
        """Cut ``graph`` around its attentions and ``linears`` and open a session per piece that
        has nodes (``make_session(model)``), the last piece first: where it holds the head,
        prepacking the head's weights briefly holds them twice, and that peak then sits on the
        smallest baseline (measured: 1.22 GB peak the other way, 1.11 this way)."""
        steps = in_graph_order(graph, [*attention_steps(cuts, kernel), *linears])
        pieces = cut(graph, steps)
        order = [len(pieces) - 1, *range(len(pieces) - 1)]
        sessions = {i: make_session(pieces[i]) for i in order if len(pieces[i].graph.node)}
        segments = [Segment(sessions[i], [v.name for v in piece.graph.input], [v.name for v in piece.graph.output])
                    if i in sessions else None for i, piece in enumerate(pieces)]
        return cls(segments, steps)

    @property
    def attention_layers(self) -> int:
        return sum(isinstance(step, AttentionStep) for step in self.steps)

    def step(self, embeds: np.ndarray, position_ids: np.ndarray, caches: list[LayerCache], length: int,
             bindings: DecodeBindings | None) -> tuple[np.ndarray, DecodeBindings | None]:
        """(logits [vocab], bindings) for ``embeds`` [S, H] at ``position_ids`` [S], with
        ``length`` tokens already in ``caches`` (one per layer); this step's keys and values are
        written into them. ``bindings``: one sequence's (the caller keeps them with its caches:
        generations on other threads have their own), made by its first one-token step and used
        by the next ones."""
        positions = np.ascontiguousarray(position_ids, dtype=np.int64).reshape(-1)
        if len(positions) == 1 and bindings is not None:
            return self._decode_step(embeds, positions, length, bindings), bindings
        values = {"inputs_embeds": embeds.reshape(1, *embeds.shape), "position_ids": positions.reshape(1, -1)}
        binds = len(positions) == 1  # a one-token step's tensors, all of them, become the decode bindings

        def let_go(stage: int) -> None:
            for name in () if binds else self.released[stage]:
                del values[name]
        for i, segment in enumerate(self.segments):
            if segment is not None:
                outs = segment.session.run(segment.outputs, {name: values[name] for name in segment.inputs})
                values.update(zip(segment.outputs, outs))
            let_go(2 * i)
            if i < len(self.steps):
                self.steps[i].run(values, positions, caches, length)
                let_go(2 * i + 1)
        return values["logits"][0], self._bind(values, caches) if binds else bindings

    def _decode_step(self, embeds, positions, length, io: DecodeBindings) -> np.ndarray:
        io.arrays["inputs_embeds"][...] = embeds
        io.arrays["position_ids"][...] = positions
        for i, (segment, binding) in enumerate(zip(self.segments, io.bindings)):
            if binding is not None:
                segment.session.run_with_iobinding(binding)
            if i < len(self.steps):
                io.calls[i](length)
        return io.arrays["logits"][0].copy()

    def _bind(self, values: dict[str, np.ndarray], caches: list[LayerCache]) -> DecodeBindings:
        """Bindings over copies of one one-token step's tensors (their shapes are every one's); a
        piece's or step's output array is the next ones' input array, so nothing is copied between
        them."""
        arrays = {name: np.array(value, order="C") for name, value in values.items()}
        bound = [bind_arrays(segment.session, {n: arrays[n] for n in segment.inputs},
                             {n: arrays[n] for n in segment.outputs}) if segment else (None, None)
                 for segment in self.segments]
        calls = [step.bind(arrays, caches) for step in self.steps]
        return DecodeBindings([binding for binding, _ in bound], arrays, [values for _, values in bound], calls)
