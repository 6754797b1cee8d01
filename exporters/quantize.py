"""Reduced-precision variants of an exported step graph.

- :func:`quantize_int8`: ONNX Runtime dynamic quantisation for CPU — weights of the Gemm/MatMul
  layers with a constant weight become int8 (per output channel), activations are quantised to
  uint8 on the fly (``DynamicQuantizeLinear`` + ``MatMulInteger``).  The attention's
  activation×activation MatMuls stay float32.  ORT-CPU only (TensorRT does not parse
  ``DynamicQuantizeLinear``/``MatMulInteger``).

  ``reduce_range=True`` (7-bit weights) by default: on x86 CPUs without VNNI (AVX2 only) ORT's
  u8s8 kernel uses ``vpmaddubsw``, whose int16 pair sums saturate with full-range weights
  (``docs/engines.md``, "Exporter and precision choices", has the R² of both).  The read-in and
  velocity head stay float32 (:data:`FP32_LAYERS`).
- :func:`quantize_int8_static`: static int8 in QDQ form — weights int8 per channel, each weight
  matmul's input activation uint8 with a scale calibrated on the step graph's own inputs over a
  real stream (:func:`calibration_feeds`).  Compared in ``bench/bench_engines.py`` with the
  dynamic graph; not written by ``rpnt export``.
- :func:`convert_fp16`: a small cast-based float16 conversion for GPUs (no onnxconverter-common):
  every float32 initializer / constant / Cast target becomes float16 (values clipped to the
  float16 range, so the attention's −1e9 mask becomes −65504, still exactly 0 after softmax);
  graph inputs and outputs stay float32, with a Cast at each boundary, so the engine and the
  state layout do not change.

Each copies the rpnt contract with ``precision`` updated.  Whether a variant is *written* is
decided by the export's parity gate (:mod:`exporters.stages`), not here.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .contract import PREFIX

FP16_MAX = float(np.finfo(np.float16).max)


def _set_precision(model: onnx.ModelProto, precision: str, src: onnx.ModelProto) -> None:
    props = {p.key: p.value for p in src.metadata_props}
    props[PREFIX + "precision"] = precision
    del model.metadata_props[:]
    helper.set_model_props(model, props)
    model.doc_string = src.doc_string


#: Layers kept in float32 by :func:`quantize_int8` (matched against weight initializer names):
#: the read-in and the velocity head, the model's first and last layers on the velocity path
#: (keeping them fp32 lowers the R² loss, ``docs/engines.md``), and the 1-output context-pooling
#: score (512 weights: nothing to gain, and quantising it makes its input quantisation shared
#: with the qkv projection, which stops ORT fusing DynamicQuantizeMatMul).
FP32_LAYERS = ("read_in.", "velocity_head.", "pool_score.")


def _weight_matmuls(model: onnx.ModelProto, fp32_layers: tuple[str, ...]) -> list[onnx.NodeProto]:
    """The Gemm/MatMul nodes that read a weight named by one of ``fp32_layers`` (kept float32)."""
    return [
        n
        for n in model.graph.node
        if n.op_type in ("Gemm", "MatMul") and any(pat in i for i in n.input for pat in fp32_layers)
    ]


def _quantize_file(
    src: str | Path,
    dst: str | Path,
    *,
    keep: Callable[[onnx.ModelProto], list[str]],
    run: Callable[[str, str, list[str]], None],
) -> Path:
    """``run(in_path, out_path, nodes_to_exclude)`` (an ORT quantiser) on a copy of ``src``
    without value_info, with ``keep(copy)`` excluded; the result with the contract of ``src``
    (precision ``int8``) into ``dst``."""
    src, dst = Path(src), Path(dst)
    with tempfile.TemporaryDirectory() as tmp:
        # The quantiser rewrites nodes and re-runs strict shape inference; the exporter's
        # value_info annotations would then conflict, so hand it a copy without them.
        plain = onnx.load(str(src))
        del plain.graph.value_info[:]
        inp, out = Path(tmp) / "in.onnx", Path(tmp) / "q.onnx"
        onnx.save(plain, str(inp))
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)  # "consider pre-processing" warning: not applicable to our graphs
        try:
            run(str(inp), str(out), keep(plain))
        finally:
            root.setLevel(level)
        model = onnx.load(str(out))
    _set_precision(model, "int8", onnx.load(str(src), load_external_data=False))
    onnx.save(model, str(dst))
    return dst


def quantize_int8(
    src: str | Path,
    dst: str | Path,
    *,
    per_channel: bool = True,
    reduce_range: bool = True,
    fp32_layers: tuple[str, ...] = FP32_LAYERS,
    exclude_nodes: tuple[str, ...] = (),
) -> Path:
    """Dynamic int8 quantisation of ``src`` into ``dst`` (weights int8, MatMul/Gemm only).

    Args:
        fp32_layers: substrings of weight names whose Gemm/MatMul stay float32.
        exclude_nodes: node names to leave alone as well.

    Returns:
        ``dst``.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    def keep(plain: onnx.ModelProto) -> list[str]:
        # the quantiser renames a Gemm it splits into MatMul + Add
        return list(exclude_nodes) + [
            m for n in _weight_matmuls(plain, fp32_layers) for m in (n.name, f"{n.name}_MatMul")
        ]

    def run(inp: str, out: str, nodes_to_exclude: list[str]) -> None:
        quantize_dynamic(
            inp,
            out,
            weight_type=QuantType.QInt8,
            per_channel=per_channel,
            reduce_range=reduce_range,
            op_types_to_quantize=["MatMul", "Gemm"],
            nodes_to_exclude=nodes_to_exclude,
            extra_options={"MatMulConstBOnly": True},
        )

    return _quantize_file(src, dst, keep=keep, run=run)


