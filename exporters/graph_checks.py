"""Checks that an exported graph is one TensorRT (and ONNX Runtime's TensorRT provider) can take.

The one place that says which ONNX ops we allow: :data:`TENSORRT_OPS`.

Checks (:func:`check_graph` returns the list of problems; :func:`assert_graph_ok` raises):
- opset: the ai.onnx opset is within :data:`OPSET_RANGE` (TensorRT 10.x parses opsets 9–20);
- ops: every node is an ai.onnx op in :data:`TENSORRT_OPS`; no custom domains (``com.microsoft``
  contrib ops are ONNX Runtime-only), no control flow (:data:`CONTROL_FLOW`: ``If``/``Loop``/
  ``Scan`` are accepted by TensorRT but we promise a straight-line graph);
- static shapes: after strict shape inference every graph input, output and intermediate value
  has a known rank and only positive integer dimensions (no symbolic ``dim_param``);
- constant shape arguments: the shape-like inputs of Reshape/Expand/Slice/Squeeze/Unsqueeze/
  Pad/Split/Reduce* (TensorRT wants ``axes`` as initializers) are initializers or Constant outputs;
- dtypes: no float64 tensors (TensorRT casts DOUBLE down; we never want it on the hot path);
- LayerNormalization has only its first output (TensorRT's restriction).

The int8 dynamic-quantised graph (``DynamicQuantizeLinear`` + ``MatMulInteger``) is an ONNX
Runtime CPU artefact and is *not* TensorRT-compatible; :func:`check_graph` is for fp32 and fp16.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx
from onnx import TensorProto

#: ai.onnx opsets the exported graphs may declare (the exporter writes :data:`EXPORT_OPSET`).
EXPORT_OPSET = 18
OPSET_RANGE = (17, 20)

#: ONNX ops that TensorRT's ONNX parser supports (onnx-tensorrt ``docs/operators.md``, TensorRT
#: 10.x, FP32/FP16 rows marked "Y"), restricted to the ones a transformer graph plausibly uses.
#: Restrictions that matter here (constant ``axes``/shapes) are enforced by :func:`check_graph`.
TENSORRT_OPS = frozenset(
    {
        "Abs",
        "Add",
        "And",
        "ArgMax",
        "ArgMin",
        "Cast",
        "CastLike",
        "Ceil",
        "Clip",
        "Concat",
        "Constant",
        "ConstantOfShape",
        "Cos",
        "CumSum",
        "Div",
        "Einsum",
        "Equal",
        "Erf",
        "Exp",
        "Expand",
        "Flatten",
        "Floor",
        "Gather",
        "GatherElements",
        "GatherND",
        "Gelu",
        "Gemm",
        "Greater",
        "GreaterOrEqual",
        "Identity",
        "LayerNormalization",
        "LeakyRelu",
        "Less",
        "LessOrEqual",
        "Log",
        "LogSoftmax",
        "MatMul",
        "Max",
        "Mean",
        "Min",
        "Mul",
        "Neg",
        "Not",
        "Or",
        "Pad",
        "Pow",
        "Range",
        "Reciprocal",
        "ReduceL2",
        "ReduceLogSumExp",
        "ReduceMax",
        "ReduceMean",
        "ReduceMin",
        "ReduceProd",
        "ReduceSum",
        "ReduceSumSquare",
        "Relu",
        "Reshape",
        "ScatterElements",
        "ScatterND",
        "Shape",
        "Sigmoid",
        "Sign",
        "Sin",
        "Size",
        "Slice",
        "Softmax",
        "Softplus",
        "Split",
        "Sqrt",
        "Squeeze",
        "Sub",
        "Sum",
        "Tanh",
        "Tile",
        "TopK",
        "Transpose",
        "Unsqueeze",
        "Where",
    }
)

#: Ops with data-dependent control flow: never in our graphs.
CONTROL_FLOW = frozenset({"If", "Loop", "Scan"})

#: (op, input index) pairs whose value must be a build-time constant.
_CONSTANT_INPUTS: dict[str, tuple[int, ...]] = {
    "Reshape": (1,),
    "Expand": (1,),
    "Slice": (1, 2, 3, 4),
    "Squeeze": (1,),
    "Unsqueeze": (1,),
    "Pad": (1, 2, 3),
    "Split": (1,),
    "Tile": (1,),
    "ConstantOfShape": (0,),
    "ReduceSum": (1,),
    "ReduceMean": (1,),
    "ReduceMax": (1,),
    "ReduceMin": (1,),
    "ReduceProd": (1,),
    "ReduceSumSquare": (1,),
    "ReduceL2": (1,),
    "ReduceLogSumExp": (1,),
    "TopK": (1,),
}


class GraphCheckError(ValueError):
    """An exported graph that breaks the static-graph / TensorRT-op contract."""


def _load(model: onnx.ModelProto | str | Path) -> onnx.ModelProto:
    return model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))


def ai_onnx_opset(model: onnx.ModelProto) -> int:
    """The graph's ai.onnx opset (0 when it imports none)."""
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return 0


