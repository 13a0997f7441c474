"""What the graph rewrites (plugin_graph.py for TensorRT, cpu_graph.py for ONNX Runtime) share:
an editable graph, the exporter's attention seams, swapping the per-layer cache I/O, saving.

A rewrite loads decoder.onnx without its weights, replaces nodes, and saves a graph beside it
whose initializers point into the same decoder.onnx.data: no weight is copied.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import onnx
from onnx import TensorProto, helper

from .decoder import ATTENTION_SEAMS_KEY


class RewriteError(ValueError):
    """The graph is not what the exporter writes; the message names the file and the node."""


class Graph:
    """Nodes indexed by what they produce and consume, edited in place."""

    def __init__(self, model: onnx.ModelProto, path: Path):
        self.model, self.g, self.path = model, model.graph, path
        self.inits = {t.name: t for t in self.g.initializer}
        self.producer = {out: n for n in self.g.node for out in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for n in self.g.node:
            for name in n.input:
                self.consumers[name].append(n)
        self._count = 0

    def fresh(self, hint: str) -> str:
        self._count += 1
        return f"rw_{hint}_{self._count}"

    def add(self, op_type: str, inputs: list[str], outputs: list[str], domain: str = "", **attrs) -> onnx.NodeProto:
        node = helper.make_node(op_type, inputs, outputs, name=self.fresh(op_type.lower()), domain=domain, **attrs)
        self.g.node.append(node)
        return node

    def const(self, values, data_type=TensorProto.INT64) -> str:
        name = self.fresh("const")
        self.g.initializer.append(helper.make_tensor(name, data_type, [len(values)], values))
        return name

    def remove_dead(self) -> None:
        """Drop nodes, initializers and inputs no graph output depends on."""
        needed = {o.name for o in self.g.output}
        live = []
        for node in reversed(list(self.g.node)):  # in topological order
            if any(o in needed for o in node.output):
                live.append(node)
                needed.update(node.input)
        del self.g.node[:]
        self.g.node.extend(reversed(live))
        keep = [t for t in self.g.initializer if t.name in needed]
        del self.g.initializer[:]
        self.g.initializer.extend(keep)
        inputs = [i for i in self.g.input if i.name in needed]
        del self.g.input[:]
        self.g.input.extend(inputs)


    def replace_cache_io(self, seams: list[dict[str, str]], inputs: list, outputs: list) -> None:
        """Drop the standard past_*/present_* graph I/O of every layer; add ``inputs``/``outputs``."""
        old = {seam[k] for seam in seams for k in ("past_key", "past_value", "present_key", "present_value")}
        for field, new in ((self.g.input, inputs), (self.g.output, outputs)):
            kept = [v for v in field if v.name not in old]
            del field[:]
            field.extend(kept + list(new))


def byte_view(init: TensorProto, data_type: int, dims: list[int]) -> TensorProto:
    """``init`` read as another type and shape over the same bytes (external or inline), e.g. an
    INT4 weight as the int8 or uint8 array a plugin or contrib op takes."""
    view = TensorProto(name=f"{init.name}.{TensorProto.DataType.Name(data_type).lower()}", data_type=data_type,
                       dims=dims)
    if init.data_location == TensorProto.EXTERNAL:
        view.data_location = TensorProto.EXTERNAL
        view.external_data.extend(init.external_data)
    else:
        view.raw_data = init.raw_data
    return view


def load_decoder(decoder_path: Path) -> tuple[onnx.ModelProto, dict[str, str], dict]:
    """decoder.onnx without its weights, its metadata, and the attention seams it records."""
    model = onnx.load(str(decoder_path), load_external_data=False)
    props = {p.key: p.value for p in model.metadata_props}
    if ATTENTION_SEAMS_KEY not in props:
        raise RewriteError(f"{decoder_path}: no {ATTENTION_SEAMS_KEY} metadata; re-export it with this edge_sdk")
    return model, props, json.loads(props[ATTENTION_SEAMS_KEY])


def shared_rope(graph: Graph, seams: list[dict[str, str]]) -> dict[str, str]:
    """The RoPE tables every layer reads (the exporter computes them once)."""
    first = {k: seams[0][k] for k in ("cos", "sin", "q_scale")}
    if any({k: s[k] for k in first} != first for s in seams):
        raise RewriteError(f"{graph.path}: layers do not share one set of RoPE tables")
    return first


def expanded_q_scale(graph: Graph, seam: dict[str, str]) -> str:
    """The query scale (a scalar or [B, 1, S, 1]) broadcast to [B, 1, S, 1]."""
    positions, shape, full = graph.fresh("positions4"), graph.fresh("shape"), graph.fresh("q_scale4")
    graph.add("Unsqueeze", ["position_ids", graph.const([1, 3])], [positions])  # [B, 1, S, 1]
    graph.add("Shape", [positions], [shape])
    graph.add("Expand", [seam["q_scale"], shape], [full])
    return full


def save_rewritten(graph: Graph, props: dict[str, str], out_path: Path, extra_opsets: list, summary: dict) -> Path:
    """Sort, prune, tag and write the rewritten graph; checked by onnx.checker."""
    model = graph.model
    topological(model.graph)
    graph.remove_dead()
    model.opset_import.extend(extra_opsets)
    del model.metadata_props[:]
    helper.set_model_props(model, {**{k: v for k, v in props.items() if k != ATTENTION_SEAMS_KEY},
                                   "edge_sdk.rewrite": json.dumps(summary)})
    onnx.save_model(model, str(out_path))
    onnx.checker.check_model(str(out_path))
    return out_path


def beside(decoder_path: Path, out_path: Path) -> Path:
    if out_path.parent.resolve() != decoder_path.parent.resolve():
        raise RewriteError(f"{out_path}: a rewritten graph must sit beside {decoder_path} (it shares its weights file)")
    return out_path


def topological(g: onnx.GraphProto) -> None:
    """Reorder nodes so each comes after what it reads (new nodes were appended at the end)."""
    producer = {o: i for i, n in enumerate(g.node) for o in n.output}
    order, state = [], [0] * len(g.node)  # 0 new, 1 on the stack, 2 placed
    for root in range(len(g.node)):
        stack = [(root, False)]
        while stack:
            i, expanded = stack.pop()
            if expanded:
                state[i] = 2
                order.append(g.node[i])
                continue
            if state[i] == 2:
                continue
            if state[i] == 1:
                raise RewriteError(f"graph {g.name}: a cycle through node {g.node[i].name or g.node[i].op_type}")
            state[i] = 1
            stack.append((i, True))
            stack.extend((producer[x], False) for x in g.node[i].input if x in producer and state[producer[x]] != 2)
    nodes = list(order)
    del g.node[:]
    g.node.extend(nodes)
