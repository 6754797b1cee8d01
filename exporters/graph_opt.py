"""Latency rewrites applied to the exported graphs — plain ONNX in, plain ONNX out.

Each rewrite is exact up to float rounding (the export's parity check runs on the rewritten
graph), keeps static shapes, and uses only ai.onnx ops on the TensorRT allow-list.  They exist
because ONNX Runtime's CPU kernels are slow or unfused for what the tracer emits:

- :func:`gather_rows_not_elements` — ``conv_band`` gathers a constant index along the *last*
  axis: ORT's Gather copies one float per (outer index × gathered index), ~H·k_q·k_k·W tiny
  memcpys per layer (the biggest single op in the paper preset's profile).  Rewritten as
  Transpose → Gather(axis 0) → Transpose, which copies whole rows of the outer dims instead.
- :func:`canonical_gelu` — torch's exact GELU is traced as ``x * (0.5 * (1 + erf(x/√2)))``,
  which ORT's GeluFusion does not match (it wants ``(x * 0.5) * (1 + erf(x/√2))``).  Reordered so
  that ORT fuses five nodes into one Gelu kernel at load (TensorRT fuses either form).
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import helper, numpy_helper


def _consts(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    out = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            out[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    return out


def _shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    out = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        t = vi.type.tensor_type
        if t.HasField("shape"):
            out[vi.name] = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
    for i in inferred.graph.initializer:
        out[i.name] = list(i.dims)
    return out


def _is_scalar(consts: dict, name: str, value: float, tol: float = 1e-6) -> bool:
    v = consts.get(name)
    return (
        v is not None and v.size == 1 and abs(float(v.reshape(-1)[0]) - value) <= tol * max(1.0, abs(value))
    )


def gather_rows_not_elements(model: onnx.ModelProto, *, min_outer: int = 2) -> int:
    """Rewrite last-axis Gathers with a constant 1-D index (see module docstring); returns count."""
    consts = _consts(model)
    shapes = _shapes(model)
    g = model.graph
    new_nodes = []
    count = 0
    for node in g.node:
        if node.op_type != "Gather" or node.input[1] not in consts:
            new_nodes.append(node)
            continue
        shp = shapes.get(node.input[0])
        idx = consts[node.input[1]]
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        if not shp or min(shp) < 1 or idx.ndim != 1:
            new_nodes.append(node)
            continue
        r = len(shp)
        axis = axis % r
        outer = int(np.prod(shp[:axis])) if axis else 1
        if axis != r - 1 or r < 2 or outer < min_outer:
            new_nodes.append(node)
            continue
        perm_in = [r - 1] + list(range(r - 1))
        perm_out = list(range(1, r)) + [0]
        base = node.name or node.output[0]
        t_in, gathered = f"{base}__rows_t", f"{base}__rows_g"
        new_nodes += [
            helper.make_node("Transpose", [node.input[0]], [t_in], perm=perm_in, name=f"{base}__t_in"),
            helper.make_node("Gather", [t_in, node.input[1]], [gathered], axis=0, name=f"{base}__rows"),
            helper.make_node("Transpose", [gathered], [node.output[0]], perm=perm_out, name=f"{base}__t_out"),
        ]
        count += 1
    if count:
        del g.node[:]
        g.node.extend(new_nodes)
    return count


def canonical_gelu(model: onnx.ModelProto) -> int:
    """``x * (0.5 * (1 + erf(x / √2)))`` → ``(x * 0.5) * (1 + erf(x / √2))``; returns count."""
    consts = _consts(model)
    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    count = 0
    half_name = None
    for erf in list(g.node):
        if erf.op_type != "Erf":
            continue
        div = producer.get(erf.input[0])
        if div is None or div.op_type != "Div" or not _is_scalar(consts, div.input[1], math.sqrt(2.0), 1e-5):
            continue
        x = div.input[0]
        add_users = consumers.get(erf.output[0], [])
        if len(add_users) != 1 or add_users[0].op_type != "Add":
            continue
        add = add_users[0]
        other = add.input[1] if add.input[0] == erf.output[0] else add.input[0]
        if not _is_scalar(consts, other, 1.0):
            continue
        half_users = consumers.get(add.output[0], [])
        if len(half_users) != 1 or half_users[0].op_type != "Mul":
            continue
        half = half_users[0]
        hother = half.input[1] if half.input[0] == add.output[0] else half.input[0]
        if not _is_scalar(consts, hother, 0.5):
            continue
        outs = consumers.get(half.output[0], [])
        if len(outs) != 1 or outs[0].op_type != "Mul" or x not in outs[0].input:
            continue
        final = outs[0]
        if half_name is None:
            half_name = "gelu__half"
            g.initializer.append(numpy_helper.from_array(np.array(0.5, dtype=np.float32), half_name))
        # half: Mul(0.5, add) → Mul(x, 0.5);  final: Mul(x, half) → Mul(half, add)
        del half.input[:]
        half.input.extend([x, half_name])
        del final.input[:]
        final.input.extend([half.output[0], add.output[0]])
        count += 1
    if count:
        _toposort(model)
    return count


def _toposort(model: onnx.ModelProto) -> None:
    g = model.graph
    ready = {i.name for i in g.input} | {i.name for i in g.initializer} | {""}
    pending = list(g.node)
    ordered = []
    while pending:
        progressed = False
        rest = []
        for n in pending:
            if all(i in ready for i in n.input):
                ordered.append(n)
                ready.update(n.output)
                progressed = True
            else:
                rest.append(n)
        if not progressed:
            raise ValueError("graph_opt: graph has a cycle or dangling input after rewrite")
        pending = rest
    del g.node[:]
    g.node.extend(ordered)


def optimize(model: onnx.ModelProto) -> dict[str, int]:
    """All rewrites in place; returns how many of each were applied."""
    stats = {"gather_rows": gather_rows_not_elements(model), "gelu": canonical_gelu(model)}
    del model.graph.value_info[:]
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    model.graph.value_info.extend(inferred.graph.value_info)
    return stats