def op_types(model: onnx.ModelProto | str | Path) -> dict[str, int]:
    """Op type (``domain::op`` for non-default domains) → node count, over the main graph."""
    model = _load(model)
    out: dict[str, int] = {}
    for node in model.graph.node:
        key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"
        out[key] = out.get(key, 0) + 1
    return out


def _dims(vi: onnx.ValueInfoProto) -> list[int | str] | None:
    """A value's dims (ints, or the symbolic name / ``?``), or None when its rank is unknown."""
    t = vi.type.tensor_type
    if not t.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim]


def check_graph(
    model: onnx.ModelProto | str | Path, *, tensorrt: bool = True, allow_dynamic: tuple[str, ...] = ()
) -> list[str]:
    """Problems with ``model`` (empty list = OK), in the order of the module docstring's checks.

    Args:
        model: the graph, or its file.
        tensorrt: also apply the op allow-list and the constant-argument rules.
        allow_dynamic: names of symbolic dims that are tolerated (none for a step graph).
    """
    model = _load(model)
    problems: list[str] = []
    opset = ai_onnx_opset(model)
    if not OPSET_RANGE[0] <= opset <= OPSET_RANGE[1]:
        problems.append(f"opset: ai.onnx opset {opset} outside {OPSET_RANGE}")
    try:
        inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
    except Exception as exc:  # noqa: BLE001 — report, don't crash the checker
        problems.append(f"shape inference failed: {exc}")
        inferred = model
    g = inferred.graph
    init_names = {i.name for i in g.initializer}
    constants = init_names | {o for n in g.node if n.op_type == "Constant" for o in n.output}
    for node in g.node:
        problems += _node_problems(node, tensorrt=tensorrt, constants=constants)
    seen: set[str] = set()
    for vi in [*g.input, *g.output, *g.value_info]:
        if vi.name not in seen:
            seen.add(vi.name)
            problems += _value_problems(vi, allow_dynamic)
    # every node output should have received a shape
    for node in g.node:
        problems += [
            f"value {o} (from {node.op_type}): shape not inferred"
            for o in node.output
            if o and o not in seen and o not in init_names
        ]
    problems += [f"initializer {i.name}: float64" for i in g.initializer if i.data_type == TensorProto.DOUBLE]
    return problems


def _node_problems(node: onnx.NodeProto, *, tensorrt: bool, constants: set[str]) -> list[str]:
    """One node's problems: control flow, custom domain, and with ``tensorrt`` the allow-list,
    LayerNormalization's outputs and the inputs that must be in ``constants``."""
    where = f"node {node.name or '?'} ({node.op_type})"
    problems = []
    if node.op_type in CONTROL_FLOW:
        problems.append(f"{where}: control flow is not allowed")
    if node.domain not in ("", "ai.onnx"):
        if tensorrt:
            problems.append(f"{where}: custom domain {node.domain!r} is not TensorRT-parsable")
        return problems
    if not tensorrt:
        return problems
    if node.op_type not in TENSORRT_OPS and node.op_type not in CONTROL_FLOW:
        problems.append(f"{where}: op not in the TensorRT allow-list (exporters/graph_checks.py)")
    if node.op_type == "LayerNormalization" and len([o for o in node.output if o]) > 1:
        problems.append(f"{where}: TensorRT supports only the first output (Y) of LayerNormalization")
    for idx in _CONSTANT_INPUTS.get(node.op_type, ()):
        if idx < len(node.input) and node.input[idx] and node.input[idx] not in constants:
            problems.append(f"{where}: input {idx} ({node.input[idx]}) must be a constant")
    return problems


def _value_problems(vi: onnx.ValueInfoProto, allow_dynamic: tuple[str, ...]) -> list[str]:
    """One value's problems: not a tensor, float64, unknown rank, a dim not static and not allowed."""
    if not vi.type.HasField("tensor_type"):
        return [f"value {vi.name}: not a tensor"]
    problems = []
    if vi.type.tensor_type.elem_type == TensorProto.DOUBLE:
        problems.append(f"value {vi.name}: float64")
    dims = _dims(vi)
    if dims is None:
        return [*problems, f"value {vi.name}: unknown rank"]
    bad = [d for d in dims if not (isinstance(d, int) and d > 0) and d not in allow_dynamic]
    if bad:
        problems.append(f"value {vi.name}: non-static shape {dims}")
    return problems


def assert_graph_ok(model: onnx.ModelProto | str | Path, *, what: str = "graph", **kw: Any) -> None:
    """:func:`check_graph` (``kw`` are its options), raising instead of returning the problems.

    Raises:
        GraphCheckError: listing the first 20 problems, named after ``what``.
    """
    problems = check_graph(model, **kw)
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise GraphCheckError(f"{what}: {len(problems)} problem(s):\n  {shown}{more}")
