"""The CPU graph cut at each layer's attention: ONNX Runtime runs the graph between attentions
(norms, projections, MLP, head) as one session per segment, and the attention kernel
(runtime/attention.py) runs each layer's attention over KV buffers this backend owns.

Why cut rather than run the whole graph: the graph's attention is ~20 small nodes per layer,
whose matrix products pack the cache before reading it, at a fraction of the memory bandwidth
at long contexts; the kernel reads each cached row once per step. The cut is made at load from
`decoder.cpu.onnx` (its `edge_sdk.attention_cuts` metadata names each layer's q, k, v before
RoPE and its attention output), so the package keeps one CPU graph, which still runs whole where
no kernel is installed, and which the tests hold this path to.

Segment j runs from layer j - 1's attention output (the embeddings for j = 0) to layer j's q, k
and v (the logits for the last); the tensors it needs from earlier segments (the residual
stream, position_ids) are its inputs too. Where the linear kernel runs the quantized head
(runtime/linear.py), the last segment ends at the head's input instead and the kernel makes the
logits from it.
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
class Head:
    """The LM head run by the linear kernel: ``input`` is the tensor it reads (the final norm's
    output for the last token, [1, hidden]), where the cut graph then ends."""

    input: str
    kernel: LinearKernel


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


def cut(model, cuts: dict, head_input: str | None = None) -> list:
    """The segment graphs (ModelProtos, weights still external), in order: len(layers) + 1; the
    last ends at ``head_input`` where given (the head's nodes and weights drop out), else at the
    logits."""
    layers, g = cuts["layers"], model.graph
    last = head_input or "logits"
    attention_outs = {layer["out"] for layer in layers}
    news = {o.name for o in g.output if o.name.startswith(("new_key", "new_value"))}
    nodes = _live_nodes(g, [last, *(layer[k] for layer in layers for k in ("q", "k", "v"))],
                        attention_outs | news)
    constant = _weight_only(g, nodes)
    node_segment = _segment_of_nodes(nodes, layers, constant)
    last_reader: dict[str, int] = {}  # tensor -> the last segment that reads it
    for node in nodes:
        if id(node) in node_segment:
            for name in node.input:
                last_reader[name] = max(last_reader.get(name, 0), node_segment[id(node)])
    types = _element_types(model)
    pieces = []
    for seg in range(len(layers) + 1):
        ends = [layers[seg][k] for k in ("q", "k", "v")] if seg < len(layers) else [last]
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


def _segment_of_nodes(nodes: list, layers: list[dict], constant: set[str]) -> dict[int, int]:
    """id(node) -> segment, for the nodes that read activations: the segment after the latest
    attention they depend on. (Weight-only nodes go with whichever segment reads them.)"""
    segment_of = {layer["out"]: i + 1 for i, layer in enumerate(layers)}  # tensor -> segment
    node_segment = {}
    for node in nodes:
        if node.output[0] in constant:
            continue
        seg = max((segment_of.get(n, 0) for n in node.input if n and n not in constant), default=0)
        node_segment[id(node)] = seg
        segment_of.update({o: seg for o in node.output if o})
    for i, layer in enumerate(layers):
        if any(segment_of.get(layer[k]) != i for k in ("q", "k", "v")):
            raise ValueError(f"layer {i}'s q, k, v do not all follow layer {i - 1}'s attention; cannot cut here")
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
    """A one-token step's tensors as NumPy arrays, bound once to an IO binding per piece, and the
    kernel's call per layer bound once over them and the sequence's cache: a decode step then
    copies its embedding and position in and its logits out, with no feeds, output allocations,
    conversions or argument checks per piece; the kernel reads q, k, v from and writes its
    output into the same arrays."""

    bindings: list
    arrays: dict[str, np.ndarray]
    values: list  # the OrtValues over those arrays, kept alive with them (per piece)
    attention: list  # per layer: the kernel bound to this step's arrays and the layer's cache, f(length)
    head: object | None  # the linear kernel bound to the head's input and the logits, f(); None: a piece makes them


class SegmentedDecoder:
    """One step of the decoder: the segments' sessions with the attention kernel between them, and
    the linear kernel after them where it runs the head."""

    def __init__(self, segments: list[Segment], cuts: dict, kernel: AttentionKernel, head: Head | None = None):
        self.segments, self.layers, self.kernel, self.head = segments, cuts["layers"], kernel, head

    @classmethod
    def open(cls, graph, cuts: dict, kernel: AttentionKernel, make_session, head: Head | None = None) -> SegmentedDecoder:
        """Cut ``graph`` and open a session per piece (``make_session(model)``). The last piece
        first: where it holds the head, prepacking the head's weights briefly holds them twice, and
        that peak then sits on the smallest baseline (measured: 1.22 GB peak the other way, 1.11
        this way)."""
        pieces = cut(graph, cuts, head.input if head else None)
        sessions = {len(pieces) - 1: make_session(pieces[-1])}
        sessions.update({i: make_session(piece) for i, piece in enumerate(pieces[:-1])})
        segments = [Segment(sessions[i], [v.name for v in piece.graph.input], [v.name for v in piece.graph.output])
                    for i, piece in enumerate(pieces)]
        return cls(segments, cuts, kernel, head)

    def step(self, embeds: np.ndarray, position_ids: np.ndarray, caches: list[LayerCache], length: int,
             bindings: DecodeBindings | None) -> tuple[np.ndarray, DecodeBindings | None]:
        """(logits [S, vocab], bindings) for ``embeds`` [S, H] at ``position_ids`` [S], with
        ``length`` tokens already in ``caches`` (one per layer); this step's keys and values are
        written into them. ``bindings``: one sequence's (the caller keeps them with its caches:
        generations on other threads have their own), made by its first one-token step and used
        by the next ones."""
        positions = np.ascontiguousarray(position_ids, dtype=np.int64).reshape(-1)
        if len(positions) == 1 and bindings is not None:
            return self._decode_step(embeds, positions, length, bindings), bindings
        values = {"inputs_embeds": embeds.reshape(1, *embeds.shape), "position_ids": positions.reshape(1, -1)}
        for i, segment in enumerate(self.segments):
            outs = segment.session.run(segment.outputs, {name: values[name] for name in segment.inputs})
            values.update(zip(segment.outputs, outs))
            if i == len(self.layers):
                if self.head:
                    values["logits"] = np.empty((1, self.head.kernel.rows), np.float32)
                    self.head.kernel(np.ascontiguousarray(values[self.head.input], dtype=np.float32).reshape(-1),
                                     values["logits"][0])
                break
            layer = self.layers[i]
            q, k, v = (np.ascontiguousarray(values[layer[n]][0], dtype=np.float32) for n in ("q", "k", "v"))
            out = np.empty_like(q)
            self.kernel(q, k, v, positions, caches[i], length, out)
            values[layer["out"]] = out[None]
        return values["logits"][0], self._bind(values, caches) if len(positions) == 1 else bindings

    def _decode_step(self, embeds, positions, length, io: DecodeBindings) -> np.ndarray:
        io.arrays["inputs_embeds"][...] = embeds
        io.arrays["position_ids"][...] = positions
        for i, (segment, binding) in enumerate(zip(self.segments, io.bindings)):
            segment.session.run_with_iobinding(binding)
            if i == len(self.layers):
                if io.head:
                    io.head()
                return io.arrays["logits"][0].copy()
            io.attention[i](length)
        raise AssertionError("unreachable: the last piece makes the logits")

    def _bind(self, values: dict[str, np.ndarray], caches: list[LayerCache]) -> DecodeBindings:
        """Bindings over copies of one one-token step's tensors (their shapes are every one's); a
        piece's output array is the next pieces' input array, so nothing is copied between them."""
        arrays = {name: np.array(value, order="C") for name, value in values.items()}
        bound = [bind_arrays(segment.session, {n: arrays[n] for n in segment.inputs},
                             {n: arrays[n] for n in segment.outputs}) for segment in self.segments]
        attention = [self.kernel.bind(*(arrays[layer[n]][0] for n in ("q", "k", "v")), arrays["position_ids"][0],
                                      cache, arrays[layer["out"]][0]) for layer, cache in zip(self.layers, caches)]
        head = self.head and self.head.kernel.bind(arrays[self.head.input].reshape(-1), arrays["logits"].reshape(-1))
        return DecodeBindings([binding for binding, _ in bound], arrays, [values for _, values in bound], attention,
                              head)