def calibration_feeds(src: str | Path, counts: np.ndarray) -> list[dict[str, np.ndarray]]:
    """The step graph's inputs at every bin of ``counts`` (T, N), stepping it from ``reset()``:
    what :func:`quantize_int8_static` calibrates activation ranges on."""
    from .contract import COUNTS
    from .runtime import OnnxStepEngine

    eng = OnnxStepEngine(src, warmup_bins=0)
    entries = eng.contract.state
    feeds = []
    for row in np.asarray(counts, dtype=np.float32):
        state = eng.state
        feeds.append({COUNTS: row[None].copy(), **{e.input: state[e.key] for e in entries}})
        eng.step(row)
    return feeds


def quantize_int8_static(
    src: str | Path,
    dst: str | Path,
    feeds: list[dict[str, np.ndarray]],
    *,
    per_channel: bool = True,
    fp32_layers: tuple[str, ...] = FP32_LAYERS,
) -> Path:
    """Static int8 (QDQ) quantisation of the weight Gemm/MatMul layers of ``src`` into ``dst``.

    Weights int8 per output channel, each layer's input activation uint8 with a fixed scale
    calibrated (min/max) on ``feeds`` (:func:`calibration_feeds`).  No per-call
    ``DynamicQuantizeLinear``: ORT fuses each Q/DQ pair around a weight matmul into one integer
    kernel at load.  ``fp32_layers`` as in :func:`quantize_int8`.

    Returns:
        ``dst``.
    """
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(feeds)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._it, None)

    def run(inp: str, out: str, nodes_to_exclude: list[str]) -> None:
        quantize_static(
            inp,
            out,
            Reader(),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=["MatMul", "Gemm"],
            per_channel=per_channel,
            reduce_range=False,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=nodes_to_exclude,
            extra_options={"MatMulConstBOnly": True},
        )

    return _quantize_file(
        src, dst, keep=lambda plain: [n.name for n in _weight_matmuls(plain, fp32_layers)], run=run
    )


def _f16_tensor(t: TensorProto) -> TensorProto:
    arr = numpy_helper.to_array(t).astype(np.float32)
    arr = np.clip(arr, -FP16_MAX, FP16_MAX).astype(np.float16)
    return numpy_helper.from_array(arr, t.name)


def _fp16_constants(g: onnx.GraphProto) -> None:
    """float32 initializers and constant attributes → float16 (clipped); Casts to float32 → float16."""
    for i, init in enumerate(g.initializer):
        if init.data_type == TensorProto.FLOAT:
            g.initializer[i].CopyFrom(_f16_tensor(init))
    for node in g.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == TensorProto.FLOAT:
                attr.t.CopyFrom(_f16_tensor(attr.t))
            if node.op_type == "Cast" and attr.name == "to" and attr.i == TensorProto.FLOAT:
                attr.i = TensorProto.FLOAT16


def _cast_inputs(g: onnx.GraphProto) -> tuple[list[onnx.NodeProto], dict[str, str]]:
    """A Cast to float16 after each float32 graph input, the nodes reading the cast instead.

    Returns:
        The Cast nodes, and graph input name → the name of its float16 cast.
    """
    casts, renames = [], {}
    for inp in g.input:
        if inp.type.tensor_type.elem_type == TensorProto.FLOAT:
            inner = inp.name + "__fp16"
            renames[inp.name] = inner
            casts.append(
                helper.make_node(
                    "Cast", [inp.name], [inner], to=TensorProto.FLOAT16, name=f"cast_in_{inp.name}"
                )
            )
    for node in g.node:
        for k, name in enumerate(node.input):
            if name in renames:
                node.input[k] = renames[name]
    return casts, renames


def _cast_outputs(g: onnx.GraphProto, input_renames: dict[str, str]) -> list[onnx.NodeProto]:
    """Each float32 graph output computed in float16 under another name, then a Cast to float32
    under its own name (from the input's cast when the output is a graph input).

    Returns:
        The Cast nodes.
    """
    out_renames = {
        out.name: out.name + "__fp16"
        for out in g.output
        if out.type.tensor_type.elem_type == TensorProto.FLOAT
    }
    for node in g.node:
        for k, name in enumerate(node.output):
            if name in out_renames:
                node.output[k] = out_renames[name]
        for k, name in enumerate(node.input):
            if name in out_renames:
                node.input[k] = out_renames[name]
    return [
        helper.make_node(
            "Cast",
            [input_renames.get(out.name, out_renames[out.name])],
            [out.name],
            to=TensorProto.FLOAT,
            name=f"cast_out_{out.name}",
        )
        for out in g.output
        if out.name in out_renames
    ]


def convert_fp16(src: str | Path, dst: str | Path) -> Path:
    """float32 → float16 weights and compute; float32 graph I/O (see module docstring).

    Returns:
        ``dst`` (checked by ``onnx.checker``; contract copied with precision ``fp16``).
    """
    model = onnx.load(str(src))
    g = model.graph
    _fp16_constants(g)
    head, renames = _cast_inputs(g)
    tail = _cast_outputs(g, renames)
    nodes = head + list(g.node) + tail
    del g.node[:]
    g.node.extend(nodes)
    del g.value_info[:]
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    _set_precision(model, "fp16", onnx.load(str(src), load_external_data=False))
    onnx.checker.check_model(model)
    onnx.save(model, str(dst))
    return Path(dst)
