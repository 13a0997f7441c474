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
stream, position_ids) are its inputs too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .attention import AttentionKernel, RopeTables

ATTENTION_CUTS_KEY = "edge_sdk.attention_cuts"


@dataclass
class Segment:
    session: object
    inputs: list[str]
    outputs: list[str]


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


def cut(model, cuts: dict) -> list:
    """The segment graphs (ModelProtos, weights still external), in order: len(layers) + 1. An
    attention output is a float32 input (what the kernel writes); the types of the other inputs
    are what the segment before says (`with_input_types`)."""
    import onnx
    from onnx import helper

    layers = cuts["layers"]
    g = model.graph
    attention_ends = {layer["out"] for layer in layers}
    ends = attention_ends | {o.name for o in g.output if o.name.startswith(("new_key", "new_value"))}
    wanted = {"logits"} | {layer[k] for layer in layers for k in ("q", "k", "v")}
    # Keep what the logits and each layer's q, k, v need, computing back from them; an attention
    # output is where a walk stops (the kernel makes it), so the attention blocks drop out.
    producer = {o: n for n in g.node for o in n.output}
    needed, live, stack = set(), set(), list(wanted)
    while stack:
        name = stack.pop()
        if name in needed or name in ends:
            continue
        needed.add(name)
        node = producer.get(name)
        if node is not None and id(node) not in live:
            live.add(id(node))
            stack.extend(node.input)
    nodes = [n for n in g.node if id(n) in live]  # the graph is topologically sorted

    # A node computed from weights alone (an INT4 weight's DequantizeLinear, which ONNX Runtime
    # fuses into its MatMul) goes with the nodes that read it; every other node runs in the
    # segment of the latest attention it depends on.
    inits = {t.name: t for t in g.initializer}
    constant = set(inits)
    for node in nodes:
        if all(name in constant for name in node.input if name):
            constant.update(node.output)
    segment_of = {layer["out"]: i + 1 for i, layer in enumerate(layers)}  # tensor -> segment that makes it
    node_segment = {}
    for node in nodes:
        if node.output[0] in constant:
            continue
        node_segment[id(node)] = max((segment_of.get(n, 0) for n in node.input if n and n not in constant),
                                     default=0)
        segment_of.update({o: node_segment[id(node)] for o in node.output if o})
    for i, layer in enumerate(layers):
        if any(segment_of.get(layer[k]) != i for k in ("q", "k", "v")):
            raise ValueError(f"layer {i}'s q, k, v do not all follow layer {i - 1}'s attention; cannot cut here")

    graph_inputs = {i.name: i for i in g.input}
    last_reader: dict[str, int] = {}
    for node in nodes:
        for name in node.input:
            if id(node) in node_segment:
                last_reader[name] = max(last_reader.get(name, 0), node_segment[id(node)])
    models = []
    for seg in range(len(layers) + 1):
        members = {id(n) for n in nodes if node_segment.get(id(n)) == seg}
        stack = [name for n in nodes if id(n) in members for name in n.input if name in constant]
        while stack:  # the weight-only nodes these read
            node = producer.get(stack.pop())
            if node is not None and id(node) not in members:
                members.add(id(node))
                stack.extend(name for name in node.input if name in constant)
        own = [n for n in nodes if id(n) in members]
        made = list(dict.fromkeys(o for n in own for o in n.output if o))
        reads = list(dict.fromkeys(name for n in own for name in n.input if name and name not in made))
        inputs = [name for name in reads if name not in inits]
        outputs = [name for name in made if name not in constant and last_reader.get(name, -1) > seg]
        outputs += [layers[seg][k] for k in ("q", "k", "v")] if seg < len(layers) else ["logits"]
        outputs = list(dict.fromkeys(outputs))
        graph = helper.make_graph(
            own, f"segment_{seg}",
            [graph_inputs[name] if name in graph_inputs
             else helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None) if name in attention_ends
             else helper.make_value_info(name, onnx.TypeProto()) for name in inputs],
            [helper.make_value_info(name, onnx.TypeProto()) for name in outputs],
            [inits[name] for name in reads if name in inits])
        segment = helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)
        models.append(segment)
    return models


def with_input_types(model, known: dict) -> None:
    """Give ``model``'s untyped inputs the types ``known`` (name -> TypeProto) has for them: what
    an earlier segment's session says it outputs."""
    for value in model.graph.input:
        if not value.type.HasField("tensor_type") and value.name in known:
            value.type.CopyFrom(known[value.name])


_TENSOR_TYPES = {"tensor(float)": 1, "tensor(int64)": 7, "tensor(int32)": 6, "tensor(bool)": 9, "tensor(float16)": 10}


def output_types(session) -> dict:
    """name -> TypeProto of each output of ``session`` (element type only; shapes stay free)."""
    from onnx import helper

    return {o.name: helper.make_tensor_type_proto(_TENSOR_TYPES[o.type], None) for o in session.get_outputs()}


class SegmentedDecoder:
    """One step of the decoder: the segments' sessions with the attention kernel between them."""

    def __init__(self, segments: list[Segment], cuts: dict, kernel: AttentionKernel):
        self.segments, self.layers, self.kernel = segments, cuts["layers"], kernel

    def step(self, embeds: np.ndarray, position_ids: np.ndarray, arrays: dict[str, np.ndarray],
             length: int) -> np.ndarray:
        """Logits [S, vocab] for ``embeds`` [S, H] at ``position_ids`` [S], with ``length`` tokens
        already in the buffers ``arrays`` ([1, KV, capacity, D] each); this step's keys and
        values are written into them."""
        positions = np.ascontiguousarray(position_ids, dtype=np.int64).reshape(-1)
        values = {"inputs_embeds": embeds.reshape(1, *embeds.shape), "position_ids": positions.reshape(1, -1)}
        for i, segment in enumerate(self.segments):
            outs = segment.session.run(segment.outputs, {name: values[name] for name in segment.inputs})
            values.update(zip(segment.outputs, outs))
            if i == len(self.layers):
                return values["logits"][0]
            layer = self.layers[i]
            q, k, v = (np.ascontiguousarray(values[layer[n]][0], dtype=np.float32) for n in ("q", "k", "v"))
            out = np.empty_like(q)
            self.kernel(q, k, v, positions, arrays[layer["past_key"]][0], arrays[layer["past_value"]][0], length, out)
            values[layer["out"]] = out[None]
        raise AssertionError("unreachable: the last segment returns the logits")
