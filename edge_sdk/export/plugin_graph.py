"""The TensorRT plugin graph: the standard decoder.onnx with its INT4 linears and attention blocks
replaced by the plugin ops of plugins/ops.py.

One export, two graphs: ``decoder.onnx`` (basic ops; what ONNX Runtime runs and what is checked
against transformers) stays the fallback, and ``decoder.plugins.onnx`` is derived from it here:

- every ``MatMul(x, DequantizeLinear(int4 W^T, scales, axis=0, block_size))`` becomes one
  ``Int4GroupwiseGemm(x, qweight, scales)``. ``qweight`` is an int8 view of the same bytes in
  ``decoder.onnx.data`` (the exporter's W^T packing is the plugin's layout), so no weight is
  copied or rewritten, the head included when it is INT4;
- every attention block, cut along the seams the exporter recorded (q/k/v, RoPE tables, mask,
  past/present K/V, output), becomes one ``EdgeAttention`` over a preallocated cache
  ``kv_cache.{i}`` [B, 2, KV, cache_seq, D] that it updates in place; ``past_lengths`` [B] says
  where the new tokens go. The concat-per-step caches and the mask go away.

FP8 linears keep TensorRT's native Q/DQ (fast on Thor; there is no FP8 on Orin). INT8 linears
(the INT8 head) keep DequantizeLinear -> MatMul.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import onnx
from onnx import TensorProto, helper

from ..plugins import ops
from .decoder import ATTENTION_SEAMS_KEY

PLUGIN_GRAPH = "decoder.plugins.onnx"


class RewriteError(ValueError):
    """The graph is not what the exporter writes; the message names the file and the node."""


class _Graph:
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
        return f"plugin_{hint}_{self._count}"

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


def _int8_view(init: TensorProto, k: int, n: int) -> TensorProto:
    """The INT4 initializer W^T [K, N] as int8 [K, N/2] over the same bytes (external or inline)."""
    view = TensorProto(name=init.name + ".i8", data_type=TensorProto.INT8, dims=[k, n // 2])
    if init.data_location == TensorProto.EXTERNAL:
        view.data_location = TensorProto.EXTERNAL
        view.external_data.extend(init.external_data)
    else:
        view.raw_data = init.raw_data
    return view


def _rewrite_int4_linears(graph: _Graph) -> int:
    count = 0
    for mm in [n for n in graph.g.node if n.op_type == "MatMul"]:
        dq = graph.producer.get(mm.input[1])
        if dq is None or dq.op_type != "DequantizeLinear":
            continue
        w = graph.inits.get(dq.input[0])
        if w is None or w.data_type != TensorProto.INT4:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in dq.attribute}
        k, n = w.dims
        group = attrs.get("block_size", 0)
        if attrs.get("axis", 1) != 0 or group not in ops.GROUP_SIZES or len(dq.input) > 2 or n % 8:
            raise RewriteError(f"{graph.path}: INT4 weight {w.name} is not W^T with blocks along K in a group "
                               f"size the plugin takes ({ops.GROUP_SIZES}) and N % 8 == 0")
        if len(graph.consumers[dq.output[0]]) != 1:
            raise RewriteError(f"{graph.path}: dequantized {w.name} feeds more than one MatMul")
        view = _int8_view(w, k, n)
        graph.g.initializer.append(view)
        graph.add(ops.INT4_GEMM, [mm.input[0], view.name, dq.input[1]], list(mm.output), domain=ops.DOMAIN,
                  gemm_n=n, gemm_k=k, group_size=group, plugin_version=ops.PLUGIN_VERSION,
                  plugin_namespace=ops.PLUGIN_NAMESPACE)
        graph.g.node.remove(mm)
        count += 1
    return count


def _qkv(graph: _Graph, seam: dict[str, str]) -> str:
    """The fused q/k/v tensor: the input of the Split that made q, k and v, else their Concat."""
    split = graph.producer.get(seam["q"])
    if split is not None and split.op_type == "Split" and list(split.output) == [seam["q"], seam["k"], seam["v"]]:
        return split.input[0]
    out = graph.fresh("qkv")
    graph.add("Concat", [seam["q"], seam["k"], seam["v"]], [out], axis=-1)
    return out


def _rope_inputs(graph: _Graph, seam: dict[str, str]) -> tuple[str, str, str]:
    """cos/sin [B, 1, S, D] -> [B, S, D]; the query scale (a scalar or [B, 1, S, 1]) -> [B, S]."""
    axis1 = graph.const([1])
    cos, sin = graph.fresh("cos"), graph.fresh("sin")
    graph.add("Squeeze", [seam["cos"], axis1], [cos])
    graph.add("Squeeze", [seam["sin"], axis1], [sin])
    first = graph.fresh("cos_first")  # [B, 1, S, 1]: the shape the scale broadcasts to
    graph.add("Slice", [seam["cos"], graph.const([0]), graph.const([1]), graph.const([3])], [first])
    shape, full, scale = graph.fresh("shape"), graph.fresh("q_scale4"), graph.fresh("q_scale")
    graph.add("Shape", [first], [shape])
    graph.add("Expand", [seam["q_scale"], shape], [full])
    graph.add("Squeeze", [full, graph.const([1, 3])], [scale])
    return cos, sin, scale


def _rewrite_attention(graph: _Graph, seams: list[dict[str, str]], heads: int, kv_heads: int, head_dim: int,
                       dtype: int) -> None:
    g = graph.g
    rope = _rope_inputs(graph, seams[0])
    if any((s["cos"], s["sin"], s["q_scale"]) != (seams[0]["cos"], seams[0]["sin"], seams[0]["q_scale"])
           for s in seams):
        raise RewriteError(f"{graph.path}: layers do not share one set of RoPE tables")
    cache_shape = ["batch", 2, kv_heads, ops.CACHE_DIM, head_dim]
    old_io = set()
    for i, seam in enumerate(seams):
        graph.add(ops.ATTENTION, [_qkv(graph, seam), ops.cache_input(i), ops.PAST_LENGTHS, *rope],
                  [seam["out"], ops.cache_output(i)], domain=ops.DOMAIN, num_q_heads=heads,
                  num_kv_heads=kv_heads, head_size=head_dim, plugin_version=ops.PLUGIN_VERSION,
                  plugin_namespace=ops.PLUGIN_NAMESPACE)
        old_io.update((seam["past_key"], seam["past_value"], seam["present_key"], seam["present_value"]))
        for old in (seam["out"],):  # the old block's last node now has a second producer: drop it
            g.node.remove(graph.producer[old])
    outputs = [o for o in g.output if o.name not in old_io]
    del g.output[:]
    g.output.extend(outputs)
    g.output.extend(helper.make_tensor_value_info(ops.cache_output(i), dtype, cache_shape) for i in range(len(seams)))
    inputs = [i for i in g.input if i.name not in old_io]
    del g.input[:]
    g.input.extend(inputs)
    g.input.append(helper.make_tensor_value_info(ops.PAST_LENGTHS, TensorProto.INT32, ["batch"]))
    g.input.extend(helper.make_tensor_value_info(ops.cache_input(i), dtype, cache_shape) for i in range(len(seams)))


def _topological(g: onnx.GraphProto) -> None:
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


def write_plugin_graph(decoder_path: str | Path, out_path: str | Path | None = None) -> Path:
    """Derive the plugin graph from ``decoder.onnx``; it is written beside it and shares its data
    file. Returns the new graph's path."""
    decoder_path = Path(decoder_path)
    out_path = Path(out_path) if out_path else decoder_path.with_name(PLUGIN_GRAPH)
    if out_path.parent.resolve() != decoder_path.parent.resolve():
        raise RewriteError(f"{out_path}: the plugin graph must sit beside {decoder_path} (it shares its weights file)")
    model = onnx.load(str(decoder_path), load_external_data=False)
    props = {p.key: p.value for p in model.metadata_props}
    if ATTENTION_SEAMS_KEY not in props:
        raise RewriteError(f"{decoder_path}: no {ATTENTION_SEAMS_KEY} metadata; re-export it with this edge_sdk")
    meta = json.loads(props[ATTENTION_SEAMS_KEY])
    seams = meta["layers"]
    past = next(i for i in model.graph.input if i.name == seams[0]["past_key"])
    graph = _Graph(model, decoder_path)
    n_int4 = _rewrite_int4_linears(graph)
    _rewrite_attention(graph, seams, meta["num_heads"], meta["num_kv_heads"], meta["head_dim"],
                       past.type.tensor_type.elem_type)
    _topological(model.graph)
    graph.remove_dead()
    model.opset_import.append(helper.make_opsetid(ops.DOMAIN, 1))
    del model.metadata_props[:]
    helper.set_model_props(model, {**{k: v for k, v in props.items() if k != ATTENTION_SEAMS_KEY},
                                   "edge_sdk.plugin_graph": json.dumps({"int4_gemms": n_int4, "attention": len(seams)})})
    onnx.save_model(model, str(out_path))
    onnx.checker.check_model(str(out_path))
    return out_path

